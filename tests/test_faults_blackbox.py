"""Black-box tests of storage faults (issue 11): the real server with its mail
directory on a small tmpfs that the test fills up."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ALICE, ALICE_PW, TWISTD, MailServer, need
from test_blackbox import Raw
from test_relay_blackbox import plain, pop_from, smtp_from

pytestmark = pytest.mark.blackbox

NO_SPACE = "452 4.3.1 Insufficient system storage"


@pytest.fixture
def small_disk(make_server):
    """A server whose mail directory is a 4 MB tmpfs; and a way to fill it up."""
    mounted: list[Path] = []

    def make() -> tuple[MailServer, Filler]:
        server = make_server("[mailbox]\ntrusted_networks =\n")
        server.mail_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                pytest.fail("CI=true: these tests mount a tmpfs and must run as root")
            pytest.skip("mounting a tmpfs needs root")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(server.mail_dir)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"cannot mount a tmpfs: {done.stderr.strip()}")
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(server.mail_dir)
        server.add_test_accounts()
        return server.start(), Filler(server.mail_dir / "filler")

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Filler:
    """A file that takes all the free space (`fill`) and gives it back (`empty`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self, leave: int = 0) -> None:
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize - leave
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with contextlib.suppress(OSError):
                while free > 0:
                    free -= os.write(fd, b"\0" * min(free, 1 << 20))
                while not leave:  # whatever is left, to the last block
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.path.unlink(missing_ok=True)


