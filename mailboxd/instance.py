"""One server per mail directory: the lock a second instance meets.

A second `twistd mailbox` with the same config must not touch what the
first has in flight (its spool files, its queue entries half-written), so
the lock is taken before start-up cleans anything, and held while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import attrs

from .private import FILE, private_dir


class InstanceRunning(Exception):
    """Another process holds the lock; str() says which, in one line."""


@attrs.define
class InstanceLock:
    path: Path
    _fd: int | None = attrs.field(init=False, default=None, repr=False)

    def acquire(self, orphans_grace: float = 10.0) -> None:
        """Take the lock, or raise InstanceRunning naming the process that has it.

        Worker processes share the lock with the process that took it (see
        processes.py), so a server whose primary died holds it until its
        workers have stopped, which they do on their own: that is waited for,
        up to `orphans_grace` seconds.
        """
        private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE)
        deadline = time.monotonic() + orphans_grace
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if (
                    holder.isdigit()
                    and not process_alive(int(holder))
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise InstanceRunning(
                    f"{self.path.parent.parent} is in use by a running server "
                    f"(process {holder or 'unknown'})"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def fileno(self) -> int | None:
        """The locked file, for worker processes to share the lock."""
        return self._fd

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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(mail_dir: Path, node: str) -> Path:
    """One lock a front end: front ends that share the mail directory each
    have their own name (`[state] node`)."""
    return mail_dir / ".state" / f"node-{node}.lock"
