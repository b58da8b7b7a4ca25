"""dirge export: erofs images (from the layers or the cached base, byte-identical either way), flattened
tars and directories, each equal to the tree the image unpacks to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge import DirgeError, UnsafeLayer, export, unpack
from dirge.store.cache import Cache
from dirge.cli import main
from dirge.fsimage.ext4 import Ext4SizeError
from dirge.fsimage.mount import mount_erofs, unmount
from dirge.rootfs import prepare
from images import layered, metadata
from treecmp import diff, ext4_disk_differences, file_sha256, snapshot

pytestmark = [needs_root, needs_tool("fsck.erofs", "tar")]
DIRGE = str(Path(sys.executable).parent / "dirge")


@pytest.fixture
def image(make_image) -> str:
    return make_image(layered() + metadata())


@pytest.fixture
def tree(image: str, tmp_path: Path) -> dict:
    dest = tmp_path / "tree"
    unpack(image, dest)
    return snapshot(dest)


def test_erofs_export_from_layers_and_from_cache_are_identical(image: str, tree: dict, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    cold = export(image, tmp_path / "cold.erofs", format="erofs", cache=cache)
    assert not cold.from_cache and cold.sha256 == file_sha256(cold.path) and cold.size == cold.path.stat().st_size
    assert subprocess.run(["fsck.erofs", str(cold.path)], capture_output=True).returncode == 0
    with prepare(image, cache.root, base_format="erofs") as session:
        warm = export(image, tmp_path / "warm.erofs", format="erofs", cache=cache)
        assert warm.from_cache and warm.sha256 == cold.sha256 and warm.digest == cold.digest == session.digest
        assert (cache.root / "bases" / session.info.base / "rootfs.erofs").read_bytes() == cold.path.read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(cold.path, mnt)
    try:
        assert not diff(snapshot(mnt), tree)
    finally:
        unmount(mnt)


@pytest.mark.parametrize("base_format", ["erofs", "tree"])
def test_tar_export_extracts_to_the_tree(image: str, tree: dict, tmp_path: Path, base_format: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIRGE_BASE_FORMAT", base_format)
    result = export(image, tmp_path / "flat.tar", format="tar", cache=Cache(tmp_path / "cache"))
    assert result.format == "tar" and result.sha256 == file_sha256(result.path)
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(result.path), "-C",
                    str(out)], check=True)
    differences = diff(snapshot(out), tree)
    assert not differences, "\n".join(differences)


def test_dir_export_is_the_tree(image: str, tree: dict, tmp_path: Path) -> None:
    result = export(image, tmp_path / "out", format="dir")
    assert result.sha256 is None and not diff(snapshot(result.path), tree)


def test_cli_json_and_atomic_replace(image: str, tmp_path: Path) -> None:
    out = tmp_path / "root.erofs"
    out.write_bytes(b"old contents")
    env = {**os.environ, "DIRGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([DIRGE, "export", image, str(out), "--json"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["path"] == str(out) and info["format"] == "erofs" and info["size"] == out.stat().st_size
    assert info["sha256"] == file_sha256(out) and info["digest"].startswith("sha256:")
    assert [p.name for p in tmp_path.iterdir() if "dirge-tmp" in p.name] == []
    again = subprocess.run([DIRGE, "export", image, str(out), "--json"], env=env, capture_output=True, text=True)
    assert json.loads(again.stdout)["sha256"] == info["sha256"]  # reproducible


def test_export_errors_are_one_line(image: str, tmp_path: Path) -> None:
    with pytest.raises(DirgeError, match=r"^export .*: .* is a directory; give a file path for --format erofs"):
        export(image, tmp_path, format="erofs")
    with pytest.raises(DirgeError, match="unknown format 'squashfs'"):
        export(image, tmp_path / "x", format="squashfs")
    proc = subprocess.run([DIRGE, "export", f"oci:{tmp_path}/missing:t", str(tmp_path / "x.erofs")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dirge: error: ")
    assert not (tmp_path / "x.erofs").exists()


def test_a_writer_limit_is_the_writers_error_not_an_unsafe_image(image: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An output format's limit met while a layer is applied is the writer's error (``Ext4SizeError``), not
    ``UnsafeLayer``, which calls the image hostile; the CLI's one line names the kind. ext4's 2^32-block
    limit is lowered to 2 blocks so that the real check in the writer's allocator trips on a small image."""
    from dirge.fsimage import ext4

    monkeypatch.setattr(ext4, "_MAX_BLOCKS", 2)
    cache = tmp_path / "cache"
    with pytest.raises(Ext4SizeError, match=r"^export .*: write ext4 image: content exceeds ext4's") as err:
        export(image, tmp_path / "a.ext4", format="ext4", cache=Cache(cache))
    assert not isinstance(err.value, UnsafeLayer)
    assert main(["export", image, str(tmp_path / "b.ext4"), "--format", "ext4", "--cache-dir", str(cache)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dirge: error: image writer: export "), lines
    assert not (tmp_path / "a.ext4").exists() and not (tmp_path / "b.ext4").exists()


def test_a_too_small_size_is_named_as_the_writers_error(image: str, tmp_path: Path) -> None:
    """``--size`` too small for the content: ``Ext4SizeError`` from the API; from the CLI one line that says
    the image writer failed (not the image, not the host), exit status 1."""
    from dirge.options import DiskOptions

    cache = tmp_path / "cache"
    with pytest.raises(Ext4SizeError, match="too small"):
        export(image, tmp_path / "a.ext4", format="ext4", cache=Cache(cache), disk=DiskOptions(64 << 10, False))
    proc = subprocess.run([DIRGE, "export", image, str(tmp_path / "b.ext4"), "--format", "ext4", "--size", "64K",
                           "--cache-dir", str(cache)], capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dirge: error: image writer: export ") and "too small" in lines[0], lines


@needs_tool("e2fsck", "dumpe2fs", "setpriv")
def test_ext4_export_is_clean_equal_and_cached(image: str, tree: dict, tmp_path: Path) -> None:
    """An ext4 disk from the layers: e2fsck-clean, loop-mounted equal to the tree, written straight to OUT
    (as erofs: no base disk cached on the way), cloned from the cached base disk of its digest and options
    when a disk session made one (byte-identical), and written with the image's owners even by an
    ordinary user."""
    cache = Cache(tmp_path / "cache")
    first = export(image, tmp_path / "a.ext4", format="ext4", cache=cache)
    assert not first.from_cache and not list((cache.root / "bases").glob("*-ext4*"))
    with prepare(image, cache.root, disk="ext4") as session:
        again = export(image, tmp_path / "b.ext4", format="ext4", cache=cache)
        assert again.from_cache and again.sha256 == first.sha256 and again.digest == session.digest
    assert "has_journal" in subprocess.run(["dumpe2fs", "-h", str(first.path)], capture_output=True,
                                           text=True).stdout
    differences = ext4_disk_differences(first.path, tree, tmp_path / "mnt")
    assert not differences, "\n".join(differences)

    from dirge.options import DiskOptions

    small = export(image, tmp_path / "c.ext4", format="ext4", cache=cache, disk=DiskOptions(64 << 20, False))
    assert small.size == 64 << 20 and small.sha256 != first.sha256
    assert "has_journal" not in subprocess.run(["dumpe2fs", "-h", str(small.path)], capture_output=True,
                                               text=True).stdout
    counted = tmp_path / "e.ext4"
    proc = subprocess.run([DIRGE, "export", image, str(counted), "--format", "ext4", "--size", "32M", "--inodes",
                           "5000", "--no-journal", "--cache-dir", str(cache.root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(counted)], capture_output=True, text=True).stdout
    assert counted.stat().st_size == 32 << 20 and "has_journal" not in header
    assert int(header.split("Inode count:")[1].split()[0]) >= 5000
    with pytest.raises(DirgeError, match="^export .*"):
        export(image, tmp_path / "d.ext4", format="ext4", cache=cache, disk=DiskOptions(64 << 10, True))

    # As nobody: the owners inside are the image's (1000:1000 on usr/bin/tool), not the caller's.
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="dirge-export-nobody-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        os.chmod(work, 0o1777)  # sticky, as /tmp: a cache below may not sit in a dir others can rename in
        shutil.copytree(image[len("oci:"):].rpartition(":")[0], work / "layout")
        subprocess.run(["chmod", "-R", "a+rX", str(work / "layout")], check=True)
        out = work / "n.ext4"
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", DIRGE, "export",
                               f"oci:{work / 'layout'}:t", str(out), "--format", "ext4", "--cache-dir",
                               str(work / "cache")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        stat = subprocess.run(["debugfs", "-R", "stat /usr/bin/tool", str(out)], capture_output=True,
                              text=True).stdout
        assert "User:  1000   Group:  1000" in stat, stat
        assert out.stat().st_uid == 65534
        assert subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True).returncode == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
