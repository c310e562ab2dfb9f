"""Leases in the state store: one holder at a time, ended by time or release."""

from __future__ import annotations

from mailboxd.state import Lease, SQLiteStateStore, state_path

T0 = 1_790_000_000.0


def test_one_holder_until_the_lease_ends(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
    assert store.take_lease("pop3:a@example.test", "A", T0, 30) is None
    assert store.take_lease("pop3:a@example.test", "B", T0 + 10, 30) == "A"
    assert store.take_lease("pop3:a@example.test", "A", T0 + 10, 30) is None  # extended
    assert store.take_lease("pop3:a@example.test", "B", T0 + 39, 30) == "A"
    assert store.take_lease("pop3:a@example.test", "B", T0 + 40, 30) is None  # ended
    assert store.leases("pop3:", T0 + 41) == [Lease("pop3:a@example.test", "B", T0 + 70)]
    assert not store.release_lease("pop3:a@example.test", "A")  # not A's any more
    assert store.release_lease("pop3:a@example.test", "B")
    assert store.leases("pop3:", T0 + 41) == []


def test_renewing_keeps_what_is_held_and_names_what_was_lost(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
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
    store.prune(T0 + 31, 3600)  # what ended goes: asked about an earlier instant, it is not there
    assert [x.name for x in store.leases("", T0)] == ["queue:1", "queue:2", "queue:4"]
