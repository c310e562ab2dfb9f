"""Where a recipient's mail may go: a pure decision with its exact reply."""

from __future__ import annotations

import enum

import attrs

from .accounts import Account, Directory
from .addresses import Address


class Listener(enum.Enum):
    MTA = "listen"  # the world delivering mail in
    SUBMISSION = "submission"  # customers sending mail out; always needs authorisation


class Verdict(enum.Enum):
    LOCAL = "accept-local"
    RELAY = "accept-relay"
    REJECT = "reject"


@attrs.frozen
class Decision:
    verdict: Verdict
    code: int
    text: str
    accounts: tuple[Account, ...] = ()


def decide_recipient(
    listener: Listener, authorised: bool, directory: Directory, rcpt: Address
) -> Decision:
    """Decide on RCPT TO by its parsed domain alone; a local part is never re-routed."""
    if listener is Listener.SUBMISSION and not authorised:
        return Decision(Verdict.REJECT, 530, "5.7.0 Authentication required")
    if directory.is_local_domain(rcpt.domain):
        accounts = directory.resolve(rcpt)
        if not accounts:
            return Decision(
                Verdict.REJECT, 550, f"5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
            )
        return Decision(Verdict.LOCAL, 250, "2.1.5 Ok", accounts)
    if not authorised:
        return Decision(Verdict.REJECT, 554, f"5.7.1 <{rcpt}>: Relay access denied")
    return Decision(Verdict.RELAY, 250, "2.1.5 Ok")
