"""Safe as root: the cache's modes and owner, staging that nobody else can reach, nosuid/nodev host
mounts of image content, lock files that are never followed through a symlink, and overlay mounts that
take any legal path as a cache directory."""

from __future__ import annotations

import os
import stat
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge.store.cache import Cache
from dirge.cli import main as cli_main
from dirge.errors import LockTimeout, UnsafeCache
from dirge.fsimage.mount import erofs_supported, mounted_at
from dirge.layerbuild import LayerBuilder
from dirge.store.lock import FileLock
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.session import backends
from dirge.flatten import unpack

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


# -- staging and sessions --------------------------------------------------------------------------


def test_unpack_staging_is_unreachable_until_the_tree_is_complete(tmp_path: Path, make_image, umask) -> None:
    """Layers are written before their digests are checked: the tree sits below a 0700 directory until
    the rename to DEST."""
    umask(0)
    ref = _image(make_image)
    dest = tmp_path / "out" / "rootfs"
    seen: list[tuple[str, int]] = []

    def progress(*args: object) -> None:
        for p in dest.parent.iterdir():
            if p.name.endswith(".dirge-staging"):
                seen.append((p.name, mode_of(p)))

    unpack(ref, dest, progress=progress)
    assert seen and all(mode == 0o700 for _, mode in seen), seen
    assert mode_of(dest) == 0o755
    assert (dest / "etc/motd").read_bytes() == b"hello\n"
    assert os.listdir(dest.parent) == ["rootfs"]  # no staging left behind


def test_base_staging_is_0700_while_a_base_is_built(tmp_path: Path, make_image, umask) -> None:
    umask(0)
    ref = _image(make_image)
    cache = tmp_path / "cache"
    seen: list[int] = []

    def progress(*args: object) -> None:
        seen.extend(mode_of(p) for p in (cache / "staging").iterdir())

    with prepare(ref, cache, base_format="tree", strategy="copy", progress=progress) as s:
        assert seen and set(seen) == {0o700}, seen
        assert mode_of(s.session_dir) == 0o755  # published: readable as before


def test_a_session_is_0700_until_it_is_complete(tmp_path: Path, make_image, umask,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    umask(0)
    ref = _image(make_image)
    cache = tmp_path / "cache"
    during: list[tuple[str, int]] = []
    make = backends.Copy.make

    def observed(self: backends.Strategy, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        during.append((session_dir.name, mode_of(session_dir)))
        make(self, lowers, rootfs, session_dir)
        during.append(("rootfs", mode_of(session_dir)))

    monkeypatch.setattr(backends.Copy, "make", observed)
    with prepare(ref, cache, base_format="tree", strategy="copy") as s:
        assert [m for _, m in during] == [0o700, 0o700], during
        assert mode_of(s.session_dir) == 0o755
        saved = Sessions(Cache(cache)).snapshot_save(s.id, "snap")
        assert mode_of(saved) == 0o755


# -- nosuid, nodev ---------------------------------------------------------------------------------


def _mount_options(point: Path) -> set[str]:
    """The per-mount options (mountinfo's 6th field) of the mount exactly at ``point`` (the last one)."""
    want = os.fsencode(os.path.realpath(point))
    found = None
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        fields = line.split(b" ")
        if re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]) == want:
            found = set(fields[5].decode().split(","))
    assert found is not None, f"nothing mounted at {point}"
    return found


def _setuid_image(make_image) -> str:
    id_binary = Path("/usr/bin/id").read_bytes()
    layer = (LayerBuilder().dir("bin").file("bin/suid-id", id_binary, mode=0o4755, uid=0, gid=0)
             .dir("dev").device("dev/null", 1, 3, mode=0o666))
    return make_image([layer.build()])


