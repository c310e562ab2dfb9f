"""A message filter that asks ClamAV (`clamd`) about each message over its
INSTREAM protocol, on TCP (`[filters] clamav = host:port`), and refuses what
it finds a virus in. Shipped with the package; a site may copy it into its
plugins folder as a starting point for its own filter.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import attrs
from twisted.internet import protocol
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP6ClientEndpoint, connectProtocol
from zope.interface import implementer

from mailboxd.filtering import FilterVerdict, IMessageFilter, Incoming, accept, reject

CHUNK = 64 * 1024
ANSWER_MAX = 4096  # clamd answers in a line; more than this is not clamd


class ClamdError(Exception):
    """clamd could not scan the message (its words, or ours)."""


class _Scan(protocol.Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.answer = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None  # connected
        self.transport.write(b"zINSTREAM\0")
        for i in range(0, len(self.data), CHUNK):
            chunk = self.data[i : i + CHUNK]
            self.transport.write(struct.pack(">I", len(chunk)) + chunk)
        self.transport.write(struct.pack(">I", 0))

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if (b"\0" in self.answer or len(self.answer) > ANSWER_MAX) and self.transport:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.answer.split(b"\0", 1)[0].decode("utf-8", "replace"))


def verdict_of(answer: str) -> FilterVerdict:
    """clamd's answer to INSTREAM as a FilterVerdict; ClamdError for an error."""
    if answer == "stream: OK":
        return accept()
    found = re.fullmatch(r"stream: (.+) FOUND", answer, re.DOTALL)
    if found:
        name = re.sub(r"[^\w.:/-]", "?", found[1])[:100]  # it goes to the client
        return reject(554, f"5.7.1 Virus found: {name}")
    raise ClamdError(answer or "no answer")


@implementer(IMessageFilter)
@attrs.frozen
class ClamAV:
    host: str
    port: int
    reactor: Any
    name: str = "clamav"
    blocking = False  # a class attribute, not a field

    def check(self, incoming: Incoming) -> Deferred:
        scan = _Scan(incoming.data)
        endpoint: Any
        if isIPv6Address(self.host):
            endpoint = TCP6ClientEndpoint(self.reactor, self.host, self.port, timeout=10)
        else:  # an IPv4 address or a name: HostnameEndpoint takes both
            endpoint = HostnameEndpoint(self.reactor, self.host, self.port, timeout=10)
        d = connectProtocol(endpoint, scan)
        d.addCallback(lambda _: scan.done)
        return d.addCallback(verdict_of)


def make_filters(config: Any, reactor: Any) -> list[ClamAV]:
    where = config.filters.clamav
    if not where:
        return []
    host, _, port = where.rpartition(":")
    return [ClamAV(host.strip("[]"), int(port), reactor)]
