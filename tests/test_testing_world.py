"""mailboxd.testing: the world's rules (`server.world.on`), with the real queue.

The capture that stands in for the world answers as the rules say; the
server's real outbound queue defers, retries (after `advance()`) and bounces.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from mailboxd.testing import MailServer

ALICE, ALICE_PW = "alice@example.test", "alice pw"
TIMEOUT = 10


def submit(server, to, subject: str = "out", sender: str = ALICE) -> None:
    """Mail from a local account, through submission, to be relayed."""
    recipients = [to] if isinstance(to, str) else list(to)
    body = f"From: {sender}\r\nSubject: {subject}\r\n\r\nhi\r\n".encode()
    with smtplib.SMTP(server.host, server.submission_port, timeout=TIMEOUT) as s:
        s.login(sender, ALICE_PW)
        s.sendmail(sender, recipients, body)


def recipients_in(server, status: str) -> list:
    """Wait until some queued recipient has `status`; those that have it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = [
            r
            for e in list(server.appliance.outbound.entries.values())
            for r in e.recipients
            if r.status == status
        ]
        if found:
            return found
        assert time.monotonic() < deadline, f"no recipient became {status}"
        time.sleep(0.02)


def bounce_for(server, address: str = ALICE, timeout: float = TIMEOUT):
    return server.wait_for_message(
        to=address, predicate=lambda m: m.envelope_from == "", timeout=timeout
    )


def retried(server, seconds: float = 60, tries: int = 5, **wanted):
    """Advance the clock until the queue's retry is captured (for the child
    process, whose queue this process cannot see)."""
    for _ in range(tries):
        server.advance(seconds)
        try:
            return server.wait_for_message(outbound=True, timeout=1.5, **wanted)
        except AssertionError:
            continue
    raise AssertionError("the retry was never captured")


@pytest.fixture
def box():
    with MailServer() as server:
        server.add_account(ALICE, ALICE_PW)
        yield server


def test_a_4xx_at_rcpt_defers_and_advance_delivers(box):
    rule = box.world.on("RCPT", reply=(451, "4.3.0 come back later"), times=1)
    submit(box, "bob@far.test", subject="patience")
    [deferred] = recipients_in(box, "deferred")
    assert deferred.last_error == "451 4.3.0 come back later"
    assert deferred.status_code == "4.3.0"
    box.assert_no_message(outbound=True, within=0.2)
    assert rule.hits == 1 and box.world.rules == []
    box.advance(60)  # the first retry is a minute later
    captured = box.wait_for_message(outbound=True, subject="patience", timeout=TIMEOUT)
    assert captured.recipients == ("bob@far.test",)
    assert box.messages(ALICE) == []  # no bounce


def test_a_5xx_at_rcpt_bounces_to_the_local_sender(box):
    box.world.on("RCPT", match="nobody@*", reply=(550, "5.1.1 no such user here"))
    submit(box, "nobody@far.test", subject="into the void")
    bounce = bounce_for(box)
    assert bounce.account == ALICE
    assert "nobody@far.test" in bounce.text
    assert "5.1.1" in bounce.text and "no such user here" in bounce.text
    assert "Status: 5.1.1" in bounce.raw.decode()
    assert box.outbound == []


def test_a_5xx_at_end_of_data_bounces(box):
    box.world.on("end-of-data", reply=(554, "5.7.1 we do not like it"))
    submit(box, "bob@far.test", subject="unliked")
    assert "5.7.1 we do not like it" in bounce_for(box).text
    assert box.outbound == []  # refused: the world does not have it


def test_a_421_throttle_at_connect_then_success_after_advance(box):
    box.world.on("connect", reply=(421, "4.7.0 too many connections, slow down"), times=1)
    submit(box, "bob@far.test", subject="throttled")
    [deferred] = recipients_in(box, "deferred")
    assert deferred.last_error.startswith("421 4.7.0 too many connections")
    box.advance(60)
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).subject == "throttled"


def test_a_421_at_mail_closes_and_defers(box):
    box.world.on("MAIL", reply=(421, "4.7.0 slow down"), times=1)
    submit(box, "bob@far.test", subject="throttled at MAIL")
    [deferred] = recipients_in(box, "deferred")
    assert deferred.last_error == "421 4.7.0 slow down"
    box.advance(60)
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).recipients == ("bob@far.test",)


def test_drop_closes_the_connection_without_an_answer(box):
    rule = box.world.on("MAIL", drop=True, times=1)
    submit(box, "bob@far.test", subject="dropped")
    [deferred] = recipients_in(box, "deferred")
    assert deferred.status_code == "4.4.1"  # no answer at all
    assert rule.hits == 1
    box.advance(60)
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).subject == "dropped"


def test_delay_is_on_the_servers_clock(box):
    rule = box.world.on("end-of-data", delay=120)  # no reply: then the real one
    submit(box, "bob@far.test", subject="slow world")
    deadline = time.monotonic() + TIMEOUT
    while rule.hits == 0:
        assert time.monotonic() < deadline, "the message never reached its end"
        time.sleep(0.02)
    box.assert_no_message(outbound=True, within=0.3)  # two minutes are not over
    box.advance(120)
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).subject == "slow world"


