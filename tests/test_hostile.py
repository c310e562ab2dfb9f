"""Unit tests of issue 10's limits: POP3's error limit and the cap on
connections per client address, over StringTransport and a Clock."""

from __future__ import annotations

import ipaddress

import pytest
from test_pop3 import Session as POP
from test_pop3 import _Peer
from test_smtp import Session as SMTP
from twisted.internet.testing import StringTransport

from mailboxd.connections import ConnectionCount
from mailboxd.pop3 import POP3Factory
from mailboxd.smtp import SMTPFactory


def test_pop3_closes_a_session_at_max_errors(unit):
    p = POP(unit)
    for _ in range(9):
        assert p.cmd("XYZZY") == "-ERR unknown command"
    assert p.proto.transport.disconnecting is False
    p.proto.dataReceived(b"XYZZY\r\nNOOP\r\n")
    assert p.take() == ["-ERR unknown command", "-ERR too many errors, closing"]
    assert p.transport.disconnecting


@pytest.mark.parametrize(
    "cap,trusted,ip,admitted",
    [
        (3, (), "192.0.2.1", 3),
        (3, (), "::ffff:192.0.2.1", 3),  # the same address, IPv4-mapped
        (0, (), "192.0.2.1", 10),  # 0: no cap
        (3, (ipaddress.ip_network("192.0.2.0/24"),), "192.0.2.1", 10),  # trusted
    ],
)
def test_connection_count_table(cap, trusted, ip, admitted):
    count = ConnectionCount(cap, trusted)
    assert sum(count.admit(ip) for _ in range(10)) == admitted
    assert count.admit("198.51.100.1")  # another address has its own count


def connect(factory, ip: str) -> tuple:
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=_Peer(ip))
    proto.makeConnection(transport)
    return proto, transport


def test_connections_per_ip_count_every_listener_together(unit):
    count = ConnectionCount(2)
    smtp = SMTPFactory(
        unit.config,
        lambda: unit.store.directory,
        unit.clock,
        unit.workers,
        unit.auth,
        unit.popauth,
        connections=count,
    )
    pop3 = POP3Factory(
        unit.config, unit.auth, unit.popauth, unit.clock, unit.workers, connections=count
    )
    first, t1 = connect(smtp, "192.0.2.5")
    _, t2 = connect(pop3, "192.0.2.5")
    _, t3 = connect(smtp, "192.0.2.5")
    assert t3.value() == b"421 4.7.0 Too many connections from 192.0.2.5\r\n"
    assert t3.disconnecting
    _, t4 = connect(pop3, "192.0.2.5")
    assert t4.value() == b"-ERR [SYS/TEMP] Too many connections from 192.0.2.5\r\n"
    first.connectionLost(None)  # one goes: the next is greeted
    _, t5 = connect(pop3, "192.0.2.5")
    assert t5.value().startswith(b"+OK ")
    assert SMTP(unit).greeting[0].startswith("220 ")  # factories without a count: no cap


def test_folders_and_files_are_private_whatever_the_umask(unit, tmp_path):
    import os
    import stat

    from mailboxd.accounts import Account
    from mailboxd.maildir import IncomingMessage
    from mailboxd.queue import Entry, Recipient, enqueue_bytes
    from mailboxd.state import SQLiteStateStore

    old = os.umask(0)
    try:
        home = tmp_path / "home"
        message = IncomingMessage(home / "mail" / ".incoming", "mail.example.test")
        message.write_line(b"Subject: x")
        carol = Account("carol@new.test", "new.test", "carol")
        [path] = message.commit(home / "mail", (carol,))
        enqueue_bytes(
            home / "mail" / ".queue", b"x\n", Entry("ID1", "", 0, 0.0, [Recipient("a@b.c")])
        )
        store = SQLiteStateStore(home / "mail" / ".state" / "state.sqlite3")
        store.revoke_popauth("192.0.2.1")
        store.close()
    finally:
        os.umask(old)
    made = [home, *home.rglob("*")]
    loose = [
        (str(p.relative_to(tmp_path)), oct(stat.S_IMODE(p.stat().st_mode)))
        for p in made
        if stat.S_IMODE(p.stat().st_mode) & 0o077
    ]
    assert loose == []
    assert path.parent.name == "new"


