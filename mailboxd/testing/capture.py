"""The world outside, as the test server sees it: relayed mail is captured here,
answered as the world's rules (world.py) say."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory

from ..faults import apply as apply_rule
from ..lines import LineProtocol, SMTPReply
from .api import Message
from .world import World


class CaptureFactory(ServerFactory["Capture"]):
    noisy = False

    def __init__(
        self, captured: Callable[[Message], None], world: World | None = None, clock: Any = None
    ) -> None:
        self.captured = captured
        self.world = world if world is not None else World()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock  # what a rule's delay waits on: the server's

    def buildProtocol(self, addr: Any) -> Capture:
        p = Capture()
        p.factory = self
        return p


class Capture(LineProtocol):
    """A minimal SMTP receiver standing in for the world: relayed mail lands
    here. It answers 250 (and 220, 354) unless a rule of the world's says
    otherwise; one command at a time, in order, a delayed one included."""

    factory: CaptureFactory
    max_line = 1000

    def connectionMade(self) -> None:
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.data: list[bytes] | None = None
        self.in_service = True  # False after a greeting that refused (RFC 5321 §3.1)
        peer = self.transport.getPeer()
        greeting = self._step(
            "connect", [getattr(peer, "host", "")], lambda: (220, "capture ESMTP"), self._greeted
        )
        if isinstance(greeting, Deferred):
            self._wait(greeting)  # what the client says meanwhile waits for the greeting

    def _greeted(self, code: int) -> None:
        self.in_service = 200 <= code < 300

    def _step(
        self,
        stage: str,
        subjects: Iterable[str],
        real: Callable[[], SMTPReply],
        then: Callable[[int], None] | None = None,
    ) -> Deferred | None:
        """Answer at `stage`: the world's rule for it, if one matches
        `subjects`, else `real()`; `then(code)` just before the reply goes."""
        rule = self.factory.world.first(stage, subjects)
        if rule is None:
            return self._say(real(), then)
        answer = apply_rule(rule, self.transport, self.factory.clock, real)
        if rule.drop:
            self.data = None
            self.discard_input()
        return self._say(answer, then)

    def _say(
        self, reply: SMTPReply | Deferred | None, then: Callable[[int], None] | None
    ) -> Deferred | None:
        """Send `reply` (now, or when it comes; None: dropped, nothing to say)."""
        if isinstance(reply, Deferred):
            return reply.addCallback(self._say, then)
        if reply is None or self._closed:  # dropped
            return None
        code, text = reply
        if then is not None:
            then(code)
        *lines, last = text.split("\n")
        for line in lines:
            self.sendLine(f"{code}-{line}")
        if code == 421:  # the server closes the channel (RFC 5321 §3.8)
            self.hang_up(f"{code} {last}")
        else:
            self.sendLine(f"{code} {last}")
        return None

    def lineReceived(self, line: bytes) -> Deferred | None:
        if self.data is not None:
            if line == b".":
                return self._step("end-of-data", self._transaction(), self._ok, self._ended)
            self.data.append(line[1:] if line.startswith(b".") else line)
            return None
        verb = line[:4].upper()
        arg = line.decode("latin-1").partition(":")[2].strip().strip("<>").split(">")[0]
        if verb == b"QUIT":
            self.hang_up("221 2.0.0 Bye")
            return None
        if not self.in_service:
            return self._say((503, "5.5.1 no service here"), None)
        if verb == b"MAIL":
            return self._step("MAIL", [arg], lambda: (250, "2.1.0 Ok"), self._mail(arg))
        if verb == b"RCPT":
            return self._step("RCPT", [arg], lambda: (250, "2.1.5 Ok"), self._rcpt(arg))
        if verb == b"DATA":
            return self._step("DATA", self._transaction(), self._go_ahead, self._data)
        if verb == b"RSET":
            self.sender, self.rcpts = None, []
        return self._say((250, "capture"), None)

    def _transaction(self) -> list[str]:
        return [*self.rcpts, self.sender or ""]

    def _mail(self, sender: str) -> Callable[[int], None]:
        def then(code: int) -> None:
            if 200 <= code < 300:
                self.sender, self.rcpts = sender, []

        return then

    def _rcpt(self, recipient: str) -> Callable[[int], None]:
        def then(code: int) -> None:
            if 200 <= code < 300:
                self.rcpts.append(recipient)

        return then

    def _go_ahead(self) -> SMTPReply:
        if self.sender is None or not self.rcpts:
            return (503, "5.5.1 no valid recipients")
        return (354, "go ahead")

    def _data(self, code: int) -> None:
        if code == 354:
            self.data = []
            self.strict_crlf = True

    def _ok(self) -> SMTPReply:
        return (250, "2.0.0 captured")

    def _ended(self, code: int) -> None:
        """The reply to the end of the data: a 2xx means the world has it."""
        data, self.data, self.strict_crlf = self.data or [], None, False
        if 200 <= code < 300:
            self.factory.captured(
                Message(self.sender or "", tuple(self.rcpts), b"\r\n".join(data) + b"\r\n")
            )
        self.sender, self.rcpts = None, []

    def lineTooLong(self) -> None:
        self.sendLine("500 line too long")

    def internalError(self) -> None:
        self.transport.loseConnection()
