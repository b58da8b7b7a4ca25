"""A blob being downloaded into the cache, readable while it grows.

The download thread appends to a temp file beside the blob's final path and publishes it (rename) only
after its size and digest match. Readers follow the writer with ``pread``: the applier can start on a
layer as soon as its first bytes arrive instead of after the whole blob. A reader gets exactly the bytes
the writer got, and the layer pipeline verifies them itself, so nothing unverified reaches the cache or a
published rootfs. A restart from byte 0 (a server without Range, a mirror falling back to the origin)
rewrites the same content-addressed bytes, so a reader's position stays valid; different bytes fail the
reader's own digest check.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from ..errors import DirgeError, IntegrityError
from ..image import Descriptor


class PartialBlob:
    """The temp file of one download; ``append``/``restart``/``publish``/``fail`` from the writer thread."""

    def __init__(self, final: Path, desc: Descriptor, what: str) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.desc = desc
        self.what = what
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{desc.digest.hex[:16]}-")
        self._fd = fd  # O_RDWR: readers pread from duplicates of it, also after the rename
        self._tmp = Path(name)
        self._hash = hashlib.new(desc.digest.algorithm)
        self._cond = threading.Condition()
        self.written = 0
        self._done = False
        self._error: BaseException | None = None
        self._abandoned = False

    def abandon(self) -> None:
        """Ask the writer to stop at its next chunk (the source is closing)."""
        self._abandoned = True

    def append(self, chunk: bytes) -> None:
        if self._abandoned:
            raise DirgeError(f"{self.what}: download abandoned")
        if self.written + len(chunk) > self.desc.size:
            raise IntegrityError(f"size of {self.what}", f"{self.desc.size} bytes", f"more than {self.desc.size} bytes")
        view = memoryview(chunk)
        while view:
            view = view[os.pwrite(self._fd, view, self.written + len(chunk) - len(view)):]
        self._hash.update(chunk)
        with self._cond:
            self.written += len(chunk)
            self._cond.notify_all()

    def restart(self) -> None:
        with self._cond:
            os.ftruncate(self._fd, 0)
            self._hash = hashlib.new(self.desc.digest.algorithm)
            self.written = 0

    def verify(self) -> None:
        if self.written != self.desc.size:
            raise IntegrityError(f"size of {self.what}", f"{self.desc.size} bytes", f"{self.written} bytes")
        actual = f"{self.desc.digest.algorithm}:{self._hash.hexdigest()}"
        if actual != str(self.desc.digest):
            raise IntegrityError(f"digest of {self.what}", str(self.desc.digest), actual)

    def publish(self) -> Path:
        """Check size and digest, make it durable, rename it into place; readers keep reading."""
        self.verify()
        os.fsync(self._fd)
        os.replace(self._tmp, self.final)
        with self._cond:
            self._done = True
            self._cond.notify_all()
        os.close(self._fd)
        return self.final

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()
        self._tmp.unlink(missing_ok=True)
        os.close(self._fd)

    def reader(self) -> "BinaryIO | PartialReader":
        with self._cond:  # the writer closes its fd only after marking the end under this lock
            if self._error is not None:
                raise self._error
            if self._done:
                return open(self.final, "rb")
            return PartialReader(self, os.dup(self._fd))

    def _wait(self, position: int) -> int:
        """Block until bytes past ``position`` exist (returns how many) or the download ended (0)."""
        with self._cond:
            while self.written <= position and not self._done and self._error is None:
                self._cond.wait()
            if self._error is not None:
                if isinstance(self._error, DirgeError):
                    raise self._error
                raise DirgeError(f"{self.what}: download failed ({self._error})")
            return max(0, self.written - position)


class PartialReader:
    """A file-like reader of a ``PartialBlob`` that blocks for bytes not yet downloaded."""

    def __init__(self, blob: PartialBlob, fd: int) -> None:
        self._blob = blob
        self._fd = fd
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        while True:
            available = self._blob._wait(self._pos)
            if not available:
                return b""
            data = os.pread(self._fd, available if n < 0 else min(n, available), self._pos)
            if data:  # empty only if a restart truncated the file under us: wait for the rewrite
                self._pos += len(data)
                return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PartialReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
