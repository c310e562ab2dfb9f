"""mailboxd.testing's HTTP API (MailServer(http=True)): its OpenAPI file is
valid, and every answer the server really gives matches it.

"""

from __future__ import annotations

import json
import smtplib
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from mailboxd.testing import MailServer

ALICE, ALICE_PW = "alice@example.test", "alice pw"
FAR = "someone@far.test"
HTML_MAIL = (
    b"From: someone@far.test\r\nSubject: html mail\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nplain words https://example.test/a\r\n"
    b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<p>html words <a href="https://example.test/b">b</a></p>\r\n--b--\r\n'
)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    from mailboxd.testing import web

    return json.loads((web.HERE / "openapi.json").read_text())


@pytest.fixture
def box():
    with MailServer(http=True) as server:
        yield server


class Client:
    """Calls the API; each JSON answer is checked against the OpenAPI file."""

    def __init__(self, server: Any, spec: dict[str, Any]) -> None:
        self.base = f"http://127.0.0.1:{server.http_port}"
        self.spec = spec
        self.seen: set[tuple[str, str]] = set()

    def __call__(
        self, method: str, template: str, body: Any = None, query: str = "", **params: Any
    ) -> tuple[int, Any, Any]:
        path = template.format(**params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path + query, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, headers, raw = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, e.headers, e.read()
        operation = self.spec["paths"][template][method.lower()]
        self.seen.add((template, method.lower()))
        described = operation["responses"].get(str(status))
        assert described is not None, f"{method} {path}: {status} is not in the OpenAPI file"
        content = described.get("content", {})
        if status == 204:
            assert raw == b"" and not content
            return status, None, headers
        kind = headers.get_content_type()
        assert kind in content, f"{method} {path}: {kind} is not described for {status}"
        if kind != "application/json":
            return status, raw, headers
        value = json.loads(raw)
        schema = {**content[kind]["schema"], "components": self.spec["components"]}
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
        return status, value, headers


@pytest.fixture
def api(box, spec):
    return Client(box, spec)


def send(server: Any, to: str, raw: bytes, sender: str = FAR) -> None:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as s:
        s.sendmail(sender, [to], raw)


def test_the_openapi_file_is_valid(spec):
    validate(spec)


def test_every_operation_answers_as_the_openapi_file_says(box, api, spec):
    assert api("GET", "/api/v1")[1]["http_port"] == box.http_port
    assert api("GET", "/api/v1/openapi.json")[1] == spec
    assert api("POST", "/api/v1/accounts", {"address": ALICE, "password": ALICE_PW})[0] == 201
    assert api("POST", "/api/v1/accounts", {"address": "x@far.test", "password": "p"})[0] == 400
    assert api("POST", "/api/v1/accounts", {"address": ALICE})[0] == 400
    assert api("GET", "/api/v1/accounts")[1] == {"accounts": [ALICE]}
    send(box, ALICE, HTML_MAIL)
    status, message, _ = api("GET", "/api/v1/wait", query=f"?to={ALICE}&subject=html*")
    assert status == 200 and message["subject"] == "html mail"
    assert message["account"] == ALICE and message["outbound"] is False
    assert ["Subject", "html mail"] in message["headers"]
    ident = message["id"]
    assert api("GET", "/api/v1/messages/{id}", id=ident)[1] == message
    assert api("GET", "/api/v1/messages/{id}", id=999)[0] == 404
    status, raw, headers = api("GET", "/api/v1/messages/{id}/raw", id=ident)
    assert status == 200 and b"Subject: html mail" in raw
    assert headers["X-Content-Type-Options"] == "nosniff"
    api("GET", "/api/v1/messages/{id}/html", id=ident)
    api("GET", "/api/v1/messages/{id}/find", query="?pattern=words", id=ident)
    assert api("GET", "/api/v1/messages/{id}/find", id=ident)[0] == 400
    delivered = api("POST", "/api/v1/messages", {"to": ALICE, "raw": "Subject: put\n\nhi\n"})
    assert delivered[0] == 201 and delivered[1]["subject"] == "put"
    assert api("POST", "/api/v1/messages", {"to": "x@far.test", "raw": "x"})[0] == 400
    listed = api("GET", "/api/v1/messages")[1]["messages"]
    assert [m["id"] for m in listed] == [ident, delivered[1]["id"]]
    assert api("GET", "/api/v1/messages", query="?subject=put")[1]["messages"] == [delivered[1]]
    assert api("GET", "/api/v1/messages", query="?to=x@far.test")[0] == 400
    assert api("GET", "/api/v1/messages", query="?outbound=maybe")[0] == 400
    assert api("GET", "/api/v1/messages", query=f"?after={ident}")[1]["messages"] == [delivered[1]]
    assert api("DELETE", "/api/v1/messages/{id}", id=delivered[1]["id"])[0] == 204
    assert api("DELETE", "/api/v1/messages/{id}", id=delivered[1]["id"])[0] == 404
    assert [m.subject for m in box.messages()] == ["html mail"]
    status, error, _ = api("GET", "/api/v1/wait", query="?subject=none&timeout=0.2")
    assert status == 404 and error["error"] == "timeout" and error["arrived"] == 1
    assert api("GET", "/api/v1/wait", query="?timeout=-1")[0] == 400
    rule = api("POST", "/api/v1/faults", {"point": "smtp.RCPT", "reply": [550, "5.1.1 no"]})
    assert rule[0] == 201 and rule[1]["reply"] == [550, "5.1.1 no"]
    assert api("POST", "/api/v1/faults", {"point": "nowhere", "drop": True})[0] == 400
    assert len(api("GET", "/api/v1/faults")[1]["faults"]) == 1
    assert api("DELETE", "/api/v1/faults")[0] == 204 and box.faults.rules == []
    world = api("POST", "/api/v1/world", {"stage": "RCPT", "reply": [550, "5.1.1 no"]})
    assert world[0] == 201 and world[1]["point"] == "RCPT"
    assert api("POST", "/api/v1/world", {"stage": "HELO", "drop": True})[0] == 400
    assert len(api("GET", "/api/v1/world")[1]["world"]) == 1
    assert api("DELETE", "/api/v1/world")[0] == 204 and box.world.rules == []
    assert api("POST", "/api/v1/advance", {"seconds": 3601})[1] == {"offset": 3601.0}
    assert api("POST", "/api/v1/advance", {"seconds": "soon"})[0] == 400
    assert api("DELETE", "/api/v1/accounts/{address}", address="bob@example.test")[0] == 404
    assert api("DELETE", "/api/v1/accounts/{address}", address=ALICE)[0] == 204
    assert box.accounts() == []
    assert api("POST", "/api/v1/reset")[0] == 204
    assert box.messages() == [] and box.clock.offset == 0
    assert api("GET", "/api/v1/messages")[1] == {"messages": []}
    every = {(p, m) for p, ops in spec["paths"].items() for m in ops if m != "parameters"}
    assert every - api.seen == set()


def test_errors_are_json_with_the_right_status(box):
    base = f"http://127.0.0.1:{box.http_port}"
    for method, path, status in [
        ("GET", "/api/v1/nothing", 404),
        ("PUT", "/api/v1/reset", 405),
        ("GET", "/api/v1/reset", 405),
        ("POST", "/api/v1/advance", 400),  # no body
    ]:
        request = urllib.request.Request(base + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == status
        assert caught.value.headers.get_content_type() == "application/json"
        assert set(json.loads(caught.value.read())) >= {"error", "message"}
    request = urllib.request.Request(base + "/api/v1/advance", data=b"[1]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400


def test_wait_long_polls_without_blocking_the_reactor(box, api):
    """A wait answers when the mail arrives; meanwhile the server goes on."""
    box.add_account(ALICE, ALICE_PW)
    answers: list = []
    waiting = threading.Thread(
        target=lambda: answers.append(
            api("GET", "/api/v1/wait", query=f"?to={ALICE}&subject=late&timeout=20")
        )
    )
    started = time.monotonic()
    waiting.start()
    time.sleep(0.3)
    assert api("GET", "/api/v1/accounts")[1] == {"accounts": [ALICE]}  # not blocked
    send(box, ALICE, b"Subject: late\r\n\r\nhi\r\n")
    waiting.join(20)
    assert answers and answers[0][0] == 200 and answers[0][1]["subject"] == "late"
    assert time.monotonic() - started < 10


def test_outbound_mail_is_listed_and_waited_for(box, api):
    box.add_account(ALICE, ALICE_PW)
    with smtplib.SMTP(box.host, box.submission_port, timeout=10) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, ["Boss@far.test"], b"Subject: report\r\n\r\n42\r\n")
    status, sent, _ = api("GET", "/api/v1/wait", query="?outbound=true&to=boss@far.test&timeout=10")
    assert status == 200 and sent["outbound"] is True and sent["account"] is None
    assert sent["recipients"] == ["Boss@far.test"]
    assert api("GET", "/api/v1/messages")[1]["messages"] == []
    assert api("GET", "/api/v1/messages", query="?outbound=any")[1]["messages"] == [sent]
    status, raw, _ = api("GET", "/api/v1/messages/{id}/raw", id=sent["id"])
    assert b"\r\nSubject: report\r\n" in raw


def test_ids_are_never_given_again(box, api):
    box.add_account(ALICE, ALICE_PW)
    first = box.deliver(ALICE, b"Subject: one\n\n1\n")
    assert first == box.messages()[0]
    [one] = api("GET", "/api/v1/messages")[1]["messages"]
    box.reset()
    box.add_account(ALICE, ALICE_PW)
    box.deliver(ALICE, b"Subject: two\n\n2\n")
    [two] = api("GET", "/api/v1/messages")[1]["messages"]
    assert two["id"] > one["id"]
    assert api("GET", "/api/v1/messages/{id}", id=one["id"])[0] == 404


def test_delete_removes_a_delivered_message_from_the_mailbox(box, api):
    import poplib

    box.add_account(ALICE, ALICE_PW)
    box.deliver(ALICE, b"Subject: keep\n\n1\n")
    box.deliver(ALICE, b"Subject: drop\n\n2\n")
    [drop] = api("GET", "/api/v1/messages", query="?subject=drop")[1]["messages"]
    assert api("DELETE", "/api/v1/messages/{id}", id=drop["id"])[0] == 204
    pop = poplib.POP3(box.host, box.pop3_port, timeout=10)
    pop.user(ALICE)
    pop.pass_(ALICE_PW)
    assert pop.stat()[0] == 1
    pop.quit()


def test_the_page_and_its_files_have_a_strict_policy(box):
    base = f"http://127.0.0.1:{box.http_port}"
    for path, kind in [
        ("/", "text/html"),
        ("/app.js", "text/javascript"),
        ("/app.css", "text/css"),
    ]:
        with urllib.request.urlopen(base + path, timeout=10) as answer:
            assert answer.headers.get_content_type() == kind
            assert answer.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert box._http.getHost().host == "127.0.0.1"


def test_message_parts_and_the_html_endpoints_policy(box, api):
    box.add_account(ALICE, ALICE_PW)
    send(box, ALICE, HTML_MAIL)
    message = api("GET", "/api/v1/wait", query="?subject=html*")[1]
    assert "plain words" in message["text"]
    assert "html words" in message["html"]
    assert "https://example.test/b" in message["links"]
    found = api(
        "GET", "/api/v1/messages/{id}/find", query="?pattern=plain%20w.rds", id=message["id"]
    )
    assert found[0] == 200 and found[1]["found"] == "plain words"
    nothing = api("GET", "/api/v1/messages/{id}/find", query="?pattern=absent", id=message["id"])
    assert nothing[0] == 200 and nothing[1]["found"] is None
    listed = api("GET", "/api/v1/messages", query="?pattern=plain%20words")[1]["messages"]
    assert [m["id"] for m in listed] == [message["id"]]
    status, html, headers = api("GET", "/api/v1/messages/{id}/html", id=message["id"])
    assert status == 200 and b"html words" in html
    csp = headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; style-src 'unsafe-inline'; img-src data: cid:")
    assert "sandbox" in csp and headers["X-Content-Type-Options"] == "nosniff"
    images = api("GET", "/api/v1/messages/{id}/html", query="?images=1", id=message["id"])
    assert "img-src * data: cid:" in images[2]["Content-Security-Policy"]


def test_process_mode_serves_the_api_too():
    with MailServer(process=True, http=True) as server:
        assert server.http_port
        base = f"http://127.0.0.1:{server.http_port}/api/v1"
        server.add_account(ALICE, ALICE_PW)
        server.deliver(ALICE, b"Subject: in the child\n\nhi\n")
        with urllib.request.urlopen(base + "/wait?subject=in*&timeout=5", timeout=10) as answer:
            assert json.loads(answer.read())["account"] == ALICE


WORLD_RULES = {
    # stage, rule, then what the queue does: "retry" (held until advance) or "bounce"
    "defer": ("RCPT", {"reply": [451, "4.3.0 later"], "times": 1}, "retry"),
    "refuse": ("RCPT", {"reply": [550, "5.1.1 no such user"]}, "bounce"),
    "drop": ("MAIL", {"drop": True, "times": 1}, "retry"),
    "delay": ("end-of-data", {"delay": 120, "times": 1}, "retry"),
    "throttle": ("connect", {"reply": [421, "4.7.0 slow down"], "times": 1}, "retry"),
}


@pytest.mark.parametrize("kind", list(WORLD_RULES))
def test_each_world_rule_over_http_through_the_real_queue(box, api, kind):
    stage, rule, then = WORLD_RULES[kind]
    assert api("POST", "/api/v1/accounts", {"address": ALICE, "password": ALICE_PW})[0] == 201
    assert api("POST", "/api/v1/world", {"stage": stage, **rule})[0] == 201
    with smtplib.SMTP(box.host, box.submission_port, timeout=10) as s:
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, ["bob@far.test"], f"Subject: {kind}\r\n\r\nhi\r\n".encode())
    if then == "bounce":
        status, bounce, _ = api("GET", "/api/v1/wait", query=f"?to={ALICE}&timeout=10")
        assert status == 200 and bounce["envelope_from"] == ""
        assert "5.1.1 no such user" in bounce["text"]
        return
    held = api("GET", "/api/v1/wait", query="?outbound=true&timeout=0.5")
    assert held[0] == 404  # the world has not taken it
    status, sent = 404, None
    for _ in range(5):  # the queue retries a minute on, then later
        api("POST", "/api/v1/advance", {"seconds": 120})
        status, sent, _ = api(
            "GET", "/api/v1/wait", query=f"?outbound=true&subject={kind}&timeout=2"
        )
        if status == 200:
            break
    assert status == 200 and sent["recipients"] == ["bob@far.test"]
