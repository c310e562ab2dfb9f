"""DNS blocklists (`[inbound] dnsbl`, RFC 5782): whether a client's address
is listed in one of the zones, asked on the reactor through
`[mailbox] resolver` as the client connects, and remembered for the answer's
TTL. Only clients that are not authenticated, POP-authorised or trusted are
refused (at RCPT): a customer on a dynamic range (Spamhaus PBL) still logs
in and sends. A lookup that fails or times out lists nobody.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.names import dns
from twisted.names import error as dns_error

LOOKUP_TIMEOUT = (1, 2)  # seconds for each try: 3 in all, then the client is let in
NOT_LISTED_TTL = 300.0  # seconds an "not listed" answer is remembered
CACHE_MAX = 10_000  # addresses remembered per zone


def query_name(ip: str, zone: str) -> str | None:
    """The name to look up (RFC 5782 §2.1, §2.4): the address's octets, or
    an IPv6 address's nibbles, in reverse, under `zone`."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone


def refusal(ip: str, zone: str) -> tuple[int, str]:
    return (554, f"5.7.1 Service unavailable; client [{ip}] blocked using {zone}")


@attrs.define(eq=False)
class Blocklists:
    zones: tuple[str, ...]
    resolver: Any  # twisted.names IResolver
    clock: Any
    # (zone, ip) -> (listed, until), on `clock`
    _known: dict[tuple[str, str], tuple[bool, float]] = attrs.field(factory=dict)

    def listed(self, ip: str) -> Deferred:
        """Fires with the first zone (in the configured order) that lists
        `ip`, or None; never fails."""
        if not self.zones:
            return succeed(None)
        asked = [self._ask(zone, ip) for zone in self.zones]
        d = DeferredList(asked, consumeErrors=True)
        return d.addCallback(
            lambda results: next(
                (zone for zone, (ok, hit) in zip(self.zones, results, strict=True) if ok and hit),
                None,
            )
        )

    def _ask(self, zone: str, ip: str) -> Deferred:
        now = self.clock.seconds()
        known = self._known.get((zone, ip))
        if known is not None and known[1] > now:
            return succeed(known[0])
        name = query_name(ip, zone)
        if name is None:
            return succeed(False)
        d = self.resolver.lookupAddress(name, timeout=LOOKUP_TIMEOUT)
        return d.addCallbacks(self._answered, self._failed, (zone, ip), None, (zone, ip))

    def _answered(self, result: Any, zone: str, ip: str) -> bool:
        answers = [a for a in result[0] if a.type == dns.A]
        # RFC 5782 §2.3: a listing is an address in 127.0.0.0/8; others
        # (Spamhaus's 127.255.255.x: "your resolver may not ask") list nobody.
        listed = any(
            a.payload.dottedQuad().startswith("127.")
            and not a.payload.dottedQuad().startswith("127.255.255.")
            for a in answers
        )
        ttl = min((a.ttl for a in answers), default=NOT_LISTED_TTL)
        self._remember(zone, ip, listed, ttl if listed else max(ttl, 1))
        return listed

    def _failed(self, f: Any, zone: str, ip: str) -> bool:
        if f.check(dns_error.DomainError, dns_error.DNSNameError):  # not listed
            self._remember(zone, ip, False, NOT_LISTED_TTL)
        return False  # a timeout or a server failure: let the client in, ask again later

    def _remember(self, zone: str, ip: str, listed: bool, ttl: float) -> None:
        if len(self._known) >= CACHE_MAX * max(1, len(self.zones)):
            now = self.clock.seconds()
            self._known = {k: v for k, v in self._known.items() if v[1] > now}
            if len(self._known) >= CACHE_MAX * max(1, len(self.zones)):
                self._known.clear()
        self._known[(zone, ip)] = (listed, self.clock.seconds() + ttl)


class Listing:
    """One client's answer, asked for once and waited for by every RCPT."""

    def __init__(self, asked: Deferred) -> None:
        self._waiting: list[Deferred] | None = []
        self._zone: str | None = None
        asked.addCallback(self._answered)

    def _answered(self, zone: str | None) -> None:
        self._zone, waiting, self._waiting = zone, self._waiting or [], None
        for d in waiting:
            d.callback(zone)

    def zone(self) -> Deferred:
        """Fires with the zone that lists the client, or None."""
        if self._waiting is None:
            return succeed(self._zone)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d
