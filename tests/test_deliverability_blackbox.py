"""Mail the big providers accept, and honest results for mail coming in
(issue 14), on the real server: loop detection, and (with a DNS server on
loopback) DKIM signing, ARC sealing and the inbound SPF, DKIM and DMARC checks."""

from __future__ import annotations

import re
import smtplib

import dkim
import pytest
from conftest import ALICE, ALICE_PW, ctl
from test_blackbox import wait_for
from test_outbound_blackbox import Capture
from zone_server import MX, TXT, A, ZoneServer

from mailboxd.resolver import txt

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


def published(record_line: str) -> list[str]:
    """The strings of the TXT record `mailboxctl dkim keygen` printed."""
    name, _, rest = record_line.partition(" IN TXT ")
    assert name == "mailbox._domainkey.example.test.", record_line
    return re.findall(r'"([^"]*)"', rest)


def test_relayed_mail_is_signed_and_verifies_with_the_record_keygen_printed(make_server, zones):
    server = make_server("[mailbox]\ntrusted_networks =\n")  # relaying needs AUTH
    server.add_test_accounts()
    out = ctl(server, "dkim", "keygen", "example.test").stdout
    record = out.strip().splitlines()[-1]
    assert ctl(server, "dkim", "show", "example.test").stdout.strip() == record
    dns = zones(example_test=[TXT("mailbox._domainkey.example.test", *published(record))])
    capture = Capture(server.home, server.smarthost_port).start()
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as s:
            s.login(ALICE, ALICE_PW)
            for sender in ("Alice <alice@example.test>", "bob@other.test", "alice@example.org"):
                s.sendmail(
                    ALICE,
                    ["someone@far.test"],
                    f"From: {sender}\r\nTo: someone@far.test\r\nSubject: from {sender}\r\n"
                    "Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n\r\nhello\r\n".encode(),
                )
        assert wait_for(lambda: len(capture.messages()) == 3, timeout=20), server.log()
    finally:
        capture.stop()
    by_subject = {
        re.search(rb"Subject: from ([^\r]*)", m["data"])[1]: m["data"] for m in capture.messages()
    }
    resolver = dns.resolver()

    def dnsfunc(name, timeout=5):
        return txt(resolver, name)

    signed = by_subject[b"Alice <alice@example.test>"]
    assert signed.startswith(b"DKIM-Signature: ")
    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"hello", b"hellO"), dnsfunc=dnsfunc)
    # Alice may not sign as other.test (another customer's domain); example.org
    # is hers, but has no key: both go out unsigned.
    assert b"DKIM-Signature" not in by_subject[b"bob@other.test"]
    assert b"DKIM-Signature" not in by_subject[b"alice@example.org"]
    assert server.log().count("dkim: no key for example.org") == 1
    server.check_log()
