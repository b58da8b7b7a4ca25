"""The OCI merge engine: layer tar streams, in order, onto an in-memory tree and through a ``Sink``.

Every entry goes through the same sequence (umoci's ``UnpackEntry``, decided on the tree, not on disk):

1. check the limits (the name was cleaned as if rooted at ``/`` by the parser: ``..`` cannot climb out);
2. whiteouts: ``.wh.NAME`` hides NAME, ``.wh..wh..opq`` hides the directory's lower content; both spare
   what this same layer wrote, before or after them, and never appear in the result (a directory this
   layer declared or wrote below stays, emptied of what lower layers put in it);
3. resolve the parent in the tree, symlinks followed as if the root were ``/`` (``RESOLVE_IN_ROOT``'s
   rule; a dangling symlinked parent is followed and its target created), so the sink gets a canonical
   path whose parents are all real directories;
4. replace: what is there goes unless both are directories (a new directory entry then only replaces
   the metadata); a hardlink target is resolved the same way and must exist and not be a directory;
5. tell the sink (``apply/tree.py``), which writes data and metadata in the order that keeps them;
6. remember the path as written by this layer, for later whiteouts of the same layer.

Sinks never decide anything: the directory sink, the erofs writer and any later one see the same
decisions, so they give the same tree.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ..errors import DirgeError, LimitExceeded, UnpackError, UnsafeLayer
from ..fsutil import NAME_MAX, PATH_MAX
from .fs import Report
from .root import Link, NotADirectory, clean_path, walk_in_root
from .root import show_path as _display
from .tar import (BLK, CHR, DIR, FIFO, LINK, MAX_GLOBAL_RECORDS, MAX_HEADER_BYTES, MAX_SPARSE_REGIONS, REG, SYMLINK,
                  UNSET_ID, Entry, EntryStream)
from .tree import NO_XATTRS, NODE_BYTES, FileData, Node, Parts, Sink
from . import tree

OPAQUE = b".wh..wh..opq"
WHITEOUT_PREFIX = b".wh."
_AUFS_META_PREFIX = b".wh..wh."
_KINDS = {REG: tree.REG, DIR: tree.DIR, SYMLINK: tree.LNK, FIFO: tree.FIFO, CHR: tree.CHR, BLK: tree.BLK}
# Times whose seconds fit a 64-bit time_t (else a directory's utime in Sink.finish() overflows; found by
# tests/test_fuzz.py): ns // 10**9 in [-2**63, 2**63), as bounds on ns.
_NS_MIN, _NS_END = -(1 << 63) * 1_000_000_000, (1 << 63) * 1_000_000_000


@dataclass(frozen=True)
class Limits:
    """Bounds over a whole unpack, so a decompression bomb or a pathological tar stops early.

    ``max_tree_bytes`` bounds the merge engine's in-memory tree (an estimate: ``tree.NODE_BYTES`` per
    node plus names, link targets and xattrs; 2 GiB is about 6 million entries), so a huge entry count
    stops with an error, not an OOM. The tar parser's own bounds: ``max_header_bytes`` for a member's
    extended headers together (PAX, GNU long names, a Solaris ACL; each global PAX header alone),
    ``max_sparse_regions`` for one sparse map, ``max_global_records`` for the global PAX records in force.
    ``max_layer_bytes`` bounds one layer's decompressed stream, every byte of it (data of any entry type,
    records the parser skips, what follows the end-of-archive marker): it is counted where decompression
    happens (``blob.LayerStream``)."""

    max_total_bytes: int = 64 << 30
    max_entries: int = 4_000_000
    max_depth: int = 256
    max_file_bytes: int = 16 << 30
    max_tree_bytes: int = 2 << 30
    max_header_bytes: int = MAX_HEADER_BYTES
    max_sparse_regions: int = MAX_SPARSE_REGIONS
    max_global_records: int = MAX_GLOBAL_RECORDS
    max_layer_bytes: int = 64 << 30

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_entries", "max_depth", "max_file_bytes", "max_tree_bytes",
                     "max_header_bytes", "max_sparse_regions", "max_global_records", "max_layer_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limit {name} must be positive")


def _cost(name: bytes, node: Node) -> int:
    cost = NODE_BYTES + len(name) + len(node.target)
    if node.xattrs:
        cost += sum(len(k) + len(v) for k, v in node.xattrs.items())
    return cost


class Applier:
    """Applies layers to the tree and through ``sink``; ``finish()`` hands the sink the final tree."""

    def __init__(self, sink: Sink, report: Report, limits: Limits = Limits(), *, implicit_mtime_ns: int = 0) -> None:
        """``implicit_mtime_ns``: the mtime of directories no entry names (implicit parents, and the root
        unless a layer names it), the same in every sink: the image's build time (``image_identity``)."""
        self.sink = sink
        self.report = report
        self.limits = limits
        self._implicit_mtime_ns = implicit_mtime_ns
        self.root = Node(tree.DIR, 0o755, mtime_ns=implicit_mtime_ns)
        self.root.links = 1
        self._layer = -1
        self._written: set[Parts] = set()  # canonical paths this layer wrote (whiteouts spare them)
        self._tree_bytes = 0
        # The last parent resolved with create (tar entries come directory by directory); dropped
        # whenever a directory or symlink leaves the tree, the only changes that can make it wrong.
        self._last: tuple[Parts, Parts, list[Node], int] | None = None

    def close(self) -> None:
        self.sink.close()

    def apply_layer(self, stream: EntryStream) -> None:
        """Apply one layer's entries (``tar.tokens`` of the uncompressed stream)."""
        self._layer += 1
        self._written = set()
        for entry in stream:
            try:
                self._apply_entry(stream, entry)
            except DirgeError:  # a decision already made (the engine's, a sink's, the host's): keep its class
                raise
            except OSError as exc:
                raise UnpackError(f"write {_name(entry)}: {exc.strerror or exc}") from exc
            except (ValueError, OverflowError) as exc:  # values the kernel interfaces refuse for this entry
                raise UnsafeLayer(_name(entry), str(exc)) from exc
        self.report.layers += 1

    def finish(self) -> Node:
        """After every layer: the sink fixes directory metadata (children change a directory's mtime)
        or writes its image. Returns the final tree."""
        self.sink.finish(self.root)
        return self.root

    # -- entries -----------------------------------------------------------------------------

    def _apply_entry(self, stream: EntryStream, entry: Entry) -> None:
        # The limits first (inline: this runs once per entry, on the critical path).
        report, limits = self.report, self.limits
        parts = entry.parts
        kind = entry.type
        report.entries += 1
        if report.entries > limits.max_entries:
            raise LimitExceeded("max_entries", report.entries, limits.max_entries)
        if len(parts) > limits.max_depth:
            raise LimitExceeded("max_depth", len(parts), limits.max_depth)
        if kind == REG:
            size = entry.file_size
            if size > limits.max_file_bytes:
                raise LimitExceeded("max_file_bytes", size, limits.max_file_bytes)
            report.bytes += size
            if report.bytes > limits.max_total_bytes:
                raise LimitExceeded("max_total_bytes", report.bytes, limits.max_total_bytes)
        if entry.notes:
            for note in entry.notes:  # what the parser had to leave out (an unusable ACL, say)
                report.skip(b"/".join(parts), note)
        if not parts:
            if kind != DIR:
                raise UnsafeLayer(entry.name.decode("utf-8", "replace"), "would replace the root directory")
            self._set_metadata(self.root, entry)
            self.sink.directory((), None, self.root, existing=True)
            return
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
            return
        last = self._last
        if last is not None and last[0] == parts[:-1]:
            dir_parts, chain, dir_len = last[1], last[2], last[3]
        else:
            resolved = self._resolve_dir(parts[:-1], create=True)
            assert resolved is not None
            dir_parts, chain = resolved
            dir_len = len(b"/".join(dir_parts))
            self._last = (parts[:-1], dir_parts, chain, dir_len)
        if dir_len + 1 + len(name) >= PATH_MAX:  # what the kernel refuses, refused for every sink alike
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        parent = chain[-1]
        where = dir_parts + (name,)
        if kind == LINK:
            self._hardlink(entry, where, parent)
        elif kind == DIR:
            self._directory(entry, where, parent)
        else:
            new = self._new_node(entry)
            assert parent.children is not None
            old = parent.children.get(name)
            if old is not None:
                self._unlink(where, parent, old)
            if kind == REG:
                self._insert(parent, name, new)
                inline = entry.inline  # small files' data came inside the entry: no generator
                self.sink.file(where, parent, new, FileData(entry.size, stream.data(entry) if inline is None else inline,
                                                            entry.sparse))
            elif kind == SYMLINK:
                self._insert(parent, name, new)
                self.sink.symlink(where, parent, new)
            elif self.sink.special(where, parent, new):  # FIFO, CHR, BLK
                self._insert(parent, name, new)
            else:
                return  # skipped by the sink (rootless): the path stays empty
        self._written.add(where)
        layer = self._layer
        if parent.touched != layer:  # (most entries: the parent is marked already)
            for node in reversed(chain):  # mark the ancestors touched, for same-layer whiteouts
                if node.touched == layer:
                    break
                node.touched = layer

    def _new_node(self, entry: Entry) -> Node:
        uid, gid, mtime = entry.uid, entry.gid, entry.mtime_ns
        if 0 <= uid < UNSET_ID and 0 <= gid < UNSET_ID and _NS_MIN <= mtime < _NS_END and entry.atime_ns is None:
            # The common case, in one constructor call: what _set_metadata checks and sets, all in range.
            node = Node(_KINDS[entry.type], entry.mode & 0o7777, uid, gid, mtime)
            node.xattrs = entry.xattrs or NO_XATTRS
        else:
            node = Node(_KINDS[entry.type])
            self._set_metadata(node, entry)
        if entry.type == REG:
            node.size = entry.file_size
            if entry.sparse is not None:
                regions = entry.sparse
                if sum(length for _, length in regions) != entry.size or any(
                    off < 0 or length < 0 or off + length > node.size for off, length in regions
                ):
                    raise UnsafeLayer(_display(entry.parts), "sparse map does not match the stored data")
        elif entry.type == SYMLINK:
            if not entry.linkname or b"\0" in entry.linkname:
                raise UnsafeLayer(_display(entry.parts), "symlink with an empty or NUL-containing target")
            node.target = entry.linkname
        elif entry.type in (CHR, BLK):
            node.rdev = os.makedev(entry.devmajor, entry.devminor)
        return node

    def _set_metadata(self, node: Node, entry: Entry) -> None:
        # A negative base-256 id parses as -1, which chown reads as "no change": the tree would silently
        # keep another owner (found by tests/test_fuzz.py); GNU tar refuses it too.
        if not (0 <= entry.uid <= UNSET_ID and 0 <= entry.gid <= UNSET_ID):
            raise UnsafeLayer(_display(entry.parts), f"owner {entry.uid}:{entry.gid} out of range")
        uid, gid = entry.uid, entry.gid
        if UNSET_ID in (uid, gid):
            # 4294967295 is (uid_t)-1: GNU tar, as root, chowns with it and so leaves the id as it is: a
            # new inode's is whoever extracts (root: 0; rootless: the caller, as an owner 0 is), a directory
            # entry over an existing directory keeps that one's (umoci too; found by tests/test_fuzz.py).
            which = " and ".join(w for w, v in (("owner", uid), ("group", gid)) if v == UNSET_ID)
            self.report.skip(b"/".join(entry.parts), f"{which} 4294967295 (tar's -1) not set: left as it was "
                             "(the extracting user, 0, for a new file), as GNU tar does")
            uid, gid = (node.uid if uid == UNSET_ID else uid), (node.gid if gid == UNSET_ID else gid)
        # Seconds must fit a 64-bit time_t, or a directory's utime in Sink.finish() overflows (tests/test_fuzz.py).
        atime = entry.atime_ns
        if not _NS_MIN <= entry.mtime_ns < _NS_END or (atime is not None and not _NS_MIN <= atime < _NS_END):
            raise UnsafeLayer(_display(entry.parts), "timestamp out of range")
        node.mode = entry.mode & 0o7777
        node.uid, node.gid = uid, gid
        node.mtime_ns, node.atime_ns = entry.mtime_ns, entry.atime_ns
        node.xattrs = entry.xattrs or NO_XATTRS  # the entry is dropped after this: no copy

    def _insert(self, parent: Node, name: bytes, node: Node) -> None:
        assert parent.children is not None
        if len(name) > NAME_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        self._tree_bytes += _cost(name, node)  # (_unlink subtracts the same)
        if self._tree_bytes > self.limits.max_tree_bytes:
            raise LimitExceeded("max_tree_bytes", self._tree_bytes, self.limits.max_tree_bytes)
        parent.children[name] = node
        node.links += 1

    def _unlink(self, parts: Parts, parent: Node, node: Node) -> None:
        """Remove the name ``parts`` (with everything below it) from the tree and the sink."""
        assert parent.children is not None
        del parent.children[parts[-1]]
        if node.kind in (tree.DIR, tree.LNK):
            self._last = None
        self.sink.remove(parts, node)
        stack = [(parts[-1], node)]
        while stack:  # iterative: a hostile tree can be deep
            name, gone = stack.pop()
            self._tree_bytes -= _cost(name, gone)
            gone.links -= 1
            if gone.children is not None:
                stack.extend(gone.children.items())
            elif gone.links == 0 and gone.kind == tree.REG:
                self.sink.release(gone)

    # -- paths -------------------------------------------------------------------------------

    def _resolve_dir(self, parts: Parts, *, create: bool) -> tuple[Parts, list[Node]] | None:
        """The directory at ``parts``: its canonical path and the nodes from the root down to it.

        Symlinks are followed inside the root (``root.walk_in_root``'s rules); with ``create``, missing
        directories are made (0755 root:root, as tar does; the implicit mtime), a dangling symlink's
        target included. None if absent (or not a directory) without ``create``."""
        # The common case first, inline (it runs for every entry): every component an existing directory,
        # nothing to follow. Anything else (missing, a symlink, "." or "..", which no tree node is named,
        # too deep) takes the whole walk.
        chain = [self.root]
        node = self.root
        for name in parts:
            node = node.children.get(name)  # type: ignore[union-attr, assignment]
            if node is None or node.children is None:
                break
            chain.append(node)
        else:
            if len(parts) <= self.limits.max_depth:
                return parts, chain
        walked = walk_in_root(self.root, parts, self._make_step if create else self._find_step,
                              max_depth=self.limits.max_depth)
        return None if walked is None else (tuple(walked[0]), walked[1])

    def _find_step(self, here: Node, name: bytes) -> Node | Link | None:
        child = here.children.get(name)  # type: ignore[union-attr]  # (the walk steps only into directories)
        if child is None:
            return None
        if child.kind == tree.LNK:
            return Link(child.target)
        return child if child.children is not None else None

    def _make_step(self, here: Node, name: bytes) -> Node | Link:
        child = here.children.get(name)  # type: ignore[union-attr]
        if child is None:
            child = Node(tree.DIR, 0o755, mtime_ns=self._implicit_mtime_ns)
            child.touched = -1
            self._insert(here, name, child)
            return child
        if child.kind == tree.LNK:
            return Link(child.target)
        if child.children is None:
            raise NotADirectory
        return child

    # -- whiteouts ---------------------------------------------------------------------------

    def _whiteout(self, parts: Parts) -> None:
        base = parts[-1]
        if base == OPAQUE:
            resolved = self._resolve_dir(parts[:-1], create=False)
            if resolved is not None:
                self._hide_children(resolved[0], resolved[1][-1])
            return
        if base.startswith(_AUFS_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and the like): no meaning in OCI layers
        name = base[len(WHITEOUT_PREFIX):]
        if name in (b".", b".."):
            raise UnsafeLayer(_display(parts), "whiteout names '.' or '..'")
        resolved = self._resolve_dir(parts[:-1], create=False)
        if resolved is not None:
            self._hide(resolved[0], resolved[1][-1], name)

    def _hide(self, dir_parts: Parts, parent: Node, name: bytes) -> None:
        """Hide lower-layer content at ``name``; what this layer wrote stays (umoci's upper paths: a
        directory this layer declared, or wrote below, stays and is searched for lower content)."""
        assert parent.children is not None
        child = parent.children.get(name)
        if child is None:
            return
        parts = dir_parts + (name,)
        written = parts in self._written
        if child.children is not None and (written or child.touched == self._layer):
            self._hide_children(parts, child)
        elif not written:
            self._unlink(parts, parent, child)

    def _hide_children(self, parts: Parts, node: Node) -> None:
        assert node.children is not None
        for name in list(node.children):
            self._hide(parts, node, name)

    # -- entry types -------------------------------------------------------------------------

    def _directory(self, entry: Entry, parts: Parts, parent: Node) -> None:
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None and old.children is not None:
            self._set_metadata(old, entry)
            self.sink.directory(parts, parent, old, existing=True)
            return
        if old is not None:
            self._unlink(parts, parent, old)
        node = self._new_node(entry)
        self._insert(parent, parts[-1], node)
        self.sink.directory(parts, parent, node, existing=False)

    def _hardlink(self, entry: Entry, parts: Parts, parent: Node) -> None:
        target = clean_path(entry.linkname)
        if not target:
            raise UnsafeLayer(_display(parts), "hardlink to the root directory")
        if target == entry.parts:
            return  # a link to itself: nothing to do (tar writes these for repeated names)
        # Resolved inside the root like any path; the last component is linked, never followed.
        resolved = self._resolve_dir(target[:-1], create=False)
        node = None
        if resolved is not None:
            children = resolved[1][-1].children
            assert children is not None
            node = children.get(target[-1])
        if node is None:
            raise UnsafeLayer(_display(parts), f"hardlink target {_display(target)} does not exist")
        if node.children is not None:
            raise UnsafeLayer(_display(parts), f"hardlink target {_display(target)} is a directory")
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is node:
            return
        if old is not None:
            self._unlink(parts, parent, old)
        self._insert(parent, parts[-1], node)
        self.sink.hardlink(parts, resolved[0] + (target[-1],) if resolved else target, node)


def _name(entry: Entry) -> str:
    return _display(clean_path(entry.name)) if b"\0" not in entry.name else repr(entry.name)
