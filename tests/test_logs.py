"""The primary's log observer: twistd's lines, byte for byte, written once a turn."""

from __future__ import annotations

import signal
import sys
import threading

import pytest
from twisted.application.service import Application, Service
from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEventAsClassicLogText,
)
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from mailboxd.logs import ClassicLog, Logged, for_twistd
from mailboxd.processes import event_from_record, log_record

WHEN = 1764662400.75  # any instant


def _failure() -> Failure:
    try:
        1 / 0  # noqa: B018 - the failure to log
    except ZeroDivisionError:
        return Failure()


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


EVENTS = [
    {"log_format": "smtp session from {client}: {seconds:.1f} s", "seconds": 0.25},
    {"log_format": "queued for {relayed!r}", "relayed": ["a@far.test"]},
    {"log_format": "{missing} field"},
    {"log_format": "{count()} calls", "count": lambda: 3},
    {"log_format": "{{literal}} {client}"},
    {"log_format": "two\nlines from {client}"},
    {"log_format": "{client}", "log_system": "-"},
    {"log_format": "{client}", "log_system": "mailboxd.smtp#info worker 1"},
    {"log_format": "{client}", "log_system": _Unprintable()},
    {"log_format": "{client}", "log_level": None},
    {"log_format": "{client}", "log_time": None},
    {"log_format": "cannot spool: {client}", "log_failure": _failure()},
    {"log_format": ""},
    {"log_format": None},
    {"log_text": "rendered by a worker", "log_format": "{log_text}"},
]


def _event(**fields: object) -> dict:
    event = {
        "log_namespace": "mailboxd.smtp",
        "log_level": LogLevel.info,
        "log_time": WHEN,
        "client": "192.0.2.7",
    }
    event.update(fields)
    return event


class _Reactor:
    """Just what ClassicLog asks of the reactor."""

    running = True

    def __init__(self) -> None:
        self.calls: list = []
        self.triggers: list = []

    def callLater(self, delay: float, f, *args) -> None:
        self.calls.append((delay, f, args))

    def callFromThread(self, f, *args) -> None:
        self.calls.append((0, f, args))

    def addSystemEventTrigger(self, phase: str, event: str, f) -> None:
        self.triggers.append((phase, event, f))

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for _, f, args in calls:
            f(*args)


class _File:
    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture
def io_thread():
    """This thread is the reactor's, as while a reactor runs."""
    before = threadable.ioThread
    threadable.registerAsIOThread()
    yield
    threadable.ioThread = before


@pytest.mark.parametrize("fields", EVENTS)
def test_each_line_is_twisteds_own(fields):
    event = _event(**fields)
    log = ClassicLog(_File(), _Reactor())
    assert log.line(event) == formatEventAsClassicLogText(event)


def test_a_workers_line_is_twisteds_own():
    event = event_from_record(log_record(_event(log_format="from {client}")))
    assert event is not None
    event["log_system"] = "mailboxd.smtp#info worker 2"
    assert ClassicLog(_File(), _Reactor()).line(event) == formatEventAsClassicLogText(event)


def test_the_time_is_right_across_seconds():
    log = ClassicLog(_File(), _Reactor())
    for when in (WHEN, WHEN + 0.2, WHEN + 1, WHEN + 61.5, WHEN):
        event = _event(log_format="x", log_time=when)
        assert log.line(event) == formatEventAsClassicLogText(event)


def test_one_turns_lines_go_in_one_write(io_thread):
    file, reactor = _File(), _Reactor()
    log = ClassicLog(file, reactor)
    log(_event(log_format="one"))
    log(_event(log_format="two"))
    assert file.writes == []
    assert len(reactor.calls) == 1  # one flush for the turn, not one a line
    reactor.turn()
    assert len(file.writes) == 1 and file.flushes == 1
    assert file.writes[0].splitlines()[0].endswith("] one")
    assert file.writes[0].splitlines()[1].endswith("] two")
    log(_event(log_format="three"))
    assert len(reactor.calls) == 1
    reactor.turn()
    assert file.writes[-1].endswith("] three\n")


def test_nothing_is_written_for_an_empty_line(io_thread):
    file, reactor = _File(), _Reactor()
    ClassicLog(file, reactor)(_event(log_format=""))
    assert reactor.calls == [] and file.writes == []


def test_a_line_from_another_thread_is_written_at_once(io_thread):
    file, reactor = _File(), _Reactor()
    log = ClassicLog(file, reactor)
    log(_event(log_format="from the reactor"))
    thread = threading.Thread(target=log, args=(_event(log_format="from a thread"),))
    thread.start()
    thread.join()
    assert len(file.writes) == 1  # with the line the reactor's turn still held
    assert "from the reactor" in file.writes[0] and "from a thread" in file.writes[0]
    reactor.turn()  # the scheduled flush finds nothing left
    assert len(file.writes) == 1


def test_a_line_logged_while_lines_are_written_is_not_lost(io_thread):
    # As when a signal handler logs ("Received SIGTERM") in the middle of a flush.
    file, reactor = _File(), _Reactor()
    log = ClassicLog(file, reactor)
    write = file.write

    def write_and_log(text: str) -> None:
        file.write = write
        log(_event(log_format="from the signal handler"))
        write(text)

    file.write = write_and_log
    log(_event(log_format="first"))
    reactor.turn()
    reactor.turn()
    assert [w.rstrip().rsplit("] ", 1)[1] for w in file.writes] == [
        "first",
        "from the signal handler",
    ]


