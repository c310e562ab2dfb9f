"""Several reactor processes serving the same listeners (`[mailbox] workers`).

The process twistd starts (the primary) does everything it does alone: it
takes the instance lock, cleans what a crash left, binds every listener,
serves connections, and runs the outbound queue and the state store's
housekeeping. It then starts `workers - 1` child processes
(``python -m mailboxd.processes``) that adopt the same listening sockets
(`IReactorSocket.adoptStreamPort`): the kernel hands each new connection to
whichever process accepts it first.

A child serves SMTP and POP3 only. What must be one stays in one place:

- the guard's failures and blocks, POP-before-SMTP and mailboxctl's events
  live in the state store (SQLite, transactions), which every process uses;
- the POP3 mailbox lock is a file lock, the instance lock the primary's;
- connections per address are counted on a board in shared memory
  (connections.Board), where each process sees the others' counts;
- account changes are seen by each process's own reload, and a cached
  login is keyed by the stored hash, so a changed password misses everywhere;
- the outbound queue is run by the primary only: a child that queues a
  message sends its envelope (as written to the queue), and a small message
  itself, to the primary, which delivers it. So each entry is delivered by
  exactly one process.

A child never cleans anything at start-up. It talks to the primary over a
socket pair: first it receives the primary's config (so a child started
again later serves as the others do, whatever the file says by then), then
it sends the envelopes of what it queued, and its log events (the text rendered,
the plain fields as JSON), which the primary publishes marked with the
worker's number (log lines are dropped rather than stop a worker when the
primary does not keep up). It stops when the primary does (SIGTERM, or the
socket pair closing when the primary dies); a child that dies is started
again, after a pause that grows while it keeps dying at once. Listeners
whose socket a child cannot serve as it is (ssl:, unix:) stay with the
primary.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import json
import os
import pickle
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorSocket
from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    Logger,
    LogLevel,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from . import metrics
from .clocks import cancelling
from .logs import plain, render
from .metrics import Key, Totals
from .proxy import inner, is_proxied

log = Logger(namespace="mailboxd.processes")  # also when run as __main__

RESTART_PAUSE = 1.0  # seconds before a dead child is started again, doubled...
RESTART_PAUSE_MAX = 60.0  # ...after each quick death, up to this
RAN_LONG_ENOUGH = 30.0  # seconds a child must have run for its next pause to reset
STOP_GRACE = 10.0  # seconds a child has to stop before it is killed
_RECORD = b"\x1e"  # between records on the channel (RFC 7464's separator)
# A record's first byte: an envelope (JSON), a log event, the child's metrics.
_QUEUED, _LOG, _METRICS = b"Q", b"L", b"M"
_CHANNEL_FD, _LOCK_FD, _BOARD_FD, _FIRST_LISTENER_FD = 3, 4, 5, 6
# Listeners a child can serve: their socket carries plain TCP, and the child
# adds TLS itself for tls:. ssl: (TLS added inside the endpoint) and unix:
# (whose adopted port would chmod and unlink the path) stay with the primary.
_SHARED_KINDS = ("tcp", "tcp6", "tls", "systemd")


def worker_count(setting: int) -> int:
    """`[mailbox] workers` as a number of processes: 0 means one per core."""
    return setting if setting > 0 else max(1, len(os.sched_getaffinity(0)))


def shared(description: str) -> bool:
    """Whether child processes serve this listener too (haproxy: or not)."""
    return inner(description).partition(":")[0] in _SHARED_KINDS


def listener_kind(description: str) -> str:
    """What a child adds to a shared socket, for --listener: "plain", or
    "tls", "proxy" or "proxy+tls" (the PROXY header first, then TLS)."""
    kinds = ["proxy"] if is_proxied(description) else []
    if inner(description).startswith("tls:"):
        kinds.append("tls")
    return "+".join(kinds) or "plain"


class _Records(protocol.Protocol):
    """Records separated by _RECORD, each handed to `received`."""

    received: Callable[[bytes], None]

    def __init__(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *records, self._buffer = self._buffer.split(_RECORD)
        for record in records:
            if record:
                self.received(record)


# --- the primary's side ----------------------------------------------------------------


class _Child(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, number: int, started: float) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started = started
        self.ended: Deferred = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)
        self.supervisor.child_ended(self, reason.value)


class _FromChild(_Records):
    def __init__(self, supervisor: Supervisor, number: int) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.number = number

    def connectionMade(self) -> None:
        # The child serves with the primary's config, not with what the file
        # says by the time it starts (it may have been edited since).
        blob = pickle.dumps(self.supervisor.config)
        assert self.transport is not None  # connected
        self.transport.write(struct.pack(">Q", len(blob)) + blob)

    def received(self, record: bytes) -> None:
        kind, body = record[:1], record[1:]
        if kind == _QUEUED:
            self.supervisor.queued(*from_queued_record(body))
        elif kind == _LOG:
            self.supervisor.child_event(self.number, body)
        elif kind == _METRICS:
            self.supervisor.child_totals(self, body)

    def connectionLost(self, reason: Any = None) -> None:
        self.supervisor.channel_closed(self)


@attrs.define(eq=False)
class Supervisor(Service):
    """Starts, watches and stops the child processes (in the primary)."""

    reactor: Any
    config: Any  # the primary's Config, handed to each child
    count: int  # children: workers - 1
    listeners: Callable[[], list[tuple[str, str, int]]]  # (name, description, fd), bound
    queued: Callable[[str, bytes | None], object]  # what a child queued: queued_record
    lock_fd: int | None = None  # the instance lock, held by the children too
    board: Any = None  # connections.Board: the connection counts of every process
    clock: Any = None
    _children: dict[int, tuple[_Child, Any]] = attrs.field(factory=dict)
    _pauses: dict[int, float] = attrs.field(factory=dict)
    _restarts: dict[int, Any] = attrs.field(factory=dict)
    _stopping: bool = False
    _ended: Deferred = attrs.field(factory=lambda: succeed(None))  # see ended()
    # Each running child's last metrics totals, and the sum of the last
    # totals of children that have ended.
    _totals: dict[_FromChild, Totals] = attrs.field(factory=dict)
    _ended_totals: dict[Key, float] = attrs.field(factory=lambda: collections.defaultdict(float))

    @property
    def _clock(self) -> Any:
        return self.clock or self.reactor

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for number in range(1, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        if self._stopping:
            return
        child = _Child(self, number, self._clock.seconds())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, _CHANNEL_FD: theirs.fileno()}
        if self.lock_fd is not None:
            # Until every worker has gone, no new server may clean up what
            # they still write.
            fds[_LOCK_FD] = self.lock_fd
        path = str(Path(self.config.path).resolve())  # for ps: which server this is
        args = [sys.executable, "-m", "mailboxd.processes", "--config", path]
        args += ["--worker", str(number)]
        if self.board is not None:
            fds[_BOARD_FD] = self.board.fd
            args += ["--board", f"{_BOARD_FD}:{self.board.processes}"]
        shared_listeners = [x for x in self.listeners() if shared(x[1])]
        for i, (name, description, fd) in enumerate(shared_listeners):
            fds[_FIRST_LISTENER_FD + i] = fd
            args += ["--listener", f"{name}={_FIRST_LISTENER_FD + i}={listener_kind(description)}"]
        try:
            transport = self.reactor.spawnProcess(
                child, sys.executable, args, env=os.environ, childFDs=fds
            )
        finally:
            theirs.close()
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, _ChannelFactory(self, number)
        )
        ours.close()
        self._children[number] = (child, transport)
        log.info("worker {number} started (process {pid})", number=number, pid=transport.pid)

    def child_event(self, number: int, record: bytes) -> None:
        event = event_from_record(record)
        if event is None:
            return
        namespace = event.get("log_namespace", "-")
        level = event.get("log_level")
        event["log_system"] = f"{namespace}#{getattr(level, 'name', '-')} worker {number}"
        event["worker"] = number
        globalLogPublisher(event)

    def child_totals(self, channel: _FromChild, record: bytes) -> None:
        totals = metrics.from_record(record)
        if totals is not None:
            self._totals[channel] = totals

    def channel_closed(self, channel: _FromChild) -> None:
        # Its child has ended (or soon will): what it counted still counts.
        metrics.add(self._ended_totals, self._totals.pop(channel, {}))

    def children_totals(self) -> list[Totals]:
        return [dict(self._ended_totals), *self._totals.values()]

    def child_ended(self, child: _Child, reason: Any) -> None:
        if self._children.get(child.number, (None,))[0] is child:
            del self._children[child.number]
        if self.board is not None:  # its connections ended with it
            self.board.clear(child.number)
        if self._stopping:
            return
        # A child that dies at once again and again (a broken config file, a
        # full disk) is started less and less often, not every second.
        ran = self._clock.seconds() - child.started
        pause = self._pauses.get(child.number, RESTART_PAUSE / 2)
        pause = RESTART_PAUSE if ran >= RAN_LONG_ENOUGH else min(pause * 2, RESTART_PAUSE_MAX)
        self._pauses[child.number] = pause
        log.warn(
            "worker {number} ended ({reason}); starting it again in {pause:.0f}s",
            number=child.number,
            reason=str(reason),
            pause=pause,
        )
        self._restarts[child.number] = self._clock.callLater(pause, self._spawn, child.number)

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ending = []
        for child, transport in list(self._children.values()):
            ending.append(child.ended)
            try:
                transport.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                continue
            kill = self._clock.callLater(STOP_GRACE, _kill, transport)
            child.ended.addBoth(cancelling, kill)
        self._ended = DeferredList(ending, consumeErrors=True)
        return self.ended()

    def ended(self) -> Deferred:
        """Fires once every child has ended, after stopService."""
        d: Deferred = Deferred()

        def tell(result: Any) -> Any:
            d.callback(None)
            return result

        self._ended.addBoth(tell)
        return d


class _ChannelFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number

    def buildProtocol(self, addr: Any) -> _FromChild:
        p = _FromChild(self.supervisor, self.number)
        p.factory = self
        return p


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:  # noqa: BLE001 - already gone
        pass


# --- the child's side --------------------------------------------------------------------


@implementer(IPushProducer)
class _ToPrimary(protocol.Protocol):
    """The child's end of the channel. Log and metrics records are dropped while the
    primary does not keep up (the transport has paused us), rather than let
    them pile up or stop this process; queued envelopes are always sent. When the
    channel closes (the primary stopped or died), the child stops too."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.paused = False
        self.dropped = 0

    def connectionMade(self) -> None:
        IConsumer(self.transport).registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True

    def send(self, kind: bytes, body: bytes) -> None:
        """Send one record; from any thread."""
        if not isInIOThread():
            self.reactor.callFromThread(self.send, kind, body)
            return
        if kind != _QUEUED and self.paused:  # a later metrics record has it all
            self.dropped += 1
            return
        assert self.transport is not None  # connected
        self.transport.write(kind + body + _RECORD)

    def connectionLost(self, reason: Any = None) -> None:
        # Also while it already stops (SIGTERM first, then the primary goes).
        with contextlib.suppress(ReactorNotRunning):
            self.reactor.stop()


