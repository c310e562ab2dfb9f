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
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .clocks import Wall
from .config import LimitsSection
from .state import FailureLimit, FailureVerdict, StateError, StateStore, client_key

log = Logger()

COPY_FRESH = 1.0  # seconds a copy of the blocks table answers new connections


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
    # With a (monotonic) clock, new connections are checked against a copy of
    # the blocks table: see `turned_away`. `board` is where the workers tell
    # each other that they have set a block.
    clock: Any = None
    board: Any = None
    # Failures the store could not record (it was locked, or broken). Until
    # they are, the IP gets no verdict at all, only temporary errors: else a
    # locked store would hand out uncounted guesses.
    _unrecorded: collections.Counter = attrs.field(init=False, factory=collections.Counter)
    _copy: dict[str, float] = attrs.field(init=False, factory=dict)  # ip -> until (wall)
    _copied_at: float | None = attrs.field(init=False, default=None)  # on `clock`
    _copied_version: tuple = attrs.field(init=False, default=())
    _copying: bool = attrs.field(init=False, default=False)
    _set_here: int = attrs.field(init=False, default=0)  # blocks this process has set

    def turned_away(self, ip: str) -> Deferred:
        """Whether to refuse a new connection from `ip`: as `blocked`, but
        answered at once from a copy of the blocks table when the copy is
        fresh and does not list `ip`, instead of a trip to the store's thread
        at every connection (a fifth of the server's work a connection).

        The copy is read again after COPY_FRESH seconds, and at once after
        any worker sets a block (the board says so). A block set by another
        worker in the instant before it tells the board may let one
        connection be greeted; its logins are still refused, since a login
        always asks the store (`blocked`). An IP the copy lists (unblocked
        since, perhaps) is asked of the store too."""
        ip = client_key(ip, self.limits.ipv6_prefix)
        if self.clock is None:
            return self.blocked(ip)
        if not self._fresh():
            self._recopy()
        elif ip not in self._copy and ip not in self._unrecorded:
            return succeed(False)
        return self.blocked(ip)

    def _version(self) -> tuple:
        return (self._set_here, *(self.board.blocks_set() if self.board is not None else ()))

    def _fresh(self) -> bool:
        return (
            self._copied_at is not None
            and self.clock.seconds() - self._copied_at < COPY_FRESH
            and self._version() == self._copied_version
        )

    def _recopy(self) -> None:
        if self._copying:
            return
        self._copying = True
        # Taken before the read: a block set while it runs makes the copy stale.
        version, started, now = self._version(), self.clock.seconds(), self.wall()

        def copied(blocks: list) -> None:
            self._copy = {b.ip: b.until for b in blocks}
            self._copied_at, self._copied_version = started, version

        def done(result: Any) -> Any:
            self._copying = False
            return result

        d = self.run(self.store.blocks, now).addCallback(copied)
        # A store that cannot be read stays unread: each connection asks it
        # (and says so) until the copy can be made.
        d.addErrback(lambda f: f.trap(StateError)).addBoth(done)

    def blocked(self, ip: str) -> Deferred:
        """Fires with True if `ip` is blocked now; fails with StateError if
        the store cannot say, or cannot record this IP's earlier failures."""
        ip = client_key(ip, self.limits.ipv6_prefix)
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
        ip = client_key(ip, self.limits.ipv6_prefix)

        def verdict(v: FailureVerdict) -> FailureVerdict:
            if v.new_block:
                self._set_here += 1
                if self.board is not None:
                    self.board.block_set()
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
