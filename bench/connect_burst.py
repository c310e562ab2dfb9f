"""Connections opened back to back: how long until every one has its greeting.

    python bench/connect_burst.py [-n 1000] [-r 5] [--tree PATH]

Each run starts a fresh `twistd -n mailbox` (the code of `--tree`, default this
checkout) on a free 127.0.0.1 port, opens `-n` SMTP connections at once from
127.0.0.1 (a trusted network, so the per-address cap does not apply), and
times from the first connect until the last `220` greeting has arrived. A
listen backlog too small for the burst shows here: the kernel drops the SYNs
it cannot queue, and each costs its client a one-second retransmission.
"""

from __future__ import annotations

import argparse
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def burst(port: int, count: int, timeout: float = 60) -> tuple[float, int]:
    """Seconds from the first connect to the last greeting of `count`
    connections, and how many were greeted (all, unless `timeout` passed)."""
    sel = selectors.DefaultSelector()
    socks = []
    started = time.perf_counter()
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_READ, b"")
        socks.append(s)
    waiting = count
    deadline = started + timeout
    try:
        while waiting:
            left = deadline - time.perf_counter()
            if left <= 0:
                return timeout, count - waiting
            for key, _ in sel.select(left):
                s = key.fileobj
                got = key.data + s.recv(4096)  # type: ignore[union-attr]
                if not got or b"\r\n" in got:
                    if not got.startswith(b"220 "):
                        raise RuntimeError(f"not a greeting: {got!r}")
                    sel.unregister(s)
                    waiting -= 1
                else:
                    sel.modify(s, selectors.EVENT_READ, got)
        return time.perf_counter() - started, count
    finally:
        for s in socks:
            s.close()
        sel.close()


def one_run(tree: Path, count: int) -> tuple[float, int]:
    home = Path(tempfile.mkdtemp(prefix="mailbox-burst-"))
    port = benchlib.free_port()
    ini = (
        "[mailbox]\nhostname = mail.example.test\ndomains = example.test\n"
        f"[smtp]\nlisten = tcp:{port}:interface=127.0.0.1\nsubmission =\n[pop3]\nlisten =\n"
    )
    (home / "etc").mkdir()
    for name, text in (("accounts", ""), ("aliases", ""), ("mailbox.ini", ini)):
        (home / "etc" / name).write_text(text)
    proc = benchlib.spawn_twistd(home, tree)
    try:
        benchlib.await_ports(proc, [port])
        time.sleep(0.5)  # let the start-up settle
        return burst(port, count)
    finally:
        benchlib.stop_twistd(proc)
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=1000, help="connections a run")
    p.add_argument("-r", type=int, default=5, help="runs")
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    args = p.parse_args()
    times = []
    for i in range(args.r):
        t, greeted = one_run(args.tree.resolve(), args.n)
        times.append(t)
        if greeted < args.n:
            print(f"run {i + 1}: only {greeted} of {args.n} greeted in {t:.0f} s", flush=True)
        else:
            print(f"run {i + 1}: {args.n} connections greeted in {t:.2f} s", flush=True)
    print(
        f"median {statistics.median(times):.2f} s [{min(times):.2f}-{max(times):.2f}] "
        f"for {args.n} connections opened back to back ({args.r} runs, tree {args.tree})"
    )


if __name__ == "__main__":
    sys.exit(main())
