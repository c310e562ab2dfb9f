"""Delivery status notifications (RFC 3464): the bounce sent back to a sender.

`build_dsn` is pure: it gets everything as arguments and returns the
notification as bytes with LF line ends, ready for a Maildir or the outbound
queue. It is a ``multipart/report; report-type=delivery-status`` with three
parts: a short text for people, the ``message/delivery-status`` report, and the
undelivered message's header block as ``text/rfc822-headers``.

Diagnostics come from remote servers, so every value put into a header or a
report field has its control characters (CR and LF included) turned into
spaces and its non-ASCII characters into ``?``; long ones are truncated and
folded, so that no output line is longer than 998 octets. The original header
block is copied as it is (8-bit bytes included, then marked ``8bit``), except
that CRs are dropped and over-long lines cut.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from datetime import datetime, timezone
from email.utils import format_datetime

import attrs

MAX_LINE = 998  # octets, without the line end (RFC 5322 section 2.1.1)
_FOLD_WIDTH = 78
_FIELD_MAX = 255  # characters kept of an address, host name, id
_DIAGNOSTIC_MAX = 900  # characters kept of a diagnostic; longer ones end in "..."
_CONTROLS = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029]+")
_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


@attrs.frozen
class FailedRecipient:
    """One recipient that could not be delivered."""

    recipient: str  # e.g. "x@far.test"
    status: str  # RFC 3463 enhanced code, e.g. "5.1.1" or "4.4.7"
    diagnostic: str  # the remote's reply or our own words; may be ""
    remote_mta: str | None = None  # e.g. "mx.far.test" if a remote server answered


def _clean(text: str, limit: int = _FIELD_MAX) -> str:
    """One line of printable ASCII: controls and runs of white space become one space."""
    text = _CONTROLS.sub(" ", text).strip().encode("ascii", "replace").decode("ascii")
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _field(name: str, value: str) -> list[str]:
    """``name: value``, folded at spaces (continuation lines start with a space)."""
    return textwrap.wrap(
        f"{name}: {value}",
        width=_FOLD_WIDTH,
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def _header_block(original: bytes) -> bytes:
    """Everything of `original` before its first empty line, each line ending in LF."""
    text = original.replace(b"\r", b"")
    end = 0 if text.startswith(b"\n") else text.find(b"\n\n")
    if end >= 0:
        text = text[:end]
    return b"".join(line[:MAX_LINE] + b"\n" for line in text.split(b"\n") if line)


def _explanation(hostname: str, failures: list[FailedRecipient]) -> str:
    lines = [
        f"This is the mail delivery system at {hostname}.",
        "",
        "Your message could not be delivered to the recipients below.",
        "The delivery report and the headers of your message are attached.",
        "",
    ]
    for failure in failures:
        lines.append(f"<{_clean(failure.recipient)}> (status {_clean(failure.status)})")
        said = _clean(failure.diagnostic, _DIAGNOSTIC_MAX)
        if said and failure.remote_mta:
            said = f"host {_clean(failure.remote_mta)} said: {said}"
        lines += textwrap.wrap(
            said,
            width=_FOLD_WIDTH - 2,
            initial_indent="    ",
            subsequent_indent="    ",
            break_long_words=False,
            break_on_hyphens=False,
        )
        lines.append("")
    return "\n".join(lines)


def _delivery_status(hostname: str, arrival: float, failures: list[FailedRecipient]) -> str:
    lines = [f"Reporting-MTA: dns; {hostname}", f"Arrival-Date: {_date(arrival)}"]
    for failure in failures:
        lines += ["", f"Final-Recipient: rfc822; {_clean(failure.recipient)}"]
        lines += ["Action: failed", f"Status: {failure.status}"]
        if failure.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(failure.remote_mta)}")
        diagnostic = _clean(failure.diagnostic, _DIAGNOSTIC_MAX)
        if diagnostic:
            lines += _field("Diagnostic-Code", f"smtp; {diagnostic}")
    return "\n".join(lines) + "\n"


def build_dsn(
    *,
    hostname: str,
    original_sender: str,
    failures: list[FailedRecipient],
    original: bytes,
    arrival: float,
    now: float,
    message_id: str,
    to: str | None = None,
) -> bytes:
    """The RFC 3464 bounce for `failures`, as bytes with LF line ends.

    `original` is the undelivered message as it was to be sent (LF line ends,
    without the local Return-Path line); only its header block is returned.
    The notification goes to `to` if given (a double bounce to postmaster),
    else to `original_sender`. `arrival` and `now` are Unix times.
    """
    if not failures:
        raise ValueError("a delivery status notification needs a failed recipient")
    for failure in failures:
        if not _STATUS.fullmatch(failure.status):
            raise ValueError(f"not an enhanced status code: {failure.status!r}")
    recipient = _clean(to or original_sender)
    if not recipient:
        raise ValueError("no one to send the notification to (null sender)")
    hostname = _clean(hostname)
    message_id = _clean(message_id).replace(" ", "")

    text = _explanation(hostname, failures).encode("ascii")
    report = _delivery_status(hostname, arrival, failures).encode("ascii")
    headers = _header_block(original)
    eightbit = re.search(rb"[\x80-\xff]", headers) is not None

    seed = hashlib.sha256(message_id.encode("ascii") + text + report + headers)
    while True:
        boundary = f"=_{seed.hexdigest()[:40]}"
        if b"--" + boundary.encode("ascii") not in text + report + headers:
            break
        seed.update(b".")

    cte = ["Content-Transfer-Encoding: 8bit"] if eightbit else []
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{recipient}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {_date(now)}",
        f"Message-ID: <{message_id}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        *cte,
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        "",
    ]
    parts = [
        "\n".join(head).encode("ascii"),
        text,
        f"\n--{boundary}\n"
        "Content-Type: message/delivery-status\n"
        "Content-Description: Delivery report\n\n".encode("ascii"),
        report,
        f"\n--{boundary}\n"
        "Content-Type: text/rfc822-headers\n"
        "Content-Description: Undelivered message headers\n".encode("ascii"),
        "".join(f"{line}\n" for line in cte).encode("ascii"),
        b"\n",
        headers,
        f"\n--{boundary}--\n".encode("ascii"),
    ]
    return b"".join(parts)
