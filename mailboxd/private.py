"""Folders and files only the server's own user may use, whatever the umask.

`Path.mkdir(parents=True, mode=0o700)` gives that mode to the last folder
only, the others get 0o777 less the umask: under umask 000 another local
user could swap a Maildir's `new/` and plant a message POP3 then serves.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FOLDER = 0o700
FILE = 0o600


def private_dir(path: Path) -> None:
    """Make `path` and any missing parents, each mode 0700; leave existing ones be."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another thread
            os.mkdir(folder, FOLDER)
            os.chmod(folder, FOLDER)  # the umask may have taken bits from it


def create_private(path: Path, exclusive: bool = True) -> int:
    """Open a new file `path` for writing, mode 0600; its descriptor."""
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, FILE)
    if not exclusive:  # an old file keeps its mode; a new one has 0600 less the umask
        os.fchmod(fd, FILE)
    return fd


def write_all(fd: int, data: bytes) -> None:
    """Write `data` to the descriptor `fd`: no file object, and none of the
    calls to stat, seek and ioctl that making one costs."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
