"""Mail address parsing shared by SMTP, the accounts store and the policy.

Only the domain after the last ``@`` of a mailbox decides where mail goes;
local parts are compared but never re-routed (no percent hack, no bang paths,
no source routes).
"""

from __future__ import annotations

import re

import attrs

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[^\[\]\\\s]+\]"
MAILBOX_RE = re.compile(rf"({_DOT_ATOM}|{_QUOTED})@({_DOMAIN}|{_LITERAL})")


@attrs.frozen
class Address:
    """A parsed mailbox: the local part as written and the lower-cased domain."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """The form used to compare addresses: case-insensitive."""
        return f"{self.local.lower()}@{self.domain}"


def parse_mailbox(text: str) -> Address | None:
    """Parse ``local@domain`` (RFC 5321 Mailbox); None if it is not one."""
    m = MAILBOX_RE.fullmatch(text)
    if m is None or len(text) > 254 or len(m.group(1)) > 64:
        return None
    return Address(m.group(1), m.group(2).lower())
