"""The inbound decisions as tables (mailboxd.inbound): which results refuse
a message, with which reply, and which Authentication-Results are forged."""

from __future__ import annotations

import pytest
from authres import DKIMAuthenticationResult, SPFAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from mailboxd.inbound import Policy, claims, from_domain, refusal

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
        (b"Authentication-Results:", False),
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
    from mailboxd.inbound import dkim_checks
    from mailboxd.resolver import thread_resolver

    message = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=far.test; s=sel; h=from; bh=!!!; b=???\r\n"
        b"From: a@far.test\r\nSubject: x\r\n\r\nbody\r\n"
    )
    # A resolver nobody asks: the signature is refused before any lookup.
    [result] = dkim_checks(message, thread_resolver(("127.0.0.1", 9)))
    assert result.result == "permerror" and result.header_d == "far.test"
