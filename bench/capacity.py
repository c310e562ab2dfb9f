"""Capacity benchmarks of issue 9: logins at bcrypt cost 12, stalls and server memory.

Every run of every scenario starts a fresh `twistd -n mailbox` in a temporary home on
free 127.0.0.1 ports, with the code of `--tree` (default: this checkout). Clients come
from many 127/8 source addresses so that per-IP limits do not shape the figures.
Each figure is reported as the median (min-max) of `--runs` runs, with PASS/FAIL
against the issue's target; the exit status is 1 if any target is missed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import os
import resource
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import benchlib

DOMAIN = "example.test"
COST = 12  # the default bcrypt_rounds, and what the targets are set for
MB = 2**20
RSS_CAP = 1536 * MB  # a scenario whose server passes this is aborted (the server killed)
LOGIN_SECONDS = 5.0  # how long each repeat-login loop runs
BURST = 50  # first-time logins at once, each from its own address
TIMEOUT = 60.0  # any one client wait; a 50-login burst takes ~7 s on the old server
FIRST = [f"first{i:02d}" for i in range(BURST)]
SPECIAL = ["repeat", "noop", "sink", "big1m", "big20m"]

# Client addresses: each use gets its own block of loopback indexes, so no two
# clients of one run share an address unless a scenario means them to.
IP_BURST, IP_REPEAT, IP_PROBE, IP_MISC, IP_IDLE = 0, 100, 120, 130, 200


# --- accounts ------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    local: str
    password: bytes
    hashed: bytes

    @property
    def address(self) -> str:
        return f"{self.local}@{DOMAIN}"


@functools.cache
def accounts() -> dict[str, Account]:
    """Every account, hashed at cost 12 once per process (~0.25 s each).

    The hashes run in threads: bcrypt releases the GIL, so this uses every core.
    """
    names = SPECIAL + FIRST
    passwords = [f"bench password {name}".encode() for name in names]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        hashes = list(pool.map(lambda pw: bcrypt.hashpw(pw, bcrypt.gensalt(COST)), passwords))
    return {n: Account(n, pw, h) for n, pw, h in zip(names, passwords, hashes, strict=True)}


def checkpw_seconds(times: int = 5) -> float:
    """The median time of one bcrypt.checkpw at cost 12 in this process, now."""
    account = accounts()["repeat"]
    timings = []
    for _ in range(times):
        t0 = time.perf_counter()
        bcrypt.checkpw(account.password, account.hashed)
        timings.append(time.perf_counter() - t0)
    return statistics.median(timings)


# --- messages --------------------------------------------------------------------


def message(size: int, subject: str) -> bytes:
    """A plain-text message of about `size` bytes with LF line ends, as Maildir keeps it.

    Every 40th body line starts with a dot (and one is a lone dot) so that the wire
    form POP3 sends has byte-stuffing to get right.
    """
    head = f"From: bench@far.test\nTo: user@{DOMAIN}\nSubject: {subject}\n\n".encode()
    lines, total, n = [head], len(head), 0
    while total < size:
        n += 1
        if n % 40 == 0:
            line = b".\n" if n % 400 == 0 else b".dotted line %d of the capacity bench\n" % n
        else:
            line = b"line %08d: the quick brown fox jumps over the lazy dog 0123456789\n" % n
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def wire_form(stored: bytes) -> bytes:
    """What RETR must send for a stored message: CRLF, dot-stuffed, then '.' CRLF.

    Written here from RFC 1939, not imported from the server, so that it checks it.
    """
    data = stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def fill_maildir(maildir: Path, messages: list[bytes]) -> list[Path]:
    """Store `messages` straight into `maildir`/new, named as the server names them.

    The name carries S= (bytes on disk) and W= (bytes on the wire), see README.
    """
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for i, data in enumerate(messages, 1):
        wire = len(data.replace(b"\n", b"\r\n"))
        path = maildir / "new" / f"{1700000000 + i}.M{i}P{os.getpid()}.bench,S={len(data)},W={wire}"
        path.write_bytes(data)
        paths.append(path)
    return paths


# --- the server ------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    home: Path
    smtp: int
    submission: int
    pop3: int
    rss: benchlib.RssSampler

    def maildir(self, local: str) -> Path:
        return self.home / "mailbox" / DOMAIN / local


def write_home(home: Path, ports: list[int]) -> None:
    """The config of the issue: SMTP, submission and POP3 on; nobody trusted; cost 12."""
    smtp, submission, pop3 = ports
    ini = f"""[mailbox]
