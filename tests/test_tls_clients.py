"""The TLS client matrix: the real clients, each with and without TLS.

swaks, curl, msmtp, mpop and fetchmail (found through `need`, so a missing one
skips locally and fails under CI=true) and the stdlib's smtplib and poplib talk
to a real `twistd` with a self-signed certificate: STARTTLS on the SMTP ports,
STLS on POP3, implicit TLS on SMTPS and POP3S. Then the flows of a few well-known
mail programs, the STARTTLS command-injection attacks, bad TLS input, and a
certificate renewed on disk.

Every server here trusts no network, so a relay
is only accepted through AUTH or POP-before-SMTP, and the trace header tells
which: `with ESMTPA` (AUTH), `ESMTPS` (TLS), `ESMTPSA` (both), with
`(using TLSv1.x CIPHER)` whenever TLS carried the message. Every program runs
with a private HOME, proxies off, a 30-second limit, and talks only to
127.0.0.0/8 (a certificate's host name is mapped to 127.0.0.1 with curl's
`--resolve` or the clients' host-override options, never looked up).
"""

from __future__ import annotations

import functools
import hashlib
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from conftest import MailServer, client_tls_context, need, tool_env
from test_blackbox import Raw, wait_for
from test_relay_blackbox import b64, plain, queue

ALICE = "alice@example.test"
ALICE_PW = "alice pw"
BOB = "bob@other.test"
BOB_PW = "bob pw"
FAR = "x@far.test"
HOSTNAME = "mail.example.test"  # the name in the test certificate

RELAY_DENIED = f"554 5.7.1 <{FAR}>: Relay access denied"


# --- servers --------------------------------------------------------------------


@pytest.fixture
def start(untrusted):
    """Start TLS servers that trust no network; their logs are checked afterwards."""
    return functools.partial(untrusted, tls=True)


# --- helpers --------------------------------------------------------------------


def run(
    cmd: list[str],
    env: dict[str, str],
    *,
    input: bytes | None = None,
    ok: tuple[int, ...] | None = (0,),
) -> subprocess.CompletedProcess:
    """Run a client (30 s at most); with ok=None any exit status is returned."""
    proc = subprocess.run(cmd, input=input, env=env, timeout=30, capture_output=True)
    if ok is not None:
        assert proc.returncode in ok, (
            f"{cmd} exited {proc.returncode}, expected {ok}\n"
            f"--- stdout ---\n{proc.stdout.decode(errors='replace')}\n"
            f"--- stderr ---\n{proc.stderr.decode(errors='replace')}"
        )
    return proc


