"""Black-box tests of the outbound queue: the real twistd process relays to a
scripted capture server (tests/capture_smtp.py) standing in as the smarthost.

Everything stays on 127.0.0.1: the smarthost is the capture server on the port
conftest reserved for it (`server.smarthost_port`), or nothing at all.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MailServer, ctl, need, tool_env
from test_blackbox import wait_for

CAPTURE = Path(__file__).resolve().parent / "capture_smtp.py"
ALICE, ALICE_PW = "alice@example.test", "alice pw"
BOB, BOB_PW = "bob@other.test", "bob pw"
FAR = "someone@far.test"
# Our trace header, as the capture server sees it: first, three lines with CRLF.
RECEIVED = re.compile(
    rb"Received: from [^\r\n]+\r\n\tby mail\.example\.test \(Mailbox\) with ESMTPA? id "
    rb"(?P<id>[0-9A-F]{12})(\r\n\tfor <[^>]+>)?;\r\n\t[^\r\n]+\r\n"
)


# --- the capture server ---------------------------------------------------------


class Capture:
    """tests/capture_smtp.py as its own process, on one port, writing into `out`."""

    def __init__(self, home: Path, port: int) -> None:
        self.port = port
        self.out = home / "captured"
        self.script = home / "capture.script"
        self.log = home / "capture.log"
        self.proc: subprocess.Popen | None = None

    def set_script(self, text: str) -> None:
        """Rules for the next connections (the file is read at each one)."""
        tmp = self.script.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.script)

    def start(self) -> Capture:
        self.out.mkdir(parents=True, exist_ok=True)
        ready = self.out / ".ready"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, str(CAPTURE), "--port", str(self.port), "--out", str(self.out)]
        with self.log.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*cmd, "--script", str(self.script)], stdout=log, stderr=subprocess.STDOUT
            )
        if not wait_for(lambda: ready.exists() or self.proc.poll() is not None, timeout=20) or (
            not ready.exists()
        ):
            self.stop()
            raise RuntimeError(f"capture_smtp did not start:\n{self.log.read_text()}")
        assert f"capture_smtp listening on 127.0.0.1:{self.port}" in self.log.read_text()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def messages(self) -> list[dict]:
        """Every message answered 250: its envelope, with the data under "data"."""
        found = []
        for p in sorted(self.out.glob("*.json")):
            envelope = json.loads(p.read_text())
            envelope["data"] = p.with_suffix(".eml").read_bytes()
            found.append(envelope)
        return found

    def transcript(self) -> str:
        path = self.out / ".transcript"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def relay(make_server):
    """start(extra, capture=True, aliases=""): a server and the capture server
    as its smarthost. Logs are checked afterwards."""
    made: list[tuple[MailServer, Capture]] = []

    def start(extra: str = "", capture: bool = True, aliases: str = ""):
        server = make_server(extra)
        server.add_test_accounts()
        server.aliases.write_text(aliases)
        cap = Capture(server.home, server.smarthost_port)
        made.append((server, cap))
        if capture:
            cap.start()
        server.start()
        return server, cap

    yield start
    for server, cap in made:
        server.stop()
        cap.stop()
        server.check_log()


# --- helpers ----------------------------------------------------------------------


def queue_dir(server: MailServer) -> Path:
    return server.mail_dir / ".queue"


def queued(server: MailServer) -> list[str]:
    """Ids of the entries in the queue (those with an envelope)."""
    return sorted(p.stem for p in queue_dir(server).glob("*.json"))


def queue_is_empty(server: MailServer) -> bool:
    """No envelope, no message, no temp file left (corrupt/ aside)."""
    q = queue_dir(server)
    return not q.is_dir() or not [p for p in q.iterdir() if p.name not in ("corrupt", ".flush")]


def listing(server: MailServer) -> dict[str, dict]:
    """`mailboxctl queue list`, parsed: id -> {"head": [...], "rcpts": {address: [...]}}."""
    entries: dict[str, dict] = {}
    current = None
    for line in ctl(server, "queue", "list").stdout.splitlines():
        fields = line.split("\t")
        if line.startswith("\t"):
            assert current is not None, line
            current["rcpts"][fields[1]] = fields[2:]
        else:
            current = entries[fields[0]] = {"head": fields[1:], "rcpts": {}}
    return entries


def deferred_with(server: MailServer, entry_id: str, address: str, error: str) -> bool:
    """True once `queue list` shows the recipient deferred with `error` in its last error."""
    fields = listing(server).get(entry_id, {}).get("rcpts", {}).get(address)
    return bool(
        fields
        and fields[0] == "deferred"
        and any(f.startswith("last error: ") and error in f for f in fields)
    )


def message(subject: str, body: str = "hello far\r\n", sender: str = ALICE) -> bytes:
    return (
        f"From: {sender}\r\nTo: {FAR}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\n\r\n{body}"
    ).encode()


def send(
    server: MailServer,
    rcpts: list[str],
    data: bytes,
    sender: str = ALICE,
    auth: tuple[str, str] | None = (ALICE, ALICE_PW),
) -> str:
    """One transaction; the queue id from "250 2.0.0 Ok: queued as ID".

    Authenticated on the submission port, or (auth=None) as a trusted loopback
    client on the MTA port.
    """
    port = server.submission_port if auth else server.smtp_port
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.far.test", timeout=15) as s:
        if auth:
            s.ehlo()
            s.auth("PLAIN", lambda challenge=None: f"\0{auth[0]}\0{auth[1]}")
        return transaction(s, sender, rcpts, data)


def transaction(s: smtplib.SMTP, sender: str, rcpts: list[str], data: bytes) -> str:
    s.ehlo_or_helo_if_needed()
    assert s.mail(sender)[0] == 250
    for rcpt in rcpts:
        code, reply = s.rcpt(rcpt)
        assert code == 250, (rcpt, code, reply)
    code, reply = s.data(data)
    assert code == 250, (code, reply)
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{12})", reply)
    assert m, reply
    return m.group(1).decode()


def split_trace(data: bytes) -> tuple[str, bytes]:
    """(our queue id from the Received header at the top, the rest)."""
    m = RECEIVED.match(data)
    assert m, data[:400]
    return m.group("id").decode(), data[m.end() :]


def subject_of(data: bytes) -> str:
    return email.message_from_bytes(data, policy=email.policy.default)["Subject"]


# --- 1. what arrives at the smarthost ------------------------------------------------


def tricky_body() -> bytes:
    """Lines that break naive relaying: dots at line starts (also across the
    runner's 16 KiB read chunks), a lone dot, 8-bit text, tabs, trailing white
    space, empty lines, a 998-octet line."""
    lines = [
        ".",
        "..",
        ". starts with a dot",
        "..two dots",
        "trailing spaces   ",
        "\ttab first",
        "caf\u00e9 \u2014 8-bit",
        "x" * 998,
        "",
    ]
    for i in range(12000):  # ~70 KB of short lines, most starting with a dot
        lines.append("." * (i % 4) + "y" * (i % 3))
    lines += ["last line", ""]
    return "\r\n".join(lines).encode()


def test_authenticated_relay_arrives_byte_exact(relay):
    server, cap = relay()
    original = (
        b"From: Alice <alice@example.test>\r\nTo: <someone@far.test>\r\n"
        b"Subject: byte exact\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + tricky_body()
    )
    entry_id = send(server, [FAR], original)
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), server.log()
    [got] = cap.messages()
    assert got["mail_from"] == ALICE
    assert got["rcpt_to"] == [FAR]
    assert got["helo"] == "mail.example.test"
    trace_id, rest = split_trace(got["data"])
    assert trace_id == entry_id
    assert rest == original  # the exact bytes the client sent, dots and all
    assert b"Return-Path" not in got["data"].split(b"\r\n\r\n", 1)[0]
    assert b" with ESMTPA id " in got["data"]  # authenticated session
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    assert len(cap.messages()) == 1
    assert wait_for(lambda: f"queue {entry_id} done" in server.log()), server.log()


def test_several_recipients_go_in_one_transaction(relay, tmp_path):
    server, cap = relay()
    rcpts = ["a@far.test", "b@far.test", "c@elsewhere.test"]
    proc = subprocess.run(
        [
            need("swaks"),
            "--server",
            "127.0.0.1",
            "--port",
            str(server.submission_port),
            "--helo",
            "client.far.test",
            "--from",
            ALICE,
            "--to",
            ",".join(rcpts),
            "--header",
            "Subject: three at once",
            "--body",
            "one copy, three recipients",
            "-a",
            "LOGIN",
            "--auth-user",
            ALICE,
            "--auth-password",
            ALICE_PW,
            "--timeout",
            "20",
        ],
        env=tool_env(tmp_path),
        capture_output=True,
        timeout=60,
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out + proc.stderr.decode(errors="replace")
    assert wait_for(lambda: queue_is_empty(server), timeout=20), server.log()
    [got] = cap.messages()
    assert got["mail_from"] == ALICE
    assert got["rcpt_to"] == rcpts
    _, rest = split_trace(got["data"])
    assert subject_of(rest) == "three at once"
    assert b"one copy, three recipients" in rest
    assert cap.transcript().count("< MAIL FROM:") == 1


def test_forwarding_alias_keeps_the_original_envelope_sender(relay):
    aliases = (
        "fwd@example.test: someone@far.test\nboth@example.test: alice@example.test, x@far.test\n"
    )
    server, cap = relay(aliases=aliases)
    stranger = "stranger@elsewhere.test"
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as s:
        transaction(s, stranger, ["fwd@example.test"], message("forward me", sender=stranger))
        transaction(s, stranger, ["both@example.test"], message("local too", sender=stranger))
    assert wait_for(lambda: len(cap.messages()) == 2, timeout=20), server.log()
    by_subject = {subject_of(split_trace(m["data"])[1]): m for m in cap.messages()}
    assert by_subject["forward me"]["mail_from"] == stranger
    assert by_subject["forward me"]["rcpt_to"] == [FAR]
    assert by_subject["local too"]["mail_from"] == stranger
    assert by_subject["local too"]["rcpt_to"] == ["x@far.test"]
    [local] = server.messages(ALICE)
    assert b"Subject: local too" in local.read_bytes()
    assert wait_for(lambda: queue_is_empty(server)), listing(server)


# --- 2. temporary and permanent failures ----------------------------------------------


def test_451_then_success_after_flush(relay):
    server, cap = relay()
    cap.set_script("end 451 4.3.0 try again later times=1\n")
    entry_id = send(server, [FAR], message("451 then 250"))
    assert wait_for(
        lambda: deferred_with(server, entry_id, FAR, "451 4.3.0 try again later"), timeout=20
    ), (listing(server), server.log())
    assert cap.messages() == []
    [fields] = listing(server)[entry_id]["rcpts"].values()
    assert fields[1] == "attempts 1"

    ctl(server, "queue", "flush")
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), server.log()
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    [got] = cap.messages()
    assert subject_of(split_trace(got["data"])[1]) == "451 then 250"
    assert "queue flush" in server.log()


def test_550_bounces_to_the_sender_and_the_rest_is_delivered(relay):
    server, cap = relay()
    cap.set_script("rcpt 550 5.1.1 <nobody@far.test>: no such user here match=^nobody@\n")
    entry_id = send(server, ["nobody@far.test", FAR], message("partly bouncing"))
    assert wait_for(lambda: len(server.messages(ALICE)) == 1, timeout=20), server.log()
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    [got] = cap.messages()
    assert got["rcpt_to"] == [FAR]

    [path] = server.messages(ALICE)
    raw = path.read_bytes()
    assert raw.startswith(b"Return-Path: <>\n"), raw[:200]
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["To"] and ALICE in bounce["To"]
    parts = {p.get_content_type(): p for p in bounce.iter_parts()}
    assert set(parts) == {"text/plain", "message/delivery-status", "text/rfc822-headers"}
    report = parts["message/delivery-status"].as_string()
    assert "Final-Recipient: rfc822; nobody@far.test" in report, report
    assert "Action: failed" in report and "Status: 5.1.1" in report, report
    assert "no such user here" in report
    assert FAR not in report  # the delivered recipient is not reported
    assert "Subject: partly bouncing" in parts["text/rfc822-headers"].as_string()
    assert entry_id in server.log()


def test_mixed_outcomes_in_one_transaction(relay):
    """One recipient accepted, one refused for now, one refused for good: the
    first is delivered, the second deferred and retried, and the bounce for the
    third goes out once nothing is left pending."""
    server, cap = relay()
    cap.set_script(
        "rcpt 451 4.2.1 mailbox busy match=^later@ times=1\n"
        "rcpt 550 5.1.1 no such user match=^nobody@\n"
    )
    rcpts = ["ok@far.test", "later@far.test", "nobody@far.test"]
    entry_id = send(server, rcpts, message("mixed"))
    assert wait_for(
        lambda: deferred_with(server, entry_id, "later@far.test", "451 4.2.1 mailbox busy"),
        timeout=20,
    ), (listing(server), server.log())
    rcpt_fields = listing(server)[entry_id]["rcpts"]
    assert rcpt_fields["ok@far.test"][0] == "delivered"
    assert rcpt_fields["nobody@far.test"][0] == "failed"
    assert "last error: 550 5.1.1 no such user" in rcpt_fields["nobody@far.test"]
    [first] = cap.messages()
    assert first["rcpt_to"] == ["ok@far.test"]
    assert server.messages(ALICE) == []  # no bounce while a recipient is pending

    ctl(server, "queue", "flush")
    assert wait_for(lambda: len(server.messages(ALICE)) == 1, timeout=20), server.log()
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    assert [m["rcpt_to"] for m in cap.messages()] == [["ok@far.test"], ["later@far.test"]]
    bounce = server.messages(ALICE)[0].read_text()
    assert "Final-Recipient: rfc822; nobody@far.test" in bounce
    assert "later@far.test" not in bounce.split("Content-Type: text/rfc822-headers")[0]


NO_ANSWER = {
    "hang after data": ("end hang\n", "Timeout"),
    "hang at greeting": ("connect hang\n", "Timeout"),
    "drop after MAIL": ("mail drop\n", ""),
    "drop after DATA": ("data drop\n", ""),
    "not SMTP": ("connect greet HTTP/1.1 400 Bad Request\n", "HTTP/1.1 400 Bad Request"),
}


@pytest.mark.parametrize("case", list(NO_ANSWER))
def test_no_answer_is_deferred_then_delivered(relay, case):
    script, error = NO_ANSWER[case]
    server, cap = relay("[relay]\ntimeout = 2\n")
    cap.set_script(script)
    entry_id = send(server, [FAR], message(case))
    assert wait_for(lambda: deferred_with(server, entry_id, FAR, error), timeout=20), (
        listing(server),
        server.log(),
    )
    assert cap.messages() == []
    assert "< MAIL FROM" in cap.transcript() or "connect" in script
    if case == "hang after data":
        assert "bytes of data, then ." in cap.transcript()  # the whole message went, unanswered

    cap.set_script("")
    ctl(server, "queue", "flush")
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), (listing(server), server.log())
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    [got] = cap.messages()
    assert subject_of(split_trace(got["data"])[1]) == case


# --- 3. mailboxctl queue list / delete ----------------------------------------------------


def test_queue_list_shows_id_sender_recipients_status_and_error(relay):
    server, cap = relay(capture=False)  # nothing listens at the smarthost port
    first = send(server, [FAR, "other@far.test"], message("first"))
    second = send(server, ["x@far.test"], message("second", sender=BOB), BOB, (BOB, BOB_PW))
    refused = "Connection refused"
    assert wait_for(
        lambda: (
            deferred_with(server, first, "other@far.test", refused)
            and deferred_with(server, second, "x@far.test", refused)
        ),
        timeout=20,
    ), (listing(server), server.log())
    entries = listing(server)
    assert sorted(entries) == sorted([first, second])
    head = entries[first]["head"]
    assert re.fullmatch(r"age 0h0\dm", head[0]), head
    assert head[1] == f"from <{ALICE}>"
    assert entries[second]["head"][1] == f"from <{BOB}>"
    assert list(entries[first]["rcpts"]) == [FAR, "other@far.test"]
    for fields in [*entries[first]["rcpts"].values(), *entries[second]["rcpts"].values()]:
        status, attempts, nxt, error = fields
        assert status == "deferred" and attempts == "attempts 1", fields
        assert nxt.startswith("next 20"), fields
        assert error.startswith("last error: ") and refused in error, fields
    assert cap.messages() == []


def test_queue_delete_removes_the_entry_and_it_is_never_delivered(relay):
    server, cap = relay(capture=False)
    doomed = send(server, [FAR], message("doomed"))
    assert wait_for(lambda: deferred_with(server, doomed, FAR, "refused"), timeout=20)
    proc = ctl(server, "queue", "delete", doomed)
    assert proc.stdout.strip() == f"deleted {doomed}"
    assert queued(server) == [] and queue_is_empty(server)
    assert listing(server) == {}
    proc = ctl(server, "queue", "delete", doomed, ok=(1,))
    assert f"no queued message {doomed}" in proc.stderr
    assert wait_for(lambda: f"deleted queued message {doomed}" in server.log(), timeout=10)

    cap.start()
    ctl(server, "queue", "flush")
    assert wait_for(lambda: "queue flush" in server.log(), timeout=10), server.log()
    later = send(server, [FAR], message("after the delete"))
    assert wait_for(lambda: f"queue {later} done" in server.log(), timeout=20), server.log()
    [got] = cap.messages()
    assert split_trace(got["data"])[0] == later
    assert subject_of(split_trace(got["data"])[1]) == "after the delete"
    assert cap.transcript().count("< MAIL FROM:") == 1  # the deleted one was not even tried
    assert queue_is_empty(server)


# --- 4. restart, corrupt entries, crash ---------------------------------------------------


def test_the_queue_survives_a_restart(relay):
    server, cap = relay(capture=False)
    entry_id = send(server, [FAR], message("across a restart"))
    assert wait_for(lambda: deferred_with(server, entry_id, FAR, "refused"), timeout=20)
    server.stop()
    cap.start()
    server.start()
    assert entry_id in listing(server)
    ctl(server, "queue", "flush")  # the back-off (a minute after the first failure) is kept
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), server.log()
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    [got] = cap.messages()
    assert split_trace(got["data"])[0] == entry_id


def test_a_delivery_cut_by_a_restart_is_retried_at_start(relay):
    """SIGTERM while the smarthost sits on the message: nothing was acknowledged,
    so the restarted server sends it again without waiting for a flush."""
    server, cap = relay()
    cap.set_script("end hang\n")
    entry_id = send(server, [FAR], message("cut by a restart"))
    assert wait_for(lambda: "bytes of data, then ." in cap.transcript(), timeout=20)
    server.stop()
    cap.set_script("")
    server.start()
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), (listing(server), server.log())
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    assert split_trace(cap.messages()[0]["data"])[0] == entry_id


CORRUPT = {
    "not json": b"{ this is not json",
    "not utf-8": b'{"version": 1, "id": "\xff\xfe"}',
    "empty": b"",
    "unknown version": b'{"version": 2, "id": "X", "recipients": []}',
    "no recipients": json.dumps(
        {"version": 1, "id": "BAD", "sender": "", "offset": 0, "received": 0, "recipients": []}
    ).encode(),
    "a list": b"[1, 2, 3]",
    "id not the file name": json.dumps(
        {
            "version": 1,
            "id": "OTHER",
            "sender": "a@far.test",
            "offset": 0,
            "received": 0,
            "recipients": [{"address": "x@far.test"}],
        }
    ).encode(),
    "wrong types": json.dumps(
        {
            "version": 1,
            "id": "BAD",
            "sender": "a@far.test",
            "offset": "zero",
            "received": "yesterday",
            "recipients": [{"address": 42, "attempts": "none"}],
        }
    ).encode(),
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_envelope_is_moved_aside_and_mail_flows(relay, kind):
    server, cap = relay()
    q = queue_dir(server)
    q.mkdir(parents=True, exist_ok=True)
    (q / "BAD.msg").write_bytes(b"Subject: corrupt\n\nbody\n")
    (q / "BAD.json").write_bytes(CORRUPT[kind])
    ctl(server, "queue", "flush")  # the queue is read again now, not at the next rescan
    # The envelope is moved first, then its message.
    moved = [q / "corrupt" / "BAD.json", q / "corrupt" / "BAD.msg"]
    assert wait_for(lambda: all(p.exists() for p in moved), timeout=20), server.log()
    assert (q / "corrupt" / "BAD.json").read_bytes() == CORRUPT[kind]
    assert not (q / "BAD.json").exists() and not (q / "BAD.msg").exists()
    assert wait_for(lambda: "moved unreadable entry to" in server.log(), timeout=5), server.log()
    assert re.search(r"moved unreadable entry to \S*/corrupt/BAD\.json", server.log())

    entry_id = send(server, [FAR], message(f"after a corrupt entry ({kind})"))
    assert wait_for(lambda: len(cap.messages()) == 1, timeout=20), server.log()
    assert split_trace(cap.messages()[0]["data"])[0] == entry_id
    assert wait_for(lambda: queue_is_empty(server)), listing(server)
    assert ctl(server, "queue", "list").stdout == ""


def in_flight(cap: Capture) -> set[str]:
    """Connections whose message data arrived and is not answered yet."""
    waiting: set[str] = set()
    for line in cap.transcript().splitlines():
        conn, direction, *rest = line.split(" ", 2)
        if direction == "<" and rest and rest[0].endswith("bytes of data, then .]"):
            waiting.add(conn)
        elif direction in (">", "!"):
            waiting.discard(conn)
    return waiting


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_during_deliveries_loses_nothing(relay, workers):
    """~50 messages, the smarthost slow; SIGKILL while deliveries are in flight,
    restart: each one arrives at least once and at most twice, and the queue
    ends empty. With two workers, the primary is killed (its worker follows)."""
    count = 50
    server, cap = relay(f"[mailbox]\nworkers = {workers}\n")
    cap.set_script("end sleep 0.2\n")
    subjects = [f"crash {i:03d}" for i in range(count)]
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as s:  # trusted: relays
        ids = [
            transaction(s, ALICE, [f"r{i}@far.test"], message(subject))
            for i, subject in enumerate(subjects)
        ]
    assert len(set(ids)) == count
    # Kill once some are delivered and the smarthost sits on at least one more.
    assert wait_for(lambda: len(cap.messages()) >= 4 and in_flight(cap), timeout=20), (
        cap.transcript()[-2000:],
        server.log(),
    )
    server.stop(signal.SIGKILL)
    assert len(cap.messages()) < count, "everything was delivered before the kill"
    assert queued(server), "nothing left in the queue at the kill"

    cap.set_script("")
    server.start()
    assert wait_for(lambda: queue_is_empty(server), timeout=20), (listing(server), server.log())
    got: dict[str, int] = {}
    for m in cap.messages():
        subject = subject_of(split_trace(m["data"])[1])
        got[subject] = got.get(subject, 0) + 1
    assert sorted(got) == subjects, sorted(set(subjects) - set(got))
    assert max(got.values()) <= 2, {k: v for k, v in got.items() if v > 1}
    assert ctl(server, "queue", "list").stdout == ""


def test_a_backlog_drains_without_waiting_for_the_timer(relay):
    """40 deferred messages, then the smarthost comes back and the queue is
    flushed: they all arrive, and the queue empties. (How fast is for
    bench/queue_throughput.py, not for a test.)"""
    count = 40
    server, cap = relay(capture=False)
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=15) as s:
        ids = [transaction(s, ALICE, [FAR], message(f"backlog {i:03d}")) for i in range(count)]
    assert wait_for(
        lambda: all(deferred_with(server, i, FAR, "refused") for i in ids), timeout=20
    ), listing(server)
    cap.start()
    ctl(server, "queue", "flush")
    assert wait_for(lambda: len(cap.messages()) == count, timeout=20), listing(server)
    assert wait_for(lambda: queue_is_empty(server)), listing(server)


# --- issue 11: entries that look right but cannot be delivered ------------------------

FAR_JSON = {
    "version": 1,
    "id": "LOST",
    "sender": ALICE,
    "offset": 0,
    "received": 0,
    "recipients": [{"address": "x@far.test"}],
}


@pytest.mark.parametrize("kind", ["message file missing", "offset past the end"])
def test_an_entry_whose_message_is_lost_is_set_aside_and_bounced(relay, kind):
    server, cap = relay()
    q = queue_dir(server)
    q.mkdir(parents=True, exist_ok=True)
    envelope = dict(FAR_JSON, received=time.time())
    if kind == "offset past the end":
        (q / "LOST.msg").write_bytes(b"Subject: short\n\nbody\n")
        envelope["offset"] = 10_000
    (q / "LOST.json").write_text(json.dumps(envelope))
    ctl(server, "queue", "flush")  # the queue is read again now, not at the next rescan
    assert wait_for(lambda: (q / "corrupt" / "LOST.json").exists(), timeout=20), server.log()
    # The line follows the move.
    assert wait_for(lambda: "moved corrupt entry LOST to" in server.log(), timeout=5)
    assert server.log().count("moved corrupt entry LOST to") == 1  # once, not every few seconds
    assert wait_for(lambda: server.messages(ALICE), timeout=10), server.log()
    [bounce] = server.messages(ALICE)
    assert b"Content-Type: multipart/report" in bounce.read_bytes()
    assert b"x@far.test" in bounce.read_bytes()
    assert cap.messages() == []  # nothing, not an empty message, went to the smarthost
    assert "queue LOST was deleted" not in server.log()


def test_a_smarthost_refusing_ehlo_and_helo_defers_once_and_frees_its_slot(relay):
    server, cap = relay("[relay]\nmax_connections_per_destination = 1\n")
    cap.set_script("helo 450 4.3.2 not now\n")  # EHLO and HELO alike
    first = send(server, [FAR], message("refused at helo"))
    assert wait_for(lambda: deferred_with(server, first, FAR, "450 4.3.2 not now"), timeout=20), (
        listing(server),
        server.log(),
    )
    helos = cap.transcript().count("HELO ")
    assert 1 <= helos <= 2, helos  # once (and its retry), not in a loop
    # The server recovers: a flush delivers both, the slot was not held.
    cap.set_script("")
    second = send(server, [FAR], message("after the recovery"))
    ctl(server, "queue", "flush")
    assert wait_for(lambda: len(cap.messages()) == 2, timeout=20), server.log()
    assert {split_trace(m["data"])[0] for m in cap.messages()} == {first, second}
