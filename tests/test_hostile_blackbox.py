"""Black-box tests of issue 10: hostile clients and the relay rules as customers meet them.

The real twistd process, driven over raw sockets from several loopback source
addresses (Linux routes all of 127.0.0.0/8 to the loopback interface, so each
address looks like another host to the per-IP rules). Every check is an exact
reply, a byte count or a file mode; the only waits are a block running out
(`block_duration = 5`) and polls with a deadline, never a measured rate.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import smtplib
import stat
import time
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, ROOT, MailServer, ctl
from test_blackbox import Raw, wait_for
from test_capacity_blackbox import pop_pass
from test_relay_blackbox import b64, plain, pop_from, pop_login_from, refusal, smtp_from

pytestmark = pytest.mark.blackbox

NEWS = "news@far.example"  # a foreign envelope sender
FAR = "x@far.test"  # a foreign recipient: relaying
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
NOOP_OK = "250 2.0.0 Ok"
POP_FAILED = "-ERR [AUTH] Authentication failed"


def sender_rejected(sender: str = NEWS) -> str:
    return f"553 5.1.0 <{sender}> sender rejected"


def blocked_ips(server: MailServer) -> list[str]:
    listed = ctl(server, "blocked", "list").stdout.splitlines()
    return [line.split("\t")[0] for line in listed]


def first_line(server: MailServer, port: int, ip: str) -> str:
    """The greeting (or refusal) a new connection from `ip` gets; then hang up."""
    r = Raw(port, source=ip)
    try:
        return r.line()
    finally:
        r.close()


def send(
    server: MailServer,
    ip: str,
    sender: str,
    rcpts: list[str],
    port: int | None = None,
    auth: tuple[str, str] | None = None,
) -> list[str]:
    """One transaction from `ip`; every reply up to the first refusal (AUTH's first)."""
    r = smtp_from(server, ip, port)
    replies: list[str] = []
    try:
        if auth is not None:
            r.send(f"AUTH PLAIN {plain(*auth)}\r\n")
            replies.append(r.reply())
            if replies[-1] != AUTH_OK:
                return replies
        r.send(f"MAIL FROM:<{sender}>\r\n")
        replies.append(r.reply())
        if not replies[-1].startswith("250"):
            return replies
        accepted = 0
        for rcpt in rcpts:
            r.send(f"RCPT TO:<{rcpt}>\r\n")
            replies.append(r.reply())
            accepted += replies[-1].startswith("250")
        if not accepted:
            return replies
        r.send("DATA\r\n")
        replies.append(r.reply())
        if not replies[-1].startswith("354"):
            return replies
        r.send(f"Subject: from {sender or 'nobody'}\r\n\r\nhello\r\n.\r\n")
        replies.append(r.reply())
        return replies
    finally:
        r.close()


def delivered(replies: list[str], rcpts: int = 1) -> bool:
    """MAIL, every RCPT, DATA and the end of data all accepted."""
    return (
        len(replies) == rcpts + 3
        and all(x.startswith("250") for x in replies[: rcpts + 1])
        and replies[-2].startswith("354")
        and replies[-1].startswith("250 ")
    )


def queue_files(server: MailServer) -> list[str]:
    q = server.mail_dir / ".queue"
    return sorted(p.name for p in q.iterdir()) if q.is_dir() else []


def pop_session(server: MailServer, ip: str = "127.0.0.1") -> Raw:
    r = pop_from(server, ip)
    r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert r.line().startswith("+OK")
    reply = r.line()
    assert reply.startswith("+OK"), reply
    return r


def read_multiline(r: Raw) -> list[bytes]:
    """The lines of a multi-line POP3 response after its +OK line, un-stuffed."""
    lines = []
    while True:
        while b"\r\n" not in r.buf:
            chunk = r.sock.recv(65536)
            if not chunk:
                raise EOFError(r.buf)
            r.buf += chunk
        line, r.buf = r.buf.split(b"\r\n", 1)
        if line == b".":
            return lines
        lines.append(line[1:] if line.startswith(b".") else line)


def smtp_mail(server: MailServer, rcpts: list[str], count: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        for i in range(count):
            s.sendmail("a@far.test", rcpts, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode())


# --- 1. the relay rules -----------------------------------------------------------------

POP_IP = "127.0.0.8"


def test_a_pop3_login_never_refuses_mail_that_would_be_accepted(untrusted):
    server = untrusted()
    assert delivered(send(server, POP_IP, NEWS, [ALICE]))  # anyone may mail a local user
    pop_login_from(server, POP_IP)
    # ... and still may after a POP3 login from that address (NAT, scanners, web forms).
    replies = send(server, POP_IP, NEWS, [ALICE])
    assert delivered(replies), replies
    assert len(server.messages(ALICE)) == 2
    assert queue_files(server) == []


def test_pop_authorisation_checks_the_sender_at_rcpt_of_relayed_mail(untrusted):
    server = untrusted()
    pop_login_from(server, POP_IP)
    # Relaying is what needs the POP authorisation: its sender is checked there.
    replies = send(server, POP_IP, NEWS, [FAR])
    assert replies[0].startswith("250 "), replies
    assert replies[1:] == [sender_rejected()], replies
    # In one transaction the local recipient is kept and the relayed one refused.
    replies = send(server, POP_IP, NEWS, [ALICE, FAR])
    assert replies[0].startswith("250 ") and replies[1].startswith("250 "), replies
    assert replies[2] == sender_rejected(), replies
    assert replies[3].startswith("354") and replies[4].startswith("250 "), replies
    assert len(server.messages(ALICE)) == 1
    assert queue_files(server) == []
    # The login's domain, an alias of it, and the null sender may relay.
    for sender in (ALICE, "alice@example.org", ""):
        replies = send(server, POP_IP, sender, [FAR])
        assert delivered(replies), (sender, replies)
    assert len(queue_files(server)) >= 1


def test_submission_and_auth_check_the_sender_at_mail_from(untrusted):
    server = untrusted()
    pop_login_from(server, POP_IP)
    sub = server.submission_port
    assert send(server, POP_IP, NEWS, [FAR], port=sub) == [sender_rejected()]
    assert send(server, POP_IP, NEWS, [ALICE], port=sub) == [sender_rejected()]
    assert delivered(send(server, POP_IP, ALICE, [FAR], port=sub))
    assert delivered(send(server, POP_IP, "", [FAR], port=sub))
    for port in (server.smtp_port, sub):
        for rcpt in (FAR, ALICE):
            replies = send(server, "127.0.0.10", NEWS, [rcpt], port=port, auth=(ALICE, ALICE_PW))
            assert replies == [AUTH_OK, sender_rejected()], (port, rcpt, replies)
        replies = send(server, "127.0.0.10", "", [FAR], port=port, auth=(ALICE, ALICE_PW))
        assert replies[0] == AUTH_OK and delivered(replies[1:]), (port, replies)


# --- 2. a block lasts block_duration, then the slate is clean --------------------------

LIMITS_3 = "[limits]\nauth_failures = 3\nauth_failure_window = 3600\nblock_duration = 5\n"


def smtp_login(server: MailServer, ip: str, password: str) -> tuple[str, str]:
    """AUTH PLAIN as alice, then NOOP: (AUTH's reply, the next reply: NOOP's or a 421)."""
    r = smtp_from(server, ip)
    try:
        r.send(f"AUTH PLAIN {plain(ALICE, password)}\r\nNOOP\r\n")
        return r.reply(), r.reply()
    finally:
        r.close()


def test_a_block_expires_with_the_failures_that_caused_it(untrusted):
    server = untrusted(LIMITS_3)
    ip = "127.0.0.11"
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, "421 4.7.1 " + refusal(ip))
    blocked_at = time.monotonic()
    assert first_line(server, server.smtp_port, ip) == "554 5.7.1 " + refusal(ip)
    assert blocked_ips(server) == [ip]

    time.sleep(max(0.0, blocked_at + 6.0 - time.monotonic()))
    assert wait_for(lambda: first_line(server, server.smtp_port, ip).startswith("220 "), timeout=10)
    # The block is over, and so are the failures that caused it.
    assert smtp_login(server, ip, ALICE_PW) == (AUTH_OK, NOOP_OK)
    assert pop_pass(server, ip, ALICE, ALICE_PW).startswith("+OK")
    assert blocked_ips(server) == []
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)  # one failure: no block
    assert first_line(server, server.smtp_port, ip).startswith("220 ")
    assert first_line(server, server.pop3_port, ip).startswith("+OK")
    assert blocked_ips(server) == []


