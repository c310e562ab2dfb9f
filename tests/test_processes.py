"""A worker's log events on their way to the primary (mailboxd.processes)."""

from __future__ import annotations

import json

import pytest
from twisted.logger import LogLevel, eventAsText, formatEvent, formatEventAsClassicLogText
from twisted.python.failure import Failure

from mailboxd.processes import (
    _RECORD,
    event_from_record,
    from_queued_record,
    log_record,
    queued_record,
)


def _event(**fields):
    event = {
        "log_format": "accepted {id} from <{sender}>: delivered to {recipients}",
        "log_level": LogLevel.info,
        "log_namespace": "mailboxd.reception",
        "log_time": 1_790_000_000.25,
        "log_logger": object(),
        "id": "1.M1P2Q3",
        "sender": "a@far.test",
        "recipients": ["alice@example.test", "bob@example.test"],
    }
    event.update(fields)
    return event


def test_the_primary_writes_a_workers_line_as_the_worker_would_have():
    event = event_from_record(log_record(_event()))
    assert formatEvent(event) == (
        "accepted 1.M1P2Q3 from <a@far.test>: delivered to "
        "['alice@example.test', 'bob@example.test']"
    )
    assert event["log_level"] is LogLevel.info
    assert event["log_namespace"] == "mailboxd.reception"
    assert event["log_time"] == 1_790_000_000.25
    # Plain fields stay for observers that want them; objects do not cross.
    assert event["sender"] == "a@far.test"
    assert event["recipients"] == ["alice@example.test", "bob@example.test"]
    assert "log_logger" not in event


def test_braces_in_what_was_said_are_not_formatted_again():
    event = event_from_record(log_record(_event(sender="{log_time}{0}")))
    assert "from <{log_time}{0}>" in formatEvent(event)


def test_a_failure_travels_as_its_traceback():
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        failure = Failure()
    event = event_from_record(
        log_record(
            _event(log_format="cannot go on", log_failure=failure, log_level=LogLevel.critical)
        )
    )
    text = formatEventAsClassicLogText(event)
    assert "cannot go on" in text
    assert "ZeroDivisionError" in text
    assert event["log_level"] is LogLevel.critical


@pytest.mark.parametrize(
    "fields",
    [
        {"log_format": "smtp session from {client}: {seconds:.1f} s", "seconds": 0.25},
        {"log_format": "queued for {relayed!r}", "relayed": ["a@far.test"]},
        {"log_format": "{missing} field"},
        {"log_format": "{count()} calls", "count": lambda: 3},
        {"log_format": b"bytes {client}"},
        {"log_format": None},
        {"log_format": "{{literal}} {client}"},
    ],
)
def test_a_line_reads_as_twisted_would_render_it(fields):
    event = _event(client="192.0.2.7", **fields)
    expected = eventAsText(event, includeTimestamp=False, includeSystem=False)
    assert json.loads(log_record(event))["log_text"] == expected


def test_an_object_field_is_left_out_not_fatal():
    record = json.loads(log_record(_event(peer=object(), count=3, ratio=0.5, ok=True)))
    assert "peer" not in record
    assert (record["count"], record["ratio"], record["ok"]) == (3, 0.5, True)


def test_a_format_that_cannot_be_rendered_still_gives_a_line():
    event = event_from_record(log_record(_event(log_format="{missing} field")))
    assert "missing" in formatEvent(event)


@pytest.mark.parametrize(
    "record",
    [b"", b"not json", b"[1, 2]", b'"text"', b'{"no": "text"}', b'{"log_text": 3}', b"\xff\xfe"],
)
def test_a_record_that_cannot_be_read_is_dropped(record):
    assert event_from_record(record) is None


def test_an_unknown_level_is_said_at_info():
    record = json.dumps({"log_text": "x", "log_level": "loud"}).encode()
    assert event_from_record(record)["log_level"] is LogLevel.info


@pytest.mark.parametrize(
    "message", [None, b"", b"Subject: x\n\nbody\n", b"a \x1e separator\n\xff\x00\n"]
)
def test_what_a_child_queued_reaches_the_primary_as_it_was(message):
    envelope = '{"version":1,"id":"0000000000E1","sender":"\\u00e9@x.test"}'
    record = queued_record(envelope, message)
    assert _RECORD not in record
    assert from_queued_record(record) == (envelope, message)


