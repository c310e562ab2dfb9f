"""The outbound queue's SMTP client (mailboxd.sender) against scripted server
transcripts: a StringTransport holds what the client wrote, the test writes
the server's replies into it, and a task.Clock is the time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import socket

import attrs
import pytest
from test_lines import SocketTransport, read_all
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail.smtp import (
    AUTHDeclinedError,
    AuthenticationError,
    AUTHRequiredError,
    EHLORequiredError,
    SMTPClientError,
    SMTPConnectError,
    SMTPDeliveryError,
    SMTPProtocolError,
    SMTPTimeoutError,
    TLSError,
)
from twisted.python.failure import Failure

from mailboxd.routes import Hop
from mailboxd.sender import (
    MAX_LINE,
    ONE_WRITE,
    DotStuffing,
    Job,
    SenderFactory,
    Settings,
    path,
)

HOP = Hop("mx.far.test", 25)
PLAIN = Settings(name=b"mail.example.test", timeout=30)
TLS_CONTEXT = object()  # what the sender hands to startTLS
SMARTHOST = Settings(
    name=b"mail.example.test",
    timeout=30,
    tls=TLS_CONTEXT,
    username=b"alice",
    password=b"secret",
    require_auth=True,
)


def smarthost(**changes) -> Settings:
    return attrs.evolve(SMARTHOST, **changes)


MESSAGE = b"Subject: hi\n\nhello\n"
EHLO = ("250-mx.far.test hello", "250-PIPELINING", "250 8BITMIME")
EHLO_ONE_BY_ONE = ("250-mx.far.test hello", "250 8BITMIME")


class Transport(StringTransport):
    """A StringTransport that also says whether it was aborted, took STARTTLS
    or was asked for TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.tls: list[object] = []
        self.no_delay = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def startTLS(self, context: object) -> None:
        self.tls.append(context)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled


class Idle:
    """A stand-in for outbound's _Idle that notes what it was told."""

    seconds = 5.0

    def __init__(self) -> None:
        self.told: list[str] = []

    def settle(self, sender) -> None:
        self.told.append("settle")

    def park(self, hop, sender) -> None:
        assert hop == HOP
        self.told.append("park")

    def discard(self, hop, sender) -> None:
        self.told.append("discard")


class Conversation:
    """One client connection and its first message."""

    def __init__(
        self,
        settings: Settings = PLAIN,
        recipients: tuple[str, ...] = ("a@far.test",),
        message: bytes = MESSAGE,
        idle: Idle | None = None,
        transport: StringTransport | None = None,
    ) -> None:
        self.clock = Clock()
        self.idle = idle
        job, self.outcome = self.job(recipients, message)
        factory = SenderFactory(settings, job, self.clock, HOP, idle=idle, dest="far.test")
        self.sender = factory.buildProtocol(None)
        self.transport = transport or Transport()
        self.sender.makeConnection(self.transport)

    def job(self, recipients=("a@far.test",), message=MESSAGE, sender="alice@example.test"):
        """A job, and the list its outcome goes to."""
        outcome: list = []
        result: Deferred = Deferred()
        result.addBoth(outcome.append)
        return Job(sender, list(recipients), io.BytesIO(message), result), outcome

    def server(self, *lines: str) -> None:
        """The server says `lines`, in one read."""
        self.sender.dataReceived("".join(line + "\r\n" for line in lines).encode())

    def written(self) -> bytes:
        """What the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def said(self) -> list[bytes]:
        """The lines the client wrote since the last call."""
        return self.written().split(b"\r\n")[:-1]

    def greet(self, *ehlo: str) -> None:
        """Through the greeting and EHLO."""
        self.server("220 mx.far.test ESMTP")
        assert self.said() == [b"EHLO mail.example.test"]
        self.server(*ehlo)

    def result(self):
        """The job's outcome (a value or a Failure); fails if none yet."""
        assert len(self.outcome) == 1, self.outcome
        return self.outcome[0]

    def error(self, kind: type = SMTPClientError) -> SMTPClientError:
        (failure,) = self.outcome
        assert isinstance(failure, Failure), failure
        assert isinstance(failure.value, kind), failure.value
        return failure.value

    @property
    def open(self) -> bool:
        return not self.transport.disconnecting


