"""Worker processes taking turns at the listening sockets they share.

The kernel wakes every worker when a connection comes to a shared socket,
and whichever runs first accepts; Twisted's port then accepts as many more
as are waiting, up to a number it raises while that keeps working. So when
many connections come at once (a client opening all its sessions, every
mail client of an office after an outage), the first process to wake can
take them all, and its core carries them for as long as they last while the
others idle: `smtp-source -d -s 20` against two workers found all 20 in one.

Here each worker accepts one connection a wake-up, and a worker that has
more connections open than the least busy one, plus SLACK, stops accepting
for PAUSE seconds, so that the others take the next ones (nginx's
accept_disabled works the same way), unless no other is accepting then. The kernel still decides who gets
which connection; none waits more than PAUSE longer than it would have. A
busier process holds its connections longer, so it takes fewer new ones.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import tcp

from .connections import Board

SLACK = 2  # connections a worker may hold above the least busy one before it pauses
PAUSE = 0.005  # seconds a worker that holds more than its share stops accepting


class _OneAtATime(tcp.Port):
    """A port of Twisted's that accepts one connection a wake-up, then asks
    its `Turns` whether to go on accepting."""

    turns: Turns

    def doRead(self) -> None:
        self.numberAccepts = 1  # Twisted raises it after each full round; not here
        super().doRead()
        self.turns.accepted()


@attrs.define(eq=False)
class Turns:
    board: Board  # each process's open connections: Board.loads
    clock: Any
    _ports: list[Any] = attrs.field(factory=list)
    _resume: Any = None  # the call that starts accepting again, while paused

    def share(self, port: Any) -> None:
        """Take turns at `port` (a TCP port of Twisted's; others are left be)."""
        if type(port) is tcp.Port:
            # Its class, not a copy: the reactor and the endpoint hold this
            # very object. _OneAtATime adds one method and no state.
            taking_turns: Any = port
            taking_turns.__class__ = _OneAtATime
            taking_turns.turns = self
            self._ports.append(port)

    def accepted(self) -> None:
        if self._resume is not None:
            return
        loads = self.board.loads()
        # Never all at once: while one pauses, the others must take its share.
        if loads[self.board.column] > min(loads) + SLACK and self.board.others_accepting():
            self.board.pause(True)
            for port in self._ports:
                port.stopReading()
            self._resume = self.clock.callLater(PAUSE, self._go_on)

    def _go_on(self) -> None:
        self._resume = None
        self.board.pause(False)
        for port in self._ports:
            if port.connected:  # not closed meanwhile
                port.startReading()
