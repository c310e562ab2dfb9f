"""Builds the appliance's MultiService from a Config."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import clamav, rspamd
from .accounts import AccountStore
from .auth import Authenticator
from .clocks import Wall
from .config import Config, IPNetwork
from .connections import Board, ConnectionCount
from .credcache import CredentialCache
from .dnsbl import Blocklists
from .filtering import Filters, PluginFolder, load_plugins
from .guard import Guard
from .inbound import Checker, Policy
from .instance import InstanceLock, InstanceRunning, lock_path
from .limits import RelayLimits
from .maildir import clean_spool, spool_files
from .metrics import Exposition, Metrics, MetricsSite
from .node import NODE as NODE_LEASE
from .node import Claims, Leases, LeasesService, NameInUse, claim_name, process_owner
from .outbound import Outbound
from .policy import Listener
from .pop3 import POP3Factory
from .popauth import PopAuthRegistry
from .private import private_dir
from .processes import Supervisor, adopt, worker_count
from .proxy import inner, is_proxied, proxied
from .queue import queue_dir, remove_unacknowledged
from .realm import BcryptChecker, HashingQueue, MailboxRealm, make_portal
from .resolver import thread_resolver, twisted_resolver, use_everywhere
from .signing import Signer
from .smtp import SMTPFactory
from .state import StateError, StateStore, open_store
from .tls import (
    IMPLICIT_PREFIX,
    ServerTLS,
    TLSConfigError,
    endpoint_string,
    with_certificate,
    wrap_implicit,
)
from .turns import Turns
from .workers import Workers, hashing_threads, make_workers

log = Logger()


# Connections the kernel queues before they are accepted. Twisted's default of
# 50 overflows in a burst of connections, and each dropped SYN costs its client
# a second; the kernel caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024
_TAKES_BACKLOG = ("tcp", "tcp6", "ssl", "unix", IMPLICIT_PREFIX[:-1])


def with_backlog(description: str) -> str:
    """An endpoint string, with the default backlog unless it names one."""
    kind, _, rest = description.partition(":")
    if kind not in _TAKES_BACKLOG or any(w.startswith("backlog=") for w in rest.split(":")):
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


def listening_factory(
    description: str,
    factory: Any,
    tls: ServerTLS | None,
    proxy_networks: tuple[IPNetwork, ...],
    clock: Any,
) -> tuple[str, Any]:
    """What to listen on for a listener, and with which factory: the
    listener itself, but for ``haproxy:`` (mailboxd.proxy) the endpoint
    under it, with the PROXY protocol around the factory. On the wire the
    header comes first, before TLS: ``haproxy:tls:465`` listens on plain TCP
    with the PROXY wrapper outside the implicit-TLS one."""
    if not is_proxied(description):
        return description, factory
    listen = inner(description)
    if listen.startswith(IMPLICIT_PREFIX):
        if tls is None:
            raise SystemExit(f"mailbox: {description} needs [tls] certificate and private_key")
        factory = wrap_implicit(tls, factory)
        listen = "tcp:" + listen[len(IMPLICIT_PREFIX) :]  # the same words as tcp:'s
    return listen, proxied(factory, proxy_networks, clock)


@implementer(IStreamServerEndpoint)
@attrs.frozen
class _Noting:
    """An endpoint that tells `seen` the port it listens on."""

    endpoint: Any
    seen: Any

    def listen(self, factory: Any) -> Any:
        def note(port: Any) -> Any:
            self.seen(port)
            return port

        return self.endpoint.listen(factory).addCallback(note)


class ListenerService(Service):
    """Listens on an endpoint while the service runs, like Twisted's
    StreamServerEndpointService, but stops start-up with one line if it
    cannot listen, and keeps its port (child processes serve it too).

    It keeps the Deferred that `endpoint.listen()` returned (`listening`)
    itself: an endpoint that fails at once (a port in use, most often) fails
    `privilegedStartService` with SystemExit instead of logging a traceback
    while the server runs on without the listener.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Factory[Any],
        name: str,
        tls: ServerTLS | None = None,
        proxy_networks: tuple[IPNetwork, ...] = (),
        clock: Any = None,
    ) -> None:
        listen, factory = listening_factory(
            description, factory, tls, proxy_networks, clock or reactor
        )
        full = endpoint_string(with_backlog(listen))
        if listen.startswith(IMPLICIT_PREFIX) and tls is not None:
            # Our implicit-TLS parser (mailboxd.tls) takes the [tls] certificate
            # as Twisted's ssl: does, and loads it when it listens.
            full = with_certificate(full, tls.certificate, tls.private_key)
        endpoint = serverFromString(reactor, full)
        self.endpoint: IStreamServerEndpoint = _Noting(endpoint, self._listening)
        self.factory = factory
        self.port: Any = None
        self.listening: Deferred | None = None  # fires with the port, once listening
        self.description = description
        self.setName(name)

    turns: Turns | None = None  # set when worker processes share this socket

    def _listening(self, port: Any) -> None:
        self.port = port
        if self.turns is not None:
            self.turns.share(port)

    # Set when worker processes serve this socket too: fires once they have
    # ended. Closing it shuts it down (Twisted's port does, for a socket it
    # made) under a worker still reading it, whose accept() then fails.
    workers_ended: Callable[[], Deferred] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listening = self.endpoint.listen(self.factory)
        starting = [True]
        at_once: list[Failure] = []

        def failed(f: Failure) -> None:
            if starting[0]:
                at_once.append(f)
            elif not f.check(CancelledError):  # a later failure is logged
                log.failure("{name} cannot listen", f, name=self.name)

        self.listening.addErrback(failed)
        starting[0] = False
        if at_once:  # fail start-up: twistd prints the one line
            error = at_once[0].value
            reason = error.socketError if isinstance(error, CannotListenError) else error
            raise SystemExit(f"mailbox: cannot listen on {self.description}: {reason}")
        log.info("{name} listening on {endpoint}", name=self.name, endpoint=self.description)

    def startService(self) -> None:
        super().startService()
        if self.listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred:
        super().stopService()
        if self.listening is None:
            return succeed(None)
        if self.workers_ended is not None and self.port is not None:
            self.port.stopReading()  # no new connection here meanwhile
            return self.workers_ended().addCallback(lambda _: self._stop_listening())
        return self._stop_listening()

    def _stop_listening(self) -> Deferred:
        assert self.listening is not None
        self.listening.cancel()  # if it is still trying to listen
        return self.listening.addCallback(
            lambda _: None if self.port is None else self.port.stopListening()
        )


