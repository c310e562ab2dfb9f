"""The outbound queue's SMTP client: one connection to a mail server, the
messages it sends, and its wait for the next one.

Mailbox's own, on Twisted's public API only (issue 13, item 6). Twisted's
ESMTPSender does one message a connection, RSET after it, one command at a
time; what the queue needs instead (several messages a connection, no RSET
after a delivered one, PIPELINING, dot-stuffing that holds across chunk
boundaries, an end to the attempt when the server hangs up) could only be
had by driving SMTPClient's private state machine.

A connection goes

    greeting, EHLO (HELO if EHLO is refused), STARTTLS and EHLO again when
    offered, AUTH when the factory has credentials, then a transaction per
    message, a wait (`Parking`, outbound's _Idle) for the next message to
    the same host after each, and QUIT when none comes.

Each command written puts the handler of its reply at the end of a queue,
and each whole reply (multi-line ones joined) goes to the handler at its
head: one command at a time and pipelined commands are read the same way.

The outcome of a message is what Twisted's sender gave, for
`outbound.outcomes_of`: its job's Deferred fires with (accepted count,
[(address, code, reply), ...]) when the server takes it, and fails with
SMTPDeliveryError(code, reply, addresses=...) when it refuses; a refusal
before the transaction (greeting, HELO, STARTTLS, AUTH) is an
SMTPClientError with the server's code; no answer at all (timed out, lost,
not SMTP) is an SMTPClientError whose code is -1.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import os
import re
import typing
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.mail.smtp import (
    AUTHDeclinedError,
    AuthenticationError,
    AUTHRequiredError,
    CramMD5ClientAuthenticator,
    EHLORequiredError,
    LOGINAuthenticator,
    SMTPClientError,
    SMTPConnectError,
    SMTPDeliveryError,
    SMTPProtocolError,
    SMTPTimeoutError,
    TLSError,
)
from twisted.protocols.basic import FileSender
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from .lines import DirectWrites
from .printable import shown
from .routes import Hop

ONE_WRITE = 1 << 16  # bytes of a message sent in one write, not through a producer
MAX_LINE = 4096  # octets of a reply line kept (RFC 5321 §4.5.3.1.5 says 512); the rest is dropped
MAX_REPLY_LINES = 100  # lines of a multi-line reply kept (an EHLO reply has a dozen)
# AUTH mechanisms, the strongest first, as Twisted's sender tried them.
MECHANISMS = (b"CRAM-MD5", b"LOGIN", b"PLAIN")

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")

Handler = Callable[[int, bytes], None]  # what is done with a reply: its code and text


def ok(code: int) -> bool:
    return 200 <= code < 300


def path(address: str | bytes) -> bytes:
    """<address>, for MAIL and RCPT. The addresses were checked when they
    came in, and go out as they came: Twisted's quoteaddr would parse each
    again."""
    return b"<" + (address if isinstance(address, bytes) else address.encode("utf-8")) + b">"


def extensions(reply: bytes) -> dict[bytes, bytes]:
    """EHLO's reply as keyword -> parameters (RFC 5321 §4.1.1.1): every line
    but the first, which is the server's name and greeting."""
    found = {}
    for line in reply.split(b"\n")[1:]:
        keyword, _, parameters = line.strip().partition(b" ")
        if keyword:
            found[keyword.upper()] = parameters
    return found


@attrs.frozen
class Job:
    """One message for one connection: its envelope, its data and the
    Deferred that hears how it went."""

    sender: str
    recipients: list[str]
    file: Any  # the message, LF line ends, read from where it is
    result: Deferred


@attrs.frozen
class Settings:
    """How the connections of one factory talk to the server."""

    name: bytes  # ours, in EHLO and HELO
    timeout: float  # seconds to wait for each reply
    tls: Any = None  # the client context for STARTTLS, used whenever offered; None: never
    username: bytes = b""  # AUTH with these, when the server offers a mechanism we have
    password: bytes = attrs.field(default=b"", repr=False)
    require_auth: bool = False  # no AUTH (none offered, EHLO refused) ends the attempt


class Parking(typing.Protocol):
    """Where a connection waits between messages (outbound's _Idle)."""

    seconds: float  # how long it waits for the next message

    def settle(self, sender: Sender) -> None:
        """`sender` is done with a message, and about to wait."""

    def park(self, hop: Hop, sender: Sender) -> None:
        """`sender` waits for the next message to `hop`."""

    def discard(self, hop: Hop, sender: Sender) -> None:
        """`sender` waits no more: it is leaving, or gone."""


