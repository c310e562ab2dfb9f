"""SMTP protocol unit tests over StringTransport and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from mailboxd.policy import Listener
from mailboxd.smtp import SMTPFactory


class Session:
    def __init__(
        self, unit, listener: Listener = Listener.MTA, ip: str = "192.0.2.7", queued=None
    ) -> None:
        self.unit = unit
        extra = {} if queued is None else {"queued": queued}
        factory = SMTPFactory(
            unit.config,
            lambda: unit.store.directory,
            unit.clock,
            unit.workers,
            unit.auth,
            unit.popauth,
            listener,
            wall=unit.clock.seconds,
            **extra,
        )
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=_Peer(ip))
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> list[str]:
        out = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]

    def cmd(self, line: str) -> str:
        replies = self.send(line + "\r\n")
        return replies[-1] if replies else ""

    def envelope(self, rcpt: str = "alice@example.test") -> None:
        assert self.cmd("EHLO client.test").startswith("250 ")
        assert self.cmd("MAIL FROM:<sender@far.test>") == "250 2.1.0 Ok"
        assert self.cmd(f"RCPT TO:<{rcpt}>").startswith("250 ")

    def delivered(self, address: str = "alice@example.test") -> list:
        local, domain = address.split("@")
        new = self.unit.mail_dir / domain / local / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000


@pytest.fixture
def s(unit):
    return Session(unit)


def test_greeting_and_ehlo(s):
    assert s.greeting == ["220 mail.example.test ESMTP Mailbox"]
    replies = s.send("EHLO client.test\r\n")
    assert replies[0].startswith("250-mail.example.test")
    assert {
        "250-PIPELINING",
        "250-SIZE 10000",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-AUTH PLAIN LOGIN",
        "250 AUTH=PLAIN LOGIN",
    } <= set(replies)


def test_helo_and_ehlo_need_an_argument(s):
    assert s.cmd("EHLO").startswith("501 5.5.4")
    assert s.cmd("HELO").startswith("501 5.5.4")
    assert s.cmd("HELO client.test") == "250 mail.example.test"


@pytest.mark.parametrize(
    "line, reply",
    [
        ("FOO bar", "500 5.5.1"),
        ("MAIL FROM:<a@far.test>", "503 5.5.1"),
        ("RCPT TO:<alice@example.test>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("AUTH", "503 5.5.1"),
        ("AUTH PLAIN", "503 5.5.1"),
        ("STARTTLS", "502 5.5.1"),
        ("EXPN staff", "502 5.5.1"),
        ("VRFY alice@example.test", "252 2.5.2"),
        ("VRFY nobody@example.test", "252 2.5.2"),
        ("NOOP", "250 2.0.0"),
        ("RSET", "250 2.0.0"),
        ("\x00\x01", "500 5.5.1"),
    ],
)
def test_command_replies(s, line, reply):
    assert s.cmd(line).startswith(reply + " ")


def test_vrfy_does_not_tell_users_apart(s):
    assert s.cmd("VRFY alice@example.test") == s.cmd("VRFY nobody@example.test")


@pytest.mark.parametrize(
    "line, reply",
    [
        ("MAIL FROM:", "501 5.5.4"),
        ("MAIL TO:<a@far.test>", "501 5.5.4"),
        ("MAIL FROM:<not an address>", "501 5.1.7"),
        ("MAIL FROM:<a@>", "501 5.1.7"),
        ("MAIL FROM:<a@far.test> SIZE=abc", "501 5.5.4"),
        ("MAIL FROM:<a@far.test> SIZE=10001", "552 5.3.4"),
        ("MAIL FROM:<a@far.test> BODY=BINARYMIME", "501 5.5.4"),
        ("MAIL FROM:<a@far.test> FOO=1", "555 5.5.4"),
        ("MAIL FROM:<a@far.test> SIZE=100 BODY=8BITMIME", "250 2.1.0"),
        ("MAIL FROM:<>", "250 2.1.0"),
        ("MAIL FROM:<@far.test:>", "501 5.5.4"),
        ("MAIL FROM: <a@far.test>", "250 2.1.0"),
        ("mail from:a@far.test", "250 2.1.0"),
    ],
)
def test_mail_from(s, line, reply):
    s.cmd("EHLO client.test")
    assert s.cmd(line).startswith(reply + " ")


def test_nested_mail(s):
    s.envelope()
    assert s.cmd("MAIL FROM:<a@far.test>").startswith("503 5.5.1")


@pytest.mark.parametrize(
    "rcpt, reply",
    [
        ("alice@example.test", "250 2.1.5 Ok"),
        ("ALICE@Example.TEST", "250 2.1.5 Ok"),
        ("alice@example.org", "250 2.1.5 Ok"),
        ("info@example.test", "250 2.1.5 Ok"),
        (
            "Postmaster",
            "550 5.1.1 <postmaster@example.test>: Recipient address rejected: User unknown",
        ),
        (
            "nobody@example.test",
            "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
        ),
        ("x@far.test", "554 5.7.1 <x@far.test>: Relay access denied"),
        (
            "alice%far.test@example.test",
            "550 5.1.1 <alice%far.test@example.test>: Recipient address rejected: User unknown",
        ),
        ("@example.test:x@far.test", "554 5.7.1 <x@far.test>: Relay access denied"),
        (
            "x@far.test@example.test",
            "501 5.1.3 <x@far.test@example.test>: Recipient address syntax error",
        ),
    ],
)
def test_rcpt_to(s, rcpt, reply):
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<a@far.test>")
    assert s.cmd(f"RCPT TO:<{rcpt}>") == reply


def test_submission_needs_authorisation(unit):
    s = Session(unit, Listener.SUBMISSION)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<a@far.test>")
    assert s.cmd("RCPT TO:<alice@example.test>") == "530 5.7.0 Authentication required"


def test_too_many_recipients(s):
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<a@far.test>")
    for _ in range(5):
        assert s.cmd("RCPT TO:<alice@example.test>").startswith("250")
    assert s.cmd("RCPT TO:<alice@example.test>").startswith("452 4.5.3")


def test_delivery_writes_headers_and_body(s):
    s.envelope()
    assert s.cmd("DATA").startswith("354 ")
    replies = s.send("Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n")
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    [path] = s.delivered()
    text = path.read_bytes()
    assert text.startswith(
        b"Return-Path: <sender@far.test>\nReceived: from client.test ([192.0.2.7])\n"
    )
    assert b"\tby mail.example.test (Mailbox) with ESMTP id " in text
    assert b"\tfor <alice@example.test>;" in text
    assert text.endswith(b"\nSubject: hi\n\n.dotted\nbody\n")
    lines = text.count(b"\n")
    assert path.name.endswith(f",S={len(text)},W={len(text) + lines}")
    assert not list((s.unit.mail_dir / ".incoming").iterdir())


def test_one_copy_per_account_through_aliases(s):
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<a@far.test>")
    for rcpt in ("info@example.test", "alice@example.test", "bob@other.test"):
        assert s.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    s.cmd("DATA")
    assert s.send("x\r\n.\r\n")[0].startswith("250")
    assert len(s.delivered("alice@example.test")) == 1
    assert len(s.delivered("bob@other.test")) == 1


def test_250_waits_for_the_disk_and_pipelined_commands_wait_too(s):
    s.envelope()
    s.cmd("DATA")
    s.unit.pool.paused = True
    assert s.send("body\r\n.\r\nNOOP\r\nQUIT\r\n") == []
    # What waits is held, and once it passes HELD_INPUT_MAX, reading stops too.
    assert s.transport.producerState == "producing"
    assert s.send(b"NOOP\r\n" * 20000) == []
    assert s.transport.producerState == "paused"
    s.unit.pool.release()
    replies = s.take()
    assert replies[0].startswith("250 2.0.0 Ok: queued")
    assert replies[1:] == ["250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert s.transport.disconnecting  # and the NOOPs behind QUIT are never answered


@pytest.mark.parametrize(
    "errno,reply",
    [
        (28, "452 4.3.1 Insufficient system storage"),  # ENOSPC: RFC 5321 §4.2.3
        (5, "451 4.3.0 Error: could not store the message, try again later"),  # EIO
    ],
)
def test_storage_failure_is_a_temporary_error(s, monkeypatch, errno, reply):
    import os

    def broken(*args):
        raise OSError(errno, os.strerror(errno))

    s.envelope()
    s.cmd("DATA")
    monkeypatch.setattr(os, "link", broken)
    monkeypatch.setattr("mailboxd.maildir._copy_durably", broken)
    assert s.send("body\r\n.\r\n") == [reply]
    assert s.delivered() == []
    assert s.cmd("NOOP") == "250 2.0.0 Ok"


class _FullFile:
    """A spool file on a full disk: every write fails."""

    def __init__(self, f):
        self.f = f

    def write(self, *data):
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize(
    "lines",
    [1, 8],  # held in memory until the final dot; spilled to a spool file during DATA
    ids=["small", "spilled"],
)
def test_a_full_disk_during_data_is_said_after_the_final_dot(s, monkeypatch, lines):
    import os

    monkeypatch.setattr("mailboxd.maildir.SPOOL_MEMORY", 4096)  # under the size limit here
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **kw: _FullFile(real_fdopen(*a, **kw)))
    # A message held until its final dot is written with no file object.
    monkeypatch.setattr("mailboxd.maildir.write_all", _FullFile(None).write)
    s.envelope()
    s.cmd("DATA")
    replies = s.send(
        "Subject: big\r\n\r\n" + ("x" * 998 + "\r\n") * lines + "more\r\n.\r\nNOOP\r\n"
    )
    assert replies == ["452 4.3.1 Insufficient system storage", "250 2.0.0 Ok"]
    assert s.delivered() == []
    assert not list((s.unit.mail_dir / ".incoming").iterdir())


def test_a_message_past_the_memory_limit_is_spooled_during_data(s, monkeypatch):
    SPOOL_MEMORY = 4096  # under the size limit here
    monkeypatch.setattr("mailboxd.maildir.SPOOL_MEMORY", SPOOL_MEMORY)
    s.envelope()
    s.cmd("DATA")
    message = s.proto.reception.message
    line = "y" * 998 + "\r\n"
    assert s.send(line * 2) == []
    assert not message.path.exists()  # small so far: held in memory
    assert s.send(line * (SPOOL_MEMORY // 998)) == []
    assert message.path.exists()  # past the limit: in the spool file, line by line
    assert s.send(line + ".\r\n")[0].startswith("250 2.0.0 Ok: queued")
    (delivered,) = s.delivered()
    assert delivered.read_bytes().count(b"y" * 998 + b"\n") == 3 + SPOOL_MEMORY // 998
    assert not message.path.exists()


def test_message_over_the_size_limit(s):
    s.envelope()
    s.cmd("DATA")
    replies = s.send(("x" * 99 + "\r\n") * 101 + ".\r\n")
    assert replies == ["552 5.3.4 Message size exceeds fixed limit"]
    assert s.delivered() == []
    assert s.cmd("NOOP") == "250 2.0.0 Ok"


def test_command_line_too_long_and_the_session_goes_on(s):
    assert s.cmd("NOOP " + "x" * 600) == "500 5.5.2 Error: line too long"
    assert s.cmd("NOOP") == "250 2.0.0 Ok"
    # exactly 512 octets with CRLF is allowed
    assert s.cmd("NOOP " + "x" * 505) == "250 2.0.0 Ok"


def test_long_line_split_across_reads(s):
    for _ in range(10):
        s.proto.dataReceived(b"x" * 100)
    assert s.send("\r\nNOOP\r\n") == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_text_line_too_long(s):
    s.envelope()
    s.cmd("DATA")
    assert s.send("a" * 1001 + "\r\nok\r\n.\r\n") == ["500 5.5.2 Error: line too long"]
    assert s.delivered() == []
    assert s.cmd("NOOP") == "250 2.0.0 Ok"
    s.envelope()
    s.cmd("DATA")
    assert s.send("a" * 998 + "\r\n.\r\n")[0].startswith("250 ")


def test_too_many_errors_closes(s):
    for _ in range(9):
        assert s.cmd("BOGUS").startswith("500")
    replies = s.send("BOGUS\r\n")
    assert replies == [
        "500 5.5.1 Error: command not recognized",
        "421 4.7.0 mail.example.test Error: too many errors",
    ]
    assert s.transport.disconnecting
    assert s.send("NOOP\r\n") == []


def test_idle_timeout(s):
    s.unit.clock.advance(299)
    assert not s.transport.disconnecting
    s.unit.clock.advance(2)
    assert s.take() == ["421 4.4.2 mail.example.test Error: timeout exceeded"]
    assert s.transport.disconnecting


def test_disconnect_mid_data_leaves_nothing(s, monkeypatch):
    monkeypatch.setattr("mailboxd.maildir.SPOOL_MEMORY", 4096)
    s.envelope()
    s.cmd("DATA")
    s.send("Subject: half\r\n\r\n" + "half a message\r\n" * 500)
    assert list((s.unit.mail_dir / ".incoming").iterdir())
    s.proto.connectionLost(None)
    assert not list((s.unit.mail_dir / ".incoming").iterdir())
    assert s.delivered() == []


# SMTP smuggling (SEC Consult, 2023, and the follow-ups): every end-of-data
# sequence other than CRLF.CRLF, each followed by a smuggled transaction.
SMUGGLED = b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n"
VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]


@pytest.mark.parametrize("fake_end", VARIANTS, ids=[repr(v) for v in VARIANTS])
def test_smuggling_variants_never_end_the_message(s, fake_end):
    s.envelope()
    s.cmd("DATA")
    replies = s.send(b"Subject: first\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\n")
    # exactly one answer: the first message's; nothing smuggled ran as a command
    assert len(replies) == 1, replies
    delivered = s.delivered()
    bare = fake_end.replace(b"\r\n", b"")
    if b"\r" in bare or b"\n" in bare or b"\0" in bare:  # all refused whole
        assert replies[0].startswith("550 5.6.0"), replies
        assert delivered == []
    else:
        assert replies[0].startswith("250 "), replies
        [only] = delivered
        assert b"Subject: smuggled" in only.read_bytes()  # inside the one message
    assert s.cmd("NOOP") == "250 2.0.0 Ok"


def test_250_only_after_file_and_directory_are_fsynced(s, monkeypatch):
    import os
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    s.envelope()
    s.cmd("DATA")
    s.unit.pool.paused = True
    assert s.send("body\r\n.\r\n") == []
    assert synced == []
    s.unit.pool.release()
    assert s.take()[0].startswith("250 ")
    assert synced == ["file", "dir"]


def test_a_session_is_logged_once_at_its_end_with_what_it_delivered(s):
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list = []
    globalLogPublisher.addObserver(seen.append)
    try:
        s.envelope()
        s.cmd("DATA")
        assert s.send("Subject: one\r\n\r\nbody\r\n.\r\n")[0].startswith("250 ")
        s.envelope()
        s.cmd("DATA")
        s.send("Subject: two\r\n\r\nbody\r\n.\r\n")
        s.cmd("QUIT")
        s.proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    sessions = [e for e in seen if e.get("log_format", "").startswith("smtp session from")]
    (event,) = sessions
    assert (event["client"], event["listener"], event["accepted"]) == ("192.0.2.7", "listen", 2)
    assert formatEvent(event).startswith("smtp session from 192.0.2.7 on listen: 2 accepted, ")


def _hops(count: int) -> str:
    return "".join(f"Received: from hop{i}.far.test by mx{i}.far.test; x\r\n" for i in range(count))


@pytest.mark.parametrize("count, reply", [(50, "250 2.0.0 Ok"), (51, "554 5.4.6 Too many hops")])
def test_a_message_that_went_round_a_loop_is_refused(s, count, reply):
    s.envelope()
    assert s.cmd("DATA").startswith("354 ")
    text = _hops(count) + "Subject: loop\r\n\r\nReceived: in the body, not a hop\r\n."
    assert s.cmd(text).startswith(reply)
    assert len(s.delivered()) == (1 if reply.startswith("250") else 0)


def test_folded_received_fields_count_once(s):
    s.envelope()
    assert s.cmd("DATA").startswith("354 ")
    folded = "Received: from hop.far.test\r\n\tby mx.far.test; Tue, 1 Dec 2026\r\n" * 50
    assert s.cmd(folded + "Subject: x\r\n\r\n" + "Received: body\r\n" * 5 + ".").startswith("250 ")


def test_a_failure_before_the_commit_is_a_451_and_leaves_no_spool_file(unit, monkeypatch):
    """Reading the message for the filters fails (a disk error): the client
    is told to try again, and the spool holds nothing of it."""
    from twisted.internet.task import Clock

    from mailboxd.filtering import Filters
    from mailboxd.reception import Reception

    s = Session(unit)
    accepting = _Accepting()
    s.proto.factory.filters = Filters([accepting], Clock(), 5)
    monkeypatch.setattr("mailboxd.maildir.SPOOL_MEMORY", 100)  # a spool file at once

    def unreadable(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Reception, "_incoming", unreadable)
    s.envelope()
    assert s.cmd("DATA").startswith("354 ")
    assert s.cmd("Subject: x\r\n\r\n" + "y" * 300 + "\r\n.") == (
        "451 4.3.0 Error: could not store the message, try again later"
    )
    assert not list((unit.mail_dir / ".incoming").iterdir())
    assert s.delivered() == []
    assert accepting.asked == 0  # there was nothing to check it with


class _Accepting:
    name = "accepting"
    asked = 0

    def check(self, incoming):
        from mailboxd.filtering import accept

        self.asked += 1
        return accept()
