"""Black-box tests: the real twistd process, raw sockets and stdlib clients."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import socket
import subprocess
import time

import pytest
from conftest import TWISTD
from test_smtp import SMUGGLED, VARIANTS


class Raw:
    """A raw line client for what smtplib and poplib refuse to send."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        )
        self.buf = b""

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode()

    def reply(self) -> str:
        """One whole SMTP reply; its last line."""
        while True:
            line = self.line()
            if line[3:4] != "-":
                return line

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def closed(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def smtp_raw(server) -> Raw:
    r = Raw(server.smtp_port)
    assert r.reply().startswith("220 ")
    r.send("EHLO client.test\r\n")
    assert r.reply().startswith("250 ")
    return r


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_twistd_lists_the_installed_plugin(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(TWISTD), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "mailbox" in out.stdout and "POP3 + SMTP" in out.stdout


@pytest.mark.parametrize("fake_end", VARIANTS, ids=[repr(v) for v in VARIANTS])
def test_smuggling_in_one_segment(server, fake_end):
    r = smtp_raw(server)
    r.send("MAIL FROM:<sender@far.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert r.reply().startswith("250")
    assert r.reply().startswith("250")
    assert r.reply().startswith("354")
    r.send(b"Subject: first\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nNOOP\r\n")
    first = r.reply()
    assert first.startswith(("250 ", "550 5.6.0")), first
    assert r.reply() == "250 2.0.0 Ok"  # the NOOP: nothing smuggled was answered
    assert len(server.messages("alice@example.test")) == (1 if first.startswith("250") else 0)


def test_received_header_and_return_path(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port, local_hostname="client.test") as s:
        s.sendmail("sender@far.test", ["alice@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    [path] = server.messages("alice@example.test")
    text = path.read_text()
    assert text.startswith(
        "Return-Path: <sender@far.test>\nReceived: from client.test ([127.0.0.1])\n"
    )


def test_bad_input_and_error_limit(server):
    r = smtp_raw(server)
    r.send("NOOP " + "x" * 2000 + "\r\n")
    assert r.reply() == "500 5.5.2 Error: line too long"
    r.send("NOOP\r\n")
    assert r.reply() == "250 2.0.0 Ok"
    for _ in range(8):
        r.send("WHAT\r\n")
        assert r.reply().startswith("500 5.5.1")
    r.send("WHAT\r\n")
    assert r.reply().startswith("500 5.5.1")
    assert r.reply().startswith("421 4.7.0")
    assert r.closed()


def test_disconnect_mid_data_leaves_no_message_and_no_temp_file(server):
    r = smtp_raw(server)
    r.send("MAIL FROM:<a@far.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    for _ in range(3):
        r.reply()
    r.send("Subject: half\r\n\r\n" + "line\r\n" * 20_000)  # past what is held in memory
    incoming = server.mail_dir / ".incoming"
    assert wait_for(lambda: incoming.is_dir() and any(incoming.iterdir()))
    r.close()
    assert wait_for(lambda: not any(incoming.iterdir()))
    assert server.messages("alice@example.test") == []


def test_a_stalled_client_does_not_block_others(server):
    stalled = smtp_raw(server)
    stalled.send("MAIL FROM:<a@far.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhalf")
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        s.sendmail("b@far.test", ["bob@other.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(server.messages("bob@other.test")) == 1
    stalled.close()


def test_message_over_the_limit(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:  # SIZE is checked at MAIL
            s.sendmail("a@far.test", ["alice@example.test"], b"x" * 1_000_100)
        assert e.value.smtp_code == 552
    r = smtp_raw(server)  # a client that does not announce SIZE
    r.send("MAIL FROM:<a@far.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    for _ in range(3):
        r.reply()
    r.send(("y" * 998 + "\r\n") * 1100 + ".\r\n")
    assert r.reply() == "552 5.3.4 Message size exceeds fixed limit"
    assert server.messages("alice@example.test") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_acknowledged_mail_survives_sigkill(make_server, workers):
    server = make_server(f"[mailbox]\nworkers = {workers}\n").add_test_accounts().start()
    if workers > 1:
        assert wait_for(lambda: "worker 1 serving" in server.log(), timeout=20)
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        for i in range(20):
            s.sendmail(
                "a@far.test", ["alice@example.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
            )
    server.stop(signal.SIGKILL)
    # A worker goes when its primary has gone; until then it still holds the
    # listening socket, and a new server waits for it.
    mine = f"mailboxd.processes --config {server.config.resolve()}"
    assert wait_for(lambda: mine not in _processes(), timeout=20)
    assert len(server.messages("alice@example.test")) == 20
    server.start()
    p = poplib.POP3("127.0.0.1", server.pop3_port)
    p.user("alice@example.test")
    p.pass_("alice pw")
    assert p.stat()[0] == 20
    p.quit()


def _processes() -> str:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_spool_left_by_a_crash_is_cleaned(server):
    r = smtp_raw(server)
    r.send("MAIL FROM:<a@far.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    for _ in range(3):
        r.reply()
    r.send("Subject: never acknowledged\r\n\r\n" + "x\r\n" * 50_000)  # spooled: past 64 KB
    incoming = server.mail_dir / ".incoming"
    assert wait_for(lambda: incoming.is_dir() and any(incoming.iterdir()))
    server.stop(signal.SIGKILL)
    r.close()
    server.start()
    assert not any(incoming.iterdir())
    assert server.messages("alice@example.test") == []
    assert "unacknowledged spool files" in server.log()


def pop_login(server, user: str = "alice@example.test", password: str = "alice pw") -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user(user)
    p.pass_(password)
    return p


def test_pop3_in_use_and_uidl_stable_across_restart(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        for i in range(3):
            s.sendmail(
                "a@far.test", ["alice@example.test"], f"Subject: {i}\r\n\r\n{i}\r\n".encode()
            )
    p = pop_login(server)
    uids = p.uidl()[1]
    with pytest.raises(
        poplib.error_proto, match=r"\[IN-USE\] Mailbox is locked by another session"
    ):
        pop_login(server)
    p.quit()
    server.stop()
    server.start()
    p = pop_login(server)
    assert p.uidl()[1] == uids
    p.quit()


def test_pop3_refusals_and_bad_input(server):
    p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=10)
    p.user("alice@example.test")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        p.pass_("wrong")
    r = Raw(server.pop3_port)
    assert r.line().startswith("+OK")
    for line, expected in [
        ("USER", "-ERR"),
        ("PASS", "-ERR"),
        ("STAT", "-ERR"),
        ("RETR 1", "-ERR"),
        ("X" * 400, "-ERR line too long"),
        ("USER alice@example.test", "+OK"),
        ("PASS alice pw", "+OK 0 messages"),
        ("RETR 1", "-ERR no such message"),
        ("DELE 99", "-ERR no such message"),
        ("TOP 1", "-ERR"),
        ("USER x", "-ERR already authenticated"),
    ]:
        r.send(line + "\r\n")
        assert r.line().startswith(expected), line
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()


def test_new_account_is_seen_without_restart(server):
    server.add_user("carol@example.test", "carol pw")
    # Poll the log, not logins: failed logins would count towards a block.
    assert wait_for(lambda: "loaded 3 accounts" in server.log(), timeout=5)
    pop_login(server, "carol@example.test", "carol pw").quit()


def test_logs_are_structured_and_never_hold_a_password(server):
    with smtplib.SMTP("127.0.0.1", server.smtp_port) as s:
        s.sendmail("a@far.test", ["alice@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    p = poplib.POP3("127.0.0.1", server.pop3_port)
    p.user("alice@example.test")
    with pytest.raises(poplib.error_proto):
        p.pass_("alice pw but wrong")
    p = pop_login(server)
    p.retr(1)
    p.dele(1)
    p.quit()
    assert wait_for(lambda: "deleted 1 messages" in server.log())
    assert wait_for(lambda: "retrieved 1 messages" in server.log())
    log = server.log()
    for event in (
        "smtp session from 127.0.0.1 on listen: 1 accepted, ",
        "delivered ",
        "pop3 login failed for alice@example.test from 127.0.0.1",
        "pop3 login alice@example.test from 127.0.0.1",
        "pop3 alice@example.test retrieved 1 messages (",
    ):
        assert event in log
    assert "but wrong" not in log


def test_ipv6_listener(make_server):
    s = make_server()
    port = s.pop3_port
    s.config.write_text(
        s.config.read_text().replace(
            f"listen = tcp:{port}:interface=127.0.0.1", f"listen = tcp6:{port}:interface=\\:\\:1"
        )
    )
    s.pop3_port = port
    s.add_user("alice@example.test", "alice pw")
    proc = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "mailbox"],
        cwd=s.home,
        env=s.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def up() -> bool:
            try:
                socket.create_connection(("::1", port), timeout=1).close()
                return True
            except OSError:
                return False

        assert wait_for(up)
        p = poplib.POP3("::1", port, timeout=10)
        p.user("alice@example.test")
        assert p.pass_("alice pw").startswith(b"+OK")
        p.quit()
    finally:
        proc.terminate()
        proc.wait(10)
