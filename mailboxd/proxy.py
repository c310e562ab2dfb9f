"""The PROXY protocol (v1 and v2) on a listener: ``haproxy:tcp:25``.

A load balancer in front of the server opens each connection with a header
that names the client it stands for. Everything that judges a client (the
connection cap, the guard, POP-before-SMTP, the greeting's checks, the
Received header, the log) then sees that client, not the balancer.

Twisted parses the header: `twisted.protocols.haproxy.proxyEndpoint` (its
one public name) wraps a factory so that each connection's transport reads
the header and afterwards answers getPeer()/getHost() with the proxied
addresses. But its wrapper connects the protocol at once, before the header
has come, and both SMTP and POP3 speak first: they would greet the balancer,
and count, check and log the balancer's address. So here, per connection:

    TCP -> _Framing -> Twisted's PROXY wrapper -> _Gate -> the protocol
                                                            (TLS first, for
                                                             haproxy:tls:)

- `_Framing` (outermost, on the socket's transport) closes a connection
  from an address outside `[mailbox] proxy_networks` before it reads a
  byte; otherwise it collects the header's bytes, finds where the header
  ends (framing only: v1 is one line up to CRLF, at most 107 octets; v2 is
  16 octets and the length they give), and hands the whole header to
  Twisted's wrapper in one piece (which also wants it so: it tells v1 from
  v2 by the first bytes it is given). A header not complete within
  `HEADER_TIMEOUT` seconds closes the connection.
- Twisted's wrapper parses it (a header it cannot parse: it closes).
- `_Gate`, the protocol Twisted's wrapper believes it wraps, builds and
  connects the real protocol only once `_Framing` says the header was
  parsed; the real protocol's transport is Twisted's wrapper (getPeer():
  the client). Bytes that came after the header follow.

A v2 LOCAL header (a balancer's health check) or a v1 ``PROXY UNKNOWN``
names no client: the connection is the balancer's own, and its address is
what the protocol sees. A header naming something that is not an IP address
(a v1 address that does not parse; a v2 AF_UNIX client) closes it.

The transport the protocol gets is still a full transport: Twisted's
wrapper and `_Framing` are ProtocolWrappers, which pass registerProducer,
pauseProducing, startTLS, getHandle and the rest through to the socket.

`proxied()` builds the factory for a plain listening socket, so the primary
and the worker processes (which adopt the primary's sockets) wrap alike.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from .config import IPNetwork
from .policy import is_trusted
from .printable import shown

log = Logger()

PREFIX = "haproxy:"  # what the operator writes before a listener's endpoint
HEADER_TIMEOUT = 10.0  # seconds a balancer has to send the whole header

V1_START = b"PROXY "
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_MAX = 107  # octets of a v1 header, its CRLF included (the spec's limit)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length


def is_proxied(description: str) -> bool:
    """Whether a listener's endpoint string asks for the PROXY protocol."""
    return description.lower().startswith(PREFIX)


def inner(description: str) -> str:
    """The endpoint under ``haproxy:`` (the string itself without it)."""
    return description[len(PREFIX) :] if is_proxied(description) else description


def header_end(data: bytes) -> int | None:
    """Where the PROXY header at the start of `data` ends (the offset of the
    first byte after it); None while more is needed; ValueError if `data`
    cannot start one. Framing only: the parsing is Twisted's."""
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)]:
        if len(data) < V2_FIXED:
            return None
        end = V2_FIXED + int.from_bytes(data[14:16], "big")
        return end if len(data) >= end else None
    if data[: len(V1_START)] == V1_START[: len(data)]:
        at = data.find(b"\r\n", 0, V1_MAX)
        if at >= 0:
            return at + 2
        if len(data) >= V1_MAX:
            raise ValueError(f"no CRLF in the first {V1_MAX} octets")
        return None
    raise ValueError("not a PROXY header")


def _client_address(peer: Any) -> bool:
    """Whether the address Twisted read from a header is an IP address of
    its own family (Twisted takes a v1 header's words as they are)."""
    if not isinstance(peer, IPv4Address | IPv6Address):
        return False
    try:
        ip = ipaddress.ip_address(peer.host)
    except ValueError:
        return False
    return ip.version == (4 if isinstance(peer, IPv4Address) else 6)


class _Gate(Protocol):
    """What Twisted's PROXY wrapper wraps: the real protocol, connected once
    the header is read (`start`)."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self.wrapped_factory = factory
        self.protocol: Any = None

    def start(self) -> None:
        transport: Any = self.transport  # Twisted's wrapper: getPeer() is the client
        protocol = self.wrapped_factory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.loseConnection()
            return
        self.protocol = protocol
        protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


class _Gates(Factory):
    """The factory Twisted's wrapper is given: a `_Gate` for each connection."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self.wrapped_factory = factory

    def buildProtocol(self, addr: Any) -> _Gate:
        return _Gate(self.wrapped_factory)

    def doStart(self) -> None:
        self.wrapped_factory.doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()


