"""Black-box tests of `[mailbox] workers = 2` (issue 12, item 1): the real
server as a primary and one child process on the same listeners.

Which process accepts a connection is the kernel's choice; a test that needs
a given one stops the other (SIGSTOP), so that only one accepts, and lets it
go on (SIGCONT) afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import subprocess
import threading
import time

import pytest
from conftest import ALICE, ALICE_PW, MailServer
from test_blackbox import Raw, wait_for
from test_outbound_blackbox import Capture, message, split_trace, subject_of, transaction
from test_relay_blackbox import pop_from, smtp_from, smtp_greeting

pytestmark = pytest.mark.blackbox

WORKERS = "[mailbox]\nworkers = 2\n"


def child_pid(server: MailServer) -> int:
    """The child's process id, from the primary's log (the latest start)."""
    assert wait_for(lambda: "worker 1 serving" in server.log(), timeout=20), server.log()
    return int(re.findall(r"worker 1 started \(process (\d+)\)", server.log())[-1])


@contextlib.contextmanager
def only(server: MailServer, who: str):
    """While inside, only the primary (`who="primary"`) or only the child
    (`who="child"`) accepts connections."""
    other = child_pid(server) if who == "primary" else server.proc.pid
    os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(other, signal.SIGCONT)


def pop_pass(server: MailServer, ip: str, user: str, password: str) -> tuple[str, object]:
    """USER/PASS from `ip`: the reply to PASS (or the refusal), and the session."""
    p = pop_from(server, ip)
    p.send(f"USER {user}\r\nPASS {password}\r\n")
    first = p.line()
    if not first.startswith("+OK"):
        return first, p
    return p.line(), p


def served_by_child(server: MailServer, text: str) -> bool:
    return any(text in line and "worker 1]" in line for line in server.log().splitlines())


def served_by_primary(server: MailServer, text: str) -> bool:
    return any(text in line and "worker 1]" not in line for line in server.log().splitlines())


@pytest.fixture
def workers(make_server):
    """start(extra): a server with two workers and the test accounts, not trusting loopback."""
    made: list[MailServer] = []

    def start(extra: str = "") -> MailServer:
        server = make_server(WORKERS + "trusted_networks =\n" + extra).add_test_accounts()
        made.append(server)
        server.start()
        child_pid(server)
        return server

    yield start
    for server in made:
        server.stop()
        server.check_log()


def test_failed_logins_in_both_workers_block_the_address_in_both(workers):
    server = workers()
    ip = "127.0.0.71"
    with only(server, "child"):
        for _ in range(5):
            reply, p = pop_pass(server, ip, ALICE, "wrong")
            assert reply.startswith("-ERR [AUTH]"), reply
            p.close()
    with only(server, "primary"):
        for _ in range(5):
            reply, p = pop_pass(server, ip, ALICE, "wrong")
            p.close()
        assert "Too many authorization failures" in reply  # the tenth: blocked
        r = smtp_greeting(server, ip)
        assert r.startswith("554"), r
    with only(server, "child"):
        r = smtp_greeting(server, ip)
        assert r.startswith("554"), r
    assert served_by_child(server, f"pop3 login failed for {ALICE} from {ip}")
    assert served_by_primary(server, f"pop3 login failed for {ALICE} from {ip}")


def test_a_pop3_login_in_one_worker_authorises_relay_in_the_other(workers):
    server = workers()
    ip = "127.0.0.72"
    with only(server, "child"):
        reply, p = pop_pass(server, ip, ALICE, ALICE_PW)
        assert reply.startswith("+OK"), reply
    # The session stays open while the child is stopped: its end writes the
    # state store, and a child stopped inside that write would hold the lock.
    with only(server, "primary"):
        r = smtp_from(server, ip)
        r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<someone@far.test>\r\n")
        assert r.reply().startswith("250")
        assert r.reply().startswith("250"), "the POP3 login did not authorise relay here"
        r.close()
    p.send("QUIT\r\n")
    assert p.line().startswith("+OK")
    p.close()


def test_a_mailbox_open_in_one_worker_is_locked_in_the_other(workers):
    server = workers()
    with only(server, "child"):
        reply, held = pop_pass(server, "127.0.0.73", ALICE, ALICE_PW)
        assert reply.startswith("+OK"), reply
    with only(server, "primary"):
        reply, p = pop_pass(server, "127.0.0.74", ALICE, ALICE_PW)
        assert reply == "-ERR [IN-USE] Mailbox is locked by another session", reply
        p.close()
    held.send("QUIT\r\n")
    assert held.line().startswith("+OK")
    held.close()


def test_what_a_child_queues_the_primary_delivers_once(workers):
    server = workers()
    capture = Capture(server.home, server.smarthost_port).start()
    try:
        subjects = [f"via the child {i}" for i in range(10)]
        with only(server, "child"):
            with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=15) as s:
                s.ehlo()
                s.auth("PLAIN", lambda challenge=None: f"\0{ALICE}\0{ALICE_PW}")
                for subject in subjects:
                    transaction(s, ALICE, ["someone@far.test"], message(subject))
        assert wait_for(lambda: len(capture.messages()) == 10, timeout=20), server.log()
        time.sleep(1)  # a second delivery would show by now
        got = sorted(subject_of(split_trace(m["data"])[1]) for m in capture.messages())
        assert got == sorted(subjects)
        assert served_by_child(server, "queued for ['someone@far.test']")
        assert not served_by_child(server, "delivered after attempt")
    finally:
        capture.stop()


def test_a_killed_worker_loses_nothing_acknowledged_and_is_started_again(workers):
    server = workers()
    first = child_pid(server)
    acknowledged: list[str] = []
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as s:
                    s.sendmail("a@far.test", [ALICE], f"Subject: load {i}\r\n\r\n{i}\r\n".encode())
                acknowledged.append(f"load {i}")
            except (smtplib.SMTPException, OSError):
                pass  # a session the kill cut: never acknowledged

    senders = [threading.Thread(target=send) for _ in range(3)]
    for t in senders:
        t.start()
    assert wait_for(lambda: len(acknowledged) >= 20, timeout=30)
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: len(acknowledged) >= 60, timeout=30)
    stop.set()
    for t in senders:
        t.join(30)
    assert wait_for(
        lambda: re.findall(r"worker 1 started \(process (\d+)\)", server.log())[-1] != str(first),
        timeout=20,
    ), server.log()
    stored = set()
    for path in server.messages(ALICE):
        for line in path.read_text().splitlines():
            if line.startswith("Subject: "):
                stored.add(line[9:])
    assert set(acknowledged) <= stored, set(acknowledged) - stored
    assert "worker 1 ended" in server.log()


def test_a_killed_primary_takes_its_workers_and_a_restart_works(make_server):
    server = make_server(WORKERS).add_test_accounts().start()
    child = child_pid(server)
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        for i in range(10):
            s.sendmail("a@far.test", [ALICE], f"Subject: {i}\r\n\r\n{i}\r\n".encode())
    server.stop(signal.SIGKILL)
    assert wait_for(lambda: not _running(child), timeout=15)  # its stdin closed: it stops
    assert len(server.messages(ALICE)) == 10
    server.start()  # the lock is free again once the worker is gone
    assert wait_for(lambda: server.log().count("worker 1 serving") == 2, timeout=20)
    assert child_pid(server) != child
    server.stop()
    assert not _running(child)


def test_sigterm_stops_every_worker(make_server):
    server = make_server(WORKERS).add_test_accounts().start()
    child = child_pid(server)
    server.stop()
    assert not _running(child)
    assert "Server Shut Down." in server.log()


def _running(pid: int) -> bool:
    done = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return bool(done.stdout.strip()) and not done.stdout.strip().startswith("Z")


def test_a_worker_that_cannot_start_is_tried_less_and_less_often(workers):
    server = workers()
    kept = server.accounts.read_text()
    server.accounts.unlink()
    server.accounts.mkdir()  # an operator's mistake: the primary keeps its accounts
    os.kill(child_pid(server), signal.SIGKILL)
    assert wait_for(lambda: "starting it again in 4s" in server.log(), timeout=20), server.log()
    assert "cannot read it: Is a directory" in server.log()  # the child's line, via the primary
    assert "starting it again in 1s" in server.log() and "in 2s" in server.log()
    server.accounts.rmdir()
    server.accounts.write_text(kept)
    assert wait_for(lambda: server.log().count("worker 1 serving") == 2, timeout=20)


def test_a_worker_started_again_serves_with_the_primary_s_config(workers):
    server = workers()
    with only(server, "child"):
        assert "250-SIZE 1000000" in ehlo(server)
    # Edited, and not yet in force: the primary reads its config at start only.
    server.config.write_text(server.config.read_text().replace("1000000", "2000"))
    os.kill(child_pid(server), signal.SIGKILL)
    assert wait_for(lambda: server.log().count("worker 1 serving") == 2, timeout=20)
    with only(server, "child"):
        assert "250-SIZE 1000000" in ehlo(server)


def ehlo(server: MailServer) -> str:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        code, text = s.ehlo("client.far.test")
        return "\n".join(f"{code}-{line}" for line in text.decode().splitlines())


def test_the_connection_cap_counts_the_connections_of_every_worker(workers):
    server = workers("[limits]\nconnections_per_ip = 2\n")
    ip = "127.0.0.74"
    ended = 0  # connections from `ip` that have ended

    def probe() -> str:
        nonlocal ended
        ended += 1
        return smtp_greeting(server, ip)

    def settled() -> None:
        """Wait until every process has seen every connection that ended end
        (each says so in the primary's log; so not while one is stopped),
        so that a process stopped next counts none of them."""
        assert wait_for(lambda: server.log().count(f"smtp session from {ip} ") >= ended)

    with only(server, "primary"):
        first = smtp_from(server, ip)
    with only(server, "child"):
        second = smtp_from(server, ip)
        assert probe().startswith("421 4.7.0 Too many connections")
    with only(server, "primary"):
        assert probe().startswith("421 4.7.0 Too many connections")
    second.close()  # held by the child
    ended += 1
    settled()
    with only(server, "primary"):
        assert probe().startswith("220 ")  # the child's close freed room here
    first.close()
    ended += 1
    settled()
    # A worker that dies takes its connections with it, and their count.
    with only(server, "child"):
        held = [smtp_from(server, ip), smtp_from(server, ip)]
        assert probe().startswith("421 ")
    os.kill(child_pid(server), signal.SIGKILL)
    assert wait_for(lambda: server.log().count("worker 1 serving") == 2, timeout=20)
    with only(server, "primary"):
        assert probe().startswith("220 ")
    for r in held:
        r.close()


def test_connections_that_come_at_once_are_shared_by_the_workers(workers):
    # All twenty are waiting before either process accepts: without taking
    # turns (mailboxd/turns.py) the first to wake could take them all.
    server = workers()
    # Sharing is measured between two idle processes: just started, the
    # primary is still busy a moment (its start-up, and the log lines of the
    # child's, which it writes), and took a fifth or less of them then.
    time.sleep(1.0)
    clients = [Raw(server.smtp_port, source=f"127.0.1.{n}") for n in range(1, 21)]
    try:
        assert all(c.line().startswith("220 ") for c in clients)
        for c in clients:
            c.send("QUIT\r\n")
        assert all(c.line().startswith("221 ") for c in clients)
    finally:
        for c in clients:
            c.close()
    sessions = "smtp session from 127.0.1."
    assert wait_for(lambda: server.log().count(sessions) == 20, timeout=20), server.log()
    in_child = sum(sessions in line and "worker 1]" in line for line in server.log().splitlines())
    assert 4 <= in_child <= 16, in_child
