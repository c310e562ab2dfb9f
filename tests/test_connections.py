"""Connection counts shared by worker processes (connections.Board)."""

from __future__ import annotations

import ipaddress
import os

import pytest

from mailboxd.connections import Board, ConnectionCount


@pytest.fixture
def boards():
    """Three processes' views of one board: the primary's and two children's."""
    primary = Board.create(3)
    views = [primary, Board(primary.fd, 3, 1), Board(primary.fd, 3, 2)]
    yield views
    os.close(primary.fd)


def test_the_cap_holds_for_all_processes_together(boards):
    counts = [ConnectionCount(3, board=b) for b in boards]
    assert counts[0].admit("192.0.2.1")
    assert counts[1].admit("192.0.2.1")
    assert counts[2].admit("192.0.2.1")
    assert not any(c.admit("192.0.2.1") for c in counts)  # three open, in three processes
    assert counts[0].admit("192.0.2.2")  # another address is counted apart
    counts[1].release("192.0.2.1")
    assert counts[2].admit("192.0.2.1")  # room again, whichever process takes it
    assert not counts[0].admit("192.0.2.1")


def test_the_same_address_written_another_way_is_the_same_address(boards):
    counts = [ConnectionCount(1, board=b) for b in boards]
    assert counts[0].admit("::ffff:192.0.2.1")
    assert not counts[1].admit("192.0.2.1")


def test_a_process_that_ended_leaves_nothing_counted(boards):
    counts = [ConnectionCount(2, board=b) for b in boards]
    assert counts[1].admit("192.0.2.1")
    assert counts[1].admit("192.0.2.1")
    assert not counts[0].admit("192.0.2.1")
    boards[0].clear(1)  # the primary, once child 1 has died
    assert counts[0].admit("192.0.2.1")
    assert counts[2].admit("192.0.2.1")
    assert not counts[2].admit("192.0.2.1")


def test_trusted_and_uncapped_connections_are_never_counted(boards):
    trusted = ConnectionCount(1, (ipaddress.ip_network("127.0.0.0/8"),), board=boards[0])
    for _ in range(3):
        assert trusted.admit("127.0.0.5")
        trusted.release("127.0.0.5")  # what was not counted takes nothing away
    other = ConnectionCount(1, board=boards[1])
    assert other.admit("127.0.0.5")
    assert not ConnectionCount(1, board=boards[2]).admit("127.0.0.5")
    uncapped = ConnectionCount(0, board=boards[0])
    assert all(uncapped.admit("192.0.2.9") for _ in range(100))


def test_a_release_never_takes_a_count_below_nothing(boards):
    count = ConnectionCount(1, board=boards[0])
    count.release("192.0.2.1")
    count.release("192.0.2.1")
    assert count.admit("192.0.2.1")
    assert not ConnectionCount(1, board=boards[1]).admit("192.0.2.1")


def test_ipv6_addresses_of_one_network_share_the_cap():
    from mailboxd.connections import ConnectionCount

    count = ConnectionCount(2, ipv6_prefix=64)
    assert count.admit("2001:db8:1:2::1") and count.admit("2001:db8:1:2::2")
    assert not count.admit("2001:db8:1:2:aaaa::3")  # the same /64: one client
    assert count.admit("2001:db8:1:3::1") and count.admit("192.0.2.1")
    count.release("2001:db8:1:2::1")
    assert count.admit("2001:db8:1:2::77")
