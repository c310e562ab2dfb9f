"""MailServer in its own process: ``MailServer(process=True)``, and
``python -m mailboxd.testing --ready-file ports.json`` for suites not in Python.

The child runs an ordinary in-process MailServer and answers a control
channel on 127.0.0.1: one JSON request per line, one JSON answer per line.
The ready file holds the ports, the control port and the certificate path.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ServerAPI, check_overrides, match_message, not_found, trusting_context

# Operations the control channel serves: method names of MailServer.
OPERATIONS = {
    "add_account",
    "remove_account",
    "accounts",
    "messages",
    "deliver",
    "advance",
    "reset",
    "outbound",
    "wait_change",
    "faults_on",
    "faults_clear",
    "stop",
}


def _encode(value: Any) -> Any:
    from . import Message

    if isinstance(value, Message):
        return {
            "__message__": True,
            "envelope_from": value.envelope_from,
            "recipients": list(value.recipients),
            "raw": base64.b64encode(value.raw).decode(),
            "account": value.account,
            "authenticated": value.authenticated,
            "tls": value.tls,
        }
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    from . import Message

    if isinstance(value, dict) and value.get("__message__"):
        return Message(
            value["envelope_from"],
            tuple(value["recipients"]),
            base64.b64decode(value["raw"]),
            value["account"],
            value["authenticated"],
            value["tls"],
        )
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


# --- the child ----------------------------------------------------------------------


def serve(argv: list[str] | None = None) -> None:
    """`python -m mailboxd.testing`: run a MailServer until stopped."""
    from . import MailServer

    p = argparse.ArgumentParser(prog="python -m mailboxd.testing", description=__doc__)
    p.add_argument("--ready-file", required=True, help="write the ports here as JSON when ready")
    p.add_argument("--domain", action="append", default=[], help="a local domain (repeatable)")
    p.add_argument("--tls", action="store_true", help="also SMTPS/POP3S with a throwaway cert")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    server = MailServer(domains=args.domain or ["example.test"], tls=args.tls, **overrides)
    server.start()
    done = threading.Event()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                request = json.loads(line)
                op = request.get("op")
                try:
                    if op not in OPERATIONS:
                        raise ValueError(f"unknown operation {op!r}")
                    result = _run(server, op, request.get("args", []), request.get("kwargs", {}))
                    answer = {"ok": _encode(result)}
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    answer = {"error": type(e).__name__, "message": str(e)}
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()
                if op == "stop":
                    done.set()
                    return

    control = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    control.daemon_threads = True
    threading.Thread(target=control.serve_forever, args=(0.05,), daemon=True).start()
    ready = {
        "host": server.host,
        "smtp_port": server.smtp_port,
        "submission_port": server.submission_port,
        "pop3_port": server.pop3_port,
        "smtps_port": server.smtps_port,
        "pop3s_port": server.pop3s_port,
        "control_port": control.server_address[1],
        "certificate": str(server.certificate) if args.tls else None,
        "pid": os.getpid(),
    }
    tmp = Path(args.ready_file + ".tmp")
    tmp.write_text(json.dumps(ready))
    os.replace(tmp, args.ready_file)
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    control.shutdown()
    server.stop()


def _run(server: Any, op: str, args: list, kwargs: dict) -> Any:
    if op == "outbound":
        return list(server.outbound)
    if op == "deliver":
        return server.deliver(args[0], base64.b64decode(args[1]), *args[2:])
    if op == "faults_on":
        server.faults.on(
            *args,
            **{
                k: tuple(v) if k == "reply" and isinstance(v, list) else v
                for k, v in kwargs.items()
            },
        )
        return None
    if op == "faults_clear":
        return server.faults.clear()
    if op == "wait_change":
        return server.wait_change(*args, **kwargs)
    if op == "stop":
        return None
    return getattr(server, op)(*args, **kwargs)


# --- the parent ----------------------------------------------------------------------


class _RemoteFaults:
    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def on(self, point: str, **kwargs: Any) -> None:
        self._call("faults_on", point, **kwargs)

    def clear(self) -> None:
        self._call("faults_clear")


class RemoteMailServer(ServerAPI):
    """The MailServer API, served by a child process (`MailServer(process=True)`)."""

    host = "127.0.0.1"

    def __init__(
        self, domains: Any = ("example.test",), *, tls: bool = False, **overrides: Any
    ) -> None:
        check_overrides(overrides)
        self.domains = tuple(domains)
        self.tls = tls
        self.overrides = overrides
        self.proc: subprocess.Popen | None = None
        self.faults = _RemoteFaults(self._call)

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
        for key in ("smtp_port", "submission_port", "pop3_port", "smtps_port", "pop3s_port"):
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
        return _decode(answer["ok"])

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
