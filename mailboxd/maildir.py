"""Maildir storage: durable delivery for SMTP and mailboxes for POP3.

Messages are stored with LF line ends, as other Maildir tools expect; the
file name carries ``S=`` (bytes on disk) and ``W=`` (bytes on the wire, with
CRLF) so POP3 can answer STAT and LIST without reading any file (listing.py
has the POP3 listing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import attrs

from .accounts import Account
from .listing import ListedMessage, Listings, scan
from .private import create_private, private_dir, write_all

_counter = itertools.count(1)


def maildir_path(mail_dir: Path, account: Account) -> Path:
    return mail_dir / account.domain / account.local


QUOTA_SETTING = "quota"  # [mailbox] quota, and an account's own in its accounts line


def full_mailboxes(
    mail_dir: Path, accounts: tuple[Account, ...], quotas: dict[str, int], adding: int
) -> list[str]:
    """The accounts (of those with a quota) whose mailbox cannot take
    `adding` more bytes (at RCPT, 0: whose mailbox is full). Blocking."""
    return [
        a.address
        for a in accounts
        if a.address in quotas
        and usage(maildir_path(mail_dir, a)) + max(adding, 1) > quotas[a.address]
    ]


def usage(maildir: Path) -> int:
    """The bytes a Maildir's messages take (new/ and cur/), from the sizes
    our names carry (",S=") or, for others, the files themselves. Blocking."""
    total = 0
    for sub in ("new", "cur"):
        try:
            entries = os.scandir(maildir / sub)
        except OSError:  # none yet, or unreadable: nothing there to count
            continue
        with entries:
            for entry in entries:
                named = entry.name.partition(",S=")[2].split(",", 1)[0].split(":", 1)[0]
                if named.isdigit():
                    total += int(named)
                else:
                    with contextlib.suppress(OSError):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        private_dir(path / sub)


def unique_name(hostname: str) -> str:
    # Unique by time, process and counter; the random part covers a process
    # id reused at once (a restarted container) on a Maildir another host
    # shares. `random` is reseeded in a forked child, and needs no system
    # call a name as os.urandom does.
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec:06d}P{_pid}Q{next(_counter)}R{random.getrandbits(32):08x}.{hostname}"


def _forked() -> None:
    global _pid
    _pid = os.getpid()


_pid = os.getpid()
os.register_at_fork(after_in_child=_forked)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SPOOL_MEMORY = 65536  # bytes of a message held in memory before its spool file is made


@attrs.define
class IncomingMessage:
    """A message being received, line by line.

    Most mail is small: it is held in memory and written once, by `commit`
    (in a thread pool), so receiving it costs no trip to the pool before the
    final dot. Past SPOOL_MEMORY it goes to a spool file (`spill`), and then
    line by line as it arrives: nothing but the current line and a write
    buffer is held. With `spill_inline`, `write_line` spills by itself (for
    callers already off the reactor thread); otherwise the owner calls
    `spill` in a thread pool once `must_spill` says so.
    """

    spool_dir: Path
    hostname: str
    spill_inline: bool = True
    path: Path = attrs.field(init=False)
    size: int = attrs.field(init=False, default=0)
    wire_size: int = attrs.field(init=False, default=0)
    _file: BinaryIO | None = attrs.field(init=False, default=None, repr=False)
    _held: list[bytes] = attrs.field(init=False, factory=list, repr=False)
    _held_size: int = attrs.field(init=False, default=0)
    _created: bool = attrs.field(init=False, default=False)  # the spool file exists
    # The message, once `commit` wrote it from memory in one go (it never spilled).
    whole: bytes | None = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self.path = self.spool_dir / unique_name(self.hostname)

    def write_line(self, line: bytes) -> None:
        """Append one line, given without its line end."""
        self.size += len(line) + 1
        self.wire_size += len(line) + 2
        if self._file is not None:
            self._file.write(line)
            self._file.write(b"\n")
            return
        self._held.append(line)
        self._held_size += len(line) + 1
        if self.spill_inline and self.must_spill:
            self.spill()

    @property
    def must_spill(self) -> bool:
        return self._file is None and self._held_size > SPOOL_MEMORY

    def spill(self) -> None:
        """Make the spool file and write what is held to it. Blocking."""
        if self._file is None:
            file = os.fdopen(self._create(), "wb", buffering=65536)
            self._file = file
            file.write(self._take_held())

    def _create(self) -> int:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # first message, or the folder was removed
            private_dir(self.spool_dir)
            fd = os.open(self.path, flags, 0o600)
        self._created = True
        return fd

    def _take_held(self) -> bytes:
        held, self._held, self._held_size = self._held, [], 0
        return b"\n".join([*held, b""]) if held else b""

    def _write_held(self) -> bytes:
        """The spool file of a message held whole, written and fsynced in one
        go (no file object); the message."""
        data = self._take_held()
        fd = self._create()
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data

    def content(self, offset: int) -> bytes:
        """The message so far from `offset` on, as it is stored (LF line
        ends). Blocking, for a spilled message: call it in a thread pool."""
        if self._file is None:
            return b"\n".join([*self._held, b""])[offset:]
        self._file.flush()
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read()

    def insert_after_first_line(self, lines: list[bytes]) -> None:
        """Add `lines` (each without its line end) after the first line (the
        Return-Path): header fields this server adds once the data is in,
        such as a DKIM signature. Blocking, for a spilled message."""
        added = sum(len(line) + 1 for line in lines)
        if self._file is None:
            self._held[1:1] = lines
            self._held_size += added
        else:
            self._rewrite_with(lines)
        self.size += added
        self.wire_size += added + len(lines)

    def _rewrite_with(self, lines: list[bytes]) -> None:
        assert self._file is not None
        self._file.flush()
        old, old_path = self._file, self.path
        self.path = self.spool_dir / unique_name(self.hostname)
        self._created = False
        new = os.fdopen(self._create(), "wb", buffering=65536)
        try:
            with open(old_path, "rb") as source:
                new.write(source.readline())
                new.write(b"".join(line + b"\n" for line in lines))
                while chunk := source.read(1 << 20):
                    new.write(chunk)
        except BaseException:
            new.close()
            os.unlink(self.path)
            self.path, self._file, self._created = old_path, old, True
            raise
        self._file = new
        old.close()
        os.unlink(old_path)

    def discard(self) -> None:
        self._held, self._held_size = [], 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def commit(
        self,
        mail_dir: Path,
        accounts: tuple[Account, ...],
        relay: Callable[[Path], object] | None = None,
        relay_held: Callable[[bytes], object] | None = None,
    ) -> list[Path]:
        """Deliver to every account's Maildir, and hand the file to `relay`
        (the outbound queue) if given; return when all copies are on disk.

        A message held whole in memory and only relayed goes to `relay_held`
        instead, if given, with no spool file: the queue writes it once.

        Blocking: call it in a thread pool.
        """
        try:
            if self._file is None and not accounts and relay_held is not None:
                self.whole = self._take_held()
                relay_held(self.whole)
                return []
            if self._file is None:  # all of it was held: the queue may keep it too
                self.whole = self._write_held()
            else:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            delivered = []
            for account in accounts:
                delivered.append(self._deliver_one(maildir_path(mail_dir, account)))
            if relay is not None:
                relay(self.path)
            return delivered
        finally:
            self.discard()

    def _deliver_one(self, maildir: Path) -> Path:
        # The spool file's name is unique on this host already, so each
        # Maildir gets it too.
        final = maildir / "new" / f"{self.path.name},S={self.size},W={self.wire_size}"
        try:
            _appear_whole(self.path, final)
        except FileNotFoundError:  # a new account: its Maildir is made on first delivery
            ensure_maildir(maildir)
            _appear_whole(self.path, final)
        fsync_dir(final.parent)
        return final


def _appear_whole(source: Path, final: Path) -> None:
    """Make the finished, fsynced `source` appear at `final` in a Maildir's new/.

    A hard link appears whole at once, so it needs no step through tmp/
    (the step costs a link, a rename and two directory updates a message);
    a copy, where no link can be made (another file system), does.
    """
    try:
        os.link(source, final)
    except OSError as e:
        if e.errno not in LINK_REFUSED:
            raise
        tmp = final.parent.parent / "tmp" / final.name
        _copy_durably(source, tmp)
        os.rename(tmp, final)


LINK_REFUSED = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in LINK_REFUSED:
            raise
        _copy_durably(source, target)


def _copy_durably(source: Path, target: Path) -> None:
    with open(source, "rb") as src, os.fdopen(create_private(target), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())


SPOOL_ORPHAN_AGE = 86400.0  # seconds: no message is received for that long


def spool_files(spool_dir: Path, node: str, now: float | None = None) -> list[Path]:
    """The spool files of the front end named `node` (the last part of a
    unique_name), those of a version that named them by host name (with a
    dot: a node's name has none), and any a day old (a node renamed, say by
    a container's new host name, never comes back for its own)."""
    if not spool_dir.is_dir():
        return []
    now = time.time() if now is None else now
    found = []
    for entry in spool_dir.iterdir():
        tag = entry.name.split(".", 2)[-1]
        if tag == node or "." in tag:
            found.append(entry)
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > SPOOL_ORPHAN_AGE:
                found.append(entry)
    return found


def clean_spool(files: list[Path]) -> int:
    """Remove spool files left by a crash: none of them was acknowledged."""
    removed = 0
    for entry in files:
        with contextlib.suppress(OSError):
            entry.unlink()
            removed += 1
    return removed


# --- POP3 side ------------------------------------------------------------------


class MailboxLocked(Exception):
    pass


@attrs.define
class Mailbox:
    """A POP3 session's view of one Maildir: a snapshot taken at login.

    Deletions are only marked; `commit` (at QUIT) unlinks them.
    """

    path: Path
    messages: tuple[ListedMessage, ...]
    _lock_fd: int | None = attrs.field(repr=False, default=None)
    deleted: set[int] = attrs.field(factory=set)  # message numbers

    @classmethod
    def open(cls, path: Path, listings: Listings | None = None) -> Mailbox:
        """Lock and list the Maildir. Blocking: call it in a thread pool."""
        ensure_maildir(path)
        fd = os.open(path / ".pop3.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxLocked(str(path)) from None
        try:
            maildir = str(path)
            messages = listings.list(maildir) if listings else tuple(scan(maildir))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, messages, fd)

    def get(self, number: int) -> ListedMessage | None:
        """Message `number` (1-based), unless missing or marked deleted."""
        if 1 <= number <= len(self.messages) and number not in self.deleted:
            return self.messages[number - 1]
        return None

    def delete(self, number: int) -> None:
        self.deleted.add(number)

    def live(self) -> list[tuple[int, ListedMessage]]:
        deleted = self.deleted
        return [(i, m) for i, m in enumerate(self.messages, 1) if i not in deleted]

    def undelete_all(self) -> None:
        self.deleted.clear()

    def commit(self) -> int:
        """Remove what was marked deleted. Blocking: call it in a thread pool."""
        removed = 0
        dirs = set()
        for number in sorted(self.deleted):
            message = self.messages[number - 1]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(message.path)
                removed += 1
                dirs.add(os.path.dirname(message.path))
        for d in dirs:
            fsync_dir(Path(d))
        return removed

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
