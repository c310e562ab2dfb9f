"""Counting (mailboxd.metrics): what each process counts, how a child's
totals reach the primary, and the sums the primary serves."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_smtp import Session
from twisted.internet.defer import fail, succeed

from mailboxd.metrics import Combined, Exposition, Metrics, from_record, to_record
from mailboxd.processes import Supervisor
from mailboxd.state import StateError


def values(families) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


def test_every_series_is_there_from_the_start_at_zero():
    found = values(Metrics().registry.collect())
    for listener in ("listen", "listen-tls", "submission", "submission-tls"):
        assert found[key("mailbox_smtp_connections_total", listener=listener)] == 0
    for protocol in ("smtp", "pop3"):
        for result in ("success", "failure"):
            assert found[key("mailbox_auth_total", protocol=protocol, result=result)] == 0
    for result in ("delivered", "deferred", "bounced"):
        assert found[key("mailbox_outbound_deliveries_total", result=result)] == 0
    assert found[key("mailbox_pop3_sessions_total")] == 0
    assert found[key("mailbox_smtp_data_seconds_count")] == 0


def test_totals_travel_as_they_are_and_leave_out_when_a_series_began():
    m = Metrics()
    m.messages["accepted"].inc(3)
    m.data_seconds.observe(0.003)
    totals = m.totals()
    assert from_record(to_record(totals)) == totals
    assert not any(name.endswith("_created") for name, _ in totals)
    assert totals[("mailbox_smtp_messages_total", (("result", "accepted"),))] == 3
    assert totals[("mailbox_smtp_data_seconds_bucket", (("le", "0.005"),))] == 1
    assert totals[("mailbox_smtp_data_seconds_bucket", (("le", "0.0025"),))] == 0


@pytest.mark.parametrize("record", [b"", b"{", b"[1]", b'[["a", 1, 2]]', b'[["a", {}, "x"]]'])
def test_a_record_that_cannot_be_read_is_ignored(record):
    assert from_record(record) is None


def test_the_primary_serves_its_own_counts_plus_the_others():
    own, other = Metrics(), Metrics()
    own.connections["listen"].inc(2)
    other.connections["listen"].inc(5)
    other.data_seconds.observe(0.02)
    found = values(Combined(own, lambda: [other.totals(), other.totals()]).collect())
    assert found[key("mailbox_smtp_connections_total", listener="listen")] == 12
    assert found[key("mailbox_smtp_data_seconds_bucket", le="0.025")] == 2
    assert found[key("mailbox_smtp_data_seconds_count")] == 2
    assert not any(name.endswith("_created") for name, _ in found)


def _supervisor() -> Supervisor:
    return Supervisor(reactor=None, config=None, count=2, listeners=list, queued=print)


def test_what_an_ended_child_counted_still_counts():
    sup = _supervisor()
    first, second, again = object(), object(), object()
    a, b = Metrics(), Metrics()
    a.recipients["relay"].inc(4)
    b.recipients["relay"].inc(1)
    sup.child_totals(first, to_record(a.totals()))
    sup.child_totals(second, to_record(b.totals()))
    a.recipients["relay"].inc(2)  # a later record replaces the last
    sup.child_totals(first, to_record(a.totals()))
    sup.child_totals(second, b"garbage")  # ignored: the last good one stays
    sup.channel_closed(first)  # child 1 died; its successor starts from 0
    sup.child_totals(again, to_record(Metrics().totals()))
    relay = ("mailbox_smtp_recipients_total", (("verdict", "relay"),))
    assert sum(t.get(relay, 0) for t in sup.children_totals()) == 7
    sup.channel_closed(first)  # closed twice: counted once
    assert sum(t.get(relay, 0) for t in sup.children_totals()) == 7


def _exposition(own: Metrics, db) -> Exposition:
    return Exposition(own, list, db, lambda: (2, 5), lambda: 7)


def test_the_gauges_are_read_at_each_scrape_off_the_reactor():
    ran = []

    def db(f):
        ran.append(f)
        return succeed(f())

    content_type, body = _exposition(Metrics(), db).latest("").result
    assert ran and content_type.startswith("text/plain; version=0.0.4")
    found = values(text_string_to_metric_families(body.decode()))
    assert found[key("mailbox_blocked_ips")] == 2
    assert found[key("mailbox_pop_authorised_ips")] == 5
    assert found[key("mailbox_queue_messages")] == 7


def test_openmetrics_when_asked_for():
    exposition = _exposition(Metrics(), lambda f: succeed(f()))
    content_type, body = exposition.latest("application/openmetrics-text; version=1.0.0").result
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_a_failing_state_store_fails_the_scrape():
    d = _exposition(Metrics(), lambda f: fail(StateError("database is locked"))).latest("")
    assert d.result.check(StateError)
    d.addErrback(lambda _: None)


def test_smtp_counts_connections_recipients_and_messages(unit):
    s = Session(unit)
    m = s.proto.factory.metrics
    s.envelope()
    assert s.cmd("RCPT TO:<nobody@example.test>").startswith("550 ")
    assert s.cmd("RCPT TO:<bad address>").startswith("501 ")
    assert s.cmd("DATA").startswith("354 ")
    assert s.cmd("Subject: hi\r\n\r\nbody\r\n.").startswith("250 ")
    s.envelope()
    assert s.cmd("DATA").startswith("354 ")
    assert s.cmd("x" * 990 + "\r\n" + ("x" * 990 + "\r\n") * 11 + ".").startswith("552 ")
    found = values(m.registry.collect())
    assert found[key("mailbox_smtp_connections_total", listener="listen")] == 1
    assert found[key("mailbox_smtp_connections_total", listener="submission")] == 0
    assert found[key("mailbox_smtp_recipients_total", verdict="local")] == 2
    assert found[key("mailbox_smtp_recipients_total", verdict="rejected")] == 2
    assert found[key("mailbox_smtp_messages_total", result="accepted")] == 1
    assert found[key("mailbox_smtp_messages_total", result="rejected")] == 1
    assert found[key("mailbox_smtp_data_seconds_count")] == 1
