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
reply is a 451 (the client tries again later).
"""

from __future__ import annotations

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
from .resolver import LOOKUP_SECONDS, TempError, txt

# All of one SPF check's lookups together (RFC 7208 §4.6.4 allows 20): a
# HELO name's record is short; MAIL FROM's may include others.
SPF_SECONDS = {"helo": 1.0, "mailfrom": 2.0}
MAX_SIGNATURES = 5  # DKIM signatures verified a message; the rest are not looked at


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


def spf_check(ip: str, sender: str, helo: str) -> tuple[str, str]:
    """(result, explanation); `sender` "" checks the HELO identity."""
    identity = sender or f"postmaster@{helo}"
    seconds = SPF_SECONDS["mailfrom" if sender else "helo"]
    try:
        return spf.check2(ip, identity, helo, timeout=LOOKUP_SECONDS, querytime=seconds)
    except Exception as e:  # noqa: BLE001 - a library failure is no reason to lose mail
        return "temperror", f"{type(e).__name__}"


def dkim_checks(message: bytes, resolver: dns.resolver.Resolver) -> list[DKIMAuthenticationResult]:
    """One result per DKIM signature (the first MAX_SIGNATURES)."""
    try:
        d = dkim.DKIM(message, timeout=LOOKUP_SECONDS)
    except Exception:  # noqa: BLE001 - an unparsable message: nothing verifies
        return []
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")

    def dnsfunc(name: bytes, timeout: float = LOOKUP_SECONDS) -> bytes | None:
        return txt(resolver, name)

    results = []
    for idx in range(min(count, MAX_SIGNATURES)):
        try:
            result = "pass" if d.verify(idx=idx, dnsfunc=dnsfunc) else "fail"
        except TempError:
            result = "temperror"
        except dkim.ValidationError as e:
            # dkimpy raises for a body changed in transit, as for a broken tag.
            result = "fail" if str(e).startswith("body hash mismatch") else "permerror"
        except dkim.DKIMException:
            result = "permerror"  # a malformed signature or key record
        except Exception:  # noqa: BLE001
            result = "permerror"
        fields = d.signature_fields or {}
        results.append(
            DKIMAuthenticationResult(
                result=result,
                header_d=_text(fields.get(b"d", b"")),
                header_s=_text(fields.get(b"s", b"")),
            )
        )
    return results


def arc_check(message: bytes, resolver: dns.resolver.Resolver) -> str:
    """The ARC chain's validation (RFC 8617 §5.2): none, pass or fail; or
    temperror when a key could not be looked up now."""
    if b"\narc-seal:" not in message.lower() and not message.lower().startswith(b"arc-seal:"):
        return "none"

    def dnsfunc(name: bytes, timeout: float = LOOKUP_SECONDS) -> bytes | None:
        return txt(resolver, name)

    try:
        cv, _, _ = dkim.arc_verify(message, dnsfunc=dnsfunc, timeout=LOOKUP_SECONDS)
    except TempError:
        return "temperror"
    except Exception:  # noqa: BLE001 - a chain that cannot be read has failed
        return "fail"
    return _text(cv).lower()


def dmarc_check(
    message: bytes, mail_from: SPFAuthenticationResult, dkims: list[DKIMAuthenticationResult]
) -> DMARCAuthenticationResult:
    passed = next((r for r in dkims if r.result == "pass"), None)
    try:
        return authheaders.check_dmarc(message, spf_result=mail_from, dkim_result=passed)
    except dns.exception.DNSException:
        return DMARCAuthenticationResult(result="temperror", header_from=from_domain(message))
    except Exception:  # noqa: BLE001
        return DMARCAuthenticationResult(result="permerror", header_from=from_domain(message))


def check(
    message: bytes,
    ip: str,
    helo: str,
    sender: str,
    policy: Policy,
    resolver: dns.resolver.Resolver,
) -> Checked:
    """Check `message` (CRLF line ends) from `ip`; blocking."""
    helo_result, _ = spf_check(ip, "", helo)
    mail_result, _ = spf_check(ip, sender, helo) if sender else (helo_result, "")
    identity = sender or f"postmaster@{helo}"
    # The header names the domain only (RFC 8601 §2.7.2); DMARC's alignment
    # check wants the address (and changes the object it is given).
    domain = identity.rpartition("@")[2]
    spf_from = SPFAuthenticationResult(result=mail_result, smtp_mailfrom=domain)
    spf_helo = SPFAuthenticationResult(result=helo_result, smtp_helo=helo)
    dkims = dkim_checks(message, resolver)
    aligned = SPFAuthenticationResult(result=mail_result, smtp_mailfrom=identity)
    dmarc = dmarc_check(message, aligned, dkims)
    arc = arc_check(message, resolver)
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


def claims(line: bytes, hostname: str) -> bool:
    """Whether a header line starts an Authentication-Results field that
    claims to be this server's (RFC 8601 §5: such a field from outside is
    forged, and is removed)."""
    name, colon, value = line.partition(b":")
    if not colon or name.strip().lower() != b"authentication-results":
        return False
    authserv = value.split(b";", 1)[0].strip().split()
    return bool(authserv) and authserv[0].decode("latin-1").lower() == hostname.lower()


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
