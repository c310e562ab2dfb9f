"""Authentication failures per IP, across both protocols, and the blocks they earn.

The rule is about verdicts, not attempts: any number of logins from one IP
may be in progress, but each failure is counted in one transaction of the
state store that also sets the block, so no IP ever gets more than
`auth_failures` failed verdicts in `auth_failure_window`, and a login that
completes once the IP is blocked is refused, whatever its password.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .clocks import Wall
from .config import LimitsSection
from .state import FailureLimit, FailureVerdict, StateError, StateStore, normalise_ip

log = Logger()


def refusal(ip: str) -> str:
    return (
        f"Connection refused from {ip}. "
        "Too many authorization failures from this IP, try again later."
    )


@attrs.define
class Guard:
    store: StateStore
    wall: Wall  # failures and blocks are instants other processes read
    limits: LimitsSection
    run: Callable[..., Deferred]  # runs a store call off the reactor thread
    # Failures the store could not record (it was locked, or broken). Until
    # they are, the IP gets no verdict at all, only temporary errors: else a
    # locked store would hand out uncounted guesses.
    _unrecorded: collections.Counter = attrs.field(init=False, factory=collections.Counter)

    def blocked(self, ip: str) -> Deferred:
        """Fires with True if `ip` is blocked now; fails with StateError if
        the store cannot say, or cannot record this IP's earlier failures."""
        ip = normalise_ip(ip)
        owed = self._unrecorded.pop(ip, 0)
        now = self.wall()

        def ask() -> bool:
            for _ in range(owed):
                self.store.record_failure(ip, now, self._limit)
            return self.store.block(ip, now) is not None

        def still_owed(f: Any) -> Any:
            f.trap(StateError)
            self._unrecorded[ip] += owed
            return f

        return self.run(ask).addErrback(still_owed)

    def unblocked(self, ip: str) -> Deferred:
        return self.blocked(ip).addCallback(lambda blocked: not blocked)

    def failed(self, ip: str) -> Deferred:
        """Record a failed verdict; fires with the FailureVerdict (blocked: end the session)."""
        ip = normalise_ip(ip)

        def verdict(v: FailureVerdict) -> FailureVerdict:
            if v.new_block:
                log.warn(
                    "blocked {client} for {seconds}s after {count} authentication failures",
                    client=ip,
                    seconds=self.limits.block_duration,
                    count=v.recorded,
                )
            return v

        def unrecorded(f: Any) -> Any:
            f.trap(StateError)
            self._unrecorded[ip] += 1
            return f

        d = self.run(self.store.record_failure, ip, self.wall(), self._limit)
        return d.addCallbacks(verdict, unrecorded)

    @property
    def _limit(self) -> FailureLimit:
        return FailureLimit(
            self.limits.auth_failures,
            self.limits.auth_failure_window,
            self.limits.block_duration,
        )
