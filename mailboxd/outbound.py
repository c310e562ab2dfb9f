"""The outbound queue runner: delivers queued mail, retries, bounces.

One entry is worked on by one delivery at a time. Its due recipients are
grouped by destination (the smarthost, or the recipient's domain) and each
group goes in one SMTP transaction. Every outcome is written to the entry's
envelope before the next step, so a crash re-sends at most the transaction
that was in flight and never forgets a recipient.

The SMTP client, and its wait for the next message on a connection, are
sender.py's; here are the queue, the routes, the slots and the outcomes.
"""

from __future__ import annotations

import collections
import errno
import io
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.mail.smtp import SMTPClientError, SMTPConnectError
from twisted.python.failure import Failure

from . import queue
from .accounts import Account, Directory
from .addresses import parse_mailbox
from .bounce import FailedRecipient, build_dsn
from .clocks import Wall
from .config import Config
from .maildir import IncomingMessage
from .metrics import Metrics
from .node import Claims
from .printable import shown
from .queue import Entry, Recipient
from .resolver import twisted_resolver
from .routes import Hop, RouteError, destination, mx_hosts, parse_smarthost
from .sender import ONE_WRITE, Job, Sender, SenderFactory, Settings
from .smtp import Delivery
from .workers import Pool, in_pool

log = Logger()

# Seconds to wait after each failed attempt; then hourly until queue_lifetime.
BACKOFF = (60, 300, 900, 1800, 3600)
BAD_HOST_SECONDS = 300
REUSE_SECONDS = 5.0  # a connection waits this long for the next message to its host


def backoff(attempts: int) -> int:
    return BACKOFF[min(attempts, len(BACKOFF)) - 1] if attempts > 0 else 0


@attrs.frozen
class DeliveryOutcome:
    """What one recipient's attempt came to."""

    address: str
    code: int  # the SMTP reply code, or 0 when no server answered for it
    text: str
    status: str  # RFC 3463
    remote: str | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@attrs.define(eq=False)
class _Idle:
    """Connections that have sent a message and wait for the next one to the
    same host (RFC 5321 §3.3 allows many transactions a session), for
    `seconds`: the `sender.Parking` of every connection the queue opens.
    Each is used by one delivery at a time."""

    clock: Any
    seconds: float = REUSE_SECONDS
    _waiting: dict[Hop, list[tuple[Sender, float]]] = attrs.field(factory=dict)
    # Done with a message, its RSET not yet answered: about to wait here.
    _settling: set[Sender] = attrs.field(factory=set)

    def settle(self, sender: Sender) -> None:
        self._settling.add(sender)

    def park(self, hop: Hop, sender: Sender) -> None:
        self._settling.discard(sender)
        self._waiting.setdefault(hop, []).append((sender, self.clock.seconds() + self.seconds))

    def _all(self, dest: str | None) -> list[tuple[float, Sender]]:
        found = [(-1.0, s) for s in self._settling]
        found += [(until, s) for waiting in self._waiting.values() for s, until in waiting]
        return [(until, s) for until, s in found if dest is None or s.factory.dest == dest]

    def count(self, dest: str | None = None) -> int:
        """Connections between messages, in all or to `dest`."""
        return len(self._all(dest))

    def evict(self, dest: str | None = None) -> Deferred | None:
        """Let a connection between messages (to `dest`, if given) go, the
        longest-waiting first; fires once it is closed. None if there is none."""
        found = self._all(dest)
        if not found:
            return None
        _, sender = min(found, key=lambda pair: pair[0])
        sender.leave()
        return sender.closed

    def take(self, hop: Hop) -> Sender | None:
        """A connection waiting for `hop`, or None. One that has waited its
        time (its QUIT is due, the reactor was busy) is let go, not used."""
        waiting = self._waiting.get(hop, [])
        while waiting:
            sender, until = waiting.pop()
            if until > self.clock.seconds():
                break
            sender.leave()
        else:
            sender = None
        if not waiting:
            self._waiting.pop(hop, None)
        return sender

    def close_all(self) -> None:
        """Let every connection between messages go, those whose RSET is
        still on the way included."""
        for _, sender in self._all(None):
            sender.leave()

    def discard(self, hop: Hop, sender: Sender) -> None:
        self._settling.discard(sender)
        waiting = self._waiting.get(hop, [])
        waiting[:] = [(s, until) for s, until in waiting if s is not sender]
        if not waiting:
            self._waiting.pop(hop, None)


