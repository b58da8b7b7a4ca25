"""The merged image as an in-memory tree, and the ``Sink`` protocol the merge engine writes through.

The merge engine (``apply/layer.py``) applies the OCI layer rules (whiteouts, opaque directories,
replacement, hardlinks, limits) to this tree; every change it makes is also told to a ``Sink``, which
turns it into something durable: a directory (``apply/dirsink.py``), an erofs image
(``fsimage/erofs.py``). An image writer has no directory to ask "what is below me?": the tree answers.

Hardlinks are one ``Node`` under several names (``links`` counts the names). A path handed to a sink
is canonical: every component but the last is a real directory of the tree (symlinks in parents have
been resolved inside the root by the engine), so a sink never follows anything.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Protocol

from ..errors import ImageError

Parts = tuple[bytes, ...]
Chunk = bytes | memoryview

REG = stat.S_IFREG
DIR = stat.S_IFDIR
LNK = stat.S_IFLNK
CHR = stat.S_IFCHR
BLK = stat.S_IFBLK
FIFO = stat.S_IFIFO
SOCK = stat.S_IFSOCK

NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})  # shared: most nodes have none (64 bytes saved each)

# What one node costs in memory with its dict slot (353 bytes an entry measured with tracemalloc on the
# 58k-entry benchmark image, names included; docs/BENCHMARKS.md): counted against
# ``Limits.max_tree_bytes`` together with each name, link target and xattr.
NODE_BYTES = 330


class Node:
    """One inode of the merged image. Directories hold their children; files a sink's ``data`` handle."""

    __slots__ = ("kind", "mode", "uid", "gid", "mtime_ns", "xattrs", "children", "target", "rdev", "size",
                 "data", "links", "touched", "atime_ns")

    def __init__(self, kind: int, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int | None = None) -> None:
        self.kind = kind  # stat.S_IFMT bits: REG, DIR, LNK, CHR, BLK, FIFO, SOCK
        self.mode = mode  # permission bits, setuid/setgid/sticky included (0o7777)
        self.uid = uid
        self.gid = gid
        self.mtime_ns: int | None = mtime_ns  # None: no time (the engine gives implicit parents one)
        self.xattrs: Mapping[str, bytes] = NO_XATTRS  # replaced whole, never changed in place
        self.children: dict[bytes, Node] | None = {} if kind == DIR else None
        self.target = b""  # symlink target, as given
        self.rdev = 0  # devices: os.makedev(major, minor)
        self.size = 0  # regular files: logical size (holes included)
        self.data: object = None  # the sink's handle on a regular file's content
        self.links = 0  # names pointing to this node (hardlinks); directories: 1
        self.touched = -1  # directories: the last layer that wrote something below
        self.atime_ns: int | None = None  # only when the layer gave one (PAX atime); else mtime

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    def __repr__(self) -> str:
        return f"Node({stat.filemode(self.kind | self.mode)}, {self.uid}:{self.gid}, links={self.links})"


class FileData:
    """A regular file's content as the engine hands it to a sink, whatever the archive format: ``size``
    bytes stored, in ``chunks`` (iterated once, in order); for a sparse file, ``sparse`` lists the data
    regions ``(offset, length)`` the stored bytes fill back to back (checked by the engine against
    ``size`` and the node's logical size), and ``placed()`` yields them at their offsets."""

    __slots__ = ("size", "sparse", "chunks")

    def __init__(self, size: int, chunks: Iterable[Chunk], sparse: list[tuple[int, int]] | None = None) -> None:
        self.size = size
        self.chunks = chunks
        self.sparse = sparse

    def placed(self) -> Iterator[tuple[int, memoryview]]:
        """The stored data at its logical offsets: ``(offset, piece)``, each piece inside one region of
        ``sparse`` (one walk of the map per file). The data must fill the map exactly."""
        pieces = iter(self.chunks)
        piece = memoryview(b"")
        for off, length in self.sparse or ():
            while length:
                if not piece:
                    chunk = next(pieces, None)
                    if chunk is None:
                        raise ImageError("sparse file data ends before its map does")
                    piece = memoryview(chunk).cast("B")
                    continue
                take = min(length, len(piece))
                yield off, piece[:take]
                piece, off, length = piece[take:], off + take, length - take
        if piece or any(len(rest) for rest in pieces):
            raise ImageError("sparse file data goes on past its map")


def walk(root: Node, parts: Parts = ()) -> "list[tuple[Parts, Node]]":
    """Every (path, node) below ``root``, parents before children, names in byte order; iterative."""
    out: list[tuple[Parts, Node]] = [(parts, root)]
    stack = [(parts, root)]
    while stack:
        here, node = stack.pop()
        assert node.children is not None
        for name in sorted(node.children, reverse=True):
            child = node.children[name]
            out.append((here + (name,), child))
            if child.children is not None:
                stack.append((here + (name,), child))
    return out


class Sink(Protocol):
    """Where the merge engine's decisions land. Calls come in entry order; ``parent`` is the node of
    ``parts[:-1]`` (already in the tree); ``node`` is already filled in (metadata) when a call is made."""

    def remove(self, parts: Parts, node: Node) -> None:
        """Remove what is at ``parts`` (a directory: with everything below it)."""

    def release(self, node: Node) -> None:
        """A regular file lost its last name: its data is dead (an image writer may reclaim it)."""

    def file(self, parts: Parts, parent: Node, node: Node, data: FileData) -> None:
        """Create a regular file and write its ``data`` (sparse: ``data.sparse``, already checked by the
        engine against the stored size and ``node.size``, placed by ``data.placed()``). The sink may set
        ``node.data``; ``node.size`` is the logical size."""

    def directory(self, parts: Parts, parent: Node | None, node: Node, *, existing: bool) -> None:
        """Create a directory, or (``existing``) replace the metadata of the one there. ``parts == ()``
        is the root itself (``parent`` None)."""

    def symlink(self, parts: Parts, parent: Node, node: Node) -> None: ...

    def hardlink(self, parts: Parts, target: Parts, node: Node) -> None:
        """A new name ``parts`` for the existing node at ``target`` (never a directory)."""

    def special(self, parts: Parts, parent: Node, node: Node) -> bool:
        """A FIFO, socket or device node; False if it could not be made (rootless): the path stays empty."""

    def finish(self, root: Node) -> None:
        """After the last layer: directory metadata, image metadata. The tree is final."""

    def close(self) -> None:
        """Release resources; after a failure too."""
