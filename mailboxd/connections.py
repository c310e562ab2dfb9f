"""Open connections per client address, across every listener, and their cap."""

from __future__ import annotations

import collections

import attrs

from .config import IPNetwork
from .policy import is_trusted
from .state import normalise_ip


@attrs.define
class ConnectionCount:
    """At most `cap` connections at once from one address (0: no cap);
    trusted networks are not counted."""

    cap: int
    trusted_networks: tuple[IPNetwork, ...] = ()
    _open: collections.Counter = attrs.field(init=False, factory=collections.Counter)

    def admit(self, ip: str) -> bool:
        """Count a new connection from `ip`; False (not counted) if it is one too many."""
        if self.cap <= 0 or is_trusted(ip, self.trusted_networks):
            return True
        key = normalise_ip(ip)
        if self._open[key] >= self.cap:
            return False
        self._open[key] += 1
        return True

    def release(self, ip: str) -> None:
        """A connection `admit` counted has closed."""
        key = normalise_ip(ip)
        if self._open[key] <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] -= 1
