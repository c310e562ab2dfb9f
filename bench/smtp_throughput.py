"""SMTP throughput: Postfix's smtp-source against a real `twistd mailbox` (fsync on)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bcrypt
import benchlib

RCPT = "user@example.test"


def start_server(home: Path, port: int) -> subprocess.Popen:
    hashed = bcrypt.hashpw(b"bench pw", bcrypt.gensalt(4)).decode()
    return benchlib.start_server(home, port, accounts=f"{RCPT}:{hashed}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-m", "--messages", type=int, default=2000, help="messages per run")
    p.add_argument("-s", "--sessions", type=int, default=10, help="parallel SMTP sessions")
    p.add_argument("-l", "--length", type=int, default=1024, help="payload bytes a message")
    p.add_argument("-r", "--runs", type=int, default=5, help="runs against one server")
    args = p.parse_args()
    tool = shutil.which("smtp-source", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if tool is None:
        sys.exit("bench: smtp-source not found; `apt-get install postfix` provides it")
    home = Path(tempfile.mkdtemp(prefix="mailbox-bench-"))
    try:
        port = benchlib.free_port()
        proc = start_server(home, port)
        cmd = [tool, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.length)]
        cmd += ["-f", "sender@far.test", "-t", RCPT, f"127.0.0.1:{port}"]
        rates: list[float] = []
        try:
            for i in range(args.runs):
                t0 = time.perf_counter()
                if subprocess.run(cmd).returncode != 0:
                    break
                rates.append(args.messages / (time.perf_counter() - t0))
                print(f"run {i + 1}: {rates[-1]:.1f} msg/s", flush=True)
        finally:
            proc.terminate()  # twistd shuts down cleanly, then exits by the signal (-15)
            code = proc.wait(30)
        log = (home / "twistd.log").read_text(errors="replace")
        new = home / "mailbox" / "example.test" / "user" / "new"
        stored, sent = len(list(new.iterdir())) if new.is_dir() else 0, len(rates) * args.messages
        if len(rates) < args.runs or stored != sent or code not in (0, -15) or "Traceback" in log:
            sys.exit(
                f"bench: FAILED: {len(rates)}/{args.runs} runs, {stored}/{sent} stored, "
                f"twistd exit {code}; its log ends:\n{log[-3000:]}"
            )
        rate = f"{statistics.median(rates):.1f} (min {min(rates):.1f}, max {max(rates):.1f})"
        print(f"runs: {args.runs}; {sent} messages sent, {stored} in the Maildir")
        print(f"messages/second: median {rate}\ncommand: {' '.join(cmd)}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
