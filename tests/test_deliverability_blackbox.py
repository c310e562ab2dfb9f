"""Mail the big providers accept, and honest results for mail coming in
(issue 14), on the real server: loop detection, and (with a DNS server on
loopback) DKIM signing, ARC sealing and the inbound SPF, DKIM and DMARC checks."""

from __future__ import annotations

import smtplib

import pytest
from conftest import ALICE
from test_blackbox import wait_for
from zone_server import MX, A, ZoneServer

pytestmark = pytest.mark.blackbox


def received(count: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.far.test by mx%d.far.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        % (i, i)
        for i in range(count)
    )


def test_a_message_with_more_than_max_hops_received_fields_is_refused(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail("a@far.test", [ALICE], received(50) + b"Subject: ok\r\n\r\nfifty\r\n")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@far.test", [ALICE], received(51) + b"Subject: loop\r\n\r\nloop\r\n")
    assert e.value.smtp_code == 554 and e.value.smtp_error == b"5.4.6 Too many hops"
    [kept] = server.messages(ALICE)
    assert b"fifty" in kept.read_bytes()


@pytest.fixture
def zones(tmp_path):
    """Start a DNS server on loopback with the zones given: zones(name, *records)."""
    started: list[ZoneServer] = []

    def start(**zones: list[str]) -> ZoneServer:
        server = ZoneServer(tmp_path / f"z{len(started)}")
        for zone, records in zones.items():
            server.add(zone.replace("_", "."), *records)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_mx_lookups_ask_the_configured_resolver(make_server, zones):
    dns = zones(far_test=[MX("far.test", 10, "mx.far.test"), A("mx.far.test", "127.0.0.1")])
    server = make_server(f"[mailbox]\nresolver = {dns.address}\n[relay]\nsmarthost =\n")
    server.add_test_accounts().start()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail(ALICE, ["someone@gone.far.test"], b"Subject: out\r\n\r\nx\r\n")
    # Only the zone's server can say that name does not exist: a bounce, at once.
    assert wait_for(lambda: len(server.messages(ALICE)) == 1, timeout=20), server.log()
    [bounce] = server.messages(ALICE)
    assert b"gone.far.test: no such domain (NXDOMAIN)" in bounce.read_bytes()
