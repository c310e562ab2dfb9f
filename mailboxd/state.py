"""Runtime state shared by the server and mailboxctl: POP authorisations,
authentication failures, IP blocks and the relay counts of the last hour.

`StateStore` is the interface; `SQLiteStateStore` is the embedded default, a
file under the mail directory. A cluster would put the same interface on
Redis. Every call is a short indexed query, made in the server's state
thread pool (each thread has its own connection, so a reader never waits
behind a writer held up by a lock); SQLite runs in WAL mode with
``synchronous=NORMAL``, so a commit does not wait for the disk: a process
crash loses nothing, a power cut may lose the last seconds of it (an
authorisation or a block), which is the trade this data can afford.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs

from .private import private_dir

if TYPE_CHECKING:
    from .config import Config

SCHEMA = """
CREATE TABLE IF NOT EXISTS popauth (
    ip TEXT PRIMARY KEY, expires REAL NOT NULL, domains TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (ip TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_ip ON failures (ip, at);
CREATE TABLE IF NOT EXISTS blocks (ip TEXT PRIMARY KEY, until REAL NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, what TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relayed (
    sender TEXT NOT NULL, minute INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (sender, minute));
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
"""
# What each table must have; a file with other tables of these names is not ours.
COLUMNS = {
    "popauth": "ip, expires, domains",
    "failures": "ip, at",
    "blocks": "ip, since, until",
    "events": "id, at, what",
    "relayed": "sender, minute, count",
    "leases": "name, owner, until",
}
RELAY_WINDOW = 3600  # seconds: relay limits count the last hour...
RELAY_BUCKET = 60  # ...in buckets of a minute, so a sender costs at most 60 rows


T = TypeVar("T")


class StateError(Exception):
    """The state store cannot be used; str() is one line for the operator."""


@attrs.frozen
class PopAuth:
    ip: str
    expires: float
    domains: tuple[str, ...]


@attrs.frozen
class Block:
    ip: str
    since: float
    until: float


@attrs.frozen
class FailureLimit:
    """When failures turn into a block: `count` within `window` seconds."""

    count: int
    window: float
    block_for: float


@attrs.frozen
class FailureVerdict:
    blocked: bool  # the IP is blocked now (by this failure or before it)
    recorded: int  # failures on record within the window; this one included unless blocked
    new_block: bool = False  # this failure set the block

    @property
    def counted(self) -> bool:
        """False if the IP was blocked already: the failure was not recorded."""
        return self.new_block or not self.blocked


@attrs.frozen
class Lease:
    """`name` is held by `owner` until `until` (wall time) unless renewed."""

    name: str
    owner: str
    until: float


@attrs.frozen
class RelayCount:
    allowed: bool  # counted: under the limit
    count: int  # recipients relayed in the last hour, this one included if allowed


class StateStore(Protocol):
    def popauth(self, ip: str, now: float) -> PopAuth | None: ...
    def add_popauth(self, ip: str, now: float, expires: float, domain: str) -> PopAuth: ...
    def popauths(self, now: float) -> list[PopAuth]: ...
    def revoke_popauth(self, ip: str) -> bool: ...
    def record_failure(self, ip: str, at: float, limit: FailureLimit) -> FailureVerdict: ...
    def failures(self, ip: str, since: float) -> int: ...
    def clear_failures(self, ip: str) -> None: ...
    def block(self, ip: str, now: float) -> Block | None: ...
    def blocks(self, now: float) -> list[Block]: ...
    def unblock(self, ip: str) -> bool: ...
    def prune(self, now: float, failure_window: float) -> list[Block]: ...
    def count_relay(self, sender: str, now: float, limit: int) -> RelayCount: ...
    def relay_counts(self, now: float) -> list[tuple[str, int]]: ...
    def reset_relay(self, sender: str) -> bool: ...
    def note(self, at: float, what: str) -> None: ...
    def events_after(self, last: int) -> list[tuple[int, float, str]]: ...
    def take_lease(self, name: str, owner: str, now: float, seconds: float) -> str | None: ...
    def renew_leases(
        self, names: list[str], owner: str, now: float, seconds: float
    ) -> list[str]: ...
    def release_lease(self, name: str, owner: str) -> bool: ...
    def leases(self, prefix: str, now: float) -> list[Lease]: ...
    def forget(self) -> None: ...
    def close(self) -> None: ...


class SQLiteStateStore:
    """The embedded StateStore: one SQLite file, shared with mailboxctl."""

    def __init__(self, path: Path, timeout: float = 0.5) -> None:
        """Open (or create) the store; `timeout` bounds a wait for another writer."""
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            private_dir(path.parent)
            db = self._connect()
            # SQLite makes the file (and its -wal and -shm, like it) 0644 less the umask.
            # Not ours to change if another user made it (root's mailboxctl): then
            # it stays as that user left it.
            with contextlib.suppress(PermissionError):
                os.chmod(path, 0o600)
            # Check before writing anything: a file that is not ours stays as it is.
            existing = {
                name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            for table in existing & COLUMNS.keys():
                db.execute(f"SELECT {COLUMNS[table]} FROM {table} LIMIT 0").fetchall()
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise StateError(f"{path}: cannot use the state store: {e}") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            str(self.path), timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._all.append(db)
        self._local.db = db
        return db

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = self._connect()
            except sqlite3.Error as e:
                raise StateError(f"{self.path}: {e}") from None
        return db

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None

    def popauth(self, ip: str, now: float) -> PopAuth | None:
        row = self._run(
            "SELECT ip, expires, domains FROM popauth WHERE ip = ? AND expires > ?", (ip, now)
        ).fetchone()
        return None if row is None else PopAuth(row[0], row[1], tuple(row[2].split()))

    def popauths(self, now: float) -> list[PopAuth]:
        rows = self._run(
            "SELECT ip, expires, domains FROM popauth WHERE expires > ? ORDER BY ip", (now,)
        )
        return [PopAuth(r[0], r[1], tuple(r[2].split())) for r in rows]

    def revoke_popauth(self, ip: str) -> bool:
        return self._run("DELETE FROM popauth WHERE ip = ?", (ip,)).rowcount > 0

    def add_popauth(self, ip: str, now: float, expires: float, domain: str) -> PopAuth:
        """Authorise (or refresh) `ip` until `expires`, adding `domain` to its domains."""

        def add(db: sqlite3.Connection) -> PopAuth:
            row = db.execute(
                "SELECT domains FROM popauth WHERE ip = ? AND expires > ?", (ip, now)
            ).fetchone()
            domains = tuple(sorted({domain, *(row[0].split() if row else ())}))
            db.execute(
                "INSERT OR REPLACE INTO popauth (ip, expires, domains) VALUES (?, ?, ?)",
                (ip, expires, " ".join(domains)),
            )
            return PopAuth(ip, expires, domains)

        return self._transaction(add)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in one write transaction: other threads and processes wait for it."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            finally:
                # Never leave this thread's connection inside a transaction
                # (holding the write lock, refusing the next BEGIN).
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
        except sqlite3.Error as e:
            raise StateError(f"{self.path}: {e}") from None
        return result

    def record_failure(self, ip: str, at: float, limit: FailureLimit) -> FailureVerdict:
        """Count one failed login, and block `ip` if it reaches the limit.

        One write transaction, so that failures counted at once by several
        threads or processes never add up to more than `limit.count`: once
        the IP is blocked, a failure is not recorded.
        """
        return self._transaction(lambda db: self._record_failure(db, ip, at, limit))

    @staticmethod
    def _record_failure(
        db: sqlite3.Connection, ip: str, at: float, limit: FailureLimit
    ) -> FailureVerdict:
        # A block that has ended took its failures with it: they caused it,
        # and it is over (until prune deletes them, they are only skipped).
        ended = db.execute(
            "SELECT max(until) FROM blocks WHERE ip = ? AND until <= ?", (ip, at)
        ).fetchone()[0]
        since = at - limit.window if ended is None else max(at - limit.window, ended)
        count = "SELECT count(*) FROM failures WHERE ip = ? AND at > ?"
        if db.execute("SELECT 1 FROM blocks WHERE ip = ? AND until > ?", (ip, at)).fetchone():
            return FailureVerdict(True, db.execute(count, (ip, since)).fetchone()[0])
        db.execute("INSERT INTO failures (ip, at) VALUES (?, ?)", (ip, at))
        recorded = db.execute(count, (ip, since)).fetchone()[0]
        if recorded < limit.count:
            return FailureVerdict(False, recorded)
        db.execute(
            "INSERT OR REPLACE INTO blocks (ip, since, until) VALUES (?, ?, ?)",
            (ip, at, at + limit.block_for),
        )
        return FailureVerdict(True, recorded, new_block=True)

    def failures(self, ip: str, since: float) -> int:
        return self._run(
            "SELECT count(*) FROM failures WHERE ip = ? AND at > ?", (ip, since)
        ).fetchone()[0]

    def clear_failures(self, ip: str) -> None:
        self._run("DELETE FROM failures WHERE ip = ?", (ip,))

    def block(self, ip: str, now: float) -> Block | None:
        row = self._run(
            "SELECT ip, since, until FROM blocks WHERE ip = ? AND until > ?", (ip, now)
        ).fetchone()
        return None if row is None else Block(*row)

    def blocks(self, now: float) -> list[Block]:
        rows = self._run("SELECT ip, since, until FROM blocks WHERE until > ? ORDER BY ip", (now,))
        return [Block(*r) for r in rows]

    def unblock(self, ip: str) -> bool:
        found = self._run("DELETE FROM blocks WHERE ip = ?", (ip,)).rowcount > 0
        self.clear_failures(ip)
        return found

    def prune(self, now: float, failure_window: float) -> list[Block]:
        """Drop what expired; return the blocks that ended, for the log."""
        ended = [
            Block(*r)
            for r in self._run("SELECT ip, since, until FROM blocks WHERE until <= ?", (now,))
        ]
        self._run("DELETE FROM popauth WHERE expires <= ?", (now,))
        for block in ended:  # its failures ended with it
            self._run("DELETE FROM failures WHERE ip = ? AND at <= ?", (block.ip, block.until))
        self._run("DELETE FROM blocks WHERE until <= ?", (now,))
        self._run("DELETE FROM failures WHERE at <= ?", (now - failure_window,))
        self._run("DELETE FROM events WHERE at <= ?", (now - 7 * 86400,))
        old = int((now - RELAY_WINDOW) // RELAY_BUCKET)
        self._run("DELETE FROM relayed WHERE minute <= ?", (old,))
        self._run("DELETE FROM leases WHERE until <= ?", (now,))
        return ended

    def count_relay(self, sender: str, now: float, limit: int) -> RelayCount:
        """Count one relayed recipient for `sender` (an account, or an IP),
        unless it already relayed `limit` (0: no limit) in the last hour.
        One write transaction, so that processes counting at once never let
        more through than the limit."""

        def count(db: sqlite3.Connection) -> RelayCount:
            minute = int(now // RELAY_BUCKET)
            since = int((now - RELAY_WINDOW) // RELAY_BUCKET)
            found = db.execute(
                "SELECT coalesce(sum(count), 0) FROM relayed WHERE sender = ? AND minute > ?",
                (sender, since),
            ).fetchone()[0]
            if limit and found >= limit:
                return RelayCount(False, found)
            db.execute(
                "INSERT INTO relayed (sender, minute, count) VALUES (?, ?, 1) "
                "ON CONFLICT (sender, minute) DO UPDATE SET count = count + 1",
                (sender, minute),
            )
            return RelayCount(True, found + 1)

        return self._transaction(count)

    def relay_counts(self, now: float) -> list[tuple[str, int]]:
        """(sender, recipients relayed in the last hour), most first."""
        since = int((now - RELAY_WINDOW) // RELAY_BUCKET)
        rows = self._run(
            "SELECT sender, sum(count) AS n FROM relayed WHERE minute > ? "
            "GROUP BY sender ORDER BY n DESC, sender",
            (since,),
        )
        return [(r[0], r[1]) for r in rows]

    def reset_relay(self, sender: str) -> bool:
        return self._run("DELETE FROM relayed WHERE sender = ?", (sender,)).rowcount > 0

    def note(self, at: float, what: str) -> None:
        """Record an operator's change, so the server's log shows it too."""
        self._run("INSERT INTO events (at, what) VALUES (?, ?)", (at, what))

    def events_after(self, last: int) -> list[tuple[int, float, str]]:
        return list(self._run("SELECT id, at, what FROM events WHERE id > ? ORDER BY id", (last,)))

    def forget(self) -> None:
        """Drop everything but the leases: a fresh start (mailboxd.testing)."""
        for table in ("popauth", "failures", "blocks", "events", "relayed"):
            self._run(f"DELETE FROM {table}")  # noqa: S608 - our table names

    # Leases: what one front end holds for a while and no other may take
    # meanwhile (a node's name, a mailbox's POP3 session, a queue entry). A
    # holder that dies stops renewing, and the lease ends by itself.

    def take_lease(self, name: str, owner: str, now: float, seconds: float) -> str | None:
        """Take `name` for `owner` until now + seconds (or extend it, if
        `owner` holds it): None, or the owner that holds it now."""

        def take(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT owner FROM leases WHERE name = ? AND until > ?", (name, now)
            ).fetchone()
            if row is not None and row[0] != owner:
                return str(row[0])
            db.execute(
                "INSERT OR REPLACE INTO leases (name, owner, until) VALUES (?, ?, ?)",
                (name, owner, now + seconds),
            )
            return None

        return self._transaction(take)

    def renew_leases(self, names: list[str], owner: str, now: float, seconds: float) -> list[str]:
        """Extend every lease of `names` that `owner` holds, or that has
        ended (taking it again); return the names another owner holds now."""

        def renew(db: sqlite3.Connection) -> list[str]:
            lost = []
            for name in names:
                row = db.execute(
                    "SELECT owner FROM leases WHERE name = ? AND until > ?", (name, now)
                ).fetchone()
                if row is not None and row[0] != owner:
                    lost.append(name)
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO leases (name, owner, until) VALUES (?, ?, ?)",
                    (name, owner, now + seconds),
                )
            return lost

        return self._transaction(renew) if names else []

    def release_lease(self, name: str, owner: str) -> bool:
        """End `owner`'s lease on `name` now; False if it did not hold it."""
        found = "DELETE FROM leases WHERE name = ? AND owner = ?"
        return self._run(found, (name, owner)).rowcount > 0

    def leases(self, prefix: str, now: float) -> list[Lease]:
        """The leases held now whose names start with `prefix`."""
        rows = self._run(
            "SELECT name, owner, until FROM leases WHERE until > ? AND substr(name, 1, ?) = ? "
            "ORDER BY name",
            (now, len(prefix), prefix),
        )
        return [Lease(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for db in connections:
            db.close()


def open_store(config: Config, timeout: float = 0.5) -> StateStore:
    """The store `[state] backend` names; StateError if it cannot be used.
    `timeout` bounds a wait for another SQLite writer."""
    if config.state.backend == "redis":
        from .redisstate import RedisStateStore

        store = RedisStateStore(config.state.redis_url)
        try:
            store.ping()
        except StateError:
            store.close()
            raise
        return store
    return SQLiteStateStore(state_path(config.mailbox.mail_dir), timeout)


def state_path(mail_dir: Path) -> Path:
    return mail_dir / ".state" / "state.sqlite3"


@functools.lru_cache(maxsize=4096)
def client_key(ip: str, ipv6_prefix: int = 128) -> str:
    """What failed logins, blocks, connection caps and relay limits count an
    address under: an IPv4 address itself; an IPv6 address's network of
    `ipv6_prefix` bits (one host usually has a whole /64 to rotate through),
    written as 2001:db8:1:2::/64."""
    key = normalise_ip(ip)
    if ":" not in key or ipv6_prefix >= 128:
        return key
    try:
        return str(ipaddress.ip_network(f"{key}/{ipv6_prefix}", strict=False))
    except ValueError:
        return key


@functools.lru_cache(maxsize=4096)  # asked at every command; parsing is not free
def normalise_ip(ip: str) -> str:
    """The key form of a client address: IPv4-mapped IPv6 becomes IPv4."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
