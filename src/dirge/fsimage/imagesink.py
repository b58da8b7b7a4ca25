"""What the image writers (erofs, ext4) share: a Sink whose tree is the directory (only file data and
``finish`` do I/O), the skip-recording protocol, and positioned-write helpers."""

from __future__ import annotations

import ctypes
import os
from typing import Protocol

from ..apply.tree import Node, Parts

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2


class Skips(Protocol):
    """Where skipped xattrs are recorded (``apply.fs.Report`` is one)."""

    def skip(self, path: bytes, why: str) -> None: ...


class TreeImageSink:
    """The Sink calls an image writer ignores: the engine's tree already holds directories, links and
    special files, written out whole at ``finish``."""

    def remove(self, parts: Parts, node: Node) -> None:
        pass  # the tree is the directory: nothing to undo here

    def directory(self, parts: Parts, parent: Node | None, node: Node, *, existing: bool) -> None:
        pass

    def symlink(self, parts: Parts, parent: Node, node: Node) -> None:
        pass

    def hardlink(self, parts: Parts, target: Parts, node: Node) -> None:
        pass

    def special(self, parts: Parts, parent: Node, node: Node) -> bool:
        return True  # devices, FIFOs and sockets are inodes like any other here


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a byte range (it then reads as zeros); False where unsupported."""
    return bool(length) and _fallocate is not None and \
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def show(parts: Parts) -> str:
    return "/" + b"/".join(parts).decode("utf-8", "replace")


def text(path: bytes) -> str:
    return path.decode("utf-8", "replace")
