"""Message filters: the site's own checks (`[mailbox] plugins`, a folder of
`.py` files) and the shipped ones (`[filters] clamav`, `rspamd`), asked
after DATA and before `250`.

A filter provides `IMessageFilter`: `check(incoming)` returns a Deferred
(or a value) with a `FilterVerdict`. One whose check blocks (a library
without Deferreds) says `blocking = True` and runs in a pool of its own, so
that it can hold up neither the reactor nor the other pools' work. Filters
run one after another, each within
`[filters] timeout`; one that fails, hangs or answers nonsense gets one log
line naming it, and the message in hand `451 4.7.0`: never accepted
unchecked, never lost (the client keeps it). A plugin file that cannot be
loaded does the same for every message until it is fixed.

A plugin file is read and compiled here, never imported through the import
system, so that nothing is written into its folder (no `__pycache__`): the
service needs no write access there. It provides its filters as
`make_filters(config, reactor)` (a list), or as module-level objects that
provide `IMessageFilter`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .lines import SMTPReply

log = Logger()

FAILED = (451, "4.7.0 Message could not be checked, try again later")


class IMessageFilter(Interface):
    name = Attribute("A short name for the log: clamav, rspamd, a plugin's file name")
    blocking = Attribute(
        "Optional, False if absent. True: `check` blocks, and is called in the "
        "filters' thread pool; else it is called on the reactor thread and must "
        "return at once (a Deferred for what takes time)."
    )

    def check(incoming: Incoming) -> Deferred | FilterVerdict:
        """The FilterVerdict on `incoming`."""


@attrs.frozen
class Incoming:
    """What a filter sees of a message: the client, the envelope, the data
    (CRLF line ends, as it will be delivered, without Return-Path)."""

    ip: str
    helo: str
    account: str | None  # the authenticated account
    tls: str | None  # "TLSv1.3 ..." or None
    sender: str  # "" for <>
    recipients: tuple[str, ...]
    data: bytes


@attrs.frozen
class FilterVerdict:
    action: str  # "accept", "tempfail" or "reject"
    reply: SMTPReply | None = None  # for tempfail and reject
    headers: tuple[tuple[str, str], ...] = ()  # for accept: fields to add at the top


def accept(*headers: tuple[str, str]) -> FilterVerdict:
    return FilterVerdict("accept", None, headers)


def tempfail(text: str = "4.7.0 Try again later") -> FilterVerdict:
    return FilterVerdict("tempfail", (451, text))


def reject(code: int, text: str) -> FilterVerdict:
    return FilterVerdict("reject", (code, text))


@implementer(IMessageFilter)
@attrs.frozen
class Broken:
    """A plugin file that cannot be used: every message waits (451) until it is fixed."""

    name: str
    why: str
    blocking = False  # a class attribute, not a field

    def check(self, incoming: Incoming) -> FilterVerdict:
        # Said once, when it was loaded: not again for every message.
        return FilterVerdict("tempfail", FAILED)


@attrs.define(eq=False)
class Filters:
    filters: list[Any]  # providers of IMessageFilter
    clock: Any
    timeout: float
    # Runs a blocking filter's check in the filters' pool; None (unit tests):
    # on the caller's thread.
    threads: Callable[..., Deferred] | None = None

    def __bool__(self) -> bool:
        return bool(self.filters)

    def run(self, incoming: Incoming) -> Deferred:
        """Fires with the FilterVerdict of all the filters together: the first
        that does not accept decides; else accept, with every header added."""
        headers: list[tuple[str, str]] = []

        def ask(index: int) -> Deferred:
            if index == len(self.filters):
                return succeed(accept(*headers))
            one = self.filters[index]
            if bool(getattr(one, "blocking", False)) and self.threads is not None:
                d = self.threads(one.check, incoming)
            else:
                d = maybeDeferred(one.check, incoming)
            d.addTimeout(self.timeout, self.clock)
            d.addCallbacks(lambda v: _sound(v, one), lambda f: _failed(f, one))

            def next_(verdict: FilterVerdict) -> FilterVerdict | Deferred:
                if verdict.action != "accept":
                    return verdict
                headers.extend(verdict.headers)
                return ask(index + 1)

            return d.addCallback(next_)

        return ask(0)


def _sound(verdict: Any, one: Any) -> FilterVerdict:
    """`verdict` if it is one we can act on; else the filter answered nonsense."""
    ok = isinstance(verdict, FilterVerdict) and verdict.action in ("accept", "tempfail", "reject")
    if ok and verdict.action != "accept":
        code = verdict.reply[0] if verdict.reply else 0
        ok = 400 <= code < 600 and (code < 500) == (verdict.action == "tempfail")
    if ok and all(_header_ok(n, v) for n, v in verdict.headers):
        return verdict
    log.error("filter {filter} answered nonsense: {answer!r}", filter=_name(one), answer=verdict)
    return FilterVerdict("tempfail", FAILED)


def _header_ok(name: str, value: str) -> bool:
    printable = all(33 <= ord(c) <= 126 and c != ":" for c in name)
    return bool(name) and printable and "\r" not in value and "\n" not in value


def _failed(f: Any, one: Any) -> FilterVerdict:
    why = f"{f.type.__name__}: {f.getErrorMessage()}" if f.type else f.getErrorMessage()
    log.error("filter {filter} failed: {why}", filter=_name(one), why=why)
    return FilterVerdict("tempfail", FAILED)


def _name(one: Any) -> str:
    return str(getattr(one, "name", type(one).__name__))


def load_plugins(folder: Path, config: Any, reactor: Any) -> list[Any]:
    """The filters of every `*.py` file in `folder`, in name order."""
    found: list[Any] = []
    for path in sorted(folder.glob("*.py")):
        try:
            found.extend(_load(path, config, reactor))
        except Exception as e:  # noqa: BLE001 - any failure: that plugin, not the server
            why = f"{type(e).__name__}: {e}"
            log.error("plugin {plugin} cannot be loaded: {why}", plugin=str(path), why=why)
            found.append(Broken(path.stem, why))
    return found


def _load(path: Path, config: Any, reactor: Any) -> list[Any]:
    code = compile(path.read_bytes(), str(path), "exec")  # no bytecode file written
    name = f"mailbox_plugin_{path.stem}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # as import would: dataclasses and pickle look there
    exec(code, module.__dict__)  # noqa: S102 - the operator's own plugin folder
    make: Callable[..., Any] | None = getattr(module, "make_filters", None)
    if make is not None:
        filters = list(make(config, reactor))
    else:
        filters = [v for v in vars(module).values() if IMessageFilter.providedBy(v)]
    for one in filters:
        if not IMessageFilter.providedBy(one):
            raise TypeError(f"{one!r} does not provide IMessageFilter")
    log.info(
        "plugin {plugin} loaded: {filters}", plugin=str(path), filters=[_name(f) for f in filters]
    )
    return filters


def folder_stamp(folder: Path) -> tuple:
    """What changes when a plugin file is added, removed or edited. Blocking."""
    found = []
    for path in sorted(folder.glob("*.py")):
        try:
            st = path.stat()
        except OSError:
            continue
        found.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(found)


@attrs.define(eq=False)
class PluginFolder:
    """Loads the plugins folder again when its files change (looked at every
    `interval` seconds, in the storage pool), as the accounts file is."""

    folder: Path
    filters: Filters
    shipped: list[Any]  # the filters that come with the package, configured
    config: Any
    reactor: Any
    disk: Callable[..., Deferred]
    interval: float = 5.0
    _stamp: tuple = ()
    _loop: Any = None

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        self._stamp = folder_stamp(self.folder)  # as loaded at start
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> Deferred:
        d = self.disk(folder_stamp, self.folder)
        d.addCallback(self._looked)
        d.addErrback(lambda f: log.error("plugins folder: {why}", why=f.getErrorMessage()))
        return d

    def _looked(self, stamp: tuple) -> None:
        if stamp == self._stamp:
            return
        self._stamp = stamp
        log.info("plugins folder {folder} changed: loading it again", folder=str(self.folder))
        self.filters.filters = [
            *self.shipped,
            *load_plugins(self.folder, self.config, self.reactor),
        ]
