"""Disk full at every stage (issue 14 item 3): blob download, tree unpack, erofs base, ext4 disk, session
copy, snapshot, export — each on a small loop-mounted ext4 that runs out of space mid-way.

For each stage: one clear ``DirgeError`` naming what was being written and saying space ran out; no staging
dir, temp blob, partial session or partial export left; ``verify_cache`` clean; and once the filler file is
deleted, the same operation succeeds."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import dirge
from dirge.store.cache import Cache
from dirge.errors import DirgeError, NoSpace
from dirge.layerbuild import LayerBuilder
from dirge.oci.reference import Digest
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.sources.layout import LayoutWriter
from dirge.sources.open import pull_image
from dirge.verify import verify_cache

MiB = 1 << 20
FILES = 4            # random files per image ...
FILE_SIZE = 2 * MiB  # ... of this size: 8 MiB of incompressible data, so every copy of it is ~8 MiB

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None,
    reason="needs root, mkfs.ext4 and losetup for a loop-mounted ext4")


class SmallFs:
    """A loop-mounted ext4 of ``size`` bytes with a filler file that leaves ``free`` bytes."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.filler = mnt / "filler"

    def free(self) -> int:
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def leave(self, free: int) -> None:
        """Grow (or make) the filler so that about ``free`` bytes stay available."""
        self.unfill()
        os.sync()
        want = self.free() - free
        assert want > 0, f"only {self.free()} bytes free, cannot leave {free}"
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, want)
        os.sync()

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_fs(loop_fs) -> Callable[..., SmallFs]:
    """``small_fs(size_bytes, inodes=4096) -> SmallFs``: a fresh ext4 on a loop device (conftest's loop_fs:
    unmounted and detached in teardown, even after a failed test), no reserved blocks."""
    def make(size: int, inodes: int = 4096) -> SmallFs:
        return SmallFs(loop_fs("ext4", size, ("-m", "0", "-N", str(inodes))))

    return make


def random_layout(where: Path, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    layer = LayerBuilder().dir("data")
    for i in range(FILES):
        layer.file(f"data/f{i}", rnd.randbytes(FILE_SIZE))
    layer.file("etc/hostname", b"full\n")
    LayoutWriter(where).add_image([layer.build()], tag="t")
    return where


@pytest.fixture
def image(tmp_path: Path) -> str:
    return f"oci:{random_layout(tmp_path / 'layout')}:t"


def assert_no_space(err: DirgeError, *names: str) -> None:
    """One ``NoSpace``, on one line, saying what ran out and what to do, naming every one of ``names``."""
    msg = str(err)
    assert isinstance(err, NoSpace), f"{type(err).__name__}: {msg}"
    assert "\n" not in msg, msg
    assert "no space left on device" in msg and "free space" in msg, msg
    assert ".tmp-" not in msg and ".dirge-tmp" not in msg, f"{msg!r} names a temp file, not its target"
    for name in names:
        assert name in msg, f"{msg!r} does not name {name!r}"


def assert_clean_cache(cache: Cache) -> None:
    blobs = cache.blobs_dir
    if blobs.is_dir():
        assert [p.name for p in blobs.iterdir() if p.name.startswith(".tmp")] == []
    if cache.staging_dir.is_dir():
        assert list(cache.staging_dir.iterdir()) == []
    report = verify_cache(cache)
    assert report.ok, report


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep | {"lost+found", "filler"})


# -- the stages -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("registry_env")
def test_blob_download(registry, tmp_path: Path, small_fs) -> None:
    from registry import push_layout

    layout = random_layout(tmp_path / "layout")
    ref = f"{registry.host}/full/app:1"
    push_layout(layout, "t", ref)
    fs = small_fs(32 * MiB)
    cache = Cache(fs.mnt / "cache")
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        pull_image(ref, cache=cache)
    assert_no_space(err.value, "blob sha256:", str(cache.blobs_dir))
    assert_clean_cache(cache)
    fs.unfill()
    pull_image(ref, cache=cache)
    assert_clean_cache(cache)


