"""The world outside, as the test server sees it: relayed mail is captured here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import ServerFactory

from ..lines import LineProtocol
from .api import Message


class CaptureFactory(ServerFactory["Capture"]):
    noisy = False

    def __init__(self, captured: Callable[[Message], None]) -> None:
        self.captured = captured

    def buildProtocol(self, addr: Any) -> Capture:
        p = Capture()
        p.factory = self
        return p


class Capture(LineProtocol):
    """A minimal SMTP receiver standing in for the world: relayed mail lands here."""

    factory: CaptureFactory
    max_line = 1000

    def connectionMade(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.data: list[bytes] | None = None
        self.sendLine("220 capture ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self.factory.captured(
                    Message(self.sender or "", tuple(self.rcpts), b"\r\n".join(self.data) + b"\r\n")
                )
                self.data, self.sender, self.rcpts = None, None, []
                self.sendLine("250 2.0.0 captured")
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line[:4].upper()
        arg = line.decode("latin-1").partition(":")[2].strip().strip("<>")
        if verb == b"MAIL":
            self.sender = arg.split(">")[0]
            self.sendLine("250 2.1.0 Ok")
        elif verb == b"RCPT":
            self.rcpts.append(arg.split(">")[0])
            self.sendLine("250 2.1.5 Ok")
        elif verb == b"DATA":
            self.data = []
            self.strict_crlf = True
            self.sendLine("354 go ahead")
        elif verb == b"QUIT":
            self.sendLine("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine("250 capture")

    def lineTooLong(self) -> None:
        self.sendLine("500 line too long")

    def internalError(self) -> None:
        self.transport.loseConnection()
