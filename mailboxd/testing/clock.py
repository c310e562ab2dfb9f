"""The test server's clock: real time plus an offset that `advance()` moves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class _ShiftedCall:
    def __init__(self, clock: ShiftedClock, due: float, f: Callable, args: tuple, kw: dict) -> None:
        self.clock, self.due, self.f, self.args, self.kw = clock, due, f, args, kw
        self.called = self.cancelled = False
        self._call = clock.reactor.callLater(max(0.0, due - clock.seconds()), self._fire)

    def _fire(self) -> None:
        self.called = True
        self.clock.calls.discard(self)
        self.f(*self.args, **self.kw)

    def getTime(self) -> float:
        return self.due

    def reset(self, seconds: float) -> None:
        self.due = self.clock.seconds() + seconds
        self._call.reset(max(0.0, seconds))

    def delay(self, seconds: float) -> None:
        self.reset(self.due - self.clock.seconds() + seconds)

    def cancel(self) -> None:
        self.cancelled = True
        self.clock.calls.discard(self)
        self._call.cancel()

    def active(self) -> bool:
        return self._call.active()


class ShiftedClock:
    """Real time plus an offset that tests move forward; an IReactorTime."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.offset = 0.0
        self.calls: set[_ShiftedCall] = set()

    def seconds(self) -> float:
        return self.reactor.seconds() + self.offset

    def wall(self) -> float:
        """The wall clock, moved by the same offset (see mailboxd.clocks)."""
        return time.time() + self.offset

    def callLater(self, delay: float, f: Callable, *args: Any, **kw: Any) -> _ShiftedCall:
        call = _ShiftedCall(self, self.seconds() + delay, f, args, kw)
        self.calls.add(call)
        return call

    def getDelayedCalls(self) -> list[_ShiftedCall]:
        return [c for c in self.calls if c.active()]

    def advance(self, seconds: float) -> None:
        """Jump forward: whatever falls due runs now, in order."""
        self.offset += seconds
        for call in sorted(self.getDelayedCalls(), key=lambda c: c.due):
            call._call.reset(max(0.0, call.due - self.seconds()))

    def rewind(self) -> None:
        """Back to real time (pending calls keep their remaining delay)."""
        for call in self.getDelayedCalls():
            call.due -= self.offset
        self.offset = 0.0
