"""workers.Pool: the threads behind the storage, hashing and state pools."""

from __future__ import annotations

import threading
import time

import pytest
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailboxd.workers import Pool

WAIT = 10.0  # seconds a test waits for a thread before it fails


class Results:
    """Collects onResult calls (made on the pool's threads)."""

    def __init__(self) -> None:
        self.items: list[tuple[bool, object]] = []
        self.cond = threading.Condition()

    def __call__(self, ok: bool, result: object) -> None:
        with self.cond:
            self.items.append((ok, result))
            self.cond.notify_all()

    def wait_for(self, count: int) -> list[tuple[bool, object]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= count, WAIT)
            return list(self.items)


@pytest.fixture
def pool():
    p = Pool(minthreads=0, maxthreads=3, name="test")
    yield p
    p.stop()


def test_result_and_failure_reach_on_result(pool):
    results = Results()
    pool.start()
    pool.callInThreadWithCallback(results, lambda a, b=0: a + b, 2, b=3)
    pool.callInThreadWithCallback(results, lambda: 1 / 0)
    first, second = sorted(results.wait_for(2), key=lambda r: r[0], reverse=True)
    assert first == (True, 5)
    assert second[0] is False
    assert isinstance(second[1], Failure) and second[1].check(ZeroDivisionError)


def test_work_runs_off_the_calling_thread(pool):
    results = Results()
    pool.start()
    pool.callInThreadWithCallback(results, threading.get_ident)
    [(ok, ident)] = results.wait_for(1)
    assert ok and ident != threading.get_ident()


def test_work_handed_in_before_start_waits_for_it(pool):
    results = Results()
    for n in range(5):
        pool.callInThreadWithCallback(results, lambda n=n: n)
    time.sleep(0.05)
    assert results.items == [] and pool._threads == []
    pool.start()
    assert sorted(r for _, r in results.wait_for(5)) == [0, 1, 2, 3, 4]
    assert len(pool._threads) == 3  # five waiting: as many threads as allowed


def test_threads_grow_with_concurrent_work_up_to_max(pool):
    """Blocked work does not hold back the next: each gets a thread, up to max."""
    pool.start()
    release = threading.Event()
    started = threading.Semaphore(0)
    results = Results()

    def blocked() -> str:
        started.release()
        assert release.wait(WAIT)
        return "done"

    for _ in range(5):
        pool.callInThreadWithCallback(results, blocked)
    for _ in range(3):  # three run at once, though none has finished
        assert started.acquire(timeout=WAIT)
    assert not started.acquire(timeout=0.1)  # the fourth waits for a thread
    assert len(pool._threads) == 3
    release.set()
    assert [r for _, r in results.wait_for(5)] == ["done"] * 5


def test_an_idle_thread_takes_new_work_instead_of_a_new_thread(pool):
    results = Results()
    pool.start()
    for n in range(20):  # one after another: one thread is enough
        pool.callInThreadWithCallback(results, lambda n=n: n)
        results.wait_for(n + 1)
        time.sleep(0.001)  # let the thread count itself idle again
    assert len(pool._threads) == 1


def test_minthreads_start_with_the_pool():
    p = Pool(minthreads=2, maxthreads=4, name="test")
    try:
        p.start()
        assert len(p._threads) == 2
        results = Results()
        p.callInThreadWithCallback(results, lambda: 1)
        p.callInThreadWithCallback(results, lambda: 2)
        assert sorted(r for _, r in results.wait_for(2)) == [1, 2]
        assert len(p._threads) == 2  # the idle ones took it
    finally:
        p.stop()


def test_stop_finishes_work_already_handed_in_and_ends_the_threads(pool):
    results = Results()
    pool.start()
    for n in range(10):
        pool.callInThreadWithCallback(results, lambda n=n: (time.sleep(0.01), n)[1])
    threads = list(pool._threads)
    pool.stop()
    assert sorted(r for _, r in results.items) == list(range(10))
    assert not any(t.is_alive() for t in threads)


def test_work_after_stop_is_not_run(pool):
    results = Results()
    pool.start()
    pool.stop()
    pool.callInThreadWithCallback(results, lambda: 1)
    time.sleep(0.05)
    assert results.items == []


def test_a_failure_with_no_on_result_is_logged():
    events: list[dict] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    p = Pool(maxthreads=1, name="test-pool")
    try:
        p.start()
        p.callInThread(lambda: 1 / 0)
        p.stop()
    finally:
        globalLogPublisher.removeObserver(observer)
    [event] = [e for e in events if e.get("pool") == "test-pool"]
    assert event["log_failure"].check(ZeroDivisionError)


def test_nothing_of_finished_work_is_kept_alive(pool):
    """A thread waiting for work holds no reference to the last work's
    arguments or result (a message's bytes, a file)."""
    import gc
    import weakref

    class Big:
        pass

    results = Results()
    pool.start()
    big = Big()
    ref = weakref.ref(big)
    pool.callInThreadWithCallback(results, lambda b: None, big)
    results.wait_for(1)
    del big
    results.items.clear()
    time.sleep(0.01)
    gc.collect()
    assert ref() is None


def test_in_pool_fires_its_deferred_through_the_reactor(pool):
    from mailboxd.workers import in_pool

    class Reactor:
        def __init__(self) -> None:
            self.calls: list = []
            self.cond = threading.Condition()

        def callFromThread(self, f, *args) -> None:
            with self.cond:
                self.calls.append((f, args))
                self.cond.notify_all()

    reactor = Reactor()
    pool.start()
    results: list = []
    in_pool(reactor, pool, lambda a, b: a * b, 6, 7).addCallback(results.append)
    in_pool(reactor, pool, lambda: 1 / 0).addErrback(results.append)
    with reactor.cond:
        assert reactor.cond.wait_for(lambda: len(reactor.calls) == 2, WAIT)
    assert results == []  # nothing fires on the pool's threads
    for f, args in reactor.calls:  # the reactor's turn
        f(*args)
    assert 42 in results
    [failure] = [r for r in results if isinstance(r, Failure)]
    assert failure.check(ZeroDivisionError)


def test_a_failing_callback_is_logged_and_the_thread_serves_on():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    p = Pool(maxthreads=1, name="test-callback")
    try:
        p.start()

        def broken(ok, result):
            raise RuntimeError("callback")

        p.callInThreadWithCallback(broken, lambda: 1)
        results = Results()
        p.callInThreadWithCallback(results, lambda: 2)
        assert results.wait_for(1) == [(True, 2)]
        assert len(p._threads) == 1
    finally:
        p.stop()
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("pool") == "test-callback"]
    assert event["log_failure"].check(RuntimeError)
