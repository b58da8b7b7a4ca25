"""Tar dialects (issue 14 item 1, issue 18): dirge reads whatever GNU tar reads, with GNU tar's result.

A corpus of layers written by GNU tar (``--format=v7|oldgnu|gnu|ustar|posix``, sparse and xattrs where the
format carries them, an incremental dump, a volume label), by ``bsdtar`` (libarchive) and by Python's
``tarfile`` (USTAR, GNU, PAX), from source trees holding what each format can carry: long names and link
targets, hardlinks, symlinks, empty directories, setuid/setgid/sticky modes, small and large owners, old,
far and sub-second mtimes, non-ASCII and non-UTF-8 names, a sparse file, xattrs, ACLs; and by busybox,
cpio and pax (tests/tar_corpus/README.md lists them all). Plus hand-made headers:
PAX global (``g``) and Solaris (``X``) records, ``hdrcharset``, base-256 numbers, signed checksums, star
headers, trailing garbage after the end blocks, and a multi-volume header (one clear ``DirgeError``);
and those of tests/tar_corpus/handmade.py: sizes on entries that carry no data, star's and Solaris'
ACLs, sparse maps GNU tar replays (some compared with bsdtar, where GNU tar does not read the dialect).

Each archive is applied by dirge as a one-layer image and compared with GNU tar's own extraction
(``tar -xpf --same-owner --numeric-owner --xattrs --acls``), for the tree sink, the erofs image writer (mounted)
and the ext4 export (loop-mounted). Regular files' mtimes are compared everywhere (as in
tests/test_conformance.py); directory and symlink mtimes too for the tree and erofs where GNU tar's own
result does not depend on its extraction order (every archive but bsdtar's: see ``all_mtimes``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge import unpack
from dirge.errors import DirgeError
from tar_corpus.handmade import (BSDTAR_REFERENCE, END, GNU_REFERENCE, base256, header, member, octal, pax,
                                 pax_linkdata)
from treecmp import diff, erofs_snapshot, ext4_disk_differences, snapshot

pytestmark = [needs_root, needs_tool("tar", "bsdtar")]

ENV = {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}
SMALL, BIG = (1000, 1000), (3_000_000, 4_000_000)  # BIG: beyond the 7 octal digits of ustar (2097151)
SUBSEC_NS = 1_600_000_000_123_456_789
OLD_NS = 86_400 * 1_000_000_000
FAR_NS = 9_000_000_000 * 1_000_000_000  # beyond 11 octal digits: base-256 in GNU headers

# What a format can carry (a source tree holds only that, so the writer does not refuse or mangle it).
LONG = "long"          # names > 100 bytes (ustar: <= 255, split at a slash)
VERYLONG = "verylong"  # names > 255 bytes, link targets > 100 bytes
BIGID = "bigid"        # owners > 2097151
XATTR = "xattr"
SPARSE = "sparse"
FARTIME = "fartime"    # mtimes beyond 8**11 seconds
DEVICES = "devices"    # FIFOs, character and block devices
ACLS = "acls"          # POSIX ACLs (access and default), named entries by number: 4242/4343 are nobody's


def make_tree(root: Path, caps: set[str]) -> Path:
    """A source tree with what ``caps`` allows; owners and times set as root."""
    root.mkdir()
    os.chmod(root, 0o755)

    def file(rel: str | bytes, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0),
             mtime_ns: int = SUBSEC_NS) -> None:
        path = os.path.join(os.fsencode(root), os.fsencode(rel))
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, *owner)
        os.chmod(path, mode)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    def mkdir(rel: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
        path = root / rel
        path.mkdir(parents=True)
        os.chown(path, *owner)
        os.chmod(path, mode)

    mkdir("etc")
    file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    file("etc/shadow", b"root:*:1::::::\n", mode=0o640, owner=(0, 42))
    mkdir("bin")
    file("bin/su", b"\x7fELF setuid", mode=0o4755)
    file("bin/wall", b"\x7fELF setgid", mode=0o2755, owner=(0, 5))
    file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755, owner=SMALL)
    os.link(root / "bin/tool", root / "bin/tool-hardlink")
    os.symlink("tool", root / "bin/tool-symlink")
    os.symlink("/etc/passwd", root / "bin/abs-symlink")
    os.symlink("../nowhere", root / "bin/dangling")
    mkdir("tmp", 0o1777)
    mkdir("shared", 0o2775, owner=(0, 50))
    mkdir("empty")
    mkdir("empty/nested", 0o700, owner=SMALL)
    mkdir("times")
    file("times/old", b"old", mtime_ns=OLD_NS)
    file("times/epoch", b"epoch", mtime_ns=0)
    file("times/subsec", b"subsec", mtime_ns=SUBSEC_NS)
    file("owners-small", b"small", owner=(12345, 54321))
    file("empty-file", b"")
    file("mode-000", b"no access", mode=0o000)
    file("blocks", os.urandom(3 * 512))  # data of exactly a few blocks: no padding
    file("big", os.urandom(70_000))  # above the size dirge keeps inline
    mkdir("names")
    file("names/café-ü-名前.txt", "utf-8".encode())
    file(b"names/bad-\xff\xfe-bytes", b"non-utf8")
    file("names/" + "x" * 91, b"99 bytes with ./names/: the longest v7 name")
    if LONG in caps:
        mkdir("d" * 90 + "/" + "e" * 60)
        file("d" * 90 + "/" + "e" * 60 + "/" + "f" * 90, b"a 243-byte path")
        os.symlink("x" * 99, root / "names/link-99")
    if VERYLONG in caps:
        deep = root / ("L" * 200) / ("M" * 200)
        deep.mkdir(parents=True)
        file(os.path.relpath(deep / ("N" * 150), root), b"a 552-byte path")
        os.link(deep / ("N" * 150), root / ("L" * 200) / ("hard-" + "h" * 120))
        os.link(root / ("d" * 90 + "/" + "e" * 60 + "/" + "f" * 90), root / "names/link-to-long")
        os.symlink("../" + "t" * 300, root / "names/long-target")
        os.symlink(os.path.relpath(deep / ("N" * 150), root / "names"), root / "names/link-to-deep")
        file("names/" + "é" * 60, "a 120-byte name of 2-byte characters".encode())
    if BIGID in caps:
        file("owners-big", b"big ids", owner=BIG)
        mkdir("dir-big-owner", owner=BIG)
        os.symlink("owners-big", root / "symlink-big-owner")
        os.lchown(root / "symlink-big-owner", *BIG)
    if FARTIME in caps:
        file("times/far", b"far future", mtime_ns=FAR_NS)
    if XATTR in caps:
        os.setxattr(root / "bin/tool", "user.bin", b"\x00\xff\x01")
        os.setxattr(root / "empty", "user.dir", b"on a directory")
        os.setxattr(root / "etc/passwd", "trusted.x", b"trusted")
    if DEVICES in caps:
        mkdir("dev")
        os.mkfifo(root / "dev/fifo", 0o620)
        os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "dev/loop9", 0o660 | 0o060000, os.makedev(7, 9))
        os.chown(root / "dev/loop9", 0, 6)
    if SPARSE in caps:
        mkdir("sparse")
        with open(root / "sparse/holes.bin", "wb") as f:  # 6 regions: more than an old GNU header holds
            for i in range(6):
                f.seek(i * 64 * 1024)
                f.write(bytes([i + 1]) * (1000 + i))
            f.truncate(1 << 20)  # ends in a hole
        with open(root / "sparse/all-hole.bin", "wb") as f:
            f.truncate(256 * 1024)
    if ACLS in caps:
        mkdir("acl", 0o750)
        file("acl/file", b"acl", mode=0o640)
        run(["setfacl", "-m", "u:4242:rwx,g:4343:r-x,m::rwx", str(root / "acl/file")])
        run(["setfacl", "-m", "u:4242:r-x", "-d", "-m", "u:4242:rwx,g:4343:r-x", str(root / "acl")])
        mkdir("acl/inherits")  # made after its parent's default ACL: it carries it, as access and default ACL
        file("acl/inherits/file", b"inherited")
    os.utime(root / "bin/tool-hardlink", ns=(SUBSEC_NS, SUBSEC_NS))
    return root


# -- archive writers -------------------------------------------------------------------------------------------------

def gnu(fmt: str, *extra: str) -> Callable[[Path, Path], None]:
    def write(src: Path, out: Path) -> None:
        extra_ = [x.replace("{snar}", str(out.with_suffix(".snar"))) for x in extra]
        run(["tar", f"--format={fmt}", *extra_, "--numeric-owner", "-C", str(src), "-cf", str(out), "."])
    return write


def bsd(fmt: str, *extra: str) -> Callable[[Path, Path], None]:
    def write(src: Path, out: Path) -> None:
        run(["bsdtar", "--format", fmt, *extra, "--numeric-owner", "-C", str(src), "-cf", str(out), "."])
    return write


def tool(*cmd: str, listing: bool = False) -> Callable[[Path, Path], None]:
    """Another writer, run in the source tree; ``{out}`` is the archive. ``listing``: the names come on
    stdin from ``find`` (cpio)."""
    def write(src: Path, out: Path) -> None:
        argv = [c.replace("{out}", str(out)) for c in cmd]
        run(["sh", "-c", "find . | " + shlex.join(argv)] if listing else argv, cwd=src)
    return write


def python(fmt: int) -> Callable[[Path, Path], None]:
    def write(src: Path, out: Path) -> None:
        with tarfile.open(out, "w", format=fmt) as tf:
            tf.add(str(src), arcname=".")
    return write


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=ENV, **kwargs)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stderr}"
    return proc


BASIC: set[str] = set()
USTAR = {LONG, DEVICES}
GNU_CAPS = {LONG, VERYLONG, BIGID, FARTIME, SPARSE, DEVICES}
POSIX_CAPS = GNU_CAPS | {XATTR}

CORPUS: dict[str, tuple[set[str], Callable[[Path, Path], None]]] = {
    "gnu-v7": (BASIC, gnu("v7")),
    "gnu-ustar": (USTAR, gnu("ustar")),
    "gnu-oldgnu": (GNU_CAPS, gnu("oldgnu", "--sparse")),
    "gnu-gnu": (GNU_CAPS, gnu("gnu", "--sparse")),
    "gnu-gnu-incremental": (GNU_CAPS, gnu("gnu", "--listed-incremental={snar}", "--label=volume label")),
    "gnu-posix": (POSIX_CAPS, gnu("posix", "--sparse", "--xattrs", "--xattrs-include=*")),
    "gnu-posix-sparse-0.0": (GNU_CAPS, gnu("posix", "--sparse", "--sparse-version=0.0")),
    "gnu-posix-sparse-0.1": (GNU_CAPS, gnu("posix", "--sparse", "--sparse-version=0.1")),
    "gnu-posix-sparse-1.0": (GNU_CAPS, gnu("posix", "--sparse", "--sparse-version=1.0")),
    "gnu-posix-acls": (GNU_CAPS | {ACLS}, gnu("posix", "--sparse", "--acls")),  # ACLs as text only
    "bsdtar-v7": (BASIC, bsd("v7")),
    "bsdtar-ustar": (USTAR, bsd("ustar")),
    "bsdtar-gnutar": ({LONG, VERYLONG, DEVICES}, bsd("gnutar")),
    "bsdtar-pax": (POSIX_CAPS, bsd("pax", "--xattrs")),
    "bsdtar-pax-restricted": (POSIX_CAPS - {XATTR}, bsd("paxr")),
    "bsdtar-pax-acls": (POSIX_CAPS | {ACLS}, bsd("pax", "--acls", "--xattrs")),
    "busybox-tar": (BASIC, tool("busybox", "tar", "-cf", "{out}", ".")),
    "cpio-ustar": (USTAR - {LONG}, tool("cpio", "--quiet", "-o", "-H", "ustar", "-O", "{out}", listing=True)),
    "cpio-v7": (BASIC, tool("cpio", "--quiet", "-o", "-H", "tar", "-O", "{out}", listing=True)),
    "pax-ustar": (USTAR, tool("pax", "-w", "-x", "ustar", "-f", "{out}", ".")),
    "pax-v7": (BASIC, tool("pax", "-w", "-x", "tar", "-f", "{out}", ".")),
    "python-ustar": (USTAR, python(tarfile.USTAR_FORMAT)),
    "python-gnu": (GNU_CAPS - {SPARSE}, python(tarfile.GNU_FORMAT)),
    "python-pax": (GNU_CAPS - {SPARSE}, python(tarfile.PAX_FORMAT)),
}
# Archives holding sparse members (the others store the holes as data).
SPARSE_ARCHIVES = {"gnu-oldgnu", "gnu-gnu", "gnu-posix", "gnu-posix-sparse-0.0", "gnu-posix-sparse-0.1",
                   "gnu-posix-sparse-1.0", "gnu-posix-acls", "bsdtar-pax", "bsdtar-pax-restricted", "bsdtar-pax-acls"}
# Writers that are not always there (scripts/setup.sh --test installs them).
CORPUS_TOOLS = {"busybox-tar": "busybox", "cpio-ustar": "cpio", "cpio-v7": "cpio", "pax-ustar": "pax", "pax-v7": "pax"}




def _corpus_params() -> list:
    params = []
    for name, (caps, _) in CORPUS.items():
        tools = ([CORPUS_TOOLS[name]] if name in CORPUS_TOOLS else []) + (["setfacl"] if ACLS in caps else [])
        params.append(pytest.param(name, marks=needs_tool(*tools)) if tools else name)
    return params


CORPUS_PARAMS = _corpus_params()


# -- comparison -----------------------------------------------------------------------------------------------------

def gnu_extract(archive: Path, dest: Path) -> None:
    dest.mkdir()
    old = os.umask(0o022)
    try:
        run(["tar", "-xpf", str(archive), "-C", str(dest), "--same-owner", "--numeric-owner", "--xattrs",
             "--xattrs-include=*", "--acls"])
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """``corpus(name) -> (archive path, GNU tar's extraction of it)``, each made once per module."""
    made: dict[str, tuple[Path, Path]] = {}
    base = tmp_path_factory.mktemp("dialects")

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            caps, writer = CORPUS[name]
            src = make_tree(base / f"src-{name}", caps)
            archive = base / f"{name}.tar"
            writer(src, archive)
            reference = base / f"ref-{name}"
            gnu_extract(archive, reference)
            made[name] = (archive, reference)
        return made[name]

    return get


def all_mtimes(name: str) -> bool:
    """Directory and symlink mtimes too, where GNU tar restores them all: bsdtar lists a directory's
    subdirectories before its files, and GNU tar sets a directory's time once it has left it, so a file
    written into it later moves that time (an artifact of its extraction order, not the archive's)."""
    return not name.startswith("bsdtar-")


def assert_same(ours: dict, theirs: dict, what: str) -> None:
    differences = diff(ours, theirs)
    assert not differences, f"{what} vs GNU tar:\n" + "\n".join(differences)


def assert_ext4_same(ref: str, reference: dict, tmp_path: Path) -> None:
    """The ext4 export, made in a private cache (a shared one would hand back a disk built earlier)."""
    from dirge import export
    from dirge.store.cache import Cache

    disk = export(ref, tmp_path / "root.ext4", format="ext4", cache=Cache(tmp_path / "cache")).path
    differences = ext4_disk_differences(disk, reference, tmp_path / "mnt")
    assert not differences, "ext4 vs GNU tar:\n" + "\n".join(differences)


@pytest.mark.parametrize("name", CORPUS_PARAMS)
def test_tree_equals_gnu_tar(name: str, corpus, make_image, tmp_path: Path) -> None:
    archive, reference = corpus(name)
    ref = make_image([archive.read_bytes()])
    unpack(ref, tmp_path / "tree")
    every = all_mtimes(name)
    assert_same(snapshot(tmp_path / "tree", all_mtimes=every), snapshot(reference, all_mtimes=every), "tree")
    holes = tmp_path / "tree/sparse/holes.bin"
    if name in SPARSE_ARCHIVES:
        assert holes.stat().st_blocks * 512 < 200_000, "the holes were written out as zeros"


@needs_tool("fsck.erofs")
@pytest.mark.parametrize("name", CORPUS_PARAMS)
def test_erofs_equals_gnu_tar(name: str, corpus, make_image, tmp_path: Path) -> None:
    archive, reference = corpus(name)
    ref = make_image([archive.read_bytes()])
    every = all_mtimes(name)
    assert_same(erofs_snapshot(ref, tmp_path, every), snapshot(reference, all_mtimes=every), "erofs")


@needs_tool("e2fsck")
@pytest.mark.parametrize("name", CORPUS_PARAMS)
def test_ext4_equals_gnu_tar(name: str, corpus, make_image, tmp_path: Path) -> None:
    archive, reference = corpus(name)
    assert_ext4_same(make_image([archive.read_bytes()]), snapshot(reference), tmp_path)


# -- hand-made headers -----------------------------------------------------------------------------------------------


HANDMADE: dict[str, bytes] = {
    # PAX global headers: their records hold for every later member, until overridden by an `x` record or
    # replaced by a later `g` header.
    "pax-global": (
        pax([("uid", "4242"), ("gid", "4343"), ("mtime", "1234567890.25")], b"g", b"pax_global_header")
        + member(b"a", b"under the first global header")
        + pax([("uid", "7"), ("mtime", "1000")]) + member(b"b", b"x overrides g")
        + member(b"dir/", type_=b"5", mode=0o750)
        + pax([("mtime", "2000000000.5"), ("gid", "99")], b"g", b"pax_global_header")
        + member(b"dir/c", b"under the second global header", uid=5)
        + END
    ),
    # Solaris tar's `X`: an extended header read like `x`.
    "solaris-X": (
        pax([("path", "solaris/" + "s" * 200), ("uid", "3000000"), ("mtime", "1600000000.75")], b"X")
        + member(b"solaris/truncated", b"named and owned by an X header")
        + pax([("linkpath", "solaris/" + "s" * 200)], b"X") + member(b"solaris/hard", type_=b"1")
        + END
    ),
    # Every override a PAX header can carry, on top of ustar fields saying otherwise.
    "pax-overrides": (
        pax([("size", "11")]) + header(b"sized", size=0) + b"eleven byte" + bytes(501)
        + pax([("path", "over/ridden"), ("uid", "2097152"), ("gid", "4294967294"), ("uname", "nobody"),
               ("gname", "nogroup"), ("mtime", "-86400.5"), ("atime", "1"), ("comment", "ignored")])
        + member(b"not-this-name", b"data", uid=1, gid=1)
        + pax([("linkpath", "over/ridden")]) + member(b"hard", type_=b"1", linkname=b"wrong")
        + pax([("linkpath", "../" + "t" * 200)]) + member(b"sym", type_=b"2", linkname=b"wrong")
        + pax([("hdrcharset", "BINARY"), ("path", b"bin\xff\xfeary")]) + member(b"x", b"binary name")
        + pax([("path", "utf8-名前")]) + member(b"y", b"utf-8 name")
        + END
    ),
    # GNU base-256 numbers: uid, gid, size and mtime (a negative one too).
    "base-256": (
        member(b"big-uid", b"base-256 owner", uid=base256(5_000_000, 8), gid=base256(6_000_000, 8))
        + member(b"big-size", b"size in base-256", size=base256(16, 12))
        + member(b"neg-mtime", b"before the epoch", mtime=base256(-86_400, 12))
        + member(b"far-mtime", b"far future", mtime=base256(10_000_000_000, 12))
        + END
    ),
    # Old tars summed the header as signed chars: a name with high bytes then has a different checksum.
    "signed-checksum": member("café-signed".encode(), b"signed", signed=True, uid=base256(3_000_000, 8)) + END,
    "trailing-garbage": member(b"kept", b"before the end") + END + os.urandom(3000),
    # tar's -1 owner (4294967295): GNU tar's chown leaves the id as it is, 0 for a new inode, the existing
    # directory's for a directory entry over it (found by the fuzzer, tests/test_fuzz.py).
    "owner-minus-one": (
        member(b"a/", type_=b"5", uid=5, gid=1000, mode=0o750)
        + pax([("uid", "4294967295"), ("gid", "4294967295")]) + member(b"a/", type_=b"5", mode=0o755)
        + pax([("gid", "4294967295")]) + member(b"a/new", b"new file", uid=7)
        + END
    ),
    # One zero block ends the archive for GNU tar (it warns of "a lone zero block"): what follows is ignored.
    "lone-zero-block": member(b"kept", b"before") + bytes(512) + member(b"ignored", b"after") + END,
    # No end blocks at all.
    "no-end-blocks": member(b"kept", b"no end"),
    # star (Schily): ustar magic, prefix of 131 bytes, atime/ctime, "tar\0" at byte 508.
    "star": (
        member(b"file", b"from star", prefix=b"star/" + b"p" * 120,
               tail=octal(1_400_000_000, 12) + octal(1_400_000_001, 12) + b"\0" * 8 + b"tar\0")
        + END
    ),
    # v7: no magic, regular files as type NUL, directories by a trailing slash; type 7 (contiguous) is a file.
    "v7-and-types": (
        member(b"v7dir/", type_=b"\0", mode=0o711, magic=bytes(8))
        + member(b"v7dir/file", b"v7 file", type_=b"\0", magic=bytes(8))
        + member(b"contiguous", b"type 7", type_=b"7")
        + member(b"slash-regular/", type_=b"0", mode=0o700)
        + pax([("path", "pax-path-slash/")]) + member(b"file", type_=b"0", mode=0o701)
        + END
    ),
}


def gnu_reference(archive: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "archive.tar"
    path.write_bytes(archive)
    gnu_extract(path, tmp_path / "gnu")
    return snapshot(tmp_path / "gnu")


# The hand-made archives above plus those of tests/tar_corpus (writers we cannot run, GNU tar reads them).
GNU_HANDMADE = {**HANDMADE, **GNU_REFERENCE}


# What GNU tar does not read as its writers meant and libarchive does: Solaris ``A`` ACL headers (GNU tar
# extracts them as files), star's ACLs with names it would look up on the host (the ids are in the
# archive), a pax hardlink that carries data (GNU tar stops: "Skipping to next header").
BSD_HANDMADE = {**BSDTAR_REFERENCE, "pax-linkdata": pax_linkdata()}


def bsdtar_reference(archive: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "archive.tar"
    path.write_bytes(archive)
    (tmp_path / "bsdtar").mkdir()
    old = os.umask(0o022)
    try:
        run(["bsdtar", "--acls", "--xattrs", "--numeric-owner", "-xpf", str(path), "-C", str(tmp_path / "bsdtar")])
    finally:
        os.umask(old)
    return snapshot(tmp_path / "bsdtar")


# Each hand-made archive against the reader that extracts it as its writer meant.
HANDMADE_CASES = {**{f"gnu-{name}": (gnu_reference, archive) for name, archive in GNU_HANDMADE.items()},
                  **{f"bsdtar-{name}": (bsdtar_reference, archive) for name, archive in BSD_HANDMADE.items()}}


@pytest.mark.parametrize("case", list(HANDMADE_CASES))
def test_handmade_tree_equals_reference(case: str, make_image, tmp_path: Path) -> None:
    reference, archive = HANDMADE_CASES[case]
    expected = reference(archive, tmp_path)
    unpack(make_image([archive]), tmp_path / "tree")
    assert_same(snapshot(tmp_path / "tree"), expected, "tree")


@needs_tool("fsck.erofs")
@pytest.mark.parametrize("case", list(HANDMADE_CASES))
def test_handmade_erofs_equals_reference(case: str, make_image, tmp_path: Path) -> None:
    reference, archive = HANDMADE_CASES[case]
    expected = reference(archive, tmp_path)
    assert_same(erofs_snapshot(make_image([archive]), tmp_path), expected, "erofs")


@needs_tool("e2fsck")
@pytest.mark.parametrize("case", list(HANDMADE_CASES))
def test_handmade_ext4_equals_reference(case: str, make_image, tmp_path: Path) -> None:
    reference, archive = HANDMADE_CASES[case]
    expected = reference(archive, tmp_path)
    assert_ext4_same(make_image([archive]), expected, tmp_path)


@needs_tool("getfacl")
def test_acls_read_back_as_written(make_image, tmp_path: Path) -> None:
    """``getfacl`` on the tree shows the ACLs star and Solaris wrote (ids as numbers)."""
    unpack(make_image([BSDTAR_REFERENCE["solaris-acls"]]), tmp_path / "tree")
    shown = run(["getfacl", "-n", "-p", "file", "dir"], cwd=tmp_path / "tree").stdout
    for line in ("user:4242:rwx", "group:4343:r-x", "mask::rwx", "default:user:4242:r-x", "default:mask::r-x"):
        assert line in shown, shown


def test_an_acl_naming_a_user_without_an_id_is_left_out_and_reported(make_image, tmp_path: Path) -> None:
    """GNU tar looks such a name up on the host and warns when it is unknown; dirge never consults the
    host's users: the member is extracted without the ACL, and the report says so."""
    archive = (pax([("SCHILY.acl.access", "user::rw-,user:lisa:rwx,group::r--,mask::rwx,other::---")])
               + member(b"file", b"x", mode=0o640) + END)
    result = unpack(make_image([archive]), tmp_path / "tree")
    assert "system.posix_acl_access" not in os.listxattr(tmp_path / "tree/file")
    assert oct(os.stat(tmp_path / "tree/file").st_mode & 0o7777) == "0o640"
    assert any(s.startswith("file: system.posix_acl_access left out") and "'lisa' has no numeric id" in s
               for s in result.report.skipped), result.report.skipped


def test_a_solaris_nfsv4_acl_is_left_out_and_reported(make_image, tmp_path: Path) -> None:
    """Solaris ``A`` headers also carry NFSv4 ACLs (type 2), which have no POSIX ACL form."""
    archive = (member(b"file", b"2000002\0owner@:rwxp:allow,everyone@:r:allow\0", type_=b"A")
               + member(b"file", b"x", mode=0o640) + END)
    result = unpack(make_image([archive]), tmp_path / "tree")
    assert (tmp_path / "tree/file").read_bytes() == b"x"
    assert os.listxattr(tmp_path / "tree/file") == []
    assert "file: Solaris ACL of type 2000000 (not a POSIX ACL) left out" in result.report.skipped


# Archives GNU tar extracts that go past one of the parser's limits: they stop only there, with an error
# naming it, and a raised limit (``--limit NAME=N``) lets them through with GNU tar's result.
def _sparse_many(regions: int) -> bytes:
    return (pax([("GNU.sparse.major", "0"), ("GNU.sparse.minor", "1"), ("GNU.sparse.name", "many"),
                 ("GNU.sparse.size", str(regions * 8192)), ("GNU.sparse.numblocks", str(regions)),
                 ("GNU.sparse.map", ",".join("%d,512" % (i * 8192) for i in range(regions)))])
            + member(b"GNUSparseFile.0/many", b"s" * 512 * regions) + END)


OVER_LIMITS = {
    "max_header_bytes": (pax([("comment", "c" * (2 << 20)), ("SCHILY.xattr.user.k", "v")])
                         + member(b"file", b"after a 2 MiB PAX header") + END, 3 << 20),
    "max_global_records": (pax([(f"comment.{i}", "v") for i in range(100)] + [("uid", "77")], b"g",
                               b"pax_global_header") + member(b"file", b"owned by a global record") + END, 200),
    "max_sparse_regions": (_sparse_many(300), 1000),
}


@pytest.mark.parametrize("limit", list(OVER_LIMITS))
def test_only_a_named_settable_limit_stops_what_gnu_tar_extracts(limit: str, make_image, tmp_path: Path) -> None:
    import dataclasses

    from dirge.apply.layer import Limits
    from dirge.cli import _limits
    from dirge.errors import LimitExceeded

    archive, enough = OVER_LIMITS[limit]
    reference = gnu_reference(archive, tmp_path)
    ref = make_image([archive])
    low = dataclasses.replace(Limits(), **{limit: 100 if limit == "max_sparse_regions" else getattr(Limits(), limit)})
    with pytest.raises(LimitExceeded, match=f"limit {limit} .*--limit {limit}=N"):
        unpack(ref, tmp_path / "stopped", limits=low)
    assert _limits((f"{limit}={enough}",)) == dataclasses.replace(Limits(), **{limit: enough})
    unpack(ref, tmp_path / "tree", limits=_limits((f"{limit}={enough}",)))
    assert_same(snapshot(tmp_path / "tree"), reference, "tree")


REFUSED = {
    # GNU tar cannot extract a member continued from another volume either (it says so and exits 2).
    "gnu-multi-volume": (member(b"continued", b"rest of a file", type_=b"M") + member(b"after", b"x") + END,
                         "continued from another volume: GNU multi-volume archives are not supported"),
    # GNU tar: "Malformed extended header: invalid uid=".
    "pax-empty-uid": (pax([("uid", "")]) + member(b"e", b"x") + END, "bad PAX uid value"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_one_clear_error(name: str, make_image, tmp_path: Path) -> None:
    archive, message = REFUSED[name]
    with pytest.raises(DirgeError, match=message):
        unpack(make_image([archive]), tmp_path / "tree")


# -- the corpus holds what it claims -------------------------------------------------------------------------------

def header_features(archive: bytes) -> set[str]:
    """Type flags (``type:S``), GNU sparse extension blocks, base-256 fields, magics and PAX keywords seen."""
    seen: set[str] = set()
    pos = 0
    while pos + 512 <= len(archive):
        h = archive[pos:pos + 512]
        if h == bytes(512):
            break
        seen.add(f"type:{h[156:157].decode('latin-1')}")
        seen.add({b"ustar\x0000": "magic:ustar", b"ustar  \0": "magic:gnu"}.get(h[257:265], "magic:v7"))
        seen.update("base256" for off in (108, 116, 124, 136) if h[off] & 0x80)
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8) if not h[124] & 0x80 else 0
        pos += 512
        if h[156:157] == b"S":
            extended = h[482]
            while extended:
                seen.add("sparse-extension-block")
                extended = archive[pos + 504]
                pos += 512
        if h[156:157] in (b"x", b"g"):
            for record in archive[pos:pos + size].split(b"\n"):
                key = record.partition(b" ")[2].partition(b"=")[0].decode()
                seen.add(key.split(".")[0] + "." + key.split(".")[1] if key.count(".") >= 2 else key)
        pos += -(-size // 512) * 512
    return seen


EXPECTED_FEATURES = {
    "gnu-v7": {"magic:v7", "type:2", "type:1"},
    "gnu-ustar": {"magic:ustar", "type:5", "type:2", "type:1", "type:3", "type:4", "type:6"},
    "gnu-oldgnu": {"magic:gnu", "type:S", "sparse-extension-block", "type:L", "type:K", "base256"},
    "gnu-gnu": {"magic:gnu", "type:S", "sparse-extension-block", "type:L", "type:K", "base256"},
    "gnu-gnu-incremental": {"type:D", "type:V", "type:L", "type:K", "base256"},
    "gnu-posix": {"type:x", "path", "linkpath", "uid", "mtime", "GNU.sparse", "SCHILY.xattr"},
    "gnu-posix-sparse-0.0": {"type:x", "GNU.sparse"},
    "gnu-posix-sparse-0.1": {"type:x", "GNU.sparse"},
    "gnu-posix-sparse-1.0": {"type:x", "GNU.sparse"},
    "gnu-posix-acls": {"type:x", "SCHILY.acl", "GNU.sparse"},
    "bsdtar-v7": {"magic:v7", "type:\0", "type:2", "type:1"},
    "bsdtar-ustar": {"magic:ustar", "type:5"},
    "bsdtar-gnutar": {"magic:gnu", "type:L", "type:K"},
    "bsdtar-pax": {"type:x", "path", "linkpath", "hdrcharset", "GNU.sparse", "LIBARCHIVE.xattr", "SCHILY.xattr"},
    "bsdtar-pax-restricted": {"type:x", "path", "hdrcharset", "GNU.sparse"},
    "bsdtar-pax-acls": {"type:x", "SCHILY.acl", "GNU.sparse"},
    "busybox-tar": {"magic:gnu", "type:5", "type:1", "type:2"},
    "cpio-ustar": {"magic:ustar", "type:5", "type:1", "type:2", "type:3", "type:4", "type:6"},
    "cpio-v7": {"magic:v7", "type:5", "type:1", "type:2"},
    "pax-ustar": {"magic:ustar", "type:5", "type:1", "type:2", "type:3", "type:4", "type:6"},
    "pax-v7": {"magic:v7", "type:\0", "type:1", "type:2"},
    "python-ustar": {"magic:ustar", "type:5"},
    "python-gnu": {"magic:gnu", "type:L", "type:K", "base256"},
    "python-pax": {"type:x", "path", "linkpath", "uid", "hdrcharset", "mtime"},
}


@pytest.mark.parametrize("name", CORPUS_PARAMS)
def test_corpus_exercises_its_dialect(name: str, corpus) -> None:
    archive, _ = corpus(name)
    missing = EXPECTED_FEATURES[name] - header_features(archive.read_bytes())
    assert not missing, f"{name} lacks {sorted(missing)}"


def test_sparse_replay_keeps_what_a_byte_by_byte_replay_keeps() -> None:
    """Maps out of order, overlapping and truncating (zero-length regions): the pieces dirge keeps are
    exactly the bytes GNU tar's replay leaves, each from the last region that wrote it."""
    import random

    from dirge.apply.tar import _live_pieces

    rng = random.Random(18)
    for _ in range(3000):
        regions = [(rng.randint(0, 60), rng.choice([0, rng.randint(1, 20)])) for _ in range(rng.randint(1, 8))]
        owner: dict[int, int] = {}
        for i, (off, length) in enumerate(regions):
            if not length:
                owner = {x: w for x, w in owner.items() if x < off}
            owner.update((x, i) for x in range(off, off + length))
        kept = _live_pieces(regions)
        for i, pieces in enumerate(kept):
            assert all(a < b for a, b in pieces) and all(pieces[j][1] <= pieces[j + 1][0] for j in range(len(pieces) - 1))
            assert {x for a, b in pieces for x in range(a, b)} == {x for x, w in owner.items() if w == i}, regions


@pytest.mark.parametrize("chunk", [1, 7, 511, 513])
def test_parse_does_not_depend_on_chunk_boundaries(chunk: int) -> None:
    """The look-ahead for pax link data and the sparse steps cross chunk boundaries: every hand-made
    archive gives the same entries and data read in tiny chunks as read whole."""
    from dirge.apply.tar import Entry, tokens

    def parse(archive: bytes, size: int) -> list:
        out: list = []
        for token in tokens(archive[i:i + size] for i in range(0, len(archive), size)):
            if isinstance(token, Entry):
                out.append([token.name, token.type, token.mode, token.sparse, token.file_size, token.xattrs,
                            b"".join(token.inline or [])])
            else:
                out[-1][-1] += bytes(token)
        return out

    for archive in [*GNU_HANDMADE.values(), *BSD_HANDMADE.values()]:
        assert parse(archive, chunk) == parse(archive, len(archive))


def _cpython_testtar() -> bytes:
    """CPython's own tarfile test archive (Debian's libpython3.11-testsuite; scripts/setup.sh --test):
    v7, ustar, GNU and pax members, old GNU and pax sparse files, HP-UX signed checksums, owner -1."""
    import glob
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    for pattern in (f"{stdlib}/test/archivetestdata/testtar.tar", f"{stdlib}/test/testtar.tar",
                    "/usr/lib/python3*/test/archivetestdata/testtar.tar", "/usr/lib/python3*/test/testtar.tar"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1]).read_bytes()
    pytest.skip("CPython's test package (testtar.tar) is not installed")


@pytest.mark.parametrize("sink", ["tree", "erofs", "ext4"])
def test_cpython_testtar_equals_gnu_tar(sink: str, make_image, tmp_path: Path) -> None:
    archive = _cpython_testtar()
    reference = gnu_reference(archive, tmp_path)
    ref = make_image([archive])
    if sink == "tree":
        unpack(ref, tmp_path / "tree")
        assert_same(snapshot(tmp_path / "tree"), reference, "tree")
    elif sink == "erofs":
        assert_same(erofs_snapshot(ref, tmp_path), reference, "erofs")
    else:
        assert_ext4_same(ref, reference, tmp_path)
