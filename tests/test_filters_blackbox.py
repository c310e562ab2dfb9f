"""Message filters (issue 15, item 5) on the real server: site plugins from
the plugins folder (accept with headers, reject, hang, nonsense, a file that
cannot be loaded), and the shipped ClamAV filter against a real clamd from
Debian's packages, with a signature database made here for the EICAR file
(the official databases cannot be downloaded on these machines)."""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, client_tls_context, free_port, need
from test_blackbox import wait_for
from zone_server import A, ZoneServer

import mailboxd.clamav

pytestmark = pytest.mark.blackbox

# The EICAR test file (eicar.org): every virus scanner finds it, it harms nothing.
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"

PLUGIN = """
import time

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mailboxd.filtering import IMessageFilter, accept, reject


@implementer(IMessageFilter)
class Site:
    name = "site"

    def check(self, incoming):
        text = incoming.data
        if b"Subject: spam" in text:
            return reject(550, "5.7.1 Our site does not take spam")
        if b"Subject: slow" in text:
            return Deferred()  # never answers
        if b"Subject: nonsense" in text:
            return "yes, fine"
        seen = f"{incoming.ip} to {len(incoming.recipients)} as {incoming.account}"
        return accept(("X-Site-Checked", f"{seen} tls={incoming.tls is not None}"))


@implementer(IMessageFilter)
class Lookup:
    # Asks something that only answers by blocking: in the filters' threads.
    name = "lookup"
    blocking = True

    def check(self, incoming):
        if b"Subject: stuck" in incoming.data:
            time.sleep(8)
        return accept(("X-Lookup", "done"))


site = Site()
lookup = Lookup()
"""


def send(server, subject: str, body: bytes = b"hello\r\n") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.far.test")
        s.mail("a@far.test")
        assert s.rcpt(ALICE)[0] == 250
        return s.data(f"Subject: {subject}\r\n\r\n".encode() + body)


def send_as_alice(server, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30) as s:
        s.starttls(context=client_tls_context())
        s.login(ALICE, ALICE_PW)
        s.mail(ALICE)
        assert s.rcpt(ALICE)[0] == 250
        return s.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())


def test_site_plugins_decide_and_a_broken_one_only_delays(make_server):
    server = make_server("[filters]\ntimeout = 2\n", tls=True)
    plugins = server.home / "plugins"
    plugins.mkdir()
    (plugins / "site.py").write_text(PLUGIN)
    # A shipped filter copied in as a starting point loads as it is (with
    # its key empty, it offers no filter).
    shutil.copy(mailboxd.clamav.__file__, plugins / "clamav_copy.py")
    (plugins / "README").write_text("not a plugin: only *.py files are")
    text = server.config.read_text().replace("[mailbox]\n", f"[mailbox]\nplugins = {plugins}\n", 1)
    server.config.write_text(text)
    plugins.chmod(0o555)  # the server only reads it
    try:
        server.add_test_accounts().start()
        assert send(server, "fine")[0] == 250
        [kept] = server.messages(ALICE)
        head = kept.read_bytes().split(b"\n\n")[0]
        assert b"X-Site-Checked: 127.0.0.1 to 1 as None tls=False\n" in head
        assert b"X-Lookup: done\n" in head
        assert send_as_alice(server, "mine")[0] == 250
        mine = next(p for p in server.messages(ALICE) if b"Subject: mine" in p.read_bytes())
        assert b"X-Site-Checked: 127.0.0.1 to 1 as " + ALICE.encode() + b" tls=True\n" in (
            mine.read_bytes()
        )
        # A blocking check that hangs holds up its own message only: the
        # reactor serves the next client meanwhile.
        stuck: list[tuple[int, bytes]] = []
        waiting = threading.Thread(target=lambda: stuck.append(send(server, "stuck")))
        began = time.monotonic()
        waiting.start()
        time.sleep(0.5)
        assert send(server, "meanwhile")[0] == 250
        assert time.monotonic() - began < 1.8
        waiting.join(30)
        assert stuck == [(451, b"4.7.0 Message could not be checked, try again later")]
        assert 1.5 < time.monotonic() - began < 10
        assert send(server, "spam") == (550, b"5.7.1 Our site does not take spam")
        began = time.monotonic()
        assert send(server, "slow") == (451, b"4.7.0 Message could not be checked, try again later")
        assert 1.5 < time.monotonic() - began < 10
        assert send(server, "nonsense")[0] == 451
        assert len(server.messages(ALICE)) == 3
        assert "plugin " + str(plugins / "clamav_copy.py") + " loaded: []" in server.log()
        assert not (plugins / "__pycache__").exists()
        server.stop()
    finally:
        plugins.chmod(0o755)
    (plugins / "broken.py").write_text("import no_such_module_here\n")
    server.start()
    assert send(server, "fine") == (451, b"4.7.0 Message could not be checked, try again later")
    assert send(server, "fine") == (451, b"4.7.0 Message could not be checked, try again later")
    log = server.log()
    # One line for each, the broken file's at its loading, not one a message.
    broken = "plugin " + str(plugins / "broken.py") + " cannot be loaded: ModuleNotFoundError"
    assert log.count(broken) == 1
    assert log.count("filter site answered nonsense") == 1
    assert log.count("filter site failed: TimeoutError") == 1
    assert log.count("filter lookup failed: TimeoutError") == 1
    # Mended, it is loaded again while the server runs, and mail flows.
    (plugins / "broken.py").write_text("X = 1  # nothing to see here\n")
    assert wait_for(lambda: "changed: loading it again" in server.log(), timeout=20)
    assert send(server, "fine again")[0] == 250
    server.check_log()  # one line each, no traceback


