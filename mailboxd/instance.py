"""One server per mail directory: the lock a second instance meets.

A second `twistd mailbox` with the same config must not touch what the
first has in flight (its spool files, its queue entries half-written), so
the lock is taken before start-up cleans anything, and held while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import attrs

from .private import FILE, private_dir


class InstanceRunning(Exception):
    """Another process holds the lock; str() says which, in one line."""


@attrs.define
class InstanceLock:
    path: Path
    _fd: int | None = attrs.field(init=False, default=None, repr=False)

    def acquire(self) -> None:
        """Take the lock, or raise InstanceRunning naming the process that has it."""
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise InstanceRunning(
                f"{self.path.parent.parent} is in use by a running server (process {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    # As a part the service starts and stops (service.Running).
    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.release()


def lock_path(mail_dir: Path) -> Path:
    return mail_dir / ".state" / "instance.lock"
