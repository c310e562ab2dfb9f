"""LineProtocol's writes: straight to a plain TCP socket while it takes them
whole, through the transport (in order) from the first one it does not."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import TimeoutMixin
from zope.interface import directlyProvides

from mailboxd.lines import LineProtocol


class Echo(LineProtocol, TimeoutMixin):
    callLater = Clock().callLater

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(b"echo " + line)


class SocketTransport(StringTransport):
    """A transport over a real socket: what it is asked to write is kept
    (as StringTransport does), and getHandle gives the socket."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def connect(sock: socket.socket, tls: bool = False) -> tuple[Echo, SocketTransport]:
    transport = SocketTransport(sock)
    if tls:
        directlyProvides(transport, ISSLTransport)
    proto = Echo()
    proto.makeConnection(transport)
    return proto, transport


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_reply_goes_straight_to_the_socket(pair):
    ours, theirs = pair
    proto, transport = connect(ours)
    proto.dataReceived(b"one\r\ntwo\r\n")
    assert read_all(theirs) == b"echo one\r\necho two\r\n"
    assert transport.value() == b""


def test_what_the_socket_does_not_take_goes_through_the_transport_and_so_does_the_rest(pair):
    ours, theirs = pair
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    proto, transport = connect(ours)
    big = b"x" * (1 << 20)  # more than any socket buffer holds
    proto.write(big)
    direct = read_all(theirs)
    assert 0 < len(direct) < len(big)
    assert transport.value() == big[len(direct) :]
    # The socket has room again, yet the transport still holds unsent bytes:
    # what follows must queue behind them, not overtake them.
    proto.write(b"after\r\n")
    assert read_all(theirs) == b""
    assert transport.value() == big[len(direct) :] + b"after\r\n"


def test_a_broken_connection_is_left_to_the_transport_to_find(pair):
    ours, theirs = pair
    proto, transport = connect(ours)
    theirs.close()
    for _ in range(3):  # the first send after the peer closed may still succeed
        proto.write(b"hello\r\n")
    assert transport.value().endswith(b"hello\r\n")


def test_tls_writes_only_through_the_transport(pair):
    ours, theirs = pair
    proto, transport = connect(ours, tls=True)
    proto.dataReceived(b"one\r\n")
    assert read_all(theirs) == b""
    assert transport.value() == b"echo one\r\n"


def test_after_through_transport_nothing_goes_to_the_socket(pair):
    ours, theirs = pair
    proto, transport = connect(ours)
    proto.sendLine(b"before")
    proto.through_transport()  # e.g. STARTTLS, or a message streamed by a producer
    proto.sendLine(b"after")
    assert read_all(theirs) == b"before\r\n"
    assert transport.value() == b"after\r\n"


def test_hanging_up_sends_the_last_words_and_closes(pair):
    ours, theirs = pair
    proto, transport = connect(ours)
    proto.hang_up("221 bye")
    assert read_all(theirs) == b"221 bye\r\n"
    assert transport.disconnecting


def test_a_transport_with_no_socket_gets_every_write():
    proto = Echo()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"one\r\n")
    assert transport.value() == b"echo one\r\n"