class DotStuffing:
    """A message's wire form, chunk by chunk (RFC 5321 §4.5.2): CRLF line
    ends (the queue keeps LF), and a dot doubled at the start of every line,
    of a line that starts a chunk too."""

    def __init__(self) -> None:
        self.line_start = True  # the next byte starts a line

    def __call__(self, chunk: bytes) -> bytes:
        if self.line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        if chunk:
            self.line_start = chunk.endswith(b"\n")
        return chunk.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")

    def end(self) -> bytes:
        """The end of the data, on a line of its own."""
        return b".\r\n" if self.line_start else b"\r\n.\r\n"


@attrs.define
class Transaction:
    """What the server said of one message so far."""

    job: Job
    mail: tuple[int, bytes] = (0, b"")  # MAIL's reply; 0: not yet
    rcpt: list[tuple[str, int, bytes]] = attrs.field(factory=list)  # each RCPT's, while MAIL stands

    @property
    def mail_accepted(self) -> bool:
        return ok(self.mail[0])

    @property
    def accepted(self) -> int:
        return sum(1 for _, code, _ in self.rcpt if ok(code))

    def refusal(self, data_reply: tuple[int, bytes] | None = None) -> tuple[int, bytes]:
        """Why a transaction that ended before its data did, as Twisted's
        sender said it: MAIL's refusal, DATA's (`data_reply`) if a recipient
        was accepted, else the last recipient's code."""
        if not self.mail_accepted:
            return self.mail
        if self.accepted and data_reply is not None:
            return data_reply
        return (self.rcpt[-1][1] if self.rcpt else 554), b"No recipients accepted"


