"""The erofs writer (``fsimage/erofs.py``) driven through the Sink API: every image passes ``fsck.erofs``,
reads with ``dump.erofs``, and, mounted by the kernel, shows exactly the tree the directory sink makes
from the same calls (plus the properties ``treecmp`` does not look at: nlink, inode numbers, times in
ns, directory lookups)."""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import random
import stat
import struct
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root, needs_tool
from dirge.apply.dirsink import DirSink
from dirge.apply.fs import PrivilegedFS, Report
from dirge.apply.tree import BLK, CHR, DIR, FIFO, LNK, REG, SOCK, FileData, Node, Parts
from dirge.fsimage import erofs_format as fmt
from dirge.fsimage.erofs import ErofsError, ErofsSink, _chunk_plan, xattr_key
from dirge.fsimage.mount import mount_erofs, unmount
from treecmp import diff, snapshot

T0 = 1_700_000_000_123_456_789
BUILD = 1_600_000_000_987_654_321
UUID = bytes(range(16))
GiB = 1 << 30
needs_erofs_tools = needs_tool("fsck.erofs", "dump.erofs", "mkfs.erofs")

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 1, 2, 4, 0x10, 0x20


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A posix_acl xattr value (version 2; (tag, perm, id) entries, sorted by tag as the kernel wants)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


NOID = 0xFFFFFFFF
ACCESS_ACL = acl((ACL_USER_OBJ, 7, NOID), (ACL_USER, 5, 1000), (ACL_GROUP_OBJ, 5, NOID), (ACL_MASK, 7, NOID),
                 (ACL_OTHER, 5, NOID))
DEFAULT_ACL = acl((ACL_USER_OBJ, 7, NOID), (ACL_GROUP_OBJ, 5, NOID), (ACL_OTHER, 5, NOID))
# vfs_cap_data v2, effective, CAP_NET_RAW permitted.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def file_data(chunks: Iterable[bytes], sparse: list[tuple[int, int]] | None = None) -> FileData:
    """What the engine gives a sink: the stored bytes, as views, in the pieces given."""
    chunks = list(chunks)
    return FileData(sum(map(len, chunks)), (memoryview(c) for c in chunks), sparse)


class Tree:
    """Builds a tree the way the merge engine does, telling every sink each change."""

    def __init__(self, *sinks: Any, root_mtime: int | None = T0) -> None:
        self.sinks = sinks
        self.root = Node(DIR, 0o755, 0, 0, root_mtime)
        self.root.links = 1
        for sink in sinks:
            sink.directory((), None, self.root, existing=True)

    @staticmethod
    def parts(path: bytes | str) -> Parts:
        return tuple(os.fsencode(path).split(b"/"))

    def node(self, parts: Parts) -> Node:
        here = self.root
        for name in parts:
            assert here.children is not None
            here = here.children[name]
        return here

    def _add(self, path: bytes | str, node: Node, xattrs: dict[str, bytes] | None) -> tuple[Parts, Node]:
        parts = self.parts(path)
        parent = self.node(parts[:-1])
        assert parent.children is not None and parts[-1] not in parent.children
        node.xattrs = dict(xattrs or {})
        parent.children[parts[-1]] = node
        node.links += 1
        return parts, parent

    def dir(self, path: bytes | str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int | None = T0,
            xattrs: dict[str, bytes] | None = None) -> Node:
        node = Node(DIR, mode, uid, gid, mtime)
        parts, parent = self._add(path, node, xattrs)
        for sink in self.sinks:
            sink.directory(parts, parent, node, existing=False)
        return node

    def file(self, path: bytes | str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
             mtime: int = T0, xattrs: dict[str, bytes] | None = None, chunk: int = 65536,
             sparse: list[tuple[int, int]] | None = None, realsize: int | None = None) -> Node:
        node = Node(REG, mode, uid, gid, mtime)
        node.size = realsize if realsize is not None else len(data)
        parts, parent = self._add(path, node, xattrs)
        chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]
        for sink in self.sinks:
            sink.file(parts, parent, node, file_data(chunks, sparse))
        return node

    def symlink(self, path: bytes | str, target: bytes, **kw: Any) -> Node:
        node = Node(LNK, 0o777, kw.get("uid", 0), kw.get("gid", 0), kw.get("mtime", T0))
        node.target = target
        parts, parent = self._add(path, node, None)
        for sink in self.sinks:
            sink.symlink(parts, parent, node)
        return node

    def special(self, path: bytes | str, kind: int, mode: int = 0o600, rdev: int = 0, **kw: Any) -> Node:
        node = Node(kind, mode, kw.get("uid", 0), kw.get("gid", 0), kw.get("mtime", T0))
        node.rdev = rdev
        parts, parent = self._add(path, node, kw.get("xattrs"))
        for sink in self.sinks:
            assert sink.special(parts, parent, node)
        return node

    def hardlink(self, path: bytes | str, target: bytes | str) -> None:
        node = self.node(self.parts(target))
        parts = self.parts(path)
        parent = self.node(parts[:-1])
        assert parent.children is not None
        parent.children[parts[-1]] = node
        node.links += 1
        for sink in self.sinks:
            sink.hardlink(parts, self.parts(target), node)

    def remove(self, path: bytes | str) -> None:
        parts = self.parts(path)
        parent = self.node(parts[:-1])
        assert parent.children is not None
        node = parent.children.pop(parts[-1])
        for sink in self.sinks:
            sink.remove(parts, node)
        node.links -= 1
        if node.kind == REG and node.links == 0:
            for sink in self.sinks:
                sink.release(node)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish(self.root)
        for sink in self.sinks:
            sink.close()


