"""Black-box tests of issue 9 (capacity): logins, the guard, flow control, streaming.

The real twistd process, driven by stdlib clients from several loopback source
addresses (Linux routes all of 127.0.0.0/8 to the loopback interface, so each
address looks like another host to the per-IP rules). Nothing here measures a
rate: every check is an exact count, a byte-for-byte comparison, or a bound
on memory that a server with flow control stays far below and one without it
exceeds at once.
"""

from __future__ import annotations

import re
import select
import smtplib
import socket
import sqlite3
import ssl
import time
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, BOB, BOB_PW, MailServer, client_tls_context, ctl
from test_blackbox import Raw, wait_for
from test_relay_blackbox import plain, pop_from, pop_login_from, refusal, smtp_from

pytestmark = pytest.mark.blackbox

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
POP_FAILED = "-ERR [AUTH] Authentication failed"
MB = 1_000_000


# --- servers ------------------------------------------------------------------------


@pytest.fixture
def start(untrusted):
    """Servers that trust no network, with the test accounts and `users` more."""

    def start(extra: str = "", tls: bool = False, users: int = 0) -> MailServer:
        # No cap on connections per IP: these tests open more than 50 from one.
        extra = "[limits]\nconnections_per_ip = 0\n" + extra
        return untrusted(extra, tls, {user(i): password(i) for i in range(users)})

    return start


def user(i: int) -> str:
    return f"user{i:02d}@example.test"


def password(i: int) -> str:
    return f"password {i:02d}"


