"""POP-before-SMTP: a POP3 login authorises its IP to relay for a while."""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .state import StateStore, normalise_ip

log = Logger()


@attrs.define
class PopAuthRegistry:
    """IP -> expiry and the authorising accounts' domains, kept in the state store."""

    store: StateStore
    clock: IReactorTime
    ttl: int

    def authorise(self, ip: str, domain: str) -> None:
        """Record (or refresh) `ip`, adding `domain` to those it may send as."""
        ip = normalise_ip(ip)
        now = self.clock.seconds()
        current = self.store.popauth(ip, now)
        domains = tuple(sorted({domain, *(current.domains if current else ())}))
        self.store.set_popauth(ip, now + self.ttl, domains)
        log.info(
            "pop-before-smtp: {client} may relay until +{ttl}s as {domains}",
            client=ip,
            ttl=self.ttl,
            domains=" ".join(domains),
        )

    def domains(self, ip: str) -> tuple[str, ...] | None:
        """The domains `ip` is authorised for, or None if it is not."""
        if self.ttl <= 0:
            return None
        found = self.store.popauth(normalise_ip(ip), self.clock.seconds())
        return None if found is None else found.domains
