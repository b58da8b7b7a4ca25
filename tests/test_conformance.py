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
from images import CAP_NET_RAW, gnu_tar, layered, metadata
from treecmp import diff, snapshot

UMOCI = needs_tool("umoci")


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
    check_layer_rules(dest)


def check_layer_rules(dest: Path) -> None:
    """What ``layered() + metadata()`` must give, in any rootfs (tree or mounted image)."""
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