def send_message(r: Raw, size: int) -> str:
    r.send(f"MAIL FROM:<friend@far.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
    assert r.reply().startswith("250")
    assert r.reply().startswith("250")
    assert r.reply().startswith("354")
    line = b"x" * 998 + b"\r\n"
    r.send(b"Subject: big\r\n\r\n" + line * (size // len(line)) + b".\r\n")
    return r.reply()


def test_a_full_disk_during_data_is_said_after_the_final_dot(small_disk):
    server, filler = small_disk()
    filler.fill(leave=256 * 1024)
    r = smtp_from(server, "127.0.0.51")
    assert send_message(r, 600_000) == NO_SPACE
    r.send("NOOP\r\n")
    assert r.reply() == "250 2.0.0 Ok"  # the session goes on
    assert server.messages(ALICE) == []
    assert list((server.mail_dir / ".incoming").iterdir()) == []
    filler.empty()
    assert send_message(r, 600_000).startswith("250 2.0.0 Ok: queued as ")
    r.close()
    assert len(server.messages(ALICE)) == 1
    server.check_log()


def test_pop3_reads_and_deletes_on_a_full_disk(small_disk):
    server, filler = small_disk()
    r = smtp_from(server, "127.0.0.52")
    assert send_message(r, 20_000).startswith("250 ")
    r.close()
    filler.fill()
    p = pop_from(server, "127.0.0.53")
    p.send(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n")
    assert p.line().startswith("+OK")
    assert p.line() == f"+OK 1 message ({p_size(server)} octets)"
    p.send("RETR 1\r\n")
    assert p.line().startswith("+OK ")
    while p.line() != ".":
        pass
    p.send("DELE 1\r\nQUIT\r\n")
    assert p.line().startswith("+OK")
    assert p.line() == "+OK 1 message deleted, signing off"
    p.close()
    assert server.messages(ALICE) == []
    assert "pop-before-smtp not recorded for 127.0.0.53" in server.log()
    server.check_log()


def p_size(server: MailServer) -> str:
    [path] = server.messages(ALICE)
    return path.name.rsplit(",W=", 1)[1].split(":")[0]


def test_the_accounts_reload_survives_an_operator_mistake(untrusted):
    from test_blackbox import wait_for

    def auth(ip: str, address: str, password: str) -> str:
        r = smtp_from(server, ip)
        r.send(f"AUTH PLAIN {plain(address, password)}\r\n")
        reply = r.reply()
        r.close()
        return reply

    server = untrusted()
    accounts = server.home / "etc" / "accounts"
    good = accounts.read_text()
    accounts.unlink()
    accounts.mkdir()  # a mistake that gives IsADirectoryError
    assert wait_for(lambda: "cannot read" in server.log(), timeout=5)
    assert auth("127.0.0.54", ALICE, ALICE_PW) == "235 2.7.0 Authentication successful"
    accounts.rmdir()
    accounts.write_text(good)
    server.add_user("erin@example.test", "erin pw")
    assert wait_for(lambda: "readable again" in server.log(), timeout=5)
    assert wait_for(lambda: "loaded 3 accounts" in server.log(), timeout=5)
    assert auth("127.0.0.55", "erin@example.test", "erin pw") == (
        "235 2.7.0 Authentication successful"
    )
    assert server.log().count("cannot read") == 1  # once when it started, not every second
    server.check_log()


def without_root_powers(server: MailServer) -> None:
    """Run `server` as root cannot read a file it may not (as a service user).

    Root reads any file: without its DAC capabilities, the file's owner and
    mode decide, as they do for the service user a real install runs as."""
    if os.geteuid() == 0:
        server.daemon_prefix = [need("setpriv"), "--bounding-set", "-dac_override,-dac_read_search"]


def test_the_accounts_reload_survives_a_file_it_may_not_read(make_server):
    from conftest import ctl
    from test_blackbox import wait_for

    server = make_server("[mailbox]\ntrusted_networks =\n").add_test_accounts()
    without_root_powers(server)
    server.start()
    accounts = server.home / "etc" / "accounts"
    accounts.chmod(0o000)  # as if another user had rewritten it, 0600
    assert wait_for(lambda: "Permission denied" in server.log(), timeout=5), server.log()
    assert auth(server, "127.0.0.57", ALICE, ALICE_PW) == "235 2.7.0 Authentication successful"
    accounts.chmod(0o600)
    server.add_user("erin@example.test", "erin pw")
    assert wait_for(lambda: "readable again" in server.log(), timeout=5)
    assert wait_for(lambda: "loaded 3 accounts" in server.log(), timeout=5)
    assert auth(server, "127.0.0.58", "erin@example.test", "erin pw") == (
        "235 2.7.0 Authentication successful"
    )
    assert server.log().count("cannot read") == 1  # once when it started, not every second

    # mailboxctl (here with all of root's powers) keeps the file's owner,
    # group and mode: the server can still read what it rewrote.
    if os.geteuid() == 0:  # the service user's file, which the server reads as its group
        os.chown(accounts, 12345, os.getgid())
        accounts.chmod(0o640)
    before = accounts.stat()
    ctl(server, "user", "add", "frank@example.test", input="frank pw\n")
    after = accounts.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert wait_for(lambda: "loaded 4 accounts" in server.log(), timeout=5), server.log()
    assert auth(server, "127.0.0.59", "frank@example.test", "frank pw") == (
        "235 2.7.0 Authentication successful"
    )
    server.check_log()


def auth(server: MailServer, ip: str, address: str, password: str) -> str:
    r = smtp_from(server, ip)
    r.send(f"AUTH PLAIN {plain(address, password)}\r\n")
    reply = r.reply()
    r.close()
    return reply


def test_a_full_disk_while_saving_a_queue_entry_leaves_no_temp_file(small_disk):
    from conftest import ctl
    from test_blackbox import wait_for

    server, filler = small_disk()
    r = smtp_from(server, "127.0.0.56")
    r.send(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n")
    assert r.reply().startswith("235")
    r.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    r.send("Subject: out\r\n\r\nto a smarthost that is not there\r\n.\r\n")
    assert r.reply().startswith("250 ")
    r.close()
    queue = server.mail_dir / ".queue"
    assert wait_for(lambda: "deferred after attempt 1" in server.log(), timeout=10)
    filler.fill()
    ctl(server, "queue", "flush")
    assert wait_for(lambda: "cannot save its state" in server.log(), timeout=10), server.log()
    assert not [p.name for p in queue.iterdir() if p.name.endswith(".tmp")]
    assert len(list(queue.glob("*.json"))) == 1  # the entry, as it was
    server.check_log()


def test_a_second_instance_leaves_the_first_alone(make_server):
    server = make_server("[mailbox]\ntrusted_networks =\n")
    server.add_test_accounts()
    server.start()
    r = smtp_from(server, "127.0.0.57")
    r.send(f"MAIL FROM:<friend@far.test>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n")
    assert [r.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    r.send("Subject: in flight\r\n\r\nhalf of it\r\n")  # its spool file is in .incoming
    second = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "mailbox", "--config", "etc/mailbox.ini"],
        cwd=server.home,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = (second.stdout + second.stderr).strip()
    assert second.returncode != 0
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert f"in use by a running server (process {server.proc.pid})" in out, out
    r.send("the rest\r\n.\r\n")
    assert r.reply().startswith("250 2.0.0 Ok: queued as ")
    r.close()
    assert len(server.messages(ALICE)) == 1
    assert "unacknowledged" not in server.log()
    server.check_log()
