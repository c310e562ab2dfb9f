"""SMTP AUTH, POP-before-SMTP, the sender check, the queue and the guard,
over StringTransport with a Clock."""

from __future__ import annotations

import base64
import json
import os

import pytest
from test_pop3 import Session as POP
from test_smtp import Session as SMTP

from mailboxd import maildir
from mailboxd.policy import Listener

ALICE_PLAIN = base64.b64encode(b"\0alice@example.test\0alice pw").decode()
WRONG_PLAIN = base64.b64encode(b"\0alice@example.test\0wrong").decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def s(unit):
    session = SMTP(unit)
    session.cmd("EHLO client.test")
    return session


def queued(unit) -> list[dict]:
    q = unit.mail_dir / ".queue"
    return [json.loads(p.read_text()) for p in sorted(q.glob("*.json"))] if q.is_dir() else []


# --- AUTH ---------------------------------------------------------------------


def test_auth_plain_initial_response(s):
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}") == "235 2.7.0 Authentication successful"
    assert s.cmd("AUTH PLAIN " + ALICE_PLAIN) == "503 5.5.1 Error: already authenticated"


def test_auth_plain_continued(s):
    assert s.cmd("AUTH PLAIN") == "334 "
    assert s.cmd(ALICE_PLAIN) == "235 2.7.0 Authentication successful"


def test_auth_login_both_forms(unit, s):
    assert s.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert s.cmd(b64("alice@example.test")) == "334 UGFzc3dvcmQ6"
    assert s.cmd(b64("alice pw")) == "235 2.7.0 Authentication successful"
    other = SMTP(unit)
    other.cmd("EHLO client.test")
    assert other.cmd("AUTH LOGIN " + b64("Alice@Example.ORG")) == "334 UGFzc3dvcmQ6"
    assert other.cmd(b64("alice pw")) == "235 2.7.0 Authentication successful"


@pytest.mark.parametrize(
    "lines, reply",
    [
        (["AUTH"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        (["AUTH CRAM-MD5"], "504 5.5.4 Unrecognized authentication type"),
        (["AUTH PLAIN", "*"], "501 5.7.0 Authentication aborted"),
        (["AUTH LOGIN", "*"], "501 5.7.0 Authentication aborted"),
        (["AUTH LOGIN", b64("alice@example.test"), "*"], "501 5.7.0 Authentication aborted"),
        (["AUTH PLAIN !!!"], "501 5.5.2 cannot decode the response as base64"),
        (["AUTH LOGIN", "%%%"], "501 5.5.2 cannot decode the response as base64"),
        (
            ["AUTH PLAIN " + b64("alice@example.test alice pw")],
            "501 5.5.2 expected authzid NUL authcid NUL password",
        ),
        (
            ["AUTH PLAIN " + b64("bob@other.test\0alice@example.test\0alice pw")],
            "535 5.7.8 Authentication credentials invalid",
        ),
        (["AUTH PLAIN " + WRONG_PLAIN], "535 5.7.8 Authentication credentials invalid"),
        (
            ["AUTH PLAIN " + b64("\0nobody@example.test\0x")],
            "535 5.7.8 Authentication credentials invalid",
        ),
    ],
)
def test_malformed_and_refused_auth_and_the_session_goes_on(s, lines, reply):
    for line in lines[:-1]:
        assert s.cmd(line).startswith("334")
    assert s.cmd(lines[-1]) == reply
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}") == "235 2.7.0 Authentication successful"


def test_no_auth_inside_a_transaction(s):
    s.cmd("MAIL FROM:<a@far.test>")
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}").startswith("503 5.5.1")


def test_require_tls_for_auth_hides_and_refuses_auth(unit, tmp_path):
    from conftest import unit_config

    unit.config = unit_config(tmp_path, "require_tls_for_auth = yes\n")
    s = SMTP(unit)
    assert not any("AUTH" in r for r in s.send("EHLO client.test\r\n"))
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}") == (
        "538 5.7.11 Encryption required for requested authentication mechanism"
    )


