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
import socketserver
import threading
from pathlib import Path
from typing import Any

from .control import OPERATIONS, encode
from .inprocess import InProcessMailServer


def serve(argv: list[str] | None = None) -> None:
    """`python -m mailboxd.testing`: run a MailServer until stopped."""
    p = argparse.ArgumentParser(prog="python -m mailboxd.testing", description=__doc__)
    p.add_argument("--ready-file", required=True, help="write the ports here as JSON when ready")
    p.add_argument("--domain", action="append", default=[], help="a local domain (repeatable)")
    p.add_argument("--tls", action="store_true", help="also SMTPS/POP3S with a throwaway cert")
    p.add_argument(
        "--http",
        type=int,
        metavar="PORT",
        help="serve the HTTP API and web page on 127.0.0.1:PORT (0: a free port)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override"
    )
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    http: bool | int = False if args.http is None else args.http
    server = InProcessMailServer(
        domains=args.domain or ["example.test"], tls=args.tls, http=http, **overrides
    )
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
                    answer = {"ok": encode(result)}
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
        "http_port": server.http_port,
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
    if op in ("faults_on", "world_on"):  # server.faults or server.world
        rules = getattr(server, op.removesuffix("_on"))
        rules.on(
            *args,
            **{
                k: tuple(v) if k == "reply" and isinstance(v, list) else v
                for k, v in kwargs.items()
            },
        )
        return None
    if op in ("faults_clear", "world_clear"):
        return getattr(server, op.removesuffix("_clear")).clear()
    if op == "wait_change":
        return server.wait_change(*args, **kwargs)
    if op == "stop":
        return None
    return getattr(server, op)(*args, **kwargs)
