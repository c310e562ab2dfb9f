"""Maildir storage: durable delivery for SMTP and mailboxes for POP3.

Messages are stored with LF line ends, as other Maildir tools expect; the
file name carries ``S=`` (bytes on disk) and ``W=`` (bytes on the wire, with
CRLF) so POP3 can answer STAT and LIST without reading any file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import attrs

from .accounts import Account
from .private import create_private, private_dir

_counter = itertools.count(1)
_UID_OK = re.compile(r"[\x21-\x7e]{1,70}")
_SIZES = re.compile(r",S=(\d+)(?:,W=(\d+))?")


def maildir_path(mail_dir: Path, account: Account) -> Path:
    return mail_dir / account.domain / account.local


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        private_dir(path / sub)


def unique_name(hostname: str) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}R{secrets.token_hex(4)}.{hostname}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define
class IncomingMessage:
    """A message being received, streamed to a spool file line by line.

    Lines are written as they arrive; nothing but the current line is held in
    memory. `commit` (run in a thread pool) makes it durable in every Maildir.
    """

    spool_dir: Path
    hostname: str
    path: Path = attrs.field(init=False)
    size: int = attrs.field(init=False, default=0)
    wire_size: int = attrs.field(init=False, default=0)
    _file: BinaryIO = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.path = self.spool_dir / unique_name(self.hostname)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # first message, or the folder was removed
            private_dir(self.spool_dir)
            fd = os.open(self.path, flags, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)

    def write_line(self, line: bytes) -> None:
        """Append one line, given without its line end."""
        self._file.write(line)
        self._file.write(b"\n")
        self.size += len(line) + 1
        self.wire_size += len(line) + 2

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def commit(
        self,
        mail_dir: Path,
        accounts: tuple[Account, ...],
        relay: Callable[[Path], object] | None = None,
    ) -> list[Path]:
        """Deliver to every account's Maildir, and hand the file to `relay`
        (the outbound queue) if given; return when all copies are on disk.

        Blocking: call it in a thread pool.
        """
        try:
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
        name = unique_name(self.hostname)
        tmp = maildir / "tmp" / name
        try:
            link_or_copy(self.path, tmp)
        except FileNotFoundError:  # a new account: its Maildir is made on first delivery
            ensure_maildir(maildir)
            link_or_copy(self.path, tmp)
        final = maildir / "new" / f"{name},S={self.size},W={self.wire_size}"
        os.rename(tmp, final)
        fsync_dir(final.parent)
        return final


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        _copy_durably(source, target)


def _copy_durably(source: Path, target: Path) -> None:
    with open(source, "rb") as src, os.fdopen(create_private(target), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())


def clean_spool(spool_dir: Path) -> int:
    """Remove spool files left by a crash: none of them was acknowledged."""
    removed = 0
    if spool_dir.is_dir():
        for entry in spool_dir.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed


# --- POP3 side ------------------------------------------------------------------


@attrs.define
class Message:
    path: Path
    uid: str
    size: int
    deleted: bool = False


def uid_for(name: str) -> str:
    """A UIDL that stays the same for the message's whole life (RFC 1939 §7)."""
    base = name.split(":", 1)[0].split(",", 1)[0]
    if _UID_OK.fullmatch(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def open_message(path: Path) -> BinaryIO:
    """Open a message file to read: a regular file, not a link to one, and
    never a FIFO or a device that could block the reading thread for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _wire_size(path: Path, name: str, on_disk: int) -> int:
    """What the message is on the wire (CRLF ends, a final CRLF; RFC 1939's size).

    The name's W= is believed only beside an S= that is the file's size and
    a W= that size could give: else the file is measured, so that LIST never
    announces what RETR does not send.
    """
    m = _SIZES.search(name)
    if m and m.group(2) and int(m.group(1)) == on_disk:
        wire = int(m.group(2))
        if on_disk <= wire <= 2 * on_disk + 2:
            return wire
    with open_message(path) as f:
        return measure_wire(f)


def measure_wire(f: BinaryIO) -> int:
    """The wire size of what `f` holds, read in chunks."""
    total = crlf = lf = 0
    last = b""
    while chunk := f.read(1 << 20):
        total += len(chunk)
        lf += chunk.count(b"\n")
        crlf += chunk.count(b"\r\n") + (last == b"\r" and chunk[:1] == b"\n")
        last = chunk[-1:]
    return total - crlf + lf + (2 if total and last != b"\n" else 0)


class MailboxLocked(Exception):
    pass


@attrs.define
class Mailbox:
    """A POP3 session's view of one Maildir: a snapshot taken at login.

    Deletions are only marked; `commit` (at QUIT) unlinks them.
    """

    path: Path
    messages: list[Message]
    _lock_fd: int | None = attrs.field(repr=False, default=None)

    @classmethod
    def open(cls, path: Path) -> Mailbox:
        """Lock and list the Maildir. Blocking: call it in a thread pool."""
        ensure_maildir(path)
        fd = os.open(path / ".pop3.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxLocked(str(path)) from None
        try:
            messages = []
            entries = []
            for sub in ("cur", "new"):
                for entry in os.scandir(path / sub):
                    # Regular files only: a link could serve any file the
                    # server can read, a FIFO would hang the reader.
                    if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                        on_disk = entry.stat(follow_symlinks=False).st_size
                        entries.append((entry.name, Path(entry.path), on_disk))
            for name, file_path, on_disk in sorted(entries):
                try:
                    size = _wire_size(file_path, name, on_disk)
                except OSError:  # gone, or swapped for what is not a message
                    continue
                messages.append(Message(file_path, uid_for(name), size))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, messages, fd)

    def get(self, number: int) -> Message | None:
        """Message `number` (1-based), unless missing or marked deleted."""
        if 1 <= number <= len(self.messages):
            message = self.messages[number - 1]
            if not message.deleted:
                return message
        return None

    def live(self) -> list[tuple[int, Message]]:
        return [(i, m) for i, m in enumerate(self.messages, 1) if not m.deleted]

    def undelete_all(self) -> None:
        for message in self.messages:
            message.deleted = False

    def commit(self) -> int:
        """Remove what was marked deleted. Blocking: call it in a thread pool."""
        removed = 0
        dirs = set()
        for message in self.messages:
            if message.deleted:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(message.path)
                    removed += 1
                    dirs.add(message.path.parent)
        for d in dirs:
            fsync_dir(d)
        return removed

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
