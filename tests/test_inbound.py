"""The inbound decisions as tables (mailboxd.inbound): which results refuse
a message, with which reply, and which Authentication-Results are forged;
and the checks' lookups against a DNS server on loopback: key records, a
SERVFAIL, and one message's deadline."""

from __future__ import annotations

import re
import time

import dkim
import dns.resolver
import pytest
from authres import DKIMAuthenticationResult, SPFAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult
from zone_server import TXT, ZoneServer, silent_dns

from mailboxd.inbound import (
    Deadline,
    Policy,
    check,
    claims,
    dkim_checks,
    dmarc_check,
    dmarc_lookup,
    from_domain,
    refusal,
)
from mailboxd.resolver import TempError, thread_resolver
from mailboxd.signing import dns_record, new_key

POLICY = Policy("mail.example.test", dmarc_reject=True, spf_reject=False)

REJECT = (
    550,
    "5.7.1 Unauthenticated email from far.test is not accepted due to domain's DMARC policy",
)
LATER = (451, "4.7.1 DMARC check of far.test not possible now, try again later")


def dmarc(result: str, policy: str | None) -> DMARCAuthenticationResult:
    if policy is None:
        return DMARCAuthenticationResult(result=result, header_from="far.test")
    return DMARCAuthenticationResult(result=result, header_from="far.test", policy=policy)


@pytest.mark.parametrize(
    "spf, dkim, dmarc_result, policy, dmarc_reject, spf_reject, reply",
    [
        ("pass", "pass", "pass", "reject", True, False, None),
        ("fail", "none", "fail", "reject", True, False, REJECT),
        ("fail", "none", "fail", "reject", False, False, None),
        ("fail", "none", "fail", "none", True, False, None),  # p=none: delivered
        ("fail", "none", "fail", "quarantine", True, False, None),
        ("temperror", "none", "fail", "reject", True, False, LATER),  # never 550 on a timeout
        ("pass", "temperror", "fail", "reject", True, False, LATER),
        ("none", "none", "temperror", None, True, False, None),  # no policy known
        ("fail", "none", "none", None, True, True, (550, "5.7.23 SPF validation failed")),
        (
            "temperror",
            "none",
            "none",
            None,
            True,
            True,
            (451, "4.7.24 SPF validation error, try again later"),
        ),
        ("softfail", "none", "none", None, True, True, None),
        ("fail", "none", "none", None, True, False, None),
    ],
)
def test_what_refuses_a_message(spf, dkim, dmarc_result, policy, dmarc_reject, spf_reject, reply):
    found = refusal(
        Policy("mail.example.test", dmarc_reject, spf_reject),
        SPFAuthenticationResult(result=spf, smtp_mailfrom="far.test"),
        [DKIMAuthenticationResult(result=dkim, header_d="far.test")],
        dmarc(dmarc_result, policy),
    )
    assert found == reply


@pytest.mark.parametrize(
    "line, ours",
    [
        (b"Authentication-Results: mail.example.test; spf=pass", True),
        (b"authentication-results:MAIL.EXAMPLE.TEST;dkim=pass", True),
        (b"Authentication-Results: mail.example.test 1; none", True),  # with a version
        (b"Authentication-Results: mx.far.test; spf=pass", False),
        (b"Authentication-Results: mail.example.test.evil.test; spf=pass", False),
        (b"Received: from mail.example.test", False),
        # Folded before the authserv-id, or a comment first: still ours.
        (b"Authentication-Results:\r\n\tmail.example.test; dmarc=pass", True),
        (b"Authentication-Results:\r\n mail.example.test;\r\n\tdmarc=pass", True),
        (b"Authentication-Results: (comment) mail.example.test; dmarc=pass", True),
        (b"Authentication-Results: (a (nested) \\) one)\r\n\tmail.example.test; spf=pass", True),
        (b"Authentication-Results: mail.example.test(no space); spf=pass", True),
        (b'Authentication-Results: "mail.example.test"; spf=pass', True),  # a quoted-string
        (b"Authentication-Results : mail.example.test.; spf=pass", True),
        (b"Authentication-Results: mx.far.test (mail.example.test); spf=pass", False),
        (b"Authentication-Results: (mail.example.test) mx.far.test; spf=pass", False),
        # Unreadable (no authserv-id, a comment never closed): removed, as
        # RFC 8601 §5 allows, since a laxer reader might find ours in it.
        (b"Authentication-Results:", True),
        (b"Authentication-Results: (open mail.example.test; dmarc=pass", True),
        (b"Authentication-Results: ; dmarc=pass", True),
    ],
)
def test_which_results_claim_to_be_ours(line, ours):
    assert claims(line, "mail.example.test") is ours


@pytest.mark.parametrize(
    "head, domain",
    [
        (b"From: Alice <alice@Example.Test>\r\n", "example.test"),
        (b"From: a@one.test, b@two.test\r\n", None),
        (b"From: a@one.test\r\nFrom: b@two.test\r\n", None),
        (b"To: x@y.test\r\n", None),
        (b"From: undisclosed\r\n", None),
    ],
)
def test_the_from_domain(head, domain):
    assert from_domain(head + b"\r\nbody\r\n") == domain


