"""Workers taking turns at a shared listening socket (mailboxd/turns.py)."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mailboxd.connections import Board, ConnectionCount
from mailboxd.turns import PAUSE, SLACK, Turns


class _Port:
    """What Turns asks of a port."""

    connected = True

    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


@pytest.fixture
def boards():
    primary = Board.create(2)
    yield primary, Board(primary.fd, 2, 1)


def test_each_process_counts_its_own_open_connections(boards):
    primary, child = boards
    ConnectionCount(0, board=primary).opened()
    for _ in range(3):
        ConnectionCount(0, board=child).opened()
    ConnectionCount(0, board=child).closed()
    assert primary.loads() == child.loads() == (1, 2)
    primary.clear(1)  # the child ended
    assert primary.loads() == (1, 0)


def _turns(board: Board, *ports: _Port) -> tuple[Turns, Clock]:
    clock = Clock()
    turns = Turns(board, clock)
    turns._ports.extend(ports)
    return turns, clock


def test_a_process_ahead_of_the_others_stops_accepting_for_a_moment(boards):
    primary, child = boards
    port, other = _Port(), _Port()
    turns, clock = _turns(primary, port, other)
    for _ in range(SLACK):
        primary.load(1)
        turns.accepted()
        assert port.reading  # within its share
    primary.load(1)
    turns.accepted()
    assert not port.reading and not other.reading
    turns.accepted()  # already paused: one pause at a time
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(PAUSE)
    assert port.reading and other.reading  # whatever the others did meanwhile


def test_a_process_no_further_ahead_than_the_slack_goes_on(boards):
    primary, child = boards
    port = _Port()
    turns, clock = _turns(primary, port)
    child.load(5)
    for _ in range(5 + SLACK):
        primary.load(1)
        turns.accepted()
    assert port.reading and clock.getDelayedCalls() == []


def test_a_process_does_not_pause_while_the_others_do(boards):
    primary, child = boards
    port, theirs = _Port(), _Port()
    turns, clock = _turns(primary, port)
    their_turns, their_clock = _turns(child, theirs)
    primary.load(SLACK + 1)
    turns.accepted()
    assert not port.reading  # the child takes the next ones
    child.load(2 * SLACK + 2)
    their_turns.accepted()
    assert theirs.reading  # ahead, but the primary is paused: someone must accept
    clock.advance(PAUSE)
    their_turns.accepted()
    assert not theirs.reading  # the primary accepts again: now the child may pause


def test_a_port_closed_while_paused_is_not_read_again(boards):
    primary, _ = boards
    port = _Port()
    turns, clock = _turns(primary, port)
    primary.load(SLACK + 1)
    turns.accepted()
    port.connected = False
    clock.advance(PAUSE)
    assert not port.reading


class _Recording(ServerFactory):
    protocol = Protocol

    def __init__(self) -> None:
        self.built = 0

    def buildProtocol(self, addr):
        self.built += 1
        return super().buildProtocol(addr)


def test_a_shared_port_accepts_one_connection_a_wake_up(boards):
    primary, _ = boards
    factory = _Recording()
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=MemoryReactorClock())
    port.startListening()
    Turns(primary, Clock()).share(port)
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
    try:
        port.doRead()
        port.doRead()
        assert factory.built == 2  # Twisted's own port would have taken all three
    finally:
        for c in clients:
            c.close()
        port.stopListening()


def test_only_twisteds_tcp_ports_take_turns(boards):
    primary, _ = boards
    turns = Turns(primary, Clock())
    port = _Port()
    turns.share(port)
    assert type(port) is _Port and turns._ports == []
