"""Mail the big providers accept, and honest results for mail coming in
(issue 14), on the real server: loop detection, and (with a DNS server on
loopback) DKIM signing, ARC sealing and the inbound SPF, DKIM and DMARC checks."""

from __future__ import annotations

import re
import smtplib
import time

import dkim
import dns.resolver as dnspython  # `dns` is the tests' DNS server, below
import pytest
from conftest import ALICE, ALICE_PW, MailServer, ctl
from test_blackbox import pop_login, wait_for
from test_outbound_blackbox import Capture
from zone_server import MX, TXT, A, ZoneServer, silent_dns

from mailboxd.inbound import CHECKS_SECONDS
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
    """Start a DNS server on loopback with the zones given: zones(name_test=records),
    and names answered with SERVFAIL (failing=) or never answered (never=)."""
    started: list[ZoneServer] = []

    def start(failing: tuple = (), never: tuple = (), **zones: list[str]) -> ZoneServer:
        server = ZoneServer(tmp_path / f"z{len(started)}")
        for zone, records in zones.items():
            server.add(zone.replace("_", "."), *records)
        server.failing(*failing).never(*never)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_mx_lookups_ask_the_configured_resolver(make_server, zones):
    # Answers only the zone's server can give (the names are under .test): a
    # null MX, and MX hosts whose addresses it knows to be none. Either
    # bounces at once; the system's resolver would find no such domain, or
    # time out, and getaddrinfo would be asked for the hosts' addresses.
    # (routes.mx_hosts' addresses, by preference, are tested in test_routes
    # against the same server: delivering to them needs port 25.)
    dns = zones(
        far_test=[
            MX("far.test", 0, ""),  # the root: "." on the wire
            MX("hostless.far.test", 10, "mx.hostless.far.test"),
            TXT("mx.hostless.far.test", "a name with no address"),
        ]
    )
    server = make_server(f"[mailbox]\nresolver = {dns.address}\n[relay]\nsmarthost =\n")
    server.add_test_accounts().start()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail(ALICE, ["someone@far.test"], b"Subject: null\r\n\r\nx\r\n")
        s.sendmail(ALICE, ["someone@hostless.far.test"], b"Subject: hostless\r\n\r\nx\r\n")
    assert wait_for(lambda: len(server.messages(ALICE)) == 2, timeout=20), server.log()
    bounces = b"".join(p.read_bytes() for p in server.messages(ALICE))
    assert b"far.test does not accept mail (null MX)" in bounces, bounces
    assert b"hostless.far.test: its mail hosts have no address" in bounces, bounces


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
    # other.test has a key too: that Alice's other.test mail is unsigned then
    # says she may not use it, not that it has no key.
    other = ctl(server, "dkim", "keygen", "other.test").stdout.strip().splitlines()[-1]
    dns = zones(
        example_test=[TXT("mailbox._domainkey.example.test", *published(record))],
        other_test=[TXT("mailbox._domainkey.other.test", *published(other, "other.test"))],
    )
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
    # Alice may not sign as other.test (another customer's domain, which has
    # a key); example.org is hers, but has no key: both go out unsigned.
    assert b"DKIM-Signature" not in by_subject[b"bob@other.test"]
    assert b"DKIM-Signature" not in by_subject[b"alice@example.org"]
    assert server.log().count("dkim: no key for example.org") == 1
    assert "other.test" not in server.log()  # its key was never so much as read
    server.check_log()


def test_what_dkimpy_cannot_sign_is_relayed_unsigned_not_refused(make_server, zones):
    server = make_server("[mailbox]\ntrusted_networks =\n")
    server.add_test_accounts()
    ctl(server, "dkim", "keygen", "example.test")
    capture = Capture(server.home, server.smarthost_port).start()
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as s:
            s.login(ALICE, ALICE_PW)
            for n in (1, 2):  # a header line with no colon: dkimpy's MessageFormatError
                reply = s.sendmail(
                    ALICE,
                    ["someone@far.test"],
                    f"From: {ALICE}\r\nSubject: odd {n}\r\nNo colon \x1b[31mhere\r\n"
                    "\r\nhello\r\n".encode(),
                )
                assert reply == {}  # 250 for every recipient
        assert wait_for(lambda: len(capture.messages()) == 2, timeout=20), server.log()
    finally:
        capture.stop()
    for sent in capture.messages():
        assert b"No colon \x1b[31mhere\r\n" in sent["data"]
        assert b"DKIM-Signature" not in sent["data"]
    log = server.log()
    assert log.count("dkim: cannot sign a message for example.test") == 1, log
    assert "\x1b" not in log and "No colon" not in log  # nothing of the message's own
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


