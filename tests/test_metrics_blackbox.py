"""`[metrics] listen` on the real server: after real SMTP and POP3 traffic on
every kind of listener, a relay to a smarthost that delivers, defers and
refuses, and a client blocked, `GET /metrics` gives every series its right
value, also when two worker processes share the work (issue 13, item 4)."""

from __future__ import annotations

import base64
import poplib
import smtplib
import urllib.error
import urllib.request

import pytest
from conftest import ALICE, ALICE_PW, client_tls_context, free_port
from prometheus_client.parser import text_string_to_metric_families
from test_blackbox import wait_for
from test_outbound_blackbox import Capture, queued

pytestmark = pytest.mark.blackbox


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


EXPECTED = {
    # The fixture connects once to each port but the last, to see it listen.
    ("mailbox_smtp_connections_total", "listener", "listen"): 3,
    ("mailbox_smtp_connections_total", "listener", "listen-tls"): 2,
    ("mailbox_smtp_connections_total", "listener", "submission"): 2,
    ("mailbox_smtp_connections_total", "listener", "submission-tls"): 1,
    ("mailbox_smtp_messages_total", "result", "accepted"): 2,
    ("mailbox_smtp_messages_total", "result", "rejected"): 1,
    ("mailbox_smtp_recipients_total", "verdict", "local"): 2,
    ("mailbox_smtp_recipients_total", "verdict", "relay"): 3,
    ("mailbox_smtp_recipients_total", "verdict", "rejected"): 2,
    ("mailbox_outbound_deliveries_total", "result", "delivered"): 1,
    ("mailbox_outbound_deliveries_total", "result", "deferred"): 1,
    ("mailbox_outbound_deliveries_total", "result", "bounced"): 1,
    ("mailbox_pop3_sessions_total",): 1,
    ("mailbox_blocked_ips",): 1,
    ("mailbox_pop_authorised_ips",): 1,
    ("mailbox_queue_messages",): 1,
    ("mailbox_smtp_data_seconds_count",): 2,
    ("mailbox_smtp_data_seconds_bucket", "le", "+Inf"): 2,
}
AUTH = {
    ("smtp", "success"): 1,
    ("smtp", "failure"): 4,
    ("pop3", "success"): 1,
    ("pop3", "failure"): 1,
}


def expected() -> dict[tuple[str, frozenset], float]:
    found = {}
    for key, value in EXPECTED.items():
        name, *pair = key
        found[(name, frozenset([tuple(pair)] if pair else []))] = value
    for (protocol, result), value in AUTH.items():
        labels = frozenset({("protocol", protocol), ("result", result)})
        found[("mailbox_auth_total", labels)] = value
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_after_real_traffic(make_server, workers):
    metrics_port, submissions_port = free_port(), free_port()
    server = make_server(
        "[mailbox]\ntrusted_networks =\n"
        f"workers = {workers}\n"
        "[limits]\nauth_failures = 3\n"
        f"[metrics]\nlisten = tcp:{metrics_port}:interface=127.0.0.1\n",
        tls=True,
    )
    text = server.config.read_text()  # with tls=True, listen has tcp: and tls:
    text = text.replace(
        f"submission = tcp:{server.submission_port}:interface=127.0.0.1",
        f"submission = tcp:{server.submission_port}:interface=127.0.0.1"
        f" tls:{submissions_port}:interface=127.0.0.1",
    )
    server.config.write_text(text)
    server.add_test_accounts()
    capture = Capture(server.home, server.smarthost_port)
    capture.set_script(
        "rcpt 550 5.1.1 no such user match=^gone@\nrcpt 451 4.3.0 not now match=^later@\n"
    )
    capture.start()
    try:
        server.start()
        if workers > 1:
            assert wait_for(lambda: "worker 1 serving" in server.log(), timeout=20)
        smtplib.SMTP_SSL(
            "127.0.0.1", submissions_port, context=client_tls_context(), timeout=10
        ).quit()  # submission-tls: the one connection there

        # A: from the world, on listen: local, unknown, relay refused, too big.
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
            s.ehlo("client.far.test")
            s.mail("a@far.test")
            assert s.rcpt(ALICE)[0] == 250
            assert s.rcpt("nobody@example.test")[0] == 550
            assert s.rcpt("someone@far.test")[0] >= 500
            assert s.data(b"Subject: one\r\n\r\nbody\r\n")[0] == 250
            s.mail("a@far.test")
            assert s.rcpt(ALICE)[0] == 250
            assert s.data(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 1100)[0] == 552
        # B: a customer on listen-tls: AUTH, then a relay to three recipients.
        with smtplib.SMTP_SSL(
            "127.0.0.1", server.smtps_port, context=client_tls_context(), timeout=10
        ) as s:
            s.ehlo("pc.example.test")
            assert s.docmd("AUTH", plain(ALICE, ALICE_PW))[0] == 235
            refused = s.sendmail(
                ALICE,
                ["ok@far.test", "gone@far.test", "later@far.test"],
                b"Subject: out\r\n\r\nx\r\n",
            )
            assert refused == {}
        # C: a wrong password on submission.
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as s:
            s.ehlo("pc.example.test")
            assert s.docmd("AUTH", plain(ALICE, "wrong"))[0] == 535
        # D: POP3, right then wrong.
        p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        p.user(ALICE)
        p.pass_(ALICE_PW)
        p.quit()
        p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
        p.user(ALICE)
        with pytest.raises(poplib.error_proto):
            p.pass_("wrong")
        p.quit()
        # E: another address guesses three times and is blocked.
        s = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10, source_address=("127.0.0.3", 0))
        s.ehlo("guesser.far.test")
        assert s.docmd("AUTH", plain(ALICE, "guess 1"))[0] == 535
        assert s.docmd("AUTH", plain(ALICE, "guess 2"))[0] == 535
        assert s.docmd("AUTH", plain(ALICE, "guess 3"))[0] == 535
        assert s.getreply()[0] == 421  # and the connection ends
        s.close()

        want = expected()

        def right() -> bool:
            got = scrape(metrics_port)
            return all(got.get(key) == value for key, value in want.items())

        assert wait_for(right, timeout=20), {
            key: (scrape(metrics_port).get(key), value) for key, value in want.items()
        }
        got = scrape(metrics_port)
        assert got[("mailbox_smtp_data_seconds_sum", frozenset())] > 0
        assert len(capture.messages()) == 1 and len(queued(server)) == 1
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10)
        assert e.value.code == 404
    finally:
        capture.stop()
    server.check_log()
    assert "/metrics" not in server.log()  # no access log line a scrape
