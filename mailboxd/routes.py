"""Where outbound mail for a domain goes: the smarthost, or the addresses
of its MX hosts (RFC 5321 §5.1), all found through `twisted.names` and
`[mailbox] resolver`: the system's getaddrinfo is never asked, so that the
one DNS server the site configured answers every lookup."""

from __future__ import annotations

import socket
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.names.dns import Record_MX

from .addresses import Address

# twisted.names' tries of one lookup (its default is 1, 3, 11 and 45 s): a
# resolver that has not answered in 4 s will not, and the queue tries again.
LOOKUP_TIMEOUT = (1, 3)
# Addresses tried in one delivery attempt, as Postfix's smtp_mx_address_limit.
MAX_ADDRESSES = 5
# twisted.names' answers for a server that did not give one.
_FAILED = (
    dns_error.DNSServerError,
    dns_error.DNSQueryRefusedError,
    dns_error.DNSFormatError,
    dns_error.DNSNotImplementedError,
    dns_error.DNSUnknownError,
)


class RouteError(Exception):
    """No route now. `permanent` says whether trying again can help."""

    def __init__(self, status: str, text: str, permanent: bool) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.permanent = permanent


@attrs.frozen
class Hop:
    host: str
    port: int


def parse_smarthost(text: str) -> Hop:
    host, _, port = text.rpartition(":")
    return Hop(host.strip("[]"), int(port))


def destination(recipient: str, smarthost: str) -> str:
    """The key recipients are grouped and limited by: the smarthost, or the domain."""
    if smarthost:
        return smarthost
    address = Address(*recipient.rsplit("@", 1))
    return address.domain.lower()


def order_mx(answers: list[Any], domain: str) -> list[str]:
    """MX host names by preference (RFC 5321 §5.1); RouteError for a null MX."""
    records = [a.payload for a in answers if isinstance(a.payload, Record_MX)]
    if not records:
        return [domain]  # no MX: the domain's own address records (implicit MX)
    if any(str(r.name) in ("", ".") for r in records):
        # RFC 7505: a null MX says the domain accepts no mail at all.
        raise RouteError("5.1.10", f"{domain} does not accept mail (null MX)", permanent=True)
    records.sort(key=lambda r: r.preference)
    hosts: list[str] = []
    for r in records:
        name = str(r.name).rstrip(".").lower()  # DNS names compare without case
        if name not in hosts:
            hosts.append(name)
    return hosts


async def mx_hosts(resolver: Any, domain: str) -> list[str]:
    """The addresses to try for `domain`: those of its MX hosts by
    preference (each host's IPv4, then IPv6 ones), or of the domain itself
    if it has no MX, at most MAX_ADDRESSES; DNS failures become RouteErrors."""
    hosts = await mx_names(resolver, domain)
    # Every host's lookups at once: a slow one costs the wait of one lookup.
    lookups = [ensureDeferred(host_addresses(resolver, host)) for host in hosts]
    found: list[str] = []
    problem = None
    for lookup in lookups:
        addresses, failed = await lookup
        found += [a for a in addresses if a not in found]
        problem = problem or failed
    if found:
        return found[:MAX_ADDRESSES]
    if problem is not None:
        raise RouteError("4.4.3", f"{domain}: {problem}", permanent=False)
    # Every name answered, none with an address: as Postfix, a bounce.
    where = "its mail hosts have" if hosts != [domain] else "it has no MX and"
    raise RouteError("5.4.4", f"{domain}: {where} no address (A or AAAA)", permanent=True)


async def host_addresses(resolver: Any, host: str) -> tuple[list[str], str | None]:
    """`host`'s IPv4 then IPv6 addresses, and why a lookup failed (None if
    none did: no such name, or no records, is an answer). Never raises."""
    asked = [
        (resolver.lookupAddress(host, timeout=LOOKUP_TIMEOUT), dns.A),
        (resolver.lookupIPV6Address(host, timeout=LOOKUP_TIMEOUT), dns.AAAA),
    ]
    found: list[str] = []
    problem = None
    for lookup, rdtype in asked:
        try:
            answers, _authority, _additional = await lookup
        except dns_error.DNSNameError:
            continue  # NXDOMAIN: this host has no address
        except _FAILED as e:
            problem = problem or f"{host}: DNS lookup failed: {type(e).__name__}"
            continue
        except dns_error.DomainError:
            continue  # no records of that name
        except Exception as e:  # noqa: BLE001 - timeouts, unreachable resolvers
            problem = problem or f"{host}: DNS lookup failed: {str(e) or type(e).__name__}"
            continue
        for answer in answers:
            if answer.type == rdtype == dns.A:
                found.append(answer.payload.dottedQuad())
            elif answer.type == rdtype == dns.AAAA:
                found.append(socket.inet_ntop(socket.AF_INET6, answer.payload.address))
    return found, problem


async def mx_names(resolver: Any, domain: str) -> list[str]:
    """Look up `domain`'s mail hosts, turning DNS failures into RouteErrors."""
    try:
        lookup: Deferred = resolver.lookupMailExchange(domain, timeout=LOOKUP_TIMEOUT)
        answers, _authority, _additional = await lookup
    except dns_error.DNSNameError:
        raise RouteError("5.1.2", f"{domain}: no such domain (NXDOMAIN)", permanent=True) from None
    except dns_error.DNSServerError:
        raise RouteError("4.4.3", f"{domain}: DNS server failure (SERVFAIL)", False) from None
    except (
        dns_error.DNSQueryRefusedError,
        dns_error.DNSFormatError,
        dns_error.DNSNotImplementedError,
        dns_error.DNSUnknownError,
    ) as e:
        # The resolver did not answer: not a reason to use the implicit MX.
        raise RouteError(
            "4.4.3", f"{domain}: DNS lookup failed: {type(e).__name__}", False
        ) from None
    except dns_error.DomainError:
        return [domain]  # no MX records of that name: fall back to its address
    except Exception as e:  # timeouts, refused queries, unreachable resolvers
        raise RouteError(
            "4.4.3", f"{domain}: DNS lookup failed: {str(e) or type(e).__name__}", False
        ) from None
    return order_mx(answers, domain)