def _assert_inert(root: Path) -> None:
    """Through the mount at ``root``: setuid and device bits are there, but neither takes effect."""
    suid, dev = root / "bin/suid-id", root / "dev/null"
    st = os.stat(suid)
    assert st.st_uid == 0 and st.st_mode & stat.S_ISUID  # the guest kernel still sees them
    st = os.stat(dev)
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    with pytest.raises(PermissionError):  # nodev: root cannot open it through the host mount
        os.close(os.open(dev, os.O_RDONLY))
    # Run as nobody: on a suid mount it would print 0. The file is handed over as an fd (the cache is
    # 0700, nobody cannot walk to it); exec through /proc/self/fd still honours the mount's flags.
    fd = os.open(suid, os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               f"/proc/self/fd/{fd}", "-u"], pass_fds=[fd], capture_output=True, text=True)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(NOBODY)


@needs_root
@needs_tool("setpriv")
def test_an_erofs_base_and_its_sessions_are_mounted_nosuid_nodev(tmp_path: Path, make_image) -> None:
    assert erofs_supported(), "needs a kernel with erofs"
    ref = _setuid_image(make_image)
    with prepare(ref, tmp_path / "cache", base_format="erofs", strategy="overlay") as s:
        base_root = tmp_path / "cache" / "bases" / s.info.base / "rootfs"
        assert mounted_at(base_root) == "erofs" and mounted_at(s.path) == "overlay"
        for point in (base_root, s.path):
            _assert_inert(point)
            assert {"nosuid", "nodev"} <= _mount_options(point), point


@needs_root
@needs_tool("setpriv")
def test_an_overlay_session_of_a_tree_base_is_mounted_nosuid_nodev(tmp_path: Path, make_image) -> None:
    ref = _setuid_image(make_image)
    with prepare(ref, tmp_path / "cache", base_format="tree", strategy="overlay") as s:
        _assert_inert(s.path)
        assert {"nosuid", "nodev"} <= _mount_options(s.path)
        # A copy of the setuid file made in the session keeps its bits and stays inert too.
        with open(s.path / "bin/suid-id", "ab"):
            pass  # copied up (as root: the setuid bit stays)
        assert os.stat(s.path / "bin/suid-id").st_mode & stat.S_ISUID
        _assert_inert(s.path)


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
    from dirge.sources.open import open_image

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


# -- overlay mounts and odd cache paths --------------------------------------------------------------

ODD = "ca,che:lower=x,upperdir=\\evil y"


@needs_root
@pytest.mark.parametrize("base_format", ["tree", "erofs"])
def test_a_cache_path_with_separators_works_for_overlay_sessions(tmp_path: Path, make_image,
                                                                 base_format: str) -> None:
    if base_format == "erofs":
        assert erofs_supported(), "needs a kernel with erofs"
    ref = _image(make_image)
    cache = tmp_path / ODD / "cache"
    first = prepare(ref, cache, base_format=base_format, strategy="overlay")
    second = prepare(ref, cache, base_format=base_format, strategy="overlay")
    try:
        for s in (first, second):
            assert s.strategy == "overlay" and mounted_at(s.path) == "overlay"
            assert (s.path / "etc/motd").read_bytes() == b"hello\n"
        (first.path / "etc/motd").write_bytes(b"mine\n")
        assert (second.path / "etc/motd").read_bytes() == b"hello\n"
        assert (first.session_dir / "upper/etc/motd").read_bytes() == b"mine\n"
        # A snapshot of the overlay upper restores as a stacked overlay (two lowers).
        Sessions(Cache(cache)).snapshot_save(first.id, "s1")
        with prepare(ref, cache, base_format=base_format, strategy="overlay", snapshot="s1") as third:
            assert (third.path / "etc/motd").read_bytes() == b"mine\n"
            assert {"nosuid", "nodev"} <= _mount_options(third.path)
    finally:
        paths = [first.path, second.path]
        first.close()
        second.close()
    for p in paths:
        assert mounted_at(p) is None and not p.parent.exists()


