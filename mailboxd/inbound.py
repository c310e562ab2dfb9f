"""What mail coming in from the world proves about itself (`[inbound]`):
SPF of the HELO and MAIL FROM identities (RFC 7208, pyspf), its DKIM
signatures (RFC 6376, dkimpy) and DMARC with alignment (RFC 7489,
authheaders), written as one Authentication-Results field (RFC 8601, authres)
at the top of each delivered copy; and the refusals the site asks for
(`dmarc_reject`, `spf_reject`).

Checks run in the checks' threads, the libraries' lookups through
`resolver` (dnspython's default resolver is the configured one). A lookup
that times out or fails at the server never leads to a permanent refusal:
the result is `temperror`, and where a refusal would have followed, the
reply is a 451 (the client tries again later). One message's checks take
at most CHECKS_SECONDS in all: what is still to check then is `temperror`.
"""

from __future__ import annotations

import re
import time
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

import attrs
import authheaders
import dkim
import dns.exception
import dns.resolver
import spf
from authres import AuthenticationResultsHeader, DKIMAuthenticationResult, SPFAuthenticationResult
from authres.arc import ARCAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from .lines import SMTPReply
from .resolver import LOOKUP_SECONDS, TempError, exists, txt, txts

# All of one SPF check's lookups together (RFC 7208 §4.6.4 allows 20): a
# HELO name's record is short; MAIL FROM's may include others.
SPF_SECONDS = {"helo": 1.0, "mailfrom": 2.0}
MAX_SIGNATURES = 5  # DKIM signatures verified a message; the rest are not looked at
# All of one message's checks: each step gets what is left, at most its own
# limit; past it, the steps still to come are temperror without a lookup.
CHECKS_SECONDS = 5.0


@attrs.frozen
class Policy:
    hostname: str  # the authserv-id
    dmarc_reject: bool
    spf_reject: bool


@attrs.frozen
class Checked:
    """The field to add (CRLF-free lines) and, if the message is refused, the reply."""

    lines: list[bytes]
    refusal: SMTPReply | None = None
    arc: str = "none"  # the ARC chain it arrived with: what a seal of ours carries on


