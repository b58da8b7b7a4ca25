"""Cache, locks and sessions: crash safety, concurrency, isolation per strategy, snapshots, customisation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_root, require
from dirge import unpack
from dirge.store.cache import Cache
from dirge.fsimage.mount import mounts_under
from dirge.errors import LockTimeout, SessionError
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import FileSpec, add_user, cleanup, prepare, restore, write_krun_config
from dirge.session import Sessions
from dirge.session.backends import available
from images import layered, metadata
from treecmp import diff, snapshot

PY = sys.executable


def many_files(n: int, prefix: str) -> bytes:
    b = LayerBuilder().dir(prefix)
    for i in range(n):
        b.file(f"{prefix}/f{i:05d}", os.urandom(64))
    return b.build()


@pytest.fixture
def image(make_image) -> str:
    # overlayfs reserves trusted.overlay.* for itself (documented), so this image carries none.
    return make_image(layered() + metadata(overlay_xattr=False), runtime_config={"Cmd": ["/bin/sh"], "Env": ["A=1"]})


def reference_tree(ref: str, tmp_path: Path) -> dict:
    dest = tmp_path / "reference"
    if not dest.exists():
        unpack(ref, dest)
    return snapshot(dest)


CHILD = r"""
import json, sys
from dirge.rootfs import prepare
ref, cache, mode = sys.argv[1:4]
def progress(event):
    if mode == "block" and getattr(event, "index", None) == 1:
        print("ready", flush=True)
        sys.stdin.read()
if mode == "race":
    sys.stdin.readline()  # wait for "go", so all racers start together
