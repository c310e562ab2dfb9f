"""Mailbox as a test fixture: a real server, in-process, for other projects' tests.

    from mailboxd.testing import MailServer

    with MailServer(domains=["example.test"]) as server:
        server.add_account("alice@example.test", "secret")
        ...  # send with smtplib to server.smtp_port, read with poplib on server.pop3_port
        message = server.wait_for_message(to="alice@example.test", subject="hello")

Twisted's reactor cannot be restarted, so one reactor runs in a background
thread for the life of the process; every MailServer starts and stops on it,
one after another or several at once. Listeners bind port 0 on 127.0.0.1, so
ports never collide (pytest-xdist workers included). Mail the server would
relay to other domains is captured (`server.outbound`) instead of leaving the
machine. Time is the server's own: `advance(seconds)` moves POP-before-SMTP
expiry, blocks, retries and timeouts forward.

The modules, each importing only those above it:

* api: what both kinds of server share (Message, OVERRIDES, ServerAPI)
* clock: the server's shifted clock
* world: the world's rules (`server.world.on`), how the world answers relayed mail
* capture: the SMTP receiver that stands in for the world
* inprocess: InProcessMailServer, on a reactor in a background thread
* trial: TwistedMailServer, on the test's own reactor
* control: the JSON-lines channel to a server in a child process
* child: that child (`python -m mailboxd.testing`)
* remote: RemoteMailServer, the parent's side of it
* web: the HTTP API and web page (`http=True`), with openapi.json and static/
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, overload

from .api import OVERRIDES, Message, ServerAPI
from .api import check_overrides as check_overrides
from .api import match_message as match_message
from .api import not_found as not_found
from .api import trusting_context as trusting_context
from .clock import ShiftedClock
from .inprocess import InProcessMailServer
from .remote import RemoteMailServer
from .trial import TwistedMailServer

__all__ = [
    "OVERRIDES",
    "InProcessMailServer",
    "MailServer",
    "Message",
    "RemoteMailServer",
    "ServerAPI",
    "ShiftedClock",
    "TwistedMailServer",
]


@overload
def MailServer(
    domains: Iterable[str] = ...,
    *,
    tls: bool = ...,
    http: bool | int = ...,
    process: Literal[False] = ...,
    **overrides: Any,
) -> InProcessMailServer: ...


@overload
def MailServer(
    domains: Iterable[str] = ...,
    *,
    tls: bool = ...,
    http: bool | int = ...,
    process: Literal[True],
    **overrides: Any,
) -> RemoteMailServer: ...


@overload
def MailServer(
    domains: Iterable[str] = ...,
    *,
    tls: bool = ...,
    http: bool | int = ...,
    process: bool,
    **overrides: Any,
) -> InProcessMailServer | RemoteMailServer: ...


def MailServer(
    domains: Iterable[str] = ("example.test",),
    *,
    tls: bool = False,
    http: bool | int = False,
    process: bool = False,
    **overrides: Any,
) -> InProcessMailServer | RemoteMailServer:
    """A real Mailbox server for a test, not yet started: an InProcessMailServer
    (this process, a reactor in a background thread), or with ``process=True``
    a RemoteMailServer (the same API, the server in a child process). Both are
    ServerAPIs; ``with MailServer(...) as server:`` starts and stops it.
    ``http=True`` also serves the HTTP API and web page (web.py) on a free
    127.0.0.1 port, ``server.http_port``; ``http=PORT`` on that port."""
    if process:
        return RemoteMailServer(domains, tls=tls, http=http, **overrides)
    return InProcessMailServer(domains, tls=tls, http=http, **overrides)