class _Framing(ProtocolWrapper):
    """The socket's protocol: the balancer check, the header's framing and
    its timeout (see the module docstring). Its wrappedProtocol is Twisted's
    PROXY wrapper, whose wrappedProtocol is a `_Gate`."""

    factory: ProxyFactory

    def __init__(self, factory: ProxyFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self._buffer = b""
        self._read = False  # the header is read: from now on bytes pass straight on
        self._refused = False
        self._timer: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        # Connect the wrappers first (they register with their factories and
        # unregister when the connection is lost); the protocol comes later.
        super().makeConnection(transport)
        balancer = self._balancer()
        networks = self.factory.networks
        if networks and not is_trusted(balancer, networks):
            log.warn(
                "PROXY connection from {balancer} closed: not in [mailbox] proxy_networks",
                balancer=balancer,
            )
            self._refuse()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._silent)

    def _balancer(self) -> str:
        assert self.transport is not None
        return str(getattr(self.transport.getPeer(), "host", "local"))

    def _refuse(self) -> None:
        self._refused = True
        self._buffer = b""
        self._stop_timer()
        assert self.transport is not None
        self.transport.loseConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _silent(self) -> None:
        self._timer = None
        log.info(
            "PROXY connection from {balancer} closed: no whole header in {timeout:.0f}s",
            balancer=self._balancer(),
            timeout=self.factory.timeout,
        )
        self._refuse()

    def _bad(self, reason: str, data: bytes) -> None:
        log.warn(
            "PROXY connection from {balancer} closed: {reason} (it began {start})",
            balancer=self._balancer(),
            reason=reason,
            start=shown(data[:24].decode("latin-1")),
        )
        self._refuse()

    def dataReceived(self, data: bytes) -> None:
        if self._read:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            end = header_end(self._buffer)
        except ValueError as e:
            self._bad(str(e), self._buffer)
            return
        if end is None:
            return
        self._stop_timer()
        header, rest = self._buffer[:end], self._buffer[end:]
        self._buffer = b""
        proxy: Any = self.wrappedProtocol  # Twisted's wrapper
        if header == V1_UNKNOWN:
            # The spec's form for a connection the balancer cannot describe;
            # Twisted's parser wants a word after UNKNOWN (and ignores it).
            header = V1_UNKNOWN[:-2] + b" \r\n"
        try:
            proxy.dataReceived(header)
        except Exception:  # noqa: BLE001 - Twisted's v1 parser lets a bad port's ValueError out
            self._bad("not a valid PROXY header", header)
            return
        if proxy.disconnecting:  # Twisted could not parse it, and closed
            self._bad("not a valid PROXY header", header)
            return
        peer = proxy.getPeer()
        assert self.transport is not None
        if peer != self.transport.getPeer() and not _client_address(peer):
            self._bad("the header names no IP client", header)
            return
        self._read = True
        proxy.wrappedProtocol.start()  # the _Gate
        if rest and not proxy.disconnecting:
            proxy.dataReceived(rest)

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_timer()
        super().connectionLost(reason)


class ProxyFactory(WrappingFactory["_Framing"]):
    """The factory for a socket that speaks the PROXY protocol: `proxied`."""

    protocol = _Framing
    noisy = False

    def __init__(
        self,
        wrapped: Any,  # Twisted's HAProxyWrappingFactory around a _Gates
        networks: tuple[IPNetwork, ...],
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        super().__init__(wrapped)
        self.networks = networks
        self.clock = clock
        self.timeout = timeout


@implementer(IStreamServerEndpoint)
class _Given:
    """An endpoint that only notes the factory it is to listen with: how the
    factory Twisted's proxyEndpoint makes is had without its private names."""

    def __init__(self) -> None:
        self.factory: Any = None

    def listen(self, factory: Any) -> Deferred[Any]:
        self.factory = factory
        return succeed(None)


def proxied(
    factory: IProtocolFactory,
    networks: tuple[IPNetwork, ...],
    clock: IReactorTime,
    timeout: float = HEADER_TIMEOUT,
) -> ProxyFactory:
    """`factory` behind the PROXY protocol: the factory to listen with on a
    plain TCP socket (or to adopt one with). Only addresses in `networks`
    (any, if empty) may connect."""
    given = _Given()
    proxyEndpoint(given).listen(_Gates(factory))
    assert given.factory is not None
    return ProxyFactory(given.factory, networks, clock, timeout)
