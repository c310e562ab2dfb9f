"""RemoteMailServer, what ``MailServer(process=True)`` returns: the MailServer
API in this process, the server in a child process (`python -m
mailboxd.testing`, see child.py) that it drives over the control channel."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .api import ServerAPI, check_overrides, match_message, not_found, trusting_context
from .control import decode


class _RemoteRules:
    """`server.faults` or `server.world` of the child's: `on` and `clear`."""

    def __init__(self, call: Callable[..., Any], name: str) -> None:
        self._call, self._name = call, name

    def on(
        self,
        point: str,
        *,
        match: str | None = None,
        reply: tuple[int, str] | str | None = None,
        drop: bool = False,
        delay: float = 0.0,
        times: int | None = None,
    ) -> None:
        self._call(
            f"{self._name}_on",
            point,
            match=match,
            reply=reply,
            drop=drop,
            delay=delay,
            times=times,
        )

    def clear(self) -> None:
        self._call(f"{self._name}_clear")


class RemoteMailServer(ServerAPI):
    """The MailServer API, served by a child process (`MailServer(process=True)`)."""

    host = "127.0.0.1"

    def __init__(
        self,
        domains: Any = ("example.test",),
        *,
        tls: bool = False,
        http: bool | int = False,
        **overrides: Any,
    ) -> None:
        check_overrides(overrides)
        self.domains = tuple(domains)
        self.tls = tls
        self.http = http
        self.http_port: int | None = None
        self.overrides = overrides
        self.proc: subprocess.Popen | None = None
        self.faults = _RemoteRules(self._call, "faults")
        self.world = _RemoteRules(self._call, "world")

    def start(self) -> RemoteMailServer:
        if self.proc is not None:
            return self
        self._dir = tempfile.mkdtemp(prefix="mailbox-remote-")
        ready = Path(self._dir) / "ready.json"
        cmd = [sys.executable, "-m", "mailboxd.testing", "--ready-file", str(ready)]
        for d in self.domains:
            cmd += ["--domain", d]
        if self.tls:
            cmd.append("--tls")
        if self.http is not False:
            cmd += ["--http", str(0 if self.http is True else int(self.http))]
        for k, v in self.overrides.items():
            v = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            v = ("yes" if v else "no") if isinstance(v, bool) else v
            cmd += ["--set", f"{k}={v}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not ready.exists():  # start-up only: the child writes the file once
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc = None
                raise RuntimeError("the MailServer process did not start")
            time.sleep(0.01)
        info = json.loads(ready.read_text())
        ports = ("smtp_port", "submission_port", "pop3_port", "smtps_port", "pop3s_port")
        for key in (*ports, "http_port"):
            setattr(self, key, info[key])
        self.certificate = Path(info["certificate"]) if info["certificate"] else None
        self._sock = socket.create_connection(("127.0.0.1", info["control_port"]))
        self._file = self._sock.makefile("rwb")
        self._lock = threading.Lock()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self._call("stop")
        except (OSError, RuntimeError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._sock.close()
        self.proc = None

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self.proc is None:
            raise RuntimeError("this MailServer is not running: call start() or use `with`")
        with self._lock:
            self._file.write(
                json.dumps({"op": op, "args": list(args), "kwargs": kwargs}).encode() + b"\n"
            )
            self._file.flush()
            line = self._file.readline()
        if not line:
            raise RuntimeError("the MailServer process went away")
        answer = json.loads(line)
        if "error" in answer:
            kind = {
                "ValueError": ValueError,
                "TypeError": TypeError,
                "AssertionError": AssertionError,
            }
            raise kind.get(answer["error"], RuntimeError)(answer["message"])
        return decode(answer["ok"])

    # The same API as the in-process MailServer.

    def add_account(self, address: str, password: str) -> None:
        self._call("add_account", address, password)

    def remove_account(self, address: str) -> None:
        self._call("remove_account", address)

    def accounts(self) -> list[str]:
        return self._call("accounts")

    def messages(self, address: str | None = None) -> list[Any]:
        return self._call("messages", address)

    @property
    def outbound(self) -> list[Any]:
        return self._call("outbound")

    def deliver(self, address: str, raw: bytes, sender: str = "") -> Any:
        return self._call("deliver", address, base64.b64encode(raw).decode(), sender)

    def advance(self, seconds: float) -> None:
        self._call("advance", seconds)

    def reset(self) -> None:
        self._call("reset")

    def client_ssl_context(self) -> Any:
        return trusting_context(self.certificate)

    def wait_for_message(
        self,
        to: str | None = None,
        subject: str | None = None,
        predicate: Callable[[Any], bool] | None = None,
        timeout: float = 5.0,
        *,
        outbound: bool = False,
    ) -> Any:
        deadline = time.monotonic() + timeout
        key = to.lower() if outbound and to is not None else None  # the child filters mailboxes
        while True:
            pool = self.outbound if outbound else self.messages(to)
            for m in pool:
                if match_message(m, key, subject, predicate, outbound):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise not_found(to, subject, timeout, pool)
            # Blocks in the child until something arrives: no polling here.
            self._call("wait_change", len(pool), left, outbound=outbound, to=to)
