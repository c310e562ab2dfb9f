"""The outbound queue on disk: what was accepted for relay, durably.

Layout, one message per id under ``<mail_dir>/.queue/``::

    <id>.msg    the message as received (LF line ends), headers first. Bytes
                before ``offset`` are the local Return-Path line, which a relay
                must not send.
    <id>.json   the envelope, written last and rewritten after every attempt
                (temp file, fsync, rename): its presence makes the entry
                exist. Fields:
                  version     1
                  id          the id (also the SMTP "queued as" id)
                  sender      envelope sender; "" for the null sender <>
                  offset      bytes of <id>.msg to skip
                  received    Unix time of acceptance
                  client      the submitting client's IP ("" for our own bounces)
                  account     the authenticated account, or null
                  recipients  one object per recipient:
                    address       where to deliver
                    status        "pending", "deferred", "delivered" or "failed"
                    attempts      attempts so far
                    next_attempt  Unix time of the next attempt
                    last_error    the last failure's reply or reason, or ""
                    status_code   RFC 3463 code of a failure, e.g. "5.1.1", or ""
                    remote        the host that gave the last answer, or ""
    corrupt/    entries that could not be parsed, moved aside for the operator
    .flush      touched by `mailboxctl queue flush`: each time its modification
                time changes, every front end tries its deferred recipients now
    .<id>.<node>.json.tmp, .<id>.<node>.msg.tmp, .<id>.<node>.gone.tmp
                a write (or removal) in progress by the front end named <node>

A runner drains it by reading each ``*.json``, sending ``<id>.msg[offset:]``
to the recipients still pending or deferred, and removing both files (json
first) once none is left. A ``.msg`` with no ``.json`` was never
acknowledged: the front end that was writing it removes it when it starts
again, knowing it for its own by its spool file or temp file (the same inode,
see `remove_unacknowledged`), so that front ends sharing the directory never
take an entry from one another between its message and its envelope.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from .maildir import fsync_dir, link_or_copy
from .private import create_private, private_dir, write_all

QUEUE_DIR = ".queue"
FLUSH = ".flush"
DONE = ("delivered", "failed")
STATUSES = ("pending", "deferred", *DONE)


class CorruptEntry(ValueError):
    pass


@attrs.define
class Recipient:
    address: str
    status: str = "pending"
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    status_code: str = ""
    remote: str = ""  # the server that gave the last answer

    @property
    def done(self) -> bool:
        return self.status in DONE


@attrs.define
class Entry:
    id: str
    sender: str
    offset: int
    received: float
    recipients: list[Recipient]
    client: str = ""
    account: str | None = None

    def to_json(self) -> str:
        # One line, by the C encoder (an indent makes json use its Python one):
        # made twice for each relayed message, it is a few percent of intake.
        return json.dumps({"version": 1, **attrs.asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Entry:
        try:
            data = json.loads(text)
            if data.pop("version", None) != 1:
                raise ValueError("unknown version")
            data["recipients"] = [Recipient(**r) for r in data["recipients"]]
            entry = cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptEntry(str(e)) from None
        problem = entry.problem()
        if problem:
            raise CorruptEntry(problem)
        return entry

    def problem(self) -> str | None:
        """What is wrong with a parsed envelope's field types, if anything.

        JSON from disk may be valid and still wrong; one bad entry must not
        stop the runner, so it is refused here and moved aside."""
        checks: list[tuple[object, type | tuple[type, ...], str]] = [
            (self.id, str, "id"),
            (self.sender, str, "sender"),
            (self.client, str, "client"),
            (self.account, (str, type(None)), "account"),
            (self.offset, int, "offset"),
            (self.received, (int, float), "received"),
        ]
        for r in self.recipients:
            checks += [
                (r.address, str, "address"),
                (r.status, str, "status"),
                (r.attempts, int, "attempts"),
                (r.next_attempt, (int, float), "next_attempt"),
                (r.last_error, str, "last_error"),
                (r.status_code, str, "status_code"),
                (r.remote, str, "remote"),
            ]
        for value, kind, name in checks:
            if isinstance(value, bool) or not isinstance(value, kind):
                return f"{name} has the wrong type"
        if not self.id or not self.recipients or self.offset < 0:
            return "no id, no recipients or a negative offset"
        if any(r.status not in STATUSES for r in self.recipients):
            return "unknown recipient status"
        return None

    def due(self, now: float) -> list[Recipient]:
        return [r for r in self.recipients if not r.done and r.next_attempt <= now]

    @property
    def done(self) -> bool:
        return all(r.done for r in self.recipients)


def queue_dir(mail_dir: Path) -> Path:
    return mail_dir / QUEUE_DIR


def _tmp(directory: Path, entry_id: str, node: str, kind: str) -> Path:
    return directory / (f".{entry_id}.{node}.{kind}.tmp" if node else f".{entry_id}.{kind}.tmp")


def _write_json(directory: Path, entry: Entry, node: str = "") -> None:
    tmp = _tmp(directory, entry.id, node, "json")
    try:
        try:
            fd = create_private(tmp)
        except FileExistsError:  # left by a crash during an earlier save
            os.unlink(tmp)
            fd = create_private(tmp)
        try:
            write_all(fd, entry.to_json().encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, directory / f"{entry.id}.json")
    except BaseException:
        # A full disk: the envelope stays as it was, and no temp file is left behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def enqueue(directory: Path, spool: Path, entry: Entry, node: str = "") -> None:
    """Put the spooled message and its envelope in the queue, durably.

    Blocking: call it in a thread pool. `spool` must already be fsynced, and
    stay until this has returned (it marks the .msg as this node's).
    """
    try:
        link_or_copy(spool, directory / f"{entry.id}.msg")
    except FileNotFoundError:  # the first entry, or the folder was removed
        private_dir(directory)
        link_or_copy(spool, directory / f"{entry.id}.msg")
    _write_json(directory, entry, node)


def enqueue_bytes(directory: Path, data: bytes, entry: Entry, node: str = "") -> None:
    """Queue a message held in memory: one only relayed, or a bounce we made.

    Written to a temp file of this node's, linked as the .msg, and the temp
    file goes once the envelope is written: a crash before that leaves both,
    and `remove_unacknowledged` knows the .msg for this node's. Blocking.
    """
    tmp = _tmp(directory, entry.id, node, "msg")
    try:
        fd = create_private(tmp)
    except FileNotFoundError:  # the first entry, or the folder was removed
        private_dir(directory)
        fd = create_private(tmp)
    except FileExistsError:  # left by a crash during an earlier try
        os.unlink(tmp)
        fd = create_private(tmp)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, directory / f"{entry.id}.msg")
        _write_json(directory, entry, node)
    except BaseException:
        with contextlib.suppress(OSError):
            if not exists(directory, entry.id):
                os.unlink(directory / f"{entry.id}.msg")
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


DELETED = "deleted"  # by mailboxctl queue delete: not a fault


def exists(directory: Path, entry_id: str) -> bool:
    """Whether the entry is still queued (its envelope is there). Blocking."""
    return (directory / f"{entry_id}.json").exists()


def corruption(directory: Path, entry: Entry) -> str | None:
    """What makes `entry` undeliverable as it stands on disk, or None. Blocking."""
    if not (directory / f"{entry.id}.json").exists():
        return DELETED
    try:
        size = os.stat(directory / f"{entry.id}.msg").st_size
    except FileNotFoundError:
        return "its message file is missing"
    if entry.offset >= size:
        return f"its offset {entry.offset} is past the end of its message ({size} bytes)"
    return None


def save(directory: Path, entry: Entry, node: str = "") -> None:
    """Record the recipients' new state. Blocking."""
    _write_json(directory, entry, node)


def remove(directory: Path, entry_id: str, node: str = "") -> bool:
    """Drop an entry: its envelope goes first (renamed to a temp file of
    `node`'s), so a crash leaves an orphan .msg that `node` knows for its own."""
    return remove_all(directory, [entry_id], node)[0]


def remove_all(directory: Path, entry_ids: list[str], node: str = "") -> list[bool]:
    """Drop several entries (see `remove`), made durable by one fsync: whether
    each was there."""
    removed = []
    for entry_id in entry_ids:
        gone = _tmp(directory, entry_id, node, "gone")
        try:
            os.rename(directory / f"{entry_id}.json", gone)
        except FileNotFoundError:
            removed.append(False)
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / f"{entry_id}.msg")
        os.unlink(gone)
        removed.append(True)
    if any(removed):
        fsync_dir(directory)
    return removed


