"""POP3 protocol unit tests over StringTransport and a Clock."""

from __future__ import annotations

import base64

import pytest
from twisted.internet.testing import StringTransport

from mailboxd.accounts import Account
from mailboxd.maildir import IncomingMessage
from mailboxd.pop3 import POP3Factory


def deliver(unit, text: bytes, local: str = "alice", domain: str = "example.test") -> None:
    m = IncomingMessage(unit.mail_dir / ".incoming", "mail.example.test")
    for line in text.split(b"\r\n")[:-1]:
        m.write_line(line)
    m.commit(unit.mail_dir, (Account(f"{local}@{domain}", domain, local),))


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 40000


class Session:
    def __init__(self, unit, ip: str = "192.0.2.9") -> None:
        self.unit = unit
        factory = POP3Factory(unit.config, unit.auth, unit.popauth, unit.clock, unit.workers)
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=_Peer(ip))
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def raw(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        self.proto.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def take(self) -> list[str]:
        out = self.transport.value().decode("utf-8", "replace")
        self.transport.clear()
        return out.split("\r\n")[:-1]

    def cmd(self, line: str) -> str:
        self.proto.dataReceived(line.encode() + b"\r\n")
        return self.take()[0]

    def multi(self, line: str) -> list[str]:
        self.proto.dataReceived(line.encode() + b"\r\n")
        lines = self.take()
        assert lines[0].startswith("+OK") and lines[-1] == ".", lines
        return lines[1:-1]

    def login(self, user: str = "alice@example.test", password: str = "alice pw") -> str:
        assert self.cmd(f"USER {user}").startswith("+OK")
        return self.cmd(f"PASS {password}")


@pytest.fixture
def s(unit):
    deliver(unit, b"Subject: one\r\n\r\nfirst\r\n")
    deliver(unit, b"Subject: two\r\n\r\n.leading dot\r\nsecond\r\n")
    return Session(unit)


def test_greeting_has_no_apop_timestamp(s):
    assert s.greeting == ["+OK mail.example.test POP3 Mailbox ready"]
    assert "<" not in s.greeting[0]


def test_capa(s):
    caps = s.multi("CAPA")
    for cap in ("USER", "UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "SASL PLAIN"):
        assert cap in caps
    assert any(c.startswith("IMPLEMENTATION ") for c in caps)


@pytest.mark.parametrize(
    "line",
    [
        "USER",
        "USER ",
        "PASS x",
        "STAT",
        "LIST",
        "UIDL",
        "RETR 1",
        "TOP 1 0",
        "DELE 1",
        "RSET",
        "NOOP",
        "APOP alice@example.test 0123456789abcdef0123456789abcdef",
        "FOO",
        "STLS",
        "AUTH CRAM-MD5",
    ],
)
def test_errors_before_login(s, line):
    assert s.cmd(line).startswith("-ERR")
    assert s.login().startswith("+OK")  # the session goes on


def test_pass_needs_a_password(s):
    s.cmd("USER alice@example.test")
    assert s.cmd("PASS").startswith("-ERR")


def test_login_and_listing(s):
    assert s.login() == "+OK 2 messages (" + s.cmd("STAT").split()[2] + " octets)"
    listing = s.multi("LIST")
    assert [entry.split()[0] for entry in listing] == ["1", "2"]
    uids = s.multi("UIDL")
    assert len({u.split()[1] for u in uids}) == 2
    assert s.cmd("LIST 2") == "+OK " + listing[1]
    assert s.cmd("UIDL 1") == "+OK " + uids[0]
    assert s.cmd("LIST 3") == "-ERR no such message"
    assert s.cmd("LIST x") == "-ERR expected a message number"


def test_retr_is_byte_stuffed_and_sizes_match(s):
    s.login()
    size = int(s.cmd("LIST 2").split()[2])
    out = s.raw("RETR 2\r\n")
    head, _, body = out.partition(b"\r\n")
    assert head == f"+OK {size} octets".encode()
    assert body.endswith(b"\r\n\r\n..leading dot\r\nsecond\r\n.\r\n")
    assert len(body[: -len(b".\r\n")].replace(b"\r\n..", b"\r\n.")) == size


def test_top(s):
    s.login()
    lines = s.multi("TOP 2 1")
    assert lines[-2:] == ["", "..leading dot"]
    assert s.cmd("TOP 2") == "-ERR usage: TOP message lines"


def test_wrong_password_and_unknown_user_look_the_same(s):
    s.cmd("USER alice@example.test")
    assert s.cmd("PASS wrong") == "-ERR [AUTH] Authentication failed"
    s.cmd("USER nobody@example.test")
    assert s.cmd("PASS wrong") == "-ERR [AUTH] Authentication failed"
    assert s.login().startswith("+OK")


def test_login_by_domain_alias_and_case(s):
    assert s.login("ALICE@example.org").startswith("+OK 2 messages")


def test_auth_plain_initial_and_continued(unit, s):
    token = base64.b64encode(b"\0alice@example.test\0alice pw").decode()
    assert s.cmd(f"AUTH PLAIN {token}").startswith("+OK 2 messages")
    other = Session(unit)
    assert other.cmd("AUTH PLAIN") == "+ "
    assert other.cmd(token) == "-ERR [IN-USE] Mailbox is locked by another session"


@pytest.mark.parametrize(
    "response, reply",
    [
        ("*", "-ERR authentication cancelled"),
        ("!!!", "-ERR cannot decode the response as base64"),
        (
            base64.b64encode(b"alice@example.test alice pw").decode(),
            "-ERR expected authzid NUL authcid NUL password",
        ),
        (
            base64.b64encode(b"bob@other.test\0alice@example.test\0alice pw").decode(),
            "-ERR [AUTH] Authentication failed",
        ),
        (
            base64.b64encode(b"\0alice@example.test\0wrong").decode(),
            "-ERR [AUTH] Authentication failed",
        ),
    ],
)
def test_auth_plain_refusals(s, response, reply):
    assert s.cmd("AUTH PLAIN") == "+ "
    assert s.cmd(response) == reply
    assert s.login().startswith("+OK")


def test_bare_auth_lists_mechanisms(s):
    assert s.multi("AUTH") == ["PLAIN"]


def test_dele_only_at_quit(s):
    s.login()
    assert s.cmd("DELE 1").startswith("+OK")
    assert s.cmd("DELE 1") == "-ERR no such message"
    assert s.cmd("RETR 1") == "-ERR no such message"
    assert s.cmd("STAT").startswith("+OK 1 ")
    assert len(list((s.unit.mail_dir / "example.test/alice/new").iterdir())) == 2
    assert s.cmd("QUIT") == "+OK 1 message deleted, signing off"
    assert len(list((s.unit.mail_dir / "example.test/alice/new").iterdir())) == 1


def test_rset_undeletes(s):
    s.login()
    s.cmd("DELE 1")
    assert s.cmd("RSET") == "+OK 2 messages"
    s.cmd("QUIT")
    assert len(list((s.unit.mail_dir / "example.test/alice/new").iterdir())) == 2


def test_dropped_connection_deletes_nothing_and_unlocks(unit, s):
    s.login()
    s.cmd("DELE 1")
    s.cmd("DELE 2")
    s.proto.connectionLost(None)
    assert len(list((unit.mail_dir / "example.test/alice/new").iterdir())) == 2
    assert Session(unit).login().startswith("+OK 2 messages")


def test_in_use(unit, s):
    s.login()
    other = Session(unit)
    assert other.login() == "-ERR [IN-USE] Mailbox is locked by another session"
    s.cmd("QUIT")
    assert other.login().startswith("+OK")


def test_new_mail_shows_up_in_the_next_session(unit, s):
    s.login()
    deliver(unit, b"Subject: three\r\n\r\nthird\r\n")
    assert s.cmd("STAT").startswith("+OK 2 ")
    s.cmd("QUIT")
    assert Session(unit).login().startswith("+OK 3 messages")


def test_uidls_are_stable_across_sessions(unit, s):
    s.login()
    first = s.multi("UIDL")
    s.cmd("DELE 1")
    s.cmd("QUIT")
    again = Session(unit)
    again.login()
    assert again.multi("UIDL") == ["1 " + first[1].split()[1]]


def test_line_too_long(s):
    assert s.cmd("USER " + "x" * 300) == "-ERR line too long"
    assert s.login().startswith("+OK")


def test_autologout_after_ten_minutes_deletes_nothing(unit, s):
    s.login()
    s.cmd("DELE 1")
    unit.clock.advance(599)
    assert not s.transport.disconnecting
    unit.clock.advance(2)
    assert s.take() == ["-ERR autologout timer expired, closing"]
    assert s.transport.disconnecting
    s.proto.connectionLost(None)
    assert len(list((unit.mail_dir / "example.test/alice/new").iterdir())) == 2


def test_pipelined_commands_answer_in_order(s):
    out = s.raw("USER alice@example.test\r\nPASS alice pw\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
    lines = out.decode().split("\r\n")[:-1]
    assert [line.split()[0] for line in lines] == ["+OK"] * 5
    assert lines[2].startswith("+OK 2 ")


def test_empty_mailbox(unit):
    s = Session(unit)
    assert s.login("bob@other.test", "bob pw") == "+OK 0 messages (0 octets)"
    assert s.multi("LIST") == []
    assert s.cmd("RETR 1") == "-ERR no such message"


@pytest.mark.parametrize(
    "command",
    [
        "LIST 1_0",
        "UIDL +1",
        "UIDL \u0661",
        "UIDL \uff12",
        "RETR 1 2",
        "TOP 1 \u00b2",
        "DELE -1",
        "LIST 0x1",
        "RETR",
        "TOP 1",
        "TOP 1 2 3",
        "LIST 1 1",
        "RETR 99999999999999",
    ],
)
def test_message_numbers_are_ascii_digits_exactly_as_rfc_1939_gives(unit, command):
    deliver(unit, b"Subject: one\r\n\r\nbody\r\n")
    p = Session(unit)
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS alice pw").startswith("+OK")
    assert p.cmd(command).startswith("-ERR")
    assert p.cmd("LIST 1").startswith("+OK 1 ")  # the session goes on


def test_a_pop3_session_is_logged_once_at_its_end(unit):
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list = []
    globalLogPublisher.addObserver(seen.append)
    try:
        session = Session(unit)
        unit.clock.advance(2.5)
        session.cmd("QUIT")
        session.proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [formatEvent(e) for e in seen if e.get("log_namespace", "").endswith("pop3")]
    assert [line for line in lines if "pop3 session from" in line] == [
        "pop3 session from 192.0.2.9: 2.5 s"
    ]
    assert not [line for line in lines if "connection from" in line or "disconnect" in line]


def test_two_ipv6_addresses_in_one_64_share_a_block(unit):
    """[limits] ipv6_prefix = 64: a host that rotates through its /64 is one client."""
    for i in range(10):  # [limits] auth_failures
        s = Session(unit, ip=f"2001:db8:1:2::{i + 1:x}")
        assert s.login(password="wrong").startswith("-ERR")
    neighbour = Session(unit, ip="2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert neighbour.greeting[0].startswith("-ERR") and "2001:db8:1:2:" in neighbour.greeting[0]
    other = Session(unit, ip="2001:db8:1:3::1")  # the next /64: another client
    assert other.greeting[0].startswith("+OK")
    assert other.login().startswith("+OK")
    [block] = unit.state.blocks(unit.clock.seconds())
    assert block.ip == "2001:db8:1:2::/64"  # what `mailboxctl blocked list` shows
