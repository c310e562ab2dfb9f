"""Relay limits per sender (issue 15, item 1), on the real server: an
account, and a POP-authorised address, may relay `relay_recipients_per_hour`
recipients in an hour; the next gets 451, local mail still flows, mailboxctl
lists and resets the counts, and they survive a restart."""

from __future__ import annotations

import poplib
import smtplib
import time

import pytest
from conftest import ALICE, ALICE_PW, BOB, BOB_PW, _hash, ctl

from mailboxd.config import load
from mailboxd.state import FailureLimit, client_key, open_store

pytestmark = pytest.mark.blackbox

LIMITED_ALICE = (451, b"4.7.1 Relay limit reached for alice@example.test, try again later")
LIMITED_IP = (451, b"4.7.1 Relay limit reached for 127.0.0.1, try again later")


def relay(s: smtplib.SMTP, sender: str, count: int) -> None:
    """`count` relayed recipients, in transactions of 100, each abandoned."""
    while count:
        n = min(count, 100)
        s.mail(sender)
        for i in range(n):
            assert s.rcpt(f"r{count}-{i}@far.test")[0] == 250
        s.rset()
        count -= n


def session(server, login: tuple[str, str] | None) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.submission_port if login else server.smtp_port, timeout=30)
    s.ehlo("pc.example.test")
    if login:
        s.login(*login)
    return s


def test_the_501st_relayed_recipient_waits_local_mail_flows_and_it_survives_a_restart(untrusted):
    server = untrusted()
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)  # authorises 127.0.0.1
    p.user(BOB)
    p.pass_(BOB_PW)
    p.quit()
    with session(server, (ALICE, ALICE_PW)) as s:
        relay(s, ALICE, 500)
        s.mail(ALICE)
        assert s.rcpt("one-more@far.test") == LIMITED_ALICE
        assert s.rcpt("and-another@far.test") == LIMITED_ALICE
        assert s.rcpt(BOB)[0] == 250  # local delivery is not limited
        s.rset()
    with session(server, None) as s:  # no AUTH: POP-before-SMTP, counted per address
        relay(s, BOB, 500)
        s.mail(BOB)
        assert s.rcpt("one-more@far.test") == LIMITED_IP
        assert s.rcpt(ALICE)[0] == 250
        s.rset()
    listed = ctl(server, "limits", "list").stdout.splitlines()
    assert "alice@example.test\t500 recipients relayed in the last hour of 500\tover" in listed
    assert "127.0.0.1\t500 recipients relayed in the last hour of 500\tover" in listed

    server.stop()
    server.start()
    with session(server, (ALICE, ALICE_PW)) as s:
        s.mail(ALICE)
        assert s.rcpt("after-restart@far.test") == LIMITED_ALICE
        assert ctl(server, "limits", "reset", ALICE).stdout == "reset alice@example.test\n"
        assert s.rcpt("after-reset@far.test")[0] == 250
    with session(server, None) as s:
        s.mail(BOB)
        assert s.rcpt("after-restart@far.test") == LIMITED_IP
        assert ctl(server, "limits", "reset", "127.0.0.1").stdout == "reset 127.0.0.1\n"
        assert s.rcpt("after-reset@far.test")[0] == 250
    # Said once an hour for each sender: not again at each refusal, nor after a restart.
    assert server.log().count("relay limit reached for alice@example.test") == 1
    assert server.log().count("relay limit reached for 127.0.0.1") == 1
    ctl(server, "limits", "reset", "127.0.0.2", ok=(1,))
    listed = ctl(server, "limits", "list").stdout.splitlines()
    assert listed == [
        "127.0.0.1\t1 recipients relayed in the last hour of 500\tok",
        "alice@example.test\t1 recipients relayed in the last hour of 500\tok",
    ]


def test_an_account_may_have_its_own_limit(make_server):
    server = make_server("[mailbox]\ntrusted_networks =\n[limits]\nrelay_recipients_per_hour = 2\n")
    server.add_test_accounts()
    with server.accounts.open("a") as f:
        f.write(f"news@example.test:{_hash('news pw')}::::::relay_recipients_per_hour=5\n")
    server.start()
    with session(server, ("news@example.test", "news pw")) as s:
        relay(s, "news@example.test", 4)
        listed = ctl(server, "limits", "list").stdout
        assert listed == "news@example.test\t4 recipients relayed in the last hour of 5\tnear\n"
        relay(s, "news@example.test", 1)
        s.mail("news@example.test")
        assert s.rcpt("sixth@far.test")[0] == 451
    with session(server, (ALICE, ALICE_PW)) as s:
        relay(s, ALICE, 2)
        s.mail(ALICE)
        assert s.rcpt("third@far.test") == LIMITED_ALICE
    # A new password keeps the account's own settings.
    ctl(server, "user", "passwd", "news@example.test", input="new pw\n")
    assert "::::::relay_recipients_per_hour=5" in server.accounts.read_text()