def rss(server: MailServer) -> int:
    """The server process's resident set size, in bytes."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M).group(1)) * 1024


def failures_on_record(server: MailServer, ip: str) -> int:
    """The failed logins the state store holds for `ip`, read without writing."""
    path = server.mail_dir / ".state" / "state.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT count(*) FROM failures WHERE ip = ?", (ip,)).fetchone()[0]
    finally:
        db.close()


def blocked_ips(server: MailServer) -> list[str]:
    return [line.split("\t")[0] for line in ctl(server, "blocked", "list").stdout.splitlines()]


# --- logins from fresh addresses ---------------------------------------------------

_next_host = iter(range(250 * 250))


def fresh_ip() -> str:
    """A loopback address no other login in this test run has used."""
    n = next(_next_host)
    return f"127.9.{n // 250}.{n % 250 + 1}"


def smtp_auth(server: MailServer, ip: str, address: str, pw: str) -> str:
    r = smtp_from(server, ip)
    try:
        r.send(f"AUTH PLAIN {plain(address, pw)}\r\n")
        return r.reply()
    finally:
        r.close()


def pop_pass(server: MailServer, ip: str, address: str, pw: str) -> str:
    r = pop_from(server, ip)
    try:
        r.send(f"USER {address}\r\n")
        assert r.line().startswith("+OK")
        r.send(f"PASS {pw}\r\n")
        reply = r.line()
        if reply.startswith("+OK"):
            r.send("QUIT\r\n")
            r.line()
        return reply
    finally:
        r.close()


def logs_in(server: MailServer, address: str, pw: str) -> tuple[bool, bool]:
    """(SMTP AUTH succeeded, POP3 USER/PASS succeeded), each from a fresh address,
    so that failures while polling never add up to a block."""
    smtp = smtp_auth(server, fresh_ip(), address, pw)
    assert smtp in (AUTH_OK, AUTH_INVALID), smtp
    pop = pop_pass(server, fresh_ip(), address, pw)
    assert pop.startswith("+OK") or pop == POP_FAILED, pop
    return smtp == AUTH_OK, pop.startswith("+OK")


# --- 1. any number of correct, concurrent logins from one address -------------------


def test_fifty_parallel_correct_pop3_logins_from_one_ip(start):
    server = start(users=50)
    ip = "127.0.0.21"
    sessions = [pop_from(server, ip) for _ in range(50)]
    for i, r in enumerate(sessions):
        r.send(f"USER {user(i)}\r\n")
    for r in sessions:
        assert r.line().startswith("+OK")
    for i, r in enumerate(sessions):  # all at once: every check is in flight together
        r.send(f"PASS {password(i)}\r\n")
    replies = [r.line() for r in sessions]
    refused = [x for x in replies if not x.startswith("+OK 0 messages")]
    assert refused == [], f"{len(refused)} of 50 correct logins refused: {refused[:3]}"
    for r in sessions:
        r.send("QUIT\r\n")
        assert r.line().startswith("+OK")
        r.close()
    assert blocked_ips(server) == []
    assert failures_on_record(server, ip) == 0


def test_fifty_parallel_correct_smtp_logins_from_one_ip(start):
    server = start()
    ip = "127.0.0.22"
    sessions = [smtp_from(server, ip) for _ in range(50)]
    for r in sessions:  # the same account fifty times: SMTP locks nothing
        r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    replies = [r.reply() for r in sessions]
    refused = [x for x in replies if x != AUTH_OK]
    assert refused == [], f"{len(refused)} of 50 correct logins refused: {refused[:3]}"
    for r in sessions:
        r.send("QUIT\r\n")
        assert r.reply().startswith("221")
        r.close()
    assert blocked_ips(server) == []
    assert failures_on_record(server, ip) == 0


# --- 2. the guard's exact limit under 50 parallel wrong attempts --------------------


def wrong_password_storm(server: MailServer, ip: str) -> dict[str, list[str]]:
    """25 POP3 and 25 SMTP sessions from `ip` send a wrong password at the same
    moment; their answers, sorted: failed, blocked (the answer names the block),
    ok (a login!) and other. Two more sessions from `ip`, opened beforehand, then
    send the right password, which must be refused."""
    early_pop = pop_from(server, ip)
    early_pop.send(f"USER {ALICE}\r\n")
    assert early_pop.line().startswith("+OK")
    early_smtp = smtp_from(server, ip)
    pops = [pop_from(server, ip) for _ in range(25)]
    for r in pops:
        r.send(f"USER {ALICE}\r\n")
    for r in pops:
        assert r.line().startswith("+OK")
    smtps = [smtp_from(server, ip) for _ in range(25)]
    for pop, smtp in zip(pops, smtps, strict=True):
        pop.send("PASS wrong\r\n")
        smtp.send(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\n")

    result: dict[str, list[str]] = {"failed": [], "blocked": [], "ok": [], "other": []}
    for r in pops:
        reply = r.line()
        if reply == POP_FAILED:
            result["failed"].append(reply)
        elif reply.startswith("-ERR") and reply.endswith(refusal(ip)):
            result["blocked"].append(reply)
        elif reply.startswith("+OK"):
            result["ok"].append(reply)
        else:
            result["other"].append(reply)
    smtp_replies = [r.reply() for r in smtps]
    # A 535 that blocked the address is followed by 421 and the close; one that did
    # not leaves the session open. Two seconds, for all of them together, to tell.
    deadline = time.monotonic() + 2
    for r, reply in zip(smtps, smtp_replies, strict=True):
        if reply == AUTH_INVALID:
            r.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                after = r.reply()
            except TimeoutError:
                after = None
            except (EOFError, ConnectionResetError):
                after = "(closed)"
            if after == "421 4.7.1 " + refusal(ip):
                result["blocked"].append(reply + " / " + after)
            elif after is None:
                result["failed"].append(reply)
            else:
                result["other"].append(reply + " / " + after)
        elif reply == "421 4.7.1 " + refusal(ip):
            result["blocked"].append(reply)
        elif reply == AUTH_OK:
            result["ok"].append(reply)
        else:
            result["other"].append(reply)
    for r in pops + smtps:
        r.close()

    # The right password, from sessions opened before the block, is refused now.
    early_pop.send(f"PASS {ALICE_PW}\r\n")
    reply = early_pop.line()
    assert reply.startswith("-ERR") and refusal(ip) in reply, reply
    assert early_pop.closed()
    early_smtp.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert early_smtp.reply() == AUTH_INVALID
    assert early_smtp.reply() == "421 4.7.1 " + refusal(ip)
    assert early_smtp.closed()
    return result


def test_fifty_parallel_wrong_logins_stop_at_exactly_the_limit(start):
    server = start()
    ip = "127.0.0.23"
    result = wrong_password_storm(server, ip)
    assert result["ok"] == [], result
    assert len(result["failed"]) <= 9, result  # the tenth failure is a block
    assert result["blocked"], result
    assert failures_on_record(server, ip) == 10
    assert blocked_ips(server) == [ip]

    # New connections get exactly the refusal, then the close, on every port.
    for port, first in [
        (server.smtp_port, "554 5.7.1 "),
        (server.submission_port, "554 5.7.1 "),
        (server.pop3_port, "-ERR [SYS/TEMP] "),
    ]:
        r = Raw(port, source=ip)
        assert r.line() == first + refusal(ip)
        assert r.closed()
        r.close()
    assert failures_on_record(server, ip) == 10

    # Another address logs in on both protocols.
    assert smtp_auth(server, "127.0.0.24", ALICE, ALICE_PW) == AUTH_OK
    pop_login_from(server, "127.0.0.24")
    assert blocked_ips(server) == [ip]


def test_parallel_wrong_logins_wait_their_turn_rather_than_being_refused_as_busy(start):
    """Issue 9, item 4: checks beyond a per-IP cap wait in line; each wrong attempt
    is answered as a failure or with the block, never with 'try again later'."""
    server = start()
    ip = "127.0.0.25"
    result = wrong_password_storm(server, ip)
    assert result["ok"] == [], result
    assert result["other"] == [], result
    assert len(result["failed"]) + len(result["blocked"]) == 50, result
    assert failures_on_record(server, ip) == 10


# --- 3. flow control on every listener ----------------------------------------------

NOOP = b"NOOP\r\n"
UNIT = 1000  # commands per send(): 6,000 octets, one TLS record
STALL = 2.0  # seconds the socket must stay full before we call it stopped
SMALL_BUFFER = 64 * 1024  # the client's own socket buffers, so the server's show
# A server that stops reading lets in about 1-2 MB (its kernel buffers, mostly);
# one that reads on takes everything, so sending stops at the limit.
SENT_LIMIT = 8 * MB
FLOOD_CAP = SENT_LIMIT
RSS_LIMIT = 30 * MB


class Client(Raw):
    """A line client with small socket buffers, with or without TLS."""

    def __init__(self, port: int, source: str, tls: bool = False) -> None:
        sock = socket.socket()
        # Small client-side buffers: what the client gets rid of is then mostly
        # what the server took in.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        if tls:
            sock = client_tls_context().wrap_socket(sock, server_hostname="mail.example.test")
        self.sock = sock
        self.buf = b""


class Flood:
    """Pipeline one command without reading the replies, on a non-blocking socket.

    `commands` counts every command handed to the socket, including those of a
    send() that is still pending (a TLS record must be offered again, unchanged,
    until it is taken); `drain` finishes that send before counting replies.
    """

    def __init__(self, client: Client, command: bytes = NOOP) -> None:
        self.client = client
        self.sock = client.sock
        self.command = command
        self.unit = command * UNIT
        self.pending = b""
        self.commands = 0
        self.sent = 0
        self.last_progress = time.monotonic()

    def _send(self) -> bool:
        try:
            n = self.sock.send(self.pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        self.pending = self.pending[n:]
        self.sent += n
        self.last_progress = time.monotonic()
        return True

    def push(self, cap: int = FLOOD_CAP, stall: float = STALL) -> None:
        """Send until the socket stays full for `stall` seconds, or `cap` octets went."""
        self.sock.setblocking(False)
        self.last_progress = time.monotonic()
        while True:
            if not self.pending:
                if self.sent >= cap:
                    return
                self.pending = self.unit
                self.commands += UNIT
            if not self._send():
                if time.monotonic() - self.last_progress >= stall:
                    return
                select.select([], [self.sock], [], 0.05)

    def drain(self, timeout: float = 60.0) -> str:
        """Read every reply, finishing the pending send; each must be the same line,
        and there must be exactly one per command. Returns that line."""
        self.sock.setblocking(False)
        expected = None
        buf = self.client.buf
        self.client.buf = b""
        answered = 0
        deadline = time.monotonic() + timeout
        while answered < self.commands:
            assert time.monotonic() < deadline, (answered, self.commands)
            if self.pending:
                self._send()
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                select.select([self.sock], [self.sock] if self.pending else [], [], 0.5)
                continue
            assert data, f"closed after {answered} of {self.commands} replies: {buf[-200:]!r}"
            buf += data
            if expected is None:
                if b"\r\n" not in buf:
                    continue
                expected = buf[: buf.index(b"\r\n") + 2]
            whole = len(buf) // len(expected)
            if buf[: whole * len(expected)] != expected * whole:
                lines = buf.split(b"\r\n")
                odd = next(x for x in lines if x + b"\r\n" != expected)
                pytest.fail(f"after {answered} replies of {expected!r}, got {odd!r}")
            answered += whole
            buf = buf[whole * len(expected) :]
        assert answered == self.commands, (answered, self.commands)
        self.sock.setblocking(True)
        self.sock.settimeout(10)
        self.client.buf = buf
        return expected.decode().rstrip("\r\n")


KINDS = ["smtp", "smtps", "submission", "pop3", "pop3s"]


def open_session(server: MailServer, kind: str, ip: str) -> Client:
    """A session on listener `kind`, greeted (and past EHLO for SMTP)."""
    port = {
        "smtp": server.smtp_port,
        "smtps": server.smtps_port,
        "submission": server.submission_port,
        "pop3": server.pop3_port,
        "pop3s": server.pop3s_port,
    }[kind]
    c = Client(port, ip, tls=kind.endswith("s") and kind != "submission")
    if kind.startswith("pop3"):
        assert c.line().startswith("+OK")
    else:
        assert c.reply().startswith("220 ")
        c.send("EHLO client.far.test\r\n")
        assert c.reply().startswith("250 ")
    return c


def served_normally(server: MailServer, kind: str, ip: str) -> None:
    c = open_session(server, kind, ip)
    if kind.startswith("pop3"):
        c.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nSTAT\r\nQUIT\r\n")
        assert c.line().startswith("+OK")
        assert c.line().startswith("+OK")
        assert c.line().startswith("+OK 0 ")
        assert c.line().startswith("+OK")
    else:
        c.send("NOOP\r\nQUIT\r\n")
        assert c.reply() == "250 2.0.0 Ok"
        assert c.reply().startswith("221 ")
    c.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_does_not_read_is_not_read_from(start, kind):
    server = start(tls=True)
    c = open_session(server, kind, "127.0.0.31")
    if kind.startswith("pop3"):  # logged in: NOOP answers +OK, and errors have a limit
        c.send(f"USER {BOB}\r\nPASS {BOB_PW}\r\n")
        assert c.line().startswith("+OK") and c.line().startswith("+OK")
    before = rss(server)
    flood = Flood(c)
    flood.push()
    grown = rss(server) - before
    served_normally(server, kind, "127.0.0.32")
    assert flood.sent < SENT_LIMIT, (
        f"the server read {flood.sent / MB:.1f} MB of pipelined NOOPs whose replies "
        f"were not read (RSS +{grown / MB:.0f} MB)"
    )
    assert grown < RSS_LIMIT, f"RSS grew by {grown / MB:.0f} MB for {flood.sent / MB:.1f} MB"

    # Once the client reads, every command is answered, in order, and nothing is lost.
    reply = flood.drain()
    if kind.startswith("pop3"):
        assert reply == "+OK", reply
        c.send("QUIT\r\n")
        assert c.line().startswith("+OK")
    else:
        assert reply == "250 2.0.0 Ok"
        c.send("QUIT\r\n")
        assert c.reply().startswith("221 ")
    c.close()
    served_normally(server, kind, "127.0.0.33")


# --- 4. a session that never reads ends at idle_timeout ------------------------------


def dropped(sock: socket.socket) -> bool:
    """Did the peer reset or close the connection? Asked without reading from it."""
    gone = select.POLLRDHUP | select.POLLERR | select.POLLHUP
    poller = select.poll()
    poller.register(sock, gone)
    if any(events & gone for _, events in poller.poll(0)):
        return True
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0


def test_a_session_that_never_reads_ends_at_idle_timeout(start):
    idle = 3
    server = start(f"[smtp]\nidle_timeout = {idle}\n")
    before = rss(server)
    c = open_session(server, "smtp", "127.0.0.34")
    flood = Flood(c)
    try:
        flood.push(stall=1.0)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the idle timer went off while we were still waiting for the socket
    assert flood.sent < SENT_LIMIT, f"the server read {flood.sent / MB:.1f} MB"
    deadline = flood.last_progress + idle + 5
    while not dropped(c.sock) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dropped(c.sock), (
        f"the connection is still open {time.monotonic() - flood.last_progress:.1f}s "
        f"after the server last read from it (idle_timeout = {idle})"
    )
    c.close()
    assert wait_for(lambda: rss(server) - before < RSS_LIMIT, timeout=5), (
        f"RSS is still {(rss(server) - before) / MB:.0f} MB above where it was"
    )
    served_normally(server, "smtp", "127.0.0.35")


# --- 5. RETR and TOP stream the stored file byte for byte --------------------------


def big_message() -> bytes:
    """About 3 MB in CRLF form: dots at line starts, lines near 998 octets, empty lines."""
    lines = [
        "Subject: streaming test",
        "From: sender@far.test",
        "To: alice@example.test",
        "Message-ID: <streaming@far.test>",
        "",
        ".",
        "..",
        ".first body lines start with dots",
        "",
    ]
    patterns = [
        ".",
        "..",
        "...",
        ". a dot and a space",
        ".." + "d" * 900,
        "x" * 998,  # RFC 5321's longest text line
        "." + "y" * 996,  # 998 once dot-stuffed on the SMTP wire
        "",
        "plain text with trailing spaces   ",
        "\ta tab first",
        "-- ",
        "From the start of a line",
        "z" * 500 + "." + "z" * 100,
    ]
    i = 0
    size = 0
    while size < 3 * MB:
        line = patterns[i % len(patterns)]
        if i % 7 == 0:
            line = f"{i} {line}"[:998]
        lines.append(line)
        size += len(line) + 2
        i += 1
    lines.append(".the last line starts with a dot")
    return ("\r\n".join(lines) + "\r\n").encode()


def stored_wire(path: Path) -> bytes:
    """The stored file as POP3 puts it on the wire: CRLF line ends, ending in one."""
    data = path.read_bytes()
    assert b"\r" not in data  # stored with LF line ends
    wire = data.replace(b"\n", b"\r\n")
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire


def stuffed(wire: bytes) -> bytes:
    lines = wire[:-2].split(b"\r\n")
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)


def top(wire: bytes, count: int) -> bytes:
    head, _, body = wire.partition(b"\r\n\r\n")
    kept = body[:-2].split(b"\r\n")[:count] if body else []
    return head + b"\r\n\r\n" + b"".join(x + b"\r\n" for x in kept)


def read_response(r: Raw, size: int) -> bytes:
    """Exactly `size` octets from `r`, raw."""
    chunks, have = [r.buf], len(r.buf)
    while have < size:
        chunk = r.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(have, size)
        chunks.append(chunk)
        have += len(chunk)
    data = b"".join(chunks)
    r.buf = data[size:]
    return data[:size]


def read_multiline(r: Raw) -> tuple[bytes, bytes]:
    """(first line, the rest up to and including CRLF.CRLF), raw."""
    while b"\r\n" not in r.buf:
        chunk = r.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(r.buf)
        r.buf += chunk
    first, r.buf = r.buf.split(b"\r\n", 1)
    while b"\r\n.\r\n" not in r.buf and not r.buf.startswith(b".\r\n"):
        chunk = r.sock.recv(1 << 20)
        if not chunk:
            raise EOFError(len(r.buf))
        r.buf += chunk
    if r.buf.startswith(b".\r\n"):
        body, r.buf = b".\r\n", r.buf[3:]
    else:
        end = r.buf.index(b"\r\n.\r\n") + 5
        body, r.buf = r.buf[:end], r.buf[end:]
    return first, body


def pop_session(server: MailServer, ip: str) -> Raw:
    r = pop_from(server, ip)
    r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert r.line().startswith("+OK")
    assert r.line().startswith("+OK")
    return r


def assert_same(got: bytes, expected: bytes, what: str) -> None:
    if got != expected:
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        pytest.fail(
            f"{what}: {len(got)} octets, expected {len(expected)}; first difference at {at}: "
            f"got {got[at - 40 : at + 40]!r}, expected {expected[at - 40 : at + 40]!r}"
        )


def test_retr_and_top_stream_the_stored_file_byte_for_byte(start):
    server = start("[smtp]\nmax_message_size = 10000000\n")
    message = big_message()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        assert s.sendmail("sender@far.test", [ALICE], message) == {}
    [path] = server.messages(ALICE)
    wire = stored_wire(path)
    assert len(wire) > 3 * MB
    assert wire.endswith(b"\r\n.the last line starts with a dot\r\n")

    r = pop_session(server, "127.0.0.41")
    r.send("RETR 1\r\n")
    first, body = read_multiline(r)
    assert re.fullmatch(rb"\+OK (\d+) octets", first), first
    assert int(first.split()[1]) == len(wire), (first, len(wire))
    assert_same(body, stuffed(wire) + b".\r\n", "RETR 1")

    for count in (0, 5, 1_000_000):
        r.send(f"TOP 1 {count}\r\n")
        first, body = read_multiline(r)
        assert first.startswith(b"+OK"), first
        assert_same(body, stuffed(top(wire, count)) + b".\r\n", f"TOP 1 {count}")
    r.send("NOOP\r\n")
    assert r.line() == "+OK"
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()


def test_pipelined_retr_without_reading_is_exact_and_bounded(start):
    server = start("[smtp]\nmax_message_size = 10000000\n")
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        assert s.sendmail("sender@far.test", [ALICE], big_message()) == {}
    [path] = server.messages(ALICE)
    wire = stored_wire(path)
    expected = f"+OK {len(wire)} octets\r\n".encode() + stuffed(wire) + b".\r\n"

    r = pop_session(server, "127.0.0.42")
    r.send("NOOP\r\n")  # the mailbox is open and listed before we measure
    assert r.line() == "+OK"
    before = rss(server)
    copies = 20
    r.send("RETR 1\r\n" * copies)  # 60 MB of replies that nobody reads yet
    peak = before
    for _ in range(20):  # the server works on them for a while
        time.sleep(0.1)
        peak = max(peak, rss(server))
    for i in range(copies):
        assert_same(read_response(r, len(expected)), expected, f"copy {i + 1} of RETR 1")
    r.send("NOOP\r\n")
    assert r.line() == "+OK"  # and nothing more came
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()
    assert peak - before < RSS_LIMIT, (
        f"RSS grew by {(peak - before) / MB:.0f} MB with {copies} RETRs of "
        f"{len(wire) / MB:.1f} MB pipelined and not yet read"
    )


def test_retr_and_top_of_a_file_without_a_final_newline(start):
    """A message put into the Maildir by another program, ending without LF and
    with a dot-led last line, still goes out as the stored file in wire form."""
    server = start()
    body = b"".join(f".{i} dotted\n..{i} twice\n{'w' * 990}\n\n".encode() for i in range(300))
    data = b"Subject: dropped in\nFrom: a@far.test\n\n" + body + b".last, no newline"
    wire = data.replace(b"\n", b"\r\n") + b"\r\n"
    new = server.maildir(ALICE) / "new"
    for sub in ("tmp", "new", "cur"):
        (server.maildir(ALICE) / sub).mkdir(parents=True, exist_ok=True)
    (new / f"1700000000.M1P1.elsewhere,S={len(data)},W={len(wire)}").write_bytes(data)
    assert stored_wire(server.messages(ALICE)[0]) == wire

    r = pop_session(server, "127.0.0.43")
    r.send("RETR 1\r\n")
    first, got = read_multiline(r)
    assert first == f"+OK {len(wire)} octets".encode(), first
    assert_same(got, stuffed(wire) + b".\r\n", "RETR 1")
    assert got.endswith(b"\r\n..last, no newline\r\n.\r\n")
    for count in (0, 5):
        r.send(f"TOP 1 {count}\r\n")
        first, got = read_multiline(r)
        assert first.startswith(b"+OK"), first
        assert_same(got, stuffed(top(wire, count)) + b".\r\n", f"TOP 1 {count}")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()


# --- 6. the credential cache forgets a changed or removed password -----------------


def test_a_changed_or_removed_password_is_refused_at_once(start):
    server = start()
    for _ in range(3):  # whatever a cache keeps, it has it now
        assert logs_in(server, ALICE, ALICE_PW) == (True, True)

    ctl(server, "user", "passwd", ALICE, input="a new pw\n")
    assert wait_for(lambda: logs_in(server, ALICE, "a new pw") == (True, True), timeout=5)
    assert logs_in(server, ALICE, ALICE_PW) == (False, False)  # the old one, cached
    assert logs_in(server, ALICE, "a new pw") == (True, True)
    assert logs_in(server, ALICE, ALICE_PW) == (False, False)

    ctl(server, "user", "del", ALICE)
    assert wait_for(lambda: logs_in(server, ALICE, "a new pw") == (False, False), timeout=5)
    assert logs_in(server, ALICE, "a new pw") == (False, False)
    # Bob, untouched, still logs in.
    assert logs_in(server, "bob@other.test", "bob pw") == (True, True)


# --- 7. a state database held locked by another process ----------------------------


def test_a_locked_state_database_delays_only_what_must_write(start):
    """Another process holds the state database's write lock: mail is still taken
    at once (reads do not wait for writers), a right password still logs in, and
    a wrong one, whose failure must be written, gets a temporary refusal, not a hang."""
    server = start()
    path = server.mail_dir / ".state" / "state.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as mailboxctl takes it
    try:
        began = time.monotonic()
        r = smtp_from(server, "127.0.0.41")
        for line in ("MAIL FROM:<friend@far.test>", f"RCPT TO:<{ALICE}>", "DATA"):
            r.send(line + "\r\n")
            assert r.reply()[:1] in "23", line
        r.send("Subject: while locked\r\n\r\nhello\r\n.\r\n")
        assert r.reply().startswith("250 2.0.0 Ok: queued as ")
        assert time.monotonic() - began < 2
        assert smtp_auth(server, "127.0.0.42", ALICE, ALICE_PW) == AUTH_OK

        p = pop_from(server, "127.0.0.43")
        p.send(f"USER {ALICE}\r\nPASS wrong\r\n")
        assert p.line().startswith("+OK")
        assert p.line().startswith("-ERR [SYS/TEMP]")
        assert p.closed()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    pop_login_from(server, "127.0.0.44")
    assert failures_on_record(server, "127.0.0.43") == 0
    assert "database is locked" in server.log()