class _ToPrimaryFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, channel: _ToPrimary) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> _ToPrimary:
        return self.channel


def log_record(event: dict) -> bytes:
    """A child's log event as the primary publishes it: the text rendered here
    (with any traceback), and the event's plain fields for observers that want
    them. Far cheaper on both sides than Twisted's eventAsJSON/eventFromJSON,
    which matters at several lines a message."""
    record = {k: v for k, v in event.items() if not k.startswith("log_") and plain(v)}
    try:
        text = render(event)
    except Exception:  # noqa: BLE001 - whatever it was, say what we can
        text = repr(event.get("log_format"))
    level = event.get("log_level")
    record["log_text"] = text
    record["log_level"] = getattr(level, "name", "info")
    record["log_namespace"] = event.get("log_namespace", "-")
    record["log_time"] = event.get("log_time") or time.time()
    return json.dumps(record).encode("utf-8")


def queued_record(envelope: str, message: bytes | None) -> bytes:
    """What a child queued, for the primary: the envelope (one line of JSON)
    and, if given, the message after a newline, in base64 (a record must not
    hold the separator, which a message may)."""
    record = envelope.encode("utf-8")
    return record if message is None else record + b"\n" + base64.b64encode(message)


def from_queued_record(record: bytes) -> tuple[str, bytes | None]:
    """(envelope, message or None) from a `queued_record`. The envelope is
    checked where it is used (Outbound.adopt); a message that cannot be read
    is left for the disk to give."""
    envelope, held, message = record.partition(b"\n")
    try:
        data = base64.b64decode(message, validate=True) if held else None
    except ValueError:
        data = None
    return envelope.decode("utf-8", "replace"), data


