"""The in-process server: a real Mailbox on a reactor in a background thread.

Twisted's reactor cannot be restarted, so one reactor runs in a background
thread for the life of the process; every InProcessMailServer starts and stops
on it, one after another or several at once. Listeners bind port 0 on
127.0.0.1, so ports never collide (pytest-xdist workers included). Mail the
server would relay to other domains is captured (`server.outbound`) instead of
leaving the machine. Time is the server's own: `advance(seconds)` moves
POP-before-SMTP expiry, blocks, retries and timeouts forward.

Everything that changes the server runs in the reactor thread: each public
method calls a reactor-side one (`_add_account_now`, `_deliver_now`, ...)
through `_in_reactor`, and the HTTP API (web.py), which runs in the reactor
thread itself, calls those directly, as blockingCallFromThread must not be
called from the reactor thread.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import bcrypt
from twisted.internet.defer import Deferred, DeferredList, succeed

from .. import accounts as accounts_file
from ..addresses import parse_mailbox
from ..clocks import cancelling
from ..config import SPEC, parse
from ..faults import Faults
from ..maildir import IncomingMessage, maildir_path
from .api import (
    OVERRIDES,
    Message,
    ServerAPI,
    check_overrides,
    match_message,
    not_found,
    trusting_context,
)
from .capture import CaptureFactory
from .clock import ShiftedClock
from .world import World

if TYPE_CHECKING:
    from ..service import Appliance


class NoSuchAccount(ValueError):
    """remove_account of an address that has no account."""


@attrs.define
class Record:
    """A message with its id (stable for its life: ids are never given again)."""

    id: int
    message: Message
    outbound: bool
    path: Path | None = None  # where a delivered one was stored


@attrs.define
class _Waiter:
    deferred: Deferred
    find: Callable[[], Any]  # the match, or None


_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def _reactor() -> Any:
    """The global reactor, running in a daemon thread (started once per process)."""
    global _reactor_thread
    from twisted.internet import reactor

    with _reactor_lock:
        if _reactor_thread is None:
            _reactor_thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="mailbox-reactor",
                daemon=True,
            )
            _reactor_thread.start()
    return reactor


def _call(f: Callable[..., Any], *args: Any) -> Any:
    """Run `f` in the reactor thread and wait for it (and its Deferred)."""
    from twisted.internet.threads import blockingCallFromThread

    return blockingCallFromThread(_reactor(), f, *args)


class InProcessMailServer(ServerAPI):
    """A real Mailbox server for a test, in this process; see the module docstring.

    What ``MailServer(...)`` returns (``MailServer(process=True)`` gives a
    RemoteMailServer instead).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        domains: Iterable[str] = ("example.test",),
        *,
        tls: bool = False,
        http: bool | int = False,
        **overrides: Any,
    ) -> None:
        check_overrides(overrides)
        self.domains = tuple(d.lower() for d in domains)
        if not self.domains:
            raise ValueError("MailServer: give at least one domain")
        self.tls = tls
        # http=True: the HTTP API and web page on a free port; an int: that port.
        self.http = http
        self.http_port: int | None = None
        # Inbound SPF/DKIM/DMARC checks would ask the machine's DNS about test
        # domains (and wait for its timeouts): on only when a test asks.
        self.overrides = {"trusted_networks": "", "bcrypt_rounds": 4, "checks": "no", **overrides}
        self.faults = Faults()
        self.world = World()  # how the world outside answers relayed mail
        self.outbound: list[Message] = []
        self._inbound: list[Message] = []
        self._cond = threading.Condition()
        self._running = False
        self._records: dict[int, Record] = {}
        self._paths: dict[int, Path] = {}  # id(message) -> its file, until recorded
        self._next_id = 1
        self._waiters: list[_Waiter] = []
        self._http: Any = None  # the HTTP listening port, while it runs
        self.home: Path | None = None
        self.smtp_port = self.submission_port = self.pop3_port = 0
        self.smtps_port: int | None = None
        self.pop3s_port: int | None = None
        self.appliance: Appliance | None = None  # while it runs

    # --- life -------------------------------------------------------------------

    def start(self) -> InProcessMailServer:
        if self._running:
            return self
        reactor = _reactor()
        with self._cond:  # a restart is a new mail store: what arrived before is gone
            self._inbound.clear()
            self.outbound.clear()
            self._sync()
        self.home = Path(tempfile.mkdtemp(prefix="mailbox-test-"))
        self.clock = ShiftedClock(reactor)
        try:
            self._capture_port = _call(self._start_capture, reactor)
            self.config = parse(self._ini(), self.home / "mailbox.ini")
            _call(self._start_server, reactor)
        except BaseException:
            self._running = True
            self.stop()
            raise
        self._running = True
        return self

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        try:
            self._in_reactor(self._stop_http)
            if self.appliance is not None:
                self._in_reactor(self.appliance.service.stopService)
            if getattr(self, "_capture", None) is not None:
                self._in_reactor(self._capture.stopListening)
        finally:
            self.appliance = None
            if self.home is not None:
                shutil.rmtree(self.home, ignore_errors=True)

    def _ini(self) -> str:
        assert self.home is not None
        values: dict[str, dict[str, str]] = {s: {} for s in SPEC}
        m = values["mailbox"]
        m["hostname"] = f"mail.{self.domains[0]}"
        m["domains"] = " ".join(self.domains)
        m["accounts"] = str(self.home / "accounts")
        m["aliases"] = str(self.home / "aliases")
        m["mail_dir"] = str(self.home / "mailbox")
        tcp = "tcp:0:interface=127.0.0.1"
        values["smtp"]["listen"] = tcp
        values["smtp"]["submission"] = tcp
        values["pop3"]["listen"] = tcp
        values["relay"]["smarthost"] = f"127.0.0.1:{self._capture_port}"
        if self.tls:
            from ..tls import make_self_signed

            self.certificate = self.home / "cert.pem"
            hostname = str(self.overrides.get("hostname", m["hostname"]))
            make_self_signed(hostname, self.certificate, self.home / "key.pem")
            values["tls"]["certificate"] = str(self.certificate)
            values["tls"]["private_key"] = str(self.home / "key.pem")
            values["smtp"]["listen"] += " tls:0:interface=127.0.0.1"
            values["pop3"]["listen"] += " tls:0:interface=127.0.0.1"
        for name, value in self.overrides.items():
            section, key = OVERRIDES[name]
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, (list, tuple)):
                value = " ".join(str(v) for v in value)
            values[section][key] = str(value)
        for path in (self.home / "accounts", self.home / "aliases"):
            path.touch(mode=0o600)
        return "".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
            for section, keys in values.items()
        )

    def _start_capture(self, reactor: Any) -> int:
        factory = CaptureFactory(self._captured, self.world, self.clock)
        self._capture = reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self._capture.getHost().port

    def _start_server(self, reactor: Any) -> Any:
        from ..service import assemble

        self.appliance = appliance = assemble(self.config, reactor, self.clock, self.clock.wall)
        for factory in (appliance.smtp, appliance.submission):
            factory.delivered = self._delivered
            factory.faults = self.faults
        appliance.pop3.faults = self.faults
        appliance.outbound.delivered = self._delivered  # bounces to local senders
        appliance.service.privilegedStartService()
        appliance.service.startService()
        waiting = []
        for listener in appliance.listeners:
            assert listener.listening is not None  # started above
            waiting.append(listener.listening)

        def ports(results: list) -> None:
            found: dict[str, int] = {}
            for listener, (ok, port) in zip(appliance.listeners, results, strict=True):
                if not ok:
                    raise RuntimeError(f"cannot listen: {port.getErrorMessage()}")
                found[str(listener.name)] = port.getHost().port
            self.smtp_port = found["smtp-0"]
            self.submission_port = found["submission-0"]
            self.pop3_port = found["pop3-0"]
            self.smtps_port = found.get("smtp-1")
            self.pop3s_port = found.get("pop3-1")
            self._start_http(reactor)

        return DeferredList(waiting, consumeErrors=True).addCallback(ports)

    def _start_http(self, reactor: Any) -> None:
        if self.http is False:
            return
        from twisted.web.server import Site

        from .web import root

        port = 0 if self.http is True else int(self.http)
        site = Site(root(self))
        site.displayTracebacks = False
        self._http = reactor.listenTCP(port, site, interface="127.0.0.1")
        self.http_port = self._http.getHost().port

    def _stop_http(self) -> Any:
        """In the reactor thread: stop listening, and end the HTTP waits."""
        port, self._http = self._http, None
        for waiter in list(self._waiters):
            self._waiters.remove(waiter)
            waiter.deferred.errback(RuntimeError("this MailServer stopped"))
        return port.stopListening() if port is not None else None

    def _in_reactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return _call(f, *args)

    def _live(self) -> Appliance:
        """The running appliance; RuntimeError if it is not running."""
        if self.appliance is None:
            raise RuntimeError("this MailServer is not running: call start() or use `with`")
        return self.appliance

    def _running_or_raise(self) -> None:
        if not self._running:
            raise RuntimeError("this MailServer is not running: call start() or use `with`")

    # --- accounts -----------------------------------------------------------------

    def _local(self, address: str) -> accounts_file.Address:
        parsed = parse_mailbox(address)
        if parsed is None:
            raise ValueError(f"{address!r} is not a mail address")
        domain = self.config.canonical_domain(parsed.domain) if self._running else None
        if domain is None:
            raise ValueError(f"{address}: {parsed.domain} is not one of {', '.join(self.domains)}")
        return accounts_file.Address(parsed.local.lower(), domain)

    def add_account(self, address: str, password: str) -> None:
        """Create the account (or set its password); usable at once on both protocols."""
        self._running_or_raise()
        self._in_reactor(self._add_account_now, address, password)

    def _add_account_now(self, address: str, password: str) -> None:
        self._running_or_raise()
        target = self._local(address)
        rounds = self.config.mailbox.bcrypt_rounds
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds))
        path = self.config.mailbox.accounts
        exists = target.key in accounts_file.listed(path)
        accounts_file.set_hash(path, target, hashed, must_exist=exists)
        self._live().accounts.reload()

    def remove_account(self, address: str) -> None:
        """Delete the account and its mailbox; adding it again starts empty."""
        self._running_or_raise()
        self._in_reactor(self._remove_account_now, address)

    def _remove_account_now(self, address: str) -> None:
        self._running_or_raise()
        target = self._local(address)
        try:
            accounts_file.remove(self.config.mailbox.accounts, target)
        except KeyError:
            raise NoSuchAccount(f"{address}: no such account") from None
        self._live().accounts.reload()
        account = accounts_file.Account(target.key, target.domain, target.local)
        shutil.rmtree(maildir_path(self.config.mailbox.mail_dir, account), ignore_errors=True)
        with self._cond:
            self._inbound = [m for m in self._inbound if m.account != target.key]
            self._sync()

    def accounts(self) -> list[str]:
        self._running_or_raise()
        return accounts_file.listed(self.config.mailbox.accounts)

    # --- mail -----------------------------------------------------------------------

    def _delivered(self, delivery: Any) -> None:
        """Told by the SMTP server, in the reactor thread, of each accepted message."""
        arrived = []
        for account, path in zip(delivery.accounts, delivery.paths, strict=True):
            message = Message(
                delivery.sender,
                delivery.recipients,
                path.read_bytes(),
                account,
                delivery.account,
                delivery.tls,
            )
            self._paths[id(message)] = path
            arrived.append(message)
        with self._cond:
            self._inbound.extend(arrived)
            self._cond.notify_all()
        self._arrived()

    def _captured(self, message: Message) -> None:
        with self._cond:
            self.outbound.append(message)
            self._cond.notify_all()
        self._arrived()

    def messages(self, address: str | None = None) -> list[Message]:
        """What arrived for `address`'s mailbox (or for any), in arrival order."""
        self._running_or_raise()
        key = self._local(address).key if address is not None else None
        with self._cond:
            return [m for m in self._inbound if key is None or m.account == key]

    def wait_change(
        self, count: int, timeout: float, outbound: bool = False, to: str | None = None
    ) -> int:
        """Block until more than `count` messages are there (or `timeout`); how many."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pool = self.outbound if outbound else self.messages(to)
                left = deadline - time.monotonic()
                if len(pool) > count or left <= 0:
                    return len(pool)
                self._cond.wait(left)

    def deliver(self, address: str, raw: bytes, sender: str = "") -> Message:
        """Put a message straight into a mailbox (for POP3 tests)."""
        self._running_or_raise()
        return self._in_reactor(self._deliver_now, address, raw, sender)

    def _deliver_now(self, address: str, raw: bytes, sender: str = "") -> Message:
        self._running_or_raise()
        target = self._local(address)
        account = accounts_file.Account(target.key, target.domain, target.local)
        incoming = IncomingMessage(
            self.config.mailbox.mail_dir / ".incoming", self.config.state.node
        )
        incoming.write_line(f"Return-Path: <{sender}>".encode())
        text = raw.replace(b"\r\n", b"\n")
        if text.endswith(b"\n"):  # the last line's end, not an empty line after it
            text = text[:-1]
        for line in text.split(b"\n"):
            incoming.write_line(line)
        [path] = incoming.commit(self.config.mailbox.mail_dir, (account,))
        message = Message(sender, (str(target),), path.read_bytes(), target.key)
        self._paths[id(message)] = path
        with self._cond:
            self._inbound.append(message)
            self._cond.notify_all()
        self._arrived()
        return message

    def _arrived(self) -> None:
        """A message arrived, in the reactor thread (waiters on the Condition
        are already woken): give it an id, and fire the Deferred waits it matches."""
        with self._cond:
            self._sync()
        for waiter in list(self._waiters):
            found = waiter.find()
            if found is not None:
                self._waiters.remove(waiter)
                waiter.deferred.callback(found)

    def _sync(self) -> None:
        """With the Condition held: ids for new messages, none for those gone."""
        live = {id(m) for m in self._inbound} | {id(m) for m in self.outbound}
        self._records = {k: r for k, r in self._records.items() if id(r.message) in live}
        known = {id(r.message) for r in self._records.values()}
        for outbound, pool in ((False, self._inbound), (True, self.outbound)):
            for m in pool:
                if id(m) not in known:
                    path = self._paths.pop(id(m), None)
                    self._records[self._next_id] = Record(self._next_id, m, outbound, path)
                    self._next_id += 1
        self._paths = {k: v for k, v in self._paths.items() if k in live}

    def _record_list(self) -> list[Record]:
        """Every message delivered or captured, with its id, in arrival order."""
        with self._cond:
            self._sync()
            return list(self._records.values())

    def _delete_now(self, record: Record) -> None:
        """Forget a message, and remove a delivered one from its mailbox."""
        with self._cond:
            pool = self.outbound if record.outbound else self._inbound
            for i, m in enumerate(pool):
                if m is record.message:
                    del pool[i]
                    break
            self._sync()
        if record.path is not None:  # in new/, or in cur/ with flags once a client saw it
            record.path.unlink(missing_ok=True)
            cur = record.path.parent.parent / "cur"
            for seen in cur.glob(record.path.name + "*") if cur.is_dir() else ():
                seen.unlink(missing_ok=True)

    def _wait_deferred(
        self, find: Callable[[], Any], timeout: float, expired: Callable[[], BaseException]
    ) -> Deferred:
        """In the reactor thread: a Deferred firing with what `find()` finds,
        now or on an arrival, or failing with `expired()` after `timeout` (real) seconds."""
        from twisted.internet import reactor

        found = find()
        if found is not None:
            return succeed(found)
        d: Deferred = Deferred(lambda d: self._drop_waiter(waiter))
        waiter = _Waiter(d, find)
        self._waiters.append(waiter)

        def expire() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                d.errback(expired())

        timer = reactor.callLater(timeout, expire)
        d.addBoth(cancelling, timer)
        return d

    def _drop_waiter(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _find(
        self,
        outbound: bool,
        to: str | None,
        subject: str | None,
        predicate: Callable[[Message], bool] | None,
    ) -> Message | None:
        pool = self.outbound if outbound else self._inbound
        key = None if to is None else to.lower() if outbound else self._local(to).key
        return next((m for m in pool if match_message(m, key, subject, predicate, outbound)), None)

    def wait_for_message(
        self,
        to: str | None = None,
        subject: str | None = None,
        predicate: Callable[[Message], bool] | None = None,
        timeout: float = 5.0,
        *,
        outbound: bool = False,
    ) -> Message:
        """The first message that matches (`subject` is a glob), waiting up to
        `timeout` seconds; it wakes on delivery itself, without polling.
        `outbound=True` looks at relayed (captured) mail instead."""
        self._running_or_raise()
        if to is not None and not outbound:
            self._local(to)  # an address that is not local raises at once
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._find(outbound, to, subject, predicate)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise not_found(
                        to, subject, timeout, self.outbound if outbound else self._inbound
                    )
                self._cond.wait(left)

    # --- time, state, TLS ---------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward (expiry, blocks, retries, timeouts)."""
        self._running_or_raise()
        self._in_reactor(self._advance_now, seconds)

    def _advance_now(self, seconds: float) -> None:
        self._running_or_raise()
        self.clock.advance(seconds)

    def reset(self) -> None:
        """Back to a fresh server: no mail, accounts, authorisations, blocks, faults
        or rules of the world's."""
        self._running_or_raise()
        self._in_reactor(self._reset_now)

    def _reset_now(self) -> None:
        self._running_or_raise()
        self.faults.clear()
        self.world.clear()
        self._live().state.forget()
        self._live().outbound.entries.clear()
        self.clock.rewind()
        m = self.config.mailbox
        m.accounts.write_text("")
        m.aliases.write_text("")
        self._live().accounts.reload()
        for child in m.mail_dir.iterdir():
            if child.name not in (".state", ".incoming"):
                shutil.rmtree(child, ignore_errors=True)
        with self._cond:
            self._inbound.clear()
            self.outbound.clear()
            self._sync()

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this server's throwaway certificate."""
        return trusting_context(self.certificate if self.tls else None)
