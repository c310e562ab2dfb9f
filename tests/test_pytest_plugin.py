"""The pytest plugin as another project sees it: a test file with no conftest,
run by a separate pytest in an empty directory. Nothing is on PYTHONPATH, so the
plugin is loaded through the installed package's ``pytest11`` entry point (the
Makefile installs the package, not editable, before the tests run)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest

OUTSIDE_TESTS = """
import os
import poplib
import smtplib

SEEN = []  # (pid, smtp_port) of the server each test got, in this worker


def record(mail_server):
    SEEN.append((os.getpid(), mail_server.smtp_port))
    out = os.environ.get("MAILBOX_PLUGIN_SEEN")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(os.path.join(out, f"{worker}-{os.getpid()}"), "a") as f:
            f.write(f"{mail_server.smtp_port}\\n")


def test_send_and_read_back(mail_server, mail_account):
    record(mail_server)
    with smtplib.SMTP(mail_server.host, mail_server.submission_port, timeout=10) as smtp:
        smtp.login(mail_account.address, mail_account.password)
        smtp.sendmail(
            mail_account.address,
            [mail_account.address, "friend@far.test"],
            b"Subject: hello from outside\\r\\n\\r\\nhi\\r\\n",
        )
    message = mail_server.wait_for_message(to=mail_account.address, subject="hello from *")
    assert message.authenticated == mail_account.address
    assert mail_server.wait_for_message(to="friend@far.test", outbound=True)
    pop = poplib.POP3(mail_server.host, mail_server.pop3_port, timeout=10)
    pop.user(mail_account.address)
    pop.pass_(mail_account.password)
    assert pop.stat()[0] == 1
    assert b"Subject: hello from outside" in pop.retr(1)[1]
    pop.quit()
    # Leave things behind for the next test to not see.
    mail_server.add_account("left-over@example.test", "pw")
    mail_server.deliver("left-over@example.test", b"Subject: stale\\r\\n\\r\\nx\\r\\n")
    mail_server.faults.on("smtp.NOOP", reply=(500, "5.0.0 left-over fault"))
    mail_server.advance(7200)


def test_a_second_test_sees_a_reset_server(mail_server, mail_account):
    record(mail_server)
    assert mail_server.accounts() == [mail_account.address]
    assert mail_server.messages() == []
    assert mail_server.outbound == []
    assert mail_server.faults.rules == []
    with smtplib.SMTP(mail_server.host, mail_server.smtp_port, timeout=10) as smtp:
        assert smtp.noop()[0] == 250


def test_each_test_gets_a_fresh_account(mail_server, mail_account):
    record(mail_server)
    address, password = mail_account
    assert address == mail_account.address and password == mail_account.password
    assert address.endswith("@example.test")
    assert password not in repr(mail_account)
    assert mail_server.messages(address) == []


def test_one_server_per_session():
    assert len(set(SEEN)) <= 1, SEEN
"""


def run_pytest(tmp_path, *args: str) -> subprocess.CompletedProcess:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "test_mail.py").write_text(OUTSIDE_TESTS)
    (project / "pytest.ini").write_text("[pytest]\n")  # keeps pytest from looking higher up
    assert not (project / "conftest.py").exists()
    seen = tmp_path / "seen"
    seen.mkdir(exist_ok=True)
    # No PYTHONPATH and nothing of this pytest's own settings: only what is installed.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "COV_CORE_"))
    }
    env["MAILBOX_PLUGIN_SEEN"] = str(seen)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_plugin_is_registered_by_entry_point():
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert "mailboxd.pytest_plugin" in {ep.value for ep in plugins}, (
        "the mailbox package is not installed (pip install . -- `make test` does it)"
    )


def test_an_outside_project_uses_the_fixtures_with_no_conftest(tmp_path):
    out = run_pytest(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 passed" in out.stdout, out.stdout


def test_an_outside_project_under_xdist(tmp_path):
    if importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist is not installed (it is not a dependency)")
    out = run_pytest(tmp_path, "-p", "xdist", "-n", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 passed" in out.stdout, out.stdout
    # One server per worker: two workers that both ran tests had two servers.
    ports = {}
    for path in (tmp_path / "seen").iterdir():
        worker = path.name.split("-")[0]
        ports.setdefault(worker, set()).update(path.read_text().split())
    assert all(len(p) == 1 for p in ports.values()), ports
    if len(ports) == 2:
        a, b = ports.values()
        assert a != b
