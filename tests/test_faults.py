"""Operator mistakes (issue 11) that need no running server: mailboxctl's
output closed early, a certificate and a key that do not belong together, and
the reactor's clock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from mailboxd.tls import ServerTLS, TLSConfigError, make_self_signed

MAILBOXCTL = Path(sys.executable).parent / "mailboxctl"


def test_a_key_that_does_not_match_its_certificate_says_so(tmp_path):
    from twisted.internet.task import Clock

    make_self_signed("a.example.test", tmp_path / "a.pem", tmp_path / "a.key")
    make_self_signed("b.example.test", tmp_path / "b.pem", tmp_path / "b.key")
    with pytest.raises(TLSConfigError) as info:
        ServerTLS(tmp_path / "a.pem", tmp_path / "b.key", Clock())
    assert (
        str(info.value)
        == f"{tmp_path / 'b.key'}: the private key does not match {tmp_path / 'a.pem'}"
    )


def test_mailboxctl_into_a_pipe_closed_early_says_so_in_one_line(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "etc").mkdir()
    lines = "".join(f"user{i:05d}@example.test:{hashed}\n" for i in range(5000))
    (tmp_path / "etc" / "accounts").write_text(lines)
    (tmp_path / "etc" / "aliases").write_text("")
    (tmp_path / "etc" / "mailbox.ini").write_text("[mailbox]\ndomains = example.test\n")
    done = subprocess.run(
        f"'{MAILBOXCTL}' --config etc/mailbox.ini user list | head -1",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.stdout == "user00000@example.test\t0 bytes\n"
    assert done.stderr == "mailboxctl: the output was closed before everything was written\n"


def ctl_in(cwd: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MAILBOXCTL), "--config", str(config), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


@pytest.fixture
def appliance(tmp_path):
    """An appliance's home with one account; mailboxctl is run from elsewhere."""
    home = tmp_path / "home"
    (home / "etc").mkdir(parents=True)
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (home / "etc" / "accounts").write_text(f"alice@example.test:{hashed}\n")
    (home / "etc" / "aliases").write_text("")
    (home / "mailbox").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return home, elsewhere


@pytest.mark.parametrize("command", [["user", "list"], ["popauth", "list"], ["blocked", "list"]])
def test_mailboxctl_elsewhere_refuses_rather_than_act_on_other_files(appliance, command):
    home, elsewhere = appliance
    config = home / "etc" / "mailbox.ini"
    config.write_text("[mailbox]\ndomains = example.test\n")
    done = ctl_in(elsewhere, config, *command)
    assert done.returncode != 0 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert f"current folder {elsewhere}" in done.stderr and "[mailbox] home" in done.stderr
    assert list(elsewhere.iterdir()) == []  # no stray ./mailbox/.state


def test_mailboxctl_with_a_home_acts_on_the_appliance_from_anywhere(appliance):
    home, elsewhere = appliance
    config = home / "etc" / "mailbox.ini"
    config.write_text(f"[mailbox]\ndomains = example.test\nhome = {home}\n")
    done = ctl_in(elsewhere, config, "user", "list")
    assert (done.returncode, done.stdout) == (0, "alice@example.test\t0 bytes\n"), done.stderr
    assert ctl_in(elsewhere, config, "popauth", "list").returncode == 0
    assert (home / "mailbox" / ".state" / "state.sqlite3").exists()
    assert list(elsewhere.iterdir()) == []
    # and from the home itself, without `home`, as `make run` does
    config.write_text("[mailbox]\ndomains = example.test\n")
    assert ctl_in(home, config, "user", "list").stdout == "alice@example.test\t0 bytes\n"


# --- item 6: the reactor's clock -----------------------------------------------------


def test_the_reactor_is_moved_to_the_monotonic_clock_keeping_what_it_scheduled():
    from twisted.internet.selectreactor import SelectReactor
    from twisted.internet.task import Clock

    from mailboxd.clocks import use_monotonic_clock

    reactor = SelectReactor()  # not installed: only this test uses it
    try:
        later = reactor.callLater(30, lambda: None)
        sooner = reactor.callLater(10, lambda: None)
        use_monotonic_clock(reactor)
        assert reactor.seconds() == pytest.approx(time.monotonic(), abs=1)
        assert later.getTime() - time.monotonic() == pytest.approx(30, abs=1)
        assert sooner.getTime() - time.monotonic() == pytest.approx(10, abs=1)
        sooner.reset(5)  # a reset counts on the new clock too
        assert sooner.getTime() - time.monotonic() == pytest.approx(5, abs=1)
        new = reactor.callLater(1, lambda: None)
        assert new.getTime() - time.monotonic() == pytest.approx(1, abs=1)
        use_monotonic_clock(reactor)  # a second time changes nothing
        assert later.getTime() - time.monotonic() == pytest.approx(30, abs=1)
        for call in (later, sooner, new):
            call.cancel()
    finally:
        reactor.disconnectAll()
        for reader in list(reactor.getReaders()):
            reactor.removeReader(reader)

    clock = Clock()
    use_monotonic_clock(clock)  # a test's clock is left as it is
    assert clock.seconds() == 0
