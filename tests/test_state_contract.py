"""The state store's behaviour, the same on every backend: SQLite (the
embedded default) and Redis (a real redis-server; each test under its own
key prefix)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

import pytest

from mailboxd.state import (
    Block,
    FailureLimit,
    Lease,
    PopAuth,
    SQLiteStateStore,
    StateStore,
    state_path,
)

T0 = 1_790_000_000.0
LIMIT = FailureLimit(count=3, window=600, block_for=300)


@pytest.fixture(params=["sqlite", "redis"])
def stores(request, tmp_path) -> Callable[[], StateStore]:
    """Make stores of one backend that share one state, as processes would."""
    made: list = []
    if request.param == "sqlite":
        path = state_path(tmp_path)

        def make() -> StateStore:
            made.append(SQLiteStateStore(path, timeout=5.0))
            return made[-1]
    else:
        from mailboxd.redisstate import RedisStateStore

        url = request.getfixturevalue("redis_server").url
        prefix = f"t{secrets.token_hex(4)}:"

        def make() -> StateStore:
            made.append(RedisStateStore(url, prefix=prefix))
            return made[-1]

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(stores) -> StateStore:
    return stores()


def at_once(n: int, work: Callable[[int], None]) -> None:
    """Run work(0..n-1) in n threads started together."""
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- POP-before-SMTP ----------------------------------------------------------------


def test_popauth_adds_refreshes_expires_and_is_revoked(store):
    ip, other = "192.0.2.7", "2001:db8::1"
    assert store.popauth(ip, T0) is None
    assert store.add_popauth(ip, T0, T0 + 600, "example.test") == PopAuth(
        ip, T0 + 600, ("example.test",)
    )
    # Refreshed: a later end, and the domains of both logins.
    assert store.add_popauth(ip, T0 + 10, T0 + 610, "another.test") == PopAuth(
        ip, T0 + 610, ("another.test", "example.test")
    )
    assert store.add_popauth(ip, T0 + 11, T0 + 611, "example.test").domains == (
        "another.test",
        "example.test",
    )
    assert store.popauth(ip, T0 + 600) == PopAuth(ip, T0 + 611, ("another.test", "example.test"))
    store.add_popauth(other, T0, T0 + 100.5, "example.test")
    assert store.popauths(T0 + 50) == [
        PopAuth(ip, T0 + 611, ("another.test", "example.test")),
        PopAuth(other, T0 + 100.5, ("example.test",)),
    ]  # by address
    assert store.popauth(other, T0 + 100.5) is None  # ended
    assert store.popauths(T0 + 101) == [PopAuth(ip, T0 + 611, ("another.test", "example.test"))]
    # An authorisation that ended does not lend its domains to the next one.
    assert store.add_popauth(other, T0 + 200, T0 + 800, "other.test").domains == ("other.test",)
    assert store.revoke_popauth(ip) and not store.revoke_popauth(ip)
    assert store.popauth(ip, T0 + 50) is None
    assert [p.ip for p in store.popauths(T0)] == [other]


# --- failed logins and blocks ------------------------------------------------------


def test_failures_block_at_the_limit_and_a_blocked_ip_is_not_recorded(store):
    ip = "192.0.2.7"
    v = store.record_failure(ip, T0, LIMIT)
    assert (v.blocked, v.recorded, v.new_block, v.counted) == (False, 1, False, True)
    assert store.record_failure(ip, T0 + 1, LIMIT).recorded == 2
    assert store.record_failure("192.0.2.8", T0 + 1, LIMIT).recorded == 1  # per address
    v = store.record_failure(ip, T0 + 2, LIMIT)
    assert (v.blocked, v.recorded, v.new_block) == (True, 3, True)
    assert store.block(ip, T0 + 2) == Block(ip, T0 + 2, T0 + 302)
    v = store.record_failure(ip, T0 + 3, LIMIT)  # blocked: not recorded
    assert (v.blocked, v.recorded, v.new_block, v.counted) == (True, 3, False, False)
    assert store.failures(ip, 0.0) == 3
    assert store.failures(ip, T0 + 0.5) == 2  # after the instant given
    assert store.blocks(T0 + 100) == [Block(ip, T0 + 2, T0 + 302)]
    assert store.block("192.0.2.8", T0 + 100) is None
    assert store.block(ip, T0 + 302) is None and store.blocks(T0 + 302) == []  # ended


def test_failures_out_of_the_window_do_not_count(store):
    ip = "192.0.2.7"
    store.record_failure(ip, T0, LIMIT)
    store.record_failure(ip, T0 + 1, LIMIT)
    v = store.record_failure(ip, T0 + 600, LIMIT)  # T0 is out (the window is T0+600-600, ...]
    assert (v.blocked, v.recorded) == (False, 2)


def test_an_ended_block_takes_its_failures_with_it(store):
    ip = "192.0.2.7"
    for i in range(3):
        store.record_failure(ip, T0 + i, LIMIT)
    assert store.block(ip, T0 + 10) is not None
    # The block ends at T0+302, inside the failure window of its failures:
    # they caused it and it is over, so the next failure is the first again.
    v = store.record_failure(ip, T0 + 303, LIMIT)
    assert (v.blocked, v.recorded, v.new_block) == (False, 1, False)
    assert store.record_failure(ip, T0 + 304, LIMIT).recorded == 2
    v = store.record_failure(ip, T0 + 305, LIMIT)
    assert (v.blocked, v.recorded, v.new_block) == (True, 3, True)
    assert store.block(ip, T0 + 305) == Block(ip, T0 + 305, T0 + 605)
    # A failure at the very end of a block is one of its own: it ends with it.
    store.unblock(ip)
    for i in range(3):
        store.record_failure(ip, T0 + 1000 + i, LIMIT)
    assert store.record_failure(ip, T0 + 1302, LIMIT).recorded == 0
    assert store.record_failure(ip, T0 + 1303, LIMIT).recorded == 1


def test_unblock_clears_the_failures(store):
    ip = "192.0.2.7"
    for i in range(3):
        store.record_failure(ip, T0 + i, LIMIT)
    assert store.unblock(ip) and not store.unblock(ip)
    assert store.block(ip, T0 + 3) is None and store.failures(ip, 0.0) == 0
    assert store.record_failure(ip, T0 + 3, LIMIT).recorded == 1
    store.clear_failures(ip)
    assert store.failures(ip, 0.0) == 0
    store.clear_failures("192.0.2.99")  # nothing to clear: no error


def test_prune_returns_the_blocks_that_ended_and_drops_what_expired(store):
    for i in range(3):
        store.record_failure("192.0.2.7", T0 + i, LIMIT)
    store.record_failure("192.0.2.8", T0, LIMIT)
    store.add_popauth("192.0.2.9", T0, T0 + 60, "example.test")
    store.note(T0, "an event")
    assert store.prune(T0 + 100, LIMIT.window) == []  # nothing ended yet
    assert store.failures("192.0.2.8", 0.0) == 1
    assert store.prune(T0 + 302, LIMIT.window) == [Block("192.0.2.7", T0 + 2, T0 + 302)]
    assert store.prune(T0 + 303, LIMIT.window) == []  # once
    assert store.failures("192.0.2.7", 0.0) == 0  # they ended with the block
    assert not store.unblock("192.0.2.7")  # gone
    assert store.popauth("192.0.2.9", T0) is None  # pruned: not there, asked about any instant
    assert not store.revoke_popauth("192.0.2.9")
    store.prune(T0 + 601, LIMIT.window)
    assert store.failures("192.0.2.8", 0.0) == 0  # out of the window
    assert [what for _, _, what in store.events_after(0)] == ["an event"]
    store.prune(T0 + 7 * 86400 + 1, LIMIT.window)
    assert store.events_after(0) == []  # a week on


def test_failures_counted_at_once_never_pass_the_limit(stores):
    limit = FailureLimit(count=10, window=600, block_for=300)
    instances = [stores() for _ in range(4)]  # as four processes...
    verdicts = []

    def fail(i: int) -> None:  # ...of four threads each
        for _ in range(5):
            verdicts.append(instances[i % 4].record_failure("192.0.2.7", T0, limit))

    at_once(16, fail)
    assert len(verdicts) == 80
    assert sum(v.counted for v in verdicts) == 10
    assert sum(v.new_block for v in verdicts) == 1
    assert max(v.recorded for v in verdicts) == 10
    assert instances[0].failures("192.0.2.7", 0.0) == 10


# --- relay counts --------------------------------------------------------------------


def test_the_relay_limit_holds_and_the_hour_slides(store):
    for i in range(3):
        assert store.count_relay("a@example.test", T0 + i, 3).allowed
    over = store.count_relay("a@example.test", T0 + 10, 3)
    assert not over.allowed and over.count == 3
    assert store.count_relay("b@example.test", T0 + 10, 3).allowed  # per sender
    assert store.count_relay("a@example.test", T0 + 10, 0).allowed  # 0: no limit
    assert store.relay_counts(T0 + 20) == [("a@example.test", 4), ("b@example.test", 1)]
    assert store.count_relay("a@example.test", T0 + 3600 + 61, 3).allowed  # an hour on
    store.prune(T0 + 3600 + 61, 3600)
    assert store.relay_counts(T0 + 3600 + 61) == [("a@example.test", 1)]
    assert store.reset_relay("a@example.test") and not store.reset_relay("a@example.test")
    assert store.relay_counts(T0 + 3600 + 61) == []


def test_relay_counts_slide_by_the_minute(store):
    m0 = 1_790_000_040.0  # the first second of a minute
    store.count_relay("a@example.test", m0, 2)
    store.count_relay("a@example.test", m0 + 1800, 2)
    assert not store.count_relay("a@example.test", m0 + 3599, 2).allowed
    assert store.relay_counts(m0 + 3599) == [("a@example.test", 2)]
    # The minute of m0 leaves the hour an hour after its first second.
    assert store.relay_counts(m0 + 3600) == [("a@example.test", 1)]
    assert store.count_relay("a@example.test", m0 + 3600, 2).allowed


def test_senders_counting_at_once_never_pass_the_limit(stores):
    instances = [stores() for _ in range(4)]
    allowed = []

    def relay(i: int) -> None:
        for _ in range(25):
            allowed.append(instances[i % 4].count_relay("a@example.test", T0, 120).allowed)

    at_once(8, relay)
    assert allowed.count(True) == 120
    assert instances[0].relay_counts(T0) == [("a@example.test", 120)]


# --- operator events -----------------------------------------------------------------


def test_events_come_in_order_after_the_last_one_seen(store):
    assert store.events_after(0) == []
    store.note(T0, "unblocked 192.0.2.7")
    store.note(T0 - 5, "reset the relay count of a b  c")  # an earlier instant: still later
    store.note(T0 + 1, "deleted queued message 1")
    events = store.events_after(0)
    assert [(at, what) for _, at, what in events] == [
        (T0, "unblocked 192.0.2.7"),
        (T0 - 5, "reset the relay count of a b  c"),
        (T0 + 1, "deleted queued message 1"),
    ]
    ids = [i for i, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.events_after(ids[0]) == events[1:]
    assert store.events_after(ids[-1]) == []


# --- leases --------------------------------------------------------------------------


def test_one_holder_until_the_lease_ends(store):
    assert store.take_lease("pop3:a@example.test", "A", T0, 30) is None
    assert store.take_lease("pop3:a@example.test", "B", T0 + 10, 30) == "A"
    assert store.take_lease("pop3:a@example.test", "A", T0 + 10, 30) is None  # extended
    assert store.take_lease("pop3:a@example.test", "B", T0 + 39, 30) == "A"
    assert store.take_lease("pop3:a@example.test", "B", T0 + 40, 30) is None  # ended
    assert store.leases("pop3:", T0 + 41) == [Lease("pop3:a@example.test", "B", T0 + 70)]
    assert not store.release_lease("pop3:a@example.test", "A")  # not A's any more
    assert store.release_lease("pop3:a@example.test", "B")
    assert store.leases("pop3:", T0 + 41) == []


def test_renewing_keeps_what_is_held_and_names_what_was_lost(store):
    for name in ("queue:1", "queue:2"):
        assert store.take_lease(name, "A", T0, 30) is None
    assert store.take_lease("queue:3", "B", T0, 30) is None
    # queue:2 ended unrenewed and B took it; queue:4 was never held: A takes it.
    assert store.take_lease("queue:2", "B", T0 + 31, 30) is None
    lost = store.renew_leases(["queue:1", "queue:2", "queue:4"], "A", T0 + 31, 30)
    assert lost == ["queue:2"]
    assert [(x.name, x.owner) for x in store.leases("queue:", T0 + 32)] == [
        ("queue:1", "A"),
        ("queue:2", "B"),
        ("queue:4", "A"),
    ]  # queue:3 ended unrenewed
    assert store.renew_leases([], "A", T0 + 32, 30) == []
    store.prune(T0 + 31, 3600)  # what ended goes: asked about an earlier instant, it is not there
    assert [x.name for x in store.leases("", T0)] == ["queue:1", "queue:2", "queue:4"]


def test_leases_are_listed_by_prefix(store):
    store.take_lease("pop3:b", "A", T0, 30)
    store.take_lease("pop3:a", "A", T0, 30)
    store.take_lease("queue:1", "A", T0, 30)
    assert [x.name for x in store.leases("pop3:", T0)] == ["pop3:a", "pop3:b"]
    assert [x.name for x in store.leases("", T0)] == ["pop3:a", "pop3:b", "queue:1"]
    assert store.leases("nothing", T0) == []


def test_owners_taking_at_once_make_one_holder(stores):
    instances = [stores() for _ in range(4)]
    for round_ in range(5):
        name = f"node:{round_}"
        refused: list[str | None] = []

        def take(i: int, name: str = name, refused: list = refused) -> None:
            refused.append(instances[i % 4].take_lease(name, f"owner{i}", T0, 30))

        at_once(8, take)
        assert refused.count(None) == 1
        holder = instances[0].leases(name, T0)[0].owner
        assert sorted(r for r in refused if r is not None) == [holder] * 7


def test_forget_drops_everything_but_the_leases(store):
    store.add_popauth("192.0.2.1", T0, T0 + 60, "example.test")
    store.record_failure("192.0.2.2", T0, FailureLimit(1, 3600, 60))
    store.count_relay("a@example.test", T0, 10)
    store.note(T0, "something")
    store.take_lease("node:mx1", "A", T0, 30)
    store.forget()
    assert store.popauths(T0) == [] and store.blocks(T0) == []
    assert store.failures("192.0.2.2", 0.0) == 0 and store.relay_counts(T0) == []
    assert store.events_after(0) == []
    assert [x.name for x in store.leases("", T0)] == ["node:mx1"]
    store.note(T0, "after")  # the counter goes on: a server that follows it sees this
    assert [what for _, _, what in store.events_after(0)] == ["after"]