def test_commands_pipelined_behind_auth_wait_for_it(unit, s):
    unit.pool.paused = True
    out = s.send(
        f"AUTH PLAIN {ALICE_PLAIN}\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\n"
    )
    assert out == []
    unit.pool.release()
    assert s.take() == ["235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok"]


# --- relay, the sender check and the queue -----------------------------------


@pytest.mark.parametrize("spilled", [False, True], ids=["held", "spilled"])
def test_the_queue_is_handed_the_message_it_would_read(unit, monkeypatch, spilled):
    if spilled:
        monkeypatch.setattr(maildir, "SPOOL_MEMORY", 100)
    handed = []
    s = SMTP(unit, queued=lambda entry, message: handed.append((entry, message)))
    s.cmd("EHLO client.test")
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    s.cmd("MAIL FROM:<alice@example.test>")
    s.cmd("RCPT TO:<x@far.test>")
    s.cmd("DATA")
    body = "".join(f"line {n} of the body, long enough to add up\r\n" for n in range(5))
    assert s.send(f"Subject: out\r\n\r\n{body}.\r\n")[0].startswith("250 ")
    ((entry, message),) = handed
    on_disk = (unit.mail_dir / ".queue" / f"{entry.id}.msg").read_bytes()[entry.offset :]
    assert message == (None if spilled else on_disk)  # a spilled one is read from disk


@pytest.mark.parametrize("local", [False, True], ids=["relayed only", "also local"])
def test_a_held_message_only_relayed_is_written_once_straight_into_the_queue(
    unit, s, monkeypatch, local
):
    """No spool file to make, link and remove: the queue's .msg is the only
    file. With a local recipient too, the spool file is linked as before."""
    made: list[str] = []
    real = maildir.IncomingMessage._create

    def create(self):
        made.append(self.path.name)
        return real(self)

    monkeypatch.setattr(maildir.IncomingMessage, "_create", create)
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    s.cmd("MAIL FROM:<alice@example.test>")
    s.cmd("RCPT TO:<x@far.test>")
    if local:
        s.cmd("RCPT TO:<bob@other.test>")
    s.cmd("DATA")
    assert s.send("Subject: out\r\n\r\nhello\r\n.\r\n")[0].startswith("250 ")
    [envelope] = queued(unit)
    msg = unit.mail_dir / ".queue" / f"{envelope['id']}.msg"
    assert msg.read_bytes().startswith(b"Return-Path: <alice@example.test>\n")
    assert msg.read_bytes()[envelope["offset"] :].endswith(b"Subject: out\n\nhello\n")
    assert oct(msg.stat().st_mode & 0o777) == "0o600"
    assert len(made) == (1 if local else 0)
    if local:
        [delivered] = s.delivered("bob@other.test")
        assert os.path.samefile(delivered, msg)  # one file, two names
    assert not (unit.mail_dir / ".incoming").exists() or not any(
        (unit.mail_dir / ".incoming").iterdir()
    )


def test_authenticated_relay_is_queued_durably(unit, s):
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    assert s.cmd("MAIL FROM:<alice@example.test>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<x@far.test>") == "250 2.1.5 Ok"
    assert s.cmd("RCPT TO:<X@far.test>") == "250 2.1.5 Ok"
    assert s.cmd("RCPT TO:<bob@other.test>") == "250 2.1.5 Ok"
    s.cmd("DATA")
    reply = s.send("Subject: out\r\n\r\nhello\r\n.\r\n")[0]
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [envelope] = queued(unit)
    assert envelope["id"] == reply.split()[-1]
    assert envelope["sender"] == "alice@example.test"
    assert [r["address"] for r in envelope["recipients"]] == ["x@far.test"]
    assert envelope["account"] == "alice@example.test"
    data = (unit.mail_dir / ".queue" / f"{envelope['id']}.msg").read_bytes()
    sent = data[envelope["offset"] :]
    assert sent.startswith(b"Received: from client.test ([192.0.2.7])\n")
    assert b"with ESMTPA id" in sent
    assert sent.endswith(b"Subject: out\n\nhello\n")
    assert len(s.delivered("bob@other.test")) == 1
    assert not list((unit.mail_dir / ".incoming").iterdir())