def test_unblock_of_an_ip_with_failures_but_no_block_clears_them(untrusted):
    server = untrusted(LIMITS_3)
    ip = "127.0.0.12"
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)
    assert pop_pass(server, ip, ALICE, "wrong") == POP_FAILED
    proc = ctl(server, "blocked", "unblock", ip)
    assert "cleared" in proc.stdout, proc.stdout
    # Two failures more would block if the first two still counted.
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)
    assert smtp_login(server, ip, "wrong") == (AUTH_INVALID, NOOP_OK)
    assert first_line(server, server.smtp_port, ip).startswith("220 ")
    assert blocked_ips(server) == []
    # An IP with neither failures nor a block: nothing to do, exit status 1.
    ctl(server, "blocked", "unblock", "127.0.0.13", ok=(1,))


# --- 3. log injection -----------------------------------------------------------------

FORGED_AT = "2026-01-01T00:00:00+0000"
FORGED = f"x\n{FORGED_AT} [mailboxd.auth#info] smtp login INJECTED@example.test from 10.9.9.9"
HOSTILE_NAMES = [
    "lf\nuser@example.test",
    "cr\ruser@example.test",
    "nul\x00user@example.test",
    "\x1b[31mred@example.test",
    FORGED,
    FORGED.replace("\n", "\r\n"),
    FORGED.replace("\n", "\r"),
]