@needs_root
@pytest.mark.parametrize("how", ["lowerdir+", "lowerdir", "mount(2)"])
def test_every_overlay_mount_path_takes_any_legal_path(tmp_path: Path, how: str) -> None:
    """The new API with lowerdir+ (Linux >= 6.8), with an escaped lowerdir list (5.2 to 6.7) and the
    old mount(2) (before 5.2): this kernel has all three, so each is tried on paths full of separators."""
    from dirge import fsutil

    base = tmp_path / "a,b:c=d\\e f\ng"
    lowers = [base / "low,1:x", base / "low\\2=y"]
    upper, work, target = base / "up,per:=\\", base / "wo:rk,", base / "mnt ,:"
    for d in (*lowers, upper, work, target):
        d.mkdir(parents=True)
    (lowers[0] / "a").write_text("top")
    (lowers[1] / "a").write_text("bottom")
    (lowers[1] / "b").write_text("bottom")
    if how == "mount(2)":
        fsutil._overlay_mount2(lowers, upper, work, target)
    else:
        fsutil._overlay_fsmount(lowers, upper, work, target, lowerdir_plus=how == "lowerdir+")
    try:
        assert fsutil.mounted_at(target) == "overlay"
        assert sorted(os.listdir(target)) == ["a", "b"] and (target / "a").read_text() == "top"
        (target / "c").write_text("new")
        assert (upper / "c").read_text() == "new"
        assert {"nosuid", "nodev"} <= _mount_options(target)
    finally:
        fsutil.unmount(target)
    assert not fsutil.is_mountpoint(target)


@needs_root
def test_an_overlay_session_root_is_the_image_root_not_the_umask(tmp_path: Path, make_image, umask) -> None:
    umask(0o077)
    layer = LayerBuilder().dir(".", mode=0o751, uid=0, gid=0).file("f", b"x")
    ref = make_image([layer.build()])
    with prepare(ref, tmp_path / "cache", base_format="tree", strategy="overlay") as s:
        assert mode_of(s.path) == mode_of(tmp_path / "cache" / "bases" / s.info.base / "rootfs") == 0o751


_IN_USERNS = """
import ctypes, os, sys
from dirge.rootfs import prepare
from dirge.fsimage.mount import mounted_at

uid, gid = os.getuid(), os.getgid()
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS, as unshare --user --mount
    raise OSError(ctypes.get_errno(), "unshare")
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:  # --map-root-user
        f.write(text)
s = prepare(sys.argv[1], sys.argv[2], base_format="tree", strategy="overlay")
print(s.strategy, mounted_at(s.path), (s.path / "etc/motd").read_text().strip(), oct(os.stat(sys.argv[2]).st_mode))
s.close()
print(os.path.exists(s.session_dir))
"""


@needs_root
@needs_tool("setpriv")
def test_rootless_overlay_sessions_in_a_user_namespace_pass_the_cache_check(make_image, tmp_path: Path) -> None:
    """As nobody mapped to root in its own user and mount namespaces: / and /tmp are the host root's,
    shown as the overflow uid there; the cache check accepts them as parents, and overlay sessions work."""
    import shutil
    import tempfile

    ref = _image(make_image)
    work = Path(tempfile.mkdtemp(prefix="dirge-userns-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        os.chmod(work, 0o1777)
        layout = ref[len("oci:"):].rpartition(":")[0]
        shutil.copytree(layout, work / "layout")
        subprocess.run(["chmod", "-R", "a+rX", str(work / "layout")], check=True)
        proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               sys.executable, "-c", _IN_USERNS, f"oci:{work / 'layout'}:t", str(work / "cache")],
                              capture_output=True, text=True, env={**os.environ, "HOME": str(work)})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split("\n")[:2] == ["overlay overlay hello 0o40700", "False"], proc.stdout
        assert os.stat(work / "cache").st_uid == NOBODY
    finally:
        shutil.rmtree(work)