def text(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


def write_private(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o600)
    return path


def message(subject: str, sender: str = ALICE, body: str = "hello") -> bytes:
    return f"Subject: {subject}\r\nFrom: {sender}\r\n\r\n{body}\r\n".encode()


def deliver(server: MailServer, subject: str, rcpt: str = ALICE) -> None:
    """Local delivery from a stranger: allowed from anyone on the MTA port.

    From 127.0.0.2, which never logs in to POP3 here: a POP-authorised address
    may only use its account's domains as the sender, even for local mail.
    """
    with smtplib.SMTP(
        "127.0.0.1", server.smtp_port, source_address=("127.0.0.2", 0), timeout=30
    ) as s:
        assert s.sendmail("y@far.test", [rcpt], message(subject, "y@far.test")) == {}


def trace(data: bytes) -> str:
    """The first Received header (ours), unfolded lines kept."""
    unix = data.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    m = re.search(r"^Received: .*(?:\n\t.*)*", unix, re.MULTILINE)
    assert m, unix[:500]
    return m.group(0)


def check_trace(data: bytes, proto: str, version: str | None = None) -> str:
    """The trace header says `with <proto>`, and names TLS exactly when it was used."""
    header = trace(data)
    assert f"\tby {HOSTNAME} (Mailbox) with {proto} id " in header, header
    using = re.search(r"\n\t\(using (TLSv1\.[23]) ([A-Za-z0-9_-]+)\)\n", header)
    if proto in ("ESMTPS", "ESMTPSA"):
        assert using, header
        if version:
            assert using.group(1) == version, header
    else:
        assert using is None and "(using" not in header, header
    return header


def stored(server: MailServer, address: str = ALICE) -> bytes:
    [path] = server.messages(address)
    return path.read_bytes()


def relayed(server: MailServer, account: str | None = ALICE, client: str = "127.0.0.1") -> bytes:
    """The one queued message: its envelope checked, its bytes returned."""
    [(envelope, data)] = queue(server)
    assert [r["address"] for r in envelope["recipients"]] == [FAR], envelope
    assert envelope["account"] == account, envelope
    assert envelope["client"] == client, envelope
    return data


def md5_fingerprint(certificate: Path) -> str:
    """fetchmail's `sslfingerprint` format: MD5 of the DER certificate."""
    der = ssl.PEM_cert_to_DER_cert(certificate.read_text())
    digest = hashlib.md5(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def maildir(path: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def subjects_in(box: Path) -> list[str]:
    found = []
    for p in sorted((box / "new").iterdir()):
        m = re.search(rb"^Subject: (.*)$", p.read_bytes(), re.MULTILINE)
        found.append(m.group(1).decode() if m else "?")
    return sorted(found)


class TLSRaw(Raw):
    """Raw's line client, with implicit TLS or an upgrade in the middle."""

    def __init__(
        self,
        port: int,
        source: str = "127.0.0.1",
        implicit: bool = False,
        context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(port, source)
        if implicit:
            self.upgrade(context, server_hostname)

    def upgrade(
        self, context: ssl.SSLContext | None = None, server_hostname: str | None = None
    ) -> ssl.SSLSocket:
        # Anything the server said in plaintext after its "go ahead" would sit here.
        assert self.buf == b"", self.buf
        ctx = context or client_tls_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        return self.sock

    def quiet(self, seconds: float = 0.5) -> bool:
        """True if the server sends nothing more for `seconds` (nothing is consumed)."""
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(10)
        return False

    def lines(self) -> list[str]:
        """All lines of one SMTP reply."""
        out = [self.line()]
        while out[-1][3:4] == "-":
            out.append(self.line())
        return out

    def ehlo(self, name: str = "client.far.test") -> list[str]:
        self.send(f"EHLO {name}\r\n")
        lines = self.lines()
        assert lines[-1].startswith("250 "), lines
        return [line[4:] for line in lines]

    def multi(self, command: str) -> list[str]:
        """A POP3 multi-line response's lines (after +OK)."""
        self.send(command + "\r\n")
        first = self.line()
        assert first.startswith("+OK"), first
        out = []
        while (line := self.line()) != ".":
            out.append(line)
        return out


def smtp_session(
    server: MailServer, mode: str, port: int | None = None, source: str = "127.0.0.1"
) -> TLSRaw:
    """A raw SMTP session past EHLO: `plain`, `starttls` (upgraded) or `implicit`."""
    if mode == "implicit":
        r = TLSRaw(server.smtps_port, source, implicit=True)
    else:
        r = TLSRaw(port or server.smtp_port, source)
    assert r.reply().startswith("220 ")
    caps = r.ehlo()
    if mode == "starttls":
        assert "STARTTLS" in caps, caps
        r.send("STARTTLS\r\n")
        assert r.line() == "220 2.0.0 Ready to start TLS"
        r.upgrade()
        assert "STARTTLS" not in r.ehlo()
    return r


def pop_session(server: MailServer, mode: str, source: str = "127.0.0.1") -> TLSRaw:
    """A raw POP3 session after the greeting: `plain`, `stls` (upgraded) or `implicit`."""
    if mode == "implicit":
        r = TLSRaw(server.pop3s_port, source, implicit=True)
    else:
        r = TLSRaw(server.pop3_port, source)
    assert r.line().startswith("+OK ")
    if mode == "stls":
        r.send("STLS\r\n")
        assert r.line() == "+OK Begin TLS negotiation"
        r.upgrade()
    return r


def pop_login(r: TLSRaw, user: str = ALICE, password: str = ALICE_PW) -> str:
    r.send(f"USER {user}\r\n")
    assert r.line() == "+OK send your password"
    r.send(f"PASS {password}\r\n")
    return r.line()


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes; fails if it does not close."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLEOFError):
            return data
        except TimeoutError:
            raise AssertionError(
                f"the server did not close the connection within {timeout} s; got {data!r}"
            ) from None
        if not chunk:
            return data
        data += chunk


def peer_certificate(server: MailServer, how: str) -> bytes:
    """The DER certificate a new TLS connection sees: smtps, pop3s, starttls or stls."""
    if how == "smtps":
        r = TLSRaw(server.smtps_port, implicit=True)
        assert r.reply().startswith("220 ")
    elif how == "pop3s":
        r = TLSRaw(server.pop3s_port, implicit=True)
        assert r.line().startswith("+OK")
    elif how == "starttls":
        r = smtp_session(server, "starttls")
    else:
        r = pop_session(server, "stls")
    try:
        return r.sock.getpeercert(binary_form=True)
    finally:
        r.close()


def smtp_works(server: MailServer, mode: str = "starttls", subject: str = "still serving") -> None:
    """A normal session on the server still delivers (after some bad input)."""
    before = len(server.messages(ALICE))
    r = smtp_session(server, mode)
    r.send(f"MAIL FROM:<y@far.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == "250 2.1.5 Ok"
    assert r.reply().startswith("354 ")
    r.send(f"Subject: {subject}\r\n\r\nfine\r\n.\r\nQUIT\r\n")
    assert r.reply().startswith("250 2.0.0 Ok: queued as ")
    assert r.reply() == "221 2.0.0 Bye"
    r.close()
    assert len(server.messages(ALICE)) == before + 1


def pop_works(server: MailServer, mode: str = "stls") -> None:
    r = pop_session(server, mode)
    assert pop_login(r).startswith("+OK ")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    assert r.closed()
    r.close()


def tls11_context() -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (OpenSSL 3 needs level 0 to offer them)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses to offer TLS 1.1 otherwise
    return ctx


def tls12_context() -> ssl.SSLContext:
    ctx = client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def verifying_context(server: MailServer) -> ssl.SSLContext:
    """Trusts exactly the server's self-signed certificate, host name checked."""
    return ssl.create_default_context(cafile=str(server.certificate))


# --- swaks ----------------------------------------------------------------------

SWAKS_MODES = {
    "plain": [],
    "starttls": ["-tls"],
    "implicit": ["--tlsc"],
}


def swaks(server: MailServer, mode: str, to: str, *extra: str, port: int | None = None) -> list:
    if port is None:
        port = server.smtps_port if mode == "implicit" else server.submission_port
    return [
        need("swaks"),
        "--server",
        "127.0.0.1",
        "--port",
        str(port),
        "--helo",
        "client.far.test",
        "--from",
        ALICE,
        "--to",
        to,
        "--header",
        f"Subject: swaks {mode}",
        "--body",
        f"sent by swaks ({mode})",
        "--timeout",
        "20",
        *SWAKS_MODES[mode],
        *extra,
    ]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_swaks_auth_relays(start, tmp_path, mode, mechanism):
    need("swaks")
    server = start()
    cmd = swaks(server, mode, FAR, "-a", mechanism, "--auth-user", ALICE)
    proc = run(cmd + ["--auth-password", ALICE_PW], tool_env(tmp_path))
    out = text(proc)
    arrow = "->" if mode == "plain" else "~>"  # swaks marks lines sent over TLS with ~
    assert f"{arrow} AUTH {mechanism}" in out, out
    assert "235 2.7.0 Authentication successful" in out, out
    assert ("-> STARTTLS" in out) == (mode == "starttls"), out
    data = relayed(server)
    check_trace(data, "ESMTPA" if mode == "plain" else "ESMTPSA")
    assert f"sent by swaks ({mode})".encode() in data
    assert ALICE_PW.encode() not in data


@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_swaks_local_delivery_without_auth(start, tmp_path, mode):
    need("swaks")
    server = start()
    run(
        swaks(server, mode, ALICE, port=None if mode == "implicit" else server.smtp_port),
        tool_env(tmp_path),
    )
    data = stored(server)
    check_trace(data, "ESMTP" if mode == "plain" else "ESMTPS")
    assert f"sent by swaks ({mode})".encode() in data
    assert queue(server) == []


@pytest.mark.parametrize("mode", ["plain", "starttls", "implicit"])
def test_swaks_pipeline(start, tmp_path, mode):
    need("swaks")
    server = start()
    port = None if mode == "implicit" else server.smtp_port
    proc = run(swaks(server, mode, f"{ALICE},{BOB}", "--pipeline", port=port), tool_env(tmp_path))
    out = text(proc)
    assert "PIPELINING" in out, out
    send, recv = ("->", "<-") if mode == "plain" else ("~>", "<~")
    # One batch: DATA went out before MAIL FROM's reply came back.
    assert out.index(f"{send} DATA") < out.index(f"{recv}  250 2.1.0 Ok"), out
    for address in (ALICE, BOB):
        check_trace(stored(server, address), "ESMTP" if mode == "plain" else "ESMTPS")


# --- curl: SMTP -----------------------------------------------------------------


def curl(*args: str) -> list[str]:
    fixed = ["-q", "--silent", "--show-error", "--noproxy", "*", "--max-time", "20"]
    return [need("curl"), *fixed, *args]


CURL_SMTP = {
    # mode: (scheme, port attribute, TLS options; "{cert}" is the server's certificate)
    "plain": ("smtp", "submission_port", []),
    "starttls-cacert": ("smtp", "submission_port", ["--ssl-reqd", "--cacert", "{cert}"]),
    "starttls-k": ("smtp", "smtp_port", ["--ssl-reqd", "-k"]),
    "smtps-cacert": ("smtps", "smtps_port", ["--cacert", "{cert}"]),
    "smtps-k": ("smtps", "smtps_port", ["-k"]),
}


@pytest.mark.parametrize("mode", list(CURL_SMTP))
def test_curl_smtp_auth_relays(start, tmp_path, mode):
    need("curl")
    server = start()
    scheme, attr, tls = CURL_SMTP[mode]
    port = getattr(server, attr)
    tls = [a.replace("{cert}", str(server.certificate)) for a in tls]
    proc = run(
        curl(
            "--verbose",
            "--resolve",
            f"{HOSTNAME}:{port}:127.0.0.1",  # the certificate's name, on loopback
            f"{scheme}://{HOSTNAME}:{port}/client.far.test",  # the path is curl's EHLO name
            "--mail-from",
            ALICE,
            "--mail-rcpt",
            FAR,
            "--user",
            f"{ALICE}:{ALICE_PW}",
            "--upload-file",
            "-",
            *tls,
        ),
        tool_env(tmp_path),
        input=message(f"curl {mode}", body=f"curl smtp {mode}"),
    )
    err = proc.stderr.decode(errors="replace")
    assert ("> STARTTLS" in err) == mode.startswith("starttls"), err
    data = relayed(server)
    check_trace(data, "ESMTPA" if mode == "plain" else "ESMTPSA")
    assert b"Received: from client.far.test ([127.0.0.1])" in data
    assert data.endswith(f"curl smtp {mode}\n".encode())


def test_curl_cacert_refuses_a_certificate_for_another_name(start, tmp_path):
    """--cacert really checks: the same certificate under a name it does not carry fails."""
    need("curl")
    server = start()
    port = server.smtps_port
    proc = run(
        curl(
            "--resolve",
            f"other.example.test:{port}:127.0.0.1",
            f"smtps://other.example.test:{port}/client.far.test",
            "--cacert",
            str(server.certificate),
            "--mail-from",
            ALICE,
            "--mail-rcpt",
            ALICE,
            "--upload-file",
            "-",
        ),
        tool_env(tmp_path),
        input=message("never sent"),
        ok=(60,),  # CURLE_PEER_FAILED_VERIFICATION
    )
    assert b"other.example.test" in proc.stderr
    assert server.messages(ALICE) == []


# --- curl: POP3 -----------------------------------------------------------------

CURL_POP3 = {
    "plain": ("pop3", "pop3_port", []),
    "stls-cacert": ("pop3", "pop3_port", ["--ssl-reqd", "--cacert", "{cert}"]),
    "stls-k": ("pop3", "pop3_port", ["--ssl-reqd", "-k"]),
    "pop3s-cacert": ("pop3s", "pop3s_port", ["--cacert", "{cert}"]),
    "pop3s-k": ("pop3s", "pop3s_port", ["-k"]),
}


@pytest.mark.parametrize("mode", list(CURL_POP3))
def test_curl_pop3_list_retr_uidl_top(start, tmp_path, mode):
    need("curl")
    server = start()
    env = tool_env(tmp_path)
    scheme, attr, tls = CURL_POP3[mode]
    port = getattr(server, attr)
    tls = [a.replace("{cert}", str(server.certificate)) for a in tls]
    deliver(server, "pop one")
    deliver(server, "pop two")

    def pop(path: str = "", *args: str) -> subprocess.CompletedProcess:
        return run(
            curl(
                "--verbose",
                "--resolve",
                f"{HOSTNAME}:{port}:127.0.0.1",
                "--user",
                f"{ALICE}:{ALICE_PW}",
                f"{scheme}://{HOSTNAME}:{port}/{path}",
                *tls,
                *args,
            ),
            env,
        )

    listing = pop()
    err = listing.stderr.decode(errors="replace")
    assert ("> STLS" in err) == mode.startswith("stls"), err
    entries = [line.split() for line in listing.stdout.splitlines()]
    assert [n for n, _ in entries] == [b"1", b"2"], listing.stdout

    first = pop("1").stdout
    assert first.startswith(b"Return-Path: <y@far.test>\r\nReceived: from "), first
    assert first.endswith(b"Subject: pop one\r\nFrom: y@far.test\r\n\r\nhello\r\n"), first
    assert int(entries[0][1]) == len(first)  # LIST's size is what RETR sends

    uidl = pop("", "-X", "UIDL").stdout
    uids = dict(line.split() for line in uidl.splitlines())
    assert sorted(uids) == [b"1", b"2"] and uids[b"1"] != uids[b"2"], uidl

    top = pop("", "-X", "TOP 1 0").stdout
    assert top == first[: first.index(b"\r\n\r\n") + 4]
    assert len(server.messages(ALICE)) == 2


# --- msmtp ----------------------------------------------------------------------


def msmtp_config(tmp_path: Path, server: MailServer, name: str, settings: str) -> Path:
    return write_private(
        tmp_path / f"msmtprc-{name}",
        "account default\n"
        "host 127.0.0.1\n"
        "domain client.far.test\n"
        f"from {ALICE}\n"
        "timeout 20\n" + settings,
    )


def msmtp_auth(password: str = ALICE_PW, method: str = "on") -> str:
    # msmtp picks a mechanism itself ("on") only over TLS: without TLS it refuses to
    # send a password unless told which plaintext mechanism to use.
    return f'auth {method}\nuser {ALICE}\npassword "{password}"\n'


MSMTP_MODES = {
    # mode: (port attribute, TLS settings)
    "plain": ("submission_port", "tls off\n"),
    "starttls-trust-file": (
        "submission_port",
        "tls on\ntls_starttls on\ntls_trust_file {cert}\ntls_host_override mail.example.test\n",
    ),
    "starttls-certcheck-off": ("smtp_port", "tls on\ntls_starttls on\ntls_certcheck off\n"),
    "implicit": ("smtps_port", "tls on\ntls_starttls off\ntls_certcheck off\n"),
}


@pytest.mark.parametrize("mode", list(MSMTP_MODES))
def test_msmtp_auth(start, tmp_path, mode):
    msmtp = need("msmtp")
    server = start()
    attr, tls = MSMTP_MODES[mode]
    cfg = msmtp_config(
        tmp_path,
        server,
        mode,
        f"port {getattr(server, attr)}\n"
        + tls.replace("{cert}", str(server.certificate))
        + msmtp_auth(method="plain" if mode == "plain" else "on"),
    )
    body = f"Subject: msmtp {mode}\nFrom: {ALICE}\nTo: {FAR}\n\nmsmtp says hi\n".encode()
    proc = run([msmtp, "-C", str(cfg), "--debug", "--", FAR], tool_env(tmp_path), input=body)
    out = text(proc)
    assert ("--> STARTTLS" in out) == mode.startswith("starttls"), out
    assert "235 2.7.0 Authentication successful" in out, out
    data = relayed(server)
    check_trace(data, "ESMTPA" if mode == "plain" else "ESMTPSA")
    assert data.endswith(body)


def test_msmtp_wrong_password_over_tls(start, tmp_path):
    msmtp = need("msmtp")
    server = start()
    cfg = msmtp_config(
        tmp_path,
        server,
        "wrong",
        f"port {server.submission_port}\n"
        + MSMTP_MODES["starttls-certcheck-off"][1]
        + msmtp_auth("wrong"),
    )
    cmd = [msmtp, "-C", str(cfg), "--", FAR]
    proc = run(cmd, tool_env(tmp_path), input=b"Subject: no\n\nno\n", ok=None)
    assert proc.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in text(proc), text(proc)
    assert queue(server) == []


def test_msmtp_pop_before_smtp_over_tls(start, tmp_path):
    """AUTH off: an STLS POP3 login from 127.0.0.20 lets msmtp relay from there."""
    msmtp = need("msmtp")
    server = start()
    env = tool_env(tmp_path)
    cfg = msmtp_config(
        tmp_path,
        server,
        "popauth",
        f"port {server.smtp_port}\nsource_ip 127.0.0.20\nauth off\n"
        + MSMTP_MODES["starttls-certcheck-off"][1],
    )
    body = f"Subject: msmtp after pop\nFrom: {ALICE}\n\nno auth needed\n".encode()

    proc = run([msmtp, "-C", str(cfg), "--", FAR], env, input=body, ok=None)
    assert proc.returncode != 0 and RELAY_DENIED in text(proc), text(proc)

    r = pop_session(server, "stls", source="127.0.0.20")
    assert pop_login(r).startswith("+OK ")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()

    proc = run([msmtp, "-C", str(cfg), "--debug", "--", FAR], env, input=body)
    assert "--> STARTTLS" in text(proc) and "--> AUTH" not in text(proc), text(proc)
    data = relayed(server, account=None, client="127.0.0.20")
    check_trace(data, "ESMTPS")
    assert data.endswith(body)


# --- mpop -----------------------------------------------------------------------

MPOP_MODES = {
    "plain": ("pop3_port", "tls off\n"),
    "stls": (
        "pop3_port",
        "tls on\ntls_starttls on\ntls_trust_file {cert}\ntls_host_override mail.example.test\n",
    ),
    "implicit": ("pop3s_port", "tls on\ntls_starttls off\ntls_certcheck off\n"),
}


def mpop_config(
    tmp_path: Path, server: MailServer, mode: str, auth: str, box: Path, source: str = ""
) -> Path:
    attr, tls = MPOP_MODES[mode]
    return write_private(
        tmp_path / f"mpoprc-{mode}-{auth}",
        "account default\n"
        "host 127.0.0.1\n"
        f"port {getattr(server, attr)}\n"
        + tls.replace("{cert}", str(server.certificate))
        + (f"source_ip {source}\n" if source else "")
        + f"user {ALICE}\n"
        f'password "{ALICE_PW}"\n'
        f"auth {auth}\n"
        f"delivery maildir {box}\n"
        f"uidls_file {tmp_path / 'mpop-uidls'}\n"
        "timeout 20\n",
    )


@pytest.mark.parametrize("mode", list(MPOP_MODES))
def test_mpop_user_and_plain_only_new(start, tmp_path, mode):
    mpop = need("mpop")
    server = start()
    env = tool_env(tmp_path)
    box = maildir(tmp_path / "Maildir")
    user = mpop_config(tmp_path, server, mode, "user", box)
    sasl = mpop_config(tmp_path, server, mode, "plain", box)
    deliver(server, "mpop one")
    deliver(server, "mpop two")

    proc = run([mpop, "-C", str(user), "--keep", "--only-new", "--debug"], env)
    out = text(proc)
    assert "--> USER alice@example.test" in out, out
    assert ("--> STLS" in out) == (mode == "stls"), out
    assert ("TLS session parameters" in out) == (mode != "plain"), out
    assert subjects_in(box) == ["mpop one", "mpop two"]

    # UIDL: nothing is new, with either login.
    run([mpop, "-C", str(user), "--keep", "--only-new"], env)
    run([mpop, "-C", str(sasl), "--keep", "--only-new"], env)
    assert len(subjects_in(box)) == 2

    deliver(server, "mpop three")
    proc = run([mpop, "-C", str(sasl), "--keep", "--only-new", "--debug"], env)
    out = text(proc)
    assert "--> AUTH PLAIN" in out and "--> USER" not in out, out
    assert subjects_in(box) == ["mpop one", "mpop three", "mpop two"]
    assert len(server.messages(ALICE)) == 3  # --keep


# --- fetchmail ------------------------------------------------------------------

FETCHMAIL_MODES = {
    # mode: (port attribute, ssl options, what -v must say)
    "plain": ("pop3_port", "sslproto ''", None),
    "stls-certck": (
        "pop3_port",
        "sslproto 'TLS1.2+' sslcertck sslcertfile {cert} sslcommonname mail.example.test",
        "upgrade to TLS succeeded",
    ),
    "stls-no-certck": ("pop3_port", "sslproto 'TLS1.2+' no sslcertck", "upgrade to TLS succeeded"),
    "ssl-fingerprint": (
        "pop3s_port",
        'ssl no sslcertck sslfingerprint "{fingerprint}"',
        "fingerprints match",
    ),
}


@pytest.mark.parametrize("mode", list(FETCHMAIL_MODES))
def test_fetchmail_uidl_keep(start, tmp_path, mode):
    fetchmail = need("fetchmail")
    server = start()
    env = tool_env(tmp_path)
    attr, options, says = FETCHMAIL_MODES[mode]
    options = options.replace("{cert}", str(server.certificate)).replace(
        "{fingerprint}", md5_fingerprint(server.certificate)
    )
    out = tmp_path / "delivered"
    rc = write_private(
        tmp_path / "fetchmailrc",
        "set no bouncemail\n"
        "set no syslog\n"
        f"poll 127.0.0.1 service {getattr(server, attr)} protocol pop3 uidl"
        " auth password timeout 20\n"
        f'  user "{ALICE}" there with password "{ALICE_PW}"\n'
        "  keep\n"
        f"  {options}\n"
        f'  mda "cat >> {out}"\n',
    )
    ids, pid = tmp_path / "fetchids", tmp_path / "fetchmail.pid"
    cmd = [fetchmail, "--nodetach", "-v", "--fetchmailrc", str(rc), "--idfile", str(ids)]
    cmd += ["--pidfile", str(pid)]  # as root the default is /var/run/fetchmail.pid, shared

    def subjects() -> list[bytes]:
        if not out.exists():
            return []
        return sorted(re.findall(rb"^Subject: (.*)$", out.read_bytes(), re.MULTILINE))

    deliver(server, "fm one")
    deliver(server, "fm two")
    proc = run(cmd, env)  # 0: mail retrieved
    log = text(proc)
    if says:
        assert says in log, log
    else:
        assert "POP3> STLS" not in log, log
    assert "POP3> UIDL" in log, log
    assert subjects() == [b"fm one", b"fm two"]

    run(cmd, env, ok=(1,))  # 1: no new mail (UIDL)
    assert len(subjects()) == 2

    deliver(server, "fm three")
    run(cmd, env)
    assert subjects() == [b"fm one", b"fm three", b"fm two"]
    assert len(server.messages(ALICE)) == 3  # keep


# --- stdlib: smtplib and poplib ---------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "starttls", "starttls-tls12", "smtp_ssl"])
def test_smtplib_auth_relays(start, mode):
    server = start()
    body = message(f"smtplib {mode}")
    if mode == "smtp_ssl":
        s = smtplib.SMTP_SSL(
            "127.0.0.1",
            server.smtps_port,
            local_hostname="client.far.test",
            context=client_tls_context(),
            timeout=30,
        )
    else:
        s = smtplib.SMTP(
            "127.0.0.1", server.submission_port, local_hostname="client.far.test", timeout=30
        )
        if mode != "plain":
            s.ehlo()
            assert s.has_extn("starttls")
            s.starttls(context=tls12_context() if mode.endswith("tls12") else client_tls_context())
    with s:
        s.ehlo()
        assert not s.has_extn("starttls") or mode == "plain"
        assert s.has_extn("auth")
        s.login(ALICE, ALICE_PW)
        assert s.sendmail(ALICE, [FAR], body) == {}
    version = "TLSv1.2" if mode.endswith("tls12") else None
    check_trace(relayed(server), "ESMTPA" if mode == "plain" else "ESMTPSA", version)


@pytest.mark.parametrize("mode", ["plain", "stls", "pop3_ssl"])
def test_poplib(start, mode):
    server = start()
    deliver(server, "poplib one")
    deliver(server, "poplib two")
    if mode == "pop3_ssl":
        p = poplib.POP3_SSL(
            "127.0.0.1", server.pop3s_port, context=client_tls_context(), timeout=30
        )
        assert "STLS" not in p.capa()
    else:
        p = poplib.POP3("127.0.0.1", server.pop3_port, timeout=30)
        assert "STLS" in p.capa()
        if mode == "stls":
            assert p.stls(context=client_tls_context()).startswith(b"+OK")
            assert "STLS" not in p.capa()
    try:
        assert p.user(ALICE).startswith(b"+OK")
        assert p.pass_(ALICE_PW).startswith(b"+OK 2 messages")
        assert [line.split()[0] for line in p.list()[1]] == [b"1", b"2"]
        retr = b"\r\n".join(p.retr(2)[1])
        assert b"Subject: poplib two" in retr
        uids = p.uidl()[1]
        assert len({line.split()[1] for line in uids}) == 2
        top = p.top(1, 0)[1]
        assert b"Subject: poplib one" in top and top[-1] == b""
    finally:
        p.quit()
    assert len(server.messages(ALICE)) == 2


@pytest.mark.parametrize("port", ["starttls", "smtps"])
def test_strict_client_verifies_the_certificate_by_name(start, port):
    """A strict client (CA file = the certificate, host name checked) gets through."""
    server = start()
    ctx = verifying_context(server)
    # Connected to 127.0.0.1, the TLS layer is told the certificate's name.
    if port == "smtps":
        r = TLSRaw(server.smtps_port, implicit=True, context=ctx, server_hostname=HOSTNAME)
        assert r.reply().startswith("220 ")
    else:
        r = TLSRaw(server.submission_port)
        assert r.reply().startswith("220 ")
        r.ehlo()
        r.send("STARTTLS\r\n")
        assert r.line().startswith("220 ")
        r.upgrade(ctx, server_hostname=HOSTNAME)
    assert r.sock.getpeercert()["subject"] == ((("commonName", HOSTNAME),),)
    assert "AUTH PLAIN LOGIN" in r.ehlo()
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    r.close()


# --- the seed flows of well-known clients -----------------------------------------


def test_thunderbird_password_transmitted_insecurely(start):
    """Thunderbird, "Normal password", connection security "None", port 587:
    AUTH LOGIN in plaintext with the full address as the user name."""
    server = start()
    r = smtp_session(server, "plain", port=server.submission_port)
    r.send("EHLO [192.168.1.20]\r\n")  # Thunderbird sends its address literal
    caps = [line[4:] for line in r.lines()]
    assert "AUTH PLAIN LOGIN" in caps and "STARTTLS" in caps, caps
    r.send("AUTH LOGIN\r\n")
    assert r.reply() == "334 VXNlcm5hbWU6"
    r.send(b64(ALICE) + "\r\n")
    assert r.reply() == "334 UGFzc3dvcmQ6"
    r.send(b64(ALICE_PW) + "\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    r.send(f"MAIL FROM:<{ALICE}> BODY=8BITMIME SIZE=90\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    r.send(f"RCPT TO:<{FAR}>\r\n")
    assert r.reply() == "250 2.1.5 Ok"
    r.send("DATA\r\n")
    assert r.reply().startswith("354 ")
    r.send(f"Subject: from Thunderbird\r\nFrom: {ALICE}\r\n\r\nhi\r\n.\r\n")
    assert r.reply().startswith("250 2.0.0 Ok: queued as ")
    r.close()
    header = check_trace(relayed(server), "ESMTPA")
    assert header.startswith("Received: from [192.168.1.20] ([127.0.0.1])"), header


def test_the_bat_pop_before_smtp(start, tmp_path):
    """The Bat!, "Use POP before SMTP": mpop checks mail from 127.0.0.21, then
    msmtp sends without AUTH from the same address; another address may not."""
    mpop = need("mpop")
    msmtp = need("msmtp")
    server = start()
    env = tool_env(tmp_path)
    deliver(server, "waiting for The Bat")
    body = f"Subject: from The Bat\nFrom: {ALICE}\nTo: {FAR}\n\nhi far\n".encode()

    def send(source: str) -> subprocess.CompletedProcess:
        cfg = msmtp_config(
            tmp_path,
            server,
            f"bat-{source}",
            f"port {server.smtp_port}\nsource_ip {source}\nauth off\ntls off\n",
        )
        return run([msmtp, "-C", str(cfg), "--debug", "--", FAR], env, input=body, ok=None)

    proc = send("127.0.0.21")
    assert proc.returncode != 0 and RELAY_DENIED in text(proc), text(proc)

    box = maildir(tmp_path / "Maildir")
    cfg = mpop_config(tmp_path, server, "plain", "user", box, source="127.0.0.21")
    run([mpop, "-C", str(cfg), "--keep"], env)
    assert subjects_in(box) == ["waiting for The Bat"]

    proc = send("127.0.0.21")
    assert proc.returncode == 0, text(proc)
    assert "--> AUTH" not in text(proc) and "--> STARTTLS" not in text(proc), text(proc)
    data = relayed(server, account=None, client="127.0.0.21")
    check_trace(data, "ESMTP")
    assert data.endswith(body)

    proc = send("127.0.0.22")
    assert proc.returncode != 0 and RELAY_DENIED in text(proc), text(proc)
    assert len(queue(server)) == 1


def test_eudora_never_ssl(start, tmp_path):
    """Eudora, "Secure Sockets when Receiving/Sending: Never": USER/PASS and
    SMTP AUTH in plaintext on the MTA port, though the server offers TLS."""
    mpop = need("mpop")
    msmtp = need("msmtp")
    server = start()
    env = tool_env(tmp_path)
    deliver(server, "for Eudora")
    box = maildir(tmp_path / "Maildir")
    cfg = mpop_config(tmp_path, server, "plain", "user", box, source="127.0.0.24")
    proc = run([mpop, "-C", str(cfg), "--keep", "--debug"], env)
    assert "STLS" in text(proc) and "--> STLS" not in text(proc), text(proc)  # offered, unused
    assert subjects_in(box) == ["for Eudora"]

    # Another address, so only AUTH can authorise the relay (not POP-before-SMTP).
    cfg = msmtp_config(
        tmp_path,
        server,
        "eudora",
        f"port {server.smtp_port}\nsource_ip 127.0.0.25\ntls off\n" + msmtp_auth(method="login"),
    )
    body = f"Subject: from Eudora\nFrom: {ALICE}\n\nsent in the clear\n".encode()
    proc = run([msmtp, "-C", str(cfg), "--debug", "--", FAR], env, input=body)
    assert "--> STARTTLS" not in text(proc) and "--> AUTH LOGIN" in text(proc), text(proc)
    data = relayed(server, client="127.0.0.25")
    check_trace(data, "ESMTPA")


def test_outlook_same_settings_as_incoming(start):
    """Outlook: POP3 over implicit TLS; "My outgoing server requires authentication,
    use same settings as my incoming mail server", port 587 with STARTTLS."""
    server = start()
    user, password = ALICE, ALICE_PW  # the one set of settings for both
    p = poplib.POP3_SSL("127.0.0.1", server.pop3s_port, context=client_tls_context(), timeout=30)
    p.user(user)
    assert p.pass_(password).startswith(b"+OK")
    p.quit()

    # From another address, so only AUTH can authorise the relay.
    with smtplib.SMTP(
        "127.0.0.1",
        server.submission_port,
        local_hostname="DESKTOP-OUTLOOK",
        source_address=("127.0.0.23", 0),
        timeout=30,
    ) as s:
        s.ehlo()
        s.starttls(context=client_tls_context())
        code, caps = s.ehlo()
        assert code == 250
        assert b"AUTH=PLAIN LOGIN" in caps and b"AUTH PLAIN LOGIN" in caps, caps
        s.user, s.password = user, password
        assert s.auth("LOGIN", s.auth_login) == (235, b"2.7.0 Authentication successful")
        assert s.sendmail(ALICE, [FAR], message("from Outlook")) == {}
    check_trace(relayed(server, client="127.0.0.23"), "ESMTPSA")


# --- STARTTLS command injection ---------------------------------------------------


def test_smtp_starttls_injection(start):
    """Commands pipelined behind STARTTLS in the same segment are never executed."""
    server = start()
    r = TLSRaw(server.smtp_port)
    assert r.reply().startswith("220 ")
    r.ehlo()
    r.send(
        "STARTTLS\r\n"
        f"MAIL FROM:<{ALICE}>\r\n"
        f"RCPT TO:<{ALICE}>\r\n"
        "DATA\r\n"
        "Subject: injected\r\n\r\ninjected\r\n.\r\n"
    )
    assert r.line() == "220 2.0.0 Ready to start TLS"
    assert r.buf == b"" and r.quiet(), r.buf  # no plaintext reply to the injected lines
    r.upgrade()
    # The session starts over: EHLO first, and no transaction survived.
    r.send(f"MAIL FROM:<{ALICE}>\r\n")
    assert r.reply() == "503 5.5.1 Error: send HELO/EHLO first"
    caps = r.ehlo()
    assert "STARTTLS" not in caps and "AUTH PLAIN LOGIN" in caps, caps
    r.send("DATA\r\n")
    assert r.reply() == "503 5.5.1 Error: need MAIL command"
    r.send(f"RCPT TO:<{ALICE}>\r\n")
    assert r.reply() == "503 5.5.1 Error: need MAIL command"
    r.close()
    assert server.messages(ALICE) == []
    smtp_works(server)
    assert b"injected" not in stored(server)


def test_smtp_starttls_injection_of_auth(start):
    """An AUTH pipelined behind STARTTLS does not authenticate the TLS session."""
    server = start()
    r = TLSRaw(server.submission_port)
    assert r.reply().startswith("220 ")
    r.ehlo()
    r.send(f"STARTTLS\r\nAUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.line() == "220 2.0.0 Ready to start TLS"
    assert r.buf == b"" and r.quiet(), r.buf
    r.upgrade()
    r.ehlo()
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{FAR}>\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == "530 5.7.0 Authentication required"
    r.close()


def test_pop3_stls_injection(start):
    """USER pipelined behind STLS is forgotten: PASS after the handshake is refused."""
    server = start()
    r = TLSRaw(server.pop3_port)
    assert r.line().startswith("+OK ")
    r.send(f"STLS\r\nUSER {ALICE}\r\n")
    assert r.line() == "+OK Begin TLS negotiation"
    assert r.buf == b"" and r.quiet(), r.buf
    r.upgrade()
    r.send(f"PASS {ALICE_PW}\r\n")
    assert r.line() == "-ERR send USER first"
    assert pop_login(r).startswith("+OK ")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()


def test_pop3_stls_injection_of_a_whole_login(start):
    server = start()
    deliver(server, "secret")
    r = TLSRaw(server.pop3_port)
    assert r.line().startswith("+OK ")
    r.send(f"STLS\r\nUSER {ALICE}\r\nPASS {ALICE_PW}\r\nRETR 1\r\n")
    assert r.line() == "+OK Begin TLS negotiation"
    assert r.buf == b"" and r.quiet(), r.buf
    r.upgrade()
    r.send("STAT\r\n")
    assert r.line() == "-ERR not authenticated"
    r.close()


# --- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["smtp", "pop3"])
def test_garbage_instead_of_a_tls_handshake(start, protocol):
    server = start()
    if protocol == "smtp":
        r = TLSRaw(server.smtp_port)
        assert r.reply().startswith("220 ")
        r.ehlo()
        r.send("STARTTLS\r\n")
        assert r.line() == "220 2.0.0 Ready to start TLS"
    else:
        r = TLSRaw(server.pop3_port)
        assert r.line().startswith("+OK ")
        r.send("STLS\r\n")
        assert r.line() == "+OK Begin TLS negotiation"
    r.send(b"this is not a TLS ClientHello\r\nQUIT\r\n")
    rest = read_until_closed(r.sock)
    # A clean close, at most after a TLS alert record; never a plaintext reply.
    assert rest == b"" or rest[:1] == b"\x15", rest
    r.close()
    smtp_works(server) if protocol == "smtp" else pop_works(server)


@pytest.mark.parametrize("protocol", ["smtp", "submission", "pop3"])
def test_tls_spoken_to_a_plaintext_port(start, protocol):
    server = start()
    port = {"smtp": server.smtp_port, "submission": server.submission_port}.get(
        protocol, server.pop3_port
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pytest.raises(ssl.SSLError):
        client_tls_context().wrap_socket(sock)  # the greeting is no TLS record
    sock.close()
    # A ClientHello read as command lines gets plain error replies, not a crash.
    r = TLSRaw(port)
    greeting = r.line()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = client_tls_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    r.send(outgoing.read() + b"\r\n")
    first = r.line()
    if protocol == "pop3":
        assert greeting.startswith("+OK ") and first.startswith("-ERR "), first
    else:
        assert greeting.startswith("220 ") and first.startswith("500 5.5."), first
    r.close()
    smtp_works(server) if protocol != "pop3" else pop_works(server)


@pytest.mark.parametrize("port", ["smtps", "pop3s"])
def test_plaintext_spoken_to_a_tls_port(start, port):
    server = start()
    sock = socket.create_connection(("127.0.0.1", getattr(server, f"{port}_port")), timeout=10)
    sock.sendall(b"EHLO client.far.test\r\n" if port == "smtps" else f"USER {ALICE}\r\n".encode())
    rest = read_until_closed(sock)
    assert rest == b"" or rest[:1] == b"\x15", rest  # no plaintext greeting, no reply
    sock.close()
    smtp_works(server, "implicit") if port == "smtps" else pop_works(server, "implicit")


def test_second_starttls_refused(start):
    server = start()
    for mode in ("starttls", "implicit"):
        r = smtp_session(server, mode)
        r.send("STARTTLS\r\n")
        assert r.reply() == "503 5.5.1 Error: TLS already active", mode
        r.send("NOOP\r\n")  # the session goes on, still encrypted
        assert r.reply() == "250 2.0.0 Ok"
        r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
        assert r.reply() == "235 2.7.0 Authentication successful"
        r.close()
    for mode in ("stls", "implicit"):
        r = pop_session(server, mode)
        assert "STLS" not in r.multi("CAPA")
        r.send("STLS\r\n")
        assert r.line() == "-ERR TLS already active", mode
        assert pop_login(r).startswith("+OK ")
        r.send("QUIT\r\n")
        assert r.line().startswith("+OK")
        r.close()


@pytest.mark.parametrize("how", ["starttls", "stls", "smtps", "pop3s"])
def test_tls_1_1_client_refused(start, how):
    server = start()
    ctx = tls11_context()
    if how == "starttls":
        r = TLSRaw(server.smtp_port)
        assert r.reply().startswith("220 ")
        r.ehlo()
        r.send("STARTTLS\r\n")
        assert r.line().startswith("220 ")
    elif how == "stls":
        r = TLSRaw(server.pop3_port)
        assert r.line().startswith("+OK")
        r.send("STLS\r\n")
        assert r.line().startswith("+OK")
    else:
        r = TLSRaw(getattr(server, f"{how}_port"))
    with pytest.raises(ssl.SSLError) as e:
        r.upgrade(ctx)
    if "NO_PROTOCOLS_AVAILABLE" in str(e.value):
        pytest.skip("this OpenSSL cannot offer TLS 1.1 even at security level 0")
    # The server answered the ClientHello with a protocol_version alert.
    assert "PROTOCOL_VERSION" in str(e.value) or "UNSUPPORTED_PROTOCOL" in str(e.value), e.value
    r.close()
    if how in ("starttls", "smtps"):
        smtp_works(server, "starttls" if how == "starttls" else "implicit")
    else:
        pop_works(server, "stls" if how == "stls" else "implicit")


def test_require_tls_for_auth(start):
    server = start("[smtp]\nrequire_tls_for_auth = yes\n")
    # SMTP: AUTH neither offered nor accepted in plaintext ...
    r = smtp_session(server, "plain", port=server.submission_port)
    caps = r.ehlo()
    assert "STARTTLS" in caps and not any(c.startswith("AUTH") for c in caps), caps
    expected = "538 5.7.11 Encryption required for requested authentication mechanism"
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == expected
    r.send("AUTH LOGIN\r\n")
    assert r.reply() == expected
    r.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{FAR}>\r\n")
    assert r.reply() == "250 2.1.0 Ok"
    assert r.reply() == "530 5.7.0 Authentication required"
    r.send("RSET\r\n")
    assert r.reply() == "250 2.0.0 Ok"
    # ... and both after STARTTLS, in the same session.
    r.send("STARTTLS\r\n")
    assert r.line() == "220 2.0.0 Ready to start TLS"
    r.upgrade()
    caps = r.ehlo()
    assert "AUTH PLAIN LOGIN" in caps and "AUTH=PLAIN LOGIN" in caps, caps
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply() == "235 2.7.0 Authentication successful"
    r.close()
    # On the implicit-TLS port it is offered at once.
    r = smtp_session(server, "implicit")
    r.send("AUTH LOGIN\r\n")
    assert r.reply() == "334 VXNlcm5hbWU6"
    r.close()

    # POP3: USER, PASS and AUTH refused before STLS ...
    r = pop_session(server, "plain")
    caps = r.multi("CAPA")
    assert "STLS" in caps and "USER" not in caps and "SASL PLAIN" not in caps, caps
    tls_first = "-ERR [AUTH] Authentication needs TLS here: send STLS first"
    r.send(f"USER {ALICE}\r\n")
    assert r.line() == tls_first
    r.send(f"PASS {ALICE_PW}\r\n")
    assert r.line() == tls_first
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.line() == tls_first
    # ... and accepted after it.
    r.send("STLS\r\n")
    assert r.line() == "+OK Begin TLS negotiation"
    r.upgrade()
    assert "USER" in r.multi("CAPA")
    assert pop_login(r).startswith("+OK ")
    r.send("QUIT\r\n")
    assert r.line().startswith("+OK")
    r.close()
    pop_works(server, "implicit")


def test_require_tls_for_auth_with_swaks(start, tmp_path):
    """A real client: AUTH without TLS is refused (and relays nothing), with -tls it works."""
    need("swaks")
    server = start("[smtp]\nrequire_tls_for_auth = yes\n")
    env = tool_env(tmp_path)
    auth = ["-a", "LOGIN", "--auth-user", ALICE, "--auth-password", ALICE_PW]
    proc = run(swaks(server, "plain", FAR, *auth), env, ok=None)
    assert proc.returncode != 0, text(proc)
    assert "Host did not advertise authentication" in text(proc), text(proc)
    assert queue(server) == []
    run(swaks(server, "starttls", FAR, *auth), env)
    check_trace(relayed(server), "ESMTPSA")


def test_blocked_address_refused_over_tls(start):
    """A blocked IP connecting with implicit TLS gets the refusal, encrypted, then a close."""
    server = start("[limits]\nauth_failures = 1\n")
    r = pop_session(server, "plain", source="127.0.0.30")
    r.send(f"USER {ALICE}\r\nPASS wrong\r\n")
    assert r.line() == "+OK send your password"
    assert r.line().startswith("-ERR [AUTH] Authentication failed. Connection refused")
    r.close()
    refusal = (
        "Connection refused from 127.0.0.30. "
        "Too many authorization failures from this IP, try again later."
    )
    r = TLSRaw(server.smtps_port, "127.0.0.30", implicit=True)
    assert r.line() == "554 5.7.1 " + refusal
    assert r.closed()
    r = TLSRaw(server.pop3s_port, "127.0.0.30", implicit=True)
    assert r.line() == "-ERR [SYS/TEMP] " + refusal
    assert r.closed()
    smtp_works(server, "implicit")


def closed_within(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes `sock` (sending nothing more) before `deadline`."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return sock.recv(4096) == b""
    except (ConnectionResetError, ssl.SSLEOFError):
        return True
    except TimeoutError:
        return False


def test_silent_tls_client_is_closed_after_the_idle_timeout(start):
    """A client that never sends its ClientHello must not hold a connection forever.

    The idle timeout fires (the log says "smtp timeout"), but the 421 and the close
    go through a TLS layer still waiting for the handshake, which never comes. The
    same holds for the refusal a blocked address gets on the implicit-TLS port.
    """
    server = start("[smtp]\nidle_timeout = 1\n[limits]\nauth_failures = 1\n")
    # The plaintext baseline: 421 after a second, then the close.
    r = TLSRaw(server.smtp_port)
    assert r.reply().startswith("220 ")
    assert r.reply() == "421 4.4.2 mail.example.test Error: timeout exceeded"
    assert r.closed()
    r.close()
    blocked = pop_session(server, "plain", source="127.0.0.31")
    blocked.send(f"USER {ALICE}\r\nPASS wrong\r\n")
    assert blocked.line() == "+OK send your password"
    assert blocked.line().startswith("-ERR [AUTH] Authentication failed. Connection refused")
    blocked.close()

    # Implicit TLS with nothing sent; STARTTLS accepted with no handshake after it;
    # a blocked address on the implicit-TLS port, nothing sent.
    implicit = socket.create_connection(("127.0.0.1", server.smtps_port), timeout=10)
    r = TLSRaw(server.smtp_port)
    assert r.reply().startswith("220 ")
    r.ehlo()
    r.send("STARTTLS\r\n")
    assert r.line() == "220 2.0.0 Ready to start TLS"
    refused = socket.create_connection(
        ("127.0.0.1", server.smtps_port), timeout=10, source_address=("127.0.0.31", 0)
    )
    deadline = time.monotonic() + 6
    closed = {
        "implicit TLS, no ClientHello": closed_within(implicit, deadline),
        "after STARTTLS, no ClientHello": closed_within(r.sock, deadline),
        "blocked address on implicit TLS, no ClientHello": closed_within(refused, deadline),
    }
    for sock in (implicit, r.sock, refused):
        sock.close()
    assert wait_for(lambda: server.log().count("smtp timeout for 127.0.0.1") >= 3, timeout=2)
    assert closed == dict.fromkeys(closed, True), f"still open 5 s after idle_timeout = 1: {closed}"


def test_no_warnings_in_the_log(start):
    """STARTTLS and implicit TLS leave no Python warning in the server's log."""
    server = start()
    smtp_works(server, "starttls")
    smtp_works(server, "implicit")
    pop_works(server, "stls")
    pop_works(server, "implicit")
    server.stop()
    found = [line for line in server.log().splitlines() if "Warning" in line]
    assert found == []


# --- certificate reload --------------------------------------------------------------


def test_renewed_certificate_is_used_without_a_restart(start):
    from cryptography import x509

    from mailboxd.tls import make_self_signed

    server = start()
    paths = ("smtps", "pop3s", "starttls", "stls")
    old = {how: peer_certificate(server, how) for how in paths}
    assert len(set(old.values())) == 1

    server.certificate.unlink()
    server.private_key.unlink()
    assert make_self_signed("renewed.example.test", server.certificate, server.private_key)
    time.sleep(1.5)  # the files are looked at, at most once a second, on a new connection

    new = {how: peer_certificate(server, how) for how in paths}
    for how in paths:
        assert new[how] != old[how], how
        cert = x509.load_der_x509_certificate(new[how])
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["renewed.example.test"], how
    assert new["smtps"] == ssl.PEM_cert_to_DER_cert(server.certificate.read_text())
    assert wait_for(lambda: "TLS certificate reloaded" in server.log(), timeout=5)

    # A broken renewal is logged, and the last good certificate stays in use.
    server.certificate.write_text("not a certificate\n")
    time.sleep(1.5)
    assert peer_certificate(server, "smtps") == new["smtps"]
    assert peer_certificate(server, "stls") == new["smtps"]
    assert wait_for(lambda: "still using the previous certificate" in server.log(), timeout=5)
    smtp_works(server, "implicit")
