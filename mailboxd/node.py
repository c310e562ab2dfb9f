"""This front end among others that share one mail directory and one state
store: its name, and what it holds for a while as leases in the store (the
name itself, the mailboxes its POP3 sessions have open, the queue entries it
delivers).

A lease lasts `[state] lease` seconds unless renewed; each process renews
all of its own together, a third of that apart. A front end that dies stops
renewing, and what it held passes to the others when the leases end.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .clocks import Wall
from .instance import process_alive
from .state import StateError, StateStore

log = Logger()

NODE = "node:"
POP3 = "pop3:"
QUEUE = "queue:"


def process_owner(node: str) -> str:
    """Who holds a lease: the node, the host it runs on, and the process."""
    return f"{node}@{socket.gethostname()}/{os.getpid()}"


def holder_host(owner: str) -> str:
    return owner.partition("@")[2].rpartition("/")[0]


class NameInUse(Exception):
    """Another running front end has this node's name; str() says which."""


def claim_name(store: StateStore, node: str, owner: str, now: float, lease: float) -> None:
    """Take the node's name (blocking, at start). A holder on this host whose
    process has ended (killed: it could not give the name back) is replaced
    at once; a live one, or one on another host, is refused (NameInUse), as
    is a store that cannot say (StateError)."""
    name = NODE + node
    holder = store.take_lease(name, owner, now, lease)
    if holder is None:
        return
    if holder_host(holder) == socket.gethostname() and not _alive(holder):
        store.release_lease(name, holder)
        holder = store.take_lease(name, owner, now, lease)
        if holder is None:
            return
    raise NameInUse(f"the node name {node!r} is in use by {holder}")


def _alive(owner: str) -> bool:
    pid = owner.rpartition("/")[2]
    return not pid.isdigit() or process_alive(int(pid))


@attrs.define(eq=False)
class Leases:
    """The leases one process holds under one owner: taken and released one
    at a time, renewed together. A name taken twice here (two sessions on
    one mailbox, which its lock file then tells apart) is held until both
    have released it."""

    store: StateStore
    run: Callable[..., Deferred]  # runs a store call off the reactor thread
    wall: Wall
    clock: Any
    owner: str
    seconds: float
    lost: Callable[[list[str]], object] = lambda names: None
    held: dict[str, int] = attrs.field(factory=dict)  # name -> takers here
    _loop: LoopingCall | None = None
    _failing: bool = False
    # The store calls run one after another, in the order asked: a release
    # and the next take of one name, or a renewal, must not overtake each other.
    _order: DeferredLock = attrs.field(factory=DeferredLock)

    def _call(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return self._order.run(self.run, f, *args)

    def take(self, name: str) -> Deferred:
        """Fires with None once `name` is held, or with its other holder."""
        if name in self.held:
            self.held[name] += 1
            return succeed(None)

        def taken(holder: str | None) -> str | None:
            if holder is None:
                self.held[name] = self.held.get(name, 0) + 1
            return holder

        d = self._call(self.store.take_lease, name, self.owner, self.wall(), self.seconds)
        return d.addCallback(taken)

    def release(self, name: str) -> None:
        count = self.held.get(name, 0) - 1
        if count > 0:
            self.held[name] = count
            return
        if self.held.pop(name, None) is None:
            return
        d = self._call(self.store.release_lease, name, self.owner)
        d.addErrback(lambda f: f.trap(StateError))  # it ends by itself

    def renew(self) -> Deferred:
        if not self.held:
            return succeed(None)

        def renewed(lost: list[str]) -> None:
            if self._failing:
                self._failing = False
                log.info("leases renewed again")
            if lost:
                log.error("leases taken by another front end: {names}", names=" ".join(lost))
                for name in lost:
                    self.held.pop(name, None)
                self.lost(lost)

        def failed(f: Any) -> None:
            f.trap(StateError)
            if not self._failing:
                self._failing = True
                log.error("cannot renew leases: {error}", error=str(f.value))

        def renew() -> Deferred:
            # What is held when the call's turn comes, not when it was asked.
            names = sorted(self.held)
            if not names:
                return succeed([])
            return self.run(self.store.renew_leases, names, self.owner, self.wall(), self.seconds)

        return self._order.run(renew).addCallbacks(renewed, failed)

    def start(self) -> None:
        self._loop = LoopingCall(self.renew)
        self._loop.clock = self.clock
        self._loop.start(self.seconds / 3, now=False)

    def stop(self) -> None:
        """Stop renewing, and give back what is held, at once: this runs as the
        service stops, beside the thread pools' own stop, which may drop work
        queued to them (then a Deferred waiting for it would never fire, and
        the shutdown with it). A store that cannot answer costs its timeout
        once; the leases end by themselves then."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        names, self.held = list(self.held), {}
        for name in names:
            try:
                self.store.release_lease(name, self.owner)
            except StateError:
                break  # the others fail alike: they end by themselves


@attrs.define(eq=False)
class LeasesService(Service):
    leases: Leases

    def startService(self) -> None:
        super().startService()
        self.leases.start()

    def stopService(self) -> None:
        super().stopService()
        self.leases.stop()


@attrs.define(eq=False)
class Claims:
    """Which queue entries this front end delivers: one lease per entry,
    renewed (or taken) for every entry in its queue at once, so that each is
    delivered by one front end, and a dead one's pass to another when its
    leases end. While the store cannot be reached, nothing is held: delivery
    waits rather than risk two front ends sending one message."""

    store: StateStore
    run: Callable[..., Deferred]
    wall: Wall
    owner: str
    seconds: float
    held: set[str] = attrs.field(factory=set)
    _failing: bool = False

    def renew(self, ids: list[str], everything: bool = True) -> Deferred:
        """Hold what can be held of `ids` (`everything`: and nothing else):
        fires with the ids held now that were not before."""
        before = self.held

        def renewed(lost: list[str]) -> set[str]:
            if self._failing:
                self._failing = False
                log.info("queue claims renewed again")
            others = {name[len(QUEUE) :] for name in lost}
            won = set(ids) - others
            self.held = won if everything else (before - others) | won
            return won - before

        def failed(f: Any) -> set[str]:
            f.trap(StateError)
            self.held = set()
            if not self._failing:
                self._failing = True
                log.error(
                    "queue: cannot claim entries, delivery waits: {error}", error=str(f.value)
                )
            return set()

        names = [QUEUE + i for i in ids]
        d = self.run(self.store.renew_leases, names, self.owner, self.wall(), self.seconds)
        return d.addCallbacks(renewed, failed)