def transact(c: Conversation, *replies: str) -> None:
    """Answer a pipelined MAIL, RCPT... and DATA, then the data."""
    c.server(*replies)
    assert c.written().endswith(b".\r\n")
    c.server("250 2.0.0 queued")


# --- dot-stuffing and paths ---------------------------------------------------------


@pytest.mark.parametrize(
    "chunks, wire",
    [
        ([b".x\n"], b"..x\r\n"),
        ([b"a\n.b\n..c\n"], b"a\r\n..b\r\n...c\r\n"),
        ([b"abc\n", b".def\n"], b"abc\r\n..def\r\n"),
        ([b"abc", b".def\n"], b"abc.def\r\n"),
        ([b"a\n", b"\n", b".z\n"], b"a\r\n\r\n..z\r\n"),
        ([b"a\n.", b"b\n"], b"a\r\n..b\r\n"),
        ([b"a\n", b".", b".\n", b"x\n"], b"a\r\n...\r\nx\r\n"),
        ([b"no dot\n", b"x.y\n.\n"], b"no dot\r\nx.y\r\n..\r\n"),
        ([b"a\n", b"", b".b\n"], b"a\r\n..b\r\n"),  # an empty chunk changes nothing
    ],
)
def test_dots_are_stuffed_across_chunks(chunks, wire):
    stuffing = DotStuffing()
    assert b"".join(stuffing(c) for c in chunks) == wire


def test_each_message_starts_at_a_line_start():
    DotStuffing()(b"ends mid-line")
    assert DotStuffing()(b".top\n") == b"..top\r\n"


@pytest.mark.parametrize(
    "message, end",
    [(b"a\n", b".\r\n"), (b"no line end", b"\r\n.\r\n"), (b"", b".\r\n")],
)
def test_the_end_of_the_data_is_on_a_line_of_its_own(message, end):
    stuffing = DotStuffing()
    stuffing(message)
    assert stuffing.end() == end


@pytest.mark.parametrize(
    "address, wire",
    [
        ("a@far.test", b"<a@far.test>"),
        (b"a@far.test", b"<a@far.test>"),
        ("", b"<>"),  # the null sender of a bounce
        ('"a b"@far.test', b'<"a b"@far.test>'),  # as it came in
    ],
)
def test_the_path_of_mail_and_rcpt_is_the_address_as_it_came(address, wire):
    assert path(address) == wire


# --- reading replies ------------------------------------------------------------------


def test_a_multi_line_reply_is_one_reply_however_it_is_split():
    c = Conversation()
    wire = b"220-mx.far.test ESMTP\r\n220-no UCE\r\n220 ready\r\n"
    for i in range(len(wire) - 1):
        c.sender.dataReceived(wire[i : i + 1])
        assert c.written() == b"", i  # no EHLO before the last line is whole
    c.sender.dataReceived(wire[-1:])
    assert c.said() == [b"EHLO mail.example.test"]


def test_every_line_of_a_multi_line_reply_is_kept_in_its_text():
    c = Conversation(idle=Idle())
    c.greet(*EHLO)
    c.written()
    c.server("250 ok", "550-5.1.1 no such user", "550 5.1.1 not here either", "554 no recipients")
    error = c.error(SMTPDeliveryError)
    assert error.addresses == [("a@far.test", 550, b"5.1.1 no such user\n5.1.1 not here either")]


def test_bare_lf_line_ends_are_read_too():
    c = Conversation()
    c.sender.dataReceived(b"220 mx.far.test\n")
    assert c.said() == [b"EHLO mail.example.test"]
    c.sender.dataReceived(b"250-mx.far.test\n250 PIPELINING\n")
    assert c.sender.pipelining


def test_an_overlong_line_is_cut_and_its_reply_still_counts():
    c = Conversation()
    c.greet("250-mx.far.test hello", "250-X-LONG " + "x" * 100_000, "250 PIPELINING")
    assert c.sender.pipelining  # the line after it was read as a line of its own
    assert len(c.sender.offered[b"X-LONG"]) < MAX_LINE