HELD_MAX = 16 << 20  # bytes of just-queued messages kept in memory for their first attempt


def _log_failure(f: Failure, queue_id: str) -> None:
    log.failure("queue: {queue_id} failed", f, queue_id=queue_id)


def _fail_unless_called(f: Failure, result: Deferred) -> None:
    if not result.called:
        result.errback(f)


def attempt_deadline(step_timeout: int) -> float:
    """How long one delivery attempt may take in all: four steps' worth, and
    at least ten minutes (a big message to a slow server)."""
    return max(4 * step_timeout, 600)


def _give_up(result: Deferred, connecting: Deferred) -> None:
    if not result.called:
        result.errback(SMTPConnectError(-1, "the delivery attempt took too long"))
    connecting.addCallback(
        lambda p: p.transport.abortConnection() if hasattr(p, "transport") else None
    )


def _text(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return " ".join(text.split())[:500]


_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def _status(code: int, text: str) -> str:
    """The reply's RFC 3463 code if it gives a well-formed one of the reply's
    class (the bounce builder takes nothing else), else X.0.0."""
    kind = str(code)[0] if 200 <= code < 600 else "4"
    words = text.split()
    if words and _ENHANCED.fullmatch(words[0]) and words[0][0] == kind:
        return words[0]
    return f"{kind}.0.0"


def outcomes_of(result: Any, recipients: list[str], remote: str) -> list[DeliveryOutcome]:
    """Per-recipient outcomes of a job's result or failure (see sender.py)."""
    if isinstance(result, tuple):  # (accepted count, [(address, code, reply)])
        _count, addresses = result
        data_code, data_text = 250, ""
    elif isinstance(result, SMTPClientError) and result.code > 0:
        addresses = result.addresses or []
        data_code, data_text = result.code, _text(result.resp)
    else:  # no SMTP answer at all: refused, timed out, TLS failed, not SMTP
        return [
            DeliveryOutcome(r, 0, _text(str(result)) or type(result).__name__, "4.4.1")
            for r in recipients
        ]
    by_address = {_text(a).lower(): (c, _text(t)) for a, c, t in addresses}
    outcomes = []
    for r in recipients:
        code, text = by_address.get(r.lower(), (data_code, data_text))
        if 200 <= code < 300 and not (200 <= data_code < 300) and data_code > 0:
            code, text = data_code, data_text  # accepted at RCPT, refused at DATA
        if code <= 0:
            code, text = 451, text or "no reply"
        outcomes.append(DeliveryOutcome(r, code, f"{code} {text}", _status(code, text), remote))
    return outcomes


@attrs.define(eq=False)
class Outbound:
    """Delivers what is in the queue directory; see the module docstring."""

    config: Config
    directory: Path
    clock: Any
    reactor: Any
    pool: Pool  # the storage pool
    accounts: Callable[[], Directory]
    resolver: Any
    mx_port: int = 25
    connect: Callable[[Hop, Any], Deferred] | None = None
    interval: float = 1.0
    delivered: Callable[[Delivery], object] | None = None  # told of local bounces (testing)
    wall: Wall = time.time
    metrics: Metrics = attrs.field(factory=Metrics)  # the process's
    # Leases on the entries this front end delivers, when front ends share
    # the queue directory (see node.py); None: every entry is ours.
    claims: Claims | None = None
    entries: dict[str, Entry] = attrs.field(factory=dict)
    # Per entry, wall time minus monotonic time when it was first looked at:
    # see `_now`.
    _anchors: dict[str, float] = attrs.field(factory=dict)
    _busy: set[str] = attrs.field(factory=set)
    _active: collections.Counter = attrs.field(factory=collections.Counter)
    _bad_hosts: dict[str, float] = attrs.field(factory=dict)
    _loop: LoopingCall | None = None
    _client_tls: Any = attrs.field(
        factory=lambda: CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2)
    )
    _finish_after: dict[str, float] = attrs.field(factory=dict)
    _removals: list[tuple[str, Deferred]] = attrs.field(factory=list)  # for _remove_next
    _removing: bool = False
    _held: dict[str, bytes] = attrs.field(factory=dict)  # messages for first attempts (`add`)
    _handed_over: set[str] = attrs.field(factory=set)  # adopted, not yet checked on disk
    _held_bytes: int = 0
    _idle: _Idle = attrs.field(init=False)
    _redispatch: bool = False
    _scanning: bool = False
    _rescan: bool = True
    _ticks: int = 0
    rescan_every: int = 5  # ticks: notices `mailboxctl queue delete` and stray files
    _claiming: bool = False
    _flushed: int | None = -1  # the flush file's time when last seen; -1: not yet looked
    _claim_again: bool = False
    _claim_all: bool = False  # renew every claim at the next _claim_now
    _to_claim: set[str] = attrs.field(factory=set)  # entries new since
    _foreign: set[str] = attrs.field(factory=set)  # entries another front end holds

    # --- running ------------------------------------------------------------

    def __attrs_post_init__(self) -> None:
        self._idle = _Idle(self.clock)

    def start(self) -> None:
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._idle.close_all()

    def wake(self) -> None:
        """Look at the directory on the next turn."""
        self._rescan = True
        self.clock.callLater(0, self.tick)

    def adopt(self, envelope: str, message: bytes | None = None) -> None:
        """Another process queued this (its envelope, as on disk, already
        fsynced, and maybe its message, as for `add`): deliver it. What it
        sent, not a read of the file, saves a trip to the disk threads."""
        try:
            entry = Entry.from_json(envelope)
        except queue.CorruptEntry:
            self._rescan = True  # the scan reads it from disk, or moves it aside
            return
        if re.fullmatch(r"[0-9A-F]{12}", entry.id) and entry.id not in self.entries:
            # A scan may have found this entry on disk before the handover
            # came, and delivered and removed it since: only the disk says.
            self._handed_over.add(entry.id)
            self.add(entry, message)

    def add(self, entry: Entry, message: bytes | None = None) -> None:
        """The SMTP server queued `entry` (already on disk): deliver it soon.

        `message`, the bytes of its file from `offset` on, spares the first
        attempt a trip to the disk threads to read them; it is kept only
        while the messages kept so take at most HELD_MAX bytes altogether."""
        if entry.id not in self.entries:
            self.entries[entry.id] = entry
            self._claim(entry.id)
            room = HELD_MAX - self._held_bytes
            if message is not None and len(message) <= min(ONE_WRITE, room):
                self._held[entry.id] = message
                self._held_bytes += len(message)
        if not self._redispatch:
            self._redispatch = True
            self.clock.callLater(0, self._dispatch_again)

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % self.rescan_every == 0:
            self._rescan = True
        if self.claims is not None and self._ticks % self._renew_every == 0:
            self._claim()
        # The flush file stays: every front end sharing the queue acts once
        # each time `mailboxctl queue flush` touches it.
        try:
            stamp: int | None = (self.directory / queue.FLUSH).stat().st_mtime_ns
        except OSError:
            stamp = None
        flushed, self._flushed = self._flushed, stamp
        if stamp is not None and flushed != stamp and flushed != -1:
            self._rescan = True
            for entry in self.entries.values():
                for r in entry.recipients:
                    if not r.done:
                        r.next_attempt = 0
            log.info("queue flush: every deferred recipient is tried now")
        if self._rescan and not self._scanning:
            self._rescan = False
            self._scanning = True
            known = dict(self.entries)
            d = self._thread(self._scan, known)
            d.addCallbacks(self._scanned, self._scan_failed, callbackArgs=(known,))
            return
        self._dispatch()

    def _thread(self, f: Callable[..., Any], *args: Any) -> Deferred:
        return in_pool(self.reactor, self.pool, f, *args)

    def _scan(self, known: dict[str, Entry]) -> tuple[dict[str, Entry], list[tuple[str, str]]]:
        """Read every envelope not already `known` (blocking)."""
        found: dict[str, Entry] = {}
        corrupt = []
        for path in queue.entry_paths(self.directory):
            entry_id = path.stem
            if entry_id in known:
                found[entry_id] = known[entry_id]
                continue
            try:
                found[entry_id] = queue.load(path)
            except (queue.CorruptEntry, OSError) as e:
                # Gone, or replaced under us on NFS by the front end that
                # holds it: not corrupt, and read again at the next scan.
                if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ESTALE):
                    continue
                moved = queue.move_corrupt(self.directory, path)
                corrupt.append((str(moved), str(e)))
        return found, corrupt

    def _scanned(
        self, result: tuple[dict[str, Entry], list[tuple[str, str]]], known: dict[str, Entry]
    ) -> None:
        self._scanning = False
        found, corrupt = result
        for path, why in corrupt:
            log.error("queue: moved unreadable entry to {path}: {why}", path=path, why=why)
        # Entries deleted behind our back (mailboxctl queue delete) are dropped,
        # unless a delivery is under way: it finds out when it saves. One that
        # came in while the scan ran (its file may be newer than the listing)
        # is not the scan's to judge.
        for entry_id in list(self.entries):
            if entry_id in known and entry_id not in found and entry_id not in self._busy:
                del self.entries[entry_id]
        for entry_id, entry in found.items():
            self.entries.setdefault(entry_id, entry)
        for entry_id in list(self._anchors):
            if entry_id not in self.entries:
                del self._anchors[entry_id]
        for entry_id in list(self._held):
            if entry_id not in self.entries:
                self._take_held(entry_id)
        self._handed_over.intersection_update(self.entries)
        if self.claims is not None:
            for entry_id in set(self.entries) - self._foreign - self.claims.held:
                self._claim(entry_id)
        self._dispatch()

    @property
    def _renew_every(self) -> int:
        """Ticks between renewals of the claims: a third of a lease."""
        assert self.claims is not None
        return max(1, int(self.claims.seconds / 3 / self.interval))

    def _claim(self, entry_id: str | None = None) -> None:
        """Claim `entry_id` (None: renew the claims on every entry known, and
        take those no other front end holds); soon, with whatever else comes
        meanwhile."""
        if self.claims is None:
            return
        if entry_id is None:
            self._claim_all = True
        else:
            self._to_claim.add(entry_id)
        if self._claiming:
            self._claim_again = True
            return
        self._claiming = True
        self.clock.callLater(0, self._claim_now)

    def _claim_now(self) -> None:
        assert self.claims is not None
        self._claim_again = False
        everything, self._claim_all = self._claim_all, False
        ids = list(self.entries) if everything else list(self._to_claim & self.entries.keys())
        self._to_claim = set()

        def claimed(won: set[str]) -> None:
            assert self.claims is not None
            # What another front end held may have changed on disk: read it again.
            again = won & self._foreign
            for entry_id in again:
                if entry_id not in self._busy:
                    self.entries.pop(entry_id, None)
                    self._anchors.pop(entry_id, None)
            if again:
                self._rescan = True
            if everything:
                self._foreign = set(self.entries) - self.claims.held
            else:
                self._foreign = (self._foreign - won) | (set(ids) - self.claims.held)
            self._claiming = False
            if self._claim_again:
                self._claim()
            self._dispatch()

        def failed(f: Failure) -> None:
            self._claiming = False
            _log_failure(f, "claims")

        d = self.claims.renew(ids, everything)
        d.addCallback(claimed).addErrback(failed)

    def _scan_failed(self, f: Any) -> None:
        self._scanning = False
        log.failure("queue: cannot read {directory}", f, directory=str(self.directory))

    def _dispatch(self) -> None:
        now = self.clock.seconds()
        relay = self.config.relay
        for entry_id, entry in list(self.entries.items()):
            if sum(self._active.values()) >= relay.max_connections or (
                relay.smarthost
                and self._active[relay.smarthost] >= relay.max_connections_per_destination
            ):
                return  # every slot is taken: a finished delivery calls again
            if entry_id in self._busy:
                continue
            if self.claims is not None and entry_id not in self.claims.held:
                continue  # another front end's, or not yet claimed
            if entry.done:  # all answered, but not yet finished (a crash, a failed bounce)
                if self._finish_after.get(entry_id, 0) > now:
                    continue
                work = self._finish(entry)
            else:
                reserved = self._reserve(entry)
                if not reserved:
                    continue
                work = self._work(entry, reserved)
            self._busy.add(entry_id)
            d = ensureDeferred(work)
            d.addErrback(_log_failure, entry.id)
            d.addBoth(self._done, entry_id)

    def _reserve(self, entry: Entry) -> list[str]:
        """Take a connection slot for each destination `entry` is due for and
        that has room, before any work starts: so that one pass never starts
        more deliveries than there are slots."""
        relay = self.config.relay
        reserved: list[str] = []
        for r in self._due(entry):
            dest = destination(r.address, relay.smarthost)
            if (
                dest not in reserved
                and self._active[dest] < relay.max_connections_per_destination
                and sum(self._active.values()) < relay.max_connections
            ):
                self._active[dest] += 1
                reserved.append(dest)
        return reserved

    def _release(self, dest: str) -> None:
        self._active[dest] -= 1
        if self._active[dest] <= 0:
            del self._active[dest]

    def _now(self, entry: Entry) -> float:
        """Now, on `entry`'s own timeline: the wall time when this process
        first saw it, moved on by the monotonic clock since.

        Its arrival and retry times are stored as wall-clock instants (they
        outlive the process); measured this way, a step of the wall clock
        neither expires a young message nor holds back a due retry.
        """
        anchor = self._anchors.setdefault(entry.id, self.wall() - self.clock.seconds())
        return self.clock.seconds() + anchor

    def _due(self, entry: Entry) -> list[Recipient]:
        return entry.due(self._now(entry))

    def _done(self, _: object, entry_id: str) -> None:
        self._busy.discard(entry_id)
        # A finished delivery frees a connection: hand it on now, not at the next tick.
        if not self._redispatch:
            self._redispatch = True
            self.clock.callLater(0, self._dispatch_again)

    def _dispatch_again(self) -> None:
        self._redispatch = False
        self._dispatch()

    # --- one entry --------------------------------------------------------------

    async def _work(self, entry: Entry, reserved: list[str]) -> None:
        """Deliver `entry` to the destinations it holds a slot for (`_reserve`);
        each slot is given back as soon as its delivery is done."""
        held = list(reserved)
        try:
            small = self._take_held(entry.id)
            if entry.id in self._handed_over:
                self._handed_over.discard(entry.id)
                if not await self._thread(queue.exists, self.directory, entry.id):
                    log.info(
                        "queue {queue_id} was handed over after it was done", queue_id=entry.id
                    )
                    self.entries.pop(entry.id, None)
                    return
            if small is not None:  # just queued: as sound as the disk has it
                problem = None
            else:
                problem, small = await self._thread(self._examine, entry)
            if problem == queue.DELETED:
                log.info("queue {queue_id} was deleted", queue_id=entry.id)
                self.entries.pop(entry.id, None)
                return
            if problem is not None:
                await self._set_aside(entry, problem)
                return
            smarthost = self.config.relay.smarthost
            groups: dict[str, list[Recipient]] = collections.defaultdict(list)
            for r in self._due(entry):
                groups[destination(r.address, smarthost)].append(r)
            for dest in reserved:
                recipients = groups.get(dest, [])
                try:
                    if not recipients:
                        continue
                    addresses = [r.address for r in recipients]
                    outcomes = await self._deliver(entry, dest, addresses, small)
                finally:
                    held.remove(dest)
                    self._release(dest)
                self._record(entry, recipients, outcomes)
                if all(r.status == "delivered" for r in entry.recipients):
                    # Removed below, durably: saving it first would be one
                    # more fsync, and a crash in between re-sends either way.
                    continue
                if not await self._save(entry):
                    return
        finally:
            for dest in held:
                self._release(dest)
        if entry.done:
            await self._finish(entry)

    def _take_held(self, entry_id: str) -> bytes | None:
        message = self._held.pop(entry_id, None)
        if message is not None:
            self._held_bytes -= len(message)
        return message

    def _record(
        self, entry: Entry, recipients: list[Recipient], outcomes: list[DeliveryOutcome]
    ) -> None:
        now = self._now(entry)
        lifetime = self.config.relay.queue_lifetime
        for r, o in zip(recipients, outcomes, strict=True):
            r.attempts += 1
            r.remote = o.remote or ""
            if o.delivered:
                r.status, r.last_error, r.status_code = "delivered", "", ""
            elif o.permanent or now - entry.received >= lifetime:
                r.status, r.last_error = "failed", o.text
                r.status_code = o.status if o.permanent else "4.4.7"
            else:
                r.status, r.last_error, r.status_code = "deferred", o.text, o.status
                r.next_attempt = now + backoff(r.attempts)
            self.metrics.deliveries["bounced" if r.status == "failed" else r.status].inc()
            log.info(
                "queue {queue_id}: {rcpt} {status} after attempt {n} via {remote}: {reply}",
                queue_id=entry.id,
                rcpt=shown(r.address),
                status=r.status,
                n=r.attempts,
                remote=o.remote or "-",
                reply=shown(o.text or "ok"),  # the remote server's words
            )

    async def _save(self, entry: Entry) -> bool:
        if not (self.directory / f"{entry.id}.json").exists():
            log.info("queue {queue_id} was deleted during delivery", queue_id=entry.id)
            self.entries.pop(entry.id, None)
            return False
        try:
            await self._thread(queue.save, self.directory, entry, self.config.state.node)
        except OSError as e:
            # The entry on disk keeps its last state: a later attempt (or, after
            # a restart, a retry of what was just done) records it.
            log.error(
                "queue {queue_id}: cannot save its state: {error}", queue_id=entry.id, error=str(e)
            )
        return True

    def _examine(self, entry: Entry) -> tuple[str | None, bytes | None]:
        """What makes `entry` undeliverable (see queue.corruption), or None and,
        for a message of at most ONE_WRITE bytes, the message. Blocking."""
        problem = queue.corruption(self.directory, entry)
        if problem is not None:
            return problem, None
        try:
            with open(self.directory / f"{entry.id}.msg", "rb") as f:
                f.seek(entry.offset)
                data = f.read(ONE_WRITE + 1)
        except FileNotFoundError:
            return "its message file is missing", None
        return None, data if len(data) <= ONE_WRITE else None

    async def _deliver(
        self, entry: Entry, dest: str, recipients: list[str], small: bytes | None = None
    ) -> list[DeliveryOutcome]:
        smarthost = self.config.relay.smarthost
        try:
            if smarthost:
                hops = [parse_smarthost(smarthost)]
            else:
                if self.resolver is None:  # made on first use: it re-reads resolv.conf on a timer
                    self.resolver = twisted_resolver(self.config.mailbox.resolver)
                hosts = await mx_hosts(self.resolver, dest)
                hops = [Hop(h, self.mx_port) for h in hosts]
        except RouteError as e:
            code = 550 if e.permanent else 451
            return [
                DeliveryOutcome(r, code, f"{code} {e.status} {e.text}", e.status)
                for r in recipients
            ]
        now = self.clock.seconds()
        for host, until in list(self._bad_hosts.items()):
            if until <= now:
                del self._bad_hosts[host]
        good = [h for h in hops if h.host not in self._bad_hosts]
        outcomes: list[DeliveryOutcome] = []
        for hop in good or hops:  # a bad host is skipped for a while, unless all are bad
            outcomes = await self._send(entry, dest, hop, recipients, small)
            if any(o.code for o in outcomes):
                return outcomes  # a server answered: its answers stand
            self._bad_hosts[hop.host] = self.clock.seconds() + BAD_HOST_SECONDS  # from the failure
        return outcomes

    async def _room(self, dest: str) -> None:
        """Close waiting connections until a new one to `dest` keeps within
        max_connections and max_connections_per_destination (this delivery's
        slot is already counted in `_active`)."""
        relay = self.config.relay
        while True:
            if self._active[dest] + self._idle.count(dest) > relay.max_connections_per_destination:
                closing = self._idle.evict(dest)
            elif sum(self._active.values()) + self._idle.count() > relay.max_connections:
                closing = self._idle.evict()
            else:
                return
            if closing is None:
                return
            await closing

    async def _send(
        self,
        entry: Entry,
        dest: str,
        hop: Hop,
        recipients: list[str],
        small: bytes | None = None,
        reuse: bool = True,
    ) -> list[DeliveryOutcome]:
        relay = self.config.relay
        waiting = self._idle.take(hop) if reuse else None
        if waiting is None:
            await self._room(dest)
        # Each attempt reads its own copy: one that ended by its deadline may
        # still be reading when the next one starts.
        message: BinaryIO
        if small is not None:  # read already, by _examine
            message = io.BytesIO(small)
        else:
            message = open(self.directory / f"{entry.id}.msg", "rb")  # noqa: SIM115
            message.seek(entry.offset)
        try:
            result: Deferred = Deferred()
            if waiting is not None:
                connecting: Deferred = succeed(waiting)
                waiting.take(Job(entry.sender, recipients, message, result))
            else:
                connecting = self._open(dest, hop, entry, recipients, message, result)
            connecting.addErrback(_fail_unless_called, result)
            # Whatever the remote does (replies that each reset the step timeout,
            # a trickle of bytes), an attempt ends: its slot is then free again.
            deadline = self.clock.callLater(
                attempt_deadline(relay.timeout), _give_up, result, connecting
            )
            try:
                value = await result
            except Exception as e:  # noqa: BLE001 - every failure becomes an outcome
                value = e
            finally:
                if deadline.active():
                    deadline.cancel()
        finally:
            message.close()
        if waiting is not None and isinstance(value, SMTPConnectError) and value.code < 0:
            # The server let the waiting connection go just as we used it (its
            # idle limit): that says nothing about the message; a new one does.
            return await self._send(entry, dest, hop, recipients, small, reuse=False)
        return outcomes_of(value, recipients, hop.host)

    def _open(
        self,
        dest: str,
        hop: Hop,
        entry: Entry,
        recipients: list[str],
        message: Any,
        result: Deferred,
    ) -> Deferred:
        """A new connection to `hop` that sends the message first."""
        relay = self.config.relay
        # Credentials go to the smarthost only, never to a domain's MX.
        username = relay.smarthost_username if relay.smarthost else ""
        settings = Settings(
            name=self.config.mailbox.hostname.encode(),  # ours, in EHLO/HELO
            timeout=relay.timeout,
            # STARTTLS whenever the other side offers it, without verification,
            # as MTAs do between themselves (RFC 7435 opportunistic security).
            tls=self._client_tls,
            username=username.encode(),
            password=relay.smarthost_password.encode() if username else b"",
            require_auth=bool(username),
        )
        job = Job(entry.sender, recipients, message, result)
        factory = SenderFactory(settings, job, self.clock, hop, idle=self._idle, dest=dest)
        return (self.connect or self._connect)(hop, factory)

    def _connect(self, hop: Hop, factory: Any) -> Deferred:
        timeout = self.config.relay.timeout
        endpoint: Any
        # An address (a smarthost given as one, MX hosts resolved to one) needs
        # no name resolution, and none of HostnameEndpoint's machinery.
        if isIPAddress(hop.host):
            endpoint = TCP4ClientEndpoint(self.reactor, hop.host, hop.port, timeout=timeout)
        elif isIPv6Address(hop.host):
            endpoint = TCP6ClientEndpoint(self.reactor, hop.host, hop.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, hop.host, hop.port, timeout=timeout)
        return endpoint.connect(factory)

    # --- the end of an entry ------------------------------------------------------

    async def _finish(self, entry: Entry) -> None:
        failed = [r for r in entry.recipients if r.status == "failed"]
        if failed:
            try:
                await self._bounce(entry, failed)
            except Exception:
                # Keep the entry: the bounce is tried again in a minute.
                log.failure(
                    "queue {queue_id}: cannot send the bounce; trying again later",
                    queue_id=entry.id,
                )
                self._finish_after[entry.id] = self.clock.seconds() + 60
                return
        await self._remove(entry.id)
        self.entries.pop(entry.id, None)
        self._finish_after.pop(entry.id, None)
        log.info("queue {queue_id} done", queue_id=entry.id)

    def _remove(self, entry_id: str) -> Deferred:
        """Remove a finished entry. Those that finish while a removal is on
        the disk go together in the next one: one trip to the disk threads and
        one fsync for all, instead of one each."""
        done: Deferred = Deferred()
        self._removals.append((entry_id, done))
        if not self._removing:
            self._remove_next()
        return done

    def _remove_next(self) -> None:
        batch, self._removals = self._removals, []
        self._removing = bool(batch)
        if not batch:
            return

        def tell(result: Any) -> None:
            self._remove_next()
            for i, (_, done) in enumerate(batch):
                if isinstance(result, list):
                    done.callback(result[i])
                else:
                    done.errback(result)

        ids = [entry_id for entry_id, _ in batch]
        d = self._thread(queue.remove_all, self.directory, ids, self.config.state.node)
        d.addBoth(tell)

    async def _bounce(self, entry: Entry, failed: list[Recipient]) -> None:
        directory = self.accounts()
        to = entry.sender
        if not to:
            # Never bounce a bounce; tell the postmaster, if there is one.
            to = f"postmaster@{self.config.mailbox.domains[0]}"
            postmaster = parse_mailbox(to)
            if postmaster is None or not directory.resolve(postmaster):
                log.warn(
                    "queue {queue_id}: a bounce could not be delivered to {rcpts}; dropped "
                    "(no postmaster account or alias)",
                    queue_id=entry.id,
                    rcpts=[r.address for r in failed],
                )
                return
        original = await self._thread(self._read_original, entry)
        failures = [
            FailedRecipient(r.address, r.status_code or "5.0.0", r.last_error, r.remote or None)
            for r in failed
        ]
        bounce_id = secrets.token_hex(6).upper()
        dsn = build_dsn(
            hostname=self.config.mailbox.hostname,
            original_sender=entry.sender,
            failures=failures,
            original=original,
            arrival=entry.received,
            now=self.wall(),
            message_id=bounce_id,
            to=to,
        )
        address = parse_mailbox(to)
        local = directory.resolve(address) if address else ()
        if local:
            paths = await self._thread(self._deliver_locally, dsn, local)
            if self.delivered is not None:
                self.delivered(
                    Delivery(
                        bounce_id,
                        "",
                        (to,),
                        tuple(a.address for a in local),
                        tuple(paths),
                        (),
                        None,
                        None,
                    )
                )
            log.info(
                "queue {queue_id}: bounce {bounce} delivered to {to}",
                queue_id=entry.id,
                bounce=bounce_id,
                to=to,
            )
        elif address is not None and not directory.is_local_domain(address.domain):
            now = self.wall()
            bounce = Entry(bounce_id, "", 0, now, [Recipient(to, next_attempt=now)], client="")
            await self._thread(
                queue.enqueue_bytes, self.directory, dsn, bounce, self.config.state.node
            )
            self.entries[bounce_id] = bounce
            self._claim(bounce_id)
            log.info(
                "queue {queue_id}: bounce {bounce} queued for {to}",
                queue_id=entry.id,
                bounce=bounce_id,
                to=to,
            )
        else:
            log.warn(
                "queue {queue_id}: no mailbox for the bounce to {to}; dropped",
                queue_id=entry.id,
                to=to,
            )

    def _read_original(self, entry: Entry) -> bytes:
        try:
            with open(self.directory / f"{entry.id}.msg", "rb") as f:
                f.seek(entry.offset)
                return f.read(256 * 1024)  # the headers are what the bounce shows
        except FileNotFoundError:  # a corrupt entry's: the bounce says so without it
            return b""

    async def _set_aside(self, entry: Entry, problem: str) -> None:
        """A corrupt entry: to corrupt/, one line, and a bounce to a local sender."""
        moved = await self._thread(
            queue.move_corrupt, self.directory, self.directory / f"{entry.id}.json"
        )
        self.entries.pop(entry.id, None)
        log.error(
            "queue: moved corrupt entry {queue_id} to {path}: {why}",
            queue_id=entry.id,
            path=str(moved),
            why=problem,
        )
        failed = [r for r in entry.recipients if not r.done]
        for r in failed:
            r.status, r.status_code = "failed", "5.3.0"
            r.last_error = f"the queued copy of the message is lost ({problem})"
        sender = parse_mailbox(entry.sender) if entry.sender else None
        if failed and sender is not None and self.accounts().resolve(sender):
            await self._bounce(entry, failed)

    def _deliver_locally(self, data: bytes, accounts: tuple[Account, ...]) -> list[Path]:
        mail_dir = self.config.mailbox.mail_dir
        message = IncomingMessage(mail_dir / ".incoming", self.config.state.node)
        try:
            message.write_line(b"Return-Path: <>")
            for line in data.split(b"\n")[:-1]:
                message.write_line(line)
        except BaseException:
            message.discard()
            raise
        return message.commit(mail_dir, accounts)