def test_tree_unpack(image: str, tmp_path: Path, small_fs) -> None:
    fs = small_fs(32 * MiB)
    dest = fs.mnt / "rootfs"
    cache = Cache(tmp_path / "cache")
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        dirge.unpack(image, dest, cache=cache)
    assert_no_space(err.value, "write data/f", str(fs.mnt))
    assert leftovers(fs.mnt, set()) == []
    assert_clean_cache(cache)
    fs.unfill()
    dirge.unpack(image, dest, cache=cache)
    assert (dest / "etc/hostname").read_bytes() == b"full\n"


def many_entries_layout(where: Path, count: int) -> Path:
    layer = LayerBuilder()
    for d in range(count // 10):
        layer.dir(f"d{d}")
        for f in range(9):
            layer.file(f"d{d}/f{f}", b"x")
    LayoutWriter(where).add_image([layer.build()], tag="t")
    return where


def test_inodes_run_out(tmp_path: Path, small_fs) -> None:
    """ENOSPC from running out of inodes (mkdir, create) is the same clear error, for the tree writer
    and the session copier."""
    image = f"oci:{many_entries_layout(tmp_path / 'many', 1500)}:t"
    fs = small_fs(32 * MiB, inodes=1024)
    dest = fs.mnt / "rootfs"
    cache = Cache(tmp_path / "cache")
    with pytest.raises(DirgeError) as err:
        dirge.unpack(image, dest, cache=cache)
    assert_no_space(err.value, "write d", str(fs.mnt))
    assert leftovers(fs.mnt, set()) == []
    assert_clean_cache(cache)
    small = small_fs(32 * MiB, inodes=2048)  # room for one copy (the base), not two (a session too)
    cache = Cache(small.mnt / "cache")
    with prepare(image, cache.root, base_format="tree"):  # the base, and a session that costs no inodes
        pass
    with pytest.raises(DirgeError) as err:
        prepare(image, cache.root, base_format="tree", strategy="copy")
    assert_no_space(err.value, str(cache.sessions_dir))
    assert Sessions(cache).list() == []
    assert leftovers(cache.sessions_dir, set()) == []
    assert_clean_cache(cache)


@pytest.mark.parametrize("base_format", ["tree", "erofs"])
def test_base(base_format: str, image: str, small_fs) -> None:
    fs = small_fs(32 * MiB)
    cache = Cache(fs.mnt / "cache")
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        prepare(image, cache.root, base_format=base_format, strategy="copy" if base_format == "tree" else None)
    assert_no_space(err.value, str(cache.staging_dir), {"tree": "write data/f", "erofs": "rootfs.erofs"}[base_format])
    assert not cache.bases_dir.is_dir() or list(cache.bases_dir.iterdir()) == []
    assert Sessions(cache).list() == []
    assert_clean_cache(cache)
    fs.unfill()
    with prepare(image, cache.root, base_format=base_format) as s:
        assert (s.path / "etc/hostname").read_bytes() == b"full\n"
    assert_clean_cache(cache)


def test_ext4_disk_session(image: str, small_fs) -> None:
    fs = small_fs(48 * MiB)
    cache = Cache(fs.mnt / "cache")
    fs.leave(6 * MiB)
    with pytest.raises(DirgeError) as err:
        prepare(image, cache.root, disk="ext4")
    assert_no_space(err.value, str(cache.staging_dir), "rootfs.ext4")
    assert not cache.bases_dir.is_dir() or list(cache.bases_dir.iterdir()) == []
    assert Sessions(cache).list() == []
    assert_clean_cache(cache)
    fs.unfill()
    with prepare(image, cache.root, disk="ext4") as s:
        assert s.disk.exists()
    assert_clean_cache(cache)


def test_ext4_disk_copy_and_snapshot(image: str, small_fs) -> None:
    """A second ext4 disk session copies the base disk (no reflink on ext4); a disk snapshot copies the
    session's disk: both run out of space mid-way."""
    fs = small_fs(64 * MiB)
    cache = Cache(fs.mnt / "cache")
    sessions = Sessions(cache)
    with prepare(image, cache.root, disk="ext4") as first:
        fs.leave(4 * MiB)
        with pytest.raises(DirgeError) as err:
            prepare(image, cache.root, disk="ext4")
        assert_no_space(err.value, str(cache.sessions_dir), "rootfs.ext4")
        assert [s.id for s in sessions.list()] == [first.id]
        with pytest.raises(DirgeError) as err:
            sessions.snapshot_save(first.id, "disk-snap")
        assert_no_space(err.value, str(cache.snapshots_dir))
        assert leftovers(cache.snapshots_dir, set()) == [] and sessions.snapshot_list() == []
        assert_clean_cache(cache)
        fs.unfill()
        with prepare(image, cache.root, disk="ext4") as second:
            assert second.disk.stat().st_size == first.disk.stat().st_size
        sessions.snapshot_save(first.id, "disk-snap")
    assert_clean_cache(cache)


def test_session_copy(image: str, small_fs) -> None:
    fs = small_fs(40 * MiB)
    cache = Cache(fs.mnt / "cache")
    with prepare(image, cache.root, base_format="tree", strategy="copy"):
        pass
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        prepare(image, cache.root, base_format="tree", strategy="copy")
    assert_no_space(err.value, str(cache.sessions_dir))
    assert Sessions(cache).list() == []
    assert leftovers(cache.sessions_dir, set()) == []
    assert_clean_cache(cache)
    fs.unfill()
    with prepare(image, cache.root, base_format="tree", strategy="copy") as s:
        assert (s.path / "data/f0").stat().st_size == FILE_SIZE
    assert_clean_cache(cache)


def test_snapshot(image: str, small_fs) -> None:
    fs = small_fs(48 * MiB)
    cache = Cache(fs.mnt / "cache")
    sessions = Sessions(cache)
    with prepare(image, cache.root, base_format="tree", strategy="copy") as s:
        fs.leave(4 * MiB)
        with pytest.raises(DirgeError) as err:
            sessions.snapshot_save(s.id, "snap")
        assert_no_space(err.value, str(cache.snapshots_dir))
        assert sessions.snapshot_list() == []
        assert leftovers(cache.snapshots_dir, set()) == []
        assert_clean_cache(cache)
        fs.unfill()
        sessions.snapshot_save(s.id, "snap")
    assert leftovers(cache.snapshots_dir, set()) == ["snap"]
    assert_clean_cache(cache)
    # Restoring it into a copy session runs out of space mid-way too.
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        prepare(image, cache.root, base_format="tree", strategy="copy", snapshot="snap")
    assert_no_space(err.value, str(cache.sessions_dir), str(cache.snapshots_dir / "snap"))
    assert sessions.list() == [] and leftovers(cache.sessions_dir, set()) == []
    assert_clean_cache(cache)
    fs.unfill()
    with prepare(image, cache.root, base_format="tree", strategy="copy", snapshot="snap") as s:
        assert (s.path / "data/f3").stat().st_size == FILE_SIZE


@pytest.mark.parametrize("format", ["erofs", "ext4", "tar", "dir"])
def test_export(format: str, image: str, tmp_path: Path, small_fs) -> None:
    fs = small_fs(32 * MiB)
    cache = Cache(tmp_path / "cache")
    out = fs.mnt / f"out.{format}"
    fs.leave(4 * MiB)
    with pytest.raises(DirgeError) as err:
        dirge.export(image, out, format=format, cache=cache)
    assert_no_space(err.value, str(out) if format != "dir" else str(fs.mnt))
    assert leftovers(fs.mnt, set()) == []
    assert_clean_cache(cache)
    fs.unfill()
    result = dirge.export(image, out, format=format, cache=cache)
    assert result.path == out and out.exists()
    assert_clean_cache(cache)


def test_cli_one_line(image: str, tmp_path: Path, small_fs, capsys: pytest.CaptureFixture[str]) -> None:
    from dirge.cli import main

    fs = small_fs(32 * MiB)
    out = fs.mnt / "out.erofs"
    fs.leave(4 * MiB)
    rc = main(["export", image, str(out), "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 1
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dirge: error: "), captured.err
    assert "no space left on device" in lines[0] and f"write {out}:" in lines[0], lines[0]
    assert leftovers(fs.mnt, set()) == []
    fs.unfill()
    assert main(["export", image, str(out), "--cache-dir", str(tmp_path / "cache")]) == 0


def test_cache_records_on_a_full_filesystem(small_fs) -> None:
    # The cache's small writes (a manifest or config blob, a ref record) on a filesystem with not a
    # block left: NoSpace naming what and where, no temp file; with room again, both work.
    fs = small_fs(16 * MiB, inodes=16384)  # blocks run out, not inodes
    cache = Cache(fs.mnt / "cache")
    data = os.urandom(64 * 1024)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    cache.put_blob(Digest("sha256", hashlib.sha256(b"x").hexdigest()), b"x")  # the directories exist
    cache.record_ref("r/app:0", digest)
    eat = fs.mnt / "eat"
    eat.mkdir()

    def fill() -> None:  # every block, one at a time, until the filesystem says no
        try:
            for i in range(100_000):
                (eat / f"{i}-{random.random()}").write_bytes(b"x")
        except OSError as exc:
            assert exc.errno == 28

    fill()
    with pytest.raises(DirgeError) as err:
        cache.put_blob(digest, data)
    assert_no_space(err.value, str(digest), str(cache.blob_path(digest).parent))
    fill()  # again: the failed write's blocks were given back
    with pytest.raises(DirgeError) as err:
        cache.record_ref("r/app:1", digest)
    assert_no_space(err.value, "r/app:1")
    temps = [p.name for d in (cache.blob_path(digest).parent, cache.refs_dir) for p in d.iterdir()
             if p.name.startswith(".")]
    assert temps == []
    assert cache.lookup_ref("r/app:0") == digest and cache.lookup_ref("r/app:1") is None
    shutil.rmtree(eat)
    assert cache.put_blob(digest, data).read_bytes() == data
    cache.record_ref("r/app:1", digest)
    assert cache.lookup_ref("r/app:1") == digest


def test_a_filesystem_full_before_the_session_starts(image: str, small_fs) -> None:
    # Not a byte left: even the session's directory and record cannot be written. One NoSpace, no half
    # session; with room again, the same prepare works.
    fs = small_fs(40 * MiB)
    cache = Cache(fs.mnt / "cache")
    with prepare(image, cache.root, base_format="tree", strategy="copy"):
        pass
    fs.leave(1 * MiB)
    eat = fs.mnt / "eat"
    eat.mkdir()
    try:  # the last blocks, a few at a time, until the filesystem says no
        for i in range(100_000):
            (eat / str(i)).write_bytes(b"x" * 4096)
    except OSError as exc:
        assert exc.errno == 28
    with pytest.raises(DirgeError) as err:  # overlay: the session is only its directory and record
        prepare(image, cache.root, base_format="tree", strategy="overlay")
    assert_no_space(err.value, str(cache.sessions_dir))
    assert Sessions(cache).list() == []
    assert leftovers(cache.sessions_dir, set()) == []
    shutil.rmtree(eat)
    fs.unfill()
    with prepare(image, cache.root, base_format="tree", strategy="copy") as s:
        assert (s.path / "data/f0").stat().st_size == FILE_SIZE