@pytest.mark.parametrize(
    "sender, reply",
    [
        ("alice@example.test", "250 2.1.0 Ok"),
        ("someone.else@EXAMPLE.test", "250 2.1.0 Ok"),
        ("alice@example.org", "250 2.1.0 Ok"),
        ("", "250 2.1.0 Ok"),
        ("bob@other.test", "553 5.1.0 <bob@other.test> sender rejected"),
        ("alice@far.test", "553 5.1.0 <alice@far.test> sender rejected"),
    ],
)
def test_sender_check_after_auth(s, sender, reply):
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    assert s.cmd(f"MAIL FROM:<{sender}>") == reply


def test_sender_check_off(unit, tmp_path):
    from conftest import unit_config

    unit.config = unit_config(tmp_path, "[relay]\nsender_must_match_login = no\n")
    s = SMTP(unit)
    s.cmd("EHLO client.test")
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    assert s.cmd("MAIL FROM:<anyone@far.test>") == "250 2.1.0 Ok"


def test_trusted_network_relays_with_any_sender(unit):
    s = SMTP(unit, ip="127.0.0.1")
    s.cmd("EHLO localhost")
    assert s.cmd("MAIL FROM:<cron@far.test>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<x@far.test>") == "250 2.1.5 Ok"


def test_untrusted_client_cannot_relay(s):
    s.cmd("MAIL FROM:<a@far.test>")
    assert s.cmd("RCPT TO:<x@far.test>") == "554 5.7.1 <x@far.test>: Relay access denied"
    assert s.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Ok"


def test_submission_needs_authorisation_then_relays(unit):
    s = SMTP(unit, Listener.SUBMISSION)
    s.cmd("EHLO client.test")
    s.cmd("MAIL FROM:<alice@example.test>")
    assert s.cmd("RCPT TO:<alice@example.test>") == "530 5.7.0 Authentication required"
    s.cmd("RSET")
    s.cmd(f"AUTH PLAIN {ALICE_PLAIN}")
    s.cmd("MAIL FROM:<alice@example.test>")
    assert s.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Ok"
    assert s.cmd("RCPT TO:<x@far.test>") == "250 2.1.5 Ok"


# --- POP-before-SMTP ----------------------------------------------------------


def pop_login(unit, ip: str) -> POP:
    p = POP(unit, ip=ip)
    assert p.login().startswith("+OK")
    return p


def relay_reply(unit, ip: str, sender: str = "alice@example.test") -> str:
    s = SMTP(unit, ip=ip)
    s.cmd("EHLO client.test")
    mail = s.cmd(f"MAIL FROM:<{sender}>")
    if not mail.startswith("250"):
        return mail
    return s.cmd("RCPT TO:<x@far.test>")


def test_pop_login_authorises_only_its_own_ip(unit):
    pop_login(unit, "192.0.2.20")
    assert relay_reply(unit, "192.0.2.20") == "250 2.1.5 Ok"
    assert relay_reply(unit, "192.0.2.21") == "554 5.7.1 <x@far.test>: Relay access denied"


def test_pop_authorisation_carries_the_sender_check(unit):
    pop_login(unit, "192.0.2.20")
    assert relay_reply(unit, "192.0.2.20", "bob@other.test") == (
        "553 5.1.0 <bob@other.test> sender rejected"
    )
    assert relay_reply(unit, "192.0.2.20", "alice@example.org") == "250 2.1.5 Ok"


def test_pop_authorisation_expires_after_the_ttl(unit):
    pop_login(unit, "192.0.2.20").cmd("QUIT")
    unit.clock.advance(3599)
    assert relay_reply(unit, "192.0.2.20") == "250 2.1.5 Ok"
    unit.clock.advance(2)
    assert relay_reply(unit, "192.0.2.20").startswith("554 5.7.1")