def load(path: Path) -> Entry:
    """Read one envelope; CorruptEntry if it cannot be parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptEntry(str(e)) from None
    entry = Entry.from_json(text)
    if entry.id != path.stem:
        raise CorruptEntry(f"its id {entry.id!r} is not its file name")
    return entry


def entry_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def move_corrupt(directory: Path, path: Path) -> Path:
    """Move an unreadable envelope and its message to corrupt/."""
    corrupt = directory / "corrupt"
    private_dir(corrupt)
    target = corrupt / path.name
    os.replace(path, target)
    with contextlib.suppress(FileNotFoundError):
        os.replace(path.with_suffix(".msg"), corrupt / path.with_suffix(".msg").name)
    fsync_dir(directory)
    return target


def remove_unacknowledged(
    directory: Path, node: str = "", spool: Sequence[Path] = (), now: float | None = None
) -> int:
    """Remove what a crash of `node` left half-queued or half-removed: its
    temp files, and a .msg without its .json that one of them names, or that
    is one of its `spool` files under another name (a hard link: the same
    inode). Other nodes' files stay, unless no temp file of any node names
    an orphan .msg and it is ORPHAN_AGE old: no write takes that long."""
    if not directory.is_dir():
        return 0
    now = time.time() if now is None else now
    ours: list[Path] = []
    named: set[str] = set()  # entry ids our temp files name
    named_by_any: set[str] = set()
    for e in directory.iterdir():
        tmp = _tmp_parts(e.name)
        if tmp is None:
            continue
        if not node or tmp[1] == node or _age(e, now) > ORPHAN_AGE:  # a day old: anyone's
            ours.append(e)
            named.add(tmp[0])
        else:
            named_by_any.add(tmp[0])
    inodes = set()
    for path in [*ours, *spool]:
        with contextlib.suppress(OSError):
            st = path.stat()
            inodes.add((st.st_dev, st.st_ino))
    removed = 0
    for entry in directory.glob("*.msg"):
        if entry.with_suffix(".json").exists():
            continue
        with contextlib.suppress(OSError):
            st = entry.stat()
            mine = not node or entry.stem in named or (st.st_dev, st.st_ino) in inodes
            dead = entry.stem not in named_by_any and now - st.st_mtime > ORPHAN_AGE
            if mine or dead:
                entry.unlink()
                removed += 1
    for entry in ours:
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


ORPHAN_AGE = 86400.0  # seconds


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _tmp_parts(name: str) -> tuple[str, str] | None:
    """(entry id, node) of a temp file's name ("" for a version that named
    no node), or None for another file."""
    if not name.startswith(".") or not name.endswith(".tmp"):
        return None
    parts = name[1:-4].split(".")  # id, [node,] kind
    if parts[-1] not in ("json", "msg", "gone") or len(parts) not in (2, 3):
        return None
    return parts[0], parts[1] if len(parts) == 3 else ""
