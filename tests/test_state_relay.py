"""Relay counts in the state store: the limit holds, the hour slides."""

from __future__ import annotations

import threading

import pytest

from mailboxd.state import SQLiteStateStore, client_key, state_path

T0 = 1_790_000_000.0


def test_the_limit_holds_and_the_hour_slides(tmp_path):
    store = SQLiteStateStore(state_path(tmp_path))
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


def test_senders_counting_at_once_never_pass_the_limit(tmp_path):
    path = state_path(tmp_path)
    stores = [SQLiteStateStore(path, timeout=5.0) for _ in range(4)]  # as four processes
    allowed = []

    def relay(store: SQLiteStateStore) -> None:
        for _ in range(50):
            allowed.append(store.count_relay("a@example.test", T0, 120).allowed)

    threads = [threading.Thread(target=relay, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 120


@pytest.mark.parametrize(
    "ip, prefix, key",
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # IPv4-mapped: the IPv4 address
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::9", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2::9", 128, "2001:db8:1:2::9"),
        ("::1", 64, "::/64"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not an address", 64, "not an address"),
    ],
)
def test_what_an_address_is_counted_under(ip, prefix, key):
    assert client_key(ip, prefix) == key
