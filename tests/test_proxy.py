"""The PROXY protocol wrapper (mailboxd.proxy), with StringTransport and a
task.Clock: the protocol is connected only once the header is read, and
sees the client it names."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs

from mailboxd.proxy import HEADER_TIMEOUT, header_end, inner, is_proxied, proxied
from mailboxd.state import normalise_ip

BALANCER = IPv4Address("TCP", "10.0.0.2", 40000)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header: version 2, `command` (0 LOCAL, 1 PROXY), `family`
    (0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x31 AF_UNIX stream)."""
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(source: str, port: int, destination: str = "192.0.2.1", dport: int = 25) -> bytes:
    addresses = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(destination).packed
        + struct.pack("!HH", port, dport)
    )
    return v2(1, 0x11, addresses)


def v2_tcp6(source: str, port: int, destination: str = "2001:db8::1", dport: int = 25) -> bytes:
    addresses = (
        ipaddress.IPv6Address(source).packed
        + ipaddress.IPv6Address(destination).packed
        + struct.pack("!HH", port, dport)
    )
    return v2(1, 0x21, addresses)


class Recorder(Protocol):
    """Notes when it is connected, whom it sees, and what it receives."""

    def __init__(self, seen: list) -> None:
        self.seen = seen
        self.data = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.seen.append(self)
        self.transport.write(b"220 hello\r\n")  # speaks first, as SMTP does

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True


class Recorders(Factory):
    def __init__(self) -> None:
        self.seen: list[Recorder] = []
        self.addresses: list = []
        self.started = self.stopped = 0

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        return Recorder(self.seen)

    def doStart(self) -> None:
        self.started += 1

    def doStop(self) -> None:
        self.stopped += 1


class Connection:
    def __init__(self, networks: str = "", peer: IPv4Address | IPv6Address = BALANCER) -> None:
        self.clock = Clock()
        self.inner = Recorders()
        nets = tuple(ipaddress.ip_network(n) for n in networks.split())
        self.factory = proxied(self.inner, nets, self.clock)
        self.transport = StringTransport(peerAddress=peer)
        self.protocol = self.factory.buildProtocol(peer)
        self.protocol.makeConnection(self.transport)

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)

    @property
    def connected(self) -> Recorder | None:
        return self.inner.seen[0] if self.inner.seen else None

    def lose(self) -> None:
        self.protocol.connectionLost(None)


def test_v1_header_connects_the_protocol_with_the_client_address():
    c = Connection()
    assert c.connected is None  # nothing before the header
    assert c.transport.value() == b""
    c.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    p = c.connected
    assert p is not None
    assert p.peer == IPv4Address("TCP", "203.0.113.7", 51000)
    assert p.transport.getHost() == IPv4Address("TCP", "192.0.2.1", 25)
    assert c.inner.addresses == [IPv4Address("TCP", "203.0.113.7", 51000)]
    assert c.transport.value() == b"220 hello\r\n"
    assert p.data == b""
    c.feed(b"EHLO x\r\n")
    assert p.data == b"EHLO x\r\n"
    c.lose()
    assert p.lost


def test_v1_tcp6():
    c = Connection()
    c.feed(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 25\r\n")
    assert c.connected.peer == IPv6Address("TCP", "2001:db8::7", 51000)


def test_v2_header_ipv4_and_ipv6_and_tlvs():
    c = Connection()
    c.feed(v2_tcp4("203.0.113.8", 40001))
    assert c.connected.peer == IPv4Address("TCP", "203.0.113.8", 40001)

    c = Connection()
    c.feed(v2_tcp6("2001:db8::8", 40002))
    peer = c.connected.peer
    assert isinstance(peer, IPv6Address) and peer.port == 40002
    # Twisted writes it out in full; every key made of it is normalised.
    assert normalise_ip(peer.host) == "2001:db8::8"

    # TLVs after the addresses (HAProxy sends some) belong to the header.
    addresses = b"\xcb\x00\x71\x09" + b"\xc0\x00\x02\x01" + struct.pack("!HH", 1, 25)
    c = Connection()
    c.feed(v2(1, 0x11, addresses, tlvs=b"\x04\x00\x02ab") + b"QUIT\r\n")
    assert c.connected.peer == IPv4Address("TCP", "203.0.113.9", 1)
    assert c.connected.data == b"QUIT\r\n"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_split_over_many_reads(version):
    header = (
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n"
        if version == "v1"
        else v2_tcp4("203.0.113.7", 51000)
    )
    c = Connection()
    for i in range(len(header) - 1):
        c.feed(header[i : i + 1])
        assert c.connected is None, i
        assert not c.transport.disconnecting
    c.feed(header[-1:])
    assert c.connected.peer.host == "203.0.113.7"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_data_after_the_header_in_the_same_read_follows_the_connection(version):
    header = (
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n"
        if version == "v1"
        else v2_tcp4("203.0.113.7", 51000)
    )
    c = Connection()
    c.feed(header + b"EHLO a\r\nNOOP\r\n")
    p = c.connected
    assert p.peer.host == "203.0.113.7"
    assert p.data == b"EHLO a\r\nNOOP\r\n"
    # The greeting went out before the client's bytes were handed over.
    assert c.transport.value() == b"220 hello\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",  # a client that does not know about the balancer
        b"GET / HTTP/1.0\r\n",
        b"PROXY TCP4 203.0.113.7\r\n",  # addresses missing
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 port 25\r\n",  # Twisted lets int()'s error out
        b"PROXY TCP4 not-an-ip 192.0.2.1 1 25\r\n",  # Twisted takes the words as they are
        b"PROXY TCP4 2001:db8::1 192.0.2.1 1 25\r\n",  # the wrong family
        b"PROXY TCP4 \x1b[31m 192.0.2.1 1 25\r\n",
        b"PROXY " + b"x" * 120,  # no CRLF within 107 octets
        V2_SIGNATURE + b"\x10\x11\x00\x00",  # version 1 in the v2 signature
        v2(1, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),  # an AF_UNIX client
    ],
)
def test_bad_header_closes_without_connecting(data):
    c = Connection()
    with capturedLogs() as events:
        c.feed(data)
    assert c.transport.disconnecting
    assert c.connected is None
    assert c.transport.value() == b""
    [event] = [e for e in events if "PROXY" in e["log_format"]]
    assert event["log_level"] == LogLevel.warn
    assert event["balancer"] == "10.0.0.2"
    assert "\x1b" not in event["start"] and "\r" not in event["start"]
    # Whatever comes next is not read.
    c.feed(b"more\r\n")
    assert c.connected is None
    c.lose()


