"""Black-box tests: the real server driven by the real Debian mail clients.

Every client is found through `need(...)`, so a missing one skips locally and
fails under CI=true. Each tool runs with a private HOME (no user rc files),
proxies off, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import need, tool_env

ALICE = "alice@example.test"
ALICE_PW = "alice pw"
BOB = "bob@other.test"
SENDER = "x@far.test"

# A body that trips up careless code: dot lines (stuffing on both protocols),
# a lone ".", empty lines, 8-bit UTF-8, trailing white space, a tab.
TRICKY = (
    "Subject: round trip\r\n"
    "From: x@far.test\r\n"
    "To: alice@example.test\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    ".leading dot\r\n"
    "..two dots\r\n"
    ".\r\n"
    "\r\n"
    "caf\u00e9 \u00fcber \u65e5\u672c \u2603\r\n"
    "trailing spaces   \r\n"
    "tab\t\r\n"
    "\r\n"
    "\r\n"
    "last line\r\n"
).encode("utf-8")


# --- helpers --------------------------------------------------------------------


def run(
    cmd: list[str],
    env: dict[str, str],
    *,
    input: bytes | None = None,
    ok: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=input, env=env, timeout=30, capture_output=True)
    assert proc.returncode in ok, (
        f"{cmd} exited {proc.returncode}, expected {ok}\n"
        f"--- stdout ---\n{proc.stdout.decode(errors='replace')}\n"
        f"--- stderr ---\n{proc.stderr.decode(errors='replace')}"
    )
    return proc


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def smtp_send(server, rcpt: str, message: bytes, sender: str = SENDER) -> None:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        refused = s.sendmail(sender, [rcpt], message)
    assert refused == {}


def simple(subject: str, body: str = "hello") -> bytes:
    return f"Subject: {subject}\r\nFrom: {SENDER}\r\n\r\n{body}\r\n".encode()


def curl_pop(server, env, path: str = "", *args: str, user: str = ALICE, pw: str = ALICE_PW):
    """curl against the server's POP3 port; returns stdout bytes."""
    curl = need("curl")
    cmd = [
        curl,
        "-q",  # no ~/.curlrc
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "--user",
        f"{user}:{pw}",
        f"pop3://127.0.0.1:{server.pop3_port}/{path}",
        *args,
    ]
    return run(cmd, env).stdout


def pop_login(server, user: str = ALICE, pw: str = ALICE_PW) -> poplib.POP3:
    """A poplib session; retries briefly while a just-dropped session still holds the lock."""
    deadline = time.monotonic() + 10
    while True:
        p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
        p.user(user)
        try:
            p.pass_(pw)
            return p
        except poplib.error_proto as e:
            p.close()
            if b"[IN-USE]" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def swaks_cmd(server, to: str, subject: str, body: str, *extra: str) -> list[str]:
    return [
        need("swaks"),
        "--server",
        "127.0.0.1",
        "--port",
        str(server.smtp_port),
        "--helo",
        "client.far.test",
        "--from",
        SENDER,
        "--to",
        to,
        "--header",
        f"Subject: {subject}",
        "--body",
        body,
        "--timeout",
        "20",
        *extra,
    ]


# --- swaks ----------------------------------------------------------------------


def test_swaks_delivers_locally(server, tmp_path):
    env = tool_env(tmp_path)
    run(swaks_cmd(server, ALICE, "swaks plain", "hello from swaks"), env)

    [stored] = server.messages(ALICE)
    data = stored.read_bytes()
    assert b"Subject: swaks plain" in data
    assert b"hello from swaks" in data
    assert data.startswith(b"Return-Path: <x@far.test>\n")

    p = pop_login(server)
    assert p.stat()[0] == 1
    lines = p.retr(1)[1]
    assert b"Subject: swaks plain" in lines
    assert b"hello from swaks" in lines
    p.quit()


def test_swaks_pipelining_to_several_recipients(server, tmp_path):
    env = tool_env(tmp_path)
    # example.org is a domain alias of example.test: the same Maildir.
    proc = run(
        swaks_cmd(
            server,
            f"{ALICE},alice@example.org,{BOB}",
            "swaks pipelined",
            "pipelined body",
            "--pipeline",
        ),
        env,
    )
    transcript = proc.stdout.decode(errors="replace")
    assert "PIPELINING" in transcript, transcript
    # Commands went out as one batch: DATA was sent before MAIL FROM's reply came back.
    assert transcript.index("-> DATA") < transcript.index("<-  250 2.1.0"), transcript

    alice = server.messages(ALICE)
    bob = server.messages(BOB)
    # One transaction, two RCPTs for the same account: one copy in alice's Maildir.
    assert len(alice) == 1, alice
    assert len(bob) == 1, bob
    for path in alice + bob:
        assert b"pipelined body" in path.read_bytes()

    out = curl_pop(server, env, "1", user=BOB, pw="bob pw")
    assert b"Subject: swaks pipelined" in out


