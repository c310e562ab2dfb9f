"""Black-box relay tests: the real twistd process seen from several loopback addresses.

Linux routes all of 127.0.0.0/8 to the loopback interface, so a client can bind
127.0.0.2, 127.0.0.3, ... as its source address and look like a different host.
The servers here run with ``trusted_networks`` empty, so no loopback client is
trusted: only AUTH or POP-before-SMTP lets one relay. Nothing is ever sent
outside 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import MAILBOXCTL, TWISTD, MailServer, ctl, need, tool_env
from test_blackbox import Raw, wait_for

ALICE = "alice@example.test"
ALICE_PW = "alice pw"
BOB = "bob@other.test"
BOB_PW = "bob pw"
FAR = "x@far.test"


def refusal(ip: str) -> str:
    return (
        f"Connection refused from {ip}. "
        "Too many authorization failures from this IP, try again later."
    )


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


# --- servers --------------------------------------------------------------------


def queue(server: MailServer) -> list[tuple[dict, bytes]]:
    """The outbound queue: (envelope, message bytes) per entry."""
    q = server.mail_dir / ".queue"
    if not q.is_dir():
        return []
    return [
        (json.loads(p.read_text()), p.with_suffix(".msg").read_bytes())
        for p in sorted(q.glob("*.json"))
    ]


def queue_files(server: MailServer) -> list[str]:
    q = server.mail_dir / ".queue"
    return sorted(p.name for p in q.iterdir()) if q.is_dir() else []


# --- raw protocol helpers ---------------------------------------------------------


def smtp_from(server: MailServer, source: str, port: int | None = None) -> Raw:
    """An SMTP session from `source`, greeted and past EHLO."""
    r = Raw(port or server.smtp_port, source=source)
    greeting = r.reply()
    assert greeting.startswith("220 "), greeting
    r.send("EHLO client.far.test\r\n")
    assert r.reply().startswith("250 ")
    return r


def smtp_greeting(server: MailServer, source: str) -> str:
    r = Raw(server.smtp_port, source=source)
    try:
        return r.line()
    finally:
        r.close()


def pop_from(server: MailServer, source: str) -> Raw:
    r = Raw(server.pop3_port, source=source)
    greeting = r.line()
    assert greeting.startswith("+OK"), greeting
    return r


def pop_login_from(
    server: MailServer, source: str, user: str = ALICE, password: str = ALICE_PW
) -> None:
    """A whole POP3 session from `source`: login, QUIT, and wait for the close."""
    r = pop_from(server, source)
    r.send(f"USER {user}\r\n")
    assert r.line().startswith("+OK")
    r.send(f"PASS {password}\r\n")
    reply = r.line()
    assert reply.startswith("+OK"), reply
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()
    r.close()


def rcpt_from(
    server: MailServer,
    source: str,
    rcpt: str = FAR,
    sender: str = ALICE,
    port: int | None = None,
) -> str:
    """The reply to RCPT TO:<rcpt> in an unauthenticated session from `source`."""
    r = smtp_from(server, source, port)
    try:
        r.send(f"MAIL FROM:<{sender}>\r\n")
        reply = r.reply()
        assert reply.startswith("250"), reply
        r.send(f"RCPT TO:<{rcpt}>\r\n")
        return r.reply()
    finally:
        r.close()


def relay_denied(rcpt: str = FAR) -> str:
    return f"554 5.7.1 <{rcpt}>: Relay access denied"


def smtp_send_from(server: MailServer, source: str, rcpt: str, subject: str) -> str:
    """Send a message over a raw session from `source`; the final reply."""
    r = smtp_from(server, source)
    try:
        for line in (f"MAIL FROM:<{ALICE}>", f"RCPT TO:<{rcpt}>", "DATA"):
            r.send(line + "\r\n")
            reply = r.reply()
            if not reply.startswith(("250", "354")):
                return reply
        r.send(f"Subject: {subject}\r\nFrom: {ALICE}\r\n\r\nbody\r\n.\r\n")
        return r.reply()
    finally:
        r.close()


# --- 1. POP-before-SMTP authorises exactly the IP that logged in ------------------


def test_pop_login_authorises_only_its_own_ip(untrusted):
    server = untrusted()
    # Before any POP3 login nobody may relay, not even the IP that will log in.
    assert rcpt_from(server, "127.0.0.2") == relay_denied()

    pop_login_from(server, "127.0.0.2")

    with smtplib.SMTP(
        "127.0.0.1",
        server.smtp_port,
        local_hostname="client.far.test",
        source_address=("127.0.0.2", 0),
        timeout=10,
    ) as s:
        refused = s.sendmail(ALICE, [FAR], b"Subject: pop before smtp\r\n\r\nhello far\r\n")
    assert refused == {}
    [(envelope, message)] = queue(server)
    assert envelope["version"] == 1
    assert envelope["sender"] == ALICE
    assert [r["address"] for r in envelope["recipients"]] == [FAR]
    assert envelope["client"] == "127.0.0.2"
    assert envelope["account"] is None  # POP-authorised, not authenticated
    assert message.startswith(f"Return-Path: <{ALICE}>\n".encode())
    relayed = message[envelope["offset"] :]
    assert relayed.startswith(b"Received: from client.far.test ([127.0.0.2])\n"), relayed
    assert b" with ESMTP id " in relayed  # not ESMTPA: no AUTH in this session
    assert relayed.endswith(b"\nhello far\n")

    # Another address on the same host is another client: refused, nothing queued.
    assert rcpt_from(server, "127.0.0.3") == relay_denied()
    with smtplib.SMTP(
        "127.0.0.1", server.smtp_port, source_address=("127.0.0.3", 0), timeout=10
    ) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail(ALICE, [FAR], b"Subject: not from 3\r\n\r\nno\r\n")
        assert e.value.recipients[FAR] == (554, b"5.7.1 <x@far.test>: Relay access denied")
        # ... but it may still deliver to local users, as anyone may.
        assert s.sendmail("y@far.test", [ALICE], b"Subject: in\r\n\r\nlocal\r\n") == {}
    assert len(queue(server)) == 1
    assert len(server.messages(ALICE)) == 1

    # On the submission port, the POP authorisation counts as well.
    assert rcpt_from(server, "127.0.0.2", port=server.submission_port) == "250 2.1.5 Ok"
    assert (
        rcpt_from(server, "127.0.0.3", port=server.submission_port)
        == "530 5.7.0 Authentication required"
    )

    # The POP authorisation carries the account's domain for the sender check,
    # made at RCPT for what it relays (issue 10: local mail stays open to all).
    assert rcpt_from(server, "127.0.0.2", sender="alice@example.org") == "250 2.1.5 Ok"
    r = smtp_from(server, "127.0.0.2")
    r.send(f"MAIL FROM:<{BOB}>\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    r.send(f"RCPT TO:<{FAR}>\r\n")
    assert r.reply() == f"553 5.1.0 <{BOB}> sender rejected"
    r.send(f"RCPT TO:<{ALICE}>\r\n")
    assert r.reply() == "250 2.1.5 Ok"
    r.close()


def test_pop_authorisation_expires_and_is_refreshed_at_session_end(untrusted):
    server = untrusted("[relay]\npop_before_smtp_ttl = 2\n")
    r = pop_from(server, "127.0.0.2")
    r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert r.line().startswith("+OK")
    assert r.line().startswith("+OK")
    assert rcpt_from(server, "127.0.0.2") == "250 2.1.5 Ok"
    time.sleep(2.3)  # the login's authorisation runs out while the session idles
    assert rcpt_from(server, "127.0.0.2") == relay_denied()
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()
    # The end of the session authorised the IP afresh.
    assert rcpt_from(server, "127.0.0.2") == "250 2.1.5 Ok"
    time.sleep(2.3)
    assert rcpt_from(server, "127.0.0.2") == relay_denied()


def test_trusted_networks_relay_without_auth_and_skip_the_sender_check(make_server):
    server = make_server()
    text = server.config.read_text()
    server.config.write_text(
        text.replace("\n[smtp]\n", "\ntrusted_networks = 127.0.0.2/32\n[smtp]\n", 1)
    )
    server.add_user(ALICE, ALICE_PW)
    server.start()
    assert rcpt_from(server, "127.0.0.2", sender=BOB) == "250 2.1.5 Ok"
    assert rcpt_from(server, "127.0.0.2", port=server.submission_port) == "250 2.1.5 Ok"
    r = smtp_from(server, "127.0.0.2")
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\nMAIL FROM:<{BOB}>\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    assert r.reply() == "250 2.1.0 Ok"  # trusted networks are exempt
    r.close()
    assert rcpt_from(server, "127.0.0.3") == relay_denied()
    assert rcpt_from(server, "127.0.0.1") == relay_denied()


# --- 2. state survives a restart; mailboxctl changes it live -----------------------


def fail_pop(server: MailServer, source: str, count: int, password: str = "wrong") -> Raw:
    """`count` failed USER/PASS logins on one POP3 connection; returns it (open)."""
    r = pop_from(server, source)
    for _ in range(count):
        r.send(f"USER {ALICE}\r\nPASS {password}\r\n")
        assert r.line().startswith("+OK")
        reply = r.line()
        assert reply.startswith("-ERR [AUTH] Authentication failed"), reply
    return r


def test_restart_keeps_state_and_mailboxctl_changes_it_live(untrusted):
    server = untrusted()
    pop_login_from(server, "127.0.0.2")
    r = fail_pop(server, "127.0.0.4", 10)
    assert r.closed()  # the tenth failure ended the session
    assert smtp_greeting(server, "127.0.0.4") == "554 5.7.1 " + refusal("127.0.0.4")

    server.stop()
    server.start()

    # Both survived the restart.
    assert smtp_greeting(server, "127.0.0.4") == "554 5.7.1 " + refusal("127.0.0.4")
    r = Raw(server.pop3_port, source="127.0.0.4")
    assert r.line() == "-ERR [SYS/TEMP] " + refusal("127.0.0.4")
    assert r.closed()
    assert rcpt_from(server, "127.0.0.2") == "250 2.1.5 Ok"
    assert smtp_send_from(server, "127.0.0.2", FAR, "after restart").startswith("250 ")
    assert [e["client"] for e, _ in queue(server)] == ["127.0.0.2"]

    listed = ctl(server, "blocked", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["127.0.0.4"], listed
    pops = ctl(server, "popauth", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in pops] == ["127.0.0.2"], pops
    assert pops[0].split("\t")[-1] == "domains example.test", pops

    # Unblock: the running server lets the IP in again at once.
    assert ctl(server, "blocked", "unblock", "127.0.0.4").stdout.strip() == "unblocked 127.0.0.4"
    assert wait_for(lambda: smtp_greeting(server, "127.0.0.4").startswith("220 "), timeout=2)
    pop_from(server, "127.0.0.4").close()
    assert wait_for(lambda: "unblocked 127.0.0.4" in server.log(), timeout=5), server.log()
    assert ctl(server, "blocked", "list").stdout == ""
    # The unblock also forgot the old failures: one more is just one failure.
    r = fail_pop(server, "127.0.0.4", 1)
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert smtp_greeting(server, "127.0.0.4").startswith("220 ")
    # Issue 10: unblocking an IP with failures but no block clears them, and says so.
    proc = ctl(server, "blocked", "unblock", "127.0.0.4")
    assert proc.stdout.strip() == "127.0.0.4 is not blocked; cleared its 1 failed logins"
    proc = ctl(server, "blocked", "unblock", "127.0.0.4", ok=(1,))
    assert "127.0.0.4 is not blocked" in proc.stderr

    # Revoke: relaying from that IP is refused again, without a restart.
    assert ctl(server, "popauth", "revoke", "127.0.0.2").stdout.strip() == "revoked 127.0.0.2"
    assert rcpt_from(server, "127.0.0.2") == relay_denied()
    assert ctl(server, "popauth", "list").stdout == ""
    assert wait_for(lambda: "POP-before-SMTP authorisation of 127.0.0.2" in server.log())
    assert len(queue(server)) == 1


# --- 3. the guard: ten failures across both protocols block an IP -----------------


def fail_smtp(server: MailServer, source: str) -> Raw:
    """Five SMTP AUTH failures of different kinds on one session; returns it (open)."""
    r = smtp_from(server, source)
    for lines in (
        [f"AUTH PLAIN {plain(ALICE, 'wrong')}"],
        ["AUTH PLAIN", plain("nobody@example.test", "x")],
        ["AUTH LOGIN", b64(ALICE), b64("wrong")],
        [f"AUTH LOGIN {b64(BOB)}", b64("wrong")],
        [f"AUTH PLAIN {plain(ALICE, ALICE_PW, authzid=BOB)}"],  # acting for another
    ):
        for line in lines:
            r.send(line + "\r\n")
            reply = r.reply()
        assert reply == "535 5.7.8 Authentication credentials invalid", (lines, reply)
    return r


@pytest.mark.parametrize("last", ["smtp", "pop3"])
def test_ten_failures_block_on_both_protocols(untrusted, last):
    server = untrusted()
    ip = "127.0.0.5"
    fail_smtp(server, ip).close()  # 5
    r = fail_pop(server, ip, 3)  # 8
    r.send(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\n")  # 9: SASL on POP3 counts too
    assert r.line() == "-ERR [AUTH] Authentication failed"
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()

    # Nine failures do not block: new sessions are greeted on both protocols.
    early_smtp = smtp_from(server, ip)
    early_pop = pop_from(server, ip)
    early_pop.send(f"USER {ALICE}\r\n")
    assert early_pop.line().startswith("+OK")
    assert ctl(server, "blocked", "list").stdout == ""

    # The tenth failure ends its session.
    if last == "smtp":
        r = smtp_from(server, ip)
        r.send("AUTH LOGIN\r\n")
        assert r.reply() == "334 VXNlcm5hbWU6"
        r.send(b64(ALICE) + "\r\n")
        assert r.reply() == "334 UGFzc3dvcmQ6"
        r.send(b64("still wrong") + "\r\n")
        assert r.reply() == "535 5.7.8 Authentication credentials invalid"
        assert r.reply() == "421 4.7.1 " + refusal(ip)
    else:
        r = pop_from(server, ip)
        r.send(f"USER {ALICE}\r\nPASS still wrong\r\n")
        assert r.line().startswith("+OK")
        assert r.line() == "-ERR [AUTH] Authentication failed. " + refusal(ip)
    assert r.closed()

    # New connections get exactly the refusal, then the close.
    r = Raw(server.smtp_port, source=ip)
    assert r.line() == "554 5.7.1 " + refusal(ip)
    assert r.closed()
    r = Raw(server.submission_port, source=ip)
    assert r.line() == "554 5.7.1 " + refusal(ip)
    assert r.closed()
    r = Raw(server.pop3_port, source=ip)
    assert r.line() == "-ERR [SYS/TEMP] " + refusal(ip)
    assert r.closed()

    # Sessions opened before the block cannot log in now, even with the right password.
    early_pop.send(f"PASS {ALICE_PW}\r\n")
    reply = early_pop.line()
    assert reply.startswith("-ERR") and refusal(ip) in reply, reply
    assert early_pop.closed()
    early_smtp.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert early_smtp.reply() == "535 5.7.8 Authentication credentials invalid"
    assert early_smtp.reply() == "421 4.7.1 " + refusal(ip)
    assert early_smtp.closed()

    # Another address is unaffected.
    r = smtp_from(server, "127.0.0.6")
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    r.close()
    pop_login_from(server, "127.0.0.6")
    listed = ctl(server, "blocked", "list").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == [ip]
    assert "blocked 127.0.0.5" in server.log()


def test_nine_failures_do_not_block(untrusted):
    server = untrusted()
    ip = "127.0.0.5"
    fail_smtp(server, ip).close()
    r = fail_pop(server, ip, 4)
    r.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")  # a right password still works
    assert r.line().startswith("+OK")
    assert r.line().startswith("+OK 0 messages")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r = smtp_from(server, ip)
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    r.close()
    assert ctl(server, "blocked", "list").stdout == ""
    assert "blocked 127.0.0.5" not in server.log()


def test_parallel_attempts_cannot_exceed_the_limit(untrusted):
    """Twenty wrong passwords sent at once on twenty sessions: at most ten are tried."""
    server = untrusted()
    ip = "127.0.0.14"
    sessions = [pop_from(server, ip) for _ in range(20)]
    for r in sessions:
        r.send(f"USER {ALICE}\r\n")
        assert r.line().startswith("+OK")
    for r in sessions:
        r.send("PASS wrong\r\n")
    replies = [r.line() for r in sessions]
    plain_failures = [x for x in replies if x == "-ERR [AUTH] Authentication failed"]
    blocking = [x for x in replies if x.endswith(refusal(ip))]
    busy = [x for x in replies if x.startswith("-ERR [SYS/TEMP] too many logins")]
    assert len(plain_failures) + len(blocking) + len(busy) == 20, replies
    assert len(plain_failures) <= 9, replies
    assert blocking, replies
    for r in sessions:
        r.close()
    r = Raw(server.pop3_port, source=ip)
    assert r.line() == "-ERR [SYS/TEMP] " + refusal(ip)
    failed_logs = server.log().count(f"pop3 login failed for {ALICE} from {ip}")
    assert failed_logs <= 10, failed_logs


# --- 4. swaks: AUTH PLAIN and LOGIN on both SMTP ports -----------------------------


def run(cmd: list[str], env: dict[str, str], *, input: bytes | None = None):
    return subprocess.run(cmd, input=input, env=env, timeout=60, capture_output=True)


def swaks(server: MailServer, port: int, source: str, to: str, *extra: str) -> list[str]:
    return [
        need("swaks"),
        "--server",
        "127.0.0.1",
        "--port",
        str(port),
        "--local-interface",
        source,
        "--helo",
        "client.far.test",
        "--from",
        ALICE,
        "--to",
        to,
        "--header",
        "Subject: swaks relay",
        "--body",
        "relayed by swaks",
        "--timeout",
        "20",
        *extra,
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("listener", ["listen", "submission"])
def test_swaks_auth_relays(untrusted, tmp_path, mechanism, listener):
    server = untrusted()
    port = server.smtp_port if listener == "listen" else server.submission_port
    cmd = swaks(server, port, "127.0.0.7", FAR, "-a", mechanism)
    cmd += ["--auth-user", ALICE, "--auth-password", ALICE_PW]
    proc = run(cmd, tool_env(tmp_path))
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert f"-> AUTH {mechanism}" in out, out
    assert "<-  235 2.7.0 Authentication successful" in out, out
    [(envelope, message)] = queue(server)
    assert [r["address"] for r in envelope["recipients"]] == [FAR]
    assert envelope["sender"] == ALICE
    assert envelope["client"] == "127.0.0.7"
    assert envelope["account"] == ALICE
    assert b"Received: from client.far.test ([127.0.0.7])\n" in message
    assert b" with ESMTPA id " in message
    assert b"Subject: swaks relay" in message and b"relayed by swaks" in message
    assert ALICE_PW.encode() not in message


def test_swaks_submission_needs_auth(untrusted, tmp_path):
    server = untrusted()
    env = tool_env(tmp_path)
    for rcpt in (FAR, ALICE):  # on submission even local recipients need it
        proc = run(swaks(server, server.submission_port, "127.0.0.7", rcpt), env)
        out = proc.stdout.decode(errors="replace")
        assert proc.returncode != 0, out
        assert "<** 530 5.7.0 Authentication required" in out, out
    # On the MTA port a stranger may deliver locally but not relay.
    proc = run(swaks(server, server.smtp_port, "127.0.0.7", FAR), env)
    assert proc.returncode != 0
    assert "<** " + relay_denied() in proc.stdout.decode(errors="replace")
    # A wrong password is refused and relays nothing.
    cmd = swaks(server, server.submission_port, "127.0.0.7", FAR, "-a", "LOGIN")
    proc = run(cmd + ["--auth-user", ALICE, "--auth-password", "wrong"], env)
    assert proc.returncode != 0
    assert "<** 535 5.7.8 Authentication credentials invalid" in proc.stdout.decode(
        errors="replace"
    )
    assert queue_files(server) == []
    assert server.messages(ALICE) == []


# --- 5. The Bat!'s way: mpop checks mail, then msmtp sends without AUTH ------------


def msmtp(server: MailServer, source: str, sender: str = ALICE) -> list[str]:
    return [
        need("msmtp"),
        "--auth=off",
        "--tls=off",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.smtp_port),
        f"--source-ip={source}",
        "--domain=client.far.test",
        "--from",
        sender,
        "--",
        FAR,
    ]


def test_mpop_then_msmtp_pop_before_smtp(untrusted, tmp_path):
    mpop = need("mpop")
    server = untrusted()
    env = tool_env(tmp_path)
    assert smtp_send_from(server, "127.0.0.1", ALICE, "waiting for mpop").startswith("250 ")
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    cfg = tmp_path / "mpoprc"
    cfg.write_text(
        "defaults\n"
        "tls off\n"
        "account default\n"
        "host 127.0.0.1\n"
        f"port {server.pop3_port}\n"
        "source_ip 127.0.0.8\n"
        f"user {ALICE}\n"
        f'password "{ALICE_PW}"\n'
        "auth user\n"
        "keep on\n"
        f"delivery maildir {box}\n"
        f"uidls_file {tmp_path / 'mpop-uidls'}\n"
        "timeout 20\n"
    )
    cfg.chmod(0o600)
    message = b"Subject: from The Bat!\nFrom: alice@example.test\nTo: x@far.test\n\nhi far\n"

    # Before checking mail, sending out is refused.
    proc = run(msmtp(server, "127.0.0.8"), env, input=message)
    assert proc.returncode != 0
    assert relay_denied() in proc.stderr.decode(errors="replace")

    proc = run([mpop, "-C", str(cfg)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [fetched] = (box / "new").iterdir()
    assert b"Subject: waiting for mpop" in fetched.read_bytes()
    assert len(server.messages(ALICE)) == 1  # keep on

    proc = run(msmtp(server, "127.0.0.8"), env, input=message)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    [(envelope, queued)] = queue(server)
    assert envelope["client"] == "127.0.0.8"
    assert [r["address"] for r in envelope["recipients"]] == [FAR]
    assert envelope["account"] is None
    assert queued.endswith(message)
    assert b"Received: from client.far.test ([127.0.0.8])\n" in queued

    # The same msmtp from the next address is refused, as is a sender of another domain.
    proc = run(msmtp(server, "127.0.0.9"), env, input=message)
    assert proc.returncode != 0
    assert relay_denied() in proc.stderr.decode(errors="replace")
    proc = run(msmtp(server, "127.0.0.8", sender=BOB), env, input=message)
    assert proc.returncode != 0
    assert f"553 5.1.0 <{BOB}> sender rejected" in proc.stderr.decode(errors="replace")
    assert len(queue(server)) == 1


# --- 6. the sender check ---------------------------------------------------------------


def test_sender_check_after_auth_and_after_pop(untrusted):
    server = untrusted()
    r = smtp_from(server, "127.0.0.11")
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    for sender, reply in [
        (BOB, f"553 5.1.0 <{BOB}> sender rejected"),
        ("alice@far.test", "553 5.1.0 <alice@far.test> sender rejected"),
        ("alice@example.test.far.test", "553 5.1.0 <alice@example.test.far.test> sender rejected"),
        ("alice@example.org", "250 2.1.0 Ok"),  # a domain alias of her own
        ("Alice@EXAMPLE.TEST", "250 2.1.0 Ok"),
        ("carol@example.test", "250 2.1.0 Ok"),  # her domain, another local part
        ("", "250 2.1.0 Ok"),  # the null sender
    ]:
        r.send(f"MAIL FROM:<{sender}>\r\n")
        assert r.reply() == reply, sender
        if reply.startswith("250"):
            r.send(f"RCPT TO:<{FAR}>\r\n")
            assert r.reply() == "250 2.1.5 Ok", sender
            r.send("RSET\r\n")
            assert r.reply() == "250 2.0.0 Ok"
    r.close()

    # POP-before-SMTP carries the POP account's domain, checked where it relays.
    pop_login_from(server, "127.0.0.12", BOB, BOB_PW)
    r = smtp_from(server, "127.0.0.12")
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{FAR}>\r\nRSET\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == f"553 5.1.0 <{ALICE}> sender rejected"
    assert r.reply() == "250 2.0.0 Ok"
    r.send(f"MAIL FROM:<{BOB}>\r\nRCPT TO:<{FAR}>\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == "250 2.1.5 Ok"
    r.close()

    # The world sending mail in may use any sender.
    r = smtp_from(server, "127.0.0.13")
    r.send(f"MAIL FROM:<{BOB}>\r\nRCPT TO:<{ALICE}>\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == "250 2.1.5 Ok"
    r.close()


# --- 7. the open-relay battery ----------------------------------------------------------


class CaptureSMTP:
    """A tiny SMTP sink on 127.0.0.1 that records every byte it is sent."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.session, args=(conn,), daemon=True).start()

    def session(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        in_data = False
        buf = b""
        try:
            conn.sendall(b"220 capture ESMTP\r\n")
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                self.received.append(chunk)
                buf += chunk
                while b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    if in_data:
                        if line == b".":
                            in_data = False
                            conn.sendall(b"250 ok\r\n")
                    elif line.upper() == b"DATA":
                        in_data = True
                        conn.sendall(b"354 go on\r\n")
                    elif line.upper() == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def capture():
    c = CaptureSMTP()
    yield c
    c.close()


BATTERY = [
    "user%far.test@example.test",
    "@example.test:user@far.test",
    "far.test!user@example.test",
    '"user@far.test"@example.test',
    "user@far.test@example.test",
    "user@far.test.",
    "USER@FAR.TEST",
    "user@[127.0.0.1]",
    "user@example.test.far.test",
    '"user%far.test"@example.test',
    "postmaster@far.test",
    # a few more of the same family
    "@far.test:user@example.test",
    "@example.test,@far.test:user@far.test",
    "user%example.test@far.test",
    "far.test!user",
    "user@far.test%example.test",
    "user@[IPv6:::1]",
    "user@localhost",
    '"user@example.test"@far.test',
    "alice%far.test@example.test",
    "alice@example.test@far.test",
]


def test_open_relay_battery(untrusted, capture):
    # Sanity: the capture server does record what it is sent.
    with socket.create_connection(("127.0.0.1", capture.port), timeout=5) as c:
        assert c.recv(100).startswith(b"220")
        c.sendall(b"QUIT\r\n")
        c.recv(100)
    assert wait_for(lambda: capture.received == [b"QUIT\r\n"], timeout=2)
    capture.received.clear()
    capture.connections = 0

    server = untrusted(f"[relay]\nsmarthost = 127.0.0.1:{capture.port}\n")
    source = "127.0.0.13"
    refused = {}
    for rcpt in BATTERY:
        # One session each, with a local recipient alongside, so DATA goes through.
        r = smtp_from(server, source)
        r.send(f"MAIL FROM:<sender@far.test>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<{rcpt}>\r\n")
        assert r.reply() == "250 2.1.0 Ok"
        assert r.reply() == "250 2.1.5 Ok"
        refused[rcpt] = r.reply()
        r.send("DATA\r\n")
        assert r.reply().startswith("354")
        r.send(f"Subject: relay probe\r\nTo: <{rcpt}>\r\n\r\nprobe\r\n.\r\n")
        assert r.reply().startswith("250 ")
        r.close()
        # And through the submission port, unauthenticated: refused before anything.
        assert rcpt_from(server, source, rcpt, port=server.submission_port).startswith("5"), rcpt
    accepted = {rcpt: reply for rcpt, reply in refused.items() if not reply.startswith("5")}
    assert accepted == {}
    assert refused["USER@FAR.TEST"].lower() == relay_denied("user@far.test").lower()
    assert refused["@example.test:user@far.test"] == relay_denied("user@far.test")
    assert refused["postmaster@far.test"] == relay_denied("postmaster@far.test")

    assert queue_files(server) == []
    assert len(server.messages(ALICE)) == len(BATTERY)  # only the local copies
    time.sleep(1.0)  # give a (future) queue runner every chance to misbehave
    assert capture.connections == 0 and capture.received == []
    assert queue_files(server) == []


# --- 8. a corrupt state store --------------------------------------------------------------

CORRUPT = pytest.mark.parametrize(
    "content",
    [
        b"this is not a database\n" * 400,
        b"SQLite format 3\x00" + bytes(range(256)) * 32,
        None,  # a real SQLite database, but not ours: tables without our columns
    ],
    ids=["garbage", "sqlite-header-garbage", "foreign-schema"],
)


def corrupt_store(make_server, content: bytes | None) -> tuple[MailServer, Path]:
    server = make_server()
    server.add_user(ALICE, ALICE_PW)
    state = server.mail_dir / ".state" / "state.sqlite3"
    state.parent.mkdir(parents=True)
    if content is None:
        db = sqlite3.connect(state)
        db.executescript("CREATE TABLE popauth (x); CREATE TABLE blocks (y);")
        db.close()
    else:
        state.write_bytes(content)
    return server, state


@CORRUPT
def test_corrupt_state_store_stops_startup_with_one_line(make_server, content):
    server, state = corrupt_store(make_server, content)
    before = state.read_bytes()
    proc = subprocess.Popen(
        [str(TWISTD), "--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"],
        cwd=server.home,
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
        pytest.fail(f"twistd started on a corrupt state store and kept running:\n{output}")
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "mailbox/.state/state.sqlite3" in lines[0], output
    assert state.read_bytes() == before  # nothing overwritten: the operator decides


@CORRUPT
@pytest.mark.parametrize("command", [["blocked", "list"], ["popauth", "revoke", "127.0.0.2"]])
def test_corrupt_state_store_mailboxctl_says_one_line(make_server, content, command):
    server, _state = corrupt_store(make_server, content)
    proc = subprocess.run(
        [str(MAILBOXCTL), "--config", "etc/mailbox.ini", *command],
        cwd=server.home,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mailbox/.state/state.sqlite3" in lines[0], proc.stderr
