"""The outbound queue on disk: what was accepted for relay, durably.

Layout, one message per id under ``<mail_dir>/.queue/``::

    <id>.msg    the message as received (LF line ends), headers first. Bytes
                before ``offset`` are the local Return-Path line, which a relay
                must not send.
    <id>.json   the envelope, written last (temp file, fsync, rename): its
                presence is what makes the entry exist. Fields:
                  version     1
                  id          the id (also the SMTP "queued as" id)
                  sender      envelope sender; "" for the null sender <>
                  recipients  list of addresses still to deliver to
                  offset      bytes of <id>.msg to skip
                  received    Unix time of acceptance
                  client      the submitting client's IP
                  account     the authenticated account, or null

A runner drains it by reading each ``*.json``, sending ``<id>.msg[offset:]``,
and removing both files (json first) once every recipient is done. A
``.msg`` with no ``.json`` was never acknowledged: remove it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from .maildir import fsync_dir, link_or_copy

QUEUE_DIR = ".queue"


@attrs.frozen
class Envelope:
    id: str
    sender: str
    recipients: tuple[str, ...]
    offset: int
    received: float
    client: str
    account: str | None = None

    def to_json(self) -> str:
        data = attrs.asdict(self)
        data["recipients"] = list(self.recipients)
        return json.dumps({"version": 1, **data}, indent=1)


def queue_dir(mail_dir: Path) -> Path:
    return mail_dir / QUEUE_DIR


def enqueue(directory: Path, spool: Path, envelope: Envelope) -> Path:
    """Put the spooled message and its envelope in the queue, durably.

    Blocking: call it in a thread pool. `spool` must already be fsynced.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    message = directory / f"{envelope.id}.msg"
    link_or_copy(spool, message)
    tmp = directory / f".{envelope.id}.json.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(envelope.to_json())
        f.flush()
        os.fsync(f.fileno())
    final = directory / f"{envelope.id}.json"
    os.rename(tmp, final)
    fsync_dir(directory)
    return final


def remove_unacknowledged(directory: Path) -> int:
    """Remove what a crash left half-queued: a .msg without its .json, temp files."""
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        orphan = entry.suffix == ".msg" and not entry.with_suffix(".json").exists()
        if orphan or entry.name.endswith(".json.tmp"):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


def read_envelope(path: Path) -> Envelope:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("version", None)
    data["recipients"] = tuple(data["recipients"])
    return Envelope(**data)