class Clamd:
    """clamd from Debian's clamav-daemon, on a free loopback port, with a
    database that knows the EICAR file only."""

    def __init__(self, home: Path) -> None:
        self.home = home / "clamd"
        (self.home / "db").mkdir(parents=True)
        self.port = free_port()
        (self.home / "eicar.com").write_bytes(EICAR)
        signature = subprocess.run(
            [need("sigtool"), "--md5", "eicar.com"], cwd=self.home, capture_output=True, check=True
        ).stdout
        (self.home / "db" / "eicar.hdb").write_bytes(signature)
        (self.home / "clamd.conf").write_text(
            f"DatabaseDirectory {self.home / 'db'}\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\n"
            f"Foreground yes\nLogFile {self.home / 'clamd.log'}\n"
        )
        self.log = (self.home / "out.log").open("wb")
        self.proc = subprocess.Popen(
            [need("clamd"), "-c", str(self.home / "clamd.conf")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(self.answers, timeout=60):
            self.stop()
            raise RuntimeError((self.home / "out.log").read_text(errors="replace"))

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(b"zPING\0")
                return s.recv(10).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


@pytest.mark.daemons
def test_clamav_refuses_the_eicar_file_and_lets_clean_mail_in(make_server, tmp_path):
    clamd = Clamd(tmp_path)
    try:
        server = make_server(f"[filters]\nclamav = 127.0.0.1:{clamd.port}\n")
        server.add_test_accounts().start()
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "a@far.test", ALICE, "attached"
        message.set_content("See the attachment.\n")
        message.add_attachment(
            EICAR, maintype="application", subtype="octet-stream", filename="x.com"
        )
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("a@far.test", [ALICE], message.as_bytes().replace(b"\n", b"\r\n"))
            assert (e.value.smtp_code, e.value.smtp_error) == (
                554,
                b"5.7.1 Virus found: eicar.com.UNOFFICIAL",
            )
            s.sendmail("a@far.test", [ALICE], b"Subject: clean\r\n\r\nnothing here\r\n")
        [kept] = server.messages(ALICE)
        assert b"nothing here" in kept.read_bytes()
    finally:
        clamd.stop()
    # clamd gone: a message cannot be checked, so it waits (451), never unchecked.
    assert send(server, "while clamd is away") == (
        451,
        b"4.7.0 Message could not be checked, try again later",
    )
    assert "filter clamav failed" in server.log()


GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
# One of rspamd's test patterns (with enable_test_patterns): action "add header".
ADD_HEADER = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-ADD-HEADER*C.34X"


class Rspamd:
    """rspamd from Debian's package, with Debian's configuration and local
    overrides: its normal worker on a free loopback port, the others off or
    on free ports, test patterns on, and its DNS lookups sent to a DNS
    server on loopback (which knows no name, at once)."""

    def __init__(self, home: Path, dns: ZoneServer) -> None:
        self.home = home / "rspamd"
        local = self.home / "local"
        for sub in ("local/override.d", "local/local.d", "db", "run", "log"):
            (self.home / sub).mkdir(parents=True)
        self.port = free_port()
        overrides = {
            "worker-normal.inc": f'bind_socket = "127.0.0.1:{self.port}";\n',
            "worker-controller.inc": f'bind_socket = "127.0.0.1:{free_port()}";\n',
            "worker-proxy.inc": "enabled = false;\n",
            "worker-fuzzy.inc": "enabled = false;\n",
            "logging.inc": f'type = "file";\nfilename = "{self.home}/log/rspamd.log";\nlevel = "warning";\n',
        }
        for name, text in overrides.items():
            (local / "override.d" / name).write_text(text)
        (local / "local.d" / "options.inc").write_text(
            "enable_test_patterns = true;\n"
            f'dns {{ nameserver = ["127.0.0.1:{dns.port}"]; timeout = 0.5s; retransmits = 1; }}\n'
        )
        variables = [
            f"--var={k}={self.home / v}"
            for k, v in (
                ("LOCAL_CONFDIR", "local"),
                ("DBDIR", "db"),
                ("RUNDIR", "run"),
                ("LOGDIR", "log"),
            )
        ]
        self.log = (self.home / "out.log").open("wb")
        self.proc = subprocess.Popen(
            [
                need("rspamd"),
                "-f",
                "-u",
                "root",
                "-g",
                "root",
                "-i",
                "-c",
                "/etc/rspamd/rspamd.conf",
                *variables,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(self.answers, timeout=90):
            self.stop()
            raise RuntimeError((self.home / "out.log").read_text(errors="replace"))

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                return r.read().startswith(b"pong")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.daemons
def test_rspamd_rejects_gtube_and_marks_what_it_would_add_a_header_to(make_server, tmp_path):
    dns = ZoneServer(tmp_path).add("invalid", A("nothing.invalid", "192.0.2.1")).start()
    spamd = Rspamd(tmp_path, dns)
    try:
        server = make_server(f"[filters]\nrspamd = http://127.0.0.1:{spamd.port}\n")
        server.add_test_accounts().start()
        assert send(server, "gtube", GTUBE + b"\r\n") == (554, b"5.7.1 Message refused as spam")
        assert send(server, "marked", ADD_HEADER + b"\r\n")[0] == 250
        [kept] = server.messages(ALICE)
        head = kept.read_bytes().split(b"\n\n")[0]
        assert b"X-Spam: Yes\n" in head and b"X-Spam-Action: add header\n" in head, head
        assert b"X-Spam-Score: " in head
    finally:
        spamd.stop()
        dns.stop()
    server.check_log()