def test_client_strings_are_escaped_in_the_log(untrusted):
    server = untrusted("[limits]\nauth_failures = 1000\n")
    for name in HOSTILE_NAMES:
        if "\x00" not in name:  # NUL separates the fields of PLAIN
            r = smtp_from(server, "127.0.0.1")
            r.send("AUTH PLAIN " + b64("\0" + name + "\0wrong") + "\r\n")
            assert r.reply().startswith("5"), name
            r.close()
        r = smtp_from(server, "127.0.0.1")
        r.send("AUTH LOGIN\r\n")
        assert r.reply().startswith("334 ")
        r.send(b64(name) + "\r\n")
        if r.reply().startswith("334 "):
            r.send(b64("wrong") + "\r\n")
            assert r.reply().startswith("5"), name
        r.close()
    # POP3 USER: CR and LF end the line, NUL and ESC do not.
    r = pop_from(server, "127.0.0.1")
    r.send(b"USER nul\x00esc\x1b[31m@example.test\r\nPASS wrong\r\n")
    r.line()
    assert r.line().startswith("-ERR")
    r.send(b"QUIT\r\n")
    r.close()
    r = smtp_from(server, "127.0.0.1")
    r.send(b"MAIL FROM:<a@[1.2.3.4\x1b]>\r\n")
    if r.reply().startswith("250"):
        r.send(b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        if r.reply().startswith("250") and r.reply().startswith("354"):
            r.send(b"Subject: esc\r\n\r\nbody\r\n.\r\n")
            r.reply()
    r.close()
    # A last, plain failure: once it is logged, so is everything before it.
    r = pop_from(server, "127.0.0.1")
    r.send("USER last-of-the-batch@example.test\r\nPASS wrong\r\n")
    assert r.line().startswith("+OK")
    assert r.line() == POP_FAILED
    r.close()
    assert wait_for(lambda: "last-of-the-batch@example.test" in server.log(), timeout=5)

    data = server.log_path.read_bytes()
    assert b"\x00" not in data, "a NUL reached the log"
    assert b"\x1b" not in data, "an ESC reached the log"
    assert b"\r" not in data, "a CR reached the log"
    for line in data.decode("utf-8", "replace").split("\n"):
        assert not line.lstrip().startswith(FORGED_AT), line  # a forged line
        if "smtp login INJECTED" in line:  # only inside an escaped user name
            before = line.split("smtp login INJECTED")[0]
            assert not before.lstrip().startswith(FORGED_AT), line
            assert re.search(r"\\x0[adAD]" + re.escape(FORGED_AT), before), line
    assert re.search(rb"\\x(0a|0A)", data), "no escaped LF in the log"
    assert re.search(rb"\\x(1b|1B)", data), "no escaped ESC in the log"


# --- 4. NUL in DATA ---------------------------------------------------------------------

NUL_DATA = [
    b"Subject: nul\r\n\r\nhello\r\n\x00.\r\n"
    b"MAIL FROM:<evil@far.test>\r\nRCPT TO:<bob@other.test>\r\nRCPT TO:<y@far.test>\r\n"
    b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n",  # ends at the final .CRLF
    b"Subject: nul\r\n\r\nhel\x00lo\r\n",
]


@pytest.mark.parametrize("body", NUL_DATA, ids=["smuggled-after-nul-dot", "nul-in-a-line"])
def test_nul_in_data_is_refused(server, body):
    r = smtp_from(server, "127.0.0.1")  # trusted: it could relay, were anything accepted
    r.send(f"MAIL FROM:<a@far.test>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<{FAR}>\r\nDATA\r\n")
    for expected in ("250", "250", "250", "354"):
        assert r.reply().startswith(expected)
    r.send(body + b".\r\nNOOP\r\n")
    assert r.reply() == "550 5.6.0 Error: message contains a NUL byte"
    assert r.reply() == NOOP_OK  # the NOOP: nothing smuggled was answered
    r.send("QUIT\r\n")
    assert r.reply().startswith("221")
    r.close()
    assert server.messages(ALICE) == []
    assert server.messages("bob@other.test") == []
    assert queue_files(server) == []


# --- 5. POP3 message numbers ------------------------------------------------------------


def test_pop3_message_numbers_are_ascii_digits_only(server):
    smtp_mail(server, [ALICE])
    r = pop_session(server)
    # Fewer than [pop3] max_errors (10): the session must outlive its refusals.
    for command in (
        "LIST 1_0",
        "UIDL +1",
        "UIDL \u0661",
        "UIDL \uff12",
        "RETR 1 2",
        "TOP 1 \u00b2",
        "TOP 1 +0",
        "DELE -1",
    ):
        r.send(command.encode("utf-8") + b"\r\n")
        reply = r.line()
        assert reply.startswith("-ERR"), (command, reply)
    r.send("LIST 1\r\n")
    assert r.line().startswith("+OK 1 ")
    r.send("STAT\r\n")
    assert r.line().startswith("+OK 1 ")  # nothing was marked deleted
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()
    assert len(server.messages(ALICE)) == 1
    server.check_log()


# --- 6. POP3 error limit, connections per IP -------------------------------------------


def bad_commands(server: MailServer, count: int) -> None:
    r = pop_from(server, "127.0.0.1")
    r.sock.settimeout(5)
    try:
        for i in range(count):
            r.send("XYZZY\r\n")
            reply = r.line()
            assert reply.startswith("-ERR") and "too many" not in reply, (i, reply)
        assert r.line() == "-ERR too many errors, closing"
        assert r.closed()
    finally:
        r.close()


def test_pop3_error_limit_default(server):
    bad_commands(server, 10)


def test_pop3_error_limit_configured(untrusted):
    bad_commands(untrusted("[pop3]\nmax_errors = 3\n"), 3)


def too_many(ip: str) -> tuple[str, str]:
    return (
        f"421 4.7.0 Too many connections from {ip}",
        f"-ERR [SYS/TEMP] Too many connections from {ip}",
    )


def test_connections_per_ip_count_every_listener(untrusted):
    server = untrusted("[limits]\nconnections_per_ip = 3\n")
    ip = "127.0.0.9"
    smtp_refusal, pop_refusal = too_many(ip)
    held = [
        smtp_from(server, ip),
        pop_from(server, ip),
        smtp_from(server, ip, server.submission_port),
    ]
    for port, refused in (
        (server.smtp_port, smtp_refusal),
        (server.submission_port, smtp_refusal),
        (server.pop3_port, pop_refusal),
    ):
        r = Raw(port, source=ip)
        assert r.line() == refused
        assert r.closed()
        r.close()
    # Another address is served; the held sessions still are.
    other = smtp_from(server, "127.0.0.10")
    other.close()
    held[0].send("NOOP\r\n")
    assert held[0].reply() == NOOP_OK
    # One goes, and a new one is greeted again.
    held[0].send("QUIT\r\n")
    assert held[0].reply().startswith("221")
    assert held[0].closed()
    held[0].close()
    assert wait_for(lambda: first_line(server, server.pop3_port, ip).startswith("+OK"), 5)
    for r in held[1:]:
        r.close()


def test_connections_per_ip_default_is_fifty(untrusted):
    server = untrusted()
    ip = "127.0.0.9"
    held = []
    try:
        for i in range(50):
            port = server.smtp_port if i % 2 else server.pop3_port
            r = Raw(port, source=ip)
            held.append(r)
            assert r.line()[:3] in ("220", "+OK"), i
        r = Raw(server.smtp_port, source=ip)
        held.append(r)
        assert r.line() == too_many(ip)[0]
        assert r.closed()
    finally:
        for r in held:
            r.close()


def test_trusted_networks_are_not_capped(make_server):
    server = make_server(
        "[mailbox]\ntrusted_networks = 127.0.0.9/32\n[limits]\nconnections_per_ip = 3\n"
    )
    server.add_test_accounts()
    server.start()
    held = []
    try:
        for i in range(6):
            held.append(smtp_from(server, "127.0.0.9") if i % 2 else pop_from(server, "127.0.0.9"))
        # The cap holds for an untrusted address of the same server.
        held += [smtp_from(server, "127.0.0.10") for _ in range(3)]
        assert first_line(server, server.smtp_port, "127.0.0.10") == too_many("127.0.0.10")[0]
    finally:
        for r in held:
            r.close()


# --- 7. folders and files are private whatever the umask --------------------------------


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_everything_created_is_private_under_umask_000(make_server):
    server = make_server()  # trusts loopback: a relayed message fills .queue
    server.add_test_accounts()
    with umask(0):
        server.start()
    smtp_mail(server, [ALICE, FAR], count=2)
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    p.retr(1)
    p.dele(1)
    p.quit()
    with umask(0):
        ctl(server, "user", "add", "carol@example.test", input="carol pw\n")
    assert wait_for(lambda: "loaded 3 accounts" in server.log(), timeout=5)
    smtp_mail(server, ["carol@example.test"])

    mail_dir = server.mail_dir
    alice = server.maildir(ALICE)
    expected = [
        mail_dir,
        mail_dir / "example.test",
        alice,
        alice / "tmp",
        alice / "new",
        alice / "cur",
        mail_dir / ".incoming",
        mail_dir / ".state",
        mail_dir / ".state" / "state.sqlite3",
        mail_dir / ".queue",
        server.maildir("carol@example.test"),
    ]
    for path in expected:
        assert path.exists(), path
    open_modes = {}
    for top, dirs, files in os.walk(mail_dir):
        for name in [".", *dirs, *files]:
            path = Path(top) / name if name != "." else Path(top)
            with contextlib.suppress(FileNotFoundError):  # a file that went meanwhile
                mode = os.lstat(path).st_mode
                if stat.S_IMODE(mode) & 0o077:
                    open_modes[str(path.relative_to(server.home))] = oct(stat.S_IMODE(mode))
    assert len(server.messages(ALICE)) == 1 and server.messages("carol@example.test")
    assert any(p.name.endswith("-wal") for p in (mail_dir / ".state").iterdir())
    # mailboxctl's rewrite of the accounts file (it keeps the file's owner, group
    # and mode, issue 11, but never lets others read the hashes), and anything
    # it made beside it.
    etc = server.home / "etc"
    for path in etc.iterdir():
        if path.name not in ("mailbox.ini", "aliases"):  # written by this test
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & (0o007 if path.name == "accounts" else 0o077):
                open_modes[str(path.relative_to(server.home))] = oct(mode)
    assert not open_modes, "\n".join(f"{m} {p}" for p, m in sorted(open_modes.items()))


def test_the_systemd_unit_sets_a_private_umask():
    unit = (ROOT / "etc" / "mailbox.service").read_text()
    assert re.search(r"^UMask=0077$", unit, re.M), unit


# --- 8. POP3 serves regular files only --------------------------------------------------


def listing(r: Raw) -> tuple[tuple[int, int], dict[int, int]]:
    r.send("STAT\r\n")
    reply = r.line()
    assert reply.startswith("+OK "), reply
    count, size = map(int, reply.split()[1:3])
    r.send("LIST\r\n")
    assert r.line().startswith("+OK")
    sizes = {}
    for line in read_multiline(r):
        number, octets = line.split()
        sizes[int(number)] = int(octets)
    return (count, size), sizes


def retr(r: Raw, number: int) -> bytes:
    r.send(f"RETR {number}\r\n")
    reply = r.line()
    assert reply.startswith("+OK"), (number, reply)
    return b"".join(line + b"\r\n" for line in read_multiline(r))


def test_pop3_follows_no_symlink_and_tells_the_true_size(server, tmp_path):
    smtp_mail(server, [ALICE])
    new = server.maildir(ALICE) / "new"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"Subject: not yours\n\nSECRET-OUTSIDE\n")
    os.symlink(outside, new / "1700000000.M1P1Q1.link,S=34,W=37")
    os.symlink(outside, new / "1700000002.M3P3Q3.link")
    lie = b"Subject: lying size\n\nthirty-five?\n"
    (new / f"1700000001.M2P2Q2.liar,S={len(lie)},W=3").write_bytes(lie)

    r = pop_session(server)
    (count, total), sizes = listing(r)
    assert count == 2 == len(sizes), sizes  # the delivered message and the liar, no link
    assert total == sum(sizes.values())
    bodies = {}
    for number, size in sizes.items():
        bodies[number] = retr(r, number)
        assert len(bodies[number]) == size, (number, size, bodies[number])
        r.send(f"LIST {number}\r\n")
        assert r.line() == f"+OK {number} {size}"
    assert not any(b"SECRET-OUTSIDE" in body for body in bodies.values())
    for number in (3, 4):
        r.send(f"RETR {number}\r\n")
        assert r.line().startswith("-ERR")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()
    assert outside.read_bytes().endswith(b"SECRET-OUTSIDE\n")