def test_the_end_of_a_pop_session_refreshes_the_authorisation(unit):
    p = pop_login(unit, "192.0.2.20")
    for _ in range(6):  # a long session, active within the autologout time
        unit.clock.advance(500)
        assert p.cmd("NOOP") == "+OK"
    p.cmd("QUIT")
    p.proto.connectionLost(None)
    unit.clock.advance(3000)  # 6000 s after login, 3000 after the session ended
    assert relay_reply(unit, "192.0.2.20") == "250 2.1.5 Ok"
    unit.clock.advance(601)
    assert relay_reply(unit, "192.0.2.20").startswith("554 5.7.1")


def test_failed_pop_login_authorises_nothing(unit):
    p = POP(unit, ip="192.0.2.20")
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS wrong").startswith("-ERR [AUTH]")
    p.proto.connectionLost(None)
    assert relay_reply(unit, "192.0.2.20").startswith("554 5.7.1")


def test_ipv4_mapped_addresses_are_one_client(unit):
    pop_login(unit, "::ffff:192.0.2.20")
    assert relay_reply(unit, "192.0.2.20") == "250 2.1.5 Ok"


def test_revoked_authorisation(unit):
    pop_login(unit, "192.0.2.20").cmd("QUIT")
    assert unit.state.revoke_popauth("192.0.2.20")
    assert relay_reply(unit, "192.0.2.20").startswith("554 5.7.1")


# --- the guard ------------------------------------------------------------------

REFUSAL = (
    "Connection refused from {ip}. Too many authorization failures from this IP, try again later."
)


def fail_smtp(unit, ip: str, times: int) -> SMTP:
    s = SMTP(unit, ip=ip)
    s.cmd("EHLO client.test")
    for _ in range(times):
        assert s.cmd(f"AUTH PLAIN {WRONG_PLAIN}") == "535 5.7.8 Authentication credentials invalid"
    return s


def fail_pop(unit, ip: str, times: int) -> POP:
    p = POP(unit, ip=ip)
    for _ in range(times):
        p.cmd("USER alice@example.test")
        assert p.cmd("PASS wrong") == "-ERR [AUTH] Authentication failed"
    return p


def test_block_after_exactly_ten_failures(unit):
    ip = "192.0.2.30"
    s = fail_smtp(unit, ip, 9)
    assert not is_blocked(unit, ip)
    assert s.send(f"AUTH PLAIN {WRONG_PLAIN}\r\n") == [
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.1 " + REFUSAL.format(ip=ip),
    ]
    assert s.transport.disconnecting
    again = SMTP(unit, ip=ip)
    assert again.greeting == ["554 5.7.1 " + REFUSAL.format(ip=ip)]
    assert again.transport.disconnecting
    p = POP(unit, ip=ip)
    assert p.greeting == ["-ERR [SYS/TEMP] " + REFUSAL.format(ip=ip)]
    assert p.transport.disconnecting
    assert SMTP(unit, ip="192.0.2.31").greeting[0].startswith("220 ")


def test_failures_on_both_protocols_count_together(unit):
    ip = "192.0.2.30"
    fail_pop(unit, ip, 5)
    s = fail_smtp(unit, ip, 4)
    assert not is_blocked(unit, ip)
    s.send(f"AUTH PLAIN {WRONG_PLAIN}\r\n")
    assert is_blocked(unit, ip)


def test_the_tenth_pop_failure_ends_the_session(unit):
    ip = "192.0.2.30"
    p = fail_pop(unit, ip, 9)
    p.cmd("USER alice@example.test")
    assert p.cmd("PASS wrong") == "-ERR [AUTH] Authentication failed. " + REFUSAL.format(ip=ip)
    assert p.transport.disconnecting


def test_failures_outside_the_window_do_not_count(unit):
    ip = "192.0.2.30"
    fail_smtp(unit, ip, 9)
    unit.clock.advance(3601)
    fail_smtp(unit, ip, 9)
    assert not is_blocked(unit, ip)


def block(unit, ip: str) -> None:
    fail_smtp(unit, ip, 9).send(f"AUTH PLAIN {WRONG_PLAIN}\r\n")
    assert is_blocked(unit, ip)


