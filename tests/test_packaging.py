"""The installed distribution: its name, version and licence, and the commands
that print the version."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


def test_build_makes_an_sdist_and_a_wheel_without_a_warning(tmp_path):
    """`python -m build`, as a packager runs it, on a copy of the source."""
    source = tmp_path / "source"
    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (root / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    said = (out.stdout + out.stderr).lower().splitlines()
    assert [line for line in said if "warning" in line] == []
    version = mailboxd.__version__
    with tarfile.open(tmp_path / "dist" / f"mailboxd-{version}.tar.gz") as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for name in ("LICENSE", "CHANGELOG.md", "etc/mailbox.service", "etc/production.ini"):
        assert name in names
    assert {
        "etc/mailbox.sysusers",
        "docs/operations.md",
        "twisted/plugins/mailboxd_tls.py",
    } <= names
    with zipfile.ZipFile(tmp_path / "dist" / f"mailboxd-{version}-py3-none-any.whl") as wheel:
        inside = set(wheel.namelist())
    assert {"mailboxd/__init__.py", "twisted/plugins/mailboxd_plugin.py"} <= inside
    assert "twisted/plugins/__init__.py" not in inside  # Twisted's namespace, not ours
