"""The thread pools that keep slow work off the reactor thread.

One pool per kind of work, so that none waits behind another: a burst of
bcrypt checks must never delay a delivery's fsync, and a state database held
locked by another process must never delay a Maildir read.

The pools are `Pool`s, not Twisted's `ThreadPool`: every message makes at
least one trip to the storage pool (a relayed one several), and a trip
through `ThreadPool` (its context capture, its team coordinator, and a
`queue.Queue` with a condition) cost about 50 us of CPU, a trip through a
`Pool` about 20 us (20,000 trips, 10 at a time; bench/README.md, issue 12's
fifth session). `in_pool` hands work to one, as
Twisted's `deferToThreadPool` does to a `ThreadPool`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

STORAGE_THREADS = 8  # spool files, Maildir deliveries and reads, the outbound queue
STATE_THREADS = 4  # SQLite: several, so that reads go on while a write waits for a lock
# DKIM signing and the inbound checks: mostly waiting for DNS answers, and
# never in the way of a delivery's fsync or a login.
CHECKS_THREADS = 16
# Message filters whose check blocks (`blocking = True`): a pool of their own,
# so that a plugin that hangs ties up these threads and no others.
FILTERS_THREADS = 8
HASHING_NICENESS = 10  # bcrypt yields the CPU to the reactor and the storage threads

_lowered = threading.local()
log = Logger()

OnResult = Callable[[bool, Any], object]
_STOP = None  # in the queue: the thread that takes it ends


class Pool:
    """Up to `maxthreads` threads taking work in order from one queue.

    What `in_pool` needs (`callInThreadWithCallback`, as Twisted's
    `ThreadPool` has it), `callInThread`, `start` and `stop`. Work
    handed in before `start` waits for it; `stop` lets the work already
    handed in finish, then joins the threads. Work that finds no idle
    thread starts one, up to `max`; threads are never ended before `stop`.
    """

    def __init__(
        self, minthreads: int = 0, maxthreads: int = 4, name: str = "pool", join: bool = True
    ) -> None:
        self.min, self.max, self.name = minthreads, maxthreads, name
        # False: `stop` does not wait for the threads (a site's filter may
        # never return; the threads are daemons, and end with the process).
        self.join = join
        self._queue: SimpleQueue[tuple[OnResult | None, Callable[..., Any], tuple, dict] | None]
        self._queue = SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Threads waiting for work that no one has claimed yet: work handed
        # in claims one, or starts one. Only exact until `max` threads run,
        # which is the only time it matters.
        self._idle = 0
        self._lock = threading.Lock()
        self._early = 0  # work handed in before start
        self.started = self.joined = False

    def callInThreadWithCallback(
        self, onResult: OnResult | None, func: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        if self.joined:
            return
        with self._lock:
            if not self.started:
                self._early += 1
            elif self._idle:
                self._idle -= 1
            else:
                self._start_threads(1, idle=False)
        self._queue.put((onResult, func, args, kw))

    def callInThread(self, func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)

    def start(self) -> None:
        with self._lock:
            self.started, self.joined = True, False
            busy = min(self.max, self._early)
            self._start_threads(busy, idle=False)
            self._start_threads(self.min - busy, idle=True)
            self._early = 0

    def stop(self) -> None:
        with self._lock:
            self.joined, self.started = True, False
            threads, self._threads, self._idle = self._threads, [], 0
        for _ in threads:
            self._queue.put(_STOP)
        for thread in threads if self.join else ():
            thread.join()

    def _start_threads(self, count: int, idle: bool) -> None:
        for _ in range(min(count, self.max - len(self._threads))):
            name = f"{self.name}-{len(self._threads)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._threads.append(thread)
            self._idle += idle
            thread.start()

    def _work(self) -> None:
        get, lock = self._queue.get, self._lock
        while (work := get()) is not _STOP:
            on_result, func, args, kw = work
            try:
                result, ok = func(*args, **kw), True
            except BaseException:
                result, ok = Failure(), False
            if on_result is None:
                if not ok:
                    log.failure("unhandled error in {pool} thread", result, pool=self.name)
            else:
                try:
                    on_result(ok, result)
                except Exception:  # noqa: BLE001 - the thread must live on to serve
                    log.failure("unhandled error in {pool} thread's callback", pool=self.name)
            # Nothing of the work stays alive while the thread waits.
            del work, on_result, func, args, kw, result
            with lock:
                self._idle += 1


class CallsInThreads(Protocol):
    """What `in_pool` needs of a pool: a `Pool`, or a test's stand-in."""

    def callInThreadWithCallback(
        self, onResult: OnResult | None, func: Callable[..., Any], *args: Any, **kw: Any
    ) -> None: ...


def in_pool(reactor: Any, pool: CallsInThreads, f: Callable[..., Any], *args: Any) -> Deferred:
    """`f(*args)` in one of `pool`'s threads; the Deferred fires on the
    reactor thread, with its result or its Failure (as deferToThreadPool)."""
    d: Deferred = Deferred()

    def on_result(ok: bool, result: Any) -> None:
        reactor.callFromThread(d.callback if ok else d.errback, result)

    pool.callInThreadWithCallback(on_result, f, *args)
    return d


@attrs.frozen
class Workers:
    reactor: Any
    storage: Pool
    hashing: Pool
    state: Pool
    checks: Pool = attrs.field(
        factory=lambda: Pool(minthreads=0, maxthreads=CHECKS_THREADS, name="mailbox-checks")
    )
    filters: Pool = attrs.field(
        factory=lambda: Pool(0, FILTERS_THREADS, name="mailbox-filters", join=False)
    )

    def disk(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.storage, f, *args)

    def hash(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.hashing, _niced, f, *args)

    def db(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.state, f, *args)

    def check(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.checks, f, *args)

    def filter(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.filters, f, *args)

    @property
    def pools(self) -> tuple[Pool, ...]:
        return (self.storage, self.hashing, self.state, self.checks, self.filters)


def hashing_threads() -> int:
    """One per core this process may use: bcrypt releases the GIL."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def make_workers(reactor: Any, hashing: int | None = None) -> Workers:
    return Workers(
        reactor,
        storage=Pool(minthreads=1, maxthreads=STORAGE_THREADS, name="mailbox-storage"),
        hashing=Pool(minthreads=0, maxthreads=hashing or hashing_threads(), name="mailbox-hash"),
        state=Pool(minthreads=1, maxthreads=STATE_THREADS, name="mailbox-state"),
    )


def _niced(f: Callable[..., Any], *args: Any) -> Any:
    # Linux schedules threads apart: a nicer hashing thread leaves the cores
    # to message intake first, and still gets every cycle nobody else wants.
    if not getattr(_lowered, "done", False):
        _lowered.done = True
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
    return f(*args)