def test_block_expires(unit):
    ip = "192.0.2.30"
    block(unit, ip)
    unit.clock.advance(3599)
    assert SMTP(unit, ip=ip).greeting[0].startswith("554 5.7.1")
    unit.clock.advance(2)
    assert SMTP(unit, ip=ip).greeting[0].startswith("220 ")


def test_unblock_lifts_the_block_and_the_count(unit):
    ip = "192.0.2.30"
    block(unit, ip)
    assert unit.state.unblock(ip)
    s = SMTP(unit, ip=ip)
    s.cmd("EHLO client.test")
    assert s.cmd(f"AUTH PLAIN {WRONG_PLAIN}").startswith("535")
    assert not is_blocked(unit, ip)


def is_blocked(unit, ip: str) -> bool:
    return unit.state.block(ip, unit.clock.seconds()) is not None


def sessions_in_auth(unit, ip: str, *plains: str, hold=None) -> list:
    """Sessions from `ip`, one per AUTH PLAIN response, sent while `hold` (a pool) is held."""
    hold = hold or unit.hash_pool
    sessions = []
    for _ in plains:
        s = SMTP(unit, ip=ip)
        s.cmd("EHLO client.test")
        sessions.append(s)
    hold.paused = True
    for s, plain in zip(sessions, plains, strict=True):
        assert s.send(f"AUTH PLAIN {plain}\r\n") == []
    return sessions


def test_fifty_parallel_failures_give_exactly_ten_failed_verdicts(unit):
    ip = "192.0.2.30"
    sessions = sessions_in_auth(unit, ip, *[WRONG_PLAIN] * 50, hold=unit.pool)
    unit.pool.release()
    replies = [s.take() for s in sessions]
    invalid = ["535 5.7.8 Authentication credentials invalid"]
    blocked = invalid + ["421 4.7.1 " + REFUSAL.format(ip=ip)]
    assert replies.count(invalid) == 9
    assert replies.count(blocked) == 41
    assert unit.state.failures(ip, -1) == 10
    assert is_blocked(unit, ip)


def test_fifty_parallel_right_logins_from_one_ip_all_succeed(unit):
    sessions = sessions_in_auth(unit, "192.0.2.30", *[ALICE_PLAIN] * 50, hold=unit.pool)
    unit.pool.release()
    assert [s.take() for s in sessions] == [["235 2.7.0 Authentication successful"]] * 50


def test_a_right_password_completing_after_the_block_is_refused(unit):
    ip = "192.0.2.30"
    unit.hashing.per_client = 2  # the right one hashes alongside the wrong ones
    right, *wrong = sessions_in_auth(unit, ip, ALICE_PLAIN, *[WRONG_PLAIN] * 10)
    right_check = unit.hash_pool.held.pop(0)
    unit.hash_pool.release()  # the ten failures complete first, and block the IP
    assert sorted(len(s.take()) for s in wrong) == [1] * 9 + [2]  # 535, and once 535 + 421
    assert is_blocked(unit, ip)
    right_check()
    assert right.take() == [
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.1 " + REFUSAL.format(ip=ip),
    ]
    assert unit.state.failures(ip, -1) == 10


def test_a_right_password_arriving_after_the_block_is_refused_unhashed(unit):
    ip = "192.0.2.30"
    s = SMTP(unit, ip=ip)
    s.cmd("EHLO client.test")
    block(unit, ip)
    unit.hash_pool.paused = True
    assert s.send(f"AUTH PLAIN {ALICE_PLAIN}\r\n") == [
        "535 5.7.8 Authentication credentials invalid",
        "421 4.7.1 " + REFUSAL.format(ip=ip),
    ]
    assert unit.hash_pool.held == []


def test_one_ip_hashes_one_check_at_a_time_and_the_rest_wait(unit):
    ip = "192.0.2.30"
    sessions_in_auth(unit, ip, *[WRONG_PLAIN] * 5)
    assert len(unit.hash_pool.held) == 1  # one check hashing for this IP ...
    assert unit.hashing.waiting(ip) == 4  # ... the others in line, not refused
    unit.hash_pool.release()
    assert unit.hashing.waiting(ip) == 0


