"""TwistedMailServer: the in-process server on the test's own reactor (trial)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import parse
from .api import Message, not_found
from .clock import ShiftedClock
from .inprocess import InProcessMailServer


class TwistedMailServer(InProcessMailServer):
    """For trial and other Twisted-native tests: runs on the test's own reactor.

    `start()` and `stop()` return Deferreds, and so does `wait_for_message`;
    the rest of the API is the same and answers at once.
    """

    def _in_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return f(*args)

    def start(self) -> Any:  # a Deferred firing with the server
        from twisted.internet import reactor
        from twisted.internet.defer import succeed

        if self._running:
            return succeed(self)
        with self._cond:
            self._inbound.clear()
            self.outbound.clear()

        self.home = Path(tempfile.mkdtemp(prefix="mailbox-test-"))
        self.clock = ShiftedClock(reactor)
        self._capture_port = self._start_capture(reactor)
        self.config = parse(self._ini(), self.home / "mailbox.ini")
        self._running = True

        def failed(f: Any) -> Any:
            return self.stop().addCallback(lambda _: f)

        return self._start_server(reactor).addCallbacks(lambda _: self, failed)

    def stop(self) -> Any:  # a Deferred
        from twisted.internet.defer import maybeDeferred

        self._running = False
        appliance, self.appliance = getattr(self, "appliance", None), None
        d = maybeDeferred(self._stop_http)
        if appliance:
            d.addCallback(lambda _: appliance.service.stopService())
        if getattr(self, "_capture", None) is not None:
            d.addCallback(lambda _: self._capture.stopListening())

        def clean(result: Any) -> Any:
            if self.home is not None:
                shutil.rmtree(self.home, ignore_errors=True)
            return result

        return d.addBoth(clean)

    def wait_for_message(
        self,
        to: str | None = None,
        subject: str | None = None,
        predicate: Callable[[Message], bool] | None = None,
        timeout: float = 5.0,
        *,
        outbound: bool = False,
    ) -> Any:
        """A Deferred firing with the first matching message, or failing with
        AssertionError after `timeout` seconds."""
        self._running_or_raise()
        if to is not None and not outbound:
            self._local(to)

        def find() -> Message | None:
            return self._find(outbound, to, subject, predicate)

        def expired() -> BaseException:
            return not_found(to, subject, timeout, self.outbound if outbound else self._inbound)

        return self._wait_deferred(find, timeout, expired)
