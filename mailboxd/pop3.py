"""POP3 server (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH PLAIN).

No APOP: it needs the plaintext password on the server, and accounts hold
only bcrypt hashes; so the greeting carries no timestamp.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from .auth import Authenticator, AuthResult, LoginOutcome
from .connections import ConnectionCount
from .faults import Faults
from .faults import apply as apply_fault
from .guard import refusal
from .lines import LineProtocol, POP3Reply
from .listing import ListedMessage, Listings, open_message, read_small
from .maildir import Mailbox, MailboxLocked, maildir_path
from .metrics import Metrics
from .node import POP3 as POP3_LEASE
from .node import Leases
from .popauth import PopAuthRegistry
from .sasl import Aborted, Challenge, Credentials, Exchange, Forbidden, Malformed, Unsupported
from .state import StateError
from .tls import ServerTLS, tls_connection
from .wire import WireEncoder, wire_form
from .workers import Workers

log = Logger()

LINE_MAX = 255  # RFC 2449 §4: command lines up to 255 octets, CRLF included

CAPABILITIES = ("UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING")
TLS_REQUIRED = "-ERR [AUTH] Authentication needs TLS here: send STLS first"

AUTH_FAILED = "-ERR [AUTH] Authentication failed"

# A message file this small is read on the reactor thread (it is in the page
# cache, and a thread hop would cost more); a bigger one is streamed from the
# storage pool in chunks of this size, as the client takes them.
CHUNK = 65536
BIG_LISTING = 1000  # LIST/UIDL of more messages than this are built off the reactor thread


@attrs.define(repr=False)
class POP3Factory(ServerFactory["POP3Server"]):
    config: Any
    auth: Authenticator
    popauth: PopAuthRegistry
    clock: IReactorTime
    workers: Workers
    tls: ServerTLS | None = None  # offered as STLS when set
    faults: Faults | None = None  # test-only fault injection (mailboxd.testing)
    connections: ConnectionCount | None = None  # shared by every listener
    listings: Listings = attrs.field(factory=Listings)  # Maildirs listed at recent logins
    metrics: Metrics = attrs.field(factory=Metrics)  # one for the process, shared
    # With front ends on several machines, a mailbox open here is a lease in
    # the state store too: a lock file is not reliable on a network file system.
    leases: Leases | None = None

    noisy = False  # the connection log lines say more

    def __repr__(self) -> str:
        return "<POP3Factory>"

    def buildProtocol(self, addr: Any) -> POP3Server:
        p = POP3Server()
        p.factory = self
        return p


_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits only: int() takes "1_0", "+1", "١"


def numeric_args(arg: str, count: int) -> list[int] | None:
    """Exactly `count` arguments, each a number in ASCII digits (RFC 1939 §3); else None."""
    if count == 1:  # RETR, DELE, LIST n, UIDL n: the commands a session repeats
        word = arg.strip()
        return [int(word)] if _NUMBER.fullmatch(word) else None
    words = arg.strip().split(" ")
    if len(words) != count or not all(_NUMBER.fullmatch(w) for w in words):
        return None
    return [int(w) for w in words]


def plural(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


def multiline(first: str, lines: list[str] | list[bytes]) -> bytes:
    body = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\r\n" for x in lines)
    return first.encode() + b"\r\n" + body + b".\r\n"


class POP3Server(LineProtocol):
    factory: POP3Factory
    max_line = LINE_MAX
    known_errors = (StateError,)
    began = 0.0  # when the session began, on the factory's clock

    def connectionMade(self) -> None:
        self.clock = self.factory.clock
        self.tls_pending = tls_connection(self.transport) is not None  # implicit TLS
        self.peer_ip = getattr(self.transport.getPeer(), "host", "unknown")
        self.username: str | None = None
        self.account: Any = None
        self.mailbox: Mailbox | None = None
        self.lease: str | None = None  # the mailbox's lease (see POP3Factory.leases)
        self.sasl = Exchange(("PLAIN",))
        self.setTimeout(self.factory.config.pop3.idle_timeout)
        self.errors = 0
        self.retrieved = self.retrieved_octets = 0  # by RETR, for the session's log line
        self.began = self.factory.clock.seconds()  # one line a session, at its end, as SMTP
        if not self.count_connection(self.factory.connections):
            log.info("pop3 refused {client}: too many connections", client=self.peer_ip)
            self.close(f"-ERR [SYS/TEMP] Too many connections from {self.peer_ip}")
            return
        d = self.factory.auth.guard.turned_away(self.peer_ip)
        self._wait(d.addCallbacks(self.greet, self.unsure))

    def greet(self, blocked: bool) -> None:
        if self._closed:
            return
        if blocked:
            log.info("pop3 refused blocked {client}", client=self.peer_ip)
            self.close("-ERR [SYS/TEMP] " + refusal(self.peer_ip))
            return
        self.sendLine(f"+OK {self.factory.config.mailbox.hostname} POP3 Mailbox ready")

    def unsure(self, f: Any) -> None:
        f.trap(StateError)
        log.error("{error}", error=str(f.value))
        if not self._closed:
            self.close("-ERR [SYS/TEMP] service unavailable, try again later")

    # --- plumbing -----------------------------------------------------------

    def answer(self, reply: POP3Reply | Deferred | None) -> Deferred | None:
        if isinstance(reply, Deferred):
            return reply.addCallback(self.answer)
        if reply is None or self._closed:
            return None
        if isinstance(reply, bytes):
            self.write(reply)
            return None
        self.sendLine(reply)
        if reply.startswith("-ERR"):
            self.errors += 1
            if self.errors >= self.factory.config.pop3.max_errors:
                log.info("pop3 too many errors from {client}", client=self.peer_ip)
                self.close("-ERR too many errors, closing")
        return None

    def close(self, reply: str) -> None:
        self.hang_up(reply)

    def idle(self) -> None:
        # RFC 1939 §3: autologout closes without entering the UPDATE state.
        log.info("pop3 timeout for {client}", client=self.peer_ip)
        self.close("-ERR autologout timer expired, closing")

    def internalError(self) -> None:
        if not self._closed:
            self.close("-ERR [SYS/TEMP] internal error, closing")

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.setTimeout(None)
        if self.mailbox is not None:
            self.mailbox.close()  # nothing marked deleted is removed
            self.mailbox = None
        self._release_lease()
        if self.account is not None:
            # One line a session, as Dovecot's logout line: a line for each
            # message would cost as much as sending it.
            log.info(
                "pop3 {account} retrieved {count} messages ({octets} octets)",
                account=self.account.address,
                count=self.retrieved,
                octets=self.retrieved_octets,
            )
            # The end of an authenticated session refreshes POP-before-SMTP.
            d = self.factory.popauth.authorise(self.peer_ip, self.account.domain)
            d.addErrback(lambda f: log.error("{error}", error=str(f.value)))
            self.account = None
        log.info(
            "pop3 session from {client}: {seconds:.1f} s",
            client=self.peer_ip,
            seconds=self.factory.clock.seconds() - self.began,
        )

    def _release_lease(self) -> None:
        if self.lease is not None and self.factory.leases is not None:
            self.factory.leases.release(self.lease)
        self.lease = None

    def lineTooLong(self) -> None:
        self.resetTimeout()
        self.sasl.cancel()
        self.answer("-ERR line too long")

    def lineReceived(self, line: bytes) -> Deferred | None:
        self.resetTimeout()
        text = line.decode("utf-8", "replace")
        if self.sasl.waiting:
            return self.answer(self.sasl_step(self.sasl.respond(text)))
        verb, _, arg = text.partition(" ")
        handler = getattr(self, f"pop_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            return self.answer("-ERR unknown command")
        faults = self.factory.faults
        rule = faults.take(f"pop3.{verb.upper()}", arg.strip()) if faults else None
        if rule is not None:
            reply = apply_fault(rule, self.transport, self.factory.clock, lambda: handler(arg))
            return self.answer(reply)
        return self.answer(handler(arg))

    def in_transaction(self) -> bool:
        return self.mailbox is not None

    def thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self.factory.workers.disk(f, *args)

    # --- AUTHORIZATION state -------------------------------------------------

    @property
    def secure(self) -> bool:
        return tls_connection(self.transport) is not None

    @property
    def auth_allowed(self) -> bool:
        return self.secure or not self.factory.config.smtp.require_tls_for_auth

    def pop_CAPA(self, arg: str) -> bytes:
        caps = list(CAPABILITIES)
        if self.factory.tls is not None and not self.secure and not self.in_transaction():
            caps.append("STLS")
        if self.auth_allowed and not self.in_transaction():
            caps += ["USER", "SASL PLAIN"]
        return multiline("+OK Capability list follows", caps + ["IMPLEMENTATION Mailbox"])

    def pop_STLS(self, arg: str) -> POP3Reply | None:
        if self.factory.tls is None:
            return "-ERR TLS not available"
        if self.in_transaction():
            return "-ERR STLS is only allowed before login"
        if self.secure:
            return "-ERR TLS already active"
        self.sendLine("+OK Begin TLS negotiation")
        self.username = None
        self.sasl.cancel()
        self.start_tls(self.factory.tls)
        log.info("pop3 STLS from {client}", client=self.peer_ip)
        return None

    def pop_USER(self, arg: str) -> POP3Reply:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        if not arg.strip():
            return "-ERR USER needs a user name (your full mail address)"
        self.username = arg.strip()
        return "+OK send your password"

    def pop_PASS(self, arg: str) -> POP3Reply | Deferred:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        if self.username is None:
            return "-ERR send USER first"
        if not arg:
            return "-ERR PASS needs a password"
        username, self.username = self.username, None
        return self.authenticate(username, arg.encode("utf-8"))

    def pop_APOP(self, arg: str) -> POP3Reply:
        return "-ERR APOP is not supported; use USER/PASS or AUTH PLAIN"

    def pop_AUTH(self, arg: str) -> POP3Reply | Deferred:
        if self.in_transaction():
            return "-ERR already authenticated"
        if not self.auth_allowed:
            return TLS_REQUIRED
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            return multiline("+OK SASL mechanisms follow", list(self.sasl.mechanisms))
        return self.sasl_step(self.sasl.start(mechanism, initial.strip() or None))

    def sasl_step(self, step: Any) -> POP3Reply | Deferred:
        if isinstance(step, Challenge):
            return f"+ {step.text}"
        if isinstance(step, Credentials):
            return self.authenticate(step.username, step.password)
        if isinstance(step, Malformed):
            return f"-ERR {step.why}"
        if isinstance(step, Forbidden):
            d = self.factory.auth.refuse("pop3", self.peer_ip, step.username, step.why)
            return d.addCallback(self.auth_result)
        if isinstance(step, Aborted):
            return "-ERR authentication cancelled"
        assert isinstance(step, Unsupported)
        return "-ERR unsupported SASL mechanism; use PLAIN"

    def authenticate(self, username: str, password: bytes) -> Deferred:
        d = self.factory.auth.login("pop3", self.peer_ip, username, password)
        return d.addCallback(self.auth_result)

    def auth_result(self, result: AuthResult) -> POP3Reply | Deferred | None:
        if result.outcome is LoginOutcome.BLOCKED:
            self.close("-ERR [AUTH] Authentication failed. " + refusal(self.peer_ip))
            return None
        if result.outcome is LoginOutcome.FAILED:
            return AUTH_FAILED
        account = result.account
        assert account is not None  # a login that went OK has its account
        self.account = account
        path = maildir_path(self.factory.config.mailbox.mail_dir, account)

        def opened(mailbox: Mailbox) -> POP3Reply | None:
            if self._closed:  # the client left while the mailbox was opened
                mailbox.close()
                self._release_lease()
                return None
            self.mailbox = mailbox
            self.factory.metrics.pop3_sessions.inc()
            live = mailbox.live()
            log.info(
                "pop3 {account} opened {count} messages",
                account=account.address,
                count=len(live),
            )
            return f"+OK {plural(len(live))} ({sum(m.size for _, m in live)} octets)"

        def not_opened(f: Any) -> POP3Reply:
            self.account = None
            if f.check(MailboxLocked):
                log.info("pop3 mailbox in use for {account}", account=account.address)
                return "-ERR [IN-USE] Mailbox is locked by another session"
            if f.check(StateError):
                log.error(
                    "pop3 cannot lease the mailbox of {account}: {error}",
                    account=account.address,
                    error=str(f.value),
                )
                return "-ERR [SYS/TEMP] mailbox unavailable, try again later"
            log.failure("pop3 cannot open mailbox for {account}", f, account=account.address)
            return "-ERR [SYS/TEMP] mailbox unavailable, try again later"

        def unrecorded(f: Any) -> None:
            # Reading mail does not need POP-before-SMTP: say so, and go on.
            f.trap(StateError)
            log.error(
                "pop-before-smtp not recorded for {client}: {error}",
                client=self.peer_ip,
                error=str(f.value),
            )

        def leased(holder: str | None) -> Deferred:
            if holder is not None:
                raise MailboxLocked(holder)
            self.lease = lease
            return self.thread(Mailbox.open, path, self.factory.listings)

        def unleased(f: Any) -> Any:
            self._release_lease()
            return f

        d = self.factory.popauth.authorise(self.peer_ip, account.domain)
        d.addErrback(unrecorded)
        leases, lease = self.factory.leases, POP3_LEASE + account.address
        if leases is not None:
            d.addCallback(lambda _: leases.take(lease)).addCallback(leased)
            d.addErrback(unleased)
        else:
            d.addCallback(lambda _: self.thread(Mailbox.open, path, self.factory.listings))
        return d.addCallbacks(opened, not_opened)

    # --- TRANSACTION state ---------------------------------------------------

    def _message_arg(self, arg: str) -> tuple[int, Any] | str:
        if self.mailbox is None:
            return "-ERR not authenticated"
        numbers = numeric_args(arg, 1)
        if numbers is None:
            return "-ERR expected a message number"
        message = self.mailbox.get(numbers[0])
        if message is None:
            return "-ERR no such message"
        return numbers[0], message

    def pop_STAT(self, arg: str) -> POP3Reply:
        if self.mailbox is None:
            return "-ERR not authenticated"
        live = self.mailbox.live()
        return f"+OK {len(live)} {sum(m.size for _, m in live)}"

    def pop_LIST(self, arg: str) -> POP3Reply | Deferred:
        return self._listing(arg, lambda n, m: f"{n} {m.size}")

    def pop_UIDL(self, arg: str) -> POP3Reply | Deferred:
        return self._listing(arg, lambda n, m: f"{n} {m.uid}")

    def _listing(self, arg: str, entry: Callable[[int, Any], str]) -> POP3Reply | Deferred:
        if self.mailbox is None:
            return "-ERR not authenticated"
        if arg.strip():
            found = self._message_arg(arg)
            return found if isinstance(found, str) else "+OK " + entry(*found)
        live = self.mailbox.live()

        def build() -> bytes:
            return multiline(f"+OK {plural(len(live))}", [entry(n, m) for n, m in live])

        return self.thread(build) if len(live) > BIG_LISTING else build()

    def pop_RETR(self, arg: str) -> POP3Reply | Deferred:
        found = self._message_arg(arg)
        if isinstance(found, str):
            return found
        return self._send(found[1], None, "RETR")

    def pop_TOP(self, arg: str) -> POP3Reply | Deferred:
        if self.mailbox is None:
            return "-ERR not authenticated"
        numbers = numeric_args(arg, 2)
        if numbers is None:
            return "-ERR usage: TOP message lines"
        found = self._message_arg(str(numbers[0]))
        if isinstance(found, str):
            return found
        return self._send(found[1], numbers[1], "TOP")

    def _send(
        self, message: ListedMessage, lines: int | None, command: str
    ) -> POP3Reply | Deferred:
        encoder = WireEncoder(top=lines)
        first = b"+OK " + str(message.size).encode() + b" octets\r\n"
        if message.size < CHUNK:
            try:
                # What LIST said, or a file that grew: no more.
                data = read_small(message.path, CHUNK * 2 + 2)
            except OSError as e:
                return self._unreadable(message, e)
            self._sent(message, command)
            if lines is None:
                return first + wire_form(data) + b".\r\n"
            return first + encoder.feed(data) + encoder.finish() + b".\r\n"
        return ensureDeferred(self._stream(message, encoder, first, command))

    async def _stream(
        self, message: ListedMessage, encoder: WireEncoder, first: bytes, command: str
    ) -> POP3Reply | None:
        try:
            file: BinaryIO = await self.thread(open_message, message.path)
        except OSError as e:
            return self._unreadable(message, e)
        try:
            self.through_transport()
            self.transport.write(first)
            while not encoder.done and not self._closed:
                chunk = await self.thread(file.read, CHUNK)
                if not chunk:
                    break
                self.transport.write(encoder.feed(chunk))
                self.resetTimeout()  # a slow reader is still a reader
                await self.drained()
        except OSError as e:
            # The +OK is out: the only honest end now is to cut the connection.
            log.warn("pop3 cannot read {path}: {error}", path=str(message.path), error=str(e))
            self.transport.abortConnection()
            return None
        finally:
            file.close()
        if not self._closed:
            self.transport.write(encoder.finish() + b".\r\n")
            self._sent(message, command)
        return None

    def _sent(self, message: ListedMessage, command: str) -> None:
        if command == "RETR":
            self.retrieved += 1
            self.retrieved_octets += message.size

    def _unreadable(self, message: ListedMessage, error: OSError) -> POP3Reply:
        log.warn("pop3 cannot read {path}: {error}", path=str(message.path), error=str(error))
        return "-ERR [SYS/TEMP] message no longer available"

    def pop_DELE(self, arg: str) -> POP3Reply:
        found = self._message_arg(arg)
        if isinstance(found, str) or self.mailbox is None:
            return found if isinstance(found, str) else "-ERR not authenticated"
        self.mailbox.delete(found[0])
        return f"+OK message {found[0]} marked for deletion at QUIT"

    def pop_RSET(self, arg: str) -> POP3Reply:
        if self.mailbox is None:
            return "-ERR not authenticated"
        self.mailbox.undelete_all()
        return f"+OK {plural(len(self.mailbox.live()))}"

    def pop_NOOP(self, arg: str) -> POP3Reply:
        return "+OK" if self.mailbox is not None else "-ERR not authenticated"

    def pop_QUIT(self, arg: str) -> Deferred | None:
        mailbox = self.mailbox
        if mailbox is None:
            self.close(f"+OK {self.factory.config.mailbox.hostname} POP3 Mailbox signing off")
            return None

        # The commit owns the mailbox (and its lock) now, even if the client
        # goes before it is done: no other session may open it half-updated.
        self.mailbox, user = None, self.account.address

        def done(removed: int) -> None:
            log.info("pop3 {account} deleted {count} messages", account=user, count=removed)
            self.close(f"+OK {plural(removed)} deleted, signing off")

        def failed(f: Any) -> None:
            log.failure("pop3 deletion failed for {account}", f, account=user)
            self.close("-ERR [SYS/TEMP] some deleted messages were not removed")

        d = self.thread(mailbox.commit).addCallbacks(done, failed)
        return d.addBoth(lambda _: mailbox.close())
