"""Black-box tests of throughput (issue 12) against the real server."""

from __future__ import annotations

import subprocess

import pytest
from conftest import need

pytestmark = pytest.mark.blackbox


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:`port`, as the kernel
    reports it (`ss` shows it as Send-Q for a listening socket)."""
    out = subprocess.run(
        [need("ss"), "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "LISTEN", out
    return int(out[2])


def test_every_listener_takes_a_burst_of_connections(make_server):
    server = make_server(tls=True)
    pop3 = server.pop3_port
    # One listener with the operator's own backlog: it stands.
    server.config.write_text(
        server.config.read_text().replace(
            f"tcp:{pop3}:interface=127.0.0.1", f"tcp:{pop3}:interface=127.0.0.1:backlog=64"
        )
    )
    server.start()
    for port in (server.smtp_port, server.submission_port, server.smtps_port, server.pop3s_port):
        assert listen_backlog(port) == 1024
    assert listen_backlog(pop3) == 64
