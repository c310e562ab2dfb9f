"""What a POP3 login sees in a Maildir: each message's path, UIDL and size.

RFC 1939 sizes count CRLF line ends, and Maildir files have LF ones, so a
size is either read from the name (``,S=`` bytes on disk and ``,W=`` bytes on
the wire, as Mailbox writes them) or measured by reading the file. A
measured size is kept in the Maildir's sizes file (SIZES_FILE), so a message
another program delivered is read once, not at every login. Its lines are
``<unique name> <bytes on disk> <bytes on the wire>``, keyed by the unique
part of the file name, which a rename (new/ to cur/, flags) keeps; a line
whose bytes on disk no longer match is measured again, and lines of messages
that are gone are dropped. The file is a cache: lost or damaged, it is
rebuilt.

On top of that, each process keeps the last listing of recent Maildirs
(`Listings`). It is used while neither new/ nor cur/ has changed (their
mtime and inode), so a login to an unchanged mailbox reads no file and calls
stat on no message.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from typing import BinaryIO

import attrs

SIZES_FILE = "mailbox-sizes"
_SIZES_HEADER = "mailbox-sizes 1\n"
_UID_OK = re.compile(r"[\x21-\x7e]{1,70}")
_NAME_SIZES = re.compile(r",S=(\d+)(?:,W=(\d+))?")
# A directory changed this recently may change again within the same tick of
# the file system's clock, which its mtime would not show: not cached.
SETTLED_SECONDS = 2.0


@attrs.frozen
class ListedMessage:
    path: str
    uid: str
    size: int  # on the wire: CRLF line ends and a final CRLF (RFC 1939)


def uid_for(name: str) -> str:
    """A UIDL that stays the same for the message's whole life (RFC 1939 §7)."""
    base = unique_part(name)
    if _UID_OK.fullmatch(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def unique_part(name: str) -> str:
    """The part of a Maildir file name that renames keep (no flags, no sizes)."""
    return name.split(":", 1)[0].split(",", 1)[0]


def _open_regular(path: str | os.PathLike[str]) -> int:
    """A descriptor of a regular file, not a link to one, and never a FIFO or
    a device that could block the reading thread for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_message(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a message file to read (see _open_regular)."""
    return os.fdopen(_open_regular(path), "rb")


def read_small(path: str | os.PathLike[str], limit: int) -> bytes:
    """Up to `limit` bytes of a message file (see _open_regular), in one read."""
    fd = _open_regular(path)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


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


def plausible(on_disk: int, wire: int) -> bool:
    """Whether a file of `on_disk` bytes can be `wire` bytes on the wire: each
    LF may become CRLF, and a final CRLF may be added."""
    return on_disk <= wire <= 2 * on_disk + 2


def size_from_name(name: str, on_disk: int) -> int | None:
    """The W= of a name, believed only beside an S= that is the file's size
    and when that size could give it: so that LIST never announces what RETR
    does not send."""
    m = _NAME_SIZES.search(name)
    if m and m.group(2) and int(m.group(1)) == on_disk:
        wire = int(m.group(2))
        if plausible(on_disk, wire):
            return wire
    return None


# --- the sizes file --------------------------------------------------------------


def read_sizes(maildir: str) -> dict[str, tuple[int, int]]:
    """unique name -> (bytes on disk, bytes on the wire); {} if none or unreadable."""
    found: dict[str, tuple[int, int]] = {}
    try:
        with open(os.path.join(maildir, SIZES_FILE), encoding="ascii", errors="replace") as f:
            if f.readline() != _SIZES_HEADER:
                return {}
            for line in f:
                words = line.split()
                if len(words) == 3 and words[1].isdigit() and words[2].isdigit():
                    found[words[0]] = (int(words[1]), int(words[2]))
    except OSError:
        return {}
    return found


def write_sizes(maildir: str, sizes: dict[str, tuple[int, int]]) -> None:
    """Replace the sizes file (through tmp/, renamed into place). A failure
    (a full disk) leaves the old one: it is only a cache."""
    tmp = os.path.join(maildir, "tmp", f".{SIZES_FILE}.{secrets.token_hex(6)}")
    text = _SIZES_HEADER + "".join(f"{k} {d} {w}\n" for k, (d, w) in sorted(sizes.items()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
        os.rename(tmp, os.path.join(maildir, SIZES_FILE))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# --- one listing ---------------------------------------------------------------------


def scan(maildir: str) -> list[ListedMessage]:
    """Every message in new/ and cur/, in name order. Blocking.

    Regular files only: a link could serve any file the server can read, a
    FIFO would hang the reader. A file that goes while it is measured is left
    out.
    """
    entries = []
    for sub in ("cur", "new"):
        for entry in os.scandir(os.path.join(maildir, sub)):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                on_disk = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            entries.append((entry.name, entry.path, on_disk))
    entries.sort()
    messages = []
    known: dict[str, tuple[int, int]] | None = None  # read when first needed
    measured: dict[str, tuple[int, int]] = {}
    for name, path, on_disk in entries:
        wire = size_from_name(name, on_disk)
        if wire is None:
            if known is None:
                known = read_sizes(maildir)
            key = unique_part(name)
            kept = known.get(key)
            if kept is not None and kept[0] == on_disk and plausible(*kept):
                wire = kept[1]
            else:
                try:
                    with open_message(path) as f:
                        wire = measure_wire(f)
                except OSError:  # gone, or swapped for what is not a message
                    continue
            measured[key] = (on_disk, wire)
        messages.append(ListedMessage(path, uid_for(name), wire))
    if known is not None and known != measured:
        write_sizes(maildir, measured)
    return messages


# --- listings kept between logins -------------------------------------------------------


@attrs.frozen
class Stamp:
    """What changes when a file is added to, removed from or renamed in a Maildir."""

    cur: tuple[int, int, int]  # device, inode, mtime in ns
    new: tuple[int, int, int]
    settled: bool  # neither changed in the last SETTLED_SECONDS

    @classmethod
    def of(cls, maildir: str) -> Stamp:
        now = time.time()
        cur = os.stat(os.path.join(maildir, "cur"))
        new = os.stat(os.path.join(maildir, "new"))
        latest = max(cur.st_mtime, new.st_mtime)
        return cls(
            (cur.st_dev, cur.st_ino, cur.st_mtime_ns),
            (new.st_dev, new.st_ino, new.st_mtime_ns),
            settled=now - latest >= SETTLED_SECONDS,
        )

    def same(self, other: Stamp) -> bool:
        return (self.cur, self.new) == (other.cur, other.new)


class Listings:
    """The last listing of recently opened Maildirs, up to `budget` messages
    in all (least recently used first to go). Thread-safe: logins list their
    Maildirs in the storage pool."""

    def __init__(self, budget: int = 200_000) -> None:
        self.budget = budget
        self._kept: collections.OrderedDict[str, tuple[Stamp, tuple[ListedMessage, ...]]] = (
            collections.OrderedDict()
        )
        self._size = 0
        self._lock = threading.Lock()

    def list(self, maildir: str) -> tuple[ListedMessage, ...]:
        """The Maildir's messages, as `scan` would give them. Blocking."""
        stamp = Stamp.of(maildir)
        with self._lock:
            kept = self._kept.get(maildir)
            if kept is not None and kept[0].settled and kept[0].same(stamp):
                self._kept.move_to_end(maildir)
                return kept[1]
        messages = tuple(scan(maildir))
        with self._lock:
            old = self._kept.pop(maildir, None)
            if old is not None:
                self._size -= len(old[1])
            if stamp.settled and len(messages) <= self.budget:
                self._kept[maildir] = (stamp, messages)
                self._size += len(messages)
                while self._size > self.budget:
                    _, (_, dropped) = self._kept.popitem(last=False)
                    self._size -= len(dropped)
        return messages