def test_swaks_domain_alias(server, tmp_path):
    env = tool_env(tmp_path)
    run(swaks_cmd(server, "Alice@Example.ORG", "via alias", "alias body"), env)
    [stored] = server.messages(ALICE)
    assert b"alias body" in stored.read_bytes()


def test_swaks_unknown_local_user_refused(server, tmp_path):
    env = tool_env(tmp_path)
    proc = run(
        swaks_cmd(server, "nobody@example.test", "lost", "nobody home"),
        env,
        ok=(24,),  # swaks: "no recipients were accepted"
    )
    out = proc.stdout.decode(errors="replace")
    assert "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown" in out, out
    assert server.messages(ALICE) == []
    assert not list(server.mail_dir.glob("*/nobody"))


def test_swaks_message_over_size_limit(server, tmp_path):
    env = tool_env(tmp_path)
    body = ("x" * 70 + "\n") * 16000  # 1.1 MB > max_message_size = 1000000
    proc = run(
        swaks_cmd(server, ALICE, "too big", "-", "--suppress-data"),
        env,
        input=body.encode(),
        ok=(26,),  # swaks: the message was refused after the final "."
    )
    out = proc.stdout.decode(errors="replace")
    assert "552 5.3.4 Message size exceeds fixed limit" in out, out
    assert server.messages(ALICE) == []
    spool = server.mail_dir / ".incoming"
    assert not spool.exists() or list(spool.iterdir()) == []


# --- curl (POP3) ----------------------------------------------------------------


def test_curl_list_retr_uidl_top(server, tmp_path):
    env = tool_env(tmp_path)
    smtp_send(server, ALICE, simple("first", "one\r\ntwo\r\nthree"))
    smtp_send(server, ALICE, simple("second", "2nd body"))

    listing = curl_pop(server, env)
    entries = [line.split() for line in listing.splitlines()]
    assert [n for n, _ in entries] == [b"1", b"2"], listing
    sizes = {int(n): int(size) for n, size in entries}

    first = curl_pop(server, env, "1")
    second = curl_pop(server, env, "2")
    assert first.endswith(b"Subject: first\r\nFrom: x@far.test\r\n\r\none\r\ntwo\r\nthree\r\n")
    assert second.endswith(b"\r\n\r\n2nd body\r\n")
    assert first.startswith(b"Return-Path: <x@far.test>\r\nReceived: from ")
    # LIST gives the exact size of what RETR sends (CRLF line ends, unstuffed).
    assert sizes == {1: len(first), 2: len(second)}

    uidl = curl_pop(server, env, "", "-X", "UIDL")
    uids = dict(line.split() for line in uidl.splitlines())
    assert sorted(uids) == [b"1", b"2"], uidl
    assert uids[b"1"] != uids[b"2"]
    for uid in uids.values():
        assert re.fullmatch(rb"[\x21-\x7e]{1,70}", uid), uid  # RFC 1939 §7
    # Stable across sessions.
    assert curl_pop(server, env, "", "-X", "UIDL") == uidl
    p = pop_login(server)
    assert p.uidl(2).split() == [b"+OK", b"2", uids[b"2"]]
    p.quit()

    head = first[: first.index(b"\r\n\r\n") + 4]
    assert curl_pop(server, env, "", "-X", "TOP 1 0") == head
    assert curl_pop(server, env, "", "-X", "TOP 1 2") == head + b"one\r\ntwo\r\n"
    assert curl_pop(server, env, "", "-X", "TOP 1 99") == first


def test_curl_byte_exact_round_trip(server, tmp_path):
    env = tool_env(tmp_path)
    smtp_send(server, ALICE, TRICKY)

    got = curl_pop(server, env, "1")
    assert got.endswith(TRICKY), got
    # What sits on top is exactly the trace headers the server adds.
    added = got[: -len(TRICKY)]
    assert added.startswith(b"Return-Path: <x@far.test>\r\n"), added
    assert re.fullmatch(
        rb"Return-Path: <x@far\.test>\r\nReceived: from [^\r\n]*\r\n(\t[^\r\n]*\r\n)+",
        added,
    ), added

    [listed] = curl_pop(server, env).splitlines()
    assert listed == b"1 " + str(len(got)).encode()

    # TOP with the lone "." line inside the requested range.
    top = curl_pop(server, env, "", "-X", "TOP 1 3")
    assert top.endswith(b"\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n"), top

    # On disk: the same bytes with LF line ends (the Maildir convention).
    [stored] = server.messages(ALICE)
    assert stored.read_bytes().endswith(TRICKY.replace(b"\r\n", b"\n"))


