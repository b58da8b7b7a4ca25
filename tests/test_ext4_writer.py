"""The ext4 writer (``fsimage/ext4.py``) driven through the Sink API: every image passes ``e2fsck -fn``,
reads with ``dumpe2fs``, and, loop-mounted read-write by the kernel, shows exactly the tree the
directory sink makes from the same calls; it then takes new files, deletions and renames, stays
e2fsck-clean and grows with resize2fs. Also the real pipeline (layers → engine → Ext4Sink) against
``dirge.unpack`` of the same image."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root, needs_tool, require
from dirge import unpack
from dirge.apply.fs import Report
from dirge.apply.tree import BLK, CHR, FIFO, SOCK, FileData, Node
from dirge.fsimage import ext4_format as fmt
from dirge.fsimage.ext4 import (Ext4Error, Ext4SizeError, Ext4Sink, acl_to_disk, build_extent_tree, dx_hash,
                                native_hasher, tree_blocks, xattr_key)
from dirge.sources.open import open_image
from dirge.flatten import apply_layers, image_identity
from images import layered, metadata
from test_erofs_writer import (ACCESS_ACL, BUILD, CAPABILITY, DEFAULT_ACL, GiB, T0, UUID, Tree, dir_sink,
                               rand)
from treecmp import diff, snapshot

needs_e2fs = needs_tool("e2fsck", "dumpe2fs", "resize2fs", "mount", "umount")
MiB = 1 << 20


def ext4_sink(path: Path, **kw: Any) -> Ext4Sink:
    return Ext4Sink(path, uuid=UUID, build_time_ns=BUILD, **kw)


def fsck(image: Path) -> str:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def dumpe2fs(image: Path) -> dict[str, str]:
    proc = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Any]:
    """``mounted(image, ro=False) -> mountpoint`` (util-linux loop, autoclear); unmounted in teardown."""
    points: list[Path] = []
    made = iter(range(1000))

    def mount(image: Path, ro: bool = False) -> Path:
        target = tmp_path / f"mnt{next(made)}"
        target.mkdir()
        opts = "loop,ro" if ro else "loop"
        subprocess.run(["mount", "-t", "ext4", "-o", opts, str(image), str(target)], check=True)
        points.append(target)
        return target

    def umount(target: Path) -> None:
        subprocess.run(["umount", str(target)], check=True)
        points.remove(target)

    mount.umount = umount  # type: ignore[attr-defined]
    yield mount
    for target in reversed(points):
        subprocess.run(["umount", str(target)], capture_output=True)


# -- the format itself (no privilege needed) ---------------------------------------------------------------------


def test_layouts_match_the_headers() -> None:
    assert fmt.SUPER_BLOCK.size == 1024 and fmt.GROUP_DESC.size == 32 and fmt.INODE.size == 160
    assert fmt.DIRENT.size == 8 and fmt.EXTENT.size == 12 and fmt.XATTR_HEADER.size == 32
    assert fmt.XATTR_ENTRY.size == 16 and fmt.JOURNAL_SUPERBLOCK.size == 1024
    assert fmt.DX_ROOT_LIMIT == 508 and fmt.DX_NODE_LIMIT == 511 and fmt.EXTENTS_IN_BLOCK == 340
    assert [g for g in range(130) if fmt.group_has_super(g)] == [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]
    assert [g for g in range(300) if fmt.group_has_desc(g)] == [0, 1, 127, 128, 129, 255, 256, 257]
    assert fmt.encode_time(-1_000_000_001) == ((-2) & 0xFFFFFFFF, 999_999_999 << 2)
    assert fmt.encode_time((1 << 32) * 10**9 + 5) == (0, 1 | (5 << 2))  # 2106: epoch bit 1
    assert fmt.default_journal_blocks(4096) == 1024 and fmt.default_journal_blocks(300_000) == 8192


def test_acl_and_xattr_encoding() -> None:
    disk = acl_to_disk(ACCESS_ACL)
    assert isinstance(disk, bytes)
    # version 1; USER_OBJ short, USER with id, GROUP_OBJ, MASK, OTHER short
    assert disk == (struct.pack("<I", 1) + struct.pack("<HH", 1, 7) + struct.pack("<HHI", 2, 5, 1000)
                    + struct.pack("<HH", 4, 5) + struct.pack("<HH", 0x10, 7) + struct.pack("<HH", 0x20, 5))
    assert isinstance(acl_to_disk(b"\x02\0\0\0\x01"), str)
    assert xattr_key("user.a", b"v") == (1, b"a", b"v")
    assert xattr_key("security.capability", CAPABILITY) == (6, b"capability", CAPABILITY)
    for bad in ("system.foo", "lustre.lov", "user.", "os2.x"):
        assert isinstance(xattr_key(bad, b""), str)
    assert isinstance(xattr_key("user.big", bytes(5000)), str)


@needs_tool("debugfs")
def test_dx_hash_matches_e2fsprogs(tmp_path: Path) -> None:
    seed = bytes(range(16))
    words = struct.unpack("<4I", seed)
    uuid = "00010203-0405-0607-0809-0a0b0c0d0e0f"
    for name in (b"a", b"hello.txt", b"x" * 255, b"caf\xc3\xa9", b"\xff\xfe", b"e00001-" + b"n" * 30):
        proc = subprocess.run(["debugfs", "-R", f"dx_hash -h half_md4 -s {uuid} {name.decode('latin-1')}"],
                              capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        if proc.returncode != 0 or "Hash of" not in proc.stdout:
            pytest.skip("this debugfs has no dx_hash")
        if any(c > 0x7F for c in name):
            continue  # the shell argument is re-encoded; e2fsck checks these in the images below
        got = int(proc.stdout.split("is 0x")[1].split()[0], 16)
        assert dx_hash(name, words) == got & ~1, name


def test_dx_hash_native_equals_pure() -> None:
    """The htree hash comes from libext2fs's ext2fs_dirhash where it loads, else from the pure
    half_md4: both give the same value for every name length (a partial last word, 32-byte steps)
    and seed (zero: the default one)."""
    import random

    r = random.Random(5)
    names = [bytes(r.randrange(1, 256) for _ in range(n)) for n in range(1, 256)]
    names += [b"e%05d.py" % i for i in range(500)] + [b"\xff" * 255, b"a" * 32, b"a" * 33, b"a" * 64]
    w = [r.randrange(1 << 32) for _ in range(4)]
    seeds: list[tuple[int, int, int, int]] = [(0, 0, 0, 0), (1, 2, 3, 4), (w[0], w[1], w[2], w[3])]
    for seed in seeds:
        native = native_hasher(seed)
        if native is None:
            pytest.skip("no libext2fs.so.2 here (the pure hash is checked against debugfs above)")
        for name in names:
            assert native(name) == dx_hash(name, seed), (name, seed)


@needs_e2fs
def test_htree_without_libext2fs_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libext2fs (the pure half_md4 hashes the names) an image is byte for byte the one
    written with it."""
    from dirge.fsimage import ext4

    digests = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(ext4, "native_hasher", lambda seed: None)
        image = tmp_path / f"img-{native}.ext4"
        t = Tree(ext4_sink(image))
        t.dir("d")
        for i in range(3000):
            t.symlink(b"d/%05d-" % i + b"x" * (i % 70), b"t")
        t.finish()
        fsck(image)
        digests.append(hashlib.sha256(image.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_extent_tree_shapes() -> None:
    assert tree_blocks(4) == 0 and tree_blocks(5) == 1 and tree_blocks(1360) == 4 and tree_blocks(1361) == 6
    extents = [(i * 2, 1000 + i * 2, 1) for i in range(1500)]
    iblock, nodes = build_extent_tree(extents, list(range(10, 10 + tree_blocks(1500))))
    magic, entries, limit, depth, _ = fmt.EXTENT_HEADER.unpack_from(iblock)
    assert (magic, entries, limit, depth) == (fmt.EXTENT_MAGIC, 1, 4, 2)  # 5 leaves → one index block
    assert len(nodes) == 6


# -- whole images ------------------------------------------------------------------------------------------------

BIG_DIR_NAMES = [b"-", b"!", b"!!", b"-x", b".hidden", b"...", b"\xff\xfe", b"caf\xc3\xa9", b"z" * 255,
                 b"\x01ctl", b" space"] + [b"e%05d-%s" % (i, b"n" * (i % 40)) for i in range(3000)]


def build_everything(t: Tree) -> None:
    t.root.xattrs = {"user.root": b"r"}
    t.dir("d", 0o1777, uid=100000, gid=200000, mtime=T0 + 1)
    t.dir("dacl", 0o750, xattrs={"system.posix_acl_default": DEFAULT_ACL, "user.d": b"1"})
    t.dir("d/sub", 0o2750, mtime=-1_000_000_001)
    t.file("empty")
    t.file("one", b"1")
    for size in (4095, 4096, 4097, 3 * 4096 + 5):
        t.file(f"s{size}", rand(size, size))
    t.file("big", rand(3 << 20, 7), chunk=300 << 10)
    t.file("suid", b"#!/bin/sh\n", mode=0o4755, uid=70000, gid=80000, mtime=T0 + 999_999_999)
    t.file("sgid", b"x", mode=0o2711)
    t.file("d/acl", b"acl", mode=0o775, xattrs={"system.posix_acl_access": ACCESS_ACL})
    t.file("ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": CAPABILITY})
    t.file("trusted", b"t", xattrs={"trusted.overlay.opaque": b"y", "user.one": b"1"})
    for i in range(5):  # same big xattr: one shared block (refcount 5), own small one in the inode
        t.file(f"d/shared{i}", b"s%d" % i, xattrs={"user.shared": b"v" * 300, "user.own": b"%d" % i})
    t.file("fat", rand(4000, 3), xattrs={"user.fat": b"f" * 3000, "user.a": b"a"})
    t.file("h1", b"linked", mode=0o640, uid=5, gid=6, xattrs={"user.h": b"1"})
    t.hardlink("d/h2", "h1")
    t.hardlink("d/sub/h3", "h1")
    t.symlink("ls", b"one")
    t.symlink("l59", b"x" * 59)  # the longest fast symlink
    t.symlink("l60", b"y" * 60)  # the shortest slow one
    t.symlink("ll", b"a/" * 2000)
    t.special("chr", CHR, 0o620, os.makedev(4, 64), uid=0, gid=5)
    t.special("blk", BLK, 0o660, os.makedev(254, 300000))  # new encoding (minor > 255)
    t.special("fifo", FIFO, 0o644)
    t.special("sock", SOCK, 0o755)
    t.file("sparse", b"A" * 10 + b"B" * 5000, sparse=[(0, 10), (600_000, 5000)], realsize=1 << 20)
    t.file("holes", b"", sparse=[], realsize=100_000)
    t.dir("many")
    for name in BIG_DIR_NAMES:
        t.file(b"many/" + name, name)
    t.dir("nodate", mtime=None)
    t.file("gone", b"GONE-MARKER-" * 5000)
    t.remove("gone")
    t.file("reuse", rand(20_000, 11))  # fits the hole "gone" left


@needs_root
@needs_e2fs
def test_everything_mounts_as_the_directory_sink_writes_it(tmp_path: Path, mounted: Any) -> None:
    image = tmp_path / "img.ext4"
    report = Report()
    t = Tree(ext4_sink(image, size=64 * MiB, label=b"dirge-test", report=report), dir_sink(tmp_path / "ref"))
    build_everything(t)
    t.finish()
    assert b"GONE-MARKER" not in image.read_bytes()
    fsck(image)
    info = dumpe2fs(image)
    for feature in ("has_journal", "ext_attr", "dir_index", "filetype", "extent", "flex_bg", "sparse_super",
                    "large_file", "huge_file", "dir_nlink", "extra_isize", "meta_bg"):
        assert feature in info["Filesystem features"].split()
    assert info["Filesystem volume name"] == "dirge-test"
    assert info["Filesystem UUID"] == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert info["Journal inode"] == "8" and info["Total journal blocks"] == "1024"
    assert info["Inode size"] == "256" and info["Filesystem state"] == "clean"
    htree = subprocess.run(["debugfs", "-R", "htree many", str(image)], capture_output=True).stdout.decode("latin-1")
    assert "Indirect levels: 0" in htree

    mnt = mounted(image)
    ref = snapshot(tmp_path / "ref")
    differences = diff(ref, snapshot(mnt))
    assert not differences, "\n".join(differences[:20])

    st = os.lstat(mnt / "h1")
    assert st.st_nlink == 3 and os.lstat(mnt / "d/h2").st_ino == st.st_ino == os.lstat(mnt / "d/sub/h3").st_ino
    st = os.lstat(mnt / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o4755, 70000, 80000, T0 + 999_999_999)
    st = os.lstat(mnt / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == (0o1777, 100000, 200000, T0 + 1)
    assert st.st_nlink == 3
    assert os.lstat(mnt).st_nlink == 2 + 4 and os.lstat(mnt).st_mtime_ns == T0
    assert os.lstat(mnt / "d/sub").st_mtime_ns == -1_000_000_001
    assert os.lstat(mnt / "nodate").st_mtime_ns == BUILD
    assert os.lstat(mnt / "chr").st_rdev == os.makedev(4, 64)
    assert os.lstat(mnt / "blk").st_rdev == os.makedev(254, 300000)
    assert stat.S_ISFIFO(os.lstat(mnt / "fifo").st_mode) and stat.S_ISSOCK(os.lstat(mnt / "sock").st_mode)
    assert os.readlink(mnt / "l59") == "x" * 59 and os.readlink(mnt / "l60") == "y" * 60
    assert os.lstat(mnt / "l59").st_blocks == 0 and os.lstat(mnt / "l60").st_blocks == 8
    assert os.getxattr(mnt / "d/acl", "system.posix_acl_access") == ACCESS_ACL
    assert os.getxattr(mnt / "dacl", "system.posix_acl_default") == DEFAULT_ACL
    require(shutil.which("getfacl") is not None, "needs getfacl (acl, installed by scripts/setup.sh --test)")
    acl = subprocess.run(["getfacl", "-n", "-p", str(mnt / "d/acl")], capture_output=True, text=True).stdout
    assert "user:1000:r-x" in acl and "mask::rwx" in acl
    assert os.getxattr(mnt / "ping", "security.capability") == CAPABILITY
    assert os.getxattr(mnt / "fat", "user.fat") == b"f" * 3000
    assert os.lstat(mnt / "sparse").st_blocks == 24  # blocks 0, 146, 147: the holes are not allocated
    assert os.lstat(mnt / "holes").st_blocks == 0
    many = os.fsencode(mnt / "many")
    for name in BIG_DIR_NAMES[::37] + [b"\xff\xfe", b"z" * 255, b"-", b"!"]:
        with open(os.path.join(many, name), "rb") as f:
            assert f.read() == name
    assert not os.path.lexists(os.path.join(many, b"e99999"))

    # Read-write: 20 MB of new files, deletions, renames (also in the htree directory); then clean.
    (mnt / "new").mkdir()
    for i in range(20):
        (mnt / "new" / f"f{i}").write_bytes(rand(MiB, 100 + i))
    for i in range(500):
        (mnt / "many" / f"added-{i}").write_bytes(b"a")
    for name in BIG_DIR_NAMES[100:400]:
        os.unlink(os.path.join(many, name))
    os.rename(mnt / "big", mnt / "d/big-renamed")
    os.rename(os.path.join(many, BIG_DIR_NAMES[500]), mnt / "moved")
    shutil.rmtree(mnt / "d/sub")
    os.setxattr(mnt / "one", "user.new", b"n" * 200)
    mounted.umount(mnt)
    fsck(image)

    # It grows (offline) and stays clean; the content is intact.
    subprocess.run(["resize2fs", "-f", str(image), "200M"], check=True, capture_output=True)
    fsck(image)
    assert dumpe2fs(image)["Block count"] == str(200 * MiB // 4096)
    mnt = mounted(image, ro=True)
    assert (mnt / "d/big-renamed").read_bytes() == rand(3 << 20, 7)
    assert (mnt / "new/f19").read_bytes() == rand(MiB, 119)
    assert os.getxattr(mnt / "one", "user.new") == b"n" * 200


@needs_e2fs
def test_inode_table_skipping_fixed_blocks_leaves_them_free(tmp_path: Path) -> None:
    """16 groups of 2048-block inode tables laid end to end from block 36 (after the file, the root
    directory and the bitmaps) reach block 32 768, where group 1's backup superblock and descriptor
    block sit: the 16th table starts after them, and the 2012 blocks it skipped belong to nothing, so
    they are free in the bitmap and in every count (issue 18: e2fsck found them marked used,
    "Block bitmap differences")."""
    image = tmp_path / "img.ext4"
    groups = 16
    t = Tree(ext4_sink(image, size=groups * fmt.BLOCKS_PER_GROUP * fmt.BLOCK_SIZE,
                       inodes=groups * fmt.BLOCKS_PER_GROUP))
    t.file("f", b"x")
    t.finish()
    fsck(image)
    layout = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True).stdout
    assert "Inode table at 28708-30755" in layout and "Inode table at 32770-34817" in layout
    assert "Free blocks: 30756-32767" in layout


@needs_root
@needs_e2fs
def test_sparse_5gib_and_deep_extent_trees(tmp_path: Path, mounted: Any) -> None:
    image = tmp_path / "img.ext4"
    size = 5 * GiB + 123
    regions = [(0, 4096), (3 * GiB, 70_000), (size - 50, 50)]
    data = rand(4096, 1) + rand(70_000, 2) + rand(50, 3)
    # 1500 one-block extents: five leaves under one index block (depth 2).
    frag = [(i << 20, 10) for i in range(1500)]
    t = Tree(ext4_sink(image))
    t.file("huge", data, sparse=regions, realsize=size)
    t.file("frag", b"0123456789" * 1500, sparse=frag, realsize=1500 << 20)
    t.file("after", b"after")
    t.finish()
    assert image.stat().st_blocks * 512 < 64 * MiB  # holes are not stored (the image file is sparse too)
    fsck(image)
    stat_out = subprocess.run(["debugfs", "-R", "stat frag", str(image)], capture_output=True, text=True).stdout
    assert "Level Entries" in stat_out or "EXTENTS" in stat_out
    mnt = mounted(image, ro=True)
    huge = mnt / "huge"
    assert os.lstat(huge).st_size == size
    with open(huge, "rb") as f:
        fd = f.fileno()
        assert os.pread(fd, 4096 + 10, 0) == data[:4096] + bytes(10)
        assert os.pread(fd, 70_000 + 20, 3 * GiB - 10) == bytes(10) + data[4096:4096 + 70_000] + bytes(10)
        assert os.pread(fd, 100, size - 100) == bytes(50) + data[-50:]
        assert os.pread(fd, 4096, 4 * GiB + 12345) == bytes(4096)
    assert os.lstat(huge).st_blocks == 8 * (1 + 18 + 1)
    with open(mnt / "frag", "rb") as f:
        for i in (0, 1, 339, 340, 1000, 1499):
            assert os.pread(f.fileno(), 12, (i << 20) - 1 if i else 0) == (
                b"\0" + b"0123456789" + b"\0" if i else b"0123456789\0\0")
    assert os.lstat(mnt / "frag").st_blocks == 8 * (1500 + 6)  # data + 5 leaves + 1 index block
    assert (mnt / "after").read_bytes() == b"after"


@needs_root
@needs_e2fs
def test_released_data_leaves_the_image(tmp_path: Path, mounted: Any) -> None:
    image = tmp_path / "img.ext4"
    t = Tree(ext4_sink(image, journal=False), dir_sink(tmp_path / "ref"))
    secret = b"SECRET-MARKER-" * 300_000  # 4.2 MB
    t.file("a", rand(100_000, 1))
    t.file("secret", secret)
    t.file("b", rand(200_000, 2))
    t.file("old", b"OLD-MARKER-" * 50_000)
    t.file("c", rand(5000, 3))
    t.hardlink("c2", "c")
    t.dir("tree")
    for i in range(50):
        t.file(f"tree/x{i}", b"TREE-MARKER-%d" % i * 1000)
    t.remove("secret")
    t.remove("old")
    t.file("old", b"new")
    t.remove("c")
    for i in range(50):
        t.remove(f"tree/x{i}")
    t.file("late", rand(1 << 20, 4))  # reuses the secret's blocks
    t.finish()
    blob = image.read_bytes()
    assert b"SECRET-MARKER" not in blob and b"OLD-MARKER" not in blob and b"TREE-MARKER" not in blob
    assert "has_journal" not in dumpe2fs(image)["Filesystem features"]
    fsck(image)
    mnt = mounted(image, ro=True)
    differences = diff(snapshot(tmp_path / "ref"), snapshot(mnt))
    assert not differences, differences


@needs_e2fs
def test_rebuild_is_byte_identical_and_sizes(tmp_path: Path) -> None:
    digests = []
    for n in range(2):
        image = tmp_path / f"img{n}.ext4"
        t = Tree(ext4_sink(image))
        build_everything(t)
        t.remove("s4097")
        t.finish()
        digests.append(hashlib.sha256(image.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    fsck(tmp_path / "img0.ext4")

    # An explicit size and inode count are honoured; too small a size is a clear error.
    image = tmp_path / "sized.ext4"
    t = Tree(ext4_sink(image, size=300 * MiB, inodes=50_000))
    t.file("f", rand(5 * MiB, 1))
    t.finish()
    info = dumpe2fs(image)
    assert info["Block count"] == str(300 * MiB // 4096) and int(info["Inode count"]) >= 50_000
    assert info["Total journal blocks"] == "4096"  # as mke2fs -b 4096 sizes it for 300 MiB
    assert image.stat().st_size == 300 * MiB
    fsck(image)
    t = Tree(ext4_sink(tmp_path / "small.ext4", size=4 * MiB))
    t.file("f", rand(5 * MiB, 1))
    with pytest.raises(Ext4SizeError, match="too small"):
        t.finish()
    with pytest.raises(Ext4SizeError):
        ext4_sink(tmp_path / "odd.ext4", size=4097)


@needs_e2fs
def test_unstorable_xattrs_are_skipped_and_recorded(tmp_path: Path) -> None:
    image = tmp_path / "img.ext4"
    report = Report()
    sink = ext4_sink(image, report=report)
    t = Tree(sink)
    t.file("f", b"x", xattrs={"system.foo": b"1", "user.ok": b"2", "user.huge": bytes(70_000),
                              "user.a": b"a" * 3000, "user.b": b"b" * 3000})
    t.finish()
    assert len(sink.skipped) == 3 and len(report.skipped) == 3
    assert any("user.huge" in s for s in sink.skipped) and any("system.foo" in s for s in sink.skipped)
    assert any("no room" in s for s in sink.skipped)
    fsck(image)


def test_contract_errors(tmp_path: Path) -> None:
    sink = ext4_sink(tmp_path / "img.ext4")
    t = Tree(sink)
    node = Node(0o100000)
    node.size = 10
    with pytest.raises(Ext4Error):
        sink.file((b"x",), t.root, node, FileData(10, [b"abc"]))
    sink.close()
    sink.close()


@needs_e2fs
def test_largest_file_and_one_byte_more(tmp_path: Path) -> None:
    """A sparse file may claim any size: ext4's largest (2^32 - 1 blocks, its last byte written) is
    stored; one byte more is an Ext4Error naming the file (it was a struct.error from the extent
    packer at finish)."""
    image = tmp_path / "img.ext4"
    t = Tree(ext4_sink(image))
    top = fmt.MAX_FILE_SIZE
    t.file("largest", b"z", sparse=[(top - 1, 1)], realsize=top)
    t.finish()
    fsck(image)
    stat_out = subprocess.run(["debugfs", "-R", "stat /largest", str(image)], capture_output=True, text=True).stdout
    assert f"Size: {top}" in stat_out and f"({(1 << 32) - 2}):" in stat_out  # the extent of the last block
    t = Tree(ext4_sink(tmp_path / "over.ext4"))
    with pytest.raises(Ext4Error, match="over: a 17592186040321-byte file exceeds ext4's largest file"):
        t.file("over", b"z", sparse=[(top, 1)], realsize=top + 1)


@needs_root
@needs_e2fs
def test_pipeline_equals_unpack(tmp_path: Path, make_image, mounted: Any) -> None:
    """Real layers through the merge engine into an Ext4Sink, as ``write_erofs`` drives an ErofsSink."""
    ref = make_image(layered() + metadata())
    image = tmp_path / "img.ext4"
    source, resolved = open_image(ref)
    try:
        uuid, build = image_identity(resolved)
        apply_layers(source, resolved, lambda report: Ext4Sink(image, uuid=uuid, build_time_ns=build, report=report),
                     lambda: image.unlink(missing_ok=True))
    finally:
        source.close()
    fsck(image)
    unpack(ref, tmp_path / "tree")
    mnt = mounted(image, ro=True)
    differences = diff(snapshot(tmp_path / "tree"), snapshot(mnt))
    assert not differences, "\n".join(differences)


@needs_root
@needs_e2fs
def test_two_level_htree_and_inode_bound_size(tmp_path: Path, mounted: Any) -> None:
    """A directory of 12 000 long names (over 508 leaves: an index level under the root) and more
    inodes than one group can hold (the auto size grows to two groups for them)."""
    image = tmp_path / "img.ext4"
    t = Tree(ext4_sink(image))
    t.dir("big")
    names = [b"%06d-" % i + b"n" * 200 for i in range(12_000)]
    for name in names:
        t.file(b"big/" + name, name[:6])
    for i in range(30_000):
        t.symlink(b"l%d" % i, b"t")
    t.finish()
    fsck(image)
    htree = subprocess.run(["debugfs", "-R", "htree big", str(image)], capture_output=True).stdout.decode("latin-1")
    assert "Indirect levels: 1" in htree
    assert int(dumpe2fs(image)["Inode count"]) > 42_000
    mnt = mounted(image, ro=True)
    big = os.fsencode(mnt / "big")
    assert len(os.listdir(big)) == 12_000
    for name in names[::997] + names[-1:]:
        with open(os.path.join(big, name), "rb") as f:
            assert f.read() == name[:6]
    assert not os.path.lexists(os.path.join(big, b"012000-" + b"n" * 200))