def test_a_malformed_signature_is_a_permerror_not_a_crash():
    message = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=far.test; s=sel; h=from; bh=!!!; b=???\r\n"
        b"From: a@far.test\r\nSubject: x\r\n\r\nbody\r\n"
    )
    # A resolver nobody asks: the signature is refused before any lookup.
    [result] = dkim_checks(message, thread_resolver(("127.0.0.1", 9)), Deadline.after(5))
    assert result.result == "permerror" and result.header_d == "far.test"


KEY = new_key(1024)
MESSAGE = b"From: a@far.test\r\nTo: b@example.test\r\nSubject: x\r\n\r\nbody\r\n"


def signed(selector: str, message: bytes = MESSAGE) -> bytes:
    return dkim.sign(message, selector.encode(), b"far.test", KEY) + message


def key_strings(pem: bytes = KEY) -> list[str]:
    return re.findall(r'"([^"]*)"', dns_record("far.test", "sel", pem))


@pytest.fixture(scope="module")
def far_test(tmp_path_factory):
    """A DNS server on loopback for far.test: a good key (sel), a malformed
    one (bad), none (gone), one that fails (broken: SERVFAIL); and a
    resolver that asks it."""
    server = ZoneServer(tmp_path_factory.mktemp("far"))
    server.add(
        "far.test",
        TXT("sel._domainkey.far.test", *key_strings()),
        TXT("bad._domainkey.far.test", "v=DKIM1; k=rsa; p=!!!not-base64"),
        TXT("short._domainkey.far.test", key_strings()[0][:60]),
        TXT("_dmarc.far.test", "v=DMARC1; p=reject"),
    )
    server.failing("broken._domainkey.far.test", "_dmarc.broken.test").start()
    yield thread_resolver(("127.0.0.1", server.port))
    server.stop()


@pytest.mark.parametrize(
    "selector, result",
    [
        ("sel", "pass"),
        ("bad", "permerror"),  # a key record that is not a key (RFC 6376 §6.1.2: PERMFAIL)
        ("short", "permerror"),
        ("gone", "permerror"),  # no key record at all
        ("broken", "temperror"),  # SERVFAIL: may work later
    ],
)
def test_each_key_record_gives_its_result(far_test, selector, result):
    [found] = dkim_checks(signed(selector), far_test, Deadline.after(5))
    assert (found.result, found.header_d, found.header_s) == (result, "far.test", selector)


def test_a_body_changed_in_transit_fails(far_test):
    data = signed("sel").replace(b"body", b"BODY")
    assert [r.result for r in dkim_checks(data, far_test, Deadline.after(5))] == ["fail"]


def test_a_dmarc_lookup_that_fails_at_the_server_is_a_temperror_not_no_policy(far_test):
    with pytest.raises(TempError):
        dmarc_lookup(far_test, "_dmarc.broken.test", 1.0)
    assert dmarc_lookup(far_test, "_dmarc.far.test", 1.0) == "v=DMARC1; p=reject"
    assert dmarc_lookup(far_test, "_dmarc.nowhere.far.test", 1.0) is None
    nobody = SPFAuthenticationResult(result="none", smtp_mailfrom="a@broken.test")
    broken = b"From: a@broken.test\r\nSubject: x\r\n\r\nbody\r\n"
    result = dmarc_check(broken, nobody, [], far_test, Deadline.after(5))
    assert result.result == "temperror" and result.header_from == "broken.test"


def test_one_message_s_checks_keep_to_their_deadline(monkeypatch):
    """Five signatures, SPF and DMARC all asking a server that never answers:
    at one second a lookup that is ten seconds or more, but the message has
    only `seconds` in all; whatever comes after is temperror."""
    data = MESSAGE
    for i in range(5):
        data = dkim.sign(data, f"s{i}".encode(), b"far.test", KEY) + data
    with silent_dns() as nobody:
        host, port = nobody.split(":")
        resolver = thread_resolver((host, int(port)))
        monkeypatch.setattr(dns.resolver, "default_resolver", resolver)  # pyspf's
        began = time.monotonic()
        checked = check(data, "192.0.2.1", "client.far.test", "a@far.test", POLICY, resolver, 2.5)
        took = time.monotonic() - began
    assert took < 2.5 + 0.8, took
    field = b" ".join(checked.lines).decode()
    assert field.count("dkim=temperror") == 5, field
    assert "spf=temperror smtp.mailfrom=far.test" in field and "dmarc=temperror" in field
    assert checked.refusal is None  # never a 5xx for time running out


def test_the_deadline_gives_each_step_what_is_left():
    deadline = Deadline.after(1.0)
    assert 0.9 < deadline.left(5.0) <= 1.0
    assert deadline.left(0.25) == 0.25
    with pytest.raises(TempError):
        Deadline.after(-0.1).left(1.0)
