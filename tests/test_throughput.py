"""Throughput (issue 12) decisions that need no running server."""

from __future__ import annotations

import pytest

from mailboxd.service import DEFAULT_BACKLOG, with_backlog


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:25", f"tcp:25:backlog={DEFAULT_BACKLOG}"),
        ("tcp:2525:interface=127.0.0.1", f"tcp:2525:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        (r"tcp6:25:interface=\:\:", rf"tcp6:25:interface=\:\::backlog={DEFAULT_BACKLOG}"),
        ("tls:465", f"tls:465:backlog={DEFAULT_BACKLOG}"),
        ("unix:/run/mailbox.sock", f"unix:/run/mailbox.sock:backlog={DEFAULT_BACKLOG}"),
        ("tcp:25:backlog=64", "tcp:25:backlog=64"),  # the operator's choice stands
        ("tcp:backlog=64:port=25", "tcp:backlog=64:port=25"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # systemd's socket
    ],
)
def test_listeners_get_a_backlog_for_bursts_unless_they_name_one(description, expected):
    assert with_backlog(description) == expected
