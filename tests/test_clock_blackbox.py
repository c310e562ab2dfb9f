"""Black-box tests of wall-clock steps (issue 11, item 6): the real server runs
under libfaketime, and the test steps its wall clock while it serves.

FAKETIME_DONT_FAKE_MONOTONIC=1 leaves the monotonic clock alone, as a real
`date -s` or NTP step does (without it libfaketime moves both, and these
tests would prove nothing). The offset is read from a file, which the test
rewrites to step the clock.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import glob
import json
import os
import time
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, MailServer, ctl, need
from test_blackbox import wait_for
from test_outbound_blackbox import Capture, message, send
from test_relay_blackbox import pop_from, smtp_from

pytestmark = pytest.mark.blackbox

FAR = "someone@far.test"


def libfaketime() -> str:
    """The library Debian's faketime preloads; skip without it, unless CI=true."""
    need("faketime")
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("libfaketime.so.1 is not installed, and CI=true requires it")
        pytest.skip("libfaketime.so.1 is not installed")
    return found[0]


class WallClock:
    """The server's wall clock: real time plus an offset the test sets."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step(0)

    def step(self, seconds: int) -> None:
        """From now on the server's wall clock is `seconds` off real time."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{seconds:+d}\n")
        tmp.replace(self.path)
        time.sleep(1.5)  # the library reads the file again after its 1 s cache


@pytest.fixture
def stepped(make_server):
    """start(extra): a server under libfaketime, and its WallClock."""
    library = libfaketime()

    def start(extra: str = "") -> tuple[MailServer, WallClock]:
        server = make_server(extra)
        server.add_test_accounts()
        clock = WallClock(server.home / "faketime")
        server.daemon_env = {
            "LD_PRELOAD": library,
            "FAKETIME_TIMESTAMP_FILE": str(clock.path),
            "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        return server.start(), clock

    return start


def received_at(server: MailServer, subject: str) -> float:
    """The Unix time in the Received: header of the local message `subject`."""
    for path in server.messages(ALICE):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        if msg["Subject"] == subject:
            stamp = str(msg["Received"]).rsplit(";", 1)[1].strip()
            return email.utils.parsedate_to_datetime(stamp).timestamp()
    raise AssertionError(f"no message {subject!r}")


def deliver_locally(server: MailServer, subject: str) -> None:
    r = smtp_from(server, "127.0.0.61")
    r.send(f"MAIL FROM:<friend@far.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    r.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    assert r.reply().startswith("250 ")
    r.close()


def envelope(server: MailServer, entry_id: str) -> dict:
    return json.loads((server.mail_dir / ".queue" / f"{entry_id}.json").read_text())


def test_a_step_back_stalls_no_timer(stepped):
    server, clock = stepped("[smtp]\nidle_timeout = 4\n")
    capture = Capture(server.home, server.smarthost_port)
    entry_id = send(server, [FAR], message("before the step"))
    assert wait_for(lambda: envelope(server, entry_id)["recipients"][0]["attempts"] == 1)
    idle = smtp_from(server, "127.0.0.62")
    opened = time.monotonic()
    clock.step(-3600)

    # The session's timeout, started before the step, still counts 4 s, not
    # 4 s plus an hour.
    assert idle.reply().startswith("421 ")
    assert idle.closed()
    assert time.monotonic() - opened < 8

    # The clock did go back for the server: what it stamps says so.
    deliver_locally(server, "after the step")
    assert time.time() - received_at(server, "after the step") > 3500

    # The accounts file is still watched (every second): a new account can log in.
    server.add_user("carol@example.test", "carol pw")
    time.sleep(3)
    p = pop_from(server, "127.0.0.63")
    p.send("USER carol@example.test\r\nPASS carol pw\r\nQUIT\r\n")
    assert p.line().startswith("+OK")
    assert p.line().startswith("+OK"), server.log()
    p.close()

    # And `queue flush` is heard: the deferred message goes out now.
    capture.start()
    try:
        ctl(server, "queue", "flush")
        assert wait_for(lambda: len(capture.messages()) == 1, timeout=10), server.log()
    finally:
        capture.stop()
    server.check_log()


def test_a_step_forward_ends_nothing_early(stepped):
    server, clock = stepped("[relay]\nqueue_lifetime = 3600\n")
    entry_id = send(server, [FAR], message("young message"))
    assert wait_for(lambda: envelope(server, entry_id)["recipients"][0]["attempts"] == 1)
    p = pop_from(server, "127.0.0.64")
    p.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert p.line().startswith("+OK") and p.line().startswith("+OK")

    clock.step(2 * 3600)
    deliver_locally(server, "after the step")
    assert received_at(server, "after the step") - time.time() > 7000

    # The POP3 session's 10-minute timeout has not "passed".
    p.send("NOOP\r\n")
    assert p.line() == "+OK"

    # The message is seconds old, not two hours: it is tried again, and
    # deferred again, not bounced as expired.
    ctl(server, "queue", "flush")
    assert wait_for(lambda: envelope(server, entry_id)["recipients"][0]["attempts"] == 2)
    [rcpt] = envelope(server, entry_id)["recipients"]
    assert rcpt["status"] == "deferred", rcpt
    p.send("QUIT\r\n")
    assert p.line().startswith("+OK")
    p.close()
    server.check_log()