def test_before_and_after_the_reactor_runs_each_line_is_written_at_once(io_thread):
    file, reactor = _File(), _Reactor()
    reactor.running = False
    log = ClassicLog(file, reactor)
    log(_event(log_format="starting"))
    assert len(file.writes) == 1 and reactor.calls == []


def test_the_lines_of_the_last_turn_are_written_at_shutdown(io_thread):
    file, reactor = _File(), _Reactor()
    log = ClassicLog(file, reactor)
    log(_event(log_format="stopping"))
    ((phase, event, flush),) = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    reactor.running = False
    flush()
    assert "stopping" in file.writes[0]


@pytest.fixture
def usr1():
    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize(
    "options",
    [
        None,
        {"syslog": True, "logfile": None, "nodaemon": True, "logger": None},
        {"syslog": False, "logfile": None, "nodaemon": True, "logger": "my.observer"},
        {"syslog": False, "logfile": "-", "nodaemon": False, "logger": None},
    ],
)
def test_twistd_keeps_its_own_choice(options, usr1):
    assert for_twistd(options, _Reactor()) is None


@pytest.mark.parametrize("logfile", [None, "-"])
def test_in_the_foreground_it_writes_to_stdout(logfile, usr1):
    options = {"syslog": False, "logfile": logfile, "nodaemon": True, "logger": None}
    log = for_twistd(options, _Reactor())
    assert log is not None and log.file is sys.stdout


def test_a_logfile_is_twistds_rotating_file(tmp_path, usr1):
    path = tmp_path / "server.log"
    options = {"syslog": False, "logfile": str(path), "nodaemon": False, "logger": None}
    reactor = _Reactor()
    log = for_twistd(options, reactor)
    assert log is not None and isinstance(log.file, LogFile)
    log(_event(log_format="to the file"))
    assert path.read_text().endswith("] to the file\n")
    signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)  # what `kill -USR1` does
    ((_, rotate, _),) = reactor.calls
    assert rotate == log.file.rotate


def test_twistd_is_told_which_observer_to_use():
    application = Application("mailbox")
    log = ClassicLog(_File(), _Reactor())
    service = Logged(Service(), log)
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is log


def test_without_an_observer_twistd_chooses():
    application = Application("mailbox")
    Logged(Service(), None).setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None


# --- [log] format = json ------------------------------------------------------------


@pytest.mark.parametrize("fields", EVENTS)
def test_each_json_line_is_one_object_with_the_text_log_s_text(fields):
    import json

    from mailboxd.logs import JsonLog, render

    event = _event(**fields)
    line = JsonLog(_File(), _Reactor()).line(event)
    text = render(event)
    if not text:
        assert line is None
        return
    assert line is not None and line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["text"] == text
    assert record["level"] == getattr(event.get("log_level"), "name", "info")
    assert record["client"] == "192.0.2.7"
    assert not any(k.startswith("log_") for k in record)
    if event.get("log_time") == WHEN:
        assert record["time"] == "2025-12-02T08:00:00.750Z"
    for key, value in record.items():  # only what JSON holds as it is
        assert isinstance(value, (str, int, float, bool, type(None), list)), key


def test_json_lines_keep_plain_fields_and_drop_the_rest():
    import json

    from mailboxd.logs import JsonLog

    event = _event(
        log_format="accepted {queue_id}",
        queue_id="0123456789AB",
        code=250,
        account=None,
        recipients=["a@example.test"],
        timeout=30,  # not one of the legacy log's own fields
        format="legacy",
        isError=0,
        message=(),
        obj=object(),
        pairs=[("a", 1)],
    )
    record = json.loads(JsonLog(_File(), _Reactor()).line(event))
    assert record == {
        "time": "2025-12-02T08:00:00.750Z",
        "level": "info",
        "text": "accepted 0123456789AB",
        "system": "mailboxd.smtp#info",
        "client": "192.0.2.7",
        "queue_id": "0123456789AB",
        "code": 250,
        "account": None,
        "recipients": ["a@example.test"],
        "timeout": 30,
    }


def test_a_workers_json_line_says_which_worker():
    import json

    from mailboxd.logs import JsonLog

    event = event_from_record(log_record(_event(log_format="from {client}", code=421)))
    assert event is not None
    event["log_system"] = "mailboxd.smtp#info worker 2"
    event["worker"] = 2
    record = json.loads(JsonLog(_File(), _Reactor()).line(event))
    assert record["text"] == "from 192.0.2.7"
    assert record["worker"] == 2 and record["code"] == 421
    assert record["system"] == "mailboxd.smtp#info worker 2"


def test_for_twistd_picks_the_format():
    from mailboxd.logs import JsonLog

    options = {"nodaemon": True, "logfile": None}
    assert type(for_twistd(options, _Reactor())) is ClassicLog
    assert type(for_twistd(options, _Reactor(), "json")) is JsonLog
    assert for_twistd({"syslog": True}, _Reactor(), "json") is None  # twistd's own


def test_json_lines_hold_no_raw_control_or_line_separating_character():
    from mailboxd.logs import JsonLog

    words = "a\x1b[31m\x85b\u2028c\u2029d\re\nf\x00"
    line = JsonLog(_File(), _Reactor()).line(
        _event(log_format="refused {rcpt}", rcpt=words, helo=words)
    )
    assert line is not None and line.isascii() and line.count("\n") == 1
    assert line.endswith("\n") and all(c >= " " for c in line[:-1])
    import json

    assert json.loads(line)["helo"] == words  # escaped, not lost