class Sender(DirectWrites, Protocol, TimeoutMixin):
    """One connection to a mail server; see the module docstring."""

    factory: SenderFactory

    def __init__(self, factory: SenderFactory) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.job: Job | None = factory.job  # the message under way; None between messages
        self.closed: Deferred = Deferred()  # fires when the connection is gone
        self.replies_due: collections.deque[Handler] = collections.deque()
        self.unread = b""  # received, not yet a whole line
        self.overlong = False  # the line being received is past MAX_LINE: the rest is dropped
        self.reply_lines: list[bytes] = []  # the multi-line reply being received
        self.offered: dict[bytes, bytes] = {}  # the extensions of the last EHLO reply
        self.secure = False  # TLS is on
        self.transaction: Transaction | None = None
        self.stuffing = DotStuffing()
        self.idle_call: IDelayedCall | None = None  # ends the wait for the next message
        self.leaving = False  # let go while settling: QUIT instead of waiting
        self.closing = False  # hung up, or lost: nothing more is read

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self.factory.clock.callLater(period, func)  # timeouts on the queue's clock

    @property
    def pipelining(self) -> bool:
        return b"PIPELINING" in self.offered

    # --- the connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        # Commands and the message's last bytes are small writes that wait
        # for a reply: with Nagle's algorithm each would wait for the peer's
        # delayed ACK (40 ms on Linux) first.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # Each command and message goes straight to the socket (lines.DirectWrites):
        # no turn of the reactor to wait for, no epoll_ctl calls around it.
        self.write_directly(self.transport)
        self.secure = ISSLTransport.providedBy(self.transport)
        self.setTimeout(self.settings.timeout)
        self.replies_due.append(self.greeted)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        self.through_transport()
        self.setTimeout(None)
        self.stop_waiting()
        if self.factory.idle is not None:
            self.factory.idle.discard(self.factory.hop, self)
        if not self.closed.called:
            self.closed.callback(None)
        job, self.job = self.job, None
        if job is not None and not job.result.called:
            # No answer for the message: a code below 1, as for a refused connection.
            job.result.errback(SMTPConnectError(-1, f"connection lost: {reason.getErrorMessage()}"))

    def timeoutConnection(self) -> None:
        if self.job is None:  # between messages (RSET, QUIT): nothing waits for the answer
            self.abort()
        else:
            self.fail(SMTPTimeoutError(-1, b"Timeout waiting for SMTP server response"), abort=True)

    # --- replies ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if self.overlong:  # drop the rest of a line too long to keep, up to its end
            end = data.find(b"\n")
            if end < 0:
                return
            data, self.overlong = data[end:], False
        self.unread += data
        while not self.closing:
            end = self.unread.find(b"\n")
            if end < 0:
                break
            line, self.unread = self.unread[:end], self.unread[end + 1 :]
            self.line_received(line[:MAX_LINE])
        if len(self.unread) > MAX_LINE:
            self.unread, self.overlong = self.unread[:MAX_LINE], True

    def line_received(self, line: bytes) -> None:
        self.resetTimeout()  # each line is progress, a line of a long reply too
        line = line.removesuffix(b"\r")  # CRLF, or a bare LF from a sloppy server
        parsed = _REPLY_LINE.match(line)
        if parsed is None:
            seen = shown(line[:100].decode("utf-8", "replace"))
            self.fail(SMTPProtocolError(-1, f"not an SMTP reply: {seen}"), abort=True)
            return
        if len(self.reply_lines) < MAX_REPLY_LINES:
            self.reply_lines.append(line[4:])
        if parsed.group(2) == b"-":  # more lines to come
            return
        text, self.reply_lines = b"\n".join(self.reply_lines), []
        # As valid UTF-8, the text can go into an error's str() (Twisted's
        # SMTPClientError decodes strictly) and a log line.
        self.reply(int(parsed.group(1)), text.decode("utf-8", "replace").encode("utf-8"))

    def reply(self, code: int, text: bytes) -> None:
        if not self.replies_due:
            # Nothing was asked: a server that speaks out of turn (a 421
            # between messages) is not one to go on with.
            self.fail(SMTPProtocolError(-1, f"a reply to no command: {code}"), abort=True)
            return
        self.replies_due.popleft()(code, text)

    def send(self, data: bytes, *handlers: Handler) -> None:
        """Write `data`, and give the next replies to `handlers`, in turn."""
        self.replies_due.extend(handlers)
        self.resetTimeout()  # the wait for their replies starts now
        self.write(data)

    def command(self, line: bytes, handler: Handler) -> None:
        self.send(line + b"\r\n", handler)

    # --- greeting, EHLO, STARTTLS, AUTH -------------------------------------------------

    def greeted(self, code: int, text: bytes) -> None:
        if code == 220:
            self.ehlo()
        else:
            self.fail(SMTPConnectError(code, text))

    def ehlo(self) -> None:
        self.command(b"EHLO " + self.settings.name, self.ehlo_answered)

    def ehlo_answered(self, code: int, text: bytes) -> None:
        if not ok(code):
            self.ehlo_refused(code, text)
            return
        # Asked again after STARTTLS: what was offered in plaintext counts no more.
        self.offered = extensions(text)
        if self.settings.tls is not None and not self.secure and b"STARTTLS" in self.offered:
            self.command(b"STARTTLS", self.tls_answered)
        else:
            self.authenticate()

    def ehlo_refused(self, code: int, text: bytes) -> None:
        if self.settings.require_auth:  # AUTH needs ESMTP
            self.fail(EHLORequiredError(code, text))
            return
        self.offered = {}
        self.command(b"HELO " + self.settings.name, self.helo_answered)

    def helo_answered(self, code: int, text: bytes) -> None:
        if ok(code):
            self.start_transaction()
        else:  # the end of the attempt: asked again, the server would only refuse again
            self.fail(SMTPConnectError(code, text))

    def tls_answered(self, code: int, text: bytes) -> None:
        if code != 220:
            self.fail(TLSError(code, text))
            return
        # RFC 3207 §4.2: nothing said in plaintext counts once TLS is on, not
        # even what the server sent behind this reply (response injection).
        self.unread, self.overlong = b"", False
        self.through_transport()  # TLS is the transport's: writes go through it
        self.transport.startTLS(self.settings.tls)
        self.secure = True
        self.ehlo()

    def authenticate(self) -> None:
        s = self.settings
        offered = self.offered.get(b"AUTH", b"").upper().split()
        usable = [m for m in MECHANISMS if m in offered] if s.username and s.password else []
        if usable:
            self.begin_auth(usable[0])
        elif s.require_auth:
            names = b", ".join(MECHANISMS)
            self.fail(
                AUTHRequiredError(
                    502, b"Server does not support Client Authentication schemes [%s]" % names
                )
            )
        else:
            self.start_transaction()

    def begin_auth(self, mechanism: bytes) -> None:
        respond = responder(mechanism, self.settings.username, self.settings.password)
        command = b"AUTH " + mechanism
        if mechanism == b"PLAIN":  # its one message goes with the command (RFC 4954 §4)
            command += b" " + base64.b64encode(respond(b""))
        self.command(command, functools.partial(self.auth_answered, respond))

    def auth_answered(self, respond: Callable[[bytes], bytes], code: int, text: bytes) -> None:
        if code == 235:
            self.start_transaction()
        elif code != 334:
            self.fail(AUTHDeclinedError(code, text))
        else:
            try:
                challenge = base64.b64decode(text.strip(), validate=True)
            except binascii.Error:
                self.send(b"*\r\n")  # cancels the exchange (RFC 4954 §4)
                self.fail(AuthenticationError(501, b"malformed AUTH challenge: " + text[:100]))
                return
            answer = base64.b64encode(respond(challenge))
            self.command(answer, functools.partial(self.auth_answered, respond))

    # --- a transaction --------------------------------------------------------------------

    def start_transaction(self) -> None:
        job = self.job
        assert job is not None  # a connection starts with one, and `take` gives the next
        self.transaction = Transaction(job)
        mail = b"MAIL FROM:" + path(job.sender)
        if not self.pipelining:
            self.command(mail, self.mail_answered)
            return
        # RFC 2920: MAIL, every RCPT and DATA in one write, their replies read
        # in turn: one round trip before the data instead of one a command.
        lines = [mail] + [b"RCPT TO:" + path(r) for r in job.recipients] + [b"DATA"]
        handlers: list[Handler] = [self.mail_answered]
        handlers += [functools.partial(self.rcpt_answered, r) for r in job.recipients]
        handlers.append(self.data_answered)
        self.send(b"".join(line + b"\r\n" for line in lines), *handlers)

    def mail_answered(self, code: int, text: bytes) -> None:
        assert self.transaction is not None
        self.transaction.mail = (code, text)
        if not self.pipelining:
            self.next_command()

    def rcpt_answered(self, recipient: str, code: int, text: bytes) -> None:
        t = self.transaction
        assert t is not None
        if t.mail_accepted:  # after a refused MAIL, RCPT's reply says nothing of the recipient
            t.rcpt.append((recipient, code, text))
        if not self.pipelining:
            self.next_command()

    def next_command(self) -> None:
        """One command at a time: the next one, now that the last is answered."""
        t = self.transaction
        assert t is not None
        left = t.job.recipients[len(t.rcpt) :]
        if t.mail_accepted and left:
            rcpt = functools.partial(self.rcpt_answered, left[0])
            self.command(b"RCPT TO:" + path(left[0]), rcpt)
        elif t.mail_accepted and t.accepted:
            self.command(b"DATA", self.data_answered)
        else:
            self.finish(*t.refusal(), data_sent=False)

    def data_answered(self, code: int, text: bytes) -> None:
        t = self.transaction
        assert t is not None
        if code == 354 and t.accepted:
            self.send_data(t.job)
        elif code == 354:
            # Pipelined, nobody to send it to, yet the server waits for the
            # data (RFC 2920 §3.1 leaves this to the client): an empty message
            # ends the transaction, and its reply does not count.
            self.command(b".", lambda code, text: self.finish(*t.refusal(), data_sent=False))
        else:
            self.finish(*t.refusal((code, text)), data_sent=False)

    def send_data(self, job: Job) -> None:
        self.stuffing = DotStuffing()
        data = job.file.read(ONE_WRITE + 1)
        if len(data) <= ONE_WRITE:
            # All of it and its end in one write: no producer to register,
            # and no turn of the reactor to wait for.
            self.send(self.stuff(data) + self.stuffing.end(), self.data_answered_at_end)
            return
        job.file.seek(-len(data), os.SEEK_CUR)
        self.through_transport()  # the producer writes to the transport: all that follows must too
        sending = FileSender().beginFileTransfer(job.file, self.transport, self.stuff)
        sending.addCallbacks(self.data_written, self.data_not_written)

    def stuff(self, chunk: bytes) -> bytes:
        self.resetTimeout()  # the data going out is progress too
        return self.stuffing(chunk)

    def data_written(self, _last: bytes) -> None:
        self.send(self.stuffing.end(), self.data_answered_at_end)

    def data_not_written(self, reason: Failure) -> None:
        # The transport stopped the producer: the connection is going.
        why = reason.getErrorMessage()
        self.fail(SMTPConnectError(-1, f"connection lost during the message: {why}"), abort=True)

    def data_answered_at_end(self, code: int, text: bytes) -> None:
        self.finish(code, text, data_sent=True)

    def finish(self, code: int, text: bytes, *, data_sent: bool) -> None:
        """The transaction is over: tell its job, then wait for the next one
        (after RSET, if it ended before its data)."""
        t, self.transaction, self.job = self.transaction, None, None
        assert t is not None
        idle = self.factory.idle
        if idle is not None:
            idle.settle(self)  # counted among the waiting while the queue hears the outcome
        if not t.job.result.called:  # else the queue gave up on it already
            if ok(code):
                t.job.result.callback((t.accepted, t.rcpt))
            else:
                t.job.result.errback(SMTPDeliveryError(code, text, None, t.rcpt))
        if self.closing:
            return
        if idle is None:
            self.quit()
        elif data_sent:
            # The reply to the end of the data ends the transaction (RFC 5321
            # §4.1.1.4): the next MAIL may follow at once, without an RSET
            # and the round trip it costs a message.
            self.wait_for_next()
        else:
            # One that ended before its data may still be open at the server.
            self.command(b"RSET", self.reset_answered)

    # --- between messages ---------------------------------------------------------------

    def reset_answered(self, code: int, text: bytes) -> None:
        if ok(code):
            self.wait_for_next()
            return
        # A server that will not reset a transaction is not one to send more to.
        if self.factory.idle is not None:
            self.factory.idle.discard(self.factory.hop, self)
        self.quit()

    def wait_for_next(self) -> None:
        idle = self.factory.idle
        assert idle is not None
        if self.leaving:  # let go while settling
            idle.discard(self.factory.hop, self)
            self.quit()
            return
        idle.park(self.factory.hop, self)
        self.setTimeout(None)  # the wait has its own end
        self.idle_call = self.callLater(idle.seconds, self.leave)

    def take(self, job: Job) -> None:
        """Send `job` on this connection, which waits for one."""
        self.stop_waiting()
        self.job = job
        self.setTimeout(self.settings.timeout)
        self.start_transaction()

    def leave(self) -> None:
        """No message came, or the queue stops or needs the slot: QUIT, now
        or, while settling, once the wait would begin."""
        if self.idle_call is None:
            self.leaving = True
            return
        self.stop_waiting()
        if self.factory.idle is not None:
            self.factory.idle.discard(self.factory.hop, self)
        self.quit()

    def stop_waiting(self) -> None:
        call, self.idle_call = self.idle_call, None
        if call is not None and call.active():
            call.cancel()

    # --- the end ---------------------------------------------------------------------------

    def fail(self, error: SMTPClientError, abort: bool = False) -> None:
        """End the attempt with `error`: QUIT, or, where nothing more can be
        said (no answer, not SMTP), hang up at once."""
        job, self.job, self.transaction = self.job, None, None
        if abort:
            self.abort()
        else:
            self.quit()
        if job is not None and not job.result.called:
            job.result.errback(error)

    def quit(self) -> None:
        """QUIT, and hang up at whichever reply comes first (QUIT's, or one
        to a command still unanswered)."""
        self.replies_due.clear()
        self.setTimeout(self.settings.timeout)
        self.command(b"QUIT", self.hang_up)

    def hang_up(self, code: int = 0, text: bytes = b"") -> None:
        self.closing = True
        self.transport.loseConnection()

    def abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()


