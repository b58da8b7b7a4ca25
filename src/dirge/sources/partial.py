"""A blob being downloaded into the cache, readable while it grows.

The download thread appends to a temp file beside the blob's final path and publishes it (rename) only
after its size and digest match. Readers follow the writer with ``pread``: the applier can start on a
layer as soon as its first bytes arrive instead of after the whole blob. A reader gets exactly the bytes
the writer got, and the layer pipeline verifies them itself, so nothing unverified reaches the cache or a
published rootfs.

Restarts from byte 0: a server without Range support sends the same content-addressed bytes again, so
readers keep their place. After wrong bytes (a bad mirror, before falling back to the origin) the blob
starts a new *generation*: a reader that already consumed bytes of the old one raises ``StreamRestarted``
and the caller applies the image again from scratch (``flatten.apply_image``).

Each temp file is ``flock``-ed by its download, so ``sweep_orphans`` can tell the ones left by a killed
process (lock free) from live downloads of other processes sharing the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import DirgeError, IntegrityError
from ..fsutil import is_no_space, no_space
from ..oci.image import Descriptor

TMP_PREFIX = ".tmp-"


class StreamRestarted(IntegrityError):
    """A blob being read while it downloads was restarted after wrong bytes: read it again from the start."""

    def __init__(self, what: str) -> None:
        DirgeError.__init__(self, f"{what}: a source sent wrong bytes while the layer was being applied")


def clone_error(error: BaseException, what: str) -> DirgeError:
    """A fresh exception per raising thread (messages get context prepended in place), same class."""
    if isinstance(error, DirgeError):
        copy = type(error).__new__(type(error))
        copy.args = error.args
        copy.__dict__.update(error.__dict__)
        return copy
    return DirgeError(f"{what}: download failed ({error})")


class PartialBlob:
    """The temp file of one download; ``append``/``restart``/``publish``/``fail`` from the writer thread."""

    def __init__(self, final: Path, desc: Descriptor, what: str) -> None:
        self.final = final
        self.desc = desc
        self.what = what
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=f"{TMP_PREFIX}{desc.digest.hex[:16]}-")
        except OSError as exc:
            raise self._cache_error(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file: cannot be held by anyone else
        except OSError as exc:  # e.g. ENOLCK on a network filesystem
            os.close(fd)
            Path(name).unlink(missing_ok=True)
            raise self._cache_error(exc) from exc
        self._fd = fd  # O_RDWR: readers pread from duplicates of it, also after the rename
        self._tmp = Path(name)
        self._hash = hashlib.new(desc.digest.algorithm)
        self._cond = threading.Condition()
        self.written = 0
        self.generation = 0
        self._done = False
        self._error: BaseException | None = None
        self.abandoned = threading.Event()
        self._interrupt: Callable[[], None] | None = None

    # -- writer side ------------------------------------------------------------------------------

    def on_abandon(self, interrupt: Callable[[], None] | None) -> None:
        """What ``abandon`` calls to unblock the writer (e.g. shut the socket it is reading)."""
        self._interrupt = interrupt
        if self.abandoned.is_set():
            self._call_interrupt()

    def abandon(self) -> None:
        """Stop the download soon: the writer's next chunk, sleep or blocking read fails."""
        self.abandoned.set()
        self._call_interrupt()

    def _call_interrupt(self) -> None:
        interrupt = self._interrupt
        if interrupt is not None:
            try:
                interrupt()
            except OSError:  # the socket is already closed: nothing left to unblock
                pass

    def check_abandoned(self) -> None:
        if self.abandoned.is_set():
            raise DirgeError(f"{self.what}: download abandoned")

    def append(self, chunk: bytes) -> None:
        self.check_abandoned()
        if self.written + len(chunk) > self.desc.size:
            raise IntegrityError(f"size of {self.what}", f"{self.desc.size} bytes", f"more than {self.desc.size} bytes")
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.pwrite(self._fd, view, self.written + len(chunk) - len(view)):]
        except OSError as exc:
            raise self._cache_error(exc) from exc
        self._hash.update(chunk)
        with self._cond:
            self.written += len(chunk)
            self._cond.notify_all()

    def restart(self, *, wrong_bytes: bool) -> None:
        with self._cond:
            os.ftruncate(self._fd, 0)
            self._hash = hashlib.new(self.desc.digest.algorithm)
            self.written = 0
            if wrong_bytes:
                self.generation += 1
                self._cond.notify_all()

    def verify(self) -> None:
        if self.written != self.desc.size:
            raise IntegrityError(f"size of {self.what}", f"{self.desc.size} bytes", f"{self.written} bytes")
        actual = f"{self.desc.digest.algorithm}:{self._hash.hexdigest()}"
        if actual != str(self.desc.digest):
            raise IntegrityError(f"digest of {self.what}", str(self.desc.digest), actual)

    def publish(self) -> Path:
        """Check size and digest, make it durable, rename it into place; readers keep reading."""
        self.verify()
        try:
            os.fsync(self._fd)
            os.replace(self._tmp, self.final)
        except OSError as exc:
            raise self._cache_error(exc) from exc
        with self._cond:
            self._done = True
            self._cond.notify_all()
        self._close()
        return self.final

    def fail(self, error: BaseException) -> None:
        """End the download with ``error`` (readers raise it); the temp file goes. Idempotent."""
        with self._cond:
            if self._done or self._error is not None:
                return
            self._error = error
            self._cond.notify_all()
        self._tmp.unlink(missing_ok=True)
        self._close()

    def _cache_error(self, exc: OSError) -> DirgeError:
        if is_no_space(exc):  # name the blobs directory, not the temp file (it is gone by then)
            return no_space(exc, f"{self.what}: write blob to {self.final.parent}")
        return DirgeError(f"{self.what}: write {exc.filename or getattr(self, '_tmp', self.final)}: "
                          f"{exc.strerror or exc}; free space or fix permissions under {self.final.parent}")

    def _close(self) -> None:
        with self._cond:  # readers dup the fd under this lock: never close it under them
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    # -- reader side ------------------------------------------------------------------------------

    def reader(self) -> "BinaryIO | PartialReader":
        with self._cond:
            if self._error is not None:
                raise clone_error(self._error, self.what)
            if self._done:
                return open(self.final, "rb")
            return PartialReader(self, os.dup(self._fd), self.generation)

    def _wait(self, reader: "PartialReader") -> int:
        """Block until bytes past the reader's position exist (returns how many) or the download ended (0)."""
        position = reader.position
        with self._cond:
            while True:
                if reader.interrupted:
                    raise DirgeError(f"{self.what}: reading stopped")
                if self._error is not None:
                    raise clone_error(self._error, self.what)
                if self.generation != reader.generation:
                    if position:
                        raise StreamRestarted(self.what)
                    reader.generation = self.generation
                if self.written > position or self._done:
                    return max(0, self.written - position)
                self._cond.wait()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class PartialReader:
    """A file-like reader of a ``PartialBlob`` that blocks for bytes not yet downloaded."""

    def __init__(self, blob: PartialBlob, fd: int, generation: int) -> None:
        self._blob = blob
        self._fd = fd
        self.position = 0
        self.generation = generation
        self.interrupted = False

    def read(self, n: int = -1) -> bytes:
        while True:
            available = self._blob._wait(self)
            if not available:
                return b""
            data = os.pread(self._fd, available if n < 0 else min(n, available), self.position)
            if data:  # empty only if a restart truncated the file under us: wait for the rewrite
                self.position += len(data)
                return data

    def readable(self) -> bool:
        return True

    def interrupt(self) -> None:
        """Make a ``read`` blocked in another thread (or the next one) raise: the consumer is gone."""
        self.interrupted = True
        self._blob._wake()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PartialReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sweep_orphans(directory: Path, min_age: float = 300.0) -> None:
    """Remove temp files whose download died with its process (flock free, untouched for ``min_age`` s:
    a file just made by ``mkstemp`` is not locked yet)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
    except OSError:  # best effort: no directory yet, or one we cannot read
        return
    now = time.time()
    for name in names:
        try:
            fd = os.open(directory / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < min_age:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live download (or no flock here: then keep it, we cannot tell)
        finally:
            os.close(fd)
        try:
            (directory / name).unlink(missing_ok=True)
        except OSError:
            pass