@attrs.define(eq=False)
class PoolService(Service):
    """Runs the thread pools (storage, hashing, state) while the service runs."""

    workers: Workers

    def startService(self) -> None:
        super().startService()
        for pool in self.workers.pools:
            pool.start()

    def stopService(self) -> None:
        super().stopService()
        for pool in self.workers.pools:
            pool.stop()


@attrs.define(eq=False)
class Running(Service):
    """Starts and stops a part that has start() and stop() with the service."""

    part: Any

    def startService(self) -> None:
        super().startService()
        self.part.start()

    def stopService(self) -> None:
        super().stopService()
        self.part.stop()


@attrs.frozen
class Closing:
    """A part that only needs closing when the appliance stops."""

    part: Any

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.part.close()


@attrs.define(eq=False)
class StateService(Service):
    """Logs what mailboxctl changed in the state store, and prunes what expired."""

    store: StateStore
    clock: Any
    failure_window: int
    workers: Workers
    wall: Wall = time.time  # what expired is judged by the instants stored
    interval: float = 2.0
    prune_every: int = 30  # intervals
    _loop: LoopingCall | None = None
    _last_event: int = 0
    _ticks: int = 0

    def tick(self) -> Any:
        self._ticks += 1
        prune = self._ticks % self.prune_every == 1
        now = self.wall()

        def read() -> tuple[list[tuple[int, float, str]], list[Any]]:
            events = self.store.events_after(self._last_event)
            ended = self.store.prune(now, self.failure_window) if prune else []
            return events, ended

        def report(found: tuple[list[tuple[int, float, str]], list[Any]]) -> None:
            events, ended = found
            for event_id, _at, what in events:
                self._last_event = max(self._last_event, event_id)
                log.info("state changed by mailboxctl: {what}", what=what)
            for block in ended:
                log.info("block of {client} expired", client=block.ip)

        def failed(f: Any) -> None:
            f.trap(StateError)
            log.error("state store: {error}", error=str(f.value))

        # The loop waits for this Deferred: a slow store never piles up ticks.
        return self.workers.db(read).addCallbacks(report, failed)

    def startService(self) -> None:
        super().startService()
        events = self.store.events_after(0)
        self._last_event = events[-1][0] if events else 0
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def _take_mail_dir(config: Config) -> InstanceLock:
    """Create the mail store and take this node's lock on it.

    The lock (and then the node's name, `_claim_name`) comes before the
    clean-up: what is in the spool or half-queued belongs to a dead process
    only if no other server of this name has the mail directory.
    """
    mail_dir = config.mailbox.mail_dir
    lock = InstanceLock(lock_path(mail_dir, config.state.node))
    try:
        private_dir(mail_dir)
        lock.acquire()
    except InstanceRunning as e:
        raise SystemExit(
            f"mailbox: {config.path}: [mailbox] mail_dir = '{mail_dir}': {e}"
        ) from None
    except OSError as e:
        lock.release()
        raise _unusable(config, e) from None
    return lock


