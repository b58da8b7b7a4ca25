"""Per-session disks from a cached base disk: reflink on xfs, qcow2 overlays, sparse copies elsewhere;
the base is never written and every session's disk is its own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import needs_tool
from dirge.errors import SessionError
from dirge.session.disks import make_session_disk
from treecmp import file_sha256

MIB = 1 << 20


def base_disk(directory: Path) -> Path:
    """16 MiB with data at both ends and a hole between."""
    path = directory / "base.img"
    with open(path, "wb") as f:
        f.write(os.urandom(MIB))
        f.seek(15 * MIB)
        f.write(os.urandom(MIB))
    return path


def scribble(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(2 * MIB)
        f.write(b"session data" * 1000)


def test_sparse_copy_keeps_holes_and_leaves_the_base_alone(tmp_path: Path) -> None:
    base = base_disk(tmp_path)
    before = file_sha256(base)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    assert make_session_disk(base, a) == "sparse"  # the ext4 root cannot reflink
    assert make_session_disk(base, b) == "sparse"
    assert file_sha256(a) == before and a.stat().st_size == base.stat().st_size
    assert a.stat().st_blocks * 512 <= 3 * MIB, "the hole was copied as data"
    scribble(a)
    assert file_sha256(base) == before and file_sha256(b) == before and file_sha256(a) != before


def test_reflink_on_xfs(loop_fs) -> None:
    mnt = loop_fs("xfs")
    base = base_disk(mnt)
    before = file_sha256(base)
    clone = mnt / "s.img"
    assert make_session_disk(base, clone) == "reflink"
    assert file_sha256(clone) == before
    scribble(clone)
    assert file_sha256(base) == before


@needs_tool("qemu-img")
def test_qcow2_overlay_reads_as_the_base(tmp_path: Path) -> None:
    base = base_disk(tmp_path)
    before = file_sha256(base)
    disk = tmp_path / "s.qcow2"
    assert make_session_disk(base, disk, disk_format="qcow2") == "qcow2"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True,
                          check=True).stdout
    assert '"backing-filename-format": "raw"' in info and str(base) in info
    assert disk.stat().st_size < MIB, "the overlay should hold no data yet"
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(base), str(disk)],
                          capture_output=True).returncode == 0
    assert file_sha256(base) == before


def test_bad_disk_format_and_existing_destination(tmp_path: Path) -> None:
    base = base_disk(tmp_path)
    with pytest.raises(SessionError, match="disk format 'vmdk'"):
        make_session_disk(base, tmp_path / "x", disk_format="vmdk")
    (tmp_path / "taken").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        make_session_disk(base, tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"x"
