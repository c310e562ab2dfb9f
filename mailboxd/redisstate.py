"""The StateStore on Redis, for front ends that share one state: the same
interface and meaning as `SQLiteStateStore`, on one Redis (or a Redis
behind a proxy that speaks to one primary) that other things may share.

Every key starts with a prefix (``mailbox:`` unless told). Per item:

    popauth:<ip>      hash {expires, domains}           index popauths: ip -> expires
    fail:<ip>         zset of failure ids by instant    index fails: ip -> last failure
    block:<ip>        hash {since, until}               index blocks: ip -> until
    relay:<sender>    hash minute -> recipients         index relays: sender -> last minute
    lease:<name>      hash {owner, until}               index leases: name -> until
    events            zset "<id> <at> <what>" by id     event-id: the last id (INCR)

Every update of more than one command is one Lua script, so that front
ends counting at once cannot race (an eleventh failure let through, a count
lost, two holders of a lease). The instants are the caller's wall time, as
for SQLite, and every comparison is made with the instants stored: Redis's
own clock may differ from the caller's (tests move it). Every key has a
TTL longer than the data means something (its duration and a margin), so
what ended disappears by itself; only `event-id` has none, because event
ids must only grow (a server remembers the last one it saw). prune() drops
what the indices say has ended, and returns the blocks that ended, like the
SQLite store's; it is not needed for correctness.

A block that ended stays in its hash until its TTL (block time + failure
window + margin) or prune: that is what makes an ended block "take its
failures with it" (failures at or before its end no longer count), as the
SQLite store's row does until prune deletes both.

The scripts build key names from the prefix (prune does, for what the
indices list), which a single Redis allows; a Redis Cluster would need
every key declared and on one slot: not supported.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from twisted.logger import Logger

from .state import (
    RELAY_BUCKET,
    RELAY_WINDOW,
    Block,
    FailureLimit,
    FailureVerdict,
    Lease,
    PopAuth,
    RelayCount,
    StateError,
)

log = Logger()

T = TypeVar("T")

MARGIN = 3600  # seconds a key outlives what its data means (TTLs only collect garbage)
EVENTS_KEPT = 7 * 86400  # like the SQLite store: operator events of the last week
CONNECT_TIMEOUT = 1.0  # seconds: a dead Redis fails a call fast, not a thread for long
SOCKET_TIMEOUT = 2.0
HEALTH_CHECK = 15  # seconds idle after which a pooled connection is checked first
# redis-py errors that mean Redis cannot be reached (AuthenticationError and
# BusyLoadingError are ConnectionErrors); others (a ResponseError) are answers.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

# Extends the TTL of `key` to `ttl` seconds, never shortens it (an index
# outlives its longest item).
KEEP = """
local function keep(key, ttl)
    if redis.call('TTL', key) < tonumber(ttl) then
        redis.call('EXPIRE', key, ttl)
    end
end
local function raise(index, score, member)
    local old = redis.call('ZSCORE', index, member)
    if not old or tonumber(old) < tonumber(score) then
        redis.call('ZADD', index, score, member)
    end
end
"""

ADD_POPAUTH = (
    KEEP
    + """
-- KEYS: popauth:<ip>, popauths; ARGV: now, expires, domain, ttl, ip
local old = redis.call('HMGET', KEYS[1], 'expires', 'domains')
local set = {[ARGV[3]] = true}
if old[1] and tonumber(old[1]) > tonumber(ARGV[1]) and old[2] then
    for d in string.gmatch(old[2], '%S+') do set[d] = true end
end
local list = {}
for d in pairs(set) do table.insert(list, d) end
table.sort(list)
local domains = table.concat(list, ' ')
redis.call('HSET', KEYS[1], 'expires', ARGV[2], 'domains', domains)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
keep(KEYS[2], ARGV[4])
return domains
"""
)

RECORD_FAILURE = (
    KEEP
    + """
-- KEYS: fail:<ip>, block:<ip>, fails, blocks
-- ARGV: at, at - window, at + block_for, failure ttl, block ttl, ip, member, limit
local at = tonumber(ARGV[1])
local since = '(' .. ARGV[2]
local ended = redis.call('HGET', KEYS[2], 'until')
if ended then
    if tonumber(ended) > at then  -- blocked: not recorded
        return {1, redis.call('ZCOUNT', KEYS[1], since, '+inf'), 0}
    end
    -- A block that has ended took its failures with it.
    if tonumber(ended) > tonumber(ARGV[2]) then since = '(' .. ended end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])  -- out of the window
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[7])
keep(KEYS[1], ARGV[4])
raise(KEYS[3], ARGV[1], ARGV[6])
keep(KEYS[3], ARGV[4])
local recorded = redis.call('ZCOUNT', KEYS[1], since, '+inf')
if recorded < tonumber(ARGV[8]) then
    return {0, recorded, 0}
