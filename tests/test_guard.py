"""The guard's copy of the blocks table, which answers new connections."""

from __future__ import annotations

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mailboxd.config import LimitsSection
from mailboxd.connections import Board
from mailboxd.guard import COPY_FRESH, Guard
from mailboxd.state import SQLiteStateStore, StateError

IP, OTHER = "192.0.2.7", "192.0.2.8"
LIMITS = LimitsSection(
    auth_failures=3,
    auth_failure_window=3600,
    block_duration=3600,
    auth_cache_ttl=0,
    connections_per_ip=0,
)


class Runs:
    """Runs store calls at once, counting them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, f, *args):
        self.calls.append(getattr(f, "__name__", "?"))
        return maybeDeferred(f, *args)


def answer(d):
    found: list = []
    d.addBoth(found.append)
    (result,) = found
    return result


@pytest.fixture
def store(tmp_path):
    s = SQLiteStateStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def guard(store, board=None, clock=None):
    clock = clock or Clock()
    wall = lambda: 1_800_000_000 + clock.seconds()  # noqa: E731
    return Guard(store, wall, LIMITS, Runs(), clock=clock, board=board)


def block(g: Guard, ip: str) -> None:
    for _ in range(LIMITS.auth_failures):
        answer(g.failed(ip))


def test_connections_are_answered_from_the_copy_without_the_store(store):
    g = guard(store)
    assert answer(g.turned_away(IP)) is False  # the first one reads the copy too
    g.run.calls.clear()
    for ip in (IP, OTHER, "2001:db8::1"):
        assert answer(g.turned_away(ip)) is False
    assert g.run.calls == []


def test_a_block_set_here_turns_the_next_connection_away(store):
    g = guard(store)
    answer(g.turned_away(IP))
    block(g, IP)
    assert answer(g.turned_away(IP)) is True
    assert answer(g.turned_away(OTHER)) is False


def test_a_block_another_worker_sets_is_seen_at_once(store):
    primary = Board.create(2)
    child = Board(primary.fd, 2, 1)
    here, there = guard(store, primary), guard(store, child)
    answer(here.turned_away(IP))
    block(there, IP)
    assert answer(here.turned_away(IP)) is True


def test_a_block_set_behind_its_back_is_seen_within_a_second(store):
    clock = Clock()
    g = guard(store, clock=clock)
    answer(g.turned_away(IP))
    block(guard(store, clock=clock), IP)  # another Guard, on no shared board
    assert answer(g.turned_away(IP)) is False  # the copy says so, for now
    clock.advance(COPY_FRESH)
    assert answer(g.turned_away(IP)) is True


def test_an_unblocked_ip_is_let_in_at_once(store):
    g = guard(store)
    block(g, IP)
    assert answer(g.turned_away(IP)) is True
    store.unblock(IP)  # mailboxctl unblock
    assert answer(g.turned_away(IP)) is False


def test_a_store_that_cannot_be_read_fails_each_connection_as_blocked_does(store):
    g = guard(store)

    def broken(*args):
        raise StateError("database is locked")

    g.store.blocks = broken  # type: ignore[method-assign]
    g.store.block = broken  # type: ignore[method-assign]
    result = answer(g.turned_away(IP))
    assert result.check(StateError)
    assert not g._copying  # the next connection tries to copy again
