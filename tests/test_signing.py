"""DKIM keys, records and signatures (mailboxd.signing), and who may sign
with which domain (policy.signing_domains)."""

from __future__ import annotations

import re

import dkim
import pytest
from twisted.logger import globalLogPublisher

from mailboxd.accounts import Account
from mailboxd.policy import Client, Listener, signing_domains
from mailboxd.signing import (
    KeyProblem,
    Signer,
    dns_record,
    key_path,
    new_key,
    public_key,
    write_key,
)

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: someone@far.test\r\nSubject: hi\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\nhello\r\n"
)


@pytest.fixture(scope="module")
def pem() -> bytes:
    return new_key(1024)  # quick; the size is the user's choice (--bits)


def record_value(line: str) -> bytes:
    """The TXT value a resolver returns for the record line: its strings joined."""
    return "".join(re.findall(r'"([^"]*)"', line)).encode()


def test_the_record_is_one_line_in_zone_syntax_with_short_strings():
    line = dns_record("Example.Test", "mailbox", new_key(2048))
    assert line.startswith('mailbox._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "\n" not in line


@pytest.mark.parametrize("text", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nxx\n"])
def test_what_is_not_a_key_is_said_in_one_line(text):
    with pytest.raises(KeyProblem) as e:
        public_key(text)
    assert "\n" not in str(e.value)


def test_a_signature_verifies_with_the_published_record(tmp_path, pem):
    write_key(key_path(tmp_path, "example.test", "mailbox"), pem, group=0)
    signer = Signer(tmp_path, "mailbox")
    field = signer.sign(MESSAGE, "example.test")
    assert field is not None and field.startswith(b"DKIM-Signature: ")
    assert b"d=example.test" in field and b"s=mailbox" in field
    published = {
        b"mailbox._domainkey.example.test.": record_value(
            dns_record("example.test", "mailbox", pem)
        )
    }

    def dnsfunc(name, timeout=5):
        return published.get(name)

    assert dkim.verify(field + MESSAGE, dnsfunc=dnsfunc)
    assert not dkim.verify(field + MESSAGE.replace(b"hello", b"HELLO"), dnsfunc=dnsfunc)
    # From is signed once more than it occurs: a From added later breaks it.
    assert not dkim.verify(field + b"From: mallory@evil.test\r\n" + MESSAGE, dnsfunc=dnsfunc)
    [h] = re.findall(rb";h=([^;]*);", field.replace(b"\r\n", b"").replace(b" ", b""))
    assert h.lower().split(b":").count(b"from") == 2


@pytest.fixture
def caplog_events():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_a_missing_or_broken_key_signs_nothing_and_is_said_once(tmp_path, pem, caplog_events):
    signer = Signer(tmp_path, "mailbox")
    assert signer.sign(MESSAGE, "example.test") is None
    assert signer.sign(MESSAGE, "example.test") is None
    path = key_path(tmp_path, "example.test", "mailbox")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    assert signer.sign(MESSAGE, "example.test") is None
    assert signer.sign(MESSAGE, "example.test") is None
    said = [e["log_format"] for e in caplog_events if "dkim" in e.get("log_format", "")]
    assert len(said) == 2, said
    assert "no key" in said[0] and "cannot be used" in said[1]
    path.write_bytes(pem)  # replaced: used from the next message on
    assert signer.sign(MESSAGE, "example.test") is not None


RESULTS = b"Authentication-Results: mail.example.test; spf=pass smtp.mailfrom=far.test\r\n"


@pytest.mark.parametrize(
    "what, message",
    [
        # dkimpy: MessageFormatError, a header line with no colon (and an escape).
        ("sign", b"From: alice@example.test\r\nNo colon \x1b[31mhere\r\n\r\nbody\r\n"),
        ("seal", RESULTS + b"No colon \x1b[31mhere\r\nFrom: a@far.test\r\n\r\nbody\r\n"),
        ("sign", b"Subject: no From\r\n\r\nbody\r\n"),  # ParameterError
        ("seal", RESULTS + b"Subject: no From\r\n\r\nbody\r\n"),
        # ParameterError: past the last instance RFC 8617 allows.
        (
            "seal",
            RESULTS + b"ARC-Seal: i=50; a=rsa-sha256; cv=pass; d=far.test; s=s; b=abc\r\n"
            b"From: a@far.test\r\n\r\nbody\r\n",
        ),
        ("sign", b" folded first\r\nFrom: alice@example.test\r\n\r\nbody\r\n"),  # IndexError
    ],
)
def test_what_dkimpy_will_not_sign_goes_out_without_said_once(
    tmp_path, pem, caplog_events, what, message
):
    write_key(key_path(tmp_path, "example.test", "mailbox"), pem, group=0)
    signer = Signer(tmp_path, "mailbox")
    for _ in range(3):
        if what == "sign":
            assert signer.sign(message, "example.test") is None
        else:
            assert signer.seal(message, "example.test", "mail.example.test") is None
    said = [e for e in caplog_events if "cannot" in e.get("log_format", "")]
    assert len(said) == 1, said
    [event] = said
    assert event["what"] == what and event["domain"] == "example.test"
    text = str(event["cause"]) + str(event["error"])
    assert text.isprintable() and "here" not in text, text  # the library's words, not the message's
    assert signer.sign(MESSAGE, "example.test") is not None  # the next message is signed


def test_a_cause_with_a_number_is_one_cause(tmp_path, pem, caplog_events):
    write_key(key_path(tmp_path, "example.test", "mailbox"), pem, group=0)
    signer = Signer(tmp_path, "mailbox")
    for i in (51, 52, 99):
        seal = b"ARC-Seal: i=%d; a=rsa-sha256; cv=pass; d=far.test; s=s; b=abc\r\n" % i
        assert signer.seal(RESULTS + seal + MESSAGE, "example.test", "mail.example.test") is None
    said = [e for e in caplog_events if "cannot" in e.get("log_format", "")]
    assert len(said) == 1, said


ALICE = Account("alice@example.test", "example.test", "alice")
DOMAINS = ("example.test", "other.test")
ALIASES = (("example.org", "example.test"),)


@pytest.mark.parametrize(
    "client, domains",
    [
        (Client(Listener.SUBMISSION, "192.0.2.1", account=ALICE), {"example.test", "example.org"}),
        (Client(Listener.MTA, "192.0.2.1", pop_domains=("other.test",)), {"other.test"}),
        (
            Client(Listener.MTA, "192.0.2.1", account=ALICE, pop_domains=("other.test",)),
            {"example.test", "example.org", "other.test"},
        ),
        (Client(Listener.MTA, "192.0.2.1"), set()),
    ],
)
def test_who_may_sign_for_which_domain(client, domains):
    assert signing_domains(client, DOMAINS, ALIASES) == domains


def test_trusted_networks_may_sign_for_every_local_domain():
    import ipaddress

    client = Client(
        Listener.MTA, "127.0.0.1", trusted_networks=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    assert signing_domains(client, DOMAINS, ALIASES) == {
        "example.test",
        "other.test",
        "example.org",
    }
