"""Safe as root: the cache's modes and owner, staging that nobody else can reach, nosuid/nodev host
mounts of image content, lock files that are never followed through a symlink, and overlay mounts that
take any legal path as a cache directory."""

from __future__ import annotations

import os
import stat
import re
import subprocess
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge.cache import Cache
from dirge.cli import main as cli_main
from dirge.errors import LockTimeout, UnsafeCache
from dirge.fsimage.mount import erofs_supported, mounted_at
from dirge.layerbuild import LayerBuilder
from dirge.lock import FileLock
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.session import backends
from dirge.unpack import unpack

NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask():
    """``umask(value)`` for the test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _image(make_image) -> str:
    layer = LayerBuilder().dir("etc").file("etc/motd", b"hello\n").dir("secret", mode=0o755).file(
        "secret/key", b"k", mode=0o644)
    return make_image([layer.build()])


# -- the cache directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def test_a_new_cache_is_0700_and_its_parts_do_not_follow_the_umask(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    root = tmp_path / "made" / "by" / "dirge"
    Cache(root)
    assert mode_of(root) == 0o700
    assert mode_of(root.parent) == mode_of(root.parent.parent) == 0o755  # missing parents: 0755, exactly
    for sub in ("blobs", "blobs/sha256", "refs", "bases", "staging", "locks", "sessions", "snapshots"):
        assert mode_of(root / sub) == 0o755, sub  # never 0777 under umask 0


def test_an_existing_cache_keeps_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    os.chmod(root, 0o755)  # what an older dirge made: still trusted (nobody else can write it)
    Cache(root)
    assert mode_of(root) == 0o755


def _refusal(capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """The CLI's stderr for a command on the cache ``root``: exit 1 and exactly one line."""
    assert cli_main(["images", "--cache-dir", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dirge: error: refuse cache "), err
    return err


@needs_root
def test_a_cache_owned_by_another_user_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, 1000, 1000)
    with pytest.raises(UnsafeCache, match="owned by uid 1000"):
        Cache(root)
    assert "owned by uid 1000" in _refusal(capsys, root)
    assert not (root / "locks").exists()  # refused before anything was written there
    os.chown(root, 0, 0)  # root's own cache is fine for everyone
    Cache(root)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777], ids=lambda m: f"mode{m:04o}")
def test_a_cache_writable_by_group_or_others_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        mode: int) -> None:
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, mode)
    with pytest.raises(UnsafeCache, match=f"it is writable by group or others \\(mode {mode:04o}\\)"):
        Cache(root)
    _refusal(capsys, root)


def test_a_cache_below_a_directory_others_can_write_is_refused_unless_sticky(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)  # anyone could rename the cache away and put their own in its place
    root = parent / "cache"
    with pytest.raises(UnsafeCache, match=f"its parent {parent} is writable by group or others"):
        Cache(root)
    assert f"its parent {parent}" in _refusal(capsys, root)
    os.chmod(parent, 0o1777)  # sticky (as /tmp): only the owner may rename or remove the cache
    Cache(root)
    assert mode_of(root) == 0o700


def test_a_cache_subdirectory_others_can_write_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    Cache(root)
    os.chmod(root / "locks", 0o777)  # others could plant lock files (symlinks) there
    with pytest.raises(UnsafeCache, match=f"its subdirectory {root / 'locks'} is writable"):
        Cache(root)
    _refusal(capsys, root)


def test_a_symlinked_cache_is_judged_where_it_leads(tmp_path: Path) -> None:
    real = tmp_path / "open" / "cache"
    real.mkdir(parents=True)
    os.chmod(real.parent, 0o777)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeCache, match=f"its parent {real.parent} is writable"):
        Cache(tmp_path / "link")


# -- lock files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_a_symlink_planted_at_a_lock_path_is_never_followed(tmp_path: Path, shared: bool) -> None:
    victim = tmp_path / "elsewhere" / "precious"
    victim.parent.mkdir()
    victim.write_bytes(b"do not truncate me\n")
    before = os.stat(victim)
    lock = tmp_path / "locks" / "key.lock"
    lock.parent.mkdir()
    lock.symlink_to(victim)
    with pytest.raises(UnsafeCache, match=f"lock file {lock} is a symlink"):
        FileLock(lock, timeout=0, shared=shared).acquire()
    assert victim.read_bytes() == b"do not truncate me\n"
    after = os.stat(victim)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_a_symlinked_base_lock_stops_prepare_and_leaves_its_target_alone(tmp_path: Path, make_image,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ref = _image(make_image)
    cache = Cache(tmp_path / "cache")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    # Every name a base lock or lease of this image could have (the key is the manifest digest's).
    from dirge.unpack import open_image

    source, resolved = open_image(ref)
    source.close()
    key = Cache.base_key(resolved.manifest_digest, os.geteuid() != 0, "tree")
    (cache.locks_dir / f"{key}.lock").symlink_to(victim)
    with pytest.raises(UnsafeCache, match="is a symlink"):
        prepare(ref, cache.root, base_format="tree", strategy="copy")
    assert victim.read_bytes() == b"precious\n"
    assert cli_main(["session", "create", ref, "--cache-dir", str(cache.root), "--base-format", "tree"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symlink" in err, err
    assert victim.read_bytes() == b"precious\n"


def test_a_fifo_at_a_lock_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    lock = tmp_path / "key.lock"
    os.mkfifo(lock)
    with pytest.raises(UnsafeCache, match="not a regular file"):
        FileLock(lock, timeout=0).acquire()


def test_a_lock_file_is_reused_without_truncation_on_open(tmp_path: Path) -> None:
    """The holder's pid is written through the locked fd; a waiter's open never empties it."""
    lock = tmp_path / "key.lock"
    with FileLock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        other = FileLock(lock, timeout=0)
        with pytest.raises(LockTimeout):
            other.acquire()
        assert lock.read_text() == f"{os.getpid()}\n"
