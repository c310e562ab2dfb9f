"""A line-based protocol base with bounded lines and a strict CRLF mode.

Twisted's LineReceiver would do most of this, but it dispatches every line of
a segment before a handler can stop it, accepts any delimiter mix-up the
peer sends, and only knows one maximum length. Here:

* a line is at most `max_line` octets (terminator included); a longer one is
  discarded up to its end and reported once with `lineTooLong()`;
* in strict mode only CRLF ends a line, so a bare CR or LF stays inside the
  line, where the protocol can see and refuse it (SMTP smuggling);
* a handler may return a Deferred: no further line is dispatched, and the
  transport is paused, until it fires (commands pipelined behind a slow one
  wait their turn);
* the protocol is its transport's streaming producer: while the replies the
  peer has not read fill the transport's buffer, no line is dispatched and
  nothing more is read, so a client that pipelines without reading costs a
  bounded amount of memory. `drained()` lets a long response (POP3 RETR)
  wait for room;
* on plain TCP, `write` hands a reply straight to the socket when it takes
  it whole. Twisted's transport.write always waits for the next turn of the
  reactor and wraps each reply in two epoll_ctl calls (watch for room, stop
  watching): at seven replies a message, that was a good part of the cost
  of a small message. The first reply the socket does not take whole goes
  to the transport, and from then on everything does, in order: the
  transport then does the flow control above.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

log = Logger()

# Input a session holds unhandled while it waits (for a slow command, or for
# the peer to read its replies) before it stops reading from the socket.
SMTPReply = tuple[int, str]  # an SMTP reply: its code and text
POP3Reply = str | bytes  # a POP3 reply: one line, or a whole multi-line response

HELD_INPUT_MAX = 65536
CLOSING_TIMEOUT = 30  # seconds a hung-up connection may take to go
PEER_NOT_READING = "peer not reading"  # a reason to pause: the transport's buffer is full


class DirectWrites:
    """`write` straight to the socket of a plain TCP transport, while the
    socket takes each write whole; the transport after that, and for good
    (see the module's docstring)."""

    transport: Any
    _socket: socket.socket | None = None  # where `write` may send directly; None: the transport

    def write_directly(self, transport: Any) -> None:
        """Send `write`s straight to `transport`'s socket, if it has a plain one."""
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket) and not ISSLTransport.providedBy(transport):
            self._socket = handle

    def write(self, data: bytes) -> None:
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # full (EAGAIN), or broken: the transport finds out which
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._socket = None
        self.transport.write(data)

    def through_transport(self) -> None:
        """From now on, write only through the transport (TLS, a stream
        written by a producer, the end of the connection)."""
        self._socket = None