p = prepare(ref, cache, progress=progress)
print(json.dumps({"id": p.id, "path": str(p.path), "base_created": p.base_created}), flush=True)
sys.stdin.read()  # hold the session until the parent is done looking
p.close()
"""


def test_killed_prepare_does_not_block_the_next(tmp_path: Path, make_image) -> None:
    ref = make_image([many_files(200, "a"), many_files(200, "b")])
    cache = tmp_path / "cache"
    child = subprocess.Popen([PY, "-c", CHILD, ref, str(cache), "block"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert list((cache / "staging").iterdir()), "the child should be mid-unpack"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    start = time.monotonic()
    with prepare(ref, cache, lock_timeout=30) as session:
        elapsed = time.monotonic() - start
        assert session.base_created
        assert not diff(snapshot(session.path), reference_tree(ref, tmp_path))
    assert elapsed < 10, f"the dead holder's lock blocked the next prepare for {elapsed:.1f}s"
    assert list((cache / "staging").iterdir()) == []


def test_eight_concurrent_prepares_unpack_once(tmp_path: Path, make_image) -> None:
    ref = make_image([many_files(500, "a"), many_files(500, "b")])
    cache = tmp_path / "cache"
    children = [subprocess.Popen([PY, "-c", CHILD, ref, str(cache), "race"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        results = [json.loads(c.stdout.readline()) for c in children if c.stdout is not None]
        assert sum(r["base_created"] for r in results) == 1
        assert len({r["id"] for r in results}) == 8 and len({r["path"] for r in results}) == 8
        expected = reference_tree(ref, tmp_path)
        for r in results:
            assert not diff(snapshot(r["path"]), expected)
    finally:
        for c in children:
            if c.stdin:
                c.stdin.close()
            c.wait(timeout=60)
    assert Sessions(Cache(cache)).list() == []


def test_lock_timeout_names_the_holder(tmp_path: Path, image: str) -> None:
    cache = Cache(tmp_path / "cache")
    from dirge.sources.open import open_image

    _, resolved = open_image(image)
    rootless = os.geteuid() != 0
    from dirge.bases import choose_format

    key = Cache.base_key(resolved.manifest_digest, rootless, choose_format(None, cache, rootless))
    holder = subprocess.Popen([PY, "-c", "import fcntl,sys; f=open(sys.argv[1],'w'); f.write('4242'); f.flush(); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(cache.root / "locks" / f"{key}.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="held by pid 4242"):
            prepare(image, cache.root, lock_timeout=0.3)
    finally:
        holder.kill()
        holder.wait()
    with prepare(image, cache.root, lock_timeout=5) as session:  # the dead holder's lock is gone with it
        assert session.base_created


def test_bases_keyed_by_digest_not_ref_text(tmp_path: Path) -> None:
    from dirge.sources.layout import LayoutWriter

    layout = tmp_path / "a_b"
    w = LayoutWriter(layout)
    one = w.add_image([LayerBuilder().file("v", b"1").build()], tag="one")
    w.tag(one, "alias")
    w.add_image([LayerBuilder().file("v", b"2").build()], tag="two")
    cache = Cache(tmp_path / "cache")
    with prepare(f"oci:{layout}:one", cache.root) as a, prepare(f"oci:{layout}:alias", cache.root) as b:
        assert a.digest == b.digest and not b.base_created  # two tags, one base
    w.tag(w.add_image([LayerBuilder().file("v", b"3").build()]), "one")  # the tag moves
    with prepare(f"oci:{layout}:one", cache.root) as moved:
        assert moved.base_created and (moved.path / "v").read_bytes() == b"3"
    names = os.listdir(cache.root / "bases") + os.listdir(cache.root / "refs")
    assert all("a_b" not in n and "one" not in n for n in names)
    assert len(os.listdir(cache.root / "bases")) == 2


def test_corrupt_cached_blob_is_not_trusted(tmp_path: Path, image: str) -> None:
    cache = Cache(tmp_path / "cache")
    from dirge.sources.open import open_image

    _, resolved = open_image(image)
    cache.put_blob(resolved.manifest_digest, resolved.manifest.raw)
    path = cache.blob_path(resolved.manifest_digest)
    path.write_bytes(b"tampered")
    assert cache.get_blob(resolved.manifest_digest, None, 1 << 20) is None
    assert not path.exists()


@pytest.fixture(params=["overlay", "overlay-erofs", "copy", "copy-erofs", "reflink-xfs", "reflink-xfs-erofs", "btrfs"])
def strategy_cache(request, tmp_path: Path, loop_fs, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """(strategy, cache dir) on a tree base or (``-erofs``) an erofs base (mounted: root only)."""
    name = request.param
    fmt = "erofs" if name.endswith("-erofs") else "tree"
    monkeypatch.setenv("DIRGE_BASE_FORMAT", fmt)
    name = name.removesuffix("-erofs")
    if (name == "overlay" or fmt == "erofs") and os.geteuid() != 0:
        pytest.skip("overlay sessions and erofs bases need root")
    if name == "overlay":
        return "overlay", tmp_path / "cache"
    if name == "copy":
        return "copy", tmp_path / "cache"
    if name == "reflink-xfs":
        return "reflink", loop_fs("xfs") / "cache"
    return "btrfs", loop_fs("btrfs") / "cache"


def test_session_writes_stay_in_the_session(strategy_cache: tuple[str, Path], image: str, tmp_path: Path) -> None:
    strategy, cache = strategy_cache
    assert strategy in available_for(image, cache)
    s1 = prepare(image, cache, strategy=strategy)
    s2 = prepare(image, cache, strategy=strategy)
    try:
        assert s1.strategy == strategy and s1.id != s2.id
        base = Cache(cache).load_base(s1.info.base)
        assert base is not None
        before = snapshot(base.rootfs)
        # Full fidelity: a fresh session is the base, metadata and all (and the base is the image).
        fresh = snapshot(s2.path)
        assert not diff(fresh, before)
        assert not diff(before, reference_tree(image, tmp_path))
        (s1.path / "etc/passwd").write_text("changed\n")
        (s1.path / "usr/bin/tool").unlink()
        os.chmod(s1.path / "m/setuid", 0o700)
        (s1.path / "new-file").write_text("new")
        import shutil
        shutil.rmtree(s1.path / "opq")
        assert (s1.path / "etc/passwd").read_text() == "changed\n"
        assert not diff(snapshot(base.rootfs), before)
        assert not diff(snapshot(s2.path), fresh)
    finally:
        s1.close()
        s2.close()
    assert not s1.path.exists() and not s2.path.exists()


def available_for(image: str, cache: Path) -> list[str]:
    with prepare(image, cache, strategy="copy") as s:
        base = Cache(cache).load_base(s.info.base)
        assert base is not None
        return available(base.rootfs, cache / "sessions")


def parse(digest: str):
    from dirge.oci.reference import parse_digest

    return parse_digest(digest)


@pytest.mark.parametrize("strategy", ["overlay", "copy"])
def test_snapshot_save_modify_restore(strategy: str, tmp_path: Path, image: str) -> None:
    if strategy == "overlay" and os.geteuid() != 0:
        pytest.skip("overlay sessions need root")
    cache = tmp_path / "cache"
    sessions = Sessions(Cache(cache))
    with prepare(image, cache, strategy=strategy) as work, prepare(image, cache, strategy=strategy) as other:
        (work.path / "etc/passwd").write_text("saved state\n")
        (work.path / "etc/conf.d/a").unlink()
        (work.path / "added").write_text("added")
        saved = snapshot(work.path)
        sessions.snapshot_save(work.id, "snap-1.ok")
        (work.path / "etc/passwd").write_text("after the snapshot\n")
        (work.path / "added").unlink()
        with restore("snap-1.ok", cache) as restored:
            assert restored.id not in (work.id, other.id)
            assert not diff(snapshot(restored.path), saved)
            (restored.path / "etc/passwd").write_text("restored and changed\n")
        with restore("snap-1.ok", cache) as again:
            assert (again.path / "etc/passwd").read_text() == "saved state\n"
        assert not diff(snapshot(other.path), reference_tree(image, tmp_path))
        base = Cache(cache).load_base(work.info.base)
        assert base is not None and not diff(snapshot(base.rootfs), reference_tree(image, tmp_path))
    assert [s["name"] for s in sessions.snapshot_list()] == ["snap-1.ok"]
    sessions.snapshot_delete("snap-1.ok")
    assert sessions.snapshot_list() == []
    for bad in ("..", ".", "a/b", "", "x y"):
        with pytest.raises(SessionError, match="snapshot name"):
            sessions.snapshot_save("0" * 32, bad)


def test_prune_reaps_sessions_of_dead_creators(tmp_path: Path, image: str) -> None:
    cache = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = prepare(image, cache, owner_pid=dead.pid, strategy="copy")
    orphan.detach()
    live = prepare(image, cache, strategy="copy")
    sessions = Sessions(Cache(cache))
    listed = {s.id: s.alive() for s in sessions.list()}
    assert listed == {orphan.id: False, live.id: True}
    assert sessions.prune() == [orphan.id]
    assert not orphan.path.exists() and live.path.exists()
    live.close()


def test_cleanup_semantics(tmp_path: Path, image: str) -> None:
    cleanup(tmp_path / "does-not-exist")  # as in the seed: fine
    s = prepare(image, tmp_path / "cache")
    s.detach()
    cleanup(s.path)
    assert not s.path.exists() and not s.path.parent.exists()


def test_customisation_stays_inside(tmp_path: Path, make_image) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "hostname").write_text("host")
    ref = make_image([LayerBuilder().dir("etc").file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
                      .file("etc/group", b"root:x:0:\n")
                      .symlink("etc/hostname", str(victim / "hostname"))
                      .symlink("escape", "../../../../../../" + str(victim)).build()],
                     runtime_config={"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/w"})
    files = {"/etc/hostname": b"vm-1\n", "/escape/planted": FileSpec(b"x", mode=0o600),
             "/home/sandbox/.ssh/authorized_keys": FileSpec(b"ssh-ed25519 AAAA test\n", mode=0o600, uid=1000, gid=1000)}
    with prepare(ref, tmp_path / "cache", files=files) as s:
        assert (victim / "hostname").read_text() == "host" and not (victim / "planted").exists()
        assert (s.path / "etc/hostname").read_text() == "vm-1\n" and not (s.path / "etc/hostname").is_symlink()
        keys = s.path / "home/sandbox/.ssh/authorized_keys"
        assert oct(keys.stat().st_mode & 0o777) == "0o600"
        add_user(s.path, "sandbox", 1000)
        assert "sandbox:x:1000:1000::/home/sandbox:/bin/sh" in (s.path / "etc/passwd").read_text()
        assert "sandbox:x:1000:" in (s.path / "etc/group").read_text()
        add_user(s.path, "sandbox", 1000)  # idempotent
        assert (s.path / "etc/passwd").read_text().splitlines().count("sandbox:x:1000:1000::/home/sandbox:/bin/sh") == 1
        write_krun_config(s.path, s.config, env={"TERM": "xterm"})
        krun = json.loads((s.path / ".krun_config.json").read_text())
        assert krun == {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin", "TERM=xterm"], "WorkingDir": "/w"}
        assert s.cmd == ["/bin/sh"] and s.working_dir == "/w" and s.env == ["PATH=/bin"]
    assert sorted(os.listdir(victim)) == ["hostname"]


def test_cli_session_commands(tmp_path: Path, image: str) -> None:
    dirge = [str(Path(PY).parent / "dirge")]
    env = {**os.environ, "DIRGE_CACHE_DIR": str(tmp_path / "cache")}

    def run(*args: str) -> str:
        proc = subprocess.run(dirge + list(args), env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    created = json.loads(run("session", "create", image, "--json", "--strategy", "copy"))
    assert {"id", "path", "image", "digest", "strategy"} <= set(created) and created["strategy"] == "copy"
    assert Path(created["path"], "etc/passwd").exists()
    listed = json.loads(run("session", "ls", "--json"))
    assert [s["id"] for s in listed] == [created["id"]]
    run("session", "snapshot", "save", created["id"], "s")
    restored = run("session", "snapshot", "restore", "s").strip()
    assert Path(restored, "etc/passwd").exists()
    run("session", "rm", "--all")
    assert json.loads(run("session", "ls", "--json")) == []
    proc = subprocess.run(dirge + ["session", "rm", "f" * 32], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "no such session" in proc.stderr


def test_copy_keeps_holes(tmp_path: Path, make_image) -> None:
    from images import gnu_tar

    ref = make_image([gnu_tar(tmp_path, "posix")])
    with prepare(ref, tmp_path / "cache", strategy="copy") as session:
        st = os.stat(session.path / "sparse/holes.bin")
        assert st.st_size == 2_000_003 and st.st_blocks * 512 < 200_000
        assert not diff(snapshot(session.path), reference_tree(ref, tmp_path))


def test_base_format_is_recorded_and_old_tree_bases_are_still_read(tmp_path: Path, image: str) -> None:
    cache = Cache(tmp_path / "cache")
    rootless = os.geteuid() != 0
    with prepare(image, cache.root, strategy="copy", base_format="tree") as s:
        assert s.base_format == "tree"
        key = Cache.base_key(parse(s.digest), rootless)
        assert key.endswith("-tree") and json.loads((cache.root / "bases" / key / "image.json").read_text())["format"] == "tree"
        base = cache.load_base(key)
        assert base is not None and base.format == "tree"
    # A cache written before bases had formats: the key has no format and image.json no "format".
    legacy = cache.root / "bases" / Cache.legacy_base_key(parse(s.digest), rootless)
    os.rename(cache.root / "bases" / key, legacy)
    meta = json.loads((legacy / "image.json").read_text())
    del meta["format"]
    (legacy / "image.json").write_text(json.dumps(meta))
    with prepare(image, cache.root, strategy="copy", base_format="tree") as old:
        assert not old.base_created and old.base_format == "tree" and old.info.base == legacy.name
        assert not diff(snapshot(old.path), reference_tree(image, tmp_path))
    assert os.listdir(cache.root / "bases") == [legacy.name]


def test_base_format_choice_is_checked(tmp_path: Path, image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dirge.errors import DirgeError

    with pytest.raises(DirgeError, match="base format 'squashfs'"):
        prepare(image, tmp_path / "cache", base_format="squashfs")
    monkeypatch.setenv("DIRGE_BASE_FORMAT", "bogus")
    with pytest.raises(DirgeError, match=r"\$DIRGE_BASE_FORMAT"):
        prepare(image, tmp_path / "cache")
    monkeypatch.setenv("DIRGE_BASE_FORMAT", "tree")
    with prepare(image, tmp_path / "cache", strategy="copy") as s:
        assert s.base_format == "tree"


def test_strategies_are_one_protocol(tmp_path: Path, image: str) -> None:
    from dirge.session.backends import STRATEGIES, Strategy

    assert list(STRATEGIES) == ["overlay", "fuse-overlayfs", "btrfs", "reflink", "copy"]  # fastest first
    assert all(isinstance(s, Strategy) and s.name == name for name, s in STRATEGIES.items())
    cache = tmp_path / "cache"
    with prepare(image, cache, strategy="copy") as s:
        recorded = json.loads((s.path.parent / "session.json").read_text())
        assert recorded["strategy"] == "copy" and set(recorded) == {
            "id", "image", "digest", "strategy", "base", "pid", "pid_start", "created", "snapshot"}
        with pytest.raises(SessionError, match="unknown session strategy 'zfs'"):
            prepare(image, cache, strategy="zfs")
    # A session whose record is unreadable (killed while it was created) is still removable.
    broken = prepare(image, cache, strategy="copy")
    broken.detach()
    (broken.path.parent / "session.json").write_text("{")
    cleanup(broken.path)
    assert not broken.path.parent.exists()


def test_cli_session_create_reports_the_base_format(tmp_path: Path, image: str) -> None:
    """--base-format wins over $DIRGE_BASE_FORMAT; --json says which format the base is."""
    env = {**os.environ, "DIRGE_CACHE_DIR": str(tmp_path / "cache"), "DIRGE_BASE_FORMAT": "erofs"}
    dirge = str(Path(PY).parent / "dirge")
    proc = subprocess.run([dirge, "session", "create", image, "--json", "--strategy", "copy", "--base-format", "tree"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    assert created["base_format"] == "tree" and created["strategy"] == "copy"
    Sessions(Cache(tmp_path / "cache")).remove(created["id"])
    require(os.geteuid() == 0, "needs root: the default session is an overlay on an erofs base")
    proc = subprocess.run([dirge, "session", "create", image, "--json"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)
    assert created["base_format"] == "erofs" and created["strategy"] == "overlay"
    Sessions(Cache(tmp_path / "cache")).remove(created["id"])
    assert not mounts_under(tmp_path / "cache" / "sessions")


def test_auto_base_format_is_erofs_where_it_mounts(tmp_path: Path, image: str) -> None:
    """As root on a kernel with erofs, ``auto`` builds erofs bases (probed once, remembered in the cache);
    as an ordinary user it keeps tree bases."""
    cache = Cache(tmp_path / "cache")
    with prepare(image, cache.root) as s:
        if os.geteuid() == 0:
            assert s.base_format == "erofs" and s.strategy == "overlay"
            probe = json.loads((cache.root / "erofs-probe.json").read_text())
            assert probe["works"] is True and probe["kernel"] == os.uname().release
            assert (cache.root / "bases" / s.info.base / "rootfs.erofs").is_file()
        else:
            assert s.base_format == "tree"
        assert not diff(snapshot(s.path), reference_tree(image, tmp_path))
    with prepare(image, cache.root, base_format="tree", strategy="copy") as t:  # both formats coexist
        assert t.base_format == "tree" and t.info.base != s.info.base
        assert not diff(snapshot(t.path), reference_tree(image, tmp_path))