def test_curl_large_message_round_trip(server, tmp_path):
    env = tool_env(tmp_path)
    lines = []
    for i in range(3000):  # ~750 kB, long lines, many of them dot lines
        text = f"{i:05d} " + "\u00e9" * (i % 200) + "z" * (i % 97) + " " * (i % 3)
        lines.append(("." if i % 5 == 0 else "") + text)
    message = simple("big", "\r\n".join(lines))
    assert 600_000 < len(message) < 1_000_000
    smtp_send(server, ALICE, message)
    got = curl_pop(server, env, "1")
    assert got.endswith(message)
    assert curl_pop(server, env).split() == [b"1", str(len(got)).encode()]


# --- mpop -----------------------------------------------------------------------


def mpop_config(tmp_path: Path, server, auth: str, delivery: str, extra: str = "") -> Path:
    return write_private(
        tmp_path / f"mpoprc-{auth}",
        "defaults\n"
        "tls off\n"
        "account default\n"
        "host 127.0.0.1\n"
        f"port {server.pop3_port}\n"
        f"user {ALICE}\n"
        f'password "{ALICE_PW}"\n'
        f"auth {auth}\n"
        f"delivery {delivery}\n"
        f"uidls_file {tmp_path / 'mpop-uidls'}\n"
        "timeout 20\n" + extra,
    )


def maildir_new(path: Path) -> list[Path]:
    return sorted((path / "new").iterdir())


def test_mpop_auth_user_maildir_only_new(server, tmp_path):
    mpop = need("mpop")
    env = tool_env(tmp_path)
    box = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    cfg = mpop_config(tmp_path, server, "user", f"maildir {box}", "only_new on\n")

    smtp_send(server, ALICE, simple("mpop one"))
    smtp_send(server, ALICE, TRICKY)
    run([mpop, "-C", str(cfg), "--keep"], env)
    fetched = maildir_new(box)
    assert len(fetched) == 2, fetched
    contents = sorted(p.read_bytes() for p in fetched)
    assert any(b"Subject: mpop one" in c for c in contents)
    # mpop undid the dot-stuffing and kept every byte of the body (with LF ends).
    assert any(c.endswith(TRICKY.replace(b"\r\n", b"\n")) for c in contents), contents

    # Second run: UIDL says nothing is new.
    proc = run([mpop, "-C", str(cfg), "--keep"], env)
    assert len(maildir_new(box)) == 2, proc.stdout
    assert len(server.messages(ALICE)) == 2  # --keep: nothing deleted

    # A newly delivered message is fetched alone.
    smtp_send(server, ALICE, simple("mpop three", "third"))
    run([mpop, "-C", str(cfg), "--keep"], env)
    new = [p for p in maildir_new(box) if p not in fetched]
    assert len(new) == 1, maildir_new(box)
    assert b"Subject: mpop three" in new[0].read_bytes()
    assert len(server.messages(ALICE)) == 3


def test_mpop_auth_plain_mbox(server, tmp_path):
    mpop = need("mpop")
    env = tool_env(tmp_path)
    mbox = tmp_path / "mbox"
    cfg = mpop_config(tmp_path, server, "plain", f"mbox {mbox}", "keep on\nonly_new on\n")

    smtp_send(server, ALICE, simple("plain one", "first plain"))
    proc = run([mpop, "-C", str(cfg), "--debug"], env)
    assert "AUTH PLAIN" in proc.stdout.decode(errors="replace")

    def subjects() -> list[bytes]:
        return re.findall(rb"^Subject: (.*)$", mbox.read_bytes(), re.MULTILINE)

    assert subjects() == [b"plain one"]
    run([mpop, "-C", str(cfg)], env)
    assert subjects() == [b"plain one"]

    smtp_send(server, ALICE, simple("plain two", "second plain"))
    run([mpop, "-C", str(cfg)], env)
    assert subjects() == [b"plain one", b"plain two"]
    assert len(re.findall(rb"^From ", mbox.read_bytes(), re.MULTILINE)) == 2
    assert len(server.messages(ALICE)) == 2


