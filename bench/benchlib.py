"""What the benchmarks share: free loopback ports and a real `twistd mailbox`."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, log: Path | None) -> None:
    for _ in range(300):  # 30 s at most
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    text = log.read_text(errors="replace") if log and log.exists() else ""
    sys.exit(f"bench: {what} did not start:\n{text}")


def start_server(
    home: Path, port: int, *, mailbox: str = "", sections: str = "", accounts: str = ""
) -> subprocess.Popen:
    """`twistd -n mailbox` in `home`, SMTP on `port` only, the working tree's code.

    `mailbox` adds lines to [mailbox]; `sections` adds whole sections after it.
    """
    ini = "[mailbox]\nhostname = mail.example.test\ndomains = example.test\nbcrypt_rounds = 4\n"
    ini += mailbox
    ini += f"[smtp]\nlisten = tcp:{port}:interface=127.0.0.1\nsubmission =\n[pop3]\nlisten =\n"
    ini += "[inbound]\nchecks = no\n"  # no DNS lookups about made-up domains
    (home / "etc").mkdir()
    for name, text in (("accounts", accounts), ("aliases", ""), ("mailbox.ini", ini + sections)):
        (home / "etc" / name).write_text(text)
    twistd = Path(sys.executable).parent / "twistd"
    cmd = [str(twistd), "--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with (home / "twistd.log").open("wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_listening(port, proc, "twistd", home / "twistd.log")
    return proc


# --- Added for bench/capacity.py: any source tree, several listeners, loopback
# --- source addresses, server RSS, and the median/min-max summary.


def loopback(index: int) -> str:
    """The `index`-th client address: 127.0.0.2, 127.0.0.3, ... (never 127.0.0.1).

    Every 127/8 address is local on Linux, so clients can spread over many source
    addresses and per-IP limits in the server do not shape what is measured.
    """
    return f"127.0.{index // 250}.{index % 250 + 2}"


def connect_from(index: int, port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(loopback(index), 0)
    )


def spawn_twistd(home: Path, tree: Path) -> subprocess.Popen:
    """`twistd -n mailbox --config etc/mailbox.ini` in `home`, running `tree`'s code.

    `tree` goes first on PYTHONPATH: its `mailboxd` shadows any installed copy and
    its `twisted/plugins` joins Twisted's plugin path, so an old checkout can be run
    with this venv's twistd and dependencies.
    """
    twistd = Path(sys.executable).parent / "twistd"
    cmd = [str(twistd), "--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with (home / "twistd.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)


def await_ports(proc: subprocess.Popen, ports: list[int], timeout: float = 60) -> None:
    """Return once every port accepts; raise RuntimeError if twistd exits or times out."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"twistd is not listening on {port}") from None
                time.sleep(0.1)


def stop_twistd(proc: subprocess.Popen) -> int | None:
    """Terminate twistd (it shuts down cleanly on SIGTERM); kill it if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(30)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or another /proc status size) of `pid`, in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Restart the kernel's VmHWM (peak RSS) of `pid` from its current RSS."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # proc(5): 5 resets the peak resident set size
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Samples a process's RSS every `interval` seconds and keeps the peak.

    Past `cap` bytes it kills the process (SIGKILL, by its pid) and sets `capped`,
    so a server whose memory runs away cannot take the machine with it. After
    `baseline` the kernel's own peak (VmHWM) counts too, so a spike shorter than
    the interval is not missed.
    """

    def __init__(self, pid: int, interval: float = 0.05, cap: int | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.cap = pid, interval, cap
        self.last = self.peak = rss_bytes(pid)
        self.capped = threading.Event()
        self._stop_event = threading.Event()
        self._hwm = False  # VmHWM is only meaningful once reset at the baseline

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.last = rss_bytes(self.pid)
            hwm = rss_bytes(self.pid, "VmHWM") if self._hwm else 0
            self.peak = max(self.peak, self.last, hwm)
            if self.cap and self.last > self.cap:
                self.capped.set()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                return

    def baseline(self, seconds: float = 0.5) -> int:
        """The median RSS over `seconds`; the peak starts again from there."""
        samples = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(rss_bytes(self.pid))
            time.sleep(self.interval)
        self._hwm = reset_peak_rss(self.pid)
        self.peak = self.last = int(statistics.median(samples))
        return self.peak

    def settle(self, quiet: float = 1.0, limit: float = 30.0) -> None:
        """Wait until the peak has not risen for `quiet` seconds (at most `limit`)."""
        end = time.monotonic() + limit
        peak, since = self.peak, time.monotonic()
        while time.monotonic() < end and not self.capped.is_set():
            time.sleep(self.interval)
            if self.peak > peak:
                peak, since = self.peak, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: with few samples p99 is simply the maximum."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: list[float], fmt: Callable[[float], str] = "{:.2f}".format) -> str:
    """'median (min-max)' of `values`, as the benchmarks report them."""
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of process `pid` and its children, threads
    included, so far; from /proc (Linux)."""
    total = 0
    pids, seen = [pid], set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / os.sysconf("SC_CLK_TCK")
