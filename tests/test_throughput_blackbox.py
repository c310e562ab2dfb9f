"""Black-box tests of throughput (issue 12) against the real server."""

from __future__ import annotations

import os
import poplib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, need

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


def pop_listing(server, user: str, password: str) -> tuple[list[str], list[str], list[int]]:
    """LIST and UIDL of one session, and the octets RETR sends for each."""
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=15)
    try:
        p.user(user)
        p.pass_(password)
        sizes = [line.decode() for line in p.list()[1]]
        uids = [line.decode() for line in p.uidl()[1]]
        sent = []
        for line in sizes:
            number = int(line.split()[0])
            _, lines, _ = p.retr(number)
            sent.append(sum(len(x) + 2 for x in lines))  # as sent, less the stuffing
        return sizes, uids, sent
    finally:
        p.quit()


def settle(maildir: Path, ago: int) -> None:
    for d in ("new", "cur"):
        os.utime(maildir / d, (time.time() - ago,) * 2)


def test_pop3_follows_a_maildir_other_programs_change(make_server):
    server = make_server().add_test_accounts()
    server.start()
    box = server.maildir(ALICE)
    for d in ("new", "cur", "tmp"):
        (box / d).mkdir(parents=True, exist_ok=True)
    # Delivered by another program: no sizes in the names.
    (box / "new" / "1.A.other").write_bytes(b"Subject: one\n\nfirst\n")
    (box / "new" / "2.B.other").write_bytes(b"Subject: two\n\nsecond\n")
    (box / "cur" / "3.C.other:2,S").write_bytes(b"Subject: three\n\n.dot\nthird\n")
    settle(box, 60)
    first = pop_listing(server, ALICE, ALICE_PW)
    assert first[0] == ["1 23", "2 24", "3 31"]
    assert first[1] == ["1 1.A.other", "2 2.B.other", "3 3.C.other"]
    assert first[2] == [23, 24, 31]  # what LIST says is what RETR sends
    assert (box / "mailbox-sizes").exists()
    assert pop_listing(server, ALICE, ALICE_PW) == first  # unchanged, from the kept listing

    # Behind its back: one read and flagged (new/ to cur/), one removed, one added.
    (box / "new" / "1.A.other").rename(box / "cur" / "1.A.other:2,S")
    (box / "cur" / "3.C.other:2,S").unlink()
    (box / "new" / "4.D.other").write_bytes(b"Subject: four\n\nfourth\n")
    settle(box, 30)
    sizes, uids, sent = pop_listing(server, ALICE, ALICE_PW)
    assert sizes == ["1 23", "2 24", "3 25"]
    assert uids == ["1 1.A.other", "2 2.B.other", "3 4.D.other"]
    assert sent == [23, 24, 25]
    server.check_log()
