"""Relay limits per sender (`[limits] relay_recipients_per_hour`): the
commonest small-ISP incident is a stolen password or an infected PC sending
thousands of messages an hour through the appliance. Relayed recipients are
counted in the state store (shared by every worker and mailboxctl, kept
across restarts) per authenticated account, or per address for a client
that only a POP3 login authorises; trusted networks are not counted.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .clocks import Wall
from .policy import Client
from .state import RELAY_WINDOW, RelayCount, StateStore, client_key

log = Logger()

SETTING = "relay_recipients_per_hour"  # the key, in [limits] and in an account's line
SAID = "said:relay-limit:"  # the lease that stands for "the log said so this hour"


def relay_sender(client: Client, ipv6_prefix: int = 128) -> str | None:
    """Whose count a relayed recipient goes to: the account, the POP-authorised
    address (an IPv6 one by its network), or nobody (trusted networks)."""
    if client.trusted:
        return None
    if client.account is not None:
        return client.account.address
    if client.pop_domains is not None:
        return client_key(client.ip, ipv6_prefix)
    return None


def limited_reply(sender: str) -> tuple[int, str]:
    return (451, f"4.7.1 Relay limit reached for {sender}, try again later")


@attrs.define(eq=False)
class RelayLimits:
    store: StateStore
    db: Callable[..., Deferred]  # runs a store call in the state pool
    wall: Wall  # the instants counted are stored

    def take(self, sender: str, limit: int) -> Deferred:
        """Fires with True if one more recipient for `sender` is within
        `limit` a hour (0: no limit), and counts it; else with False."""
        d = self.db(self.store.count_relay, sender, self.wall(), limit)
        return d.addCallback(self._counted, sender, limit)

    def _counted(self, result: RelayCount, sender: str, limit: int) -> bool:
        if not result.allowed:
            # Said once an hour for each sender, whichever worker or front end
            # refuses it and across restarts: the first to take the note, a
            # lease no one renews, says it.
            note = self.db(
                self.store.take_lease,
                SAID + sender,
                secrets.token_hex(8),
                self.wall(),
                RELAY_WINDOW,
            )
            note.addCallbacks(
                lambda holder: self._say(result, sender, limit) if holder is None else None,
                lambda f: self._say(result, sender, limit),  # rather twice than never
            )
        return result.allowed

    def _say(self, result: RelayCount, sender: str, limit: int) -> None:
        log.warn(
            "relay limit reached for {sender}: {count} recipients in the last hour (limit {limit})",
            sender=sender,
            count=result.count,
            limit=limit,
            code=451,
        )