@attrs.frozen
class Deadline:
    """The end of one message's checks, on the monotonic clock."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self, most: float) -> float:
        """Seconds the next step may take, at most `most`; TempError if none."""
        left = min(most, self.at - time.monotonic())
        if left <= 0:
            raise TempError("the message's checks are out of time")
        return left


def spf_check(ip: str, sender: str, helo: str, deadline: Deadline) -> tuple[str, str]:
    """(result, explanation); `sender` "" checks the HELO identity."""
    identity = sender or f"postmaster@{helo}"
    try:
        seconds = deadline.left(SPF_SECONDS["mailfrom" if sender else "helo"])
    except TempError as e:
        return "temperror", str(e)
    try:
        # querytime bounds all of the check's lookups together.
        return spf.check2(ip, identity, helo, timeout=seconds, querytime=seconds)
    except Exception as e:  # noqa: BLE001 - a library failure is no reason to lose mail
        return "temperror", f"{type(e).__name__}"


def dkim_checks(
    message: bytes, resolver: dns.resolver.Resolver, deadline: Deadline
) -> list[DKIMAuthenticationResult]:
    """One result per DKIM signature (the first MAX_SIGNATURES)."""
    try:
        d = dkim.DKIM(message, timeout=LOOKUP_SECONDS)
    except Exception:  # noqa: BLE001 - an unparsable message: nothing verifies
        return []
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    keys: dict[bytes, bytes | None] = {}  # the key records the signature asked for

    def dnsfunc(name: bytes, timeout: float = LOOKUP_SECONDS) -> bytes | None:
        keys[name] = record = txt(resolver, name, deadline.left(LOOKUP_SECONDS))
        return record

    results = []
    for idx in range(min(count, MAX_SIGNATURES)):
        keys.clear()
        d.signature_fields = {}
        try:
            deadline.left(LOOKUP_SECONDS)
            if d.verify(idx=idx, dnsfunc=dnsfunc):
                result = "pass"
            else:
                # dkimpy answers False, not an error, for a key record that is
                # missing or malformed: RFC 6376 §6.1.2 calls that PERMFAIL.
                result = "permerror" if any(map(_unusable, keys.items())) else "fail"
        except TempError:
            result = "temperror"
        except dkim.ValidationError as e:
            # dkimpy raises for a body changed in transit, as for a broken tag.
            result = "fail" if str(e).startswith("body hash mismatch") else "permerror"
        except dkim.DKIMException:
            result = "permerror"  # a malformed signature or key record
        except Exception:  # noqa: BLE001
            result = "permerror"
        fields = d.signature_fields or _signature_tags(d, idx)
        results.append(
            DKIMAuthenticationResult(
                result=result,
                header_d=_text(fields.get(b"d", b"")),
                header_s=_text(fields.get(b"s", b"")),
            )
        )
    return results


def _unusable(key: tuple[bytes, bytes | None]) -> bool:
    """Whether a key record (name, TXT value) cannot be used: none, or malformed."""
    try:
        dkim.evaluate_pk(*key)
    except Exception:  # noqa: BLE001 - KeyFormatError, binascii.Error, and the like
        return True
    return False


def _signature_tags(d: dkim.DKIM, idx: int) -> dict[bytes, bytes]:
    """The tags of signature `idx`, for one that failed before dkimpy read them."""
    signatures = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
    try:
        return dict(dkim.util.parse_tag_value(signatures[idx]))
    except Exception:  # noqa: BLE001 - unreadable tags: the result names no domain
        return {}


def arc_check(message: bytes, resolver: dns.resolver.Resolver, deadline: Deadline) -> str:
    """The ARC chain's validation (RFC 8617 §5.2): none, pass or fail; or
    temperror when a key could not be looked up now."""
    if b"\narc-seal:" not in message.lower() and not message.lower().startswith(b"arc-seal:"):
        return "none"

    def dnsfunc(name: bytes, timeout: float = LOOKUP_SECONDS) -> bytes | None:
        return txt(resolver, name, deadline.left(LOOKUP_SECONDS))

    try:
        deadline.left(LOOKUP_SECONDS)
        cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc, timeout=LOOKUP_SECONDS)
    except TempError:
        return "temperror"
    except Exception:  # noqa: BLE001 - a chain that cannot be read has failed
        return "fail"
    return _text(cv).lower()


def dmarc_check(
    message: bytes,
    mail_from: SPFAuthenticationResult,
    dkims: list[DKIMAuthenticationResult],
    resolver: dns.resolver.Resolver,
    deadline: Deadline,
) -> DMARCAuthenticationResult:
    passed = next((r for r in dkims if r.result == "pass"), None)

    def dnsfunc(name: str) -> str | None:
        # authheaders' own lookup reads a SERVFAIL as "no record" (so "no
        # policy"); this one says TempError, and keeps to the deadline.
        return dmarc_lookup(resolver, name, deadline.left(LOOKUP_SECONDS))

    try:
        deadline.left(LOOKUP_SECONDS)
        return authheaders.check_dmarc(
            message, spf_result=mail_from, dkim_result=passed, dnsfunc=dnsfunc
        )
    except (TempError, dns.exception.DNSException):
        return DMARCAuthenticationResult(result="temperror", header_from=from_domain(message))
    except Exception:  # noqa: BLE001
        return DMARCAuthenticationResult(result="permerror", header_from=from_domain(message))


def dmarc_lookup(resolver: dns.resolver.Resolver, name: str, lifetime: float) -> str | None:
    """authheaders' dnsfunc: asked for `_dmarc.<domain>`, the one DMARC
    record there (none for several: RFC 7489 §6.6.3); asked for another
    name, whether it exists, for the `np=` policy (RFC 9091: it does not if
    it has no A, AAAA or MX record). TempError for a timeout or SERVFAIL."""
    if name.lower().startswith("_dmarc."):
        records = [r for r in txts(resolver, name, lifetime) if r.startswith(b"v=DMARC1")]
        return records[0].decode("utf-8", "replace") if len(records) == 1 else None
    for rdtype in ("A", "AAAA", "MX"):
        if exists(resolver, name, rdtype, lifetime):
            return "exists"
    return None


def check(
    message: bytes,
    ip: str,
    helo: str,
    sender: str,
    policy: Policy,
    resolver: dns.resolver.Resolver,
    seconds: float = CHECKS_SECONDS,
) -> Checked:
    """Check `message` (CRLF line ends) from `ip`, in at most about `seconds`; blocking."""
    deadline = Deadline.after(seconds)
    helo_result, _ = spf_check(ip, "", helo, deadline)
    mail_result, _ = spf_check(ip, sender, helo, deadline) if sender else (helo_result, "")
    identity = sender or f"postmaster@{helo}"
    # The header names the domain only (RFC 8601 §2.7.2); DMARC's alignment
    # check wants the address (and changes the object it is given).
    domain = identity.rpartition("@")[2]
    spf_from = SPFAuthenticationResult(result=mail_result, smtp_mailfrom=domain)
    spf_helo = SPFAuthenticationResult(result=helo_result, smtp_helo=helo)
    dkims = dkim_checks(message, resolver, deadline)
    aligned = SPFAuthenticationResult(result=mail_result, smtp_mailfrom=identity)
    dmarc = dmarc_check(message, aligned, dkims, resolver, deadline)
    arc = arc_check(message, resolver, deadline)
    results = [
        spf_from,
        spf_helo,
        *(dkims or [DKIMAuthenticationResult(result="none")]),
        dmarc,
        ARCAuthenticationResult(result=arc),
    ]
    field = str(AuthenticationResultsHeader(authserv_id=policy.hostname, results=results))
    lines = [line.encode("utf-8", "replace") for line in _folded(field)]
    return Checked(lines, refusal(policy, spf_from, dkims, dmarc), arc)


def refusal(
    policy: Policy,
    spf_from: SPFAuthenticationResult,
    dkims: list[DKIMAuthenticationResult],
    dmarc: DMARCAuthenticationResult,
) -> SMTPReply | None:
    """The reply that refuses the message, or None. Pure, for the table tests."""
    unsure = spf_from.result == "temperror" or any(r.result == "temperror" for r in dkims)
    if policy.dmarc_reject and getattr(dmarc, "policy", None) == "reject":
        domain = dmarc.header_from
        if dmarc.result == "fail" and not unsure:
            return (
                550,
                f"5.7.1 Unauthenticated email from {domain} is not accepted due to "
                "domain's DMARC policy",
            )
        if dmarc.result in ("fail", "temperror"):
            return (451, f"4.7.1 DMARC check of {domain} not possible now, try again later")
    if policy.spf_reject and spf_from.result == "fail":
        return (550, "5.7.23 SPF validation failed")
    if policy.spf_reject and spf_from.result == "temperror":
        return (451, "4.7.24 SPF validation error, try again later")
    return None


def from_domain(message: bytes) -> str | None:
    """The domain of the one address in the message's one From: field, or
    None (no From:, several, or no domain)."""
    header = BytesHeaderParser(policy=compat32).parsebytes(message)
    fields = header.get_all("From") or []
    if len(fields) != 1:
        return None
    found = getaddresses([str(fields[0])])
    if len(found) != 1 or "@" not in found[0][1]:
        return None
    return found[0][1].rpartition("@")[2].lower().rstrip(".") or None


def is_results(line: bytes) -> bool:
    """Whether a header line starts an Authentication-Results field."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and name.strip().lower() == b"authentication-results"