hostname = mail.example.test
domains = {DOMAIN}
trusted_networks =
bcrypt_rounds = {COST}
[smtp]
listen = tcp:{smtp}:interface=127.0.0.1
submission = tcp:{submission}:interface=127.0.0.1
[pop3]
listen = tcp:{pop3}:interface=127.0.0.1
[relay]
pop_before_smtp_ttl = 0
[inbound]
checks = no
"""
    lines = [f"{a.address}:{a.hashed.decode()}\n" for a in accounts().values()]
    (home / "etc").mkdir()
    (home / "etc" / "mailbox.ini").write_text(ini)
    (home / "etc" / "accounts").write_text("".join(lines))
    (home / "etc" / "aliases").write_text("")


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(benchlib.free_port())
    return sorted(ports)


@contextlib.contextmanager
def server(tree: Path, run: Run, mail: dict[str, list[bytes]] | None = None) -> Iterator[Server]:
    """A fresh twistd in a temporary home, its RSS sampled throughout; removed after."""
    home = Path(tempfile.mkdtemp(prefix="mailbox-capacity-"))
    try:
        ports = free_ports(3)
        write_home(home, ports)
        for local, messages in (mail or {}).items():
            fill_maildir(home / "mailbox" / DOMAIN / local, messages)
        proc = benchlib.spawn_twistd(home, tree)
        sampler = benchlib.RssSampler(proc.pid, cap=RSS_CAP)
        try:
            benchlib.await_ports(proc, ports)
            sampler.start()
            yield Server(proc, home, *ports, sampler)
        finally:
            sampler.stop()
            code = benchlib.stop_twistd(proc)
            check_log(home, code, sampler, run)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def check_log(home: Path, code: int | None, sampler: benchlib.RssSampler, run: Run) -> None:
    """Note what the server's end says: the RSS cap, an odd exit, a traceback."""
    log = (home / "twistd.log").read_text(errors="replace")
    if sampler.capped.is_set():
        run.notes.append(f"aborted: server RSS passed {RSS_CAP // MB} MB, killed")
    elif code not in (0, -15):
        run.notes.append(f"twistd exit status {code}; log ends: {log[-400:]!r}")
    if "Traceback" in log:
        tail = log[log.rindex("Traceback") :][:600]
        run.notes.append(f"twistd log has a traceback: {tail!r}")


# --- clients -----------------------------------------------------------------------


