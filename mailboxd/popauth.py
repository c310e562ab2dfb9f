"""POP-before-SMTP: a POP3 login authorises its IP to relay for a while."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .clocks import Wall
from .state import PopAuth, StateStore, normalise_ip

log = Logger()


@attrs.define
class PopAuthRegistry:
    """IP -> expiry and the authorising accounts' domains, kept in the state store.

    Every call goes to the store (through `run`, off the reactor thread), not
    to a copy here: `mailboxctl popauth revoke` and other processes sharing
    the store see and change the same authorisations.
    """

    store: StateStore
    wall: Wall  # expiries are instants other processes read
    ttl: int
    run: Callable[..., Deferred]  # runs a store call off the reactor thread

    def authorise(self, ip: str, domain: str) -> Deferred:
        """Record (or refresh) `ip`, adding `domain` to those it may send as."""
        if self.ttl <= 0:  # POP-before-SMTP is off: nothing to record
            return succeed(None)
        ip = normalise_ip(ip)
        now = self.wall()

        def logged(auth: PopAuth) -> None:
            log.info(
                "pop-before-smtp: {client} may relay until +{ttl}s as {domains}",
                client=ip,
                ttl=self.ttl,
                domains=" ".join(auth.domains),
            )

        d = self.run(self.store.add_popauth, ip, now, now + self.ttl, domain)
        return d.addCallback(logged)

    def domains(self, ip: str) -> Deferred:
        """Fires with the domains `ip` is authorised for, or None if it is not."""
        if self.ttl <= 0:
            return succeed(None)

        def found(auth: PopAuth | None) -> tuple[str, ...] | None:
            return None if auth is None else auth.domains

        d = self.run(self.store.popauth, normalise_ip(ip), self.wall())
        return d.addCallback(found)