def claims(field: bytes, hostname: str) -> bool:
    """Whether an Authentication-Results field (its lines joined by CRLF)
    claims to be this server's, or cannot be read: RFC 8601 §5 has a field
    from outside that claims our authserv-id removed as forged, and allows
    a border MTA to remove any. The authserv-id is read as RFC 8601 §2.2
    writes it, on the unfolded field, after any comments: a field folded
    before it, or with a comment first, still names it."""
    if not is_results(field):
        return False
    value = _UNFOLD.sub(b"", field.partition(b":")[2]).decode("latin-1")
    authserv = authserv_id(value)
    if authserv is None:
        return True  # unreadable: what would a laxer reader make of it?
    return authserv.lower().rstrip(".") == hostname.lower().rstrip(".")


def authserv_id(value: str) -> str | None:
    """The authserv-id an Authentication-Results value starts with (RFC
    8601 §2.2: `[CFWS] value`, a MIME token or a quoted-string), or None."""
    i = _skip_cfws(value, 0)
    if i is None or i >= len(value):
        return None
    if value[i] == '"':
        out = []
        i += 1
        while i < len(value):
            c = value[i]
            if c == "\\" and i + 1 < len(value):
                out.append(value[i + 1])
                i += 2
                continue
            if c == '"':
                return "".join(out)
            out.append(c)
            i += 1
        return None  # no closing quote
    match = _TOKEN.match(value, i)
    return match.group(0) if match else None


def _skip_cfws(text: str, i: int) -> int | None:
    """Past white space and (nested) comments; None for one not closed."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth and c not in " \t\r\n":
            return i
        i += 1
    return None if depth else i


_UNFOLD = re.compile(rb"\r?\n(?=[ \t])")
# RFC 2045 §5.1: printable ASCII but space and the tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#-'*+\-.0-9A-Z^-~]+")


def _folded(field: str, width: int = 78) -> list[str]:
    """The field folded after its semicolons, so that no line grows long."""
    parts = field.split("; ")
    lines = [parts[0] + (";" if len(parts) > 1 else "")]
    for i, part in enumerate(parts[1:], 1):
        lines.append("\t" + part + (";" if i < len(parts) - 1 else ""))
    return lines


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


@attrs.frozen(repr=False)
class Checker:
    """The checks as the site configured them; call it in a checks' thread."""

    policy: Policy
    resolver: dns.resolver.Resolver

    def __repr__(self) -> str:
        return f"<Checker {self.policy}>"

    def __call__(self, message: bytes, ip: str, helo: str, sender: str) -> Checked:
        return check(message, ip, helo, sender, self.policy, self.resolver)