def test_balancer_outside_proxy_networks_is_closed_before_anything_is_read():
    with capturedLogs() as events:
        c = Connection("127.0.0.1/32 10.1.0.0/16")
    assert c.transport.disconnecting
    [event] = [e for e in events if "proxy_networks" in e["log_format"]]
    assert event["balancer"] == "10.0.0.2"
    c.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert c.connected is None
    assert c.transport.value() == b""
    assert not c.clock.getDelayedCalls()
    c.lose()


def test_balancer_inside_proxy_networks_is_served():
    c = Connection("10.0.0.0/24 ::1/128")
    assert not c.transport.disconnecting
    c.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert c.connected.peer.host == "203.0.113.7"


def test_ipv4_mapped_balancer_address_matches_an_ipv4_network():
    c = Connection("10.0.0.0/24", peer=IPv6Address("TCP", "::ffff:10.0.0.2", 1))
    assert not c.transport.disconnecting


def test_silent_connection_is_closed_after_the_timeout():
    c = Connection()
    c.feed(b"PROXY TCP4 ")
    c.clock.advance(HEADER_TIMEOUT - 0.1)
    assert not c.transport.disconnecting
    with capturedLogs() as events:
        c.clock.advance(0.1)
    assert c.transport.disconnecting
    assert any("no whole header" in e["log_format"] for e in events)
    c.feed(b"203.0.113.7 192.0.2.1 51000 25\r\n")
    assert c.connected is None


def test_timer_stops_with_the_header_and_with_the_connection():
    c = Connection()
    c.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert not c.clock.getDelayedCalls()
    c = Connection()
    c.lose()
    assert not c.clock.getDelayedCalls()
    assert c.connected is None


def test_v2_local_and_v1_unknown_leave_the_balancers_address():
    c = Connection()
    c.feed(v2(command=0, family=0x00))  # a health check
    assert c.connected.peer == BALANCER

    c = Connection()
    c.feed(b"PROXY UNKNOWN\r\n")  # the spec's own form
    assert c.connected.peer == BALANCER

    c = Connection()
    c.feed(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nQUIT\r\n")  # words after it are ignored
    assert c.connected.peer == BALANCER
    assert c.connected.data == b"QUIT\r\n"


def test_factory_start_and_stop_reach_the_protocols_factory():
    c = Connection()
    c.factory.doStart()
    c.factory.doStop()
    assert (c.inner.started, c.inner.stopped) == (1, 1)


def test_the_protocols_transport_passes_flow_control_through():
    c = Connection()
    c.feed(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    p = c.connected
    p.transport.registerProducer(p, True)
    assert c.transport.producer is p
    p.transport.pauseProducing()
    assert c.transport.producerState == "paused"
    p.transport.resumeProducing()
    assert c.transport.producerState == "producing"
    p.transport.unregisterProducer()
    assert c.transport.producer is None
    p.transport.loseConnection()
    assert c.transport.disconnecting


def test_header_end_frames_only():
    assert header_end(b"PROX") is None
    assert header_end(b"PROXY TCP4 a b c d\r\nrest") == len(b"PROXY TCP4 a b c d\r\n")
    assert header_end(V2_SIGNATURE[:5]) is None
    assert header_end(v2_tcp4("1.2.3.4", 1)[:20]) is None
    assert header_end(v2_tcp4("1.2.3.4", 1) + b"x") == 28
    with pytest.raises(ValueError):
        header_end(b"HELO")


def test_prefix():
    assert is_proxied("haproxy:tcp:25") and is_proxied("HAPROXY:tls:465")
    assert not is_proxied("tcp:25")
    assert inner("haproxy:tls:465:interface=127.0.0.1") == "tls:465:interface=127.0.0.1"
    assert inner("tcp:25") == "tcp:25"
