"""Reading one file out of an erofs image without mounting it (no root): what customising an erofs
disk session needs (``add_user`` reads the image's ``/etc/passwd``). Uncompressed images only, as dirge
writes them (flat, tail-packed and chunk-based files; compact or extended inodes); symlinks in the path
are followed inside the image. Data is read in pieces of at most 1 MiB; a regular file is read only up to
``fsutil.READ_MAX`` (checked against its size first, so a huge or sparse file is refused, its holes never
filled), a symlink target up to PATH_MAX."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..apply.root import Link, walk_in_root
from ..errors import ImageError
from ..fsutil import PATH_MAX, READ_MAX, over_read_max
from . import erofs_format as fmt

_PIECE = 1 << 20  # a whole number of blocks for any erofs block size


class ErofsReadError(ImageError):
    def __init__(self, image: Path, what: str) -> None:
        super().__init__(f"read erofs image {image}: {what}")


class _Inode:
    __slots__ = ("mode", "size", "layout", "iu", "pos", "body")

    def __init__(self, mode: int, size: int, layout: int, iu: int, pos: int, body: int) -> None:
        self.mode, self.size, self.layout, self.iu, self.pos, self.body = mode, size, layout, iu, pos, body


class ErofsReader:
    def __init__(self, image: Path) -> None:
        self.image = image
        self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sb = fmt.SUPER_BLOCK.unpack(os.pread(self.fd, fmt.SUPER_BLOCK.size, fmt.SUPER_OFFSET))
        except (OSError, ValueError) as exc:
            os.close(self.fd)
            raise ErofsReadError(image, f"no superblock ({exc})") from exc
        magic, blkszbits, root_nid, meta_blkaddr = sb[0], sb[3], sb[5], sb[10]
        if magic != fmt.SUPER_MAGIC:
            os.close(self.fd)
            raise ErofsReadError(image, "not an erofs image")
        self.blksz = 1 << blkszbits
        self.meta = meta_blkaddr * self.blksz
        self.root_nid = root_nid

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "ErofsReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _inode(self, nid: int) -> _Inode:
        pos = self.meta + (nid << fmt.ISLOTBITS)
        raw = os.pread(self.fd, fmt.INODE_EXTENDED.size, pos)
        i_format, icount, mode = int.from_bytes(raw[0:2], "little"), int.from_bytes(raw[2:4], "little"), \
            int.from_bytes(raw[4:6], "little")
        layout = (i_format >> fmt.I_DATALAYOUT_BIT) & 0x7
        if i_format & 1:  # extended: i_size 64-bit at 8, i_u at 16
            isize, size, iu = fmt.INODE_EXTENDED.size, int.from_bytes(raw[8:16], "little"), \
                int.from_bytes(raw[16:20], "little")
        else:  # compact: i_size 32-bit at 8, i_u at 16
            isize, size, iu = fmt.INODE_COMPACT_SIZE, int.from_bytes(raw[8:12], "little"), \
                int.from_bytes(raw[16:20], "little")
        body = pos + isize + (fmt.xattr_ibody_size(icount) if icount else 0)
        return _Inode(mode, size, layout, iu, pos, body)

    def _pread(self, n: int, pos: int) -> bytes:
        data = os.pread(self.fd, n, pos)
        if len(data) != n:
            raise ErofsReadError(self.image, f"truncated: {n} bytes at {pos} read as {len(data)}")
        return data

    def _pieces(self, ino: _Inode) -> Iterator[bytes]:
        """The inode's data in order, in pieces of at most ``_PIECE`` bytes, each a whole number of blocks
        but the last (so a directory's blocks can be taken one by one)."""
        size, blksz = ino.size, self.blksz
        if ino.layout in (fmt.INODE_FLAT_PLAIN, fmt.INODE_FLAT_INLINE):
            full = size if ino.layout == fmt.INODE_FLAT_PLAIN else size - size % blksz
            for off in range(0, full, _PIECE):
                yield self._pread(min(_PIECE, full - off), ino.iu * blksz + off)
            if full < size:
                yield self._pread(size - full, ino.body)
            return
        if ino.layout == fmt.INODE_CHUNK_BASED:
            chunk = blksz << (ino.iu & fmt.CHUNK_FORMAT_BLKBITS_MASK)
            unit = fmt.CHUNK_INDEX.size if ino.iu & fmt.CHUNK_FORMAT_INDEXES else fmt.BLOCK_MAP_ENTRY.size
            start = -(-ino.body // unit) * unit
            for i in range(-(-size // chunk)):
                entry = self._pread(unit, start + i * unit)
                addr = int.from_bytes(entry[-4:], "little")
                length = min(chunk, size - i * chunk)
                for off in range(0, length, _PIECE):
                    n = min(_PIECE, length - off)
                    yield bytes(n) if addr == fmt.NULL_ADDR else self._pread(n, addr * blksz + off)
            return
        raise ErofsReadError(self.image, f"data layout {ino.layout} (compressed?) is not read here")

    def _data(self, ino: _Inode, what: str, limit: int) -> bytes:
        """The whole data of a file or symlink, refused before any read when its size passes ``limit``."""
        if ino.size > limit:
            raise ErofsReadError(self.image, over_read_max(what, ino.size) if limit == READ_MAX
                                 else f"{what}: {ino.size} bytes, more than {limit}")
        return b"".join(self._pieces(ino))

    def _lookup(self, dir_ino: _Inode, name: bytes) -> int | None:
        blksz = self.blksz
        for piece in self._pieces(dir_ino):  # a directory is never held whole
            for base in range(0, len(piece), blksz):
                found = self._lookup_block(piece[base:base + blksz], name)
                if found is not None:
                    return found
        return None

    @staticmethod
    def _lookup_block(block: bytes, name: bytes) -> int | None:
        count = fmt.DIRENT.unpack_from(block, 0)[1] // fmt.DIRENT.size
        for i in range(count):
            nid, nameoff, _ = fmt.DIRENT.unpack_from(block, i * fmt.DIRENT.size)
            end = fmt.DIRENT.unpack_from(block, (i + 1) * fmt.DIRENT.size)[1] if i + 1 < count else len(block)
            if block[nameoff:end].split(b"\0", 1)[0] == name:
                return int(nid)
        return None

    def read_file(self, path: str) -> bytes | None:
        """The content of the regular file at ``path`` (absolute, inside the image), or None if absent."""
        try:
            walked = walk_in_root(self.root_nid, path.encode("utf-8", "surrogateescape").split(b"/"),
                                  lambda nid, name: self._step(nid, name, path))
        except OSError as exc:  # ELOOP
            raise ErofsReadError(self.image, f"{path}: {exc.strerror}") from None
        if walked is None:
            return None
        ino = self._inode(walked[1][-1])
        return self._data(ino, path, READ_MAX) if stat.S_ISREG(ino.mode) else None

    def _step(self, nid: int, name: bytes, path: str) -> int | Link | None:
        """``walk_in_root``'s step through the image: the inode ``name`` names in directory ``nid``."""
        here = self._inode(nid)
        if not stat.S_ISDIR(here.mode):
            return None
        found = self._lookup(here, name)
        if found is None:
            return None
        child = self._inode(found)
        if stat.S_ISLNK(child.mode):
            return Link(self._data(child, f"{path}: a symlink target", PATH_MAX))
        return found


def read_erofs_file(image: Path, path: str) -> bytes | None:
    """``path``'s content in the erofs ``image`` (symlinks followed inside it), or None if absent."""
    with ErofsReader(image) as reader:
        return reader.read_file(path)
