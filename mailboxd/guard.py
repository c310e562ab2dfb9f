"""Authentication failures per IP, across both protocols, and the blocks they earn."""

from __future__ import annotations

import collections

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import LimitsSection
from .state import StateStore, normalise_ip

log = Logger()


def refusal(ip: str) -> str:
    return (
        f"Connection refused from {ip}. "
        "Too many authorization failures from this IP, try again later."
    )


@attrs.define
class Guard:
    """Counts failed logins per IP and blocks an IP that reaches the limit.

    Attempts still in flight count too: with nine failures on record, only one
    more attempt may run at a time, so parallel connections cannot get
    around the limit while bcrypt is busy.
    """

    store: StateStore
    clock: IReactorTime
    limits: LimitsSection
    _in_flight: collections.Counter = attrs.field(factory=collections.Counter)

    def blocked(self, ip: str) -> bool:
        return self.store.block(normalise_ip(ip), self.clock.seconds()) is not None

    def begin(self, ip: str) -> bool:
        """Reserve an attempt for `ip`; False if it is blocked or out of attempts."""
        ip = normalise_ip(ip)
        now = self.clock.seconds()
        if self.store.block(ip, now) is not None:
            return False
        recent = self.store.failures(ip, now - self.limits.auth_failure_window)
        if recent + self._in_flight[ip] >= self.limits.auth_failures:
            return False
        self._in_flight[ip] += 1
        return True

    def succeeded(self, ip: str) -> None:
        self._release(normalise_ip(ip))

    def failed(self, ip: str, *, reserved: bool = True) -> bool:
        """Record a failure; True if it blocked `ip` (the caller ends the session)."""
        ip = normalise_ip(ip)
        if reserved:
            self._release(ip)
        now = self.clock.seconds()
        self.store.add_failure(ip, now)
        recent = self.store.failures(ip, now - self.limits.auth_failure_window)
        if recent < self.limits.auth_failures:
            return False
        if self.store.block(ip, now) is None:
            self.store.set_block(ip, now, now + self.limits.block_duration)
            log.warn(
                "blocked {client} for {seconds}s after {count} authentication failures",
                client=ip,
                seconds=self.limits.block_duration,
                count=recent,
            )
        return True

    def _release(self, ip: str) -> None:
        self._in_flight[ip] -= 1
        if self._in_flight[ip] <= 0:
            del self._in_flight[ip]
