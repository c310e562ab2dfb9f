"""DNS blocklists (issue 15, item 3), on the real server with a blocklist
zone served by a DNS server on loopback: a listed client that has not
logged in is refused at RCPT, and may still AUTH and relay; an address the
zone does not list, and a blocklist that does not answer, let mail in."""

from __future__ import annotations

import poplib
import smtplib
import time

import pytest
from conftest import ALICE, ALICE_PW
from zone_server import A, ZoneServer, silent_dns

from mailboxd.dnsbl import query_name

pytestmark = pytest.mark.blackbox

LISTED = "127.0.0.1"  # the loopback address the test client uses by default


@pytest.fixture
def blocklist(tmp_path):
    dns = ZoneServer(tmp_path)
    dns.add("bl.test", A(query_name(LISTED, "bl.test"), "127.0.0.2"))
    yield dns.start()
    dns.stop()


def send_from(server, source: str, login: bool = False) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=20, source_address=(source, 0)) as s:
        s.ehlo("client.far.test")
        if login:
            s.login(ALICE, ALICE_PW)
        s.mail(ALICE if login else "a@far.test")
        reply = s.rcpt(ALICE)
        if login:
            assert s.rcpt("someone@far.test")[0] == 250  # it may relay, too
        s.rset()
        return reply


def test_a_listed_client_is_refused_unless_it_logs_in(make_server, blocklist):
    server = make_server(
        f"[mailbox]\ntrusted_networks =\nresolver = {blocklist.address}\n"
        "[inbound]\ndnsbl = bl.test\n"
    )
    server.add_test_accounts().start()
    assert send_from(server, LISTED) == (
        554,
        b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test",
    )
    assert send_from(server, "127.0.0.2")[0] == 250  # not listed
    assert send_from(server, LISTED, login=True)[0] == 250
    assert "listed in bl.test" in server.log()
    # A POP3 login authorises the address: its mail is let in too.
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    p.quit()
    assert send_from(server, LISTED)[0] == 250
    server.check_log()


def test_trusted_networks_are_not_looked_up(make_server, blocklist):
    server = make_server(
        f"[mailbox]\ntrusted_networks = 127.0.0.1/32\nresolver = {blocklist.address}\n"
        "[inbound]\ndnsbl = bl.test\n"
    )
    server.add_test_accounts().start()
    assert send_from(server, LISTED)[0] == 250
    assert "listed in bl.test" not in server.log()


def test_a_blocklist_that_does_not_answer_lets_mail_in(make_server):
    with silent_dns() as nobody:
        server = make_server(
            f"[mailbox]\ntrusted_networks =\nresolver = {nobody}\n[inbound]\ndnsbl = bl.test\n"
        )
        server.add_test_accounts().start()
        began = time.monotonic()
        assert send_from(server, LISTED)[0] == 250
        assert time.monotonic() - began < 10
