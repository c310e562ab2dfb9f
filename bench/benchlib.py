"""What the benchmarks share: free loopback ports and a real `twistd mailbox`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
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