WORLD = {
    "pass_test": [
        TXT("pass.test", "v=spf1 ip4:127.0.0.1 -all"),
        key_record("pass.test"),
        TXT("_dmarc.pass.test", "v=DMARC1; p=reject"),
    ],
    "fail_test": [
        TXT("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
        TXT("_dmarc.fail.test", "v=DMARC1; p=none"),
    ],
    "soft_test": [TXT("soft.test", "v=spf1 ~all")],
    "none_test": [A("none.test", "192.0.2.9")],
    "reject_test": [
        TXT("reject.test", "v=spf1 ip4:192.0.2.1 -all"),
        TXT("_dmarc.reject.test", "v=DMARC1; p=reject"),
    ],
    # SPF passes; the DMARC lookup gets SERVFAIL (see `world`).
    "servfail_test": [TXT("servfail.test", "v=spf1 ip4:127.0.0.1 -all")],
    # A p=reject policy, and an SPF record that never comes (see `world`).
    "slow_test": [TXT("_dmarc.slow.test", "v=DMARC1; p=reject")],
    # No DMARC record, and an SPF record that never comes (see `world`).
    "lagging_test": [A("www.lagging.test", "192.0.2.9")],
    # Signed, but the key record is not a key.
    "badkey_test": [
        TXT("badkey.test", "v=spf1 ip4:127.0.0.1 -all"),
        TXT("sel._domainkey.badkey.test", "v=DKIM1; k=rsa; p=!!!not-a-key"),
    ],
    "far_test": [TXT("client.far.test", "v=spf1 ip4:127.0.0.1 -all")],
}


@pytest.fixture
def world(zones):
    """The DNS server mail from the world is checked against."""
    return zones(**WORLD, failing=["_dmarc.servfail.test"], never=["slow.test", "lagging.test"])


@pytest.fixture
def checking_server(make_server, world):
    """checking_server(trusted, inbound): a started server that checks mail
    from the world against `world`; `trusted` networks (none by default),
    and more `[inbound]` settings."""

    def start(trusted: str = "", inbound: str = "") -> MailServer:
        server = make_server(
            f"[mailbox]\ntrusted_networks = {trusted}\nresolver = {world.address}\n"
            f"[inbound]\nchecks = yes\n{inbound}"
        )
        return server.add_test_accounts().start()

    return start


@pytest.fixture
def checking(checking_server):
    return checking_server()


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


def unfolded(head: bytes) -> list[str]:
    """The header's fields, each unfolded onto one line."""
    return head.decode().replace("\n\t", " ").replace("\n ", " ").split("\n")


def test_dmarc_reject_refuses_and_stores_nothing(checking):
    code, text = send(checking, "a@reject.test", message("a@reject.test", "rejected"))
    assert (code, text) == (
        550,
        b"5.7.1 Unauthenticated email from reject.test is not accepted due to domain's DMARC policy",
    )
    assert checking.messages(ALICE) == []
    spool = checking.mail_dir / ".incoming"
    assert not spool.exists() or list(spool.iterdir()) == []
    assert ctl(checking, "queue", "list").stdout == ""


def test_forged_results_are_removed_however_written_and_ours_is_on_top(checking):
    forged = [
        b"Authentication-Results: mail.example.test; spf=pass; dkim=pass; dmarc=pass (plain)\r\n",
        b"Authentication-Results:\r\n\tmail.example.test; dmarc=pass (folded)\r\n",
        b"Authentication-Results: (comment) mail.example.test; dmarc=pass (commented)\r\n",
        # Too long to judge (16 KiB before its authserv-id): removed unread.
        b"Authentication-Results: (" + b"\r\n\t".join([b"x" * 900] * 20) + b")\r\n"
        b"\tmx.far.test; dmarc=pass (long)\r\n",
    ]
    # Another server's, folded before its name: read whole, it is kept.
    theirs = b"Authentication-Results:\r\n\t(theirs) mx.far.test;\r\n\tspf=fail (kept)\r\n"
    data = b"".join(forged) + theirs + message("a@fail.test", "forged")
    assert send(checking, "a@fail.test", data)[0] == 250
    # A message that ends inside its header, on a forged field.
    ends = b"Subject: ends\r\nAuthentication-Results:\r\n\tmail.example.test; dmarc=pass (end)"
    assert send(checking, "a@fail.test", ends)[0] == 250
    for subject in ("forged", "ends"):
        [copy] = [p for p in checking.messages(ALICE) if f"Subject: {subject}\n" in p.read_text()]
        fields = unfolded(copy.read_bytes().split(b"\n\n")[0])
        for gone in ("(plain)", "(folded)", "(commented)", "(long)", "(end)", "xxxx"):
            assert not any(gone in f for f in fields), (gone, fields)
        ours = [f for f in fields if f.startswith("Authentication-Results: mail.example.test;")]
        assert len(ours) == 1 and "spf=fail smtp.mailfrom=fail.test" in ours[0], fields
        # RFC 8601 §5: the field is added at the top, as trace fields are
        # (RFC 5322 §3.6.7): above the Received this server wrote as the
        # data began. Only Return-Path is higher: RFC 5321 §4.4 puts it at
        # the very beginning, at final delivery.
        assert fields[0] == "Return-Path: <a@fail.test>", fields
        assert fields[1] == ours[0], fields
        assert fields[2].startswith("Received: from client.far.test ([127.0.0.1])"), fields
        assert "by mail.example.test (Mailbox)" in fields[2]
    [forged_copy] = [p for p in checking.messages(ALICE) if "Subject: forged\n" in p.read_text()]
    fields = unfolded(forged_copy.read_bytes().split(b"\n\n")[0])
    assert "Authentication-Results: (theirs) mx.far.test; spf=fail (kept)" in fields, fields
    checking.check_log()


def test_a_dns_timeout_is_temperror_never_a_refusal_and_the_checks_keep_time(make_server):
    data = message("a@reject.test", "timeout")
    for selector in ("s1", "s2", "s3", "s4", "s5"):  # five keys to look up, at 1 s each
        data = dkim.sign(data, selector.encode(), b"reject.test", SIGNER_KEY) + data
    with silent_dns() as nobody:
        server = make_server(
            f"[mailbox]\ntrusted_networks =\nresolver = {nobody}\n[inbound]\nchecks = yes\n"
        )
        server.add_test_accounts().start()
        began = time.monotonic()
        assert send(server, "a@reject.test", data)[0] == 250
        took = time.monotonic() - began
        field = results(server, "timeout")
    assert "spf=temperror smtp.mailfrom=reject.test" in field, field
    assert field.count("dkim=temperror header.d=reject.test") == 5, field
    assert "dmarc=temperror" in field, field
    # SPF's 1 + 2 s, five keys and DMARC's lookups would be 10 s; the message
    # has CHECKS_SECONDS in all.
    assert took < CHECKS_SECONDS + 2.5, took


def test_a_dmarc_lookup_that_fails_at_the_server_is_temperror_not_no_policy(checking):
    assert send(checking, "a@servfail.test", message("a@servfail.test", "servfail"))[0] == 250
    field = results(checking, "servfail")
    assert "spf=pass smtp.mailfrom=servfail.test" in field, field
    assert "dmarc=temperror" in field and "header.from=servfail.test" in field, field


def test_a_key_record_that_is_not_a_key_is_a_permerror(checking):
    data = signed(message("a@badkey.test", "badkey"), "badkey.test")
    assert send(checking, "a@badkey.test", data)[0] == 250
    field = results(checking, "badkey")
    assert "dkim=permerror header.d=badkey.test" in field, field
    checking.check_log()


def test_spf_reject_refuses_a_fail_and_asks_again_after_a_timeout(checking_server):
    server = checking_server(inbound="spf_reject = yes\n")
    code, text = send(server, "a@fail.test", message("a@fail.test", "spf-refused"))
    assert (code, text) == (550, b"5.7.23 SPF validation failed")
    # lagging.test's SPF record never comes: the fail it might be is not known.
    code, text = send(server, "a@lagging.test", message("a@lagging.test", "spf-later"))
    assert (code, text) == (451, b"4.7.24 SPF validation error, try again later")
    assert send(server, "a@soft.test", message("a@soft.test", "spf-soft"))[0] == 250
    assert [b"spf-soft" in p.read_bytes() for p in server.messages(ALICE)] == [True]


def test_a_timeout_where_dmarc_would_refuse_asks_again_later(checking):
    # slow.test publishes p=reject, but its SPF record never comes: whether
    # it passes is not known now, so neither is DMARC's verdict.
    code, text = send(checking, "a@slow.test", message("a@slow.test", "dmarc-later"))
    assert (code, text) == (
        451,
        b"4.7.1 DMARC check of slow.test not possible now, try again later",
    )
    assert checking.messages(ALICE) == []


def test_clients_that_may_relay_are_not_checked(checking_server):
    """Authenticated, POP-authorised and trusted clients send what they
    send: no checks, so no refusal and no Authentication-Results."""
    data = message("a@reject.test", "unchecked")
    server = checking_server()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:  # the same message, unauthorised
            s.sendmail(ALICE, [ALICE], data)
        assert e.value.smtp_code == 550
        s.login(ALICE, ALICE_PW)
        assert s.sendmail(ALICE, [ALICE], data) == {}
    pop_login(server).quit()  # POP-before-SMTP for 127.0.0.1
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as s:
        assert s.sendmail(ALICE, [ALICE], data) == {}
    trusting = checking_server(trusted="127.0.0.0/8")
    with smtplib.SMTP("127.0.0.1", trusting.smtp_port, timeout=20) as s:
        assert s.sendmail(ALICE, [ALICE], data) == {}
    copies = server.messages(ALICE) + trusting.messages(ALICE)
    assert len(copies) == 3
    for copy in copies:
        assert b"Authentication-Results" not in copy.read_bytes()


def test_the_test_fixture_checks_nothing_unless_asked(world):
    from mailboxd.testing import MailServer as Fixture

    data = message("a@reject.test", "fixture")
    saved = dnspython.default_resolver  # an in-process server with checks sets it
    try:
        with Fixture(resolver=world.address) as box:
            box.add_account(ALICE, ALICE_PW)
            with smtplib.SMTP(box.host, box.smtp_port, timeout=20) as s:
                assert s.sendmail("a@reject.test", [ALICE], data) == {}
            kept = box.wait_for_message(to=ALICE, subject="fixture", timeout=10)
            assert b"Authentication-Results" not in kept.raw
        with Fixture(resolver=world.address, checks=True) as box:  # asked: checked
            box.add_account(ALICE, ALICE_PW)
            with smtplib.SMTP(box.host, box.smtp_port, timeout=20) as s:
                with pytest.raises(smtplib.SMTPDataError) as e:
                    s.sendmail("a@reject.test", [ALICE], data)
            assert e.value.smtp_code == 550
    finally:
        dnspython.default_resolver = saved


def test_a_forwarding_loop_between_two_servers_ends_in_a_bounce(make_server):
    """a.test forwards loop@a.test to loop@b.test, and b.test forwards it
    back, each server relaying through the other: the message gathers a
    Received field at each hop until one server refuses it (554 5.4.6), and
    the sender gets a bounce; nothing goes round again."""

    def config(domain: str) -> str:
        return (
            f"[mailbox]\nhostname = mail.{domain}\ndomains = {domain}\ndomain_aliases =\n"
            "[smtp]\nmax_hops = 8\n"
        )

    a = make_server(config("a.test"), name="a")
    b = make_server(config("b.test"), name="b")
    for here, there in ((a, b), (b, a)):
        text = here.config.read_text()
        relay = f"smarthost = 127.0.0.1:{here.smarthost_port}"
        assert relay in text
        here.config.write_text(text.replace(relay, f"smarthost = 127.0.0.1:{there.smtp_port}"))
    a.add_user("sender@a.test", "sender pw")
    a.aliases.write_text("loop@a.test: loop@b.test\n")
    b.aliases.write_text("loop@b.test: loop@a.test\n")
    a.start()
    b.start()
    with smtplib.SMTP("127.0.0.1", a.smtp_port, timeout=20) as s:
        s.sendmail("sender@a.test", ["loop@a.test"], b"Subject: round\r\n\r\nand round\r\n")
    logs = lambda: a.log() + b.log()  # noqa: E731
    assert wait_for(lambda: len(a.messages("sender@a.test")) == 1, timeout=60), logs()
    [bounce] = a.messages("sender@a.test")
    text = bounce.read_text()
    assert "5.4.6 Too many hops" in text, text
    assert "Subject: round" in text  # the message it bounces
    # The loop is over: both queues empty out, and nothing more arrives.
    assert wait_for(lambda: not ctl(a, "queue", "list").stdout, timeout=20), logs()
    assert wait_for(lambda: not ctl(b, "queue", "list").stdout, timeout=20), logs()
    time.sleep(1)
    assert len(a.messages("sender@a.test")) == 1
    assert "5.4.6 Too many hops" in logs()
    a.check_log()
    b.check_log()


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
        # What dkimpy will not seal (no From:, an ARC chain at its last
        # instance) is forwarded unsealed, never refused.
        unsealable = [
            message("a@pass.test", "no-from").replace(b"From: a@pass.test\r\n", b""),
            b"ARC-Seal: i=50; a=rsa-sha256; cv=pass; d=far.test; s=s; b=abc\r\n"
            + message("a@pass.test", "arc-50"),
        ]
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20) as s:
            s.ehlo("client.far.test")
            s.sendmail("a@pass.test", ["fwd@example.test"], data)
            for other in unsealable:
                assert s.sendmail("a@pass.test", ["fwd@example.test"], other) == {}
        assert wait_for(lambda: len(capture.messages()) == 3, timeout=20), server.log()
    finally:
        capture.stop()
    by_subject = {
        re.search(rb"Subject: ([^\r]*)", m["data"])[1]: m["data"] for m in capture.messages()
    }
    for subject in (b"no-from", b"arc-50"):
        head = by_subject[subject].split(b"\r\n\r\n")[0]
        assert head.startswith(b"Authentication-Results: mail.example.test;"), head
        assert b"ARC-Seal: i=51" not in head and b"ARC-Message-Signature" not in head, head
    assert server.log().count("dkim: cannot seal a message for example.test") == 2
    [forwarded] = [m for m in capture.messages() if b"Subject: forwarded" in m["data"]]
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