def event_from_record(record: bytes) -> dict | None:
    """The event a child's record stands for, or None for one we cannot read."""
    try:
        event = json.loads(record)
        text = event["log_text"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(text, str):
        return None
    try:
        event["log_level"] = LogLevel.levelWithName(event.get("log_level"))
    except (InvalidLogLevelError, TypeError):
        event["log_level"] = LogLevel.info
    event["log_format"] = "{log_text}"
    return event


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("mailboxd.processes: the primary went away")
        data += chunk
    return data


def _say_now(text: str) -> None:
    """A critical log line to the primary, written before the reactor runs."""
    event = {
        "log_format": "{error}",
        "error": text,
        "log_level": LogLevel.critical,
        "log_namespace": log.namespace,
        "log_time": time.time(),
    }
    os.write(_CHANNEL_FD, _LOG + log_record(event) + _RECORD)


def adopt(reactor: Any, fd: int, factory: Any) -> Any:
    """Serve `factory` on the listening socket `fd` the primary bound."""
    family = socket.socket(fileno=os.dup(fd)).family
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)  # the port has its own copy
    return port


def child_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailboxd.processes")
    parser.add_argument("--config", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--board")  # FD:PROCESSES, the shared connection counts
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from .clocks import use_monotonic_clock
    from .service import assemble_child

    os.umask(0o077)
    (size,) = struct.unpack(">Q", _read_exactly(_CHANNEL_FD, 8))
    config = pickle.loads(_read_exactly(_CHANNEL_FD, size))  # noqa: S301 - from our primary
    use_monotonic_clock(reactor)
    channel = _ToPrimary(reactor)
    IReactorSocket(reactor).adoptStreamConnection(
        _CHANNEL_FD, socket.AF_UNIX, _ToPrimaryFactory(channel)
    )

    def observer(event: dict) -> None:
        try:
            channel.send(_LOG, log_record(event))
        except Exception:  # noqa: BLE001, S110 - a log line must never stop the worker
            pass

    # Twisted takes any callable of an event as an ILogObserver.
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, observer)], redirectStandardIO=False)

    listeners = {}
    for item in args.listener:
        name, fd, kind = item.split("=")
        kinds = kind.split("+")
        listeners[name] = (int(fd), "tls" in kinds, "proxy" in kinds)
    counted = metrics.Metrics()
    if config.metrics.listen:
        sent: list[Totals] = [{}]

        def send_totals() -> None:
            totals = counted.totals()
            if totals != sent[0]:
                channel.send(_METRICS, metrics.to_record(totals))
                sent[0] = totals

        LoopingCall(send_totals).start(metrics.SEND_EVERY, now=False)
    board = None
    if args.board:
        from .connections import Board

        fd, processes = args.board.split(":")
        board = Board(int(fd), int(processes), args.worker)
    try:
        service = assemble_child(
            config,
            reactor,
            listeners,
            lambda envelope, message: channel.send(_QUEUED, queued_record(envelope, message)),
            counted,
            board,
        )
    except SystemExit as e:
        # No reactor runs yet to carry a log line: said at once, on the channel.
        _say_now(str(e.code))
        raise SystemExit(1) from None
    os.close(_CHANNEL_FD)  # the adopted connection has its own copy
    failed = []

    def start() -> None:
        try:
            service.startService()
        except Exception:
            log.failure("worker {number} cannot start", number=args.worker)
            failed.append(True)
            reactor.stop()
            return
        log.info("worker {number} serving", number=args.worker)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    child_main()
