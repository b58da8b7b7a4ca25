"""Building layer tars in memory, for the demo image and test fixtures (never for untrusted input)."""

from __future__ import annotations

import io
import tarfile
from typing import Any

DEFAULT_MTIME = 1_700_000_000


class LayerBuilder:
    """Entries in the order added; PAX format so xattrs, long names and large ids all fit."""

    def __init__(self, fmt: int = tarfile.PAX_FORMAT) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape")

    def _info(self, name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: float,
              xattrs: dict[str, bytes] | None) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.mtime = mtime
        if xattrs:
            # Binary values survive as surrogate-escaped text (tarfile then marks hdrcharset=BINARY).
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
        return info

    def add(self, info: tarfile.TarInfo, data: bytes = b"") -> "LayerBuilder":
        info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else info.size
        self._tar.addfile(info, io.BytesIO(data) if data else None)
        return self

    def dir(self, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = DEFAULT_MTIME,
            xattrs: dict[str, bytes] | None = None) -> "LayerBuilder":
        return self.add(self._info(name, tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs))

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: float = DEFAULT_MTIME, xattrs: dict[str, bytes] | None = None) -> "LayerBuilder":
        return self.add(self._info(name, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs), data)

    def symlink(self, name: str, target: str, uid: int = 0, gid: int = 0,
                mtime: float = DEFAULT_MTIME) -> "LayerBuilder":
        info = self._info(name, tarfile.SYMTYPE, 0o777, uid, gid, mtime, None)
        info.linkname = target
        return self.add(info)

    def hardlink(self, name: str, target: str) -> "LayerBuilder":
        info = self._info(name, tarfile.LNKTYPE, 0o644, 0, 0, DEFAULT_MTIME, None)
        info.linkname = target
        return self.add(info)

    def fifo(self, name: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> "LayerBuilder":
        return self.add(self._info(name, tarfile.FIFOTYPE, mode, uid, gid, DEFAULT_MTIME, None))

    def device(self, name: str, major: int, minor: int, *, block: bool = False, mode: int = 0o666) -> "LayerBuilder":
        info = self._info(name, tarfile.BLKTYPE if block else tarfile.CHRTYPE, mode, 0, 0, DEFAULT_MTIME, None)
        info.devmajor, info.devminor = major, minor
        return self.add(info)

    def whiteout(self, path: str) -> "LayerBuilder":
        head, _, name = path.rstrip("/").rpartition("/")
        return self.file(f"{head}/.wh.{name}" if head else f".wh.{name}", mode=0o600)

    def opaque(self, directory: str) -> "LayerBuilder":
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq", mode=0o600)

    def build(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()


def tree(entries: list[tuple[str, Any]]) -> bytes:
    """Shorthand used by tests: ``[("dir", "etc"), ("file", "etc/x", b"data"), ...]``."""
    b = LayerBuilder()
    for kind, *args in entries:
        getattr(b, kind)(*args)
    return b.build()