def test_pop3_never_hangs_on_a_fifo(server):
    smtp_mail(server, [ALICE], count=2)
    r = pop_session(server)
    r.send("UIDL 1\r\n")
    uid = r.line().split()[2]
    [path] = [p for p in server.messages(ALICE) if p.name.startswith(uid)]
    path.unlink()
    os.mkfifo(path)
    try:
        r.sock.settimeout(5)  # a hung RETR fails here, not at the suite's end
        r.send("RETR 1\r\n")
        reply = r.line()
        assert reply.startswith("-ERR"), reply
        r.send("TOP 1 0\r\n")
        reply = r.line()
        assert reply.startswith("-ERR"), reply
        r.send("LIST 2\r\n")
        assert r.line().startswith("+OK 2 ")
        assert b"\r\nbody " in retr(r, 2)
        r.send("NOOP\r\n")
        assert r.line().startswith("+OK")
        r.send("QUIT\r\n")
        assert r.line().startswith("+OK")
    finally:
        r.close()
        # Let any reader the server left blocked on the FIFO go, so that it can stop.
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                break
            os.close(fd)
            time.sleep(0.1)


# --- 9. no account enumeration, except RCPT ---------------------------------------------

UNKNOWN = "nobody@example.test"


def test_vrfy_expn_auth_user_and_pass_do_not_tell_accounts_apart(untrusted):
    server = untrusted("[limits]\nauth_failures = 100\n")
    r = smtp_from(server, "127.0.0.1")
    replies = {}
    for address in (ALICE, UNKNOWN):
        r.send(f"VRFY {address}\r\n")
        vrfy = r.reply()
        assert vrfy.startswith("252"), vrfy
        r.send(f"EXPN {address}\r\n")
        replies[address] = (vrfy, r.reply().replace(address, "<address>"))
    assert replies[ALICE] == replies[UNKNOWN], replies
    r.close()

    auth: dict[str, set[str]] = {ALICE: set(), UNKNOWN: set()}
    for _ in range(3):
        for address in (ALICE, UNKNOWN):
            start = time.monotonic()
            reply, _after = smtp_login_as(server, address, "wrong")
            assert time.monotonic() - start < 1.0, address
            auth[address].add(reply)
    assert auth[ALICE] == auth[UNKNOWN] == {AUTH_INVALID}, auth

    pop: dict[str, tuple[str, str]] = {}
    for address in (ALICE, UNKNOWN):
        p = pop_from(server, "127.0.0.1")
        p.send(f"USER {address}\r\n")
        user = p.line().replace(address, "<address>")
        start = time.monotonic()
        p.send("PASS wrong\r\n")
        pop[address] = (user, p.line())
        assert time.monotonic() - start < 1.0, address
        p.close()
    assert pop[ALICE] == pop[UNKNOWN], pop
    assert pop[ALICE][0].startswith("+OK") and pop[ALICE][1] == POP_FAILED, pop


def smtp_login_as(server: MailServer, address: str, password: str) -> tuple[str, str]:
    r = smtp_from(server, "127.0.0.1")
    try:
        r.send(f"AUTH PLAIN {plain(address, password)}\r\nNOOP\r\n")
        return r.reply(), r.reply()
    finally:
        r.close()


def test_only_rcpt_says_user_unknown(untrusted):
    server = untrusted()
    r = smtp_from(server, "127.0.0.7")
    r.send("MAIL FROM:<a@far.test>\r\nRCPT TO:<x@example.test>\r\n")
    assert r.reply().startswith("250")
    assert r.reply() == "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown"
    r.close()
