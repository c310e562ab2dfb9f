"""Where outbound mail for a domain goes: the smarthost, or the MX hosts
(RFC 5321 §5.1) found through `twisted.names`."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.names import error as dns_error
from twisted.names.dns import Record_MX

from .addresses import Address


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
    """Look up `domain`'s mail hosts, turning DNS failures into RouteErrors."""
    try:
        answers, _authority, _additional = await resolver.lookupMailExchange(domain)
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