def test_an_overlong_line_in_pieces_is_never_held_whole():
    c = Conversation()
    c.server("220 mx.far.test")
    c.written()
    c.sender.dataReceived(b"250-mx.far.test\r\n250-X-LONG ")
    for _ in range(100):
        c.sender.dataReceived(b"y" * 1000)
        assert len(c.sender.unread) <= MAX_LINE
    c.sender.dataReceived(b"y\r\n250 PIPELINING\r\n")
    assert c.sender.pipelining and c.said()[0].startswith(b"MAIL FROM:")


def test_a_server_that_is_not_smtp_ends_the_attempt_at_once():
    c = Conversation()
    c.sender.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    error = c.error(SMTPProtocolError)
    assert error.code == -1 and "HTTP/1.1 400 Bad Request" in str(error)
    assert c.transport.aborted and c.written() == b""


def test_a_reply_in_another_encoding_is_read_as_text():
    c = Conversation()
    c.sender.dataReceived(b"554 5.7.1 refus\xe9\r\n")  # Latin-1
    assert "refus\N{REPLACEMENT CHARACTER}" in str(c.error(SMTPConnectError))


def test_a_reply_to_no_command_ends_the_connection():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    transact(c, "250 ok", "250 ok", "354 go on")
    assert idle.told == ["settle", "park"] and c.open
    c.server("421 4.4.2 idle too long")
    assert c.transport.aborted


# --- EHLO, HELO ---------------------------------------------------------------------


def test_our_name_in_ehlo_and_tcp_no_delay():
    c = Conversation()
    assert c.transport.no_delay
    c.server("220 mx.far.test")
    assert c.said() == [b"EHLO mail.example.test"]


def test_helo_when_ehlo_is_refused():
    c = Conversation()
    c.greet("502 5.5.1 what?")
    assert c.said() == [b"HELO mail.example.test"]
    c.server("250 mx.far.test")
    assert c.said() == [b"MAIL FROM:<alice@example.test>"]  # one command at a time
    assert not c.sender.pipelining


@pytest.mark.parametrize("code", [450, 550])
def test_a_refused_helo_ends_the_attempt(code):
    c = Conversation()
    c.greet("500 5.5.1 what?")
    c.written()
    c.server(f"{code} not you")
    error = c.error(SMTPConnectError)
    assert (error.code, error.resp) == (code, b"not you")
    assert c.said() == [b"QUIT"]  # not HELO again
    c.server("221 bye")
    assert not c.open


def test_a_refused_greeting_ends_the_attempt():
    c = Conversation()
    c.server("554 5.3.2 not now")
    assert c.error(SMTPConnectError).code == 554
    assert c.said() == [b"QUIT"]


def test_no_helo_when_auth_is_required():
    c = Conversation(SMARTHOST)
    c.greet("500 5.5.1 what?")
    assert c.error(EHLORequiredError).code == 500
    assert c.said() == [b"QUIT"]


# --- STARTTLS --------------------------------------------------------------------------


def test_starttls_whenever_offered_and_ehlo_again():
    c = Conversation(smarthost(username=b"", require_auth=False))
    c.greet("250-mx.far.test", "250-PIPELINING", "250 STARTTLS")
    assert c.said() == [b"STARTTLS"] and c.transport.tls == []
    # A reply sent behind 220 in plaintext must not count (RFC 3207 §4.2).
    c.server("220 go ahead", "250 injected")
    assert c.transport.tls == [TLS_CONTEXT] and c.sender.secure
    assert c.said() == [b"EHLO mail.example.test"]
    c.server("250-mx.far.test", "250 STARTTLS")
    # PIPELINING was offered in plaintext only: one command at a time now;
    # and STARTTLS is not asked for twice.
    assert c.said() == [b"MAIL FROM:<alice@example.test>"]


def test_no_starttls_without_a_context():
    c = Conversation(PLAIN)
    c.greet("250-mx.far.test", "250-PIPELINING", "250 STARTTLS")
    assert c.said()[0].startswith(b"MAIL FROM:") and c.transport.tls == []


