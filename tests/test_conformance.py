"""Conformance: dirge unpack produces the same tree as umoci raw unpack, rule by rule."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge import unpack
from dirge.layerbuild import LayerBuilder
from treecmp import diff, snapshot

# cap_net_raw+ep, VFS_CAP_REVISION_2
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
UMOCI = needs_tool("umoci")


def gnu_tar(tmp: Path, fmt: str, *extra: str) -> bytes:
    """A layer written by GNU tar itself (sparse files, GNU long names), for formats tarfile cannot write."""
    src = tmp / f"src-{fmt}{''.join(extra)}"
    src.mkdir()
    (src / "sparse").mkdir()
    with open(src / "sparse" / "holes.bin", "wb") as f:
        f.seek(300_000)
        f.write(os.urandom(5000))
        f.seek(2_000_000)
        f.write(b"end")
    deep = src / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"long")
    os.symlink("../" + "t" * 150, src / "sparse" / "longlink")
    out = tmp / f"{src.name}.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", *extra, "--numeric-owner", "-C", str(src), "-cf",
                    str(out), "."], check=True)
    return out.read_bytes()


def layered() -> list[bytes]:
    base = (
        LayerBuilder()
        .dir("etc").dir("usr").dir("usr/bin").dir("var").dir("var/lib")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n", mode=0o600, uid=0, gid=4)
        .dir("etc/conf.d").file("etc/conf.d/a", b"a").file("etc/conf.d/b", b"b")
        .dir("opq").file("opq/lower1", b"l1").dir("opq/sub").file("opq/sub/lower2", b"l2")
        .dir("opq2").file("opq2/lower", b"x").file("opq2/keep", b"lower-keep")
        .file("to-dir", b"was a file").dir("to-file").file("to-file/child", b"c")
        .file("to-link", b"was a file").symlink("link-to-file", "etc/passwd")
        .file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755, uid=1000, gid=1000)
        .dir("var/lib/gone").file("var/lib/gone/x", b"x")
    )
    top = (
        LayerBuilder()
        .whiteout("etc/hosts")
        .whiteout("var/lib/gone")
        .file("opq/new-before", b"same layer, before marker")
        .opaque("opq")
        .file("opq/new-after", b"same layer, after marker")
        .opaque("opq2")
        .file("opq2/keep", b"re-added in the opaque layer")
        .dir("to-dir", mode=0o711).file("to-dir/inside", b"i")
        .file("to-file", b"now a file")
        .symlink("to-link", "/etc/passwd")
        .file("link-to-file", b"symlink replaced by a file")
        .hardlink("usr/bin/tool-hardlink", "usr/bin/tool")
    )
    return [base.build(), top.build()]


def metadata() -> list[bytes]:
    meta = (
        LayerBuilder()
        .dir("m", mode=0o755)
        .file("m/setuid", b"s", mode=0o4755).file("m/setgid", b"g", mode=0o2711, gid=50)
        .dir("m/sticky", mode=0o1777)
        .file("m/cap", b"c", mode=0o755, xattrs={"security.capability": CAP_NET_RAW})
        .file("m/user-xattr", b"u", xattrs={"user.one": b"1", "user.bin": b"\x00\xff\x01"})
        .file("m/trusted-xattr", b"t", xattrs={"trusted.overlay.test": b"y"})
        .dir("m/xdir", xattrs={"user.dir": b"d"})
        .file("m/owned", b"o", uid=12345, gid=54321, mode=0o640)
        .file("m/old", b"old", mtime=86400)
        .file("m/frac", b"frac", mtime=1_600_000_000.5)
        .fifo("m/fifo", mode=0o620)
        .device("m/null", 1, 3, mode=0o666)
        .device("m/blk", 7, 200, block=True, mode=0o660)
        .symlink("m/dangling", "/does/not/exist", uid=7, gid=8)
        .file("m/" + "n" * 200, b"long name")
        .dir("m/" + "p" * 120).file("m/" + "p" * 120 + "/" + "q" * 150, b"long path")
        .hardlink("m/" + "h" * 140, "m/" + "n" * 200)
        .file("m/ünïcödé-名前", b"utf8")
        .file("m/bad-\udcff\udcfe-bytes", b"non-utf8")
        .file("m/space and\ttab", b"ws")
    )
    return [meta.build()]


CASES = {
    "whiteouts-and-replacement": lambda tmp: layered(),
    "metadata": lambda tmp: metadata(),
    "gnu-tar": lambda tmp: [gnu_tar(tmp, "gnu")],
    "pax-sparse-1.0": lambda tmp: [gnu_tar(tmp, "posix")],
    "pax-sparse-0.1": lambda tmp: [gnu_tar(tmp, "posix", "--sparse-version=0.1")],
    "pax-sparse-0.0": lambda tmp: [gnu_tar(tmp, "posix", "--sparse-version=0.0")],
    "empty-layer": lambda tmp: [LayerBuilder().dir("x").build(), LayerBuilder().build(), b""],
}
CASE_NAMES = list(CASES)
GNU_ONLY = {"gnu-tar"}




def umoci_unpack(ref: str, dest: Path, *, user: list[str] | None = None, rootless: bool = False) -> None:
    layout, _, tag = ref[len("oci:"):].rpartition(":")
    bundle = dest.parent / (dest.name + ".umoci")
    cmd = ["umoci", "raw", "unpack", *(["--rootless"] if rootless else []), "--image", f"{layout}:{tag}", str(bundle)]
    subprocess.run((user or []) + cmd, check=True, capture_output=True)
    os.rename(bundle, dest)


@needs_root
@UMOCI
@pytest.mark.parametrize("name", CASE_NAMES)
def test_same_tree_as_umoci(name: str, tmp_path: Path, make_image) -> None:
    layers = CASES[name](tmp_path)
    ref = make_image(layers)
    ours, theirs = tmp_path / "dirge", tmp_path / "reference"
    unpack(ref, ours)
    if name in GNU_ONLY:  # umoci 0.4 rejects old-GNU sparse entries: GNU tar itself is the reference
        theirs.mkdir()
        (tmp_path / "layer.tar").write_bytes(layers[0])
        subprocess.run(["tar", "--numeric-owner", "-xf", str(tmp_path / "layer.tar"), "-C", str(theirs)], check=True)
    else:
        umoci_unpack(ref, theirs)
    differences = diff(snapshot(ours), snapshot(theirs))
    assert not differences, "\n".join(differences)


@needs_root
def test_layer_rules_hold(tmp_path: Path, make_image) -> None:
    """The rules themselves, independent of any reference tool."""
    ref = make_image(layered() + metadata())
    dest = tmp_path / "rootfs"
    unpack(ref, dest)
    assert not (dest / "etc/hosts").exists() and (dest / "etc/passwd").exists()
    assert not (dest / "var/lib/gone").exists() and (dest / "var/lib").is_dir()
    assert sorted(os.listdir(dest / "opq")) == ["new-after", "new-before"]
    assert sorted(os.listdir(dest / "opq2")) == ["keep"]
    assert (dest / "opq2/keep").read_bytes() == b"re-added in the opaque layer"
    assert (dest / "to-dir").is_dir() and (dest / "to-dir/inside").read_bytes() == b"i"
    assert (dest / "to-file").read_bytes() == b"now a file"
    assert os.readlink(dest / "to-link") == "/etc/passwd"
    assert not (dest / "link-to-file").is_symlink()
    tool, linked = os.stat(dest / "usr/bin/tool"), os.stat(dest / "usr/bin/tool-hardlink")
    assert (tool.st_ino, tool.st_nlink) == (linked.st_ino, 2)
    assert (tool.st_uid, tool.st_gid) == (1000, 1000)
    st = os.stat(dest / "m/setuid")
    assert st.st_mode & 0o7777 == 0o4755
    assert os.stat(dest / "m/sticky").st_mode & 0o7777 == 0o1777
    assert os.getxattr(dest / "m/cap", "security.capability") == CAP_NET_RAW
    assert os.getxattr(dest / "m/user-xattr", "user.bin") == b"\x00\xff\x01"
    assert os.stat(dest / "m/frac").st_mtime_ns == 1_600_000_000_500_000_000
    assert os.stat(dest / "m/old").st_mtime == 86400
    import stat as st_
    assert st_.S_ISFIFO(os.lstat(dest / "m/fifo").st_mode)
    assert os.lstat(dest / "m/null").st_rdev == os.makedev(1, 3)
    assert os.lstat(dest / "m/dangling").st_uid == 7
    assert (dest / os.fsdecode(b"m/bad-\xff\xfe-bytes")).read_bytes() == b"non-utf8"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(dest) for n in ds + fs)


@needs_root
def test_sparse_files_keep_holes(tmp_path: Path, make_image) -> None:
    for fmt in ("gnu", "posix"):
        ref = make_image([gnu_tar(tmp_path, fmt)])
        dest = tmp_path / f"out-{fmt}"
        unpack(ref, dest)
        st = os.stat(dest / "sparse/holes.bin")
        assert st.st_size == 2_000_003
        assert st.st_blocks * 512 < 200_000, "holes were written out as zeros"


@needs_root
@UMOCI
@needs_tool("setpriv")
@pytest.mark.parametrize("name", [n for n in CASE_NAMES if n not in GNU_ONLY])
def test_rootless_same_tree_as_umoci_rootless(name: str, tmp_path: Path, make_image) -> None:
    """As uid 65534 (setpriv), dirge and umoci --rootless agree, owners kept in user.rootlesscontainers."""
    work = Path(tmp_path_factory_dir())
    try:
        os.chmod(work, 0o777)
        ref = make_image(CASES[name](tmp_path))
        layout = ref[len("oci:"):].rpartition(":")[0]
        shutil.copytree(layout, work / "layout")
        subprocess.run(["chmod", "-R", "a+rX", str(work / "layout")], check=True)
        ref = f"oci:{work / 'layout'}:t"
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        ours, theirs = work / "dirge", work / "umoci"
        dirge_bin = Path(sys.executable).parent / "dirge"
        proc = subprocess.run(nobody + [str(dirge_bin), "unpack", ref, str(ours)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        umoci_unpack(ref, theirs, user=nobody, rootless=True)
        a, b = snapshot(ours), snapshot(theirs)
        # umoci turns device nodes into empty files; dirge skips them and says so.
        for dev in ("m/null", "m/blk"):
            b["entries"].pop(dev, None)
            assert dev not in a["entries"]
        differences = diff(a, b)
        assert not differences, "\n".join(differences)
        if name == "metadata":
            assert "device node not created" in proc.stdout + proc.stderr
            owned = os.getxattr(ours / "m/owned", "user.rootlesscontainers")
            from dirge.apply.fs import decode_rootless_owner
            assert decode_rootless_owner(owned) == (12345, 54321)
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def tmp_path_factory_dir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="dirge-rootless-", dir="/tmp")