def erofs_sink(path: Path, **kw: Any) -> ErofsSink:
    return ErofsSink(path, uuid=UUID, build_time_ns=BUILD, **kw)


def dir_sink(path: Path) -> DirSink:
    path.mkdir()
    return DirSink(path, PrivilegedFS(Report()))


def check_tools(image: Path) -> str:
    """fsck.erofs clean (extracting every file, so all data is read and checked) and dump.erofs reads it."""
    out = image.parent / (image.name + ".fsck")
    fsck = subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["rm", "-rf", str(out)], check=True)
    dump = subprocess.run(["dump.erofs", "-s", str(image)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Filesystem magic number" in dump.stdout, dump.stdout + dump.stderr
    return dump.stdout


def dump_path(image: Path, path: str) -> str:
    proc = subprocess.run(["dump.erofs", f"--path={path}", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Any]:
    """``mounted(image) -> mountpoint``; every mount is undone in teardown, even after a failure."""
    points: list[Path] = []

    def mount(image: Path) -> Path:
        target = tmp_path / f"mnt{len(points)}"
        target.mkdir()
        points.append(target)
        mount_erofs(image, target)
        return target

    yield mount
    for target in reversed(points):
        unmount(target)


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- the format itself (no privilege needed) ---------------------------------------------------------------------


def test_layouts_match_the_kernel_header() -> None:
    assert fmt.SUPER_BLOCK.size == 128 and fmt.INODE_EXTENDED.size == 64 and fmt.DIRENT.size == 12
    assert fmt.XATTR_IBODY_HEADER.size == 12 and fmt.XATTR_ENTRY.size == 4 and fmt.CHUNK_INDEX.size == 8
    assert fmt.i_format(fmt.INODE_FLAT_INLINE) == 5 and fmt.i_format(fmt.INODE_CHUNK_BASED) == 9
    # new_encode_dev: minor low byte, major, minor high bits above.
    assert fmt.encode_dev(8, 1) == 0x801 and fmt.encode_dev(254, 300000) == (0xE0 | (254 << 8) | (0x49300 << 12))


def test_xattr_names() -> None:
    assert xattr_key("user.a", b"v") == (1, b"a", b"v")
    assert xattr_key("security.capability", b"") == (6, b"capability", b"")
    assert xattr_key("trusted.overlay.opaque", b"y") == (4, b"overlay.opaque", b"y")
    assert xattr_key("system.posix_acl_default", b"x") == (3, b"", b"x")
    for bad in ("system.foo", "lustre.lov", "user.", "os2.x"):
        assert isinstance(xattr_key(bad, b""), str)
    assert isinstance(xattr_key("user.big", bytes(70000)), str)


def test_chunk_plan() -> None:
    assert _chunk_plan(8100, [(0, 3000), (3100, 5000)]) is None  # the holes save nothing: flat
    bits = _chunk_plan(5 * GiB, [(0, 100), (5 * GiB - 10, 10)])
    assert bits is not None and 0 < bits < 20
    assert _chunk_plan(1 << 20, []) is not None  # all hole


# -- whole images ------------------------------------------------------------------------------------------------

BIG_DIR_NAMES = [b"-", b"!", b"!!", b"-x", b".hidden", b"...", b"\xff\xfe", b"caf\xc3\xa9", b"z" * 255,
                 b"\x01ctl", b" space"] + [b"e%05d-%s" % (i, b"n" * (i % 40)) for i in range(3000)]


def build_everything(t: Tree) -> None:
    """Every kind of inode and every layout the writer has."""
    t.root.xattrs = {"user.root": b"r"}
    t.dir("d", 0o1777, uid=100000, gid=200000, mtime=T0 + 1)
    # A leaf: on the reference directory, a default ACL would be inherited by what is made below.
    t.dir("dacl", 0o750, xattrs={"system.posix_acl_default": DEFAULT_ACL, "user.d": b"1"})
    t.dir("d/sub", 0o2750, mtime=-1_000_000_001)  # before 1970, ns part kept
    t.file("empty")
    t.file("one", b"1")
    for size in (4095, 4096, 4097, 8192, 3 * 4096 + 5):
        t.file(f"s{size}", rand(size, size))
    t.file("big", rand(3 << 20, 7), chunk=300 << 10)  # pieces past the direct-write size
    t.file("suid", b"#!/bin/sh\n", mode=0o4755, uid=70000, gid=80000, mtime=T0 + 999_999_999)
    t.file("sgid", b"x", mode=0o2711)
    t.file("d/acl", b"acl", mode=0o775, xattrs={"system.posix_acl_access": ACCESS_ACL})
    t.file("ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": CAPABILITY})
    t.file("trusted", b"t", xattrs={"trusted.overlay.opaque": b"y", "user.one": b"1"})
    # The same (name, value) on many inodes: stored once in the shared area.
    for i in range(5):
        t.file(f"d/shared{i}", b"s%d" % i, xattrs={"user.shared": b"v" * 100, "user.own": b"%d" % i})
    # inode + xattrs + tail over a block: the tail goes to a data block (FLAT_PLAIN).
    t.file("fat", rand(4000, 3), xattrs={"user.fat": b"f" * 3000})
    t.file("fat2", rand(8192 + 3000, 4), xattrs={"user.fat": b"g" * 3000})
    # Hardlinks: one inode under three names, across directories.
    t.file("h1", b"linked", mode=0o640, uid=5, gid=6, xattrs={"user.h": b"1"})
    t.hardlink("d/h2", "h1")
    t.hardlink("d/sub/h3", "h1")
    t.symlink("ls", b"one")
    t.symlink("ll", b"a/" * 2000)  # 4000 bytes: still inline
    t.symlink("lx", b"b/" * 2045)  # 4090 bytes: too long to share a block with its inode
    t.special("chr", CHR, 0o620, os.makedev(4, 64), uid=0, gid=5)
    t.special("blk", BLK, 0o660, os.makedev(254, 300000))
    t.special("fifo", FIFO, 0o644)
    t.special("sock", SOCK, 0o755)
    # Sparse: chunked with hole chunks, and a flat one whose holes would save nothing.
    t.file("sparse", b"A" * 10 + b"B" * 5000, sparse=[(0, 10), (600_000, 5000)], realsize=1 << 20)
    t.file("dense", b"C" * 3000 + b"D" * 5000, sparse=[(0, 3000), (3100, 5000)], realsize=8100)
    t.file("holes", b"", sparse=[], realsize=100_000)
    t.dir("many")
    for name in BIG_DIR_NAMES:
        t.file(b"many/" + name, name)
    t.dir("nodate", mtime=None)


@needs_root
@needs_erofs_tools
def test_everything_mounts_as_the_directory_sink_writes_it(tmp_path: Path, mounted: Any) -> None:
    image = tmp_path / "img.erofs"
    t = Tree(erofs_sink(image), dir_sink(tmp_path / "ref"))
    build_everything(t)
    t.finish()
    check_tools(image)
    mnt = mounted(image)

    differences = diff(snapshot(tmp_path / "ref"), snapshot(mnt))
    assert not differences, "\n".join(differences[:20])

    st = os.lstat(mnt / "h1")
    assert st.st_nlink == 3 and os.lstat(mnt / "d/h2").st_ino == st.st_ino == os.lstat(mnt / "d/sub/h3").st_ino
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (5, 6, 0o640)
    st = os.lstat(mnt / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o4755, 70000, 80000, T0 + 999_999_999)
    st = os.lstat(mnt / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o1777, 100000, 200000, T0 + 1)
    assert st.st_nlink == 3  # ".", its name, "sub/.."
    assert os.lstat(mnt).st_nlink == 2 + 4 and os.lstat(mnt).st_mtime_ns == T0
    assert os.lstat(mnt / "d/sub").st_mtime_ns == -1_000_000_001
    assert stat.S_IMODE(os.lstat(mnt / "d/sub").st_mode) == 0o2750
    assert os.lstat(mnt / "nodate").st_mtime_ns == BUILD
    assert os.lstat(mnt / "chr").st_rdev == os.makedev(4, 64) and stat.S_ISCHR(os.lstat(mnt / "chr").st_mode)
    assert os.lstat(mnt / "blk").st_rdev == os.makedev(254, 300000) and stat.S_ISBLK(os.lstat(mnt / "blk").st_mode)
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode) and stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    assert os.readlink(mnt / "ll") == "a/" * 2000 and os.readlink(mnt / "lx") == "b/" * 2045
    assert os.getxattr(mnt, "user.root") == b"r"
    assert os.getxattr(mnt / "d/acl", "system.posix_acl_access") == ACCESS_ACL
    assert os.getxattr(mnt / "dacl", "system.posix_acl_default") == DEFAULT_ACL
    assert os.getxattr(mnt / "ping", "security.capability") == CAPABILITY
    assert os.getxattr(mnt / "trusted", "trusted.overlay.opaque") == b"y"
    for i in range(5):
        path = mnt / f"d/shared{i}"
        assert sorted(os.listxattr(path)) == ["user.own", "user.shared"]
        assert os.getxattr(path, "user.shared") == b"v" * 100 and os.getxattr(path, "user.own") == b"%d" % i

    # Every name of the multi-block directory is found by lookup (binary search across blocks).
    many = os.fsencode(mnt / "many")
    assert sorted(os.listdir(many)) == sorted(BIG_DIR_NAMES)
    for name in BIG_DIR_NAMES:
        with open(os.path.join(many, name), "rb") as f:
            assert f.read() == name
    for missing in (b"0", b"e00000", b"zz", b"e02999-" + b"n" * 40, b".."[:1] + b"x"):
        assert not os.path.lexists(os.path.join(many, missing))

    # Layouts as intended, read back by erofs-utils' own parser.
    assert "Layout: 2" in dump_path(image, "/s4097") and "Layout: 0" in dump_path(image, "/s4096")
    assert "Layout: 0" in dump_path(image, "/fat") and "Layout: 0" in dump_path(image, "/fat2")
    assert "Layout: 4" in dump_path(image, "/sparse") and "Layout: 0" in dump_path(image, "/dense")
    assert "Layout: 0" in dump_path(image, "/lx") and "Layout: 2" in dump_path(image, "/ll")
    # Shared: a 12-byte header, one 4-byte id, and user.own inline (4 + 3 + 1, aligned: 8).
    assert "Xattr size: 24" in dump_path(image, "/d/shared0")


@needs_root
@needs_erofs_tools
def test_sparse_5gib_keeps_its_holes(tmp_path: Path, mounted: Any) -> None:
    image = tmp_path / "img.erofs"
    size = 5 * GiB + 123
    regions = [(0, 4096), (3 * GiB, 70_000), (size - 50, 50)]
    data = rand(4096, 1) + rand(70_000, 2) + rand(50, 3)
    t = Tree(erofs_sink(image))
    t.file("huge", data, sparse=regions, realsize=size)
    t.file("after", b"after")
    t.finish()
    assert image.stat().st_size < 2 << 20  # holes are not stored
    mnt = mounted(image)
    huge = mnt / "huge"
    assert os.lstat(huge).st_size == size
    with open(huge, "rb") as f:
        fd = f.fileno()
        assert os.pread(fd, 4096 + 10, 0) == data[:4096] + bytes(10)
        assert os.pread(fd, 70_000 + 20, 3 * GiB - 10) == bytes(10) + data[4096:4096 + 70_000] + bytes(10)
        assert os.pread(fd, 100, size - 100) == bytes(50) + data[-50:]
        assert os.pread(fd, 4096, 4 * GiB + 12345) == bytes(4096)
    # erofs derives st_blocks from i_size (kernel), so FIEMAP tells the holes: unmapped chunks.
    assert fiemap_extents(huge) < 10
    assert (mnt / "after").read_bytes() == b"after"
    dump = dump_path(image, "/huge")
    assert "Layout: 4" in dump and f"Size: {size}" in dump
    assert "chunked_file" in check_tools(image)


def fiemap_extents(path: Path) -> int:
    """Mapped extents of a file (FS_IOC_FIEMAP with room for 64)."""
    fs_ioc_fiemap = 0xC020660B
    request = bytearray(struct.pack("=QQIIII", 0, 0xFFFFFFFFFFFFFFFF, 0, 0, 64, 0) + bytes(56 * 64))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), fs_ioc_fiemap, request)
    return struct.unpack_from("=I", request, 20)[0]