def logged_in(unit) -> POP:
    p = POP(unit)
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS alice pw").startswith("+OK")
    return p


def test_pop3_serves_regular_files_only(unit, tmp_path):
    import os

    from test_pop3 import deliver

    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: not yours\n\nroot's\n")
    deliver(unit, b"Subject: one\r\n\r\nbody\r\n")
    new = unit.mail_dir / "example.test" / "alice" / "new"
    os.symlink(secret, new / "1.linked,S=27,W=30")
    os.mkfifo(new / "2.fifo")
    p = logged_in(unit)
    assert p.multi("LIST") == [p.cmd("LIST 1")[4:]]  # one message: no link, no FIFO
    [message] = list(new.glob("*.mail.example.test*"))
    message.unlink()
    os.mkfifo(message)  # swapped for a FIFO after the login
    assert p.cmd("RETR 1") == "-ERR [SYS/TEMP] message no longer available"
    assert p.cmd("NOOP") == "+OK"


def test_list_and_retr_agree_whatever_the_name_says(unit):
    from test_pop3 import deliver

    deliver(unit, b"Subject: one\r\n\r\nbody\r\n")
    new = unit.mail_dir / "example.test" / "alice" / "new"
    [path] = list(new.iterdir())
    lying = path.with_name(path.name.split(",S=")[0] + f",S={path.stat().st_size},W=3")
    path.rename(lying)
    p = logged_in(unit)
    announced = int(p.cmd("LIST 1").split()[2])
    retr = p.raw("RETR 1\r\n")
    body = retr.split(b"\r\n", 1)[1][: -len(b".\r\n")]
    assert announced == len(body) == len(lying.read_bytes().replace(b"\n", b"\r\n"))
    assert p.cmd("STAT") == f"+OK 1 {announced}"


@pytest.mark.parametrize("command", ["VRFY {}", "EXPN {}", "AUTH PLAIN {plain}"])
def test_smtp_tells_nobody_which_users_exist(unit, command):
    import base64

    replies = []
    for address in ("alice@example.test", "nobody@example.test"):
        plain = base64.b64encode(f"\0{address}\0wrong".encode()).decode()
        s = SMTP(unit, ip="192.0.2.90")
        s.cmd("EHLO client.test")
        replies.append(s.cmd(command.format(address, plain=plain)))
    assert replies[0] == replies[1]
    assert replies[0][:3] in ("252", "502", "535")


def test_pop3_user_and_pass_tell_nobody_which_users_exist(unit):
    replies = []
    for address in ("alice@example.test", "nobody@example.test"):
        p = POP(unit, ip="192.0.2.91")
        replies.append((p.cmd(f"USER {address}"), p.cmd("PASS wrong")))
    assert (
        replies[0] == replies[1] == ("+OK send your password", "-ERR [AUTH] Authentication failed")
    )


def test_only_rcpt_says_a_user_is_unknown(unit):
    s = SMTP(unit)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<a@far.test>")
    assert s.cmd("RCPT TO:<nobody@example.test>") == (
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
    )


# --- issue 11: the accounts reload survives what it cannot read ------------------------


def test_the_accounts_reload_survives_an_unreadable_file_and_says_so_once(unit):
    from twisted.logger import capturedLogs

    accounts = unit.config.mailbox.accounts
    good = accounts.read_text()
    with capturedLogs() as events:
        accounts.unlink()
        accounts.mkdir()  # IsADirectoryError, as an operator's mistake would give
        for _ in range(3):
            unit.store.check()
        assert unit.store.directory.hashes  # still the accounts loaded before
        accounts.rmdir()
        accounts.write_text(good)
        unit.store.check()
    said = [e["log_format"] for e in events]
    assert (
        said.count("cannot read {problem}; still serving the {count} accounts loaded before") == 1
    )
    assert "accounts and aliases readable again" in said
    assert len(unit.store.directory.hashes) == 2


def test_a_rewrite_keeps_the_accounts_file_mode(tmp_path):
    import stat

    from mailboxd.accounts import write_atomically

    path = tmp_path / "accounts"
    path.write_text("x\n")
    path.chmod(0o640)
    write_atomically(path, "y\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "y\n"
