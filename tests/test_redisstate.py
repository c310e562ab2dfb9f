"""What only the Redis state store has: its URLs, its errors, its outages
and its keys (its behaviour: tests/test_state_contract.py)."""

from __future__ import annotations

import secrets
import socket
import time

import pytest
from twisted.logger import Logger

from mailboxd import redisstate
from mailboxd.redisstate import RedisStateStore
from mailboxd.state import FailureLimit, StateError

T0 = 1_790_000_000.0


@pytest.fixture
def logged(monkeypatch):
    """The events the store logs."""
    events: list[dict] = []
    monkeypatch.setattr(redisstate, "log", Logger(observer=events.append))
    return events


def messages(events: list[dict]) -> list[str]:
    return [e["log_format"].split(":")[0] for e in events]


def test_an_outage_fails_fast_is_logged_once_and_ends_by_itself(tmp_path, logged):
    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        store = RedisStateStore(server.url, prefix="outage:")
        store.ping()
        assert store.count_relay("a@example.test", T0, 0).count == 1
        server.stop()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(StateError) as e:
                store.count_relay("a@example.test", T0, 0)
            assert time.monotonic() - started < 3
            assert str(e.value).startswith(f"{server.url}: ")
            assert "\n" not in str(e.value)
        with pytest.raises(StateError):
            store.ping()
        assert messages(logged) == ["state store unreachable"]
        assert logged[0]["url"] == server.url and logged[0]["error"]
        server.restart()  # on the same port, empty (nothing was saved)
        # The same instance, its connections made again, its scripts loaded again.
        assert store.count_relay("a@example.test", T0, 0).count == 1
        assert store.take_lease("node:1", "A", T0, 30) is None
        store.ping()
        assert messages(logged) == ["state store unreachable", "state store reachable again"]
        store.close()
    finally:
        server.stop()


def test_a_redis_that_never_answers_fails_within_the_timeout(logged):
    silent = socket.socket()  # the kernel accepts connections; nobody reads
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        store = RedisStateStore(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        with pytest.raises(StateError):
            store.record_failure("192.0.2.7", T0, FailureLimit(3, 600, 300))
        assert time.monotonic() - started < 3
        assert messages(logged) == ["state store unreachable"]
        store.close()
    finally:
        silent.close()


def test_a_password_and_a_unix_socket(tmp_path):
    from redis_server import RedisServer

    server = RedisServer(tmp_path, password="s3cret-pw").start()
    try:
        for url in (server.url, server.unix_url):
            store = RedisStateStore(url, prefix=f"t{secrets.token_hex(4)}:")
            store.ping()
            assert store.take_lease("node:1", "A", T0, 30) is None
            assert "s3cret-pw" not in repr(store)
            store.close()
        wrong = RedisStateStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(StateError) as e:
            wrong.ping()
        assert "wrong-pw" not in str(e.value)
        assert str(e.value).startswith(f"redis://127.0.0.1:{server.port}/0: ")
        assert RedisStateStore(server.unix_url).url == f"unix://{server.socket}"
        none = RedisStateStore(f"redis://127.0.0.1:{server.port}/0")  # no password
        with pytest.raises(StateError) as e:
            none.ping()
        assert "\n" not in str(e.value)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/0",
        "redis://127.0.0.1:notaport/0",
        "redis://:pw@127.0.0.1:6379/zero",
        "redis://127.0.0.1:6379/0?socket_timeout=soon",
        "",
    ],
)
def test_a_url_that_cannot_be_used(url):
    with pytest.raises(StateError) as e:
        RedisStateStore(url)
    assert "\n" not in str(e.value) and "pw" not in str(e.value)
    assert "cannot use this state store URL" in str(e.value)


def test_tls_urls_are_accepted():
    store = RedisStateStore("rediss://:pw@127.0.0.1:1/0?ssl_cert_reqs=none")
    assert store.url == "rediss://127.0.0.1:1/0"
    store.close()


def test_every_key_is_under_the_prefix_and_expires(redis_server):
    import redis

    prefix = f"t{secrets.token_hex(4)}:"
    store = RedisStateStore(redis_server.url, prefix=prefix)
    limit = FailureLimit(count=2, window=600, block_for=300)
    store.add_popauth("192.0.2.7", T0, T0 + 600, "example.test")
    store.record_failure("192.0.2.7", T0, limit)
    store.record_failure("192.0.2.7", T0, limit)  # blocked
    store.count_relay("a@example.test", T0, 10)
    store.note(T0, "an event")
    store.take_lease("node:1", "A", T0, 30)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = set(r.scan_iter(match=f"{prefix}*"))
    names = {k.removeprefix(prefix) for k in keys}
    assert names == {
        "popauth:192.0.2.7",
        "popauths",
        "fail:192.0.2.7",
        "fails",
        "block:192.0.2.7",
        "blocks",
        "relay:a@example.test",
        "relays",
        "events",
        "event-id",
        "lease:node:1",
        "leases",
    }
    ttls = {name: r.ttl(prefix + name) for name in names}
    assert ttls.pop("event-id") == -1  # event ids only grow: never expires
    margin = redisstate.MARGIN
    assert 600 + margin - 5 <= ttls["popauth:192.0.2.7"] <= 600 + margin
    assert 600 + margin - 5 <= ttls["fail:192.0.2.7"] <= 600 + margin
    assert 900 + margin - 5 <= ttls["block:192.0.2.7"] <= 900 + margin
    assert 3660 + margin - 5 <= ttls["relay:a@example.test"] <= 3660 + margin
    assert 30 + margin - 5 <= ttls["lease:node:1"] <= 30 + margin
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # An index lives as long as its longest item.
    assert ttls["blocks"] >= ttls["block:192.0.2.7"] and ttls["fails"] >= ttls["fail:192.0.2.7"]
    r.close()
    store.close()
