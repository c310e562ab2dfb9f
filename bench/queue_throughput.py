"""Outbound queue throughput: smtp-source -> a real `twistd mailbox` -> smtp-sink.

The server relays everything to Postfix's `smtp-sink` as its smarthost; the
rate is messages from the first one accepted until the queue directory holds
no entry, per second. Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib

SENDER = "sender@example.test"
RCPT = "user@far.test"  # not local: relayed, since 127.0.0.1 is a trusted network


def start_server(home: Path, port: int, sink_port: int, workers: str) -> subprocess.Popen:
    return benchlib.start_server(
        home,
        port,
        mailbox=f"trusted_networks = 127.0.0.0/8\nworkers = {workers}\n",
        sections=f"[relay]\nsmarthost = 127.0.0.1:{sink_port}\n",
    )


def entries(queue: Path) -> int:
    """Queued messages: envelopes and message files (corrupt/ and .flush aside)."""
    try:
        return sum(1 for e in os.scandir(queue) if e.name.endswith((".json", ".msg")))
    except FileNotFoundError:
        return 0


def one_run(cmd: list[str], queue: Path, deadline: float) -> tuple[float, float, float]:
    """(seconds from the first acceptance to an empty queue, seconds for smtp-source
    to finish, seconds of drain after it finished)."""
    first: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # the first accepted message shows up as a queue file
        while not stop.is_set():
            if entries(queue):
                first.append(time.perf_counter())
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        stop.set()
        sys.exit(f"bench: FAILED: {' '.join(cmd)} failed")
    sent = time.perf_counter()
    stop.set()
    watcher.join()
    start = first[0] if first else t0
    while entries(queue):
        if time.perf_counter() > deadline:
            sys.exit(f"bench: FAILED: {entries(queue)} queue files left after the time limit")
        time.sleep(0.01)
    end = time.perf_counter()
    return end - start, sent - t0, end - sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-m", "--messages", type=int, default=2000, help="messages per run")
    p.add_argument("-s", "--sessions", type=int, default=10, help="parallel SMTP sessions in")
    p.add_argument("-l", "--length", type=int, default=1024, help="payload bytes a message")
    p.add_argument("-r", "--runs", type=int, default=3, help="runs against one server")
    p.add_argument("--limit", type=float, default=1800, help="seconds a run may take at most")
    p.add_argument("-w", "--workers", default="1", help="[mailbox] workers: a number or auto")
    args = p.parse_args()
    path = f"{os.environ.get('PATH', '')}:/usr/sbin"
    source, sink = shutil.which("smtp-source", path=path), shutil.which("smtp-sink", path=path)
    if source is None or sink is None:
        sys.exit("bench: smtp-source/smtp-sink not found; `apt-get install postfix` provides them")
    home = Path(tempfile.mkdtemp(prefix="mailbox-qbench-"))
    try:
        run_all(args, home, source, sink)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_all(args: argparse.Namespace, home: Path, source: str, sink: str) -> None:
    procs: list[subprocess.Popen] = []
    rates: list[float] = []
    cpus: list[float] = []  # the server's CPU a message, ms: less noisy than the rates
    port, sink_port = benchlib.free_port(), benchlib.free_port()
    sink_cmd = [sink, "-c"]
    if os.geteuid() == 0:
        sink_cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
    sink_cmd += [f"127.0.0.1:{sink_port}", "100"]
    cmd = [source, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.length)]
    cmd += ["-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    code = None
    try:
        with (home / "smtp-sink.out").open("wb") as sink_out:
            procs.append(subprocess.Popen(sink_cmd, stdout=sink_out, stderr=subprocess.STDOUT))
        benchlib.wait_listening(sink_port, procs[0], "smtp-sink", home / "smtp-sink.out")
        procs.append(start_server(home, port, sink_port, args.workers))
        queue = home / "mailbox" / ".queue"
        for i in range(args.runs):
            cpu = benchlib.tree_cpu_seconds(procs[1].pid)
            total, accept, drain = one_run(cmd, queue, time.perf_counter() + args.limit)
            cpus.append((benchlib.tree_cpu_seconds(procs[1].pid) - cpu) / args.messages * 1000)
            rates.append(args.messages / total)
            print(
                f"run {i + 1}: {rates[-1]:.1f} msg/s ({total:.2f} s to an empty queue; "
                f"smtp-source done after {accept:.2f} s, then {drain:.2f} s of drain; "
                f"server CPU {cpus[-1]:.2f} ms a message)",
                flush=True,
            )
    finally:
        if len(procs) > 1:
            procs[1].terminate()  # twistd shuts down cleanly, then exits by the signal (-15)
            code = procs[1].wait(30)
        if procs:
            procs[0].terminate()
            procs[0].wait(10)
    log = (home / "twistd.log").read_text(errors="replace")
    sent = len(rates) * args.messages
    delivered = log.count(f"{RCPT} delivered after attempt")
    problems = [w for w in (" deferred after attempt", " failed after attempt") if w in log]
    if delivered != sent or problems or code not in (0, -15) or "Traceback" in log:
        sys.exit(
            f"bench: FAILED: {delivered}/{sent} delivered, {problems or 'no'} retries, "
            f"twistd exit {code}; its log ends:\n{log[-3000:]}"
        )
    rate = f"{statistics.median(rates):.1f} (min {min(rates):.1f}, max {max(rates):.1f})"
    print(f"runs: {args.runs}; {sent} messages relayed, {delivered} delivered to smtp-sink")
    print(f"messages/second: median {rate}")
    print(f"server CPU ms a message: median {statistics.median(cpus):.2f}")
    print(f"commands: {' '.join(cmd)}\n          {' '.join(sink_cmd)}")


if __name__ == "__main__":
    main()
