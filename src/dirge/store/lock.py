"""Cross-process locks on lock files with ``fcntl.flock``: the kernel drops them when a holder dies,
so a crashed or killed run can never block the next one (the seed's stale lock files could)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

from ..errors import LockTimeout, UnsafeCache
from ..waits import checkpoint, waiting

_POLL = 0.05


class FileLock:
    """An exclusive lock (the holder's pid is written into the file for error messages), or with
    ``shared`` one of many readers' locks that keep an exclusive holder out."""

    def __init__(self, path: Path, timeout: float = 600.0, *, shared: bool = False) -> None:
        self.path = path
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never through a symlink (O_NOFOLLOW), never truncated on open (no O_TRUNC: the holder's pid is
        # rewritten through this fd only once it is known to be a regular file); O_NONBLOCK: a FIFO
        # planted there cannot hang the open.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeCache(f"lock file {self.path} is a symlink; dirge never follows one there "
                                  "(remove it if you did not put it there)") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafeCache(f"lock file {self.path} is not a regular file; remove it and retry")
            self._lock(fd)
        except BaseException:
            os.close(fd)  # also drops the lock if it was taken
            raise
        self._fd = fd

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        with ExitStack() as wait:
            announced = False
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                        raise LockTimeout(str(self.path), self.timeout, holder) from None
                    if not announced:  # held by another: announced once (aio lends its slot meanwhile)
                        wait.enter_context(waiting())
                        announced = True
                    checkpoint()  # a cancelled aio call stops waiting here
                    time.sleep(_POLL)
        if not self.shared:  # readers leave the file alone: there may be many of them
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: unlinking a lock file races with waiters that opened the old inode.
            if not self.shared:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