def test_a_refused_starttls_ends_the_attempt():
    c = Conversation(SMARTHOST)
    c.greet("250-mx.far.test", "250 STARTTLS")
    c.written()
    c.server("454 4.7.0 TLS not available")
    assert c.error(TLSError).code == 454
    assert c.said() == [b"QUIT"]


def test_after_starttls_everything_goes_through_the_transport():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        transport = SocketTransport(ours)
        transport.startTLS = lambda context: None
        c = Conversation(smarthost(username=b"", require_auth=False), transport=transport)
        c.server("220 mx.far.test")
        assert read_all(theirs) == b"EHLO mail.example.test\r\n"  # straight to the socket
        assert transport.value() == b""
        c.server("250-mx.far.test", "250 STARTTLS")
        assert read_all(theirs) == b"STARTTLS\r\n"
        c.server("220 go ahead")
        assert transport.value() == b"EHLO mail.example.test\r\n" and read_all(theirs) == b""
    finally:
        ours.close()
        theirs.close()


# --- AUTH ------------------------------------------------------------------------------


def b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def test_auth_plain():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250-AUTH PLAIN", "250 PIPELINING")
    assert c.said() == [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret")]
    c.server("235 2.7.0 ok")
    assert c.said()[0] == b"MAIL FROM:<alice@example.test>"


def test_auth_login_is_preferred_to_plain():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250 AUTH PLAIN LOGIN")
    assert c.said() == [b"AUTH LOGIN"]
    c.server(f"334 {b64(b'Username:')}")
    assert c.said() == [base64.b64encode(b"alice")]
    c.server(f"334 {b64(b'Password:')}")
    assert c.said() == [base64.b64encode(b"secret")]
    c.server("235 2.7.0 ok")
    assert c.said() == [b"MAIL FROM:<alice@example.test>"]


def test_auth_cram_md5_is_preferred_to_all():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250 AUTH PLAIN LOGIN CRAM-MD5")
    assert c.said() == [b"AUTH CRAM-MD5"]
    challenge = b"<1896.697170952@mx.far.test>"
    c.server(f"334 {b64(challenge)}")
    digest = hmac.new(b"secret", challenge, hashlib.md5).hexdigest().encode()
    assert c.said() == [base64.b64encode(b"alice " + digest)]
    c.server("235 2.7.0 ok")
    assert c.said() == [b"MAIL FROM:<alice@example.test>"]


def test_auth_comes_after_starttls():
    c = Conversation(SMARTHOST)
    c.greet("250-mx.far.test", "250-AUTH PLAIN", "250 STARTTLS")
    assert c.said() == [b"STARTTLS"]
    c.server("220 go ahead")
    c.written()
    c.server("250-mx.far.test", "250 AUTH PLAIN")
    assert c.said()[0].startswith(b"AUTH PLAIN ")


def test_refused_credentials_end_the_attempt():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250 AUTH PLAIN")
    c.written()
    c.server("535 5.7.8 Authentication credentials invalid")
    error = c.error(AUTHDeclinedError)
    assert (error.code, error.resp) == (535, b"5.7.8 Authentication credentials invalid")
    assert c.said() == [b"QUIT"]


def test_no_mechanism_in_common_when_auth_is_required():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250 AUTH GSSAPI")
    assert c.error(AUTHRequiredError).code == 502
    assert c.said() == [b"QUIT"]


def test_no_auth_without_credentials_even_where_offered():
    c = Conversation(PLAIN)
    c.greet("250-mx.far.test", "250 AUTH PLAIN LOGIN")
    assert c.said() == [b"MAIL FROM:<alice@example.test>"]


def test_a_malformed_challenge_cancels_the_exchange():
    c = Conversation(smarthost(tls=None))
    c.greet("250-mx.far.test", "250 AUTH LOGIN")
    c.written()
    c.server("334 not base64!")
    assert c.error(AuthenticationError).code == 501
    assert c.said() == [b"*", b"QUIT"]


# --- transactions ----------------------------------------------------------------------


def test_a_pipelined_transaction_is_one_write_and_its_replies_are_read_in_turn():
    c = Conversation(recipients=("a@far.test", "b@far.test", "c@far.test"))
    c.greet(*EHLO)
    assert c.written() == (
        b"MAIL FROM:<alice@example.test>\r\n"
        b"RCPT TO:<a@far.test>\r\nRCPT TO:<b@far.test>\r\nRCPT TO:<c@far.test>\r\n"
        b"DATA\r\n"
    )
    replies = b"250 ok\r\n250 a ok\r\n550 5.1.1 no b\r\n250 c ok\r\n354 go on\r\n"
    for i in range(len(replies)):  # one byte at a time: still in turn
        c.sender.dataReceived(replies[i : i + 1])
    assert c.written() == b"Subject: hi\r\n\r\nhello\r\n.\r\n"  # the data and its end in one write
    c.server("250 2.0.0 queued")
    assert c.result() == (
        2,
        [
            ("a@far.test", 250, b"a ok"),
            ("b@far.test", 550, b"5.1.1 no b"),
            ("c@far.test", 250, b"c ok"),
        ],
    )


def test_one_command_at_a_time_without_pipelining():
    c = Conversation(recipients=("a@far.test", "b@far.test"))
    c.greet(*EHLO_ONE_BY_ONE)
    for command, reply in [
        (b"MAIL FROM:<alice@example.test>", "250 ok"),
        (b"RCPT TO:<a@far.test>", "451 4.3.0 later"),
        (b"RCPT TO:<b@far.test>", "250 ok"),
        (b"DATA", "354 go on"),
    ]:
        assert c.said() == [command]
        c.server(reply)
    assert c.written().endswith(b"hello\r\n.\r\n")
    c.server("250 2.0.0 queued")
    assert c.result() == (1, [("a@far.test", 451, b"4.3.0 later"), ("b@far.test", 250, b"ok")])


@pytest.mark.parametrize("ehlo", [EHLO, EHLO_ONE_BY_ONE], ids=["pipelined", "one-by-one"])
def test_a_refused_mail_speaks_for_every_recipient(ehlo):
    c = Conversation(recipients=("a@far.test", "b@far.test"))
    c.greet(*ehlo)
    c.server("553 5.1.8 bad sender", "503 need MAIL", "503 need MAIL", "503 need MAIL")
    error = c.error(SMTPDeliveryError)
    assert (error.code, error.resp, error.addresses) == (553, b"5.1.8 bad sender", [])


def test_a_refused_data_speaks_for_the_accepted_recipients():
    c = Conversation()
    c.greet(*EHLO)
    c.server("250 ok", "250 ok", "451 4.3.0 no data now")
    error = c.error(SMTPDeliveryError)
    assert (error.code, error.addresses) == (451, [("a@far.test", 250, b"ok")])


def test_a_refused_end_of_data():
    c = Conversation()
    c.greet(*EHLO)
    c.server("250 ok", "250 ok", "354 go on")
    c.server("554 5.7.1 spam")
    error = c.error(SMTPDeliveryError)
    assert (error.code, error.resp) == (554, b"5.7.1 spam")


def test_354_with_nobody_to_send_to_gets_an_empty_message_whose_reply_does_not_count():
    c = Conversation(recipients=("a@far.test", "b@far.test"), idle=Idle())
    c.greet(*EHLO)
    c.written()
    c.server("250 ok", "450 4.2.1 busy", "550 5.1.1 no b", "354 go on anyway")
    assert c.said() == [b"."]  # no message data
    assert c.outcome == []
    c.server("250 2.0.0 queued (nothing)")
    error = c.error(SMTPDeliveryError)
    assert (error.code, error.resp) == (550, b"No recipients accepted")
    assert error.addresses == [
        ("a@far.test", 450, b"4.2.1 busy"),
        ("b@far.test", 550, b"5.1.1 no b"),
    ]
    assert c.said() == [b"RSET"]  # it ended before its data


def test_a_small_message_goes_in_one_write_with_its_end():
    c = Conversation(message=b".dot first\nno line end")
    c.greet(*EHLO)
    c.written()
    c.server("250 ok", "250 ok", "354 go on")
    assert c.transport.producer is None
    assert c.written() == b"..dot first\r\nno line end\r\n.\r\n"


def test_a_big_message_goes_through_a_producer_and_is_stuffed_across_its_chunks():
    # FileSender reads 2**14 bytes at a time: put a dot right at a chunk start.
    head = b"x" * (2**14 - 1) + b"\n"
    message = head + b".at the boundary\n" + b"y" * ONE_WRITE + b"\n.\n"
    c = Conversation(message=message)
    c.greet(*EHLO)
    c.written()
    c.server("250 ok", "250 ok", "354 go on")
    wire = b""
    while c.transport.producer is not None:
        c.transport.producer.resumeProducing()
        wire += c.written()
        c.clock.advance(20)  # each chunk is progress: the step timeout waits
    assert c.outcome == [] and c.open
    assert wire == message.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..") + b".\r\n"
    c.server("250 2.0.0 queued")
    assert c.result() == (1, [("a@far.test", 250, b"ok")])


def test_a_big_message_whose_connection_goes_mid_way():
    c = Conversation(message=b"z" * (ONE_WRITE + 1))
    c.greet(*EHLO)
    c.server("250 ok", "250 ok", "354 go on")
    producer = c.transport.producer
    producer.resumeProducing()
    producer.stopProducing()  # as the transport does when the connection goes
    c.sender.connectionLost(Failure(ConnectionLost("gone")))
    error = c.error(SMTPConnectError)
    assert error.code == -1


# --- several messages a connection -------------------------------------------------------


def test_after_a_data_reply_the_next_mail_follows_without_rset():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    c.written()
    transact(c, "250 ok", "250 ok", "354 go on")
    assert c.result() == (1, [("a@far.test", 250, b"ok")])
    assert idle.told == ["settle", "park"] and c.written() == b""
    job, outcome = c.job(["b@far.test"], b"second\n")
    c.sender.take(job)
    assert c.said() == [b"MAIL FROM:<alice@example.test>", b"RCPT TO:<b@far.test>", b"DATA"]
    transact(c, "250 ok", "250 ok", "354 go on")
    assert outcome == [(1, [("b@far.test", 250, b"ok")])]


def test_after_a_transaction_refused_before_its_data_rset_comes_first():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    c.written()
    c.server("451 4.3.0 later", "503 need MAIL", "503 need MAIL")
    assert c.error(SMTPDeliveryError).code == 451
    assert c.said() == [b"RSET"] and idle.told == ["settle"]
    c.server("250 2.0.0 reset")
    assert idle.told == ["settle", "park"]
    job, outcome = c.job()
    c.sender.take(job)
    assert c.said()[0] == b"MAIL FROM:<alice@example.test>"


def test_a_server_that_will_not_reset_is_left():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    c.written()
    c.server("451 4.3.0 later", "503 need MAIL", "503 need MAIL")
    c.said()
    c.server("500 what?")
    assert idle.told == ["settle", "discard"] and c.said() == [b"QUIT"]


def test_a_waiting_connection_says_quit_when_no_message_comes():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    transact(c, "250 ok", "250 ok", "354 go on")
    c.clock.advance(4.9)
    assert c.written() == b""
    c.clock.advance(0.1)
    assert c.said() == [b"QUIT"] and idle.told[-1] == "discard"
    c.server("221 bye")
    assert not c.open and not c.transport.aborted


def test_leave_while_rset_is_unanswered_quits_once_it_is():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    c.server("451 4.3.0 later", "503 need MAIL", "503 need MAIL")
    c.written()
    c.sender.leave()
    assert c.written() == b""
    c.server("250 2.0.0 reset")
    assert c.said() == [b"QUIT"] and "park" not in idle.told


def test_without_a_place_to_wait_the_connection_quits_after_a_message():
    c = Conversation(idle=None)
    c.greet(*EHLO)
    c.written()
    transact(c, "250 ok", "250 ok", "354 go on")
    assert c.said() == [b"QUIT"]


# --- timeouts and lost connections --------------------------------------------------------


def test_a_silent_server_times_out():
    c = Conversation()
    c.clock.advance(29.9)
    assert c.outcome == [] and c.open
    c.clock.advance(0.1)
    error = c.error(SMTPTimeoutError)
    assert error.code == -1 and "Timeout" in str(error)
    assert c.transport.aborted


def test_every_line_of_a_long_reply_restarts_the_step_timeout():
    c = Conversation()
    for _ in range(10):
        c.clock.advance(20)
        c.sender.dataReceived(b"220-still saying hello\r\n")
    assert c.outcome == [] and c.open
    c.clock.advance(30)
    assert c.error(SMTPTimeoutError).code == -1


def test_an_unanswered_rset_or_quit_ends_the_connection_without_an_error():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    c.server("451 4.3.0 later", "503 need MAIL", "503 need MAIL")
    assert c.said()[-1] == b"RSET"
    (failure,) = c.outcome
    c.clock.advance(30)
    assert c.transport.aborted and c.outcome == [failure]


def test_a_waiting_connection_has_no_step_timeout_only_its_wait():
    idle = Idle()
    idle.seconds = 100
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    transact(c, "250 ok", "250 ok", "354 go on")
    c.written()
    c.clock.advance(99)
    assert c.open and not c.transport.aborted and c.written() == b""
    c.clock.advance(1)
    assert c.said() == [b"QUIT"]


@pytest.mark.parametrize(
    "replies", [(), ("220 hi",), ("220 hi", *EHLO), ("220 hi", *EHLO, "250 ok")]
)
def test_a_connection_lost_mid_transaction_fails_the_attempt(replies):
    idle = Idle()
    c = Conversation(idle=idle)
    c.server(*replies)
    c.sender.connectionLost(Failure(ConnectionLost("gone")))
    error = c.error(SMTPConnectError)
    assert error.code == -1 and "connection lost" in str(error)
    assert c.sender.closed.called and idle.told == ["discard"]
    assert c.clock.getDelayedCalls() == []


def test_a_connection_lost_after_its_message_fails_nothing():
    idle = Idle()
    c = Conversation(idle=idle)
    c.greet(*EHLO)
    transact(c, "250 ok", "250 ok", "354 go on")
    c.sender.connectionLost(Failure(ConnectionLost("gone")))
    assert c.result() == (1, [("a@far.test", 250, b"ok")])
    assert idle.told == ["settle", "park", "discard"] and c.sender.closed.called
    assert c.clock.getDelayedCalls() == []  # the wait is over too


def test_a_job_the_queue_gave_up_on_is_not_told_again():
    c = Conversation()
    c.greet(*EHLO)
    c.sender.job.result.errback(SMTPConnectError(-1, "the delivery attempt took too long"))
    transact(c, "250 ok", "250 ok", "354 go on")  # no AlreadyCalledError
    assert c.error(SMTPConnectError).resp == b"the delivery attempt took too long"


# --- writes straight to the socket (lines.DirectWrites) -------------------------------------


@pytest.fixture
def socket_conversation():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    transport = SocketTransport(ours)
    yield transport, theirs
    ours.close()
    theirs.close()


def test_commands_and_small_messages_go_straight_to_the_socket(socket_conversation):
    transport, theirs = socket_conversation
    c = Conversation(transport=transport)
    c.server("220 mx.far.test", *EHLO)
    c.server("250 ok", "250 ok", "354 go on")
    assert read_all(theirs).endswith(b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
    assert transport.value() == b""


def test_a_message_too_big_for_one_write_goes_through_the_transport(socket_conversation):
    transport, theirs = socket_conversation
    c = Conversation(transport=transport, message=b"x" * (ONE_WRITE + 1) + b"\n")
    c.server("220 mx.far.test", *EHLO)
    c.server("250 ok", "250 ok", "354 go on")
    assert transport.producer is not None  # Twisted's FileSender, writing to the transport
    read_all(theirs)
    while transport.producer is not None:
        transport.producer.resumeProducing()
    assert transport.value().endswith(b"x\r\n.\r\n") and read_all(theirs) == b""