@implementer(IHandshakeListener, IPushProducer)
class LineProtocol(DirectWrites, Protocol, TimeoutMixin):
    max_line = 512
    strict_crlf = False
    _buffer = b""
    _pos = 0
    _discarding = False
    _busy = False
    _closed = False  # hung up, or lost: no more lines are handled
    _reading_paused = False  # by _pause, on the transport
    known_errors: tuple[type[BaseException], ...] = ()
    # True from STARTTLS (or an implicit-TLS connect) until the handshake is
    # done: nothing can be said to the peer then, so a timeout aborts.
    tls_pending = False
    _pauses: set[str]
    _waiting_for_room: list[Deferred]
    peer_ip: str  # the client's address: each protocol sets it as it connects
    # What times the connection out (TimeoutMixin's timer, the closing
    # timeout): the factory's clock in both servers; None: the reactor.
    clock: IReactorTime | None = None

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        if self.clock is None:
            return super().callLater(period, func)
        return self.clock.callLater(period, func)

    def makeConnection(self, transport: Any) -> None:
        self._pauses = set()
        self._waiting_for_room = []
        self.write_directly(transport)
        transport.registerProducer(self, True)
        super().makeConnection(transport)

    _counted_in: Any = None  # the ConnectionCount this connection is counted in
    _opened_in: Any = None  # the ConnectionCount told this connection was opened

    def count_connection(self, connections: Any) -> bool:
        """Count this connection in `connections` (if any); False if it is one too many."""
        if connections is None:
            return True
        connections.opened()
        self._opened_in = connections
        if not connections.admit(self.peer_ip):
            return False
        self._counted_in = connections
        return True

    # --- flow control ---------------------------------------------------------

    def _pause(self, reason: str) -> None:
        self._pauses.add(reason)
        self._hold_input()

    def _hold_input(self) -> None:
        """While lines wait, stop reading once what waits passes HELD_INPUT_MAX.

        Not at once: most waits are short (a state lookup, an fsync), and
        stopping and starting a socket's reading costs two system calls. Not
        while a TLS handshake is under way either: no line can come before it
        ends, and it needs reading to end.
        """
        if (
            self._pauses
            and not self._reading_paused
            and not self._closed
            and not self.tls_pending
            and len(self._buffer) - self._pos >= HELD_INPUT_MAX
        ):
            self.transport.pauseProducing()
            self._reading_paused = True

    def _resume(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            self._go_on()

    def _go_on(self) -> None:
        if self._pauses or self._closed:
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self._process()

    def pauseProducing(self) -> None:
        """The transport's buffer is full: the peer is not reading our replies."""
        if self.tls_pending:
            # TLS holds what is written before its handshake is done and says
            # "pause"; reading must go on, or the handshake never ends.
            return
        self._pause(PEER_NOT_READING)

    def resumeProducing(self) -> None:
        self._pauses.discard(PEER_NOT_READING)
        # What waited for room writes now, and may fill the buffer again.
        waiting, self._waiting_for_room = self._waiting_for_room, []
        for d in waiting:
            d.callback(None)
        self._go_on()

    def stopProducing(self) -> None:
        self._closed = True

    @property
    def peer_reading(self) -> bool:
        return PEER_NOT_READING not in self._pauses

    def drained(self) -> Deferred:
        """Fires once the transport has room for more (at once if it has)."""
        if self.peer_reading or self._closed:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting_for_room.append(d)
        return d

    # --- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:  # hung up: what comes now is never handled, nor kept
            return
        # Consumed lines are dropped here, once per read, not once per line.
        self._buffer = self._buffer[self._pos :] + data
        self._pos = 0
        if self._pauses:
            self._hold_input()
        else:
            self._process()

    def _next_line(self) -> tuple[str, bytes] | None:
        """('line', content) or ('too_long', b''), or None if no full line yet."""
        sep = b"\r\n" if self.strict_crlf else b"\n"
        start = self._pos
        end = self._buffer.find(sep, start)
        if end < 0:
            if len(self._buffer) - start >= self.max_line and not self._discarding:
                self._discarding = True
            if self._discarding:
                # Keep a possible trailing CR so a CRLF split across reads is seen.
                self._buffer = b"\r" if self._buffer.endswith(b"\r") else b""
                self._pos = 0
            return None
        line = self._buffer[start:end]
        self._pos = end + len(sep)
        length = end - start + len(sep)
        if not self.strict_crlf and line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding or length > self.max_line:
            self._discarding = False
            return ("too_long", b"")
        return ("line", line)

    def _process(self) -> None:
        while not self._busy and not self._closed and self.peer_reading:
            item = self._next_line()
            if item is None:
                return
            kind, line = item
            try:
                result = self.lineTooLong() if kind == "too_long" else self.lineReceived(line)
            except Exception as e:
                self._failed(e)  # closes the session, or answers and goes on
                continue
            if isinstance(result, Deferred):
                self._wait(result)

    def _wait(self, d: Deferred) -> None:
        self._busy = True
        self._pause("handler")

        def done(_: Any) -> None:
            self._busy = False
            self._resume("handler")

        def failed(f: Any) -> None:
            self._failed(f.value, f)

        d.addErrback(failed).addBoth(done)

    def _failed(self, error: BaseException, failure: Any = None) -> None:
        if isinstance(error, self.known_errors):
            # An operator's problem with a clear message (e.g. the state store).
            log.error("{error}", error=str(error))
        else:
            log.failure("unhandled error in protocol handler", failure)
        self.internalError()

    def handshakeCompleted(self) -> None:
        self.tls_pending = False

    def hang_up(self, last_words: str) -> None:
        """Send a last line and close once it is written."""
        self.sendLine(last_words)
        self.through_transport()
        self._closed = True
        self.discard_input()
        # A peer that never reads the last words (or never finishes a TLS
        # handshake, or never sends TLS's close_notify) would hold a closing
        # connection for ever: past this, timeoutConnection aborts it.
        self.setTimeout(min(CLOSING_TIMEOUT, getattr(self, "timeOut", None) or CLOSING_TIMEOUT))
        if self._reading_paused:  # read on, to see the peer's end of the connection
            self._reading_paused = False
            self.transport.resumeProducing()
        # A producer still registered would keep a closing transport open.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        if self._closed:  # the last words never left: the TLS handshake never finished
            self.transport.abortConnection()
            return
        reading = self.peer_reading
        self.idle()
        # Nothing can reach a peer that never finished its handshake, or that
        # leaves its replies unread: waiting for them to leave would be for ever.
        if self.tls_pending or not reading:
            self.transport.abortConnection()

    def idle(self) -> None:
        """The peer was silent for too long: say so and close."""
        raise NotImplementedError

    def start_tls(self, context: Any) -> None:
        """Begin TLS (STARTTLS, STLS) after the reply that says so."""
        # RFC 3207 §4.2 and RFC 2595 §4: forget what was said in plaintext,
        # including anything pipelined behind the command (injection attacks).
        self.discard_input()
        self.tls_pending = True
        self.through_transport()
        self.transport.startTLS(context)
        # startTLS registers this producer again, behind TLS, unpaused: a
        # pause from before it would never be lifted.
        self._pauses.discard(PEER_NOT_READING)

    def discard_input(self) -> None:
        """Drop everything received but not yet handled (plaintext before TLS)."""
        self._buffer = b""
        self._pos = 0
        self._discarding = False

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self._socket = None
        if self._counted_in is not None:
            self._counted_in.release(self.peer_ip)
            self._counted_in = None
        if self._opened_in is not None:
            self._opened_in.closed()
            self._opened_in = None
        self._buffer = b""
        self._pos = 0
        waiting, self._waiting_for_room = self._waiting_for_room, []
        for d in waiting:
            d.callback(None)

    def sendLine(self, line: str | bytes) -> None:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.write(line + b"\r\n")

    def lineReceived(self, line: bytes) -> Deferred | None:
        raise NotImplementedError

    def lineTooLong(self) -> Deferred | None:
        raise NotImplementedError

    def internalError(self) -> None:
        """A handler failed: tell the peer and close, without a traceback."""
        raise NotImplementedError
