"""Open connections per client address, across every listener and every
worker process, and their cap."""

from __future__ import annotations

import collections
import mmap
import os
import tempfile
import zlib

import attrs

from .config import IPNetwork
from .policy import is_trusted
from .state import client_key

BOARD_SLOTS = 1 << 18  # addresses hash to this many slots; a sparse table, pages made as touched
_CELL_MAX = 0xFFFF


class Board:
    """What every worker process has open, per address, for the others to
    see: a table in memory the processes share (a memfd the primary makes
    and hands to its children), one column per process.

    Each process writes only its own column, and only from its reactor
    thread, so no lock is needed and nothing waits: a check reads the other
    columns. Two connections from one address at the same instant in two
    processes may both pass, so the cap holds to within the number of
    processes less one. Addresses that share a slot count together there
    (one in tens of thousands), which can only make the cap stricter.
    """

    def __init__(self, fd: int, processes: int, column: int) -> None:
        self.fd = fd
        self.processes = processes
        self.column = column
        self._map = mmap.mmap(fd, _board_size(processes))
        self._cells = memoryview(self._map).cast("H")
        self._blocks = BOARD_SLOTS * processes  # then one cell a process: see blocks_set
        self._loads = self._blocks + processes  # and one more each: see loads
        self._paused = self._loads + processes  # and another: see pause

    @classmethod
    def create(cls, processes: int) -> Board:
        """A new, empty board, as the primary's (column 0)."""
        try:
            fd = os.memfd_create("mailbox-connections")
        except (AttributeError, OSError):  # not Linux: an unlinked file does as well
            f = tempfile.TemporaryFile()  # noqa: SIM115 - the board keeps the descriptor
            fd = os.dup(f.fileno())
            f.close()
        os.ftruncate(fd, _board_size(processes))
        return cls(fd, processes, 0)

    def _base(self, key: str) -> int:
        return (zlib.crc32(key.encode()) % BOARD_SLOTS) * self.processes

    def others(self, key: str) -> int:
        """Connections from `key` open in the other processes."""
        base = self._base(key)
        cells = self._cells
        return sum(cells[base : base + self.processes]) - cells[base + self.column]

    def add(self, key: str, n: int) -> None:
        i = self._base(key) + self.column
        self._cells[i] = min(_CELL_MAX, max(0, self._cells[i] + n))

    def clear(self, column: int) -> None:
        """Forget what a process that ended had open (its connections went with it)."""
        self._cells[column :: self.processes] = memoryview(bytes(2 * _ROWS)).cast("H")

    def load(self, n: int) -> None:
        """This process has `n` more connections open (fewer, if negative)."""
        i = self._loads + self.column
        self._cells[i] = min(_CELL_MAX, max(0, self._cells[i] + n))

    def loads(self) -> tuple[int, ...]:
        """The connections each process has open, all addresses together."""
        return tuple(self._cells[self._loads : self._loads + self.processes])

    def pause(self, paused: bool) -> None:
        """Tell the others whether this process has stopped accepting (see turns.py)."""
        self._cells[self._paused + self.column] = int(paused)

    def others_accepting(self) -> bool:
        """Whether another process is accepting connections now."""
        flags = self._cells[self._paused : self._paused + self.processes]
        return any(not flag for i, flag in enumerate(flags) if i != self.column)

    def block_set(self) -> None:
        """Tell the others that this process has just set a block (see Guard)."""
        i = self._blocks + self.column
        self._cells[i] = (self._cells[i] + 1) & _CELL_MAX

    def blocks_set(self) -> tuple[int, ...]:
        """Changes whenever any process has set a block."""
        return tuple(self._cells[self._blocks : self._blocks + self.processes])


_ROWS = BOARD_SLOTS + 3  # a process's cells: its slots, and its blocks, load and paused cells


def _board_size(processes: int) -> int:
    return _ROWS * processes * 2


@attrs.define
class ConnectionCount:
    """At most `cap` connections at once from one address (0: no cap), in
    all processes together when there is a `board`; trusted networks are not
    counted."""

    cap: int
    trusted_networks: tuple[IPNetwork, ...] = ()
    board: Board | None = None
    ipv6_prefix: int = 128  # IPv6 clients are counted by network (client_key)
    _open: collections.Counter = attrs.field(init=False, factory=collections.Counter)

    def opened(self) -> None:
        """A connection has come, from any address (for `Board.loads`)."""
        if self.board is not None:
            self.board.load(1)

    def closed(self) -> None:
        """A connection that `opened` counted has gone."""
        if self.board is not None:
            self.board.load(-1)

    def admit(self, ip: str) -> bool:
        """Count a new connection from `ip`; False (not counted) if it is one too many."""
        if self.cap <= 0 or is_trusted(ip, self.trusted_networks):
            return True
        key = client_key(ip, self.ipv6_prefix)
        here = self._open[key]
        elsewhere = self.board.others(key) if self.board is not None else 0
        if here + elsewhere >= self.cap:
            return False
        self._open[key] = here + 1
        if self.board is not None:
            self.board.add(key, 1)
        return True

    def release(self, ip: str) -> None:
        """A connection `admit` counted has closed."""
        key = client_key(ip, self.ipv6_prefix)
        here = self._open.get(key, 0)
        if here == 0:  # never counted: trusted, or no cap
            return
        if here == 1:
            del self._open[key]
        else:
            self._open[key] = here - 1
        if self.board is not None:
            self.board.add(key, -1)
