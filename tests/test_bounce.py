"""The bounce (RFC 3464 DSN) as the `email` package reads it back."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from mailboxd import bounce
from mailboxd.bounce import FailedRecipient, build_dsn

ORIGINAL = (
    b"From: Alice <alice@example.test>\n"
    b"To: x@far.test, y@far.test\n"
    b"Subject: quarterly numbers\n"
    b"Message-ID: <orig.1@example.test>\n"
    b"\n"
    b"SECRET BODY LINE\n"
    b"Subject: not a header, part of the body\n"
)
UNKNOWN = FailedRecipient(
    "x@far.test", "5.1.1", "550 5.1.1 <x@far.test>: user unknown", "mx.far.test"
)
EXPIRED = FailedRecipient("y@far.test", "4.4.7", "")


def dsn(**overrides) -> bytes:
    args = dict(
        hostname="mail.example.test",
        original_sender="alice@example.test",
        failures=[UNKNOWN, EXPIRED],
        original=ORIGINAL,
        arrival=1_700_000_000.0,
        now=1_700_003_600.0,
        message_id="bounce.42",
    )
    args.update(overrides)
    return build_dsn(**args)


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def report_groups(message: EmailMessage) -> list:
    """The delivery-status part's field groups: per-message first, then per-recipient."""
    status = list(message.iter_parts())[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()


def check_lines(data: bytes) -> None:
    assert b"\r" not in data
    assert data.endswith(b"\n")
    for line in data.split(b"\n"):
        assert len(line) <= 998


def test_top_level_headers():
    message = parse(dsn())
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"].datetime.timestamp() == 1_700_003_600
    assert message["Message-ID"] == "<bounce.42@mail.example.test>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert not message.defects
    assert b"\nTo: <alice@example.test>\n" in dsn()


def test_three_parts_in_order():
    message = parse(dsn())
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    for part in message.walk():
        assert not part.defects


def test_human_part_lists_failures():
    text = list(parse(dsn()).iter_parts())[0].get_content()
    assert "mail.example.test" in text
    assert "<x@far.test>" in text
    assert "550 5.1.1 <x@far.test>: user unknown" in text
    assert "mx.far.test" in text
    assert "<y@far.test>" in text
    assert "4.4.7" in text


def test_delivery_status_fields():
    per_message, first, second = report_groups(parse(dsn()))
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == (
        1_700_000_000
    )

    assert first["Final-Recipient"] == "rfc822; x@far.test"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Remote-MTA"] == "dns; mx.far.test"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 <x@far.test>: user unknown"

    assert second["Final-Recipient"] == "rfc822; y@far.test"
    assert second["Action"] == "failed"
    assert second["Status"] == "4.4.7"
    assert "Remote-MTA" not in second
    assert "Diagnostic-Code" not in second


def test_original_headers_without_body():
    data = dsn()
    part = list(parse(data).iter_parts())[2]
    copied = part.get_payload(decode=True)
    assert copied == ORIGINAL.split(b"\n\n")[0] + b"\n"
    assert b"SECRET BODY LINE" not in data
    assert b"not a header" not in data
    # The copy parses back as the original's headers.
    headers = parse(copied)
    assert headers["Subject"] == "quarterly numbers"
    assert headers["Message-ID"] == "<orig.1@example.test>"


def test_original_without_body_or_headers():
    part = list(parse(dsn(original=b"Subject: only headers\n")).iter_parts())[2]
    assert part.get_payload(decode=True) == b"Subject: only headers\n"
    part = list(parse(dsn(original=b"\njust a body\n")).iter_parts())[2]
    assert part.get_payload(decode=True) in (b"", b"\n")
    assert b"just a body" not in dsn(original=b"\njust a body\n")


@pytest.mark.parametrize(
    "evil",
    [
        "550 oops\r\nBcc: victim@example.test",
        "550 oops\nBcc: victim@example.test",
        "550 oops\rBcc: victim@example.test",
        "550 oops\r\n\r\nBcc: victim@example.test",
        "550 oops\x00\x1b\x7f\x85\u2028Bcc: victim@example.test",
    ],
)
def test_diagnostic_cannot_inject(evil):
    failure = FailedRecipient("x@far.test\r\nBcc: a@b.test", "5.0.0", evil, "mx\nBcc: c@d.test")
    data = dsn(failures=[failure])
    check_lines(data)
    message = parse(data)
    assert "Bcc" not in message
    for part in message.walk():
        assert "Bcc" not in part
    (group,) = report_groups(message)[1:]
    assert "Bcc" not in group
    assert group["Diagnostic-Code"].startswith("smtp; 550 oops")
    assert "Bcc: victim@example.test" in group["Diagnostic-Code"]
    assert group["Status"] == "5.0.0"
    for line in data.split(b"\n"):
        assert not line.startswith(b"Bcc")


def test_non_ascii_diagnostic_becomes_ascii():
    data = dsn(failures=[FailedRecipient("x@far.test", "5.7.1", "550 5.7.1 refusé \N{SNOWMAN}")])
    (group,) = report_groups(parse(data))[1:]
    assert group["Diagnostic-Code"] == "smtp; 550 5.7.1 refus? ?"


def test_eight_bit_original_headers():
    original = b"From: J\xc3\xbcrgen <j@example.test>\nSubject: \xff\xfe raw latin-1 \xe9\n\nbody\n"
    data = dsn(original=original)
    check_lines(data)
    message = parse(data)
    part = list(message.iter_parts())[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert part.get_payload(decode=True) == original.split(b"\n\n")[0] + b"\n"
    assert b"body" not in data.split(b"Undelivered message headers")[1]


def test_seven_bit_original_says_nothing_of_8bit():
    data = dsn()
    assert b"8bit" not in data
    assert max(data) < 0x80


def test_to_overrides_recipient():
    message = parse(dsn(original_sender="", to="postmaster@mail.example.test"))
    assert message["To"] == "postmaster@mail.example.test"
    message = parse(dsn(to="postmaster@mail.example.test"))
    assert message["To"] == "postmaster@mail.example.test"


def test_null_sender_without_to_is_refused():
    with pytest.raises(ValueError):
        dsn(original_sender="")


def test_no_failures_or_bad_status_is_refused():
    with pytest.raises(ValueError):
        dsn(failures=[])
    with pytest.raises(ValueError):
        dsn(failures=[FailedRecipient("x@far.test", "5.1.1\nBcc: y", "")])


def test_long_lines_are_folded_or_cut():
    words = "550 5.1.1 " + " ".join(f"word{i}" for i in range(2000))
    giant_word = "550-" + "A" * 5000
    original = b"Subject: " + b"s" * 3000 + b"\nX-Long: " + b"x " * 2000 + b"\n\nbody\n"
    failures = [
        FailedRecipient("x@far.test", "5.1.1", words, "mx.far.test"),
        FailedRecipient("y@far.test", "5.1.1", giant_word),
    ]
    data = dsn(failures=failures, original=original)
    check_lines(data)
    message = parse(data)
    for part in message.walk():
        assert not part.defects
    first, second = report_groups(message)[1:]
    assert first["Diagnostic-Code"].startswith("smtp; 550 5.1.1 word0 word1")
    assert first["Diagnostic-Code"].endswith("...")
    assert second["Diagnostic-Code"].startswith("smtp; 550-AAAA")
    assert second["Status"] == "5.1.1"


def test_crlf_original_and_no_cr_in_output():
    original = ORIGINAL.replace(b"\n", b"\r\n")
    data = dsn(original=original)
    check_lines(data)
    part = list(parse(data).iter_parts())[2]
    assert part.get_payload(decode=True) == ORIGINAL.split(b"\n\n")[0] + b"\n"


def test_boundary_does_not_clash_with_original():
    original = b"X-Evil: x\n--=_" + b"0" * 40 + b"\n\nbody\n"
    data = dsn(original=original)
    message = parse(data)
    boundary = message.get_boundary().encode()
    # Only the three delimiters and the close delimiter: never inside a part.
    assert data.count(b"--" + boundary) == 4
    assert len(list(message.iter_parts())) == 3
    part = list(message.iter_parts())[2]
    assert part.get_payload(decode=True) == original.split(b"\n\n")[0] + b"\n"


def test_boundary_is_rechosen_on_a_clash(monkeypatch):
    class Fixed:
        """A hash whose first digest is the one the original already contains."""

        def __init__(self, data: bytes):
            self.digests = ["0" * 64, "1" * 64]

        def hexdigest(self) -> str:
            return self.digests[0]

        def update(self, data: bytes) -> None:
            self.digests.pop(0)

    monkeypatch.setattr(bounce.hashlib, "sha256", Fixed)
    original = b"X-Evil: x\n--=_" + b"0" * 40 + b"\n\nbody\n"
    message = parse(dsn(original=original))
    assert message.get_boundary() == "=_" + "1" * 40
    assert len(list(message.iter_parts())) == 3


def test_pure_and_deterministic():
    assert dsn() == dsn()
    check_lines(dsn())