class Client:
    """A line-at-a-time SMTP or POP3 client on a blocking socket."""

    def __init__(self, index: int, port: int) -> None:
        self.sock = benchlib.connect_from(index, port, TIMEOUT)
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(256 * 1024)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def until(self, marker: bytes) -> bytes:
        """Everything up to and including `marker` (searching only what is new)."""
        start = 0
        while (end := self.buf.find(marker, start)) < 0:
            start = max(0, len(self.buf) - len(marker) + 1)
            self._fill()
        data = bytes(self.buf[: end + len(marker)])
        del self.buf[: end + len(marker)]
        return data

    def smtp_reply(self) -> int:
        while (line := self.line())[3:4] == b"-":
            pass
        return int(line[:3])

    def smtp(self, command: bytes) -> int:
        self.sock.sendall(command)
        return self.smtp_reply()

    def pop(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        return self.line()

    def close(self) -> None:
        self.sock.close()


def expect(ok: bool, what: str, reply: object) -> None:
    if not ok:
        raise RuntimeError(f"{what}: {reply!r}")


def smtp_session(index: int, port: int) -> Client:
    client = Client(index, port)
    expect(client.smtp_reply() == 220, "SMTP greeting", client.buf)
    expect(client.smtp(b"EHLO bench.test\r\n") == 250, "EHLO", client.buf)
    return client


def pop3_login(client: Client, account: Account) -> bytes:
    """USER and PASS on an open POP3 session; the reply to PASS."""
    reply = client.pop(f"USER {account.address}\r\n".encode())
    if not reply.startswith(b"+OK"):
        return reply
    return client.pop(b"PASS " + account.password + b"\r\n")


def pop3_session(index: int, port: int, account: Account) -> Client:
    client = Client(index, port)
    expect(client.line().startswith(b"+OK"), "POP3 greeting", client.buf)
    reply = pop3_login(client, account)
    expect(reply.startswith(b"+OK"), "POP3 login", reply)
    return client


def pop3_login_once(index: int, port: int, account: Account) -> bool:
    """Connect, USER/PASS, QUIT: True if the login succeeded."""
    client = Client(index, port)
    try:
        client.line()
        ok = pop3_login(client, account).startswith(b"+OK")
        client.pop(b"QUIT\r\n")
        return ok
    finally:
        client.close()


def smtp_auth_once(index: int, port: int, account: Account) -> bool:
    """Connect, EHLO, AUTH PLAIN, QUIT: True if the login succeeded."""
    client = smtp_session(index, port)
    try:
        token = base64.b64encode(b"\0" + account.address.encode() + b"\0" + account.password)
        ok = client.smtp(b"AUTH PLAIN " + token + b"\r\n") == 235
        client.smtp(b"QUIT\r\n")
        return ok
    finally:
        client.close()


def retr(client: Client, number: int) -> bytes:
    """RETR `number`, read to the end: the body with its terminating '.' CRLF."""
    status = client.pop(f"RETR {number}\r\n".encode())
    expect(status.startswith(b"+OK"), "RETR", status)
    return client.until(b"\r\n.\r\n")


def greets(index: int, port: int) -> bool:
    """Does a fresh connection get a greeting within 10 s?"""
    try:
        with benchlib.connect_from(index, port, 10) as sock:
            return sock.recv(512)[:1] in (b"2", b"+")
    except OSError:
        return False


# --- results ---------------------------------------------------------------------


@dataclass
class Run:
    """One run of a scenario: its figures, by name, and anything odd seen."""

    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    op: str
    limit: float

    def met(self, value: float) -> bool:
        return {
            ">=": value >= self.limit,
            "<=": value <= self.limit,
            "<": value < self.limit,
            "==": value == self.limit,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.op} {self.limit:g}"


# --- 1. repeat-logins ------------------------------------------------------------


def login_rate(login: Callable[[int], bool], run: Run, what: str) -> float:
    """Sequential logins for LOGIN_SECONDS after one untimed first login; per second.

    The first login is the one that must hash: the figure is about the repeats.
    Logins rotate over ten source addresses.
    """
    expect(login(IP_REPEAT), f"{what}: first login", "refused")
    ok = refused = 0
    start = time.monotonic()
    while time.monotonic() - start < LOGIN_SECONDS:
        if login(IP_REPEAT + 1 + (ok + refused) % 10):
            ok += 1
        else:
            refused += 1
    if refused:
        run.notes.append(f"{what}: {refused} of {ok + refused} repeat logins refused")
    return ok / (time.monotonic() - start)


def repeat_logins(tree: Path, run: Run) -> None:
    account = accounts()["repeat"]
    with server(tree, run) as srv:
        pop3 = login_rate(lambda i: pop3_login_once(i, srv.pop3, account), run, "POP3")
        smtp = login_rate(lambda i: smtp_auth_once(i, srv.submission, account), run, "SMTP")
    hash_s = checkpw_seconds()
    run.values["checkpw s"] = hash_s
    run.values["POP3 logins/s"] = pop3
    run.values["SMTP AUTH logins/s"] = smtp
    run.values["POP3 logins/s x checkpw s"] = pop3 * hash_s
    run.values["SMTP logins/s x checkpw s"] = smtp * hash_s


# --- 2. first-logins -------------------------------------------------------------


def login_burst(srv: Server, run: Run) -> float:
    """BURST accounts log in over POP3 at once, each from its own address.

    Returns the successful logins per second of wall time (start to the last +OK).
    """
    barrier = threading.Barrier(BURST + 1)
    ends: list[float] = []
    refusals: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        try:
            client = Client(IP_BURST + i, srv.pop3)
            client.line()
            reply = pop3_login(client, accounts()[FIRST[i]])
            if reply.startswith(b"+OK"):
                ends.append(time.monotonic())
                client.pop(b"QUIT\r\n")
            else:
                refusals.append(reply.decode(errors="replace"))
            client.close()
        except OSError as e:
            refusals.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    if refusals:
        run.notes.append(f"{len(refusals)} of {BURST} first logins failed, e.g. {refusals[0]!r}")
    wall = (max(ends) if ends else time.monotonic()) - start
    return len(ends) / wall


def first_logins(tree: Path, run: Run) -> None:
    with server(tree, run) as srv:
        rate = login_burst(srv, run)
    hash_s = checkpw_seconds()
    run.values["logins/s"] = rate
    run.values["1 thread checkpw/s"] = 1 / hash_s
    run.values["ratio"] = rate * hash_s


# --- 3. burst-latency --------------------------------------------------------------


class Probe(threading.Thread):
    """Repeats `step` (one timed exchange, returning its seconds) until stopped."""

    def __init__(self, step: Callable[[], float], pause: float) -> None:
        super().__init__(daemon=True)
        self.step, self.pause = step, pause
        self.latencies: list[float] = []
        self.error: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.latencies.append(self.step())
                self.done.wait(self.pause)
        except (OSError, RuntimeError, ValueError) as e:
            self.error = repr(e)


def deliver(client: Client, data: bytes) -> float:
    """One message on an open session; the seconds from the final '.' to its 250."""
    expect(client.smtp(b"MAIL FROM:<bench@far.test>\r\n") == 250, "MAIL", client.buf)
    expect(client.smtp(f"RCPT TO:<sink@{DOMAIN}>\r\n".encode()) == 250, "RCPT", client.buf)
    expect(client.smtp(b"DATA\r\n") == 354, "DATA", client.buf)
    client.sock.sendall(data.replace(b"\n", b"\r\n"))
    t0 = time.perf_counter()
    code = client.smtp(b".\r\n")
    elapsed = time.perf_counter() - t0
    expect(code == 250, "end of DATA", code)
    return elapsed


def timed(exchange: Callable[[], bool], what: str) -> Callable[[], float]:
    def step() -> float:
        t0 = time.perf_counter()
        ok = exchange()
        elapsed = time.perf_counter() - t0
        expect(ok, what, "failed")
        return elapsed

    return step


def start_probes(srv: Server) -> dict[str, Probe]:
    """The delivering client and the two NOOP sessions, all opened before the burst."""
    body = message(2048, "burst")
    sender = smtp_session(IP_PROBE, srv.smtp)
    smtp = smtp_session(IP_PROBE + 1, srv.smtp)
    pop3 = pop3_session(IP_PROBE + 2, srv.pop3, accounts()["noop"])
    probes = {
        "deliver": Probe(lambda: deliver(sender, body), 0),
        "SMTP NOOP": Probe(timed(lambda: smtp.smtp(b"NOOP\r\n") == 250, "SMTP NOOP"), 0.01),
        "POP3 NOOP": Probe(timed(lambda: pop3.pop(b"NOOP\r\n").startswith(b"+OK"), "NOOP"), 0.01),
    }
    for probe in probes.values():
        probe.start()
    return probes


def burst_latency(tree: Path, run: Run) -> None:
    with server(tree, run) as srv:
        probes = start_probes(srv)
        time.sleep(0.2)  # the deliveries are under way when the burst starts
        run.values["burst logins/s"] = login_burst(srv, run)
        for probe in probes.values():
            probe.done.set()
        for probe in probes.values():
            probe.join(TIMEOUT)
        stored = len(list((srv.maildir("sink") / "new").iterdir()))
    for name, probe in probes.items():
        if probe.error:
            run.notes.append(f"{name}: {probe.error}")
    delivered = probes["deliver"].latencies
    run.values["messages delivered"] = len(delivered)
    run.values["250 after DATA p99 ms"] = benchlib.percentile(delivered, 99) * 1000
    run.values["250 after DATA max ms"] = max(delivered) * 1000
    for name in ("SMTP NOOP", "POP3 NOOP"):
        run.values[f"{name} p99 ms"] = benchlib.percentile(probes[name].latencies, 99) * 1000
    if stored < len(delivered):
        run.notes.append(f"only {stored} of {len(delivered)} accepted messages in the Maildir")


# --- 4. pipeline-memory ------------------------------------------------------------


def flood(
    sock: socket.socket, command: bytes, total: int, sampler: benchlib.RssSampler
) -> tuple[int, float]:
    """Send `command` over and over, `total` bytes, never reading.

    Returns the bytes the server's side accepted and the seconds until the last of
    them was accepted (about 20 if the server kept reading, less if it stopped).

    Non-blocking, so a server that stops reading stops the client: it gives up when
    the socket has stayed full for 3 s, after 20 s, or when the RSS cap struck.
    """
    chunk = command * (64 * 1024 // len(command))
    sock.setblocking(False)
    sent, start = 0, time.monotonic()
    progress = start
    while sent < total and time.monotonic() - start < 20 and not sampler.capped.is_set():
        if not select.select([], [sock], [], 0.2)[1]:
            if time.monotonic() - progress > 3:
                break
            continue
        pos = sent % len(chunk)
        with contextlib.suppress(BlockingIOError):
            sent += sock.send(chunk[pos : pos + total - sent])
            progress = time.monotonic()
    return sent, progress - start


def smtp_noop_flood(tree: Path, run: Run) -> None:
    """(a) 50 MB of NOOP from an unauthenticated client that reads nothing."""
    with server(tree, run) as srv:
        warm = smtp_session(IP_MISC, srv.smtp)
        warm.smtp(b"NOOP\r\n")
        warm.smtp(b"QUIT\r\n")
        base = srv.rss.baseline()
        client = Client(IP_MISC + 1, srv.smtp)
        client.line()
        sent, seconds = flood(client.sock, b"NOOP\r\n", 50 * MB // 6 * 6, srv.rss)
        srv.rss.settle()
        run.values["SMTP NOOP: RSS growth MB"] = (srv.rss.peak - base) / MB
        run.values["SMTP NOOP: MB sent"] = sent / MB
        run.values["SMTP NOOP: s to the last byte sent"] = seconds
        client.close()
        run.values["SMTP NOOP: fresh connection answered"] = float(greets(IP_MISC + 2, srv.smtp))


def pop3_retr_flood(tree: Path, run: Run) -> None:
    """(b) 500 pipelined RETR of a 1 MB message, logged in, reading nothing."""
    account = accounts()["big1m"]
    with server(tree, run, {"big1m": [message(MB, "one megabyte")]}) as srv:
        warm = pop3_session(IP_MISC, srv.pop3, account)
        retr(warm, 1)
        warm.pop(b"QUIT\r\n")
        client = pop3_session(IP_MISC + 1, srv.pop3, account)
        base = srv.rss.baseline()
        sent = flood(client.sock, b"RETR 1\r\n", 500 * 8, srv.rss)[0]
        srv.rss.settle(quiet=2.0)
        run.values["POP3 RETR: RSS growth MB"] = (srv.rss.peak - base) / MB
        run.values["POP3 RETR: bytes sent"] = sent
        client.close()
        run.values["POP3 RETR: fresh connection answered"] = float(greets(IP_MISC + 2, srv.pop3))


def pipeline_memory(tree: Path, run: Run) -> None:
    smtp_noop_flood(tree, run)  # a fresh server each, so (a) leaves nothing for (b)
    pop3_retr_flood(tree, run)


# --- 5. retr-memory -----------------------------------------------------------------


def retr_memory(tree: Path, run: Run) -> None:
    account = accounts()["big20m"]
    mail = {"big20m": [message(2048, "small"), message(20 * MB, "twenty megabytes")]}
    with server(tree, run, mail) as srv:
        warm = pop3_session(IP_MISC, srv.pop3, account)
        retr(warm, 1)  # the small one: warms RETR without touching the big file
        warm.pop(b"QUIT\r\n")
        client = pop3_session(IP_MISC + 1, srv.pop3, account)
        base = srv.rss.baseline()
        t0 = time.monotonic()
        received = retr(client, 2)
        run.values["RETR seconds"] = time.monotonic() - t0
        srv.rss.settle(quiet=0.5)
        run.values["RSS growth MB"] = (srv.rss.peak - base) / MB
        # The file as it is on disk now (new/ or cur/): what RETR must have sent.
        stored = next(srv.maildir("big20m").glob("*/*.M2P*")).read_bytes()
        run.values["bytes match stored file"] = float(received == wire_form(stored))
        client.close()


# --- 6. idle-sessions ------------------------------------------------------------------


def idle_sessions(tree: Path, run: Run) -> None:
    """500 SMTP and 500 POP3 sessions that read their greeting, then wait."""
    with server(tree, run) as srv:
        run.values["RSS before MB"] = srv.rss.baseline() / MB
        clients = []
        try:
            for i in range(500):
                clients.append(Client(IP_IDLE + i, srv.smtp))
                expect(clients[-1].line().startswith(b"220"), "SMTP greeting", clients[-1].buf)
                clients.append(Client(IP_IDLE + 500 + i, srv.pop3))
                expect(clients[-1].line().startswith(b"+OK"), "POP3 greeting", clients[-1].buf)
            time.sleep(1.0)  # the peak while all of them are open
            run.values["RSS with 1000 sessions MB"] = srv.rss.peak / MB
        finally:
            run.values["sessions open"] = len(clients)
            for client in clients:
                client.close()


# --- running and reporting -------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Path, Run], None]
    targets: dict[str, Target]


SCENARIOS = {
    "repeat-logins": Scenario(
        repeat_logins,
        {
            "POP3 logins/s x checkpw s": Target(">=", 20),
            "SMTP logins/s x checkpw s": Target(">=", 20),
        },
    ),
    "first-logins": Scenario(first_logins, {"ratio": Target(">=", 1.5)}),
    "burst-latency": Scenario(
        burst_latency,
        {
            "250 after DATA p99 ms": Target("<=", 100),
            "SMTP NOOP p99 ms": Target("<", 20),
            "POP3 NOOP p99 ms": Target("<", 20),
        },
    ),
    "pipeline-memory": Scenario(
        pipeline_memory,
        {
            "SMTP NOOP: RSS growth MB": Target("<", 20),
            "SMTP NOOP: fresh connection answered": Target("==", 1),
            "POP3 RETR: RSS growth MB": Target("<", 20),
            "POP3 RETR: fresh connection answered": Target("==", 1),
        },
    ),
    "retr-memory": Scenario(
        retr_memory,
        {"RSS growth MB": Target("<", 5), "bytes match stored file": Target("==", 1)},
    ),
    "idle-sessions": Scenario(
        idle_sessions,
        {"RSS with 1000 sessions MB": Target("<", 100), "sessions open": Target("==", 1000)},
    ),
}


def run_scenario(name: str, tree: Path, runs: int) -> list[Run]:
    results = []
    for i in range(runs):
        run = Run()
        try:
            SCENARIOS[name].run(tree, run)
        except Exception as e:  # a failing server must not stop the other scenarios
            run.notes.append(f"error: {e!r} at {traceback.extract_tb(e.__traceback__)[-1][:3]}")
        figures = ", ".join(f"{k} {number(v)}" for k, v in run.values.items())
        # Other work on the machine skews every figure here: show how busy it was.
        load = os.getloadavg()[0]
        print(f"{name} run {i + 1}: {figures} (load average {load:.2f})", flush=True)
        for note in run.notes:
            print(f"{name} run {i + 1}: NOTE {note}", flush=True)
        results.append(run)
    return results


def number(value: float) -> str:
    """Three significant figures, but never an exponent (11100 ms, not 1.11e+04)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def summarise(name: str, results: list[Run]) -> list[tuple[str, ...]]:
    """One row a figure: scenario, figure, median (min-max), target, verdict."""
    targets = SCENARIOS[name].targets
    metrics = list(dict.fromkeys([*targets, *(k for r in results for k in r.values)]))
    rows = []
    for metric in metrics:
        values = [r.values[metric] for r in results if metric in r.values]
        target = targets.get(metric)
        figure = benchlib.spread(values, number) if values else "missing"
        if target is None:
            verdict = ""
        elif len(values) < len(results):
            verdict = "FAIL (missing)"
        else:
            verdict = "PASS" if target.met(statistics.median(values)) else "FAIL"
        rows.append((name, metric, figure, str(target or ""), verdict))
    return rows


def describe_tree(tree: Path) -> str:
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    state = " with local changes" if dirty.stdout.strip() else ""
    return f"{tree} at {head.stdout.strip() or 'unknown commit'}{state}"


def raise_file_limit() -> None:
    """1,000 idle sessions need more descriptors than a default soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("scenarios", nargs="*", metavar="NAME", help=f"of {', '.join(SCENARIOS)}")
    p.add_argument("--runs", type=int, default=3, help="runs of each scenario (default 3)")
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = p.parse_args()
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenario {', '.join(sorted(unknown))}")
    names = args.scenarios or list(SCENARIOS)
    tree = args.tree.resolve()
    raise_file_limit()
    print(f"server code: {describe_tree(tree)}; {os.cpu_count()} CPUs", flush=True)
    t0 = time.monotonic()
    accounts()
    print(f"hashed {len(accounts())} accounts at cost {COST} in {time.monotonic() - t0:.1f} s")
    rows = [row for name in names for row in summarise(name, run_scenario(name, tree, args.runs))]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"\nmedian (min-max) of {args.runs} runs:")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, [*widths, 0], strict=True)).rstrip())
    print(f"command: cd {shlex.quote(os.getcwd())} && {shlex.join(sys.orig_argv)}")
    if any(row[4].startswith("FAIL") for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
