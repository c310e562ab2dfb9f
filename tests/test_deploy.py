"""The production deployment as documented (issue 13, item 3): the package
installed into a venv of Debian's python3 under a temporary prefix, the
plugin cache primed, the production config and the unit's ExecStart pointed
at that prefix (listeners on free loopback ports), started as an unprivileged
user with the unit's working directory, umask and ambient capability
(setpriv), and SMTP and POP3 answer. The unit and the docs cannot drift
apart: what the unit says is what runs here."""

from __future__ import annotations

import configparser
import os
import poplib
import shlex
import shutil
import smtplib
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port
from test_blackbox import wait_for

from mailboxd.tls import make_self_signed

pytestmark = pytest.mark.blackbox

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: the venv the docs make
RUN_AS, RUN_GROUP = "nobody", "nogroup"  # the unit's User=mailbox, which CI does not have


def unit() -> dict[str, str]:
    """etc/mailbox.service's [Service] settings (the last of each key)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "etc" / "mailbox.service")
    return dict(parser["Service"])


def test_the_unit_rates_3_or_lower():
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not installed, and CI=true requires it")
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(ROOT / "etc" / "mailbox.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert "Overall exposure level for mailbox.service:" in last, out.stdout + out.stderr
    assert float(last.split(":")[1].split()[0]) <= 3.0, last


def test_the_sysusers_file_makes_the_system_user_and_group(tmp_path):
    if shutil.which("systemd-sysusers") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-sysusers is not installed, and CI=true requires it")
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    out = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(ROOT / "etc" / "mailbox.sysusers")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    [user] = (tmp_path / "etc" / "passwd").read_text().splitlines()
    name, _, uid, gid, _, home, shell = user.split(":")
    assert (name, home, shell) == ("mailbox", "/var/lib/mailbox", "/usr/sbin/nologin")
    assert int(uid) < 1000  # a system user
    [group] = (tmp_path / "etc" / "group").read_text().splitlines()
    assert group.split(":")[0::2] == ["mailbox", gid]
    assert unit()["User"] == "mailbox" and unit().get("Group", "mailbox") == "mailbox"


@pytest.fixture
def prefix():
    """A folder every user may pass through (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="mailbox-deploy-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="installs as root and starts as another user")
def test_the_documented_install_serves_smtp_and_pop3(prefix):
    for tool in (SYSTEM_PYTHON, "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: the documented install needs it")
    settings = unit()
    venv = prefix / "opt" / "mailbox" / "venv"
    etc, state = prefix / "etc" / "mailbox", prefix / "var" / "lib" / "mailbox"

    def here(text: str) -> str:  # the unit's and the config's paths, under the prefix
        for path in ("/opt/mailbox", "/etc/mailbox", "/var/lib/mailbox"):
            text = text.replace(path, f"{prefix}{path}")
        return text

    # docs/operations.md, "Install": as root, with a umask that lets the
    # service user read the venv.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}
    env.pop("PYTHONPATH", None)
    install = (
        f"umask 022 && {SYSTEM_PYTHON} -m venv {venv} && "
        f"{venv}/bin/pip install --quiet {ROOT} && "
        f"{venv}/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; "
        f"list(getPlugins(IPlugin))'"
    )
    run("sh", "-c", install, env=env, cwd=prefix)
    shutil.rmtree(ROOT / "build", ignore_errors=True)

    # /etc/mailbox: root's, 0755; its files root:mailbox 0640. /var/lib/mailbox:
    # the service user's, 0700 (StateDirectoryMode).
    etc.mkdir(parents=True)
    state.mkdir(parents=True)
    shutil.chown(state, RUN_AS, RUN_GROUP)
    state.chmod(int(settings["StateDirectoryMode"], 8))
    smtp, submission, smtps, pop3, pop3s, metrics = (free_port() for _ in range(6))
    config = here((ROOT / "etc" / "production.ini").read_text())
    config = (
        config.replace("tcp:25:interface=\\:\\:", f"tcp:{smtp}:interface=127.0.0.1")
        .replace("tls:465:interface=\\:\\:", f"tls:{smtps}:interface=127.0.0.1")
        .replace("tcp:587:interface=\\:\\:", f"tcp:{submission}:interface=127.0.0.1")
        .replace("tcp:110:interface=\\:\\:", f"tcp:{pop3}:interface=127.0.0.1")
        .replace("tls:995:interface=\\:\\:", f"tls:{pop3s}:interface=127.0.0.1")
        .replace("tcp:9225:interface=127.0.0.1", f"tcp:{metrics}:interface=127.0.0.1")
    )
    assert ":\\:\\:" not in config, "a listener of the production config was not rewritten"
    make_self_signed("mail.example.com", etc / "tls" / "fullchain.pem", etc / "tls" / "privkey.pem")
    for name, text in (("mailbox.ini", config), ("accounts", ""), ("aliases", "")):
        (etc / name).write_text(text)
    for path in [etc / "tls", *etc.rglob("*")]:
        shutil.chown(path, "root", RUN_GROUP)
        path.chmod(0o750 if path.is_dir() else 0o640)
    ctl = [str(venv / "bin" / "mailboxctl"), "--config", str(etc / "mailbox.ini")]
    run(*ctl, "user", "add", "alice@example.com", input="alice pw\n")
    assert (etc / "accounts").stat().st_gid != 0  # mailboxctl kept its group
    checked = run(*ctl, "check", "--user", RUN_AS)
    assert "no problems found" in checked.stdout

    # The unit's ExecStart, as its User, in its WorkingDirectory, with its
    # UMask and AmbientCapabilities.
    command = shlex.split(here(settings["ExecStart"]))
    workdir = here(settings["WorkingDirectory"])
    cap = settings["AmbientCapabilities"].lower().removeprefix("cap_")
    umask = settings["UMask"]
    log = prefix / "journal"
    with log.open("wb") as journal:
        proc = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={RUN_AS}",
                f"--regid={RUN_GROUP}",
                "--clear-groups",
                f"--inh-caps=+{cap}",
                f"--ambient-caps=+{cap}",
                "--",
                "sh",
                "-c",
                f'umask {umask} && exec "$@"',
                "sh",
                *command,
            ],
            cwd=workdir,
            stdout=journal,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    try:
        assert wait_for(lambda: _answers(smtp) and _answers(pop3), timeout=60), log.read_text()
        with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as s:
            assert s.ehlo()[0] == 250
            s.sendmail("someone@far.test", ["alice@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        p = poplib.POP3("127.0.0.1", pop3, timeout=10)
        assert p.getwelcome().startswith(b"+OK")
        p.stls(_trusting(etc / "tls" / "fullchain.pem"))  # require_tls_for_auth = yes
        p.user("alice@example.com")
        p.pass_("alice pw")
        assert p.retr(1)[1][-1] == b"hello"
        p.quit()
        url = f"http://127.0.0.1:{metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            scraped = r.read().decode()
        assert 'mailbox_smtp_messages_total{result="accepted"} 1.0' in scraped, scraped
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "Unable to write to plugin cache" not in text, text
    mail = state / "mail"
    assert mail.stat().st_uid == _uid(RUN_AS)
    assert oct(mail.stat().st_mode & 0o777) == "0o700"


def _answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(5)
            return s.recv(100)[:1] in (b"2", b"+")
    except OSError:
        time.sleep(0.2)
        return False


def _trusting(certificate: Path):
    import ssl

    ctx = ssl.create_default_context(cafile=str(certificate))
    ctx.check_hostname = False
    return ctx


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid
