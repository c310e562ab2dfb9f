"""Cluster throughput: ONE front end on SQLite state against TWO front ends on
one machine sharing one mail_dir and one Redis, the load split evenly across
the two. SMTP with Postfix's smtp-source; POP3 as login+STAT+RETR all+QUIT
sessions, one account per concurrent client. Rounds interleave the two setups.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import benchlib
from capacity import DOMAIN, Account, Client, expect, fill_maildir, message, pop3_login, retr

RCPT = f"user@{DOMAIN}"


def make_accounts(count: int) -> list[Account]:
    return [
        Account(f"pop{i}", b"bench pw", bcrypt.hashpw(b"bench pw", bcrypt.gensalt(4)))
        for i in range(count)
    ]


def write_home(home: Path, node: str, state: str, ports: list[int], first: Path | None) -> None:
    smtp, pop3 = ports
    mailbox = f"[mailbox]\nhostname = mail.example.test\ndomains = {DOMAIN}\nbcrypt_rounds = 4\n"
    if first is not None:
        mailbox += f"mail_dir = {first / 'mailbox'}\n"
        mailbox += f"accounts = {first / 'etc/accounts'}\naliases = {first / 'etc/aliases'}\n"
    ini = mailbox + f"[smtp]\nlisten = tcp:{smtp}:interface=127.0.0.1\nsubmission =\n"
    ini += f"[pop3]\nlisten = tcp:{pop3}:interface=127.0.0.1\n[inbound]\nchecks = no\n"
    (home / "etc").mkdir(parents=True)
    (home / "etc" / "mailbox.ini").write_text(ini + f"[state]\nnode = {node}\n{state}")


@contextlib.contextmanager
def redis_server(home: Path) -> Iterator[str]:
    port = benchlib.free_port()
    (home / "redis").mkdir()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(home / "redis")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        benchlib.wait_listening(port, proc, "redis-server", None)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def cluster(two: bool, users: list[Account], mail: int, size: int) -> Iterator[tuple]:
    """Fresh front end(s), `mail` messages in each POP3 mailbox: (RCPT's new/, [[smtp, pop3]..])."""
    root = Path(tempfile.mkdtemp(prefix="mailbox-cluster-"))
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        with contextlib.ExitStack() as stack:
            if two:
                state = f"backend = redis\nredis_url = {stack.enter_context(redis_server(root))}\n"
            else:
                state = "backend = sqlite\n"
            first, ports = root / "a", []
            for node in ("a", "b") if two else ("a",):
                ports.append([benchlib.free_port(), benchlib.free_port()])
                home = root / node
                write_home(home, node, state, ports[-1], None if node == "a" else first)
                if node == "a":
                    lines = [f"{u.address}:{u.hashed.decode()}\n" for u in users]
                    hashed = bcrypt.hashpw(b"bench pw", bcrypt.gensalt(4)).decode()
                    (home / "etc" / "accounts").write_text(f"{RCPT}:{hashed}\n" + "".join(lines))
                    (home / "etc" / "aliases").write_text("")
                    for u in users:
                        msgs = [message(size, f"{u.local} {i}") for i in range(mail)]
                        fill_maildir(home / "mailbox" / DOMAIN / u.local, msgs)
                procs.append(
                    (benchlib.spawn_twistd(home, Path(__file__).resolve().parent.parent), home)
                )
                benchlib.await_ports(procs[-1][0], ports[-1])
            try:
                yield first / "mailbox" / DOMAIN / "user" / "new", ports
            finally:
                for proc, home in procs:
                    code = benchlib.stop_twistd(proc)
                    log = (home / "twistd.log").read_text(errors="replace")
                    if code not in (0, -15) or "Traceback" in log:
                        sys.exit(f"bench: twistd {home.name} exit {code}; log ends:\n{log[-3000:]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def smtp_rate(tool: str, ports: list[list[int]], messages: int, sessions: int) -> float:
    """All front ends at once, each sent messages/len(ports) over sessions/len(ports)."""
    n = len(ports)
    procs = []
    t0 = time.perf_counter()
    for smtp, _pop3 in ports:
        cmd = [tool, "-s", str(sessions // n), "-m", str(messages // n), "-l", "1024"]
        procs.append(subprocess.Popen([*cmd, "-f", "s@far.test", "-t", RCPT, f"127.0.0.1:{smtp}"]))
    if any(p.wait() != 0 for p in procs):
        sys.exit("bench: smtp-source failed")
    return messages // n * n / (time.perf_counter() - t0)


def pop3_sessions(index: int, port: int, user: Account, count: int, mail: int) -> None:
    for _ in range(count):
        client = Client(index, port)
        try:
            expect(client.line().startswith(b"+OK"), "POP3 greeting", client.buf)
            expect((reply := pop3_login(client, user)).startswith(b"+OK"), "login", reply)
            stat = client.pop(b"STAT\r\n")
            expect(stat.split()[1:2] == [str(mail).encode()], "STAT", stat)
            for number in range(1, mail + 1):
                retr(client, number)
            expect(client.pop(b"QUIT\r\n").startswith(b"+OK"), "QUIT", client.buf)
        finally:
            client.close()


def pop3_rate(ports: list[list[int]], users: list[Account], count: int, mail: int) -> float:
    """Sessions a second: client i (its own account) on front end i % len(ports)."""
    with ThreadPoolExecutor(len(users)) as pool:
        t0 = time.perf_counter()
        jobs = [
            pool.submit(pop3_sessions, i, ports[i % len(ports)][1], u, count, mail)
            for i, u in enumerate(users)
        ]
        for job in jobs:
            job.result()
    return len(users) * count / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-r", "--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("-m", "--messages", type=int, default=1000, help="SMTP messages a run")
    p.add_argument("-s", "--sessions", type=int, default=10, help="parallel SMTP sessions")
    p.add_argument("-c", "--clients", type=int, default=6, help="POP3 clients (accounts)")
    p.add_argument("-p", "--pop-sessions", type=int, default=50, help="POP3 sessions a client")
    p.add_argument("-n", "--mail", type=int, default=10, help="messages in each POP3 mailbox")
    p.add_argument("-l", "--length", type=int, default=2048, help="bytes a POP3 message")
    args = p.parse_args()
    tool = shutil.which("smtp-source", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if tool is None or shutil.which("redis-server") is None:
        sys.exit("bench: needs smtp-source (postfix) and redis-server")
    users = make_accounts(args.clients)
    rates: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for two in (False, True) if r % 2 == 0 else (True, False):
            with cluster(two, users, args.mail, args.length) as (new, ports):
                smtp = smtp_rate(tool, ports, args.messages, args.sessions)
                sent = args.messages // len(ports) * len(ports)
                expect(len(list(new.iterdir())) == sent, "stored", f"{sent} sent")
                pop3 = pop3_rate(ports, users, args.pop_sessions, args.mail)
            rates.setdefault(("SMTP msgs/s", two), []).append(smtp)
            rates.setdefault(("POP3 sessions/s", two), []).append(pop3)
            name = "two redis" if two else "one sqlite"
            print(f"round {r + 1} {name}: SMTP {smtp:.0f} msgs/s, POP3 {pop3:.1f} sessions/s")

    def fmt(v: list[float]) -> str:
        return f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"

    for what in ("SMTP msgs/s", "POP3 sessions/s"):
        one, two = rates[(what, False)], rates[(what, True)]
        ratio = statistics.median(two) / statistics.median(one)
        print(f"{what}: one sqlite {fmt(one)}, two redis {fmt(two)}, ratio {ratio:.2f}x")
    print(f"command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