def test_mpop_without_keep_deletes_at_quit(server, tmp_path):
    mpop = need("mpop")
    env = tool_env(tmp_path)
    mbox = tmp_path / "mbox"
    cfg = mpop_config(tmp_path, server, "user", f"mbox {mbox}", "keep off\n")
    smtp_send(server, ALICE, simple("take me"))
    smtp_send(server, ALICE, simple("and me"))
    run([mpop, "-C", str(cfg)], env)
    assert len(re.findall(rb"^Subject: ", mbox.read_bytes(), re.MULTILINE)) == 2
    assert server.messages(ALICE) == []
    p = pop_login(server)
    assert p.stat() == (0, 0)
    p.quit()


# --- fetchmail ------------------------------------------------------------------


def fetchmail_command(fetchmail: str, rc: Path, tmp_path: Path, ids: Path) -> list[str]:
    """fetchmail in the foreground with its own pid file (root's default is shared)."""
    pidfile = tmp_path / "fetchmail.pid"
    return [
        fetchmail,
        "--nodetach",
        "--fetchmailrc",
        str(rc),
        "--pidfile",
        str(pidfile),
        "--idfile",
        str(ids),
    ]


def test_fetchmail_uidl_keep(server, tmp_path):
    fetchmail = need("fetchmail")
    env = tool_env(tmp_path)
    out = tmp_path / "delivered"
    ids = tmp_path / "fetchids"
    rc = write_private(
        tmp_path / "fetchmailrc",
        "set no bouncemail\n"
        "set no syslog\n"
        f"poll 127.0.0.1 service {server.pop3_port} protocol pop3 uidl"
        " auth password timeout 20\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}"\n'
        "  keep\n"
        "  sslproto ''\n"
        f'  mda "cat >> {out}"\n',
    )
    cmd = fetchmail_command(fetchmail, rc, tmp_path, ids)

    def subjects() -> list[bytes]:
        if not out.exists():
            return []
        return re.findall(rb"^Subject: (.*)$", out.read_bytes(), re.MULTILINE)

    smtp_send(server, ALICE, simple("fm one", "first"))
    smtp_send(server, ALICE, TRICKY)
    run(cmd, env)  # 0: mail was retrieved
    assert sorted(subjects()) == [b"fm one", b"round trip"]
    lf = TRICKY.replace(b"\r\n", b"\n")
    assert lf[lf.index(b"\n\n") :] in out.read_bytes()  # the body, unstuffed, intact

    run(cmd, env, ok=(1,))  # 1: no new mail (UIDL)
    assert len(subjects()) == 2

    smtp_send(server, ALICE, simple("fm three", "third"))
    run(cmd, env)
    assert sorted(subjects()) == [b"fm one", b"fm three", b"round trip"]
    assert subjects()[-1] == b"fm three"
    assert len(server.messages(ALICE)) == 3  # keep


def test_locked_mailbox_reported_to_clients(server, tmp_path):
    fetchmail = need("fetchmail")
    mpop = need("mpop")
    env = tool_env(tmp_path)
    smtp_send(server, ALICE, simple("locked"))
    delivered = tmp_path / "delivered"
    rc = write_private(
        tmp_path / "fetchmailrc",
        f"poll 127.0.0.1 service {server.pop3_port} protocol pop3 uidl timeout 20\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}" keep sslproto \'\'\n'
        f'  mda "cat >> {delivered}"\n',
    )
    mbox = tmp_path / "mbox"
    cfg = mpop_config(tmp_path, server, "user", f"mbox {mbox}")

    holder = pop_login(server)
    try:
        proc = run(
            fetchmail_command(fetchmail, rc, tmp_path, tmp_path / "ids"),
            env,
            ok=(9,),  # fetchmail: PS_LOCKBUSY, from the [IN-USE] response code
        )
        err = proc.stderr.decode(errors="replace")
        assert "[IN-USE] Mailbox is locked by another session" in err, err
        proc = run([mpop, "-C", str(cfg), "--debug"], env, ok=(77,))  # EX_NOPERM
        out = proc.stdout.decode(errors="replace")
        assert "-ERR [IN-USE] Mailbox is locked by another session" in out, out
    finally:
        holder.quit()
    assert not delivered.exists()
    assert not mbox.exists()
    # Once the holder has quit, the same clients get through.
    run(fetchmail_command(fetchmail, rc, tmp_path, tmp_path / "ids"), env)
    assert b"Subject: locked" in delivered.read_bytes()


