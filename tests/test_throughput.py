"""Throughput (issue 12) decisions that need no running server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailboxd import listing
from mailboxd.listing import SIZES_FILE, Listings, scan, uid_for
from mailboxd.service import DEFAULT_BACKLOG, with_backlog


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:25", f"tcp:25:backlog={DEFAULT_BACKLOG}"),
        ("tcp:2525:interface=127.0.0.1", f"tcp:2525:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        (r"tcp6:25:interface=\:\:", rf"tcp6:25:interface=\:\::backlog={DEFAULT_BACKLOG}"),
        ("tls:465", f"tls:465:backlog={DEFAULT_BACKLOG}"),
        ("unix:/run/mailbox.sock", f"unix:/run/mailbox.sock:backlog={DEFAULT_BACKLOG}"),
        ("tcp:25:backlog=64", "tcp:25:backlog=64"),  # the operator's choice stands
        ("tcp:backlog=64:port=25", "tcp:backlog=64:port=25"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # systemd's socket
    ],
)
def test_listeners_get_a_backlog_for_bursts_unless_they_name_one(description, expected):
    assert with_backlog(description) == expected


# --- the POP3 listing: sizes from names, the sizes file, listings kept -------------


def foreign(maildir: Path, name: str, body: bytes, sub: str = "new") -> Path:
    """A message delivered by another program: no S= or W= in its name."""
    for d in ("new", "cur", "tmp"):
        (maildir / d).mkdir(parents=True, exist_ok=True)
    path = maildir / sub / name
    path.write_bytes(body)
    return path


def settle(maildir: Path) -> None:
    """Make new/ and cur/ look untouched for a while (as after a quiet minute)."""
    past = os.stat(maildir / "new").st_mtime - 60
    for d in ("new", "cur"):
        os.utime(maildir / d, (past, past))


@pytest.fixture
def reads(monkeypatch):
    """The message files scan opens to measure."""
    opened: list[str] = []
    real = listing.open_message

    def spy(path):
        opened.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(listing, "open_message", spy)
    return opened


def sizes_file(maildir: Path) -> dict[str, tuple[int, int]]:
    return listing.read_sizes(str(maildir))


def test_a_foreign_message_is_measured_once_and_its_size_kept(tmp_path, reads):
    box = tmp_path / "box"
    foreign(box, "1.A.host", b"Subject: a\n\nbody\n")  # 17 bytes, 3 LFs: 20 on the wire
    foreign(box, "2.B.host", b"Subject: b\n\nno final newline")  # + CRLF at the end
    [a, b] = scan(str(box))
    assert (a.uid, a.size) == ("1.A.host", 20)
    assert (b.uid, b.size) == ("2.B.host", 28 + 2 + 2)
    assert reads == ["1.A.host", "2.B.host"]
    assert sizes_file(box) == {"1.A.host": (17, 20), "2.B.host": (28, 32)}
    reads.clear()
    assert scan(str(box)) == [a, b]
    assert reads == []  # from the sizes file


def test_the_sizes_file_follows_files_added_removed_and_renamed_behind_its_back(tmp_path, reads):
    box = tmp_path / "box"
    first = foreign(box, "1.A.host", b"one\n")
    foreign(box, "2.B.host", b"two\n")
    scan(str(box))
    reads.clear()
    # Another program: reads the first (new/ to cur/ with a flag), removes
    # the second, and delivers a third.
    first.rename(box / "cur" / "1.A.host:2,S")
    (box / "new" / "2.B.host").unlink()
    foreign(box, "3.C.host", b"three\nlines\n")
    got = scan(str(box))
    assert [(m.uid, m.size) for m in got] == [("1.A.host", 5), ("3.C.host", 14)]
    assert got[0].path == str(box / "cur" / "1.A.host:2,S")
    assert reads == ["3.C.host"]  # the renamed one kept its size
    assert sizes_file(box) == {"1.A.host": (4, 5), "3.C.host": (12, 14)}


def test_a_file_rewritten_to_another_size_is_measured_again(tmp_path, reads):
    box = tmp_path / "box"
    path = foreign(box, "1.A.host", b"short\n")
    scan(str(box))
    path.write_bytes(b"a longer\nbody\n")
    reads.clear()
    [m] = scan(str(box))
    assert m.size == 16 and reads == ["1.A.host"]


@pytest.mark.parametrize(
    "text",
    ["", "not the header\n1.A.host 6 7\n", "mailbox-sizes 1\n1.A.host 6 9999\n", "\0\0\0"],
)
def test_a_damaged_or_lying_sizes_file_is_rebuilt(tmp_path, text):
    box = tmp_path / "box"
    foreign(box, "1.A.host", b"short\n")
    (box / SIZES_FILE).write_text(text)
    [m] = scan(str(box))
    assert m.size == 7
    assert sizes_file(box) == {"1.A.host": (6, 7)}


def test_names_with_sizes_need_no_sizes_file(tmp_path, reads):
    box = tmp_path / "box"
    foreign(box, "1.A.host,S=6,W=7", b"short\n")
    [m] = scan(str(box))
    assert (m.uid, m.size) == ("1.A.host", 7)
    assert reads == [] and not (box / SIZES_FILE).exists()


def test_uidls_are_what_they_were():
    # Mailbox's own names give their unique part; a name that cannot be a
    # UIDL (RFC 1939: 1-70 printable characters) its SHA-1.
    assert uid_for("1796174346.M1P2Q3R0a1b2c3.mail.example.test,S=10,W=12:2,S") == (
        "1796174346.M1P2Q3R0a1b2c3.mail.example.test"
    )
    assert uid_for("1.A.host") == "1.A.host"
    assert uid_for("x" * 71) == "fd1ee778e79ae344f333264a36514927042c77c2"
    assert uid_for("a b") == "7dbde93504122a707f849f2c12bdd9de71b41929"


def test_a_listing_is_kept_while_the_maildir_is_unchanged(tmp_path, reads):
    box = tmp_path / "box"
    foreign(box, "1.A.host", b"one\n")
    settle(box)
    kept = Listings()
    first = kept.list(str(box))
    assert kept.list(str(box)) is first  # no scan at all
    foreign(box, "2.B.host", b"two\n")  # new/ changes
    second = kept.list(str(box))
    assert [m.uid for m in second] == ["1.A.host", "2.B.host"]
    # Changed just now: the next change could fall in the same tick of the
    # file system's clock, so this listing is not kept.
    assert kept.list(str(box)) is not second
    settle(box)
    third = kept.list(str(box))
    assert kept.list(str(box)) is third
    (box / "cur" / "1.A.host:2,S").write_bytes(b"one\n")
    (box / "new" / "1.A.host").unlink()
    settle(box)
    os.utime(box / "cur", (1, 1))  # cur/ changed (even to an older time)
    assert [m.path for m in kept.list(str(box))][0].endswith("1.A.host:2,S")


def test_listings_kept_are_bounded(tmp_path):
    kept = Listings(budget=3)
    boxes = []
    for i in range(3):
        box = tmp_path / f"box{i}"
        foreign(box, "1.A.host", b"one\n")
        foreign(box, "2.B.host", b"two\n")
        settle(box)
        boxes.append(box)
    lists = [kept.list(str(b)) for b in boxes]
    assert kept.list(str(boxes[2])) is lists[2]
    assert kept.list(str(boxes[0])) is not lists[0]  # pushed out by the others


# --- a delivery: the spool file linked straight into new/ -----------------------------


def _delivered(tmp_path: Path, recipients: int) -> tuple[list[Path], list[Path]]:
    from mailboxd.accounts import Account
    from mailboxd.maildir import IncomingMessage, maildir_path

    message = IncomingMessage(tmp_path / ".incoming", "mail.example.test")
    for line in (b"Subject: hi", b"", b"body"):
        message.write_line(line)
    accounts = tuple(
        Account(f"u{n}@example.test", "example.test", f"u{n}") for n in range(recipients)
    )
    paths = message.commit(tmp_path, accounts)
    return paths, [maildir_path(tmp_path, a) for a in accounts]


@pytest.mark.parametrize("recipients", [1, 3])
def test_a_delivery_appears_whole_in_new_with_nothing_left_behind(tmp_path, recipients):
    paths, maildirs = _delivered(tmp_path, recipients)
    for path, maildir in zip(paths, maildirs, strict=True):
        assert path.parent == maildir / "new"
        assert path.read_bytes() == b"Subject: hi\n\nbody\n"
        assert path.name.endswith(",S=18,W=21")
        assert list((maildir / "tmp").iterdir()) == []
    assert list((tmp_path / ".incoming").iterdir()) == []
    assert len({p.name for p in paths}) == 1  # one unique name, used in each Maildir


def test_a_delivery_that_cannot_link_copies_through_tmp(tmp_path, monkeypatch):
    """Another file system (EXDEV): a copy, which appears in new/ only once whole."""
    import errno

    from mailboxd import maildir

    renames: list[tuple[str, str]] = []
    real_rename = os.rename

    def no_link(source, target):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def rename(source, target):
        renames.append((Path(source).parent.name, Path(target).parent.name))
        assert Path(source).read_bytes() == b"Subject: hi\n\nbody\n"  # whole before it shows
        real_rename(source, target)

    monkeypatch.setattr(maildir.os, "link", no_link)
    monkeypatch.setattr(maildir.os, "rename", rename)
    paths, maildirs = _delivered(tmp_path, 2)
    assert renames == [("tmp", "new"), ("tmp", "new")]
    for path, box in zip(paths, maildirs, strict=True):
        assert path.read_bytes() == b"Subject: hi\n\nbody\n"
        assert list((box / "tmp").iterdir()) == []


def test_unique_names_carry_the_process_id_also_in_a_forked_child():
    import re

    from mailboxd.maildir import unique_name

    names = {unique_name("mail.example.test") for _ in range(1000)}
    assert len(names) == 1000
    pattern = re.compile(r"\d+\.M\d{6}P(\d+)Q\d+R[0-9a-f]{8}\.mail\.example\.test")
    assert all(int(pattern.fullmatch(n)[1]) == os.getpid() for n in names)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, unique_name("h").encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    name = os.read(read, 200).decode()
    os.close(read)
    assert f"P{child}Q" in name
