"""One DNS resolver for everything (`[mailbox] resolver`).

The outbound queue looks up MX records and their hosts' addresses on the
reactor, with `twisted.names` (routes.py), and connects to those addresses
(only a smarthost given by name is left to the system's getaddrinfo).
The SPF, DKIM and DMARC libraries (pyspf, dkimpy, authheaders) look up
their records from the checks' threads, with dnspython, which all three use;
this module points dnspython's default resolver at the same server, so that
every lookup the appliance makes goes to one place, a test's DNS server on
loopback included. Every lookup there has a short deadline: a slow or
silent DNS server costs a message a few seconds, not minutes.
"""

from __future__ import annotations

import dns.exception
import dns.rdatatype
import dns.resolver
from twisted.internet.interfaces import IResolver
from twisted.names import client

Nameserver = tuple[str, int]

LOOKUP_SECONDS = 1.0  # for one lookup, all tries and servers included


def twisted_resolver(server: Nameserver | None) -> IResolver:
    """For lookups on the reactor: `server`, or those of /etc/resolv.conf."""
    if server is None:
        return client.createResolver()
    return client.Resolver(servers=[server])


def thread_resolver(
    server: Nameserver | None, lifetime: float = LOOKUP_SECONDS
) -> dns.resolver.Resolver:
    """A dnspython resolver for the checks' threads, with a cache (answers
    are kept for their TTL: a burst from one domain asks once)."""
    resolver = dns.resolver.Resolver(configure=server is None)
    if server is not None:
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    resolver.cache = dns.resolver.LRUCache(10_000)
    return resolver


def use_everywhere(resolver: dns.resolver.Resolver) -> None:
    """Make `resolver` the one pyspf and authheaders use (dnspython's default)."""
    dns.resolver.default_resolver = resolver


class TempError(Exception):
    """A lookup that may succeed later: a timeout, or no server answered."""


def txt(
    resolver: dns.resolver.Resolver, name: bytes | str, lifetime: float | None = None
) -> bytes | None:
    """The first TXT record at `name`, its strings joined (as DKIM keys are
    read: RFC 6376 §3.6.2.2); None if there is none. TempError for a
    timeout or a server failure, which must not read as "no record"."""
    records = txts(resolver, name, lifetime)
    return records[0] if records else None


def txts(
    resolver: dns.resolver.Resolver, name: bytes | str, lifetime: float | None = None
) -> list[bytes]:
    """Every TXT record at `name`, each one's strings joined; TempError as `txt`."""
    answer = _resolve(resolver, name, "TXT", lifetime)
    if answer is None:
        return []
    return [
        b"".join(record.strings)
        for rrset in answer.response.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for record in rrset
    ]


def exists(
    resolver: dns.resolver.Resolver, name: str, rdtype: str, lifetime: float | None = None
) -> bool:
    """Whether `name` has a record of `rdtype`; TempError as `txt`."""
    answer = _resolve(resolver, name, rdtype, lifetime)
    return answer is not None and answer.rrset is not None


def _resolve(
    resolver: dns.resolver.Resolver, name: bytes | str, rdtype: str, lifetime: float | None
) -> dns.resolver.Answer | None:
    """The answer (which may hold no records), None for no such name or an
    unusable one; TempError for a timeout or a server failure."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    try:
        return resolver.resolve(
            name, rdtype, raise_on_no_answer=False, search=False, lifetime=lifetime
        )
    except dns.resolver.NXDOMAIN:
        return None
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
        raise TempError(f"{name}: {type(e).__name__}") from None
    except dns.exception.DNSException:
        return None  # a malformed name or answer: nothing to use
