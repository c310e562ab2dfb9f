"""`[log] format = json` on the real server: after real SMTP and POP3
traffic, every line of its log is one JSON object, with the fields a log
collector or fail2ban looks for (issue 13, item 5)."""

from __future__ import annotations

import json
import poplib
import smtplib

import pytest
from conftest import ALICE, ALICE_PW
from test_blackbox import wait_for

pytestmark = pytest.mark.blackbox


def records(server) -> list[dict]:
    lines = server.log().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line: one object
    for record in parsed:
        assert {"time", "level", "text", "system"} <= set(record), record
    return parsed


@pytest.mark.parametrize("workers", [1, 2])
def test_every_line_is_json_with_the_fields_that_matter(make_server, workers):
    server = make_server(
        f"[mailbox]\nworkers = {workers}\n[log]\nformat = json\n"
    ).add_test_accounts()
    server.start()
    if workers > 1:
        assert wait_for(lambda: "worker 1 serving" in server.log(), timeout=20)
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        s.sendmail("a@far.test", [ALICE], b"Subject: hi\r\n\r\nbody\r\n")
        s.mail("a@far.test")
        assert s.rcpt("nobody@example.test")[0] == 550
        s.rset()
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(ALICE)
    p.pass_(ALICE_PW)
    assert p.stat()[0] == 1
    p.quit()
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(ALICE)
    with pytest.raises(poplib.error_proto):
        p.pass_("wrong password")
    p.quit()
    assert wait_for(lambda: any("retrieved" in r["text"] for r in records(server)))
    assert wait_for(lambda: any("login failed" in r["text"] for r in records(server)))
    found = records(server)

    [accepted] = [r for r in found if r["text"].startswith("accepted ")]
    assert accepted["queue_id"] in accepted["text"] and len(accepted["queue_id"]) == 12
    assert accepted["client"] == "127.0.0.1" and accepted["code"] == 250
    assert accepted["recipients"] == [ALICE] and accepted["level"] == "info"
    assert accepted["time"].endswith("Z")

    [refused] = [r for r in found if r["text"].startswith("smtp rcpt refused")]
    assert refused["client"] == "127.0.0.1" and refused["code"] >= 500

    sessions = [r for r in found if r["text"].startswith("smtp session from")]
    assert sessions and all(f" on {r['listener']}: " in r["text"] for r in sessions)
    assert any(r["listener"] == "listen" for r in sessions)

    [login] = [r for r in found if r["text"].startswith(f"pop3 login {ALICE} from")]
    assert login["account"] == ALICE and login["client"] == "127.0.0.1"
    [retrieved] = [r for r in found if "retrieved" in r["text"]]
    assert retrieved["account"] == ALICE and retrieved["count"] == 0
    failed = [r for r in found if "login failed" in r["text"]]
    assert failed and failed[0]["client"] == "127.0.0.1"
    if workers > 1:  # which process said what
        assert any(r.get("worker") == 1 for r in found)
    server.check_log()
