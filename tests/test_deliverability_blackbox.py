"""Mail the big providers accept, and honest results for mail coming in
(issue 14), on the real server: loop detection, and (with a DNS server on
loopback) DKIM signing, ARC sealing and the inbound SPF, DKIM and DMARC checks."""

from __future__ import annotations

import re
import smtplib
import time

import dkim
import pytest
from conftest import ALICE, ALICE_PW, ctl
from test_blackbox import wait_for
from test_outbound_blackbox import Capture
from zone_server import MX, TXT, A, ZoneServer, silent_dns

from mailboxd.resolver import txt
from mailboxd.signing import dns_record, new_key

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


def published(record_line: str, domain: str = "example.test") -> list[str]:
    """The strings of the TXT record `mailboxctl dkim keygen` printed."""
    name, _, rest = record_line.partition(" IN TXT ")
    assert name.endswith(f"._domainkey.{domain}."), record_line
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


# --- mail from the world: SPF, DKIM and DMARC -------------------------------------

SIGNER_KEY = new_key(1024)  # the sending domain's key, for the messages signed here


def message(sender: str, subject: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@far.test>\r\n"
        "\r\nhello from far away\r\n"
    ).encode()


def signed(data: bytes, domain: str) -> bytes:
    return dkim.sign(data, b"sel", domain.encode(), SIGNER_KEY) + data


def key_record(domain: str) -> str:
    return TXT(
        f"sel._domainkey.{domain}", *published(dns_record(domain, "sel", SIGNER_KEY), domain)
    )


