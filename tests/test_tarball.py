"""fsimage.tarball: a rootfs tree → one pax tar that GNU tar extracts back to the same tree."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import needs_root, needs_tool, require
from images import CAP_NET_RAW, layered, metadata
from treecmp import diff, snapshot

import dirge
from dirge.errors import DirgeError
from dirge.fsimage.tarball import write_tar

pytestmark = [needs_root, needs_tool("tar")]

NS = 123_456_789
BAD = b"bad-\xff\xfe"


def _set_acl(path: Path) -> None:
    require(shutil.which("setfacl") is not None, "needs setfacl (acl, installed by scripts/setup.sh --test)")
    subprocess.run(["setfacl", "-m", "u:4242:rw,g:4343:r", str(path)], check=True)


def build_tree(root: Path) -> dict[str, object]:
    """Every kind of entry the writer must keep; returns facts the tests check beyond treecmp."""
    root.mkdir()
    (root / "bin").mkdir()
    (root / "bin" / "su").write_bytes(b"setuid")
    (root / "bin" / "su").chmod(0o4755)
    (root / "bin" / "sg").write_bytes(b"setgid")
    os.chown(root / "bin" / "sg", 0, 50)
    (root / "bin" / "sg").chmod(0o2711)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "owned").write_bytes(b"o")
    os.chown(root / "owned", 12345, 54321)
    (root / "big-ids").write_bytes(b"b")
    os.chown(root / "big-ids", 4_000_000_000, 4_000_000_001)
    (root / "dir-owned").mkdir(mode=0o750)
    os.chown(root / "dir-owned", 4_000_000_000, 12345)
    (root / "big").write_bytes(os.urandom(3_000_000))
    (root / "empty").write_bytes(b"")
    (root / ("n" * 200)).write_bytes(b"long name")
    deep = root / ("a" * 100) / ("b" * 100) / ("c" * 100)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep")
    (root / os.fsdecode(BAD)).write_bytes(b"non-utf8")
    os.symlink(os.fsdecode(b"target-\xfe"), root / os.fsdecode(b"link-" + BAD))
    (root / "ünïcödé-名前").write_bytes(b"utf8")
    (root / "space and\ttab").write_bytes(b"ws")
    (root / "hl").mkdir()
    (root / "hl" / "one").write_bytes(b"shared")
    os.link(root / "hl" / "one", root / "hl" / "two")
    os.link(root / "hl" / "one", root / "three")
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop200", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.mknod(root / "dev" / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    os.mkfifo(root / "fifo", 0o620)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    sock.close()
    os.symlink("/does/not/exist", root / "dangling")
    os.symlink("/etc/passwd", root / "passwd-link")
    os.symlink("/", root / "slash")  # a walk that followed it would read the whole host
    os.symlink("../" + "t" * 150, root / "long-link")
    os.lchown(root / "dangling", 7, 8)
    # xattrs: binary user value, trusted, a file capability (after chown, which drops it), an ACL
    (root / "x").write_bytes(b"x")
    os.setxattr(root / "x", "user.x", b"\x00\xff\x01bin")
    os.setxattr(root / "x", "trusted.t", b"t")
    os.setxattr(root / "x", "user.a=b%c", b"=")  # "=" ends a pax keyword: escaped as GNU tar does
    (root / "ping").write_bytes(b"ping")
    os.chown(root / "ping", 0, 0)
    (root / "ping").chmod(0o755)
    os.setxattr(root / "ping", "security.capability", CAP_NET_RAW)
    (root / "acl").write_bytes(b"acl")
    _set_acl(root / "acl")
    os.setxattr(root / "dev", "user.dir", b"d")
    os.setxattr(root / "fifo", "trusted.fifo", b"f")  # user.* is for files and dirs only
    os.setxattr(root / "dangling", "trusted.link", b"l", follow_symlinks=False)
    # sparse: big holes (written as pax sparse), and one hole too small to be worth it (written dense)
    with open(root / "sparse", "wb") as f:
        f.seek(300_000)
        f.write(os.urandom(5000))
        f.seek(3_000_000)
        f.write(b"end")
        f.truncate(5_000_000)  # ends in a hole
    with open(root / "sparse-small", "wb") as f:
        f.write(b"a")
        f.seek(200_000)
        f.write(b"b")
    with open(root / "lastlog", "wb") as f:
        f.truncate(4_000_000)  # all hole, like lastlog after a useradd with a large uid
    (root / ("p" * 80)).mkdir()
    (root / ("p" * 80) / ("q" * 90)).write_bytes(b"ustar prefix/name split")
    (root / "mode0").write_bytes(b"")
    (root / "mode0").chmod(0)
    # nanosecond mtimes everywhere, one negative, leaves first so a directory's own mtime stays put
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root), key=lambda w: -len(w[0]))):
        for j, name in enumerate(dirnames + filenames):
            os.utime(os.path.join(dirpath, name), ns=(1_600_000_000 * 10**9 + i * 1000 + j * 10**9 + NS,) * 2,
                     follow_symlinks=False)
    os.utime(root / "empty", ns=(-1_500_000_000, -1_500_000_000))
    os.utime(root / "owned", ns=(86400 * 10**9,) * 2)
    os.chmod(root, 0o750)
    os.chown(root, 1, 2)
    os.setxattr(root, "user.root", b"\xffroot")
    os.utime(root, ns=(1_700_000_000 * 10**9 + NS,) * 2)
    return {"socket": "sock"}


def extract(tar: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    dest.mkdir()
    proc = subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(tar), "-C",
                           str(dest)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def all_mtimes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = os.lstat(full).st_mtime_ns
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    build_tree(tmp_path / "src")
    return tmp_path / "src"


def test_round_trip_through_gnu_tar(tree: Path, tmp_path: Path) -> None:
    report: list[str] = []
    out = tmp_path / "out.tar"
    with open(out, "wb") as f:
        n = write_tar(tree, f, report=report)
    assert n == out.stat().st_size and n % 512 == 0
    assert report == ["sock: socket, cannot be stored in a tar"]

    proc = extract(out, tmp_path / "dst")
    # no "unknown keyword" or other warnings; GNU tar always remarks on a pre-1970 mtime
    assert [line for line in proc.stderr.splitlines() if "implausibly old time stamp" not in line] == []
    want = snapshot(tree)
    del want["entries"]["sock"]
    got = snapshot(tmp_path / "dst")
    assert diff(want, got) == []
    assert ["hl/one", "hl/two", "three"] in got["hardlinks"]
    assert "system.posix_acl_access" in got["entries"]["acl"]["xattrs"]
    assert got["entries"]["ping"]["xattrs"] == {"security.capability": CAP_NET_RAW}
    assert got["entries"]["big-ids"]["uid"] == 4_000_000_000

    # treecmp keeps mtimes of regular files only: directories, symlinks, devices and fifos too
    want_m = all_mtimes(tree)
    del want_m["sock"]
    assert all_mtimes(tmp_path / "dst") == want_m
    assert os.lstat(tmp_path / "dst" / "empty").st_mtime_ns == -1_500_000_000

    # the holes come back as holes, the small one as data
    sparse = os.stat(tmp_path / "dst" / "sparse")
    assert sparse.st_size == 5_000_000 and sparse.st_blocks * 512 < 100_000
    lastlog = os.stat(tmp_path / "dst" / "lastlog")
    assert lastlog.st_size == 4_000_000 and lastlog.st_blocks == 0
    assert out.stat().st_size < 5_000_000  # 3 MB of data, not 12 MB of holes

    # the symlinks were stored, not followed: nothing of the host's / or /etc is in the tar
    names = subprocess.run(["tar", "--quoting-style=literal", "-tf", str(out)], capture_output=True, check=True).stdout.splitlines()
    assert names and not any(name.startswith((b"./", b"/")) for name in names)
    assert b"slash" in names and b"passwd-link" in names
    assert not any(name.startswith((b"slash/", b"etc")) for name in names)
    assert BAD in names and b"a" * 100 + b"/" + b"b" * 100 + b"/" + b"c" * 100 + b"/f" in names
    verbose = subprocess.run(["tar", "-tvf", str(out)], capture_output=True, check=True).stdout
    assert b" ./" not in verbose and b" /" not in verbose.replace(b"-> /", b"")

    # a second write of the same tree: the same bytes
    again = io.BytesIO()
    assert write_tar(tree, again) == n
    assert again.getvalue() == out.read_bytes()


def test_python_tarfile_reads_it(tree: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    write_tar(tree, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf, encoding="utf-8", errors="surrogateescape") as tf:
        members = {os.fsencode(m.name): m for m in tf.getmembers()}
        root = tf.pax_headers
        assert root["DIRGE.root.mode"] == "0750" and root["DIRGE.root.uid"] == "1"
        assert root["DIRGE.root.gid"] == "2" and root["DIRGE.root.mtime"] == f"1700000000.{NS}"
        assert BAD in members and members[b"dangling"].linkname == "/does/not/exist"
        assert os.fsencode(members[b"link-" + BAD].linkname) == b"target-\xfe"
        assert members[b"dev/null"].isdev() and (members[b"dev/null"].devmajor, members[b"dev/null"].devminor) \
            == (1, 3)
        assert members[b"dev/loop200"].isblk() and members[b"dev/loop200"].devminor == 200
        assert members[b"tmp"].isdir() and members[b"tmp"].mode == 0o1777
        assert members[b"bin/su"].mode == 0o4755 and members[b"owned"].uid == 12345
        assert members[b"hl/two"].islnk() and members[b"hl/two"].linkname == "hl/one"
        assert members[b"sparse"].issparse() and members[b"sparse"].size == 5_000_000
        assert not members[b"sparse-small"].issparse()
        assert members[b"x"].pax_headers["SCHILY.xattr.user.x"].encode("utf-8", "surrogateescape") \
            == b"\x00\xff\x01bin"
        extracted = tf.extractfile(members[b"sparse"])
        assert extracted is not None
        data = extracted.read()
        assert len(data) == 5_000_000 and data[:300_000] == bytes(300_000) and data[3_000_000:3_000_003] == b"end"
        assert b"sock" not in members
        assert root["DIRGE.root.xattr.user.root"].encode("utf-8", "surrogateescape") == b"\xffroot"
        split = members[b"p" * 80 + b"/" + b"q" * 90]
        assert "path" not in split.pax_headers and split.pax_headers.get("mtime")  # prefix field, no pax path
        assert members[b"lastlog"].issparse() and getattr(members[b"lastlog"], "sparse") == [(4_000_000, 0)]


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    buf = io.BytesIO()
    n = write_tar(tmp_path / "empty", buf)
    assert n == len(buf.getvalue()) == 4 * 512  # the root's global header and its records, two zero blocks
    (tmp_path / "out.tar").write_bytes(buf.getvalue())
    listed = subprocess.run(["tar", "-tvf", str(tmp_path / "out.tar")], capture_output=True, check=True)
    assert listed.stdout == b"" and listed.stderr == b""


def test_root_must_be_a_real_directory(tree: Path, tmp_path: Path) -> None:
    os.symlink(tree, tmp_path / "via-link")
    with pytest.raises(DirgeError, match="via-link"):
        write_tar(tmp_path / "via-link", io.BytesIO())


@pytest.mark.parametrize("layers", [layered, metadata], ids=["layered", "metadata"])
def test_dirge_unpack_round_trip(layers: object, make_image: object, tmp_path: Path) -> None:
    ref = make_image(layers())  # type: ignore[operator]
    dirge.unpack(ref, tmp_path / "rootfs")
    out = tmp_path / "image.tar"
    with open(out, "wb") as f:
        write_tar(tmp_path / "rootfs", f)
    extract(out, tmp_path / "dst")
    assert diff(snapshot(tmp_path / "rootfs"), snapshot(tmp_path / "dst")) == []
    assert all_mtimes(tmp_path / "dst") == all_mtimes(tmp_path / "rootfs")


@needs_tool("mkfs.erofs")
def test_from_a_mounted_erofs_image(tree: Path, tmp_path: Path) -> None:
    """The root of ``dirge export --format tar`` can be an erofs base: read-only, no SEEK_HOLE holes."""
    from dirge.fsimage.mount import erofs_supported, mount_erofs, unmount

    if not erofs_supported():
        pytest.skip("needs a kernel with erofs")
    os.unlink(tree / "sock")
    subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(tmp_path / "img.erofs"), str(tree)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(tmp_path / "img.erofs", mnt)
    try:
        out = tmp_path / "out.tar"
        with open(out, "wb") as f:
            write_tar(mnt, f)
        again = io.BytesIO()
        write_tar(mnt, again)
        assert again.getvalue() == out.read_bytes()
    finally:
        unmount(mnt)
    extract(out, tmp_path / "dst")
    assert diff(snapshot(tree), snapshot(tmp_path / "dst")) == []
    assert all_mtimes(tmp_path / "dst") == all_mtimes(tree)


def test_short_writes_to_a_raw_file(tree: Path) -> None:
    class Dribble(io.RawIOBase):
        """Takes at most 1000 bytes a call, as a raw pipe or socket may."""

        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            chunk = bytes(memoryview(b))[:1000]  # type: ignore[arg-type]
            self.data += chunk
            return len(chunk)

    whole, dribble = io.BytesIO(), Dribble()
    assert write_tar(tree, dribble) == write_tar(tree, whole)  # type: ignore[arg-type]
    assert bytes(dribble.data) == whole.getvalue()