def _clean_up(config: Config, lock: InstanceLock) -> None:
    """Drop what a crash of this node left unacknowledged; only this node's:
    other front ends may share the directory."""
    mail_dir, node = config.mailbox.mail_dir, config.state.node
    try:
        spool = spool_files(mail_dir / ".incoming", node)
        stale = remove_unacknowledged(queue_dir(mail_dir), node, spool) + clean_spool(spool)
    except OSError as e:
        lock.release()
        raise _unusable(config, e) from None
    if stale:
        log.info("removed {count} unacknowledged spool files left by a crash", count=stale)


def _unusable(config: Config, e: OSError) -> SystemExit:
    return SystemExit(
        f"mailbox: {config.path}: [mailbox] mail_dir = '{config.mailbox.mail_dir}': "
        f"cannot use it: {e.strerror}"
    )


@attrs.define(eq=False)
class Appliance:
    """The assembled parts, for the service and for mailboxd.testing."""

    service: MultiService
    accounts: AccountStore
    state: StateStore
    outbound: Outbound
    smtp: SMTPFactory
    submission: SMTPFactory
    pop3: POP3Factory
    listeners: list[ListenerService]


def per_client_hashing(workers: Workers) -> int:
    """bcrypt checks one client address may have running at once: half the
    hashing threads, so that one address never has every core."""
    return max(1, workers.hashing.max // 2)


def build(config: Config, reactor: Any) -> MultiService:
    """The whole appliance: thread pool, state, accounts, and one service per endpoint."""
    return assemble(config, reactor).service


@attrs.define(eq=False)
class _Parts:
    """What every serving process has, the primary and its children alike."""

    state: StateStore
    workers: Workers
    accounts: AccountStore
    auth: Authenticator
    popauth: PopAuthRegistry
    tls: ServerTLS | None
    connections: ConnectionCount
    metrics: Metrics
    relay_limits: RelayLimits
    leases: Leases

    def directory(self) -> Any:
        return self.accounts.directory


def _open_state(config: Config, lock: InstanceLock | None) -> StateStore:
    try:
        return open_store(config)
    except StateError as e:
        if lock is not None:
            lock.release()
        if config.state.backend == "redis":
            raise SystemExit(
                f"mailbox: {config.path}: [state] redis_url: cannot use the state store: {e}"
            ) from None
        raise SystemExit(f"mailbox: {e}; move it aside to start afresh (blocks are lost)") from None


def _claim_name(config: Config, state: StateStore, lock: InstanceLock, owner: str) -> None:
    """Hold the node's name in the store while this front end runs."""
    s = config.state
    try:
        claim_name(state, s.node, owner, time.time(), s.lease)
    except (NameInUse, StateError) as e:
        state.close()
        lock.release()
        raise SystemExit(f"mailbox: {config.path}: [state] node = {s.node!r}: {e}") from None


def _serving_parts(
    config: Config,
    reactor: Any,
    clock: Any,
    wall: Wall,
    top: MultiService,
    state: StateStore,
    lock: InstanceLock | None,
    metrics: Metrics,
    board: Board | None = None,
) -> _Parts:
    """Pools, accounts, the login path and TLS, as services of `top`;
    `board` shares the connection counts with the other worker processes."""
    m = config.mailbox

    def give_up(message: str) -> SystemExit:
        state.close()
        if lock is not None:
            lock.release()
        return SystemExit(message)

    # bcrypt threads are for the machine, not for each process.
    hash_threads = max(1, hashing_threads() // worker_count(m.workers))
    workers = make_workers(reactor, hashing=hash_threads)
    # Services stop in the reverse order: the store closes once the pools have
    # stopped, so that no state thread is using a connection as it closes.
    Running(Closing(state)).setServiceParent(top)
    PoolService(workers).setServiceParent(top)
    try:
        accounts = AccountStore(
            m.accounts, m.aliases, m.domains, dict(m.domain_aliases), clock=clock
        )
    except OSError as e:
        key = "aliases" if e.filename == str(m.aliases) else "accounts"
        raise give_up(
            f"mailbox: {config.path}: [mailbox] {key} = '{e.filename}': "
            f"cannot read it: {e.strerror}"
        ) from None
    Running(accounts).setServiceParent(top)

    def directory() -> Any:
        return accounts.directory

    guard = Guard(state, wall, config.limits, workers.db, clock=clock, board=board)
    hashing = HashingQueue(
        workers.hash, per_client=per_client_hashing(workers), admit=guard.unblocked
    )
    cache = CredentialCache(config.limits.auth_cache_ttl, time.monotonic)
    checker = BcryptChecker(directory, hashing, cache, rounds=m.bcrypt_rounds)
    auth = Authenticator(make_portal(MailboxRealm(directory), checker), guard, metrics)
    popauth = PopAuthRegistry(state, wall, config.relay.pop_before_smtp_ttl, workers.db)
    tls = None
    if config.tls.certificate is not None and config.tls.private_key is not None:
        try:
            tls = ServerTLS(config.tls.certificate, config.tls.private_key, clock)
        except TLSConfigError as e:
            raise give_up(f"mailbox: {e}") from None
    # Make the unknown-user hash before the first login needs it (see BcryptChecker).
    cost = accounts.directory.typical_cost or m.bcrypt_rounds
    reactor.callWhenRunning(workers.hashing.callInThread, checker.dummy_hash, cost)
    connections = ConnectionCount(
        config.limits.connections_per_ip, m.trusted_networks, board, config.limits.ipv6_prefix
    )
    relay_limits = RelayLimits(state, workers.db, wall)
    leases = Leases(
        state, workers.db, wall, clock, process_owner(config.state.node), config.state.lease
    )
    LeasesService(leases).setServiceParent(top)
    return _Parts(
        state, workers, accounts, auth, popauth, tls, connections, metrics, relay_limits, leases
    )


def _factories(
    config: Config,
    parts: _Parts,
    clock: Any,
    wall: Wall,
    queued: Any,
    survey: bool = False,
) -> tuple[SMTPFactory, SMTPFactory, POP3Factory]:
    """The three factories; with `survey` (the primary), the DKIM keys are
    looked at once the reactor runs, so that a missing or broken one is
    said at start (once, not by every worker)."""
    signer = Signer(config.dkim.keys, config.dkim.selector)
    if survey:
        parts.workers.reactor.callWhenRunning(
            parts.workers.checks.callInThread, signer.survey, config.local_domains()
        )
    reactor = parts.workers.reactor
    shipped: list[Any] = [
        *clamav.make_filters(config, reactor),
        *rspamd.make_filters(config, reactor),
    ]
    filters = Filters(list(shipped), clock, config.filters.timeout, parts.workers.filter)
    folder = config.mailbox.plugins
    if folder is not None:
        filters.filters += load_plugins(folder, config, reactor)
        plugins = PluginFolder(folder, filters, shipped, config, reactor, parts.workers.disk)
        reactor.callWhenRunning(plugins.start)
        reactor.addSystemEventTrigger("before", "shutdown", plugins.stop)
    blocklists = None
    if config.inbound.dnsbl:
        resolver_here = twisted_resolver(config.mailbox.resolver)
        blocklists = Blocklists(config.inbound.dnsbl, resolver_here, clock)
    checker = None
    if config.inbound.checks:
        resolver = thread_resolver(config.mailbox.resolver)
        use_everywhere(resolver)  # pyspf's and authheaders' lookups too
        i = config.inbound
        checker = Checker(Policy(config.mailbox.hostname, i.dmarc_reject, i.spf_reject), resolver)

    def smtp(listener: Listener) -> SMTPFactory:
        return SMTPFactory(
            config,
            parts.directory,
            clock,
            parts.workers,
            parts.auth,
            parts.popauth,
            listener,
            queued,
            parts.tls,
            connections=parts.connections,
            wall=wall,
            metrics=parts.metrics,
            signer=signer,
            checker=checker,
            relay_limits=parts.relay_limits,
            blocklists=blocklists,
            filters=filters,
        )

    pop3 = POP3Factory(
        config,
        parts.auth,
        parts.popauth,
        clock,
        parts.workers,
        parts.tls,
        connections=parts.connections,
        metrics=parts.metrics,
        # On one machine the lock file says it all; across machines, the store.
        leases=parts.leases if config.state.backend == "redis" else None,
    )
    return smtp(Listener.MTA), smtp(Listener.SUBMISSION), pop3


def _listeners(config: Config, factories: tuple[Any, Any, Any]) -> list[tuple[str, str, Any]]:
    """(name, endpoint description, factory) for every listener configured."""
    mta, submission, pop3 = factories
    found = []
    for name, descriptions, factory in (
        ("smtp", config.smtp.listen, mta),
        ("submission", config.smtp.submission, submission),
        ("pop3", config.pop3.listen, pop3),
    ):
        for i, desc in enumerate(descriptions):
            found.append((f"{name}-{i}", desc, factory))
    return found


def assemble(config: Config, reactor: Any, clock: Any = None, wall: Wall = time.time) -> Appliance:
    """Build every part; `clock` (default: the reactor) times everything that
    waits, and `wall` gives the instants that are stored (see clocks.py)."""
    clock = clock or reactor
    top = MultiService()
    m = config.mailbox
    lock = _take_mail_dir(config)
    Running(lock).setServiceParent(top)  # the first part: released last
    state = _open_state(config, lock)
    owner = process_owner(config.state.node)
    _claim_name(config, state, lock, owner)
    _clean_up(config, lock)
    children = worker_count(m.workers) - 1
    board = Board.create(children + 1) if children > 0 else None
    parts = _serving_parts(config, reactor, clock, wall, top, state, lock, Metrics(), board)
    parts.leases.held[NODE_LEASE + config.state.node] = 1  # taken above: renewed from now on
    StateService(
        state, clock, config.limits.auth_failure_window, parts.workers, wall
    ).setServiceParent(top)
    if not parts.accounts.directory.hashes:
        log.warn(
            "no accounts yet: add one with 'mailboxctl --config {config} user add you@{domain}'",
            config=str(config.path),
            domain=m.domains[0],
        )
    outbound = Outbound(
        config,
        queue_dir(m.mail_dir),
        clock,
        reactor,
        parts.workers.storage,
        parts.directory,
        resolver=None,
        wall=wall,
        metrics=parts.metrics,
        claims=Claims(state, parts.workers.db, wall, config.state.node, config.state.lease),
    )
    Running(outbound).setServiceParent(top)
    mta, submission, pop3 = factories = _factories(
        config, parts, clock, wall, outbound.add, survey=True
    )
    listeners = []
    supervisor = None
    turns = Turns(board, clock) if board is not None else None
    for name, desc, factory in _listeners(config, factories):
        listener = ListenerService(reactor, desc, factory, name, parts.tls, m.proxy_networks, clock)
        listener.turns = turns
        listener.setServiceParent(top)
        listeners.append(listener)
    if board is not None:
        supervisor = Supervisor(
            reactor,
            config,
            children,
            lambda: [
                (str(x.name), x.description, x.port.fileno())
                for x in listeners
                if x.port is not None
            ],
            outbound.adopt,
            lock.fileno(),
            board=board,
        )
        supervisor.setServiceParent(top)  # the last part: stopped first
        for listener in listeners:
            listener.workers_ended = supervisor.ended
    if config.metrics.listen:
        site = MetricsSite(_exposition(parts, state, wall, outbound, supervisor))
        for i, desc in enumerate(config.metrics.listen):
            ListenerService(
                reactor, desc, site, f"metrics-{i}", parts.tls, m.proxy_networks, clock
            ).setServiceParent(top)
    return Appliance(top, parts.accounts, state, outbound, mta, submission, pop3, listeners)


def _exposition(
    parts: _Parts,
    state: StateStore,
    wall: Wall,
    outbound: Outbound,
    supervisor: Supervisor | None,
) -> Exposition:
    def read_state() -> tuple[int, int]:
        now = wall()
        return len(state.blocks(now)), len(state.popauths(now))

    return Exposition(
        parts.metrics,
        supervisor.children_totals if supervisor is not None else list,
        parts.workers.db,
        read_state,
        lambda: len(outbound.entries),
    )


@attrs.define(eq=False)
class AdoptedListener(Service):
    """A listening socket the primary bound, served in a child process."""

    reactor: Any
    fd: int
    factory: Any
    turns: Turns | None = None
    _port: Any = None

    def startService(self) -> None:
        super().startService()
        self._port = adopt(self.reactor, self.fd, self.factory)
        if self.turns is not None:
            self.turns.share(self._port)

    def stopService(self) -> Any:
        super().stopService()
        if self._port is not None:
            return self._port.stopListening()
        return None


def assemble_child(
    config: Config,
    reactor: Any,
    fds: dict[str, tuple[int, bool, bool]],
    queued: Any,
    metrics: Metrics,
    board: Board | None = None,
) -> MultiService:
    """A child process's part (see processes.py): it serves the listeners in
    `fds` (name -> the listening socket, whether to add TLS, and whether
    the PROXY protocol comes first), counts its
    connections on `board` and what it does in `metrics`, and hands what it
    queues to `queued`."""
    top = MultiService()
    state = _open_state(config, None)
    parts = _serving_parts(config, reactor, reactor, time.time, top, state, None, metrics, board)
    turns = Turns(board, reactor) if board is not None else None
    factories = _factories(config, parts, reactor, time.time, lambda e, m: queued(e.to_json(), m))
    # The primary said which socket is which; what the config file says now
    # (it may have been edited since) only names the protocol.
    for name, _desc, factory in _listeners(config, factories):
        if name in fds:
            fd, tls, proxy = fds[name]
            if tls:
                if parts.tls is None:
                    raise SystemExit(f"mailbox: {name} needs [tls], which is not set now")
                factory = wrap_implicit(parts.tls, factory)
            if proxy:  # before TLS on the wire: outside it
                factory = proxied(factory, config.mailbox.proxy_networks, reactor)
            AdoptedListener(reactor, fd, factory, turns).setServiceParent(top)
    return top
