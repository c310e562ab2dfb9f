"""A real Redis on loopback for the tests: Debian's redis-server, on a free
port and a unix socket, with nothing saved to disk.

    server = RedisServer(tmp_path).start()
    ... RedisStateStore(server.url) ...
    server.restart()  # stopped, and started again on the same port
    server.stop()
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port, need


class RedisServer:
    """`redis-server` on 127.0.0.1:<a free port> and <home>/redis/redis.sock."""

    def __init__(self, home: Path, password: str | None = None) -> None:
        self.home = home / "redis"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = self.home / "redis.sock"
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}?db=0"

    def start(self) -> RedisServer:
        args = [
            need("redis-server"),
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--unixsocket", str(self.socket), "--unixsocketperm", "700"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.home)),
            *("--daemonize", "no", "--logfile", ""),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.log = (self.home / "redis.log").open("ab")
        self.proc = subprocess.Popen(args, cwd=self.home, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "redis-server did not answer:\n"
                    + (self.home / "redis.log").read_text(errors="replace")
                )
            time.sleep(0.05)
        return self

    def answers(self) -> bool:
        """Whether it answers PING (with NOAUTH, if it wants a password)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(100)
        except OSError:
            return False
        return reply.startswith(b"+PONG") or b"NOAUTH" in reply

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        if hasattr(self, "log"):
            self.log.close()

    def restart(self) -> RedisServer:
        """Stop it and start it again on the same port (empty: nothing was saved)."""
        self.stop()
        return self.start()