end
redis.call('HSET', KEYS[2], 'since', ARGV[1], 'until', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[6])
keep(KEYS[4], ARGV[5])
return {1, recorded, 1}
"""
)

COUNT_RELAY = (
    KEEP
    + """
-- KEYS: relay:<sender>, relays; ARGV: minute, first minute out of the hour, limit, ttl, sender
local counts = redis.call('HGETALL', KEYS[1])
local since = tonumber(ARGV[2])
local found = 0
for i = 1, #counts, 2 do
    if tonumber(counts[i]) > since then
        found = found + tonumber(counts[i + 1])
    else
        redis.call('HDEL', KEYS[1], counts[i])
    end
end
local limit = tonumber(ARGV[3])
if limit > 0 and found >= limit then
    return {0, found}
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
keep(KEYS[1], ARGV[4])
raise(KEYS[2], ARGV[1], ARGV[5])
keep(KEYS[2], ARGV[4])
return {1, found + 1}
"""
)

NOTE = (
    KEEP
    + """
-- KEYS: event-id, events; ARGV: at, what, ttl
local id = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], id, id .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
keep(KEYS[2], ARGV[3])
return id
"""
)

# Takes (or extends) each lease of KEYS[2..] that `owner` holds or that has
# ended; returns the names another owner holds.
TAKE_LEASES = (
    KEEP
    + """
-- KEYS: leases, lease:<name>...; ARGV: now, owner, until, ttl, name...
local now = tonumber(ARGV[1])
local lost = {}
for i = 2, #KEYS do
    local held = redis.call('HMGET', KEYS[i], 'owner', 'until')
    if held[1] and held[2] and tonumber(held[2]) > now and held[1] ~= ARGV[2] then
        table.insert(lost, held[1])
        table.insert(lost, ARGV[3 + i])
    else
        redis.call('HSET', KEYS[i], 'owner', ARGV[2], 'until', ARGV[3])
        redis.call('EXPIRE', KEYS[i], ARGV[4])
        redis.call('ZADD', KEYS[1], ARGV[3], ARGV[3 + i])
    end
end
keep(KEYS[1], ARGV[4])
return lost
"""
)

RELEASE_LEASE = """
-- KEYS: lease:<name>, leases; ARGV: owner, name
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

PRUNE = """
-- KEYS: blocks, popauths, fails, events, relays, leases
-- ARGV: prefix, now, now - failure window, now - a week, last minute out of the hour
local P, now = ARGV[1], tonumber(ARGV[2])
local ended = {}
for _, ip in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])) do
    local key = P .. 'block:' .. ip
    local b = redis.call('HMGET', key, 'since', 'until')
    if not b[2] or tonumber(b[2]) <= now then
        if b[2] then
            table.insert(ended, ip)
            table.insert(ended, b[1])
            table.insert(ended, b[2])
            redis.call('DEL', key)
            -- its failures ended with it
            redis.call('ZREMRANGEBYSCORE', P .. 'fail:' .. ip, '-inf', b[2])
        end
        redis.call('ZREM', KEYS[1], ip)
    end
end
for _, ip in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])) do
    local key = P .. 'popauth:' .. ip
    local expires = redis.call('HGET', key, 'expires')
    if not expires or tonumber(expires) <= now then
        redis.call('DEL', key)
        redis.call('ZREM', KEYS[2], ip)
    end
end
for _, ip in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[3])) do
    redis.call('DEL', P .. 'fail:' .. ip)
    redis.call('ZREM', KEYS[3], ip)
end
local old = tonumber(ARGV[4])
for _, event in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local at = string.match(event, '^%S+ (%S+)')
    if at and tonumber(at) <= old then redis.call('ZREM', KEYS[4], event) end
end
for _, sender in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[5])) do
    redis.call('DEL', P .. 'relay:' .. sender)
    redis.call('ZREM', KEYS[5], sender)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', ARGV[2])) do
    local key = P .. 'lease:' .. name
    local until_ = redis.call('HGET', key, 'until')
    if not until_ or tonumber(until_) <= now then
        redis.call('DEL', key)
        redis.call('ZREM', KEYS[6], name)
    end
end
return ended
"""


