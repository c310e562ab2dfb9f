"""Who may send what where: pure decisions with their exact replies.

Nothing here does I/O. The protocol gathers the facts about a client into a
`Client` value and asks; the answer carries the reply to send.
"""

from __future__ import annotations

import enum
import functools
import ipaddress

import attrs

from .accounts import Account, Directory
from .addresses import Address
from .config import IPNetwork
from .state import normalise_ip


class Listener(enum.Enum):
    MTA = "listen"  # the world delivering mail in
    SUBMISSION = "submission"  # customers sending mail out; always needs authorisation


class Verdict(enum.Enum):
    LOCAL = "accept-local"
    RELAY = "accept-relay"
    ACCEPT = "accept"  # a sender
    REJECT = "reject"


@attrs.frozen
class Decision:
    verdict: Verdict
    code: int
    text: str
    accounts: tuple[Account, ...] = ()
    forwards: tuple[str, ...] = ()  # remote targets of forwarding aliases


@attrs.frozen
class Client:
    """What the policy needs to know about an SMTP client."""

    listener: Listener
    ip: str
    account: Account | None = None  # set once AUTH succeeded
    pop_domains: tuple[str, ...] | None = None  # set while POP-before-SMTP authorises the IP
    trusted_networks: tuple[IPNetwork, ...] = ()

    @property
    def trusted(self) -> bool:
        return is_trusted(self.ip, self.trusted_networks)

    @property
    def authorised(self) -> bool:
        """May this client relay: authenticated, POP-authorised or trusted."""
        return self.account is not None or self.pop_domains is not None or self.trusted


@functools.lru_cache(maxsize=4096)  # asked at every command; parsing is not free
def is_trusted(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(normalise_ip(ip))
    except ValueError:
        return False
    return any(address in network for network in networks)


def rcpt_needs_pop(client: Client, directory: Directory, rcpt: Address) -> bool:
    """Whether `decide` on `rcpt` can depend on the client's POP authorisation
    (if not, the protocol need not look it up)."""
    if client.account is not None or client.trusted:
        return False
    return client.listener is Listener.SUBMISSION or not directory.is_local_domain(rcpt.domain)


def sender_needs_pop(client: Client, sender: Address | None, must_match: bool) -> bool:
    """Whether `decide_sender` on `sender` can depend on the client's POP authorisation."""
    if sender is None or not must_match or client.trusted:
        return False
    return client.account is not None or client.listener is Listener.SUBMISSION


def decide(
    client: Client,
    directory: Directory,
    rcpt: Address,
    sender: Address | None = None,
    must_match: bool = False,
) -> Decision:
    """Decide on RCPT TO by its parsed domain alone; a local part is never re-routed.

    A client that may relay only because of a POP login (on `listen`) must
    relay with a sender of the login's domains: that check is made here, for
    the recipients that need the authorisation, not at MAIL FROM, so that the
    login never costs it the mail anybody may send to local users.
    """
    if client.listener is Listener.SUBMISSION and not client.authorised:
        return Decision(Verdict.REJECT, 530, "5.7.0 Authentication required")
    if directory.is_local_domain(rcpt.domain):
        accounts, forwards = directory.expand(rcpt)
        if not accounts and not forwards:
            return Decision(
                Verdict.REJECT, 550, f"5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
            )
        return Decision(Verdict.LOCAL, 250, "2.1.5 Ok", accounts, forwards)
    if not client.authorised:
        return Decision(Verdict.REJECT, 554, f"5.7.1 <{rcpt}>: Relay access denied")
    pop_only = client.account is None and not client.trusted
    if pop_only and must_match and sender is not None:
        canonical = directory.canonical(sender)
        if canonical is None or canonical.domain not in (client.pop_domains or ()):
            return Decision(Verdict.REJECT, 553, f"5.1.0 <{sender}> sender rejected")
    return Decision(Verdict.RELAY, 250, "2.1.5 Ok")


def decide_sender(
    client: Client, directory: Directory, sender: Address | None, must_match: bool
) -> Decision:
    """Decide on MAIL FROM: an authenticated sender may only use its own domains.

    `sender` None is the null sender ``<>``, always allowed. Trusted networks
    are exempt; unauthorised clients (the world sending mail in) may use any.
    A client authorised only by a POP login is checked here on `submission`
    (where every recipient needs the authorisation), and at RCPT on `listen`.
    """
    ok = Decision(Verdict.ACCEPT, 250, "2.1.0 Ok")
    if sender is None or not sender_needs_pop(client, sender, must_match):
        return ok
    own: set[str] = set(client.pop_domains or ())
    if client.account is not None:
        own.add(client.account.domain)
    if not own:
        return ok
    canonical = directory.canonical(sender)
    if canonical is not None and canonical.domain in own:
        return ok
    return Decision(Verdict.REJECT, 553, f"5.1.0 <{sender}> sender rejected")


def signing_domains(
    client: Client, domains: tuple[str, ...], aliases: tuple[tuple[str, str], ...]
) -> frozenset[str]:
    """The From: domains whose DKIM key may sign what this client relays:
    the authenticated account's domain, the POP-authorising accounts'
    domains, with their aliases; every local domain for trusted networks.
    A customer of one domain never gets another local domain's signature."""
    own = set(domains) if client.trusted else set(client.pop_domains or ())
    if client.account is not None:
        own.add(client.account.domain)
    own &= set(domains)
    return frozenset(own | {alias for alias, canonical in aliases if canonical in own})
