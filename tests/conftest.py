"""Fixtures: a real `twistd -n mailbox` on free loopback ports, and client tools."""

from __future__ import annotations

import collections
import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

ROOT = Path(__file__).resolve().parent.parent
ALICE, ALICE_PW = "alice@example.test", "alice pw"
BOB, BOB_PW = "bob@other.test", "bob pw"
TWISTD = Path(sys.executable).parent / "twistd"
MAILBOXCTL = Path(sys.executable).parent / "mailboxctl"


_handed_out: collections.deque[int] = collections.deque(maxlen=2000)


def free_port() -> int:
    """A free loopback port, and not one handed out lately: once a probe
    socket is closed the kernel may give its port again at once, and a server
    given one port for two listeners exits at start ("Address already in
    use"), after the fixture saw its first port answer."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.append(port)
            return port


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


class MailServer:
    """One appliance in its own home directory, run as a real twistd process."""

    def __init__(self, home: Path, extra: str = "", tls: bool = False) -> None:
        self.home = home
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.pop3_port = free_port()
        # With tls=True: STARTTLS/STLS on the ports above, and implicit TLS here.
        self.smtps_port = free_port() if tls else None
        self.pop3s_port = free_port() if tls else None
        self.certificate = home / "etc" / "cert.pem"
        self.private_key = home / "etc" / "key.pem"
        self.log_path = home / "twistd.log"
        self.proc: subprocess.Popen | None = None
        self.daemon_env: dict[str, str] = {}  # for twistd only, not for mailboxctl
        self.daemon_prefix: list[str] = []  # a command twistd runs under
        (home / "etc").mkdir(parents=True, exist_ok=True)
        self.config = home / "etc" / "mailbox.ini"
        # Relayed mail goes to a loopback port where nothing listens unless a
        # test starts a capture server there: no test mail ever leaves the box.
        self.smarthost_port = free_port()
        config = configparser.ConfigParser(interpolation=None)
        config.read_string(
            "[mailbox]\n"
            "hostname = mail.example.test\n"
            "domains = example.test other.test\n"
            "domain_aliases = example.org=example.test\n"
            "bcrypt_rounds = 4\n"
            "[smtp]\n"
            f"listen = tcp:{self.smtp_port}:interface=127.0.0.1\n"
            f"submission = tcp:{self.submission_port}:interface=127.0.0.1\n"
            "max_message_size = 1000000\n"
            "[pop3]\n"
            f"listen = tcp:{self.pop3_port}:interface=127.0.0.1\n"
            "[relay]\n"
            f"smarthost = 127.0.0.1:{self.smarthost_port}\n"
            # No SPF/DKIM/DMARC lookups about test domains unless a test asks.
            "[inbound]\n"
            "checks = no\n"
        )
        if tls:
            from mailboxd.tls import make_self_signed

            make_self_signed("mail.example.test", self.certificate, self.private_key)
            config.read_string(
                "[smtp]\n"
                f"listen = tcp:{self.smtp_port}:interface=127.0.0.1"
                f" tls:{self.smtps_port}:interface=127.0.0.1\n"
                "[pop3]\n"
                f"listen = tcp:{self.pop3_port}:interface=127.0.0.1"
                f" tls:{self.pop3s_port}:interface=127.0.0.1\n"
                f"[tls]\ncertificate = {self.certificate}\nprivate_key = {self.private_key}\n"
            )
        config.read_string(extra)  # a later source: its keys override
        with self.config.open("w") as f:
            config.write(f)
        self.accounts = home / "etc" / "accounts"
        self.aliases = home / "etc" / "aliases"
        self.accounts.write_text("")
        self.aliases.write_text("")
        self.mail_dir = home / "mailbox"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT)  # the working tree, not a stale install
        return env

    def add_user(self, address: str, password: str) -> None:
        with self.accounts.open("a") as f:
            f.write(f"{address}:{_hash(password)}\n")

    def start(self) -> MailServer:
        self.log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.daemon_prefix,
                str(TWISTD),
                *("--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"),
            ],
            cwd=self.home,
            env={**self.env(), **self.daemon_env},
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        ports = (
            self.smtp_port,
            self.submission_port,
            self.pop3_port,
            self.smtps_port,
            self.pop3s_port,
        )
        for port in (p for p in ports if p is not None):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"twistd exited {self.proc.returncode}:\n{self.log()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"twistd did not listen on {port}:\n{self.log()}"
                        ) from None
                    time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if hasattr(self, "log_file"):
            self.log_file.close()

    def add_test_accounts(self) -> MailServer:
        self.add_user(ALICE, ALICE_PW)
        self.add_user(BOB, BOB_PW)
        return self

    def check_log(self) -> None:
        """No traceback and no password of the test accounts in the log."""
        log = self.log()
        assert "Traceback" not in log, log
        assert ALICE_PW not in log and BOB_PW not in log, "a password reached the log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().split("@")
        return self.mail_dir / domain / local

    def messages(self, address: str) -> list[Path]:
        d = self.maildir(address)
        return sorted(
            p for sub in ("new", "cur") if (d / sub).is_dir() for p in (d / sub).iterdir()
        )


@pytest.fixture
def server(tmp_path: Path):
    """A running server with alice@example.test (password 'alice pw')."""
    s = MailServer(tmp_path).add_test_accounts().start()
    yield s
    s.stop()
    s.check_log()


@pytest.fixture
def tls_server(tmp_path: Path):
    """Like `server`, with a self-signed certificate: STARTTLS, STLS, SMTPS, POP3S."""
    s = MailServer(tmp_path, tls=True).add_test_accounts().start()
    yield s
    s.stop()
    s.check_log()


@pytest.fixture
def untrusted(make_server):
    """Start servers (with the test accounts) that trust no network, so loopback
    clients meet the real relay policy; their logs are checked afterwards."""
    started: list[MailServer] = []

    def start(extra: str = "", tls: bool = False, accounts: dict | None = None) -> MailServer:
        s = make_server("[mailbox]\ntrusted_networks =\n" + extra, tls=tls)
        s.add_test_accounts()
        for address, password in (accounts or {}).items():
            s.add_user(address, password)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()
        s.check_log()


def client_tls_context():
    """An ssl.SSLContext for test clients that trusts the self-signed certificate."""
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def make_server(tmp_path: Path):
    """Build (not start) servers with extra config; all are stopped afterwards."""
    made: list[MailServer] = []

    def make(extra: str = "", name: str = "s", tls: bool = False) -> MailServer:
        s = MailServer(tmp_path / f"{name}{len(made)}", extra, tls=tls)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def tool_env(tmp_path: Path) -> dict[str, str]:
    """A hermetic environment for a client program: private HOME, no proxies."""
    home = tmp_path / "client-home"
    home.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    env["HOME"] = str(home)
    env["FETCHMAILHOME"] = str(home)
    return env


def ctl(
    server: MailServer, *args: str, ok: tuple[int, ...] = (0,), input: str | None = None
) -> subprocess.CompletedProcess:
    """Run mailboxctl against `server`'s config (`input` on its stdin); assert its exit status."""
    proc = subprocess.run(
        [str(MAILBOXCTL), "--config", "etc/mailbox.ini", *args],
        input=input,
        cwd=server.home,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode in ok, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def need(tool: str) -> str:
    """The path of a Debian client; skip without it, unless CI=true (then fail)."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed, and CI=true requires it")
        pytest.skip(f"{tool} is not installed")
    return path


# --- unit-test plumbing: protocols over StringTransport with a Clock ------------


class SyncPool:
    """A thread pool stand-in that runs work at once, or holds it when paused."""

    def __init__(self) -> None:
        self.paused = False
        self.held: list = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs) -> None:
        def run() -> None:
            try:
                result = f(*args, **kwargs)
            except BaseException:
                from twisted.python.failure import Failure

                onResult(False, Failure())
            else:
                onResult(True, result)

        if self.paused:
            self.held.append(run)
        else:
            run()

    def release(self) -> None:
        self.paused = False
        while self.held:
            self.held.pop(0)()


class SyncReactor:
    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


def unit_config(tmp_path: Path, extra: str = ""):
    """Config for unit tests; `extra` is appended after the [smtp] section."""
    from mailboxd.config import parse

    text = (
        "[mailbox]\nhostname = mail.example.test\ndomains = example.test other.test\n"
        "domain_aliases = example.org=example.test\n"
        f"accounts = {tmp_path}/accounts\naliases = {tmp_path}/aliases\n"
        f"mail_dir = {tmp_path}/mailbox\nbcrypt_rounds = 4\n"
        "[smtp]\nmax_message_size = 10000\nmax_recipients = 5\n" + extra
    )
    return parse(text, tmp_path / "mailbox.ini")


@pytest.fixture
def unit(tmp_path: Path):
    """Config, account store, clock and pool for protocol unit tests."""
    from twisted.internet.task import Clock

    from mailboxd.accounts import AccountStore
    from mailboxd.auth import Authenticator
    from mailboxd.credcache import CredentialCache
    from mailboxd.guard import Guard
    from mailboxd.popauth import PopAuthRegistry
    from mailboxd.realm import BcryptChecker, HashingQueue, MailboxRealm, make_portal
    from mailboxd.state import SQLiteStateStore, state_path
    from mailboxd.workers import Workers

    class Unit:
        pass

    u = Unit()
    (tmp_path / "accounts").write_text(
        f"alice@example.test:{_hash('alice pw')}\nbob@other.test:{_hash('bob pw')}\n"
    )
    (tmp_path / "aliases").write_text("info@example.test: alice@example.test, bob@other.test\n")
    u.config = unit_config(tmp_path)
    u.clock = Clock()
    u.pool = SyncPool()
    u.reactor = SyncReactor()
    m = u.config.mailbox
    u.store = AccountStore(m.accounts, m.aliases, m.domains, dict(m.domain_aliases), u.clock)
    u.mail_dir = m.mail_dir
    u.state = SQLiteStateStore(state_path(m.mail_dir))
    u.hash_pool = SyncPool()  # apart, to hold bcrypt checks alone
    u.workers = Workers(u.reactor, u.pool, u.hash_pool, u.pool)
    u.guard = Guard(u.state, u.clock.seconds, u.config.limits, u.workers.db)
    u.popauth = PopAuthRegistry(
        u.state, u.clock.seconds, u.config.relay.pop_before_smtp_ttl, u.workers.db
    )
    directory = lambda: u.store.directory  # noqa: E731
    u.cache = CredentialCache(u.config.limits.auth_cache_ttl, u.clock.seconds)
    u.hashing = HashingQueue(u.workers.hash, admit=u.guard.unblocked)
    checker = BcryptChecker(directory, u.hashing, u.cache, rounds=4)
    u.auth = Authenticator(make_portal(MailboxRealm(directory), checker), u.guard)
    yield u
    u.state.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server for this test session (skipped without one, unless
    CI=true); tests share it, each under its own key prefix."""
    from redis_server import RedisServer

    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()