@pytest.fixture
def checking(make_server, zones):
    """A server that checks mail from the world (nobody trusted), and the zones it asks."""
    dns = zones(
        pass_test=[
            TXT("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
            key_record("pass.test"),
            TXT("_dmarc.pass.test", "v=DMARC1; p=reject"),
        ],
        fail_test=[
            TXT("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
            TXT("_dmarc.fail.test", "v=DMARC1; p=none"),
        ],
        soft_test=[TXT("soft.test", "v=spf1 ~all")],
        none_test=[A("none.test", "192.0.2.9")],
        reject_test=[
            TXT("reject.test", "v=spf1 ip4:192.0.2.1 -all"),
            TXT("_dmarc.reject.test", "v=DMARC1; p=reject"),
        ],
        far_test=[TXT("client.far.test", "v=spf1 ip4:127.0.0.1 -all")],
    )
    server = make_server(
        f"[mailbox]\ntrusted_networks =\nresolver = {dns.address}\n[inbound]\nchecks = yes\n"
    )
    return server.add_test_accounts().start()


def send(server, sender: str, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as s:
        s.ehlo("client.far.test")
        s.mail(sender)
        assert s.rcpt(ALICE)[0] == 250
        return s.data(data)


def results(server, subject: str) -> str:
    """The Authentication-Results field of the delivered copy, unfolded."""
    for path in server.messages(ALICE):
        text = path.read_bytes().decode()
        if f"Subject: {subject}\n" in text:
            head = text.split("\n\n", 1)[0]
            assert head.count("Authentication-Results:") == 1, head
            field = head.split("Authentication-Results: ", 1)[1]
            lines = [field.split("\n")[0]]
            for line in field.split("\n")[1:]:
                if not line.startswith(("\t", " ")):
                    break
                lines.append(line.strip())
            return " ".join(lines)
    raise AssertionError(f"no message {subject!r}")


@pytest.mark.parametrize(
    "sender, subject, sign, found",
    [
        (
            "a@pass.test",
            "spf-pass",
            True,
            [
                "spf=pass smtp.mailfrom=pass.test",
                "dkim=pass header.d=pass.test",
                "dmarc=pass",
                "header.from=pass.test",
            ],
        ),
        (
            "a@fail.test",
            "spf-fail",
            False,
            [
                "spf=fail smtp.mailfrom=fail.test",
                "dkim=none",
                "dmarc=fail",
                "header.from=fail.test policy.dmarc=none",
            ],
        ),
        (
            "a@soft.test",
            "spf-softfail",
            False,
            ["spf=softfail smtp.mailfrom=soft.test", "dmarc=none"],
        ),
        ("a@none.test", "spf-none", False, ["spf=none smtp.mailfrom=none.test", "dmarc=none"]),
    ],
)
def test_mail_from_the_world_says_what_was_checked(checking, sender, subject, sign, found):
    data = message(sender, subject)
    code, _ = send(checking, sender, signed(data, sender.split("@")[1]) if sign else data)
    assert code == 250
    field = results(checking, subject)
    assert field.startswith("mail.example.test;"), field
    assert "spf=pass smtp.helo=client.far.test" in field, field
    for part in found:
        assert part in field, (part, field)
    checking.check_log()


def test_a_signature_broken_in_transit_fails_and_spf_still_passes(checking):
    data = signed(message("a@pass.test", "dkim-fail"), "pass.test").replace(b"hello", b"HELLO")
    assert send(checking, "a@pass.test", data)[0] == 250
    field = results(checking, "dkim-fail")
    assert "dkim=fail header.d=pass.test" in field and "dmarc=pass" in field, field


def test_dmarc_reject_refuses_and_forged_results_are_removed(checking):
    code, text = send(checking, "a@reject.test", message("a@reject.test", "rejected"))
    assert (code, text) == (
        550,
        b"5.7.1 Unauthenticated email from reject.test is not accepted due to domain's DMARC policy",
    )
    forged = b"Authentication-Results: mail.example.test; spf=pass; dkim=pass; dmarc=pass\r\n"
    theirs = b"Authentication-Results: mx.far.test; spf=fail\r\n"
    data = forged + theirs + message("a@fail.test", "forged")
    assert send(checking, "a@fail.test", data)[0] == 250
    [copy] = [p for p in checking.messages(ALICE) if b"Subject: forged" in p.read_bytes()]
    head = copy.read_bytes().split(b"\n\n")[0]
    assert b"mx.far.test; spf=fail" in head  # another server's: kept
    assert head.count(b"Authentication-Results: mail.example.test;") == 1
    assert b"spf=fail smtp.mailfrom=fail.test" in head  # ours, not the forged one


def test_a_dns_timeout_is_temperror_never_a_refusal(make_server):
    with silent_dns() as nobody:
        server = make_server(
            f"[mailbox]\ntrusted_networks =\nresolver = {nobody}\n[inbound]\nchecks = yes\n"
        )
        server.add_test_accounts().start()
        began = time.monotonic()
        assert send(server, "a@reject.test", message("a@reject.test", "timeout"))[0] == 250
        took = time.monotonic() - began
        field = results(server, "timeout")
    assert "spf=temperror smtp.mailfrom=reject.test" in field, field
    assert "dmarc=temperror" in field, field
    assert took < 10, took


def test_mail_an_alias_forwards_off_site_is_arc_sealed(make_server, zones):
    server = make_server("[mailbox]\ntrusted_networks =\n[inbound]\nchecks = yes\n")
    server.add_test_accounts()
    server.aliases.write_text("fwd@example.test: someone@far.test\n")
    record = ctl(server, "dkim", "keygen", "example.test").stdout.strip().splitlines()[-1]
    dns = zones(
        pass_test=[TXT("pass.test", "v=spf1 ip4:127.0.0.1 -all"), key_record("pass.test")],
        example_test=[TXT("mailbox._domainkey.example.test", *published(record))],
    )
    text = server.config.read_text().replace(
        "[mailbox]\n", f"[mailbox]\nresolver = {dns.address}\n", 1
    )
    server.config.write_text(text)
    capture = Capture(server.home, server.smarthost_port).start()
    try:
        server.start()
        data = signed(message("a@pass.test", "forwarded"), "pass.test")
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as s:
            s.ehlo("client.far.test")
            s.sendmail("a@pass.test", ["fwd@example.test"], data)
        assert wait_for(lambda: len(capture.messages()) == 1, timeout=20), server.log()
    finally:
        capture.stop()
    [forwarded] = capture.messages()
    sent = forwarded["data"]
    assert forwarded["rcpt_to"] == ["someone@far.test"]
    assert sent.startswith(b"ARC-Seal: i=1; ") and b"cv=none" in sent.split(b"\r\n\r\n")[0]
    resolver = dns.resolver()

    def dnsfunc(name, timeout=5):
        return txt(resolver, name)

    cv, _, why = dkim.arc_verify(sent, dnsfunc=dnsfunc)
    assert cv == b"pass", why
    head = sent.split(b"\r\n\r\n")[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    [aar] = [
        line for line in head.split(b"\r\n") if line.startswith(b"ARC-Authentication-Results:")
    ]
    assert b"i=1; mail.example.test" in aar and b"spf=pass" in aar and b"dkim=pass" in aar, aar
    assert dkim.verify(sent, dnsfunc=dnsfunc)  # the sender's own signature survives
    server.check_log()
