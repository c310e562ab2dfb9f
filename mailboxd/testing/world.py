"""The world's rules: how the remote side of relayed mail (the capture, see
capture.py) answers the server's outbound queue; `server.world.on(...)`."""

from __future__ import annotations

import attrs

from ..faults import Rule, Rules
from ..lines import SMTPReply

# Where a rule of the world's applies, as the capture sees the queue's session.
STAGES = ("connect", "MAIL", "RCPT", "DATA", "end-of-data")
_NAMES = {stage.lower(): stage for stage in STAGES}


@attrs.define
class World(Rules):
    """The rules of the world outside: the capture's answers to the queue.

    `stage` is where: `connect` (the greeting; `match` is on the client's
    address), `MAIL` (`match` on the sender), `RCPT` (on the recipient),
    `DATA` (the command) or `end-of-data` (the reply to the message: on any
    of the transaction's recipients, or its sender). The rest is as for
    `server.faults.on`: `reply` (an SMTP (code, text)) instead of the real
    answer, `drop=True` closes the connection without one, `delay` seconds
    of the server's clock first, `times` its first N matches.
    """

    def on(
        self,
        stage: str,
        *,
        match: str | None = None,
        reply: SMTPReply | None = None,
        drop: bool = False,
        delay: float = 0.0,
        times: int | None = None,
    ) -> Rule:
        name = _NAMES.get(stage.lower()) if isinstance(stage, str) else None
        if name is None:
            raise ValueError(f"world stage {stage!r}: expected one of {', '.join(STAGES)}")
        return self.add(name, match=match, reply=reply, drop=drop, delay=delay, times=times)
