"""mailboxd.testing's web page in a real headless Chromium, driven over the
Chrome DevTools Protocol: a message sent over SMTP appears, opens, and the
script in its HTML does not run, nor is its remote image fetched unless asked.

Needs Chromium (Debian's `chromium`; skipped without it unless CI=true) and
Message.html (mailboxd.testing.api) for the HTML view.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import websocket
from conftest import need

from mailboxd.testing import MailServer

ALICE = "alice@example.test"


class DevTools:
    """A minimal CDP client over one websocket (flat sessions)."""

    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url, timeout=20, suppress_origin=True)
        self.next = 0
        self.events: list[dict[str, Any]] = []

    def __call__(self, method: str, session: str | None = None, **params: Any) -> Any:
        self.next += 1
        message: dict[str, Any] = {"id": self.next, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            answer = json.loads(self.ws.recv())
            if answer.get("id") != self.next:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            return answer["result"]

    def evaluate(self, session: str, expression: str) -> Any:
        result = self("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def until(self, what: str, check: Callable[[], Any], timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s")
            time.sleep(0.1)


@pytest.fixture
def chromium():
    path = need("chromium")
    with tempfile.TemporaryDirectory(
        prefix="mailbox-chromium-", ignore_cleanup_errors=True
    ) as profile:
        proc = subprocess.Popen(
            [
                path,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (active.exists() and len(active.read_text().splitlines()) >= 2):
                assert proc.poll() is None, "chromium exited"
                assert time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.05)
            port, path_ = active.read_text().splitlines()[:2]
            cdp = DevTools(f"ws://127.0.0.1:{port}{path_}")
            yield cdp
            cdp.ws.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def remote_images():
    """A web server standing in for a remote image host: what it was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.end_headers()
            self.wfile.write(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], asked
    server.shutdown()
    server.server_close()


def html_mail(image_port: int) -> bytes:
    html = (
        "<html><head><title>original</title></head><body>"
        "<p id=words>html words here</p>"
        "<script>document.title='pwned';"
        "document.body.setAttribute('data-pwned','1');"
        "document.getElementById('words').textContent='pwned'</script>"
        f'<img src="http://127.0.0.1:{image_port}/remote.gif">'
        "</body></html>"
    )
    return (
        "From: someone@far.test\r\nTo: alice@example.test\r\nSubject: dangerous mail\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nplain words\r\n"
        f"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b--\r\n"
    ).encode()


def frame_documents(cdp: DevTools, session: str) -> list[dict[str, Any]]:
    """Each document in the page's frames, the sandboxed iframe included:
    its URL, title, texts and attributes, read over DevTools, not by the
    page's scripts (which cannot reach into the frame). A frame in another
    process is reached through its own, auto-attached target."""
    documents: list[dict[str, Any]] = []

    def walk(node: dict[str, Any], doc: dict[str, Any]) -> None:
        if node.get("nodeType") == 9:
            doc = {"url": node.get("documentURL", ""), "title": None, "texts": [], "attrs": []}
            documents.append(doc)
        if node.get("nodeName") == "TITLE":
            doc["title"] = "".join(c.get("nodeValue", "") for c in node.get("children", []))
        if node.get("nodeValue"):
            doc["texts"].append(node["nodeValue"])
        attributes = node.get("attributes", [])
        doc["attrs"] += list(zip(attributes[::2], attributes[1::2], strict=True))
        for child in node.get("children", []):
            walk(child, doc)
        if "contentDocument" in node:
            walk(node["contentDocument"], doc)

    sessions = [session] + [
        e["params"]["sessionId"]
        for e in cdp.events
        if e.get("method") == "Target.attachedToTarget"
        and e["params"]["targetInfo"]["type"] == "iframe"
    ]
    for s in sessions:
        try:
            root = cdp("DOM.getDocument", s, depth=-1, pierce=True)["root"]
        except RuntimeError:
            continue  # a frame that is gone
        walk(root, {})
    return documents


def the_mail(cdp: DevTools, session: str) -> dict[str, Any] | None:
    """The sandboxed frame's document, once the message's HTML is in it."""
    for doc in frame_documents(cdp, session):
        if "/api/v1/messages/" in doc["url"] and doc["title"] is not None:
            return doc
    return None


def test_the_page_lists_mail_live_and_never_runs_its_scripts(chromium, remote_images):
    image_port, asked = remote_images
    cdp = chromium
    with MailServer(http=True) as server:
        server.add_account(ALICE, "pw")
        page = f"http://127.0.0.1:{server.http_port}/"
        target = cdp("Target.createTarget", url=page)["targetId"]
        session = cdp("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        cdp(
            "Target.setAutoAttach",
            session,
            autoAttach=True,
            waitForDebuggerOnStart=False,
            flatten=True,
        )
        cdp("Runtime.enable", session)
        cdp.until(
            "the page is live",
            lambda: cdp.evaluate(session, "document.getElementById('state').textContent") == "live",
        )
        assert cdp.evaluate(session, "document.querySelectorAll('tr.message').length") == 0

        # Sent after the page loaded: it appears without a reload.
        with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
            smtp.sendmail("someone@far.test", [ALICE], html_mail(image_port))
        row = "document.querySelector('tr.message')"
        subject = cdp.until(
            "the message is listed",
            lambda: cdp.evaluate(session, f"{row} && {row}.cells[4].textContent"),
        )
        assert subject == "dangerous mail"

        # Open it: headers, text and raw are shown, the HTML in the sandboxed frame.
        cdp.evaluate(session, f"{row}.click()")
        cdp.until(
            "the message opens",
            lambda: "dangerous mail" in cdp.evaluate(session, "document.body.innerText"),
        )
        cdp.until(
            "the raw source is shown",
            lambda: (
                "Subject: dangerous mail"
                in cdp.evaluate(session, "document.getElementById('raw').textContent")
            ),
        )
        frame = "document.getElementById('html')"
        assert cdp.evaluate(session, f"{frame}.getAttribute('sandbox')") == ""
        assert cdp.evaluate(session, f"{frame}.src").endswith("/html")
        inside = cdp.until("the HTML is shown in its frame", lambda: the_mail(cdp, session))
        time.sleep(0.5)  # time for a script, or an image, to run or load
        inside = the_mail(cdp, session)
        assert inside is not None
        # The script would set the title, an attribute and the paragraph's text.
        assert inside["title"] == "original"
        assert ("data-pwned", "1") not in inside["attrs"]
        assert "html words here" in inside["texts"]
        assert asked == []  # no remote image without asking
        assert cdp.evaluate(session, "document.title") == "Mailbox test server"

        # Asked to: the remote image loads (so the listener above would have seen it).
        cdp.evaluate(session, "document.getElementById('images').click()")
        cdp.until("the remote image is fetched when asked", lambda: asked)
        assert asked == ["/remote.gif"]
        inside = the_mail(cdp, session)
        assert inside is not None and inside["url"].endswith("/html?images=1")
        assert inside["title"] == "original" and "html words here" in inside["texts"]
