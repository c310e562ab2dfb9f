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
- account changes are seen by each process's own reload, and a cached
  login is keyed by the stored hash, so a changed password misses everywhere;
- the outbound queue is run by the primary only: a child that queues a
  message writes its id to a pipe, and the primary delivers it. So each
  entry is delivered by exactly one process.

A child never cleans anything at start-up. It stops when the primary does
(SIGTERM, or its end of the child's stdin closing); a child that dies is
started again after a pause. A child's log events go to the primary as JSON
over a pipe and are published there, marked with the worker's number.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import (
    Logger,
    eventAsJSON,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
)

log = Logger(namespace="mailboxd.processes")  # also when run as __main__

RESTART_PAUSE = 1.0  # seconds before a dead child is started again
STOP_GRACE = 10.0  # seconds a child has to stop before it is killed
_RECORD = b"\x1e"  # between JSON log events (RFC 7464)
_QUEUED_FD, _LOG_FD, _LOCK_FD, _FIRST_LISTENER_FD = 3, 4, 5, 6


def worker_count(setting: int) -> int:
    """`[mailbox] workers` as a number of processes: 0 means one per core."""
    return setting if setting > 0 else max(1, len(os.sched_getaffinity(0)))


# --- the primary's side ----------------------------------------------------------------


class _Child(protocol.ProcessProtocol):
    def __init__(self, supervisor: Supervisor, number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.ended: Deferred = Deferred()
        self._queued = b""
        self._log = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == _QUEUED_FD:
            self._queued += data
            *ids, self._queued = self._queued.split(b"\n")
            self.supervisor.queued([i.decode("ascii", "replace") for i in ids if i])
        elif fd == _LOG_FD:
            self._log += data
            *records, self._log = self._log.split(_RECORD)
            for record in records:
                self.supervisor.child_event(self.number, record)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)
        self.supervisor.child_ended(self, reason.value)


@attrs.define(eq=False)
class Supervisor(Service):
    """Starts, watches and stops the child processes (in the primary)."""

    reactor: Any
    config_path: str
    count: int  # children: workers - 1
    listeners: Callable[[], list[tuple[str, int]]]  # (name, listening fd), once bound
    queued: Callable[[list[str]], object]  # entry ids a child queued
    lock_fd: int | None = None  # the instance lock, held by the children too
    clock: Any = None
    _children: dict[int, tuple[_Child, Any]] = attrs.field(factory=dict)
    _stopping: bool = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for number in range(1, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        child = _Child(self, number)
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, _QUEUED_FD: "r", _LOG_FD: "r"}
        if self.lock_fd is not None:
            # Until every worker has gone, no new server may clean up what
            # they still write.
            fds[_LOCK_FD] = self.lock_fd
        args = [
            sys.executable,
            "-m",
            "mailboxd.processes",
            "--config",
            self.config_path,
            "--worker",
            str(number),
        ]
        for i, (name, fd) in enumerate(self.listeners()):
            fds[_FIRST_LISTENER_FD + i] = fd
            args += ["--listener", f"{name}={_FIRST_LISTENER_FD + i}"]
        transport = self.reactor.spawnProcess(
            child, sys.executable, args, env=os.environ, childFDs=fds
        )
        self._children[number] = (child, transport)
        log.info("worker {number} started (process {pid})", number=number, pid=transport.pid)

    def child_event(self, number: int, record: bytes) -> None:
        try:
            event = eventFromJSON(record.decode("utf-8", "replace"))
        except ValueError:
            return
        namespace = event.get("log_namespace", "-")
        level = event.get("log_level")
        event["log_system"] = f"{namespace}#{getattr(level, 'name', '-')} worker {number}"
        event["worker"] = number
        globalLogPublisher(event)

    def child_ended(self, child: _Child, reason: Any) -> None:
        if self._children.get(child.number, (None,))[0] is child:
            del self._children[child.number]
        if self._stopping:
            return
        log.warn(
            "worker {number} ended ({reason}); starting it again",
            number=child.number,
            reason=str(reason),
        )
        clock = self.clock or self.reactor
        clock.callLater(RESTART_PAUSE, self._spawn, child.number)

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        ending = []
        for child, transport in list(self._children.values()):
            ending.append(child.ended)
            try:
                transport.signalProcess("TERM")
            except Exception:  # noqa: BLE001 - already gone
                continue
            clock = self.clock or self.reactor
            kill = clock.callLater(STOP_GRACE, _kill, transport)
            child.ended.addBoth(lambda result, k=kill: (k.active() and k.cancel(), result)[1])
        if not ending:
            return succeed(None)
        return DeferredList(ending, consumeErrors=True)


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:  # noqa: BLE001 - already gone
        pass


# --- the child's side --------------------------------------------------------------------


class _Parent(protocol.Protocol):
    """The child's stdin: the primary holds the other end. When it closes
    (the primary stopped or died), the child stops too."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def _log_to_pipe(fd: int, number: int) -> None:
    out = os.fdopen(fd, "wb", buffering=0)

    def observer(event: dict) -> None:
        text = eventAsJSON(event)
        try:
            out.write(text.encode("utf-8") + _RECORD)
        except OSError:
            pass  # the primary is gone; stdin's end stops us

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


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
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio

    from .clocks import use_monotonic_clock
    from .config import ConfigError, load
    from .service import assemble_child

    os.umask(0o077)
    _log_to_pipe(_LOG_FD, args.worker)
    use_monotonic_clock(reactor)
    try:
        config = load(args.config)
    except ConfigError as e:
        log.critical("{error}", error=str(e))
        raise SystemExit(1) from None
    notify = os.fdopen(_QUEUED_FD, "wb", buffering=0)

    def queued(entry_id: str) -> None:
        try:
            notify.write(entry_id.encode("ascii") + b"\n")
        except OSError as e:
            # The entry is on disk: the primary's rescan finds it in a few seconds.
            log.error("cannot tell the primary about {id}: {error}", id=entry_id, error=str(e))

    listeners = {}
    for item in args.listener:
        name, _, fd = item.partition("=")
        listeners[name] = int(fd)
    service = assemble_child(config, reactor, listeners, queued)
    stdio.StandardIO(_Parent(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info("worker {number} serving", number=args.worker)
    reactor.run()


if __name__ == "__main__":
    child_main()
