"""The thread pools that keep slow work off the reactor thread.

One pool per kind of work, so that none waits behind another: a burst of
bcrypt checks must never delay a delivery's fsync, and a state database held
locked by another process must never delay a Maildir read.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

STORAGE_THREADS = 8  # spool files, Maildir deliveries and reads, the outbound queue
STATE_THREADS = 4  # SQLite: several, so that reads go on while a write waits for a lock
HASHING_NICENESS = 10  # bcrypt yields the CPU to the reactor and the storage threads

_lowered = threading.local()


@attrs.frozen
class Workers:
    reactor: Any
    storage: ThreadPool
    hashing: ThreadPool
    state: ThreadPool

    def disk(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.storage, f, *args)

    def hash(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.hashing, _niced, f, *args)

    def db(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.state, f, *args)

    @property
    def pools(self) -> tuple[ThreadPool, ...]:
        return (self.storage, self.hashing, self.state)


def hashing_threads() -> int:
    """One per core this process may use: bcrypt releases the GIL."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def make_workers(reactor: Any, hashing: int | None = None) -> Workers:
    return Workers(
        reactor,
        storage=ThreadPool(minthreads=1, maxthreads=STORAGE_THREADS, name="mailbox-storage"),
        hashing=ThreadPool(
            minthreads=0, maxthreads=hashing or hashing_threads(), name="mailbox-hash"
        ),
        state=ThreadPool(minthreads=1, maxthreads=STATE_THREADS, name="mailbox-state"),
    )


def _niced(f: Callable[..., Any], *args: Any) -> Any:
    # Linux schedules threads apart: a nicer hashing thread leaves the cores
    # to message intake first, and still gets every cycle nobody else wants.
    if not getattr(_lowered, "done", False):
        _lowered.done = True
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)
    return f(*args)
