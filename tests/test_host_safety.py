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
