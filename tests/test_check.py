"""`mailboxctl check` and `check --show` (issue 13, item 2): the real command,
run on a config made in the test, with real files, certificates and users."""

from __future__ import annotations

import datetime
import getpass
import os
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from mailboxd.config import SPEC
from mailboxd.tls import make_self_signed, self_signed_pem

MAILBOXCTL = Path(sys.executable).parent / "mailboxctl"
HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


def appliance(home: Path, extra: str = "", tls: bool = True) -> Path:
    """A config with absolute paths in `home`, an account, an alias and (with
    `tls`) a self-signed certificate; the config's path."""
    (home / "etc").mkdir(parents=True)
    (home / "etc" / "accounts").write_text(f"alice@example.test:{HASH}\n")
    (home / "etc" / "aliases").write_text("postmaster@example.test: alice@example.test\n")
    tls_section = ""
    if tls:
        make_self_signed("mail.example.test", home / "tls" / "cert.pem", home / "tls" / "key.pem")
        tls_section = (
            f"[tls]\ncertificate = {home}/tls/cert.pem\nprivate_key = {home}/tls/key.pem\n"
        )
    config = home / "etc" / "mailbox.ini"
    config.write_text(
        "[mailbox]\nhostname = mail.example.test\ndomains = example.test\n"
        f"home = {home}\nmail_dir = mail\nworkers = auto\n"
        "[smtp]\nlisten = tcp:2525:interface=127.0.0.1 tls:2465:interface=127.0.0.1\n"
        "[relay]\nsmarthost = relay.example.net:587\nsmarthost_username = me\n"
        "smarthost_password = s3cret-pass\n" + tls_section + extra
    )
    return config


def check(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MAILBOXCTL), "--config", str(config), "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )


def test_a_good_appliance_gets_a_summary_and_exit_0(tmp_path):
    config = appliance(tmp_path)
    out = check(config)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{config}: no problems found (checked as {getpass.getuser()})"
    assert "accounts: 1 in" in out.stdout and "aliases: 1 in" in out.stdout
    assert "tls: " in out.stdout and "CN=mail.example.test" in out.stdout
    assert "valid until" in out.stdout and "(824 days)" in out.stdout
    assert "relay: smarthost relay.example.net:587" in out.stdout
    assert out.stderr == ""


def test_each_problem_is_one_line_naming_its_file_and_exit_1(tmp_path):
    config = appliance(tmp_path)
    (tmp_path / "etc" / "accounts").write_text(
        f"alice@example.test:{HASH}\nbob@example.test:plaintext\nnot a line\n"
    )
    (tmp_path / "etc" / "aliases").write_text("team@elsewhere.test: alice@example.test\n")
    out = check(config)
    assert out.returncode == 1
    accounts, aliases = tmp_path / "etc" / "accounts", tmp_path / "etc" / "aliases"
    assert out.stdout.splitlines() == [
        f"{accounts}:2: bob@example.test: the hash is not bcrypt ($2a$, $2b$ or $2y$)",
        f"{accounts}:3: expected address:bcrypt-hash",
        f"{aliases}:1: team@elsewhere.test: elsewhere.test is not a local domain",
    ]
    assert "Traceback" not in out.stdout + out.stderr


def test_a_key_that_does_not_match_the_certificate(tmp_path):
    config = appliance(tmp_path)
    make_self_signed("other.test", tmp_path / "o" / "cert.pem", tmp_path / "o" / "key.pem")
    os.replace(tmp_path / "o" / "key.pem", tmp_path / "tls" / "key.pem")
    out = check(config)
    assert out.returncode == 1
    assert out.stdout == (
        f"{tmp_path}/tls/key.pem: the private key does not match {tmp_path}/tls/cert.pem\n"
    )


def _certificate(path: Path, key_path: Path, days: tuple[int, int]) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = self_signed_pem(
        "mail.example.test",
        now + datetime.timedelta(days=days[0]),
        now + datetime.timedelta(days=days[1]),
    )
    path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)