@needs_root
@needs_erofs_tools
def test_released_data_leaves_the_image(tmp_path: Path, mounted: Any) -> None:
    """A big file a later layer removes, another replaced: neither's bytes stay, and the image is
    as small as mkfs.erofs makes from the final tree."""
    image = tmp_path / "img.erofs"
    t = Tree(erofs_sink(image), dir_sink(tmp_path / "ref"))
    secret = b"SECRET-MARKER-" * 300_000  # 4.2 MB
    t.file("a", rand(100_000, 1))
    t.file("secret", secret)
    t.file("b", rand(200_000, 2))
    t.file("old", b"OLD-MARKER-" * 50_000)
    t.file("c", rand(5000, 3))
    t.hardlink("c2", "c")
    t.remove("secret")  # a whiteout
    t.remove("old")  # replaced by a later layer's file of the same name
    t.file("old", b"new")
    t.remove("c")  # one of two names: the data lives on
    t.finish()
    blob = image.read_bytes()
    assert b"SECRET-MARKER" not in blob and b"OLD-MARKER" not in blob
    check_tools(image)
    mnt = mounted(image)
    differences = diff(snapshot(tmp_path / "ref"), snapshot(mnt))
    assert not differences, differences
    reference = tmp_path / "mkfs.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(reference), str(tmp_path / "ref")], check=True)
    assert len(blob) <= 1.05 * reference.stat().st_size, (len(blob), reference.stat().st_size)


