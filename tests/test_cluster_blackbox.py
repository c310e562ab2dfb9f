"""Black-box tests of two front ends sharing one mail directory and one state
store (issue 16): each a real server, named by `[state] node`, on its own
ports; on SQLite (one machine) and on a real Redis.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import time

import pytest
from conftest import ALICE, ALICE_PW, TWISTD, MailServer, ctl
from test_blackbox import Raw, wait_for
from test_outbound_blackbox import Capture, message, split_trace, subject_of, transaction
from test_relay_blackbox import smtp_from
from test_workers_blackbox import pop_pass

pytestmark = pytest.mark.blackbox

LEASE = 3  # seconds: a dead front end's entries pass on this long after


@pytest.fixture(params=["sqlite", "redis"])
def backend(request):
    return request.param


@pytest.fixture
def cluster(make_server, backend, tmp_path):
    """start(): front ends a and b, sharing a's mail directory, accounts and
    smarthost, with the state on SQLite or on a Redis of their own."""
    redis = None
    if backend == "redis":
        from redis_server import RedisServer

        redis = RedisServer(tmp_path).start()

    def config(node: str, first: MailServer | None) -> str:
        mailbox = "[mailbox]\ntrusted_networks =\n"
        state = f"[state]\nnode = {node}\nlease = {LEASE}\nbackend = {backend}\n"
        if redis is not None:
            state += f"redis_url = {redis.url}\n"
        relay = ""
        if first is not None:
            mailbox += (
                f"mail_dir = {first.mail_dir}\n"
                f"accounts = {first.accounts}\naliases = {first.aliases}\n"
            )
            relay = f"[relay]\nsmarthost = 127.0.0.1:{first.smarthost_port}\n"
        return mailbox + state + relay

    def start() -> tuple[MailServer, MailServer]:
        a = make_server(config("a", None), name="a").add_test_accounts().start()
        b = make_server(config("b", a), name="b").start()
        return a, b

    start.redis = redis  # type: ignore[attr-defined]
    yield start
    if redis is not None:
        redis.stop()


def test_a_pop3_login_on_one_front_end_authorises_relay_through_the_other(cluster):
    a, b = cluster()
    ip = "127.0.0.81"
    reply, p = pop_pass(a, ip, ALICE, ALICE_PW)
    assert reply.startswith("+OK"), reply
    p.send("QUIT\r\n")
    p.close()
    r = smtp_from(b, ip)
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<someone@far.test>\r\n")
    assert r.reply().startswith("250")
    assert r.reply().startswith("250"), "the POP3 login on a did not authorise relay on b"
    r.close()


def test_failures_on_both_block_on_both_and_an_unblock_on_one_frees_both(cluster):
    a, b = cluster()
    ip = "127.0.0.82"
    for server in (a, b):
        for _ in range(5):
            reply, p = pop_pass(server, ip, ALICE, "wrong")
            p.close()
    assert "Too many authorization failures" in reply, logs(a, b)  # the tenth, on b
    for server in (a, b):
        reply = pop_login(server, ip)
        assert "Too many authorization failures" in reply, (server.home.name, reply, logs(a, b))
    assert ip in ctl(a, "blocked", "list").stdout
    ctl(b, "blocked", "unblock", ip)
    assert ip not in ctl(a, "blocked", "list").stdout
    # One after the other: the mailbox's lock (with Redis, a lease) goes a
    # moment after the session that had it ends.
    for server in (a, b):
        assert wait_for(lambda: pop_login(server, ip).startswith("+OK")), logs(a, b)  # noqa: B023


def logs(*servers: MailServer) -> str:
    """The end of each server's log, for a failure's message."""
    return "\n".join(f"--- {s.home.name}\n{s.log()[-4000:]}" for s in servers)


def test_a_mailbox_open_on_one_front_end_is_locked_on_the_other(cluster):
    a, b = cluster()
    reply, held = pop_pass(a, "127.0.0.83", ALICE, ALICE_PW)
    assert reply.startswith("+OK"), reply
    reply, p = pop_pass(b, "127.0.0.84", ALICE, ALICE_PW)
    assert reply == "-ERR [IN-USE] Mailbox is locked by another session", reply
    p.close()
    held.send("QUIT\r\n")
    assert held.line().startswith("+OK")
    held.close()
    assert wait_for(lambda: pop_pass(b, "127.0.0.84", ALICE, ALICE_PW)[0].startswith("+OK"))


def pop_login(server: MailServer, ip: str) -> str:
    """The refusal of a right login from `ip` (at the greeting or at PASS), or its +OK."""
    r = Raw(server.pop3_port, source=ip)
    try:
        reply = r.line()
        if reply.startswith("+OK"):
            r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
            reply = r.line()
            reply = r.line() if reply.startswith("+OK") else reply
            r.send("QUIT\r\n")
        return reply
    finally:
        r.close()


def _relay(server: MailServer, subjects: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=15) as s:
        s.ehlo()
        s.auth("PLAIN", lambda challenge=None: f"\0{ALICE}\0{ALICE_PW}")
        for subject in subjects:
            transaction(s, ALICE, ["someone@far.test"], message(subject))


def _captured(capture: Capture) -> list[str]:
    return sorted(subject_of(split_trace(m["data"])[1]) for m in capture.messages())


def test_each_queue_entry_is_delivered_once_with_both_front_ends_running(cluster):
    a, b = cluster()
    capture = Capture(a.home, a.smarthost_port).start()
    try:
        subjects = [f"via {s.home.name} {i}" for s in (a, b) for i in range(10)]
        _relay(a, subjects[:10])
        _relay(b, subjects[10:])
        assert wait_for(lambda: len(capture.messages()) >= 20, timeout=30), a.log()
        time.sleep(2)  # a second delivery, by either, would show by now
        assert _captured(capture) == sorted(subjects)
    finally:
        capture.stop()


def test_a_front_end_killed_mid_delivery_hands_its_entry_to_the_other(cluster):
    a, b = cluster()
    capture = Capture(a.home, a.smarthost_port)
    capture.set_script("end hang\n")  # the data is sent, the answer never comes
    capture.start()
    try:
        _relay(a, ["handed on"])
        assert wait_for(lambda: "DATA" in capture.transcript(), timeout=20)
        a.stop(signal.SIGKILL)
        capture.set_script("")
        assert wait_for(lambda: _captured(capture) == ["handed on"], timeout=30), b.log()
        time.sleep(1)
        assert _captured(capture) == ["handed on"]
        assert "handed on" not in "".join(p.name for p in a.mail_dir.glob(".queue/*.json"))
    finally:
        capture.stop()


def test_a_second_front_end_with_a_name_in_use_is_refused(cluster, make_server, backend):
    a, _b = cluster()
    # The twin has its own mail directory: with Redis, only the store knows
    # the name is taken; with SQLite, the same store is the shared file.
    twin = make_server(name="twin")
    text = a.config.read_text()
    for port in ("smtp_port", "submission_port", "pop3_port"):
        text = text.replace(f":{getattr(a, port)}:", f":{getattr(twin, port)}:")
    if backend == "sqlite":
        text = text.replace("[mailbox]\n", "[mailbox]\nmail_dir = " + str(a.mail_dir) + "\n", 1)
    twin.config.write_text(text)
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"],
        cwd=twin.home,
        env=twin.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "in use" in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize("backend", ["redis"])
def test_redis_stopped_and_started_again_mid_run(cluster):
    a, b = cluster()
    redis = cluster.redis
    ip = "127.0.0.85"
    redis.stop()
    # Mail for a local mailbox needs no store.
    with smtplib.SMTP("127.0.0.1", a.smtp_port, timeout=15) as s:
        s.sendmail("x@far.test", [ALICE], b"Subject: during the outage\r\n\r\nhi\r\n")
    # What needs it is refused for a while, not accepted unchecked.
    reply = pop_login(b, ip)
    assert reply.startswith("-ERR [SYS/TEMP]"), reply
    r = smtp_from(a, ip)
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<someone@far.test>\r\n")
    first, second = r.reply(), r.reply()
    assert not second.startswith("250"), (first, second)
    assert second.startswith("451 4.3.0") or first.startswith("451"), (first, second)
    r.close()
    redis.start()
    assert wait_for(lambda: pop_login(b, ip).startswith("+OK"), timeout=20)
    r = smtp_from(a, ip)
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<someone@far.test>\r\n")
    assert r.reply().startswith("250")
    assert r.reply().startswith("250")
    r.close()
    assert a.log().count("state store unreachable") == 1, a.log()
    assert "state store reachable again" in a.log()
    assert len(a.messages(ALICE)) == 1