def test_a_good_login_does_not_reset_the_count(unit):
    # Otherwise an attacker with one account could guess others' passwords forever.
    ip = "192.0.2.30"
    s = fail_smtp(unit, ip, 9)
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}") == "235 2.7.0 Authentication successful"
    fail_pop(unit, ip, 0).cmd("USER alice@example.test")
    p = POP(unit, ip=ip)
    p.cmd("USER bob@other.test")
    assert p.cmd("PASS wrong").startswith("-ERR [AUTH] Authentication failed. Connection refused")


def test_state_service_logs_operator_changes_and_expired_blocks(unit):
    from twisted.logger import capturedLogs

    from mailboxd.service import StateService

    service = StateService(unit.state, unit.clock, 3600, unit.workers, unit.clock.seconds)
    unit.state.note(0, "before start: not logged again")
    service.startService()
    block(unit, "192.0.2.40")
    unit.state.note(1, "unblocked 192.0.2.41")
    with capturedLogs() as events:
        unit.clock.advance(2)
        unit.clock.advance(3600)
        for _ in range(service.prune_every):
            unit.clock.advance(service.interval)
    text = [e["log_format"].format(**e) for e in events]
    assert "state changed by mailboxctl: unblocked 192.0.2.41" in text
    assert "block of 192.0.2.40 expired" in text
    assert not any("before start" in t for t in text)
    service._loop.stop()


def test_a_broken_state_store_refuses_for_a_while_only_what_needs_it(unit):
    unit.state.db.close()
    s = SMTP(unit, ip="192.0.2.55")  # not trusted: relay would need POP-before-SMTP
    assert s.greeting == ["220 mail.example.test ESMTP Mailbox"]  # local mail needs no store
    s.cmd("HELO far.test")
    assert s.cmd("MAIL FROM:<someone@far.test>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<alice@example.test>") == "250 2.1.5 Ok"
    assert s.cmd("RCPT TO:<someone@far.test>") == (
        "451 4.3.0 Temporary failure of the state store, try again later"
    )
    s.cmd("DATA")
    assert s.send("Subject: x\r\n\r\nhi\r\n.\r\n")[0].startswith("250 ")
    assert len(s.delivered("alice@example.test")) == 1
    assert POP(unit).greeting == ["-ERR [SYS/TEMP] service unavailable, try again later"]


def test_forwarding_alias_queues_the_remote_target_with_the_original_sender(unit, s):
    aliases = unit.config.mailbox.aliases
    aliases.write_text(aliases.read_text() + "fwd@example.test: alice@example.test, Out@Far.test\n")
    unit.store.reload()
    assert s.cmd("MAIL FROM:<stranger@elsewhere.test>") == "250 2.1.0 Ok"
    assert s.cmd("RCPT TO:<fwd@example.test>") == "250 2.1.5 Ok"
    s.cmd("DATA")
    assert s.send("Subject: fwd\r\n\r\nhi\r\n.\r\n")[0].startswith("250 ")
    [envelope] = queued(unit)
    assert envelope["sender"] == "stranger@elsewhere.test"
    assert [r["address"] for r in envelope["recipients"]] == ["Out@far.test"]
    assert len(s.delivered("alice@example.test")) == 1


def test_a_block_that_ends_takes_its_failures_with_it(unit, tmp_path):
    from conftest import unit_config

    config = unit_config(tmp_path, "[limits]\nauth_failures = 3\nblock_duration = 5\n")
    unit.guard.limits = config.limits
    ip = "192.0.2.80"
    s = fail_smtp(unit, ip, 2)
    assert s.send(f"AUTH PLAIN {WRONG_PLAIN}\r\n")[-1].startswith("421 4.7.1")
    assert is_blocked(unit, ip)
    unit.clock.advance(6)  # the block is over; the hour of the window is not
    assert not is_blocked(unit, ip)
    s = fail_smtp(unit, ip, 2)  # two more failures: a fresh count, no block
    assert not is_blocked(unit, ip)
    assert s.cmd(f"AUTH PLAIN {ALICE_PLAIN}") == "235 2.7.0 Authentication successful"