@needs_erofs_tools
def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    digests = []
    for n in range(2):
        image = tmp_path / f"img{n}.erofs"
        t = Tree(erofs_sink(image))
        build_everything(t)
        t.remove("s8192")
        t.finish()
        digests.append(hashlib.sha256(image.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    check_tools(tmp_path / "img0.erofs")


@needs_erofs_tools
def test_unnameable_xattrs_are_skipped_and_recorded(tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    report = Report()
    sink = erofs_sink(image, report=report)
    t = Tree(sink)
    t.file("f", b"x", xattrs={"system.foo": b"1", "user.ok": b"2", "user.huge": bytes(70_000)})
    t.finish()
    assert sorted(sink.skipped) == sorted(["/f: xattr system.foo: namespace not representable in erofs "
                                           "(user., trusted., security., POSIX ACLs only)",
                                           "/f: xattr user.huge: value of 70000 bytes exceeds erofs' 65535"])
    assert len(report.skipped) == 2
    check_tools(image)


@needs_erofs_tools
def test_empty_image(tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    t = Tree(erofs_sink(image), root_mtime=None)
    t.finish()
    assert image.stat().st_size == 2 * 4096  # the superblock's block and one metadata block
    check_tools(image)


def test_close_is_idempotent_and_cleans_up_after_failure(tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    sink = erofs_sink(image)
    t = Tree(sink)
    with pytest.raises(ErofsError):
        node = Node(REG)
        node.size = 10
        sink.file((b"x",), t.root, node, FileData(10, [b"abc"]))
    sink.close()
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["img.erofs"]  # the spool was anonymous


def test_xattrs_grown_after_the_data_are_refused(tmp_path: Path) -> None:
    """A node's xattrs are final when ``file()`` is called (the engine sets metadata first): a caller
    that grows them later, so that the tail no longer fits, breaks the contract and is told so."""
    image = tmp_path / "img.erofs"
    sink = erofs_sink(image)
    t = Tree(sink)
    grown = t.file("grown", rand(3 * 4096 + 3500, 9))
    grown.xattrs = {"user.late": b"L" * 1000}
    with pytest.raises(ErofsError, match="xattrs changed after"):
        t.finish()
    sink.close()


def test_chunk_map_uses_null_addr_for_holes(tmp_path: Path) -> None:
    """Read the chunk map back from the raw image: hole chunks are EROFS_NULL_ADDR."""
    image = tmp_path / "img.erofs"
    t = Tree(erofs_sink(image))
    t.file("s", b"x" * 10, sparse=[(1 << 20, 10)], realsize=4 << 20)
    t.finish()
    raw = image.read_bytes()
    sb = fmt.SUPER_BLOCK.unpack_from(raw, fmt.SUPER_OFFSET)
    magic, root_nid, meta = sb[0], sb[5], sb[10]
    assert magic == fmt.SUPER_MAGIC and root_nid == 1
    assert fmt.FEATURE_INCOMPAT_CHUNKED_FILE & sb[14]
    base = meta * 4096
    root = fmt.INODE_EXTENDED.unpack_from(raw, base + 32)
    assert fmt.i_format(fmt.INODE_FLAT_INLINE) == root[0]
    dirents = [fmt.DIRENT.unpack_from(raw, base + 32 + 64 + 12 * i) for i in range(3)]  # ".", "..", "s"
    nid = dirents[2][0]
    inode = fmt.INODE_EXTENDED.unpack_from(raw, base + 32 * nid)
    assert inode[0] == fmt.i_format(fmt.INODE_CHUNK_BASED) and inode[4] == 4 << 20
    bits = inode[5] & fmt.CHUNK_FORMAT_BLKBITS_MASK
    chunks = (4 << 20) >> (12 + bits)
    entries = array.array("I", raw[base + 32 * nid + 64:base + 32 * nid + 64 + 4 * chunks])
    mapped = [i for i, e in enumerate(entries) if e != fmt.NULL_ADDR]
    assert mapped == [(1 << 20) >> (12 + bits)]


@needs_root
@needs_erofs_tools
def test_odd_shapes(tmp_path: Path, mounted: Any) -> None:
    """A root too big for one block (xattrs), a chunk map spanning blocks, files whose tail does not
    fit their inode's block (with xattrs; alone, over 4032 bytes: FLAT_PLAIN, the tail padded in the
    data area), a directory whose tail does not fit with its xattrs."""
    image = tmp_path / "img.erofs"
    t = Tree(erofs_sink(image))
    t.root.xattrs = {"user.big": b"R" * 6000}
    regions = [(i << 20, 10) for i in range(1024)]
    t.file("map", b"0123456789" * 1024, sparse=regions, realsize=1 << 30)
    t.file("grown", rand(3 * 4096 + 3500, 9), xattrs={"user.late": b"L" * 1000})
    t.file("bigtail", rand(4096 + 4050, 10))
    t.file("next", b"next")
    t.dir("fatdir", xattrs={"user.fat": b"F" * 3900})
    for i in range(20):
        t.file(f"fatdir/f{i}", b"%d" % i)
    t.finish()
    check_tools(image)
    mnt = mounted(image)
    assert os.getxattr(mnt, "user.big") == b"R" * 6000
    with open(mnt / "map", "rb") as f:
        for i in (0, 1, 500, 1023):
            assert os.pread(f.fileno(), 12, (i << 20) - 1 if i else 0) == (b"\0" + b"0123456789" + b"\0" if i
                                                                           else b"0123456789\0\0")
    assert (mnt / "grown").read_bytes() == rand(3 * 4096 + 3500, 9)
    assert os.getxattr(mnt / "grown", "user.late") == b"L" * 1000
    assert "Layout: 0" in dump_path(image, "/grown")
    assert (mnt / "bigtail").read_bytes() == rand(4096 + 4050, 10)
    assert "Layout: 0" in dump_path(image, "/bigtail")
    assert sorted(os.listdir(mnt / "fatdir")) == sorted(f"f{i}" for i in range(20))
    assert (mnt / "fatdir/f7").read_bytes() == b"7" and (mnt / "next").read_bytes() == b"next"