@pytest.mark.parametrize(
    ("days", "said"),
    [
        ((-30, -1), "expired on "),
        ((-30, 5), "expires on "),
        ((2, 90), "not valid before "),
    ],
)
def test_certificate_dates(tmp_path, days, said):
    config = appliance(tmp_path)
    _certificate(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem", days)
    out = check(config)
    assert out.returncode == 1
    [line] = out.stdout.splitlines()
    assert line.startswith(f"{tmp_path}/tls/cert.pem: [tls] certificate: {said}")


def test_a_missing_certificate_and_no_aliases_file(tmp_path):
    config = appliance(tmp_path)
    (tmp_path / "tls" / "cert.pem").unlink()
    (tmp_path / "etc" / "aliases").unlink()  # optional: no aliases is fine
    out = check(config)
    assert out.returncode == 1
    assert out.stdout == f"{tmp_path}/tls/cert.pem: [tls] certificate: no such file\n"


def test_a_folder_where_the_accounts_file_belongs(tmp_path):
    config = appliance(tmp_path)
    (tmp_path / "etc" / "accounts").unlink()
    (tmp_path / "etc" / "accounts").mkdir()
    out = check(config)
    assert out.returncode == 1
    assert out.stdout == (
        f"{config}: [mailbox] accounts = '{tmp_path}/etc/accounts': expected a file\n"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to name another user's access")
def test_mail_dir_the_service_user_cannot_write(tmp_path):
    config = appliance(tmp_path)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "mail").mkdir(mode=0o700)  # root's; nobody may not write here
    out = check(config, "--user", "nobody")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert f"{tmp_path}/mail: [mailbox] mail_dir: nobody cannot write to it" in lines
    assert f"{tmp_path}/etc/accounts: [mailbox] accounts: nobody cannot read it" in lines
    assert f"{tmp_path}/tls/key.pem: [tls] private_key: nobody cannot read it" in lines
    # A mail_dir still to be made: its first existing parent must be writable.
    (tmp_path / "mail").rmdir()
    os.chmod(tmp_path, 0o555)
    try:
        lines = check(config, "--user", "nobody").stdout.splitlines()
    finally:
        os.chmod(tmp_path, 0o755)
    assert (
        f"{tmp_path}: [mailbox] mail_dir: nobody cannot write to it (to make {tmp_path}/mail)"
        in lines
    )
    assert check(config, "--user", "root").returncode == 0


def test_an_accounts_file_mailboxctl_cannot_read_is_a_line_not_a_traceback(tmp_path):
    config = appliance(tmp_path)
    wrong = tmp_path / "etc" / "aliases" / "accounts"  # below a file: unreadable even to root
    config.write_text(config.read_text().replace("[mailbox]\n", f"[mailbox]\naccounts = {wrong}\n"))
    out = check(config)
    assert out.returncode == 1
    me = getpass.getuser()
    assert out.stdout == (
        f"{wrong}: [mailbox] accounts: mailboxctl (as {me}) cannot read it: Not a directory\n"
    )
    assert out.stderr == ""


def test_an_unknown_user(tmp_path):
    out = check(appliance(tmp_path), "--user", "no-such-user-here")
    assert out.returncode == 1
    assert out.stdout == "mailboxctl check: no user 'no-such-user-here' on this system\n"


def test_a_config_mistake_is_one_line_and_exit_1(tmp_path):
    config = appliance(tmp_path, extra="[pop3]\nidle_timeout = 5\n")
    out = check(config)
    assert out.returncode == 1
    [line] = out.stdout.splitlines()
    assert line.startswith(f"{config}: line ") and "[pop3] idle_timeout = '5'" in line
    assert out.stderr == ""


def test_every_config_mistake_gets_its_line(tmp_path):
    config = appliance(
        tmp_path,
        extra="[pop3]\nidle_timeout = 5\nidle = 3\n[limits]\nconnections_per_ip = many\n[nope]\n",
    )
    out = check(config)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{config}: line ") for line in lines)
    said = "\n".join(lines)
    for part in (
        "unknown section [nope]",
        "[pop3] unknown key 'idle'",
        "[pop3] idle_timeout = '5'",
    ):
        assert part in said
    assert "[limits] connections_per_ip = 'many'" in said


def test_show_prints_every_key_with_defaults_and_hides_the_password(tmp_path):
    out = check(appliance(tmp_path), "--show")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for section, keys in SPEC.items():
        assert f"\n[{section}]\n" in text
        for key in keys:
            assert any(line.startswith(f"{key} =") for line in text.splitlines()), key
    assert "s3cret-pass" not in text and "smarthost_password = # hidden" in text
    assert f"mail_dir = {tmp_path}/mail\n" in text  # resolved against home
    assert "workers = auto\n" in text
    assert "max_recipients = 100\n" in text  # a default, filled in
    assert "listen = tcp:2525:interface=127.0.0.1 tls:2465:interface=127.0.0.1\n" in text
    # What --show prints is itself a config that loads to the same values.
    shown = tmp_path / "shown.ini"
    shown.write_text(text.replace("smarthost_password = # hidden", "smarthost_password = x"))
    again = check(shown, "--show")
    assert again.returncode == 0, again.stdout
    assert again.stdout.split("\n", 1)[1] == text.split("\n", 1)[1]


def test_dkim_keys_are_checked_and_summed_up(tmp_path):
    config = appliance(tmp_path)
    keys = tmp_path / "etc" / "dkim"
    out = check(config)
    assert "dkim: keys for no domain; example.test send unsigned" in out.stdout, out.stdout
    made = subprocess.run(
        [
            str(MAILBOXCTL),
            "--config",
            str(config),
            "dkim",
            "keygen",
            "example.test",
            "--bits",
            "1024",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert (keys / "example.test" / "mailbox.pem").is_file()
    out = check(config)
    assert out.returncode == 0 and "dkim: keys for example.test\n" in out.stdout, out.stdout
    (keys / "example.test" / "mailbox.pem").write_text("not a key\n")
    out = check(config)
    assert out.returncode == 1
    [line] = [x for x in out.stdout.splitlines() if "[dkim] keys" in x]
    assert line.startswith(f"{keys}/example.test/mailbox.pem: [dkim] keys: not a PEM private key")
