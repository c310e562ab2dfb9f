"""Authentication failures per IP, across both protocols, and the blocks they earn.

The rule is about verdicts, not attempts: any number of logins from one IP
may be in progress, but each failure is counted in one transaction of the
state store that also sets the block, so no IP ever gets more than
`auth_failures` failed verdicts in `auth_failure_window`, and a login that
completes once the IP is blocked is refused, whatever its password.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .config import LimitsSection
from .state import FailureLimit, FailureVerdict, StateStore, normalise_ip

log = Logger()


def refusal(ip: str) -> str:
    return (
        f"Connection refused from {ip}. "
        "Too many authorization failures from this IP, try again later."
    )


@attrs.define
class Guard:
    store: StateStore
    clock: IReactorTime
    limits: LimitsSection
    run: Callable[..., Deferred]  # runs a store call off the reactor thread

    def blocked(self, ip: str) -> Deferred:
        """Fires with True if `ip` is blocked now."""
        d = self.run(self.store.block, normalise_ip(ip), self.clock.seconds())
        return d.addCallback(lambda block: block is not None)

    def unblocked(self, ip: str) -> Deferred:
        return self.blocked(ip).addCallback(lambda blocked: not blocked)

    def failed(self, ip: str) -> Deferred:
        """Record a failed verdict; fires with the FailureVerdict (blocked: end the session)."""
        ip = normalise_ip(ip)
        limit = FailureLimit(
            self.limits.auth_failures,
            self.limits.auth_failure_window,
            self.limits.block_duration,
        )

        def verdict(v: FailureVerdict) -> FailureVerdict:
            if v.new_block:
                log.warn(
                    "blocked {client} for {seconds}s after {count} authentication failures",
                    client=ip,
                    seconds=self.limits.block_duration,
                    count=v.recorded,
                )
            return v

        d = self.run(self.store.record_failure, ip, self.clock.seconds(), limit)
        return d.addCallback(verdict)
