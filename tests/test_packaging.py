"""The installed distribution: its name, version and licence, and the commands
that print the version."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import mailboxd

BIN = Path(sys.executable).parent


def test_the_distribution_is_mailboxd_with_the_packages_version():
    # "mailbox" on the package index is another project (an IMAP client).
    meta = importlib.metadata.metadata("mailboxd")
    assert meta["Name"] == "mailboxd"
    assert meta["Version"] == mailboxd.__version__
    assert meta["License"] == "MIT"
    files = [str(f) for f in importlib.metadata.files("mailboxd") or []]
    assert any(f.endswith("LICENSE") for f in files), files


def test_mailboxctl_version():
    out = subprocess.run(
        [BIN / "mailboxctl", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mailboxctl {mailboxd.__version__}\n"


def test_twistd_mailbox_version(tmp_path):
    out = subprocess.run(
        [BIN / "twistd", "mailbox", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mailbox (mailboxd) {mailboxd.__version__}\n"
    assert not list(tmp_path.iterdir())  # no pid file, log or state was made


def test_the_twisted_plugins_are_installed_with_the_package():
    files = {str(f) for f in importlib.metadata.files("mailboxd") or []}
    assert {"twisted/plugins/mailboxd_plugin.py", "twisted/plugins/mailboxd_tls.py"} <= files


def test_the_testing_package_is_installed_whole():
    # mailboxd.testing is a subpackage: setup.cfg must list it, or the wheel
    # has mailboxd without the fixture.
    files = {str(f) for f in importlib.metadata.files("mailboxd") or []}
    modules = ["__init__", "__main__", "api", "capture", "child", "clock", "control"]
    modules += ["inprocess", "remote", "trial"]
    assert {f"mailboxd/testing/{m}.py" for m in modules} <= files


def test_the_http_apis_description_and_page_are_installed():
    # package_data in setup.cfg: without it the wheel has web.py but not its files.
    files = {str(f) for f in importlib.metadata.files("mailboxd") or []}
    names = ["web.py", "openapi.json", "static/index.html", "static/app.js", "static/app.css"]
    assert {f"mailboxd/testing/{n}" for n in names} <= files
