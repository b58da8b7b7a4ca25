"""Reading one file out of an erofs image without mounting it (no root): what customising an erofs
disk session needs (``add_user`` reads the image's ``/etc/passwd``). Uncompressed images only, as dirge
writes them (flat, tail-packed and chunk-based files; compact or extended inodes); symlinks in the path
are followed inside the image."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ImageError
from . import erofs_format as fmt

_MAX_HOPS = 40


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

    def _data(self, ino: _Inode) -> bytes:
        size, blksz = ino.size, self.blksz
        if ino.layout == fmt.INODE_FLAT_PLAIN:
            return os.pread(self.fd, size, ino.iu * blksz) if size else b""
        if ino.layout == fmt.INODE_FLAT_INLINE:
            full = size - size % blksz
            head = os.pread(self.fd, full, ino.iu * blksz) if full else b""
            return head + os.pread(self.fd, size - full, ino.body)
        if ino.layout == fmt.INODE_CHUNK_BASED:
            chunk = blksz << (ino.iu & fmt.CHUNK_FORMAT_BLKBITS_MASK)
            unit = fmt.CHUNK_INDEX.size if ino.iu & fmt.CHUNK_FORMAT_INDEXES else fmt.BLOCK_MAP_ENTRY.size
            start = -(-ino.body // unit) * unit
            out = bytearray()
            for i in range(-(-size // chunk)):
                entry = os.pread(self.fd, unit, start + i * unit)
                addr = int.from_bytes(entry[-4:], "little")
                length = min(chunk, size - i * chunk)
                out += bytes(length) if addr == fmt.NULL_ADDR else os.pread(self.fd, length, addr * blksz)
            return bytes(out)
        raise ErofsReadError(self.image, f"data layout {ino.layout} (compressed?) is not read here")

    def _lookup(self, dir_ino: _Inode, name: bytes) -> int | None:
        data, blksz = self._data(dir_ino), self.blksz
        for base in range(0, len(data), blksz):
            block = data[base:base + blksz]
            count = fmt.DIRENT.unpack_from(block, 0)[1] // fmt.DIRENT.size
            for i in range(count):
                nid, nameoff, _ = fmt.DIRENT.unpack_from(block, i * fmt.DIRENT.size)
                end = fmt.DIRENT.unpack_from(block, (i + 1) * fmt.DIRENT.size)[1] if i + 1 < count else len(block)
                if block[nameoff:end].split(b"\0", 1)[0] == name:
                    return int(nid)
        return None

    def read_file(self, path: str) -> bytes | None:
        """The content of the regular file at ``path`` (absolute, inside the image), or None if absent."""
        pending = [p for p in path.encode("utf-8", "surrogateescape").split(b"/") if p][::-1]
        stack = [self.root_nid]  # the directories from the root down to where we are
        hops = 0
        while pending:
            name = pending.pop()
            if name == b".":
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            here = self._inode(stack[-1])
            if not stat.S_ISDIR(here.mode):
                return None
            nid = self._lookup(here, name)
            if nid is None:
                return None
            child = self._inode(nid)
            if stat.S_ISLNK(child.mode):
                hops += 1
                if hops > _MAX_HOPS:
                    raise ErofsReadError(self.image, f"{path}: too many levels of symbolic links")
                target = self._data(child)
                if target.startswith(b"/"):
                    stack = [self.root_nid]
                pending.extend(p for p in target.split(b"/")[::-1] if p)
                continue
            stack.append(nid)
        ino = self._inode(stack[-1])
        return self._data(ino) if stat.S_ISREG(ino.mode) else None


def read_erofs_file(image: Path, path: str) -> bytes | None:
    """``path``'s content in the erofs ``image`` (symlinks followed inside it), or None if absent."""
    with ErofsReader(image) as reader:
        return reader.read_file(path)