# --- msmtp ----------------------------------------------------------------------


def test_msmtp_local_delivery_without_auth(server, tmp_path):
    msmtp = need("msmtp")
    env = tool_env(tmp_path)
    message = b"Subject: via msmtp\nFrom: x@far.test\nTo: alice@example.test\n\nhello msmtp\n"
    run(
        [
            msmtp,
            "--host",
            "127.0.0.1",
            "--port",
            str(server.smtp_port),
            "--auth=off",
            "--tls=off",
            "--domain=client.far.test",
            f"--from={SENDER}",
            "--",
            ALICE,
        ],
        env,
        input=message,
    )
    [stored] = server.messages(ALICE)
    assert stored.read_bytes().endswith(message)
    got = curl_pop(server, env, "1")
    assert got.endswith(message.replace(b"\n", b"\r\n"))
    assert b"Received: from client.far.test ([127.0.0.1])" in got


# --- DELE semantics -------------------------------------------------------------


def test_dele_without_quit_keeps_message(server):
    smtp_send(server, ALICE, simple("keep me"))
    smtp_send(server, ALICE, simple("me too"))

    p = pop_login(server)
    assert p.dele(1).startswith(b"+OK")
    assert p.dele(2).startswith(b"+OK")
    assert p.stat()[0] == 0  # hidden in this session ...
    p.sock.close()  # ... but the session ends without QUIT: no UPDATE state
    p.file.close()

    p = pop_login(server)
    assert p.stat()[0] == 2
    assert len(server.messages(ALICE)) == 2
    # RSET undoes marks too.
    p.dele(1)
    p.rset()
    p.quit()
    assert len(server.messages(ALICE)) == 2


def test_dele_then_quit_removes(server):
    smtp_send(server, ALICE, simple("doomed"))
    smtp_send(server, ALICE, simple("survivor"))
    p = pop_login(server)
    uid2 = p.uidl(2).split()[2]
    p.dele(1)
    assert len(server.messages(ALICE)) == 2  # not yet: only at QUIT
    assert p.quit().startswith(b"+OK")

    [left] = server.messages(ALICE)
    assert b"survivor" in left.read_bytes()
    p = pop_login(server)
    assert p.stat()[0] == 1
    assert p.uidl(1).split()[2] == uid2  # the survivor keeps its UID
    p.quit()


def test_curl_dele(server, tmp_path):
    env = tool_env(tmp_path)
    smtp_send(server, ALICE, simple("curl doomed"))
    smtp_send(server, ALICE, simple("curl survivor"))
    uids = dict(line.split() for line in curl_pop(server, env, "", "-X", "UIDL").splitlines())

    # curl sends DELE 1, then QUIT as it closes the connection.
    curl_pop(server, env, "1", "-X", "DELE", "--head")

    [left] = server.messages(ALICE)
    assert b"curl survivor" in left.read_bytes()
    after = curl_pop(server, env, "", "-X", "UIDL")
    assert after.split() == [b"1", uids[b"2"]]
    assert b"Subject: curl survivor" in curl_pop(server, env, "1")


def test_smtp_drop_during_data_delivers_nothing(server):
    s = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30)
    s.ehlo("client.far.test")
    s.mail(SENDER)
    s.rcpt(ALICE)
    assert s.docmd("DATA")[0] == 354
    s.send(b"Subject: half\r\n\r\nonly half of a message\r\n")
    s.sock.close()  # no final "."
    s.file = None
    spool = server.mail_dir / ".incoming"
    deadline = time.monotonic() + 10
    while spool.exists() and list(spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not spool.exists() or list(spool.iterdir()) == []
    assert server.messages(ALICE) == []
    p = pop_login(server)
    assert p.stat() == (0, 0)
    p.quit()


@pytest.mark.parametrize("tool", ["curl", "poplib"])
def test_wrong_password_refused(server, tmp_path, tool):
    smtp_send(server, ALICE, simple("private"))
    if tool == "curl":
        curl = need("curl")
        proc = run(
            [
                curl,
                "-q",
                "--silent",
                "--noproxy",
                "*",
                "--user",
                f"{ALICE}:wrong",
                f"pop3://127.0.0.1:{server.pop3_port}/1",
            ],
            tool_env(tmp_path),
            ok=(67,),  # CURLE_LOGIN_DENIED
        )
        assert b"private" not in proc.stdout
    else:
        p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
        p.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            p.pass_("wrong")
        p.quit()
    assert len(server.messages(ALICE)) == 1
