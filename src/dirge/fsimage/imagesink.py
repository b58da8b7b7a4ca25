"""What the image writers (erofs, ext4) share: a Sink whose tree is the directory (only file data and
``finish`` do I/O), the skip-recording protocol, positioned-write helpers, and the inode numbering
of the final tree."""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Callable
from typing import Protocol

from ..apply.tree import REG, Node, Parts
from ..fsutil import pwrite_all

__all__ = ["Inodes", "Skips", "TreeImageSink", "pwrite_all", "punch", "show", "split_xattr_name", "text"]

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


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of a byte range (it then reads as zeros); False where unsupported."""
    return bool(length) and _fallocate is not None and \
        _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def show(parts: Parts) -> str:
    return "/" + b"/".join(parts).decode("utf-8", "replace")


def text(path: bytes) -> str:
    return path.decode("utf-8", "replace")


class Inodes:
    """The final tree numbered for an image writer: parents first, names in byte order, one number per
    ``Node`` (hardlinks share it); link counts, parents, each directory's sorted names, and which data
    handles (``node.data`` ints) the tree still reaches (``live``)."""

    def __init__(self, root: Node, *, name_len: int, released: bytearray, error: Callable[[str], Exception],
                 link_max: int = 0xFFFFFFFF) -> None:
        if root.children is None:
            raise error("the root is not a directory")
        self.nodes: list[Node] = [root]
        self.index: dict[Node, int] = {root: 0}
        self.nlink = array("I", [2])
        self.parent = array("q", [0])
        self.names: dict[int, list[bytes]] = {}  # directories: their names, sorted
        self.paths: dict[int, bytes] = {0: b"/"}  # directories' paths, for reports and errors
        self.live = bytearray(len(released))
        nodes, index, nlink, parent = self.nodes, self.index, self.nlink, self.parent
        stack = [0]
        while stack:  # iterative: a hostile tree can be deep
            p = stack.pop()
            children = nodes[p].children
            assert children is not None
            names = sorted(children)
            subdirs: list[int] = []
            if names:  # the names checked together (C loops); the bad one named only if there is one
                joined = b"".join(names)
                if (not names[0] or b"/" in joined or b"\0" in joined or b"." in children or b".." in children
                        or max(map(len, names)) > name_len):
                    bad = next(n for n in names if not n or len(n) > name_len or b"/" in n or b"\0" in n
                               or n in (b".", b".."))
                    raise error(f"{text(self.paths[p])}: name {bad[:40]!r} cannot be a directory entry")
            for name in names:
                child = children[name]
                c = index.get(child)
                if c is None:
                    c = len(nodes)
                    nodes.append(child)
                    index[child] = c
                    nlink.append(1)
                    parent.append(p)
                    if child.children is not None:
                        subdirs.append(c)
                        self.paths[c] = self.paths[p].rstrip(b"/") + b"/" + name
                    elif child.kind == REG and isinstance(child.data, int):
                        if released[child.data]:
                            raise error(f"{text(self.paths[p])}/{text(name)}: data released but still in the tree")
                        self.live[child.data] = 1
                elif child.children is not None:
                    raise error(f"directory {text(name)} appears twice in the tree")
                else:
                    nlink[c] += 1
                    if nlink[c] > link_max:
                        raise error(f"{text(self.paths[p])}/{text(name)}: more than {link_max} hardlinks")
            nlink[p] = 2 + len(subdirs)
            self.names[p] = names
            stack.extend(reversed(subdirs))

    def path(self, i: int) -> bytes:
        """The path of inode ``i`` (a non-directory: by one of its names)."""
        if i in self.paths:
            return self.paths[i]
        children = self.nodes[self.parent[i]].children
        assert children is not None
        node = self.nodes[i]
        name = next(n for n, c in children.items() if c is node)
        return self.paths[self.parent[i]].rstrip(b"/") + b"/" + name


# The kernel's xattr name indexes, shared by ext4 and erofs (fs/ext4/xattr.h, fs/erofs/erofs_fs.h).
XATTR_ACLS = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}
_XATTR_NAMESPACES = (("user.", 1), ("trusted.", 4), ("security.", 6))


def split_xattr_name(name: str, fs: str) -> tuple[int, bytes] | str:
    """The (name index, name suffix) an ext4 or erofs image stores for xattr ``name``, or why it cannot."""
    index = XATTR_ACLS.get(name)
    if index is not None:
        return index, b""
    for prefix, index in _XATTR_NAMESPACES:
        if name.startswith(prefix):
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            return (index, suffix) if suffix else "empty name after the namespace prefix"
    return f"namespace not representable in {fs} (user., trusted., security., POSIX ACLs only)"