def responder(mechanism: bytes, username: bytes, password: bytes) -> Callable[[bytes], bytes]:
    """What to answer each challenge of AUTH `mechanism` with."""
    if mechanism == b"PLAIN":  # RFC 4616, with no authorisation identity
        return lambda challenge: b"\0" + username + b"\0" + password
    authenticator: Any = (
        CramMD5ClientAuthenticator(username)
        if mechanism == b"CRAM-MD5"
        else LOGINAuthenticator(username)
    )
    # Looked up at each challenge: LOGIN's answers the user name, then, as
    # another method, the password.
    return lambda challenge: authenticator.challengeResponse(password, challenge)


class SenderFactory(ClientFactory["Sender"]):
    """Makes the one connection that sends `job` first (see outbound._open)."""

    noisy = False  # the queue logs each attempt; "Starting factory" a message is noise

    def __init__(
        self,
        settings: Settings,
        job: Job,
        clock: Any,
        hop: Hop,
        idle: Parking | None = None,
        dest: str | None = None,
    ) -> None:
        self.settings = settings
        self.job = job
        self.clock = clock  # an IReactorTime: the connection's timeouts and waits
        self.hop = hop
        self.idle = idle  # where the connection waits between messages; None: QUIT after one
        self.dest = dest  # the destination its connection counts against (outbound's _Idle)

    def buildProtocol(self, addr: Any) -> Sender:
        return Sender(self)
