"""The primary's log: where twistd would write it, as twistd would write it,
for a tenth of the CPU.

Under load a relayed message is four log lines in the primary (its own and
its workers'). Twisted's text observer formats each through its own
formatter (about 20 µs a line) and writes and flushes each on its own; this
one renders plain formats with str.format_map, formats the time once a
second, and writes what one turn of the reactor logged in one write. The
lines are the same, byte for byte (tests/test_logs.py holds them to it).

twistd takes an observer from its application's `ILogObserver` component;
`Logged` sets one there for the destination twistd's options name
(`--logfile`, `--nodaemon`). `--syslog` and `--logger` keep twistd's own.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import signal
import sys
import time
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.logger import ILogObserver, eventAsText, formatTime
from twisted.python import logfile, threadable
from twisted.python.util import untilConcludes
from zope.interface import implementer


@implementer(ILogObserver)
@attrs.define(eq=False)
class ClassicLog:
    """twistd's text log (`textFileLogObserver`), written once a reactor turn."""

    file: Any  # what the lines go to: write() and flush()
    reactor: Any
    # No lock: twistd logs from signal handlers, which run between any two
    # steps of the main thread, this observer's too. deque's append and
    # popleft are atomic, so no line is lost or written twice.
    _lines: collections.deque[str] = attrs.field(factory=collections.deque)
    _flush_due: bool = False
    _stamped: tuple[int | None, str] = (None, "-")  # a second, and its time stamp

    def __attrs_post_init__(self) -> None:
        # A turn's lines must not wait for a turn that never comes.
        self.reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def __call__(self, event: dict) -> None:
        line = self.line(event)
        if line is None:
            return
        self._lines.append(line)
        if not (self.reactor.running and threadable.isInIOThread()):
            self.flush()  # before the reactor runs, after it stopped, or from a thread
        elif not self._flush_due:
            self._flush_due = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_due = False
        lines = []
        with contextlib.suppress(IndexError):
            while True:
                lines.append(self._lines.popleft())
        if lines:
            untilConcludes(self.file.write, "".join(lines))
            untilConcludes(self.file.flush)

    def line(self, event: dict) -> str | None:
        """What `formatEventAsClassicLogText` makes of `event`."""
        text = render(event)
        if not text:
            return None
        line = f"{self._time(event.get('log_time'))} [{_system(event)}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def _time(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second, stamp = self._stamped  # one attribute: a signal handler sees both or neither
        if int(when) != second:  # the format shows whole seconds
            stamp = formatTime(when)
            self._stamped = (int(when), stamp)
        return stamp


# Fields an event carries for Twisted's own use (the log_ ones, and those of
# the legacy twisted.python.log), never shown in a JSON line.
_LEGACY = frozenset({"format", "message", "isError", "system", "why", "failure", "time"})
_PLAIN = (str, int, float, bool, type(None))


@implementer(ILogObserver)
@attrs.define(eq=False)
class JsonLog(ClassicLog):
    """`[log] format = json`: one JSON object a line, for a collector or
    fail2ban to read without regular expressions.

    Each line has `time` (UTC, ISO 8601), `level`, `text` (what the text
    log says, a traceback included), `system` (where it comes from, as in
    the text log) and the event's own plain fields: `client`, `account`,
    `queue_id`, `listener`, `code` and the others, `worker` for a worker's.
    """

    def line(self, event: dict) -> str | None:
        text = render(event)
        if not text:
            return None
        when = event.get("log_time")
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": _iso(when),
            "level": getattr(level, "name", "info"),
            "text": text,
            "system": _system(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _LEGACY or key in record:
                continue
            if plain(value):
                record[key] = value
        # ASCII only: a client's words may hold NEL, U+2028 and the like,
        # which JSON leaves raw and some readers take for line ends.
        return json.dumps(record) + "\n"


def plain(value: Any) -> bool:
    """Whether JSON holds `value` as it is: a str, number, bool or None, or a
    list or tuple of them."""
    if isinstance(value, (list, tuple)):
        return all(type(v) in _PLAIN for v in value)
    return type(value) in _PLAIN


def _iso(when: float | None) -> str:
    moment = datetime.datetime.fromtimestamp(
        time.time() if when is None else when, datetime.timezone.utc
    )
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(event: dict) -> str:
    """The event's text, as eventAsText gives it. Most of ours are a plain
    format string: str.format_map renders those far faster than Twisted's
    formatter (made for "{method()}" calls, which Mailbox does not use)."""
    fmt = event.get("log_format")
    plain = "log_failure" not in event and "log_flattened" not in event
    if isinstance(fmt, str) and "()" not in fmt and plain:
        with contextlib.suppress(Exception):
            return fmt.format_map(event)
    return eventAsText(event, includeTimestamp=False, includeSystem=False)


def _system(event: dict) -> str:
    system = event.get("log_system")
    if system is not None:
        try:
            return str(system)
        except Exception:  # noqa: BLE001 - as Twisted says it
            return "UNFORMATTABLE"
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"


def for_twistd(options: Any, reactor: Any, format: str = "text") -> ClassicLog | None:
    """The observer for twistd's own options (`twistd` itself, the parent of
    the plugin's), writing `format` ("text" or "json"), or None to leave
    the choice to twistd: --syslog, a --logger of the operator's, a daemon
    told to log to stdout (twistd refuses that itself), or no twistd at all."""
    if options is None or options.get("syslog") or options.get("logger"):
        return None
    kind = JsonLog if format == "json" else ClassicLog
    name = options.get("logfile")
    nodaemon = options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            return None
        return kind(sys.stdout, reactor)  # before twistd puts its own stdout there
    file = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):  # twistd's rotation on SIGUSR1

        def rotate(signum: int, frame: Any) -> None:
            reactor.callFromThread(file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return kind(file, reactor)


class Logged(MultiService):
    """The appliance's services, and the log observer twistd will use."""

    def __init__(self, service: Any, observer: ClassicLog | None) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd makes the application and adds our service to it before it
        # starts logging: the one moment to tell it which observer to use.
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