def _ttl(seconds: float) -> int:
    """The TTL of a key whose data means something for `seconds`."""
    return max(0, math.ceil(seconds)) + MARGIN


def _above(x: float) -> str:
    """A score range bound: greater than x."""
    return f"({float(x)!r}"


def redacted(url: str) -> str:
    """`url` without its password and query (options may hold one too)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        user = f"{parts.username}@" if parts.username else ""
    except ValueError:
        return "(an unreadable redis URL)"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _check(url: str) -> None:
    """ValueError for what redis-py would take silently in a wrong sense: a
    database that is not a number (it would use database 0)."""
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss") and parts.path.strip("/"):
        database = parts.path.strip("/")
        if not database.isdigit():
            raise ValueError(f"the database {database!r} is not a number")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


class RedisStateStore:
    """The StateStore on Redis at `url`, its keys under `prefix`.

    `url`: ``redis://[[user]:password@]host:port/db``, ``rediss://...``
    (TLS; ``?ssl_ca_certs=...`` and redis-py's other query options), or
    ``unix:///path?db=0``. Calls from several threads share one pool of
    connections; a connection that Redis dropped (it restarted) is made
    again by itself.
    """

    def __init__(self, url: str, prefix: str = "mailbox:") -> None:
        self.url = redacted(url)
        self.prefix = prefix
        self._lock = threading.Lock()
        self._unreachable: str | None = None
        try:
            _check(url)
            # Any: redis-py types its replies as every form any option gives
            # (bytes or str, RESP2 or RESP3); with decode_responses they are str.
            self._redis: Any = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=SOCKET_TIMEOUT,
                health_check_interval=HEALTH_CHECK,
                # Once more at once, on a new connection, if one from the pool
                # was dropped: not after a timeout (a dead host would cost twice).
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                client_name="mailboxd",
            )
        except (ValueError, TypeError, redis.RedisError) as e:
            raise StateError(
                f"{self.url}: cannot use this state store URL: {_one_line(e)}"
            ) from None
        r = self._redis
        self._add_popauth = r.register_script(ADD_POPAUTH)
        self._record_failure = r.register_script(RECORD_FAILURE)
        self._count_relay = r.register_script(COUNT_RELAY)
        self._note = r.register_script(NOTE)
        self._take_leases = r.register_script(TAKE_LEASES)
        self._release_lease = r.register_script(RELEASE_LEASE)
        self._prune = r.register_script(PRUNE)

    def __repr__(self) -> str:
        return f"RedisStateStore({self.url!r}, prefix={self.prefix!r})"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _do(self, work: Callable[[], T]) -> T:
        """`work`, with a redis error as StateError; says once when Redis
        stops answering, and once when it answers again."""
        try:
            result = work()
        except UNREACHABLE as e:
            problem = _one_line(e)
            with self._lock:
                first, self._unreachable = self._unreachable is None, problem
            if first:
                log.error(
                    "state store unreachable: {url}: {error}",
                    url=self.url,
                    error=problem,
                    store="redis",
                )
            raise StateError(f"{self.url}: {problem}") from None
        except redis.RedisError as e:
            raise StateError(f"{self.url}: {_one_line(e)}") from None
        if self._unreachable is not None:
            with self._lock:
                back, self._unreachable = self._unreachable is not None, None
            if back:
                log.info("state store reachable again: {url}", url=self.url, store="redis")
        return result

    def ping(self) -> None:
        """Raise StateError unless Redis answers."""
        self._do(self._redis.ping)

    # --- POP-before-SMTP -------------------------------------------------------

    def popauth(self, ip: str, now: float) -> PopAuth | None:
        expires, domains = self._do(
            lambda: self._redis.hmget(self._key("popauth", ip), ["expires", "domains"])
        )
        if expires is None or float(expires) <= now:
            return None
        return PopAuth(ip, float(expires), tuple((domains or "").split()))

    def add_popauth(self, ip: str, now: float, expires: float, domain: str) -> PopAuth:
        """Authorise (or refresh) `ip` until `expires`, adding `domain` to its domains."""
        domains = self._do(
            lambda: self._add_popauth(
                keys=[self._key("popauth", ip), self._key("popauths")],
                args=[float(now), float(expires), domain, _ttl(expires - now), ip],
            )
        )
        return PopAuth(ip, float(expires), tuple(str(domains).split()))

    def popauths(self, now: float) -> list[PopAuth]:
        found = []
        for ip, (expires, domains) in self._items("popauths", "popauth", now, "expires", "domains"):
            if expires is not None and float(expires) > now:
                found.append(PopAuth(ip, float(expires), tuple((domains or "").split())))
        return sorted(found, key=lambda p: p.ip)

    def revoke_popauth(self, ip: str) -> bool:
        return self._delete(("popauth", ip), "popauths", ip)

    def _items(
        self, index: str, kind: str, after: float, *fields: str, prefix: str = ""
    ) -> list[tuple[str, list[str | None]]]:
        """(member, fields of its hash) of `index`'s members scored above
        `after` whose names start with `prefix`."""

        def read() -> list[tuple[str, list[str | None]]]:
            names = self._redis.zrangebyscore(self._key(index), _above(after), "+inf")
            names = [name for name in names if name.startswith(prefix)]
            if not names:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hmget(self._key(kind, name), list(fields))
            return list(zip(names, pipe.execute(), strict=True))

        return self._do(read)

    def _delete(self, key: tuple[str, ...], index: str, member: str) -> bool:
        """Delete the key and its index entry; whether the key was there."""

        def delete() -> Any:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key(*key))
            pipe.zrem(self._key(index), member)
            return pipe.execute()

        return bool(self._do(delete)[0])

    # --- failed logins and blocks ---------------------------------------------

    def record_failure(self, ip: str, at: float, limit: FailureLimit) -> FailureVerdict:
        """Count one failed login, and block `ip` if it reaches the limit.

        One script, so that failures counted at once by several front ends
        never add up to more than `limit.count`: once the IP is blocked, a
        failure is not recorded.
        """
        member = f"{float(at)!r}:{secrets.token_hex(6)}"  # two failures may share an instant
        blocked, recorded, new_block = self._do(
            lambda: self._record_failure(
                keys=[
                    self._key("fail", ip),
                    self._key("block", ip),
                    self._key("fails"),
                    self._key("blocks"),
                ],
                args=[
                    float(at),
                    float(at - limit.window),
                    float(at + limit.block_for),
                    _ttl(limit.window),
                    _ttl(limit.block_for + limit.window),
                    ip,
                    member,
                    limit.count,
                ],
            )
        )
        return FailureVerdict(bool(blocked), int(recorded), new_block=bool(new_block))

    def failures(self, ip: str, since: float) -> int:
        return int(
            self._do(lambda: self._redis.zcount(self._key("fail", ip), _above(since), "+inf"))
        )

    def clear_failures(self, ip: str) -> None:
        self._delete(("fail", ip), "fails", ip)

    def block(self, ip: str, now: float) -> Block | None:
        since, until = self._do(
            lambda: self._redis.hmget(self._key("block", ip), ["since", "until"])
        )
        if since is None or until is None or float(until) <= now:
            return None
        return Block(ip, float(since), float(until))

    def blocks(self, now: float) -> list[Block]:
        found = []
        for ip, (since, until) in self._items("blocks", "block", now, "since", "until"):
            if since is not None and until is not None and float(until) > now:
                found.append(Block(ip, float(since), float(until)))
        return sorted(found, key=lambda b: b.ip)

    def unblock(self, ip: str) -> bool:
        def unblock() -> Any:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key("block", ip))
            pipe.zrem(self._key("blocks"), ip)
            pipe.delete(self._key("fail", ip))
            pipe.zrem(self._key("fails"), ip)
            return pipe.execute()

        return bool(self._do(unblock)[0])

    def prune(self, now: float, failure_window: float) -> list[Block]:
        """Drop what expired; return the blocks that ended, for the log."""
        indices = ("blocks", "popauths", "fails", "events", "relays", "leases")
        ended = self._do(
            lambda: self._prune(
                keys=[self._key(index) for index in indices],
                args=[
                    self.prefix,
                    float(now),
                    float(now - failure_window),
                    float(now - EVENTS_KEPT),
                    int((now - RELAY_WINDOW) // RELAY_BUCKET),
                ],
            )
        )
        return [
            Block(ended[i], float(ended[i + 1]), float(ended[i + 2]))
            for i in range(0, len(ended), 3)
        ]

    # --- relay counts ------------------------------------------------------------

    def count_relay(self, sender: str, now: float, limit: int) -> RelayCount:
        """Count one relayed recipient for `sender` (an account, or an IP),
        unless it already relayed `limit` (0: no limit) in the last hour.
        One script, so that front ends counting at once never let more
        through than the limit."""
        allowed, count = self._do(
            lambda: self._count_relay(
                keys=[self._key("relay", sender), self._key("relays")],
                args=[
                    int(now // RELAY_BUCKET),
                    int((now - RELAY_WINDOW) // RELAY_BUCKET),
                    int(limit),
                    _ttl(RELAY_WINDOW + RELAY_BUCKET),
                    sender,
                ],
            )
        )
        return RelayCount(bool(allowed), int(count))

    def relay_counts(self, now: float) -> list[tuple[str, int]]:
        """(sender, recipients relayed in the last hour), most first."""
        since = int((now - RELAY_WINDOW) // RELAY_BUCKET)

        def read() -> list[tuple[str, dict[str, str]]]:
            senders = self._redis.zrangebyscore(self._key("relays"), f"({since}", "+inf")
            if not senders:
                return []
            pipe = self._redis.pipeline(transaction=False)
            for sender in senders:
                pipe.hgetall(self._key("relay", sender))
            return list(zip(senders, pipe.execute(), strict=True))

        counts = []
        for sender, minutes in self._do(read):
            n = sum(int(c) for m, c in minutes.items() if int(m) > since)
            if n:
                counts.append((sender, n))
        return sorted(counts, key=lambda c: (-c[1], c[0]))

    def reset_relay(self, sender: str) -> bool:
        return self._delete(("relay", sender), "relays", sender)

    # --- operator events ---------------------------------------------------------

    def note(self, at: float, what: str) -> None:
        """Record an operator's change, so the server's log shows it too."""
        self._do(
            lambda: self._note(
                keys=[self._key("event-id"), self._key("events")],
                args=[float(at), what, _ttl(EVENTS_KEPT)],
            )
        )

    def events_after(self, last: int) -> list[tuple[int, float, str]]:
        found = self._do(lambda: self._redis.zrangebyscore(self._key("events"), f"({last}", "+inf"))
        events = []
        for event in found:
            id_, at, what = event.split(" ", 2)
            events.append((int(id_), float(at), what))
        return events

    def forget(self) -> None:
        """Drop everything but the leases (and the event counter, which the
        server follows): a fresh start (mailboxd.testing)."""
        kept = {self._key("leases"), self._key("event-id")}

        def forget() -> None:
            doomed = [
                key
                for key in self._redis.scan_iter(match=self.prefix + "*", count=1000)
                if key not in kept and not key.startswith(self._key("lease", ""))
            ]
            for start in range(0, len(doomed), 500):
                self._redis.delete(*doomed[start : start + 500])

        self._do(forget)

    # --- leases --------------------------------------------------------------------

    def _take(self, names: list[str], owner: str, now: float, seconds: float) -> list[str]:
        """Take or extend `names` for `owner`; the owner and name of each one
        another owner holds, in turn."""
        result = self._do(
            lambda: self._take_leases(
                keys=[self._key("leases"), *(self._key("lease", name) for name in names)],
                args=[float(now), owner, float(now + seconds), _ttl(seconds), *names],
            )
        )
        return [str(x) for x in result]

    def take_lease(self, name: str, owner: str, now: float, seconds: float) -> str | None:
        """Take `name` for `owner` until now + seconds (or extend it, if
        `owner` holds it): None, or the owner that holds it now."""
        lost = self._take([name], owner, now, seconds)
        return lost[0] if lost else None

    def renew_leases(self, names: list[str], owner: str, now: float, seconds: float) -> list[str]:
        """Extend every lease of `names` that `owner` holds, or that has
        ended (taking it again); return the names another owner holds now."""
        if not names:
            return []
        lost = self._take(names, owner, now, seconds)
        return lost[1::2]

    def release_lease(self, name: str, owner: str) -> bool:
        """End `owner`'s lease on `name` now; False if it did not hold it."""
        return bool(
            self._do(
                lambda: self._release_lease(
                    keys=[self._key("lease", name), self._key("leases")], args=[owner, name]
                )
            )
        )

    def leases(self, prefix: str, now: float) -> list[Lease]:
        """The leases held now whose names start with `prefix`."""
        found = []
        held = self._items("leases", "lease", now, "owner", "until", prefix=prefix)
        for name, (owner, until) in held:
            if owner is not None and until is not None and float(until) > now:
                found.append(Lease(name, owner, float(until)))
        return sorted(found, key=lambda x: x.name)

    def close(self) -> None:
        """Close the connections; a later call would open new ones."""
        self._redis.close()