def test_trusted_networks_are_not_counted(make_server):
    server = make_server("[limits]\nrelay_recipients_per_hour = 1\n").add_test_accounts().start()
    with session(server, None) as s:
        relay(s, ALICE, 3)
    assert ctl(server, "limits", "list").stdout == ""


# --- quotas (issue 15, item 4) ------------------------------------------------------


def test_a_full_mailbox_refuses_with_452_and_can_still_be_read_and_emptied(make_server):
    server = make_server("[mailbox]\nquota = 4000\n").add_test_accounts().start()
    new = server.maildir(ALICE) / "new"
    new.mkdir(parents=True, exist_ok=True)
    old = b"Subject: old\n\n" + (b"x" * 99 + b"\n") * 50  # delivered before the quota was set
    (new / "1700000000.M1P1.old").write_bytes(old)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.ehlo("client.far.test")
        s.mail("a@far.test")
        assert s.rcpt(ALICE) == (452, b"4.2.2 Mailbox full")
        assert s.rcpt(BOB)[0] == 250  # another mailbox: no quota trouble
        s.rset()
    listed = ctl(server, "user", "list").stdout
    assert f"alice@example.test\t{len(old)} bytes of 4000 ({len(old) * 100 // 4000}%)" in listed

    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    assert p.retr(1)[1][0] == b"Subject: old"
    p.dele(1)
    p.quit()

    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.sendmail("a@far.test", [ALICE], b"Subject: fits\r\n\r\n" + (b"y" * 98 + b"\r\n") * 15)
        s.mail("a@far.test")
        assert s.rcpt(ALICE)[0] == 250  # not full yet...
        s.rcpt(BOB)
        # ...but this one would overflow it: nothing is delivered, to anybody,
        # and the sender keeps the message.
        too_big = b"Subject: too big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 30
        assert s.data(too_big) == (452, b"4.2.2 Mailbox full")
    assert [b"Subject: fits" in p.read_bytes() for p in server.messages(ALICE)] == [True]
    assert server.messages(BOB) == []
    server.check_log()


def test_an_account_may_have_its_own_quota(make_server):
    server = make_server().add_test_accounts()  # [mailbox] quota = 0: none
    with server.accounts.open("a") as f:
        f.write(f"small@example.test:{_hash('small pw')}::::::quota=100\n")
    new = server.maildir("small@example.test") / "new"
    new.mkdir(parents=True)
    (new / "1700000000.M1P1.old").write_bytes(b"Subject: old\n\n" + b"x" * 100 + b"\n")
    server.start()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as s:
        s.ehlo("client.far.test")
        s.mail("a@far.test")
        assert s.rcpt("small@example.test") == (452, b"4.2.2 Mailbox full")
        assert s.rcpt(ALICE)[0] == 250  # no quota: never full
        s.rset()
    listed = ctl(server, "user", "list").stdout
    assert "small@example.test\t115 bytes of 100 (115%)" in listed


# --- IPv6 clients by network (issue 15, item 2) ---------------------------------------


def test_mailboxctl_shows_and_clears_an_ipv6_network(make_server, monkeypatch):
    server = make_server().add_test_accounts()  # not started: the store is mailboxctl's
    monkeypatch.chdir(server.home)  # the config's paths are relative
    config = load(server.config)
    store = open_store(config)
    now = time.time()
    for i in range(10):  # ten addresses of one /64: the network is blocked
        store.record_failure(
            client_key(f"2001:db8:1:2::{i}", 64), now, FailureLimit(10, 3600, 3600)
        )
    store.count_relay(client_key("2001:db8:1:2::99", 64), now, 0)
    store.close()
    [line] = ctl(server, "blocked", "list").stdout.splitlines()
    assert line.startswith("2001:db8:1:2::/64\tblocked since ")
    unblocked = ctl(server, "blocked", "unblock", "2001:db8:1:2::77").stdout
    assert unblocked == "unblocked 2001:db8:1:2::/64\n"
    assert ctl(server, "blocked", "list").stdout == ""
    listed = ctl(server, "limits", "list").stdout
    assert listed == "2001:db8:1:2::/64\t1 recipients relayed in the last hour of 500\tok\n"
    assert ctl(server, "limits", "reset", "2001:db8:1:2::/64").stdout == "reset 2001:db8:1:2::/64\n"
    assert ctl(server, "limits", "list").stdout == ""