def test_delay_then_a_reply(box):
    box.world.on("RCPT", delay=30, reply=(452, "4.2.2 mailbox full"), times=1)
    submit(box, "bob@far.test", subject="full")
    deadline = time.monotonic() + TIMEOUT
    while box.world.rules:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    box.advance(30)
    [deferred] = recipients_in(box, "deferred")
    assert deferred.last_error == "452 4.2.2 mailbox full"


def test_times_counts_the_matches(box):
    rule = box.world.on("RCPT", reply=(450, "4.2.0 busy"), times=2)
    submit(box, "bob@far.test", subject="third time lucky")
    recipients_in(box, "deferred")
    box.advance(60)  # the second attempt: refused again
    deadline = time.monotonic() + TIMEOUT
    while rule.hits < 2:
        assert time.monotonic() < deadline, "no second attempt"
        time.sleep(0.02)
    box.assert_no_message(outbound=True, within=0.2)
    box.advance(300)  # the next retry is five minutes later
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).subject == "third time lucky"
    assert box.world.rules == []


def test_match_globs_pick_recipients_and_senders(box):
    box.world.on("RCPT", match="*@slow.test", reply=(450, "4.2.0 later"))
    submit(box, ["a@slow.test", "b@fast.test"], subject="split")
    first = box.wait_for_message(outbound=True, timeout=TIMEOUT)
    assert first.recipients == ("b@fast.test",)  # the other one waits
    assert [r.address for r in recipients_in(box, "deferred")] == ["a@slow.test"]
    box.world.clear()
    box.advance(60)
    second = box.wait_for_message(
        outbound=True, predicate=lambda m: m is not first, timeout=TIMEOUT
    )
    assert second.recipients == ("a@slow.test",)

    # DATA and end-of-data match any recipient of the transaction, or the sender.
    box.add_account("carol@example.test", ALICE_PW)
    box.world.on("DATA", match="carol@*", reply=(554, "5.7.1 not from carol"))
    submit(box, "d@fast.test", subject="from carol", sender="carol@example.test")
    assert "5.7.1 not from carol" in bounce_for(box, "carol@example.test").text
    submit(box, "d@fast.test", subject="from alice")
    assert box.wait_for_message(outbound=True, subject="from alice", timeout=TIMEOUT)


def test_world_rules_are_checked(box):
    with pytest.raises(ValueError, match="connect, MAIL, RCPT, DATA, end-of-data"):
        box.world.on("HELO", reply=(500, "no"))
    with pytest.raises(ValueError, match="reply=, drop=True or delay="):
        box.world.on("RCPT")
    with pytest.raises(TypeError):
        box.world.on("RCPT", reply="550 no")
    with pytest.raises(ValueError):
        box.world.on("RCPT", reply=(550, "5.1.1 no"), times=0)
    assert box.world.on("rcpt", reply=(550, "5.1.1 no")).point == "RCPT"


def test_reset_clears_the_worlds_rules(box):
    box.world.on("RCPT", reply=(550, "5.1.1 no"))
    box.reset()
    assert box.world.rules == []
    box.add_account(ALICE, ALICE_PW)
    submit(box, "bob@far.test", subject="after reset")
    assert box.wait_for_message(outbound=True, timeout=TIMEOUT).subject == "after reset"


# --- the child process ---------------------------------------------------------------------


def test_the_world_of_a_child_process():
    with MailServer(process=True) as server:
        server.add_account(ALICE, ALICE_PW)
        server.world.on("RCPT", match="bob@*", reply=(451, "4.3.0 later"), times=1)
        submit(server, "bob@far.test", subject="deferred in the child")
        server.assert_no_message(outbound=True, within=0.5)
        assert retried(server).subject == "deferred in the child"

        server.world.on("end-of-data", reply=(550, "5.7.1 refused by the world"))
        submit(server, "carol@far.test", subject="bounced in the child")
        bounce = bounce_for(server)
        assert "5.7.1 refused by the world" in bounce.text
        server.world.clear()
        submit(server, "carol@far.test", subject="now it goes")
        assert server.wait_for_message(outbound=True, subject="now it goes", timeout=TIMEOUT)


@pytest.mark.parametrize(
    "rule",
    [
        {"stage": "connect", "reply": (421, "4.7.0 slow down")},  # a throttle
        {"stage": "MAIL", "drop": True},
        {"stage": "end-of-data", "delay": 120},  # then the real answer
    ],
    ids=["throttle", "drop", "delay"],
)
def test_each_rule_of_a_child_processs_world_holds_mail_until_advance(rule):
    with MailServer(process=True) as server:
        server.add_account(ALICE, ALICE_PW)
        rule = dict(rule)
        server.world.on(rule.pop("stage"), times=1, **rule)
        submit(server, "bob@far.test", subject="held by the world")
        server.assert_no_message(outbound=True, within=0.5)
        assert retried(server, seconds=120).subject == "held by the world"