def test_a_message_that_cannot_be_read_is_left_to_the_disk():
    assert from_queued_record(b'{"id":"x"}\nnot base64!') == ('{"id":"x"}', None)


def test_a_shared_listener_is_closed_only_once_the_workers_have_ended():
    # Twisted shuts down a socket it made when it closes it: a worker still
    # reading it would see accept() fail (EINVAL) and log a traceback.
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ServerFactory
    from twisted.internet.testing import MemoryReactor

    from mailboxd.service import ListenerService

    service = ListenerService(
        MemoryReactor(), "tcp:2525:interface=127.0.0.1", ServerFactory(), "smtp-0"
    )
    service.privilegedStartService()
    calls = []
    service.port.stopReading = lambda: calls.append("stop reading")
    service.port.stopListening = lambda: calls.append("close")
    ended: Deferred = Deferred()
    service.workers_ended = lambda: ended
    stopped = service.stopService()
    assert calls == ["stop reading"] and not stopped.called
    ended.callback(None)
    assert calls == ["stop reading", "close"] and stopped.called


def test_a_listener_that_cannot_listen_stops_the_start_with_one_line():
    import socket

    from twisted.internet import reactor
    from twisted.internet.protocol import ServerFactory

    from mailboxd.service import ListenerService

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        description = f"tcp:{port}:interface=127.0.0.1"
        service = ListenerService(reactor, description, ServerFactory(), "smtp-0")
        with pytest.raises(SystemExit) as raised:
            service.privilegedStartService()
    finally:
        blocker.close()
    message = str(raised.value)
    assert message.startswith(f"mailbox: cannot listen on {description}: ")
    assert "in use" in message and "\n" not in message
    assert service.port is None


def test_a_listener_keeps_the_deferred_of_its_port_and_stops_it():
    from twisted.internet.protocol import ServerFactory
    from twisted.internet.testing import MemoryReactor

    from mailboxd.service import ListenerService

    reactor = MemoryReactor()
    service = ListenerService(reactor, "tcp:2525:interface=127.0.0.1", ServerFactory(), "s")
    assert service.listening is None
    service.startService()  # listens, without privilegedStartService first
    ports = []
    service.listening.addCallback(ports.append)
    assert ports == [service.port] and reactor.tcpServers[0][0] == 2525
    stopping = []
    service.port.stopListening = lambda: stopping.append("close")
    stopped = service.stopService()
    assert stopped.called and stopping == ["close"] and not service.running


def test_haproxy_listeners_are_shared_and_say_what_a_child_adds():
    from mailboxd.processes import listener_kind, shared

    assert shared("haproxy:tcp:25") and shared("haproxy:tls:465")
    assert not shared("haproxy:unix:/run/x.sock")
    assert listener_kind("tcp:25") == "plain"
    assert listener_kind("tls:465") == "tls"
    assert listener_kind("haproxy:tcp:25") == "proxy"
    assert listener_kind("haproxy:tls:465") == "proxy+tls"


def test_a_haproxy_listener_listens_on_tcp_with_the_proxy_wrapper_outside_tls(tmp_path):
    from twisted.internet.protocol import ServerFactory
    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mailboxd.proxy import ProxyFactory
    from mailboxd.service import ListenerService
    from mailboxd.tls import ServerTLS, make_self_signed

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed("mail.example.test", cert, key)
    tls = ServerTLS(cert, key, Clock())
    reactor = MemoryReactor()
    inner = ServerFactory()
    service = ListenerService(reactor, "haproxy:tls:2465:interface=127.0.0.1", inner, "s", tls)
    service.startService()
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, backlog, interface) == (2465, 1024, "127.0.0.1")
    assert isinstance(factory, ProxyFactory)  # outermost: the header comes first
    gates = factory.wrappedFactory.wrappedFactory  # Twisted's wrapper's
    assert isinstance(gates.wrapped_factory, TLSMemoryBIOFactory)
    assert gates.wrapped_factory.wrappedFactory is inner

    reactor = MemoryReactor()
    ListenerService(reactor, "haproxy:tcp:2525", inner, "s").startService()
    [(port, factory, backlog, _)] = reactor.tcpServers
    assert (port, backlog) == (2525, 1024)
    assert factory.wrappedFactory.wrappedFactory.wrapped_factory is inner
