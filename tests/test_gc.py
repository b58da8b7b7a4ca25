"""Cache lifecycle: images, rmi, gc (dry run, leftovers of a killed prepare, leases, budget under load)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import erofs_mounts, needs_root, require
from dirge.store.cache import Cache
from dirge.cli import main
from dirge.fsimage.mount import mounts_under
from dirge.lifecycle import collect, images, reachable, rmi, usage
from dirge.errors import DirgeError
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.verify import verify_cache
from dirge.vm.bootcache import BootCache

PY = sys.executable


def files_layer(prefix: str, n: int, size: int = 64, seed: bytes = b"") -> bytes:
    b = LayerBuilder().dir(prefix)
    for i in range(n):
        b.file(f"{prefix}/f{i:05d}", hashlib.sha256(seed + prefix.encode() + str(i).encode()).digest() * (size // 32))
    return b.build()


def tree_state(root: Path) -> list[tuple[str, int]]:
    """Every path under ``root`` with its size: what "nothing was removed" compares."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))  # (a lock file holds its last holder's pid: its size may change)
            out.append((rel, 0 if rel.startswith("locks/") else p.lstat().st_size))
    return sorted(out)


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def cli(*args: str) -> tuple[int, str]:
    """Run the CLI in-process, capturing stdout and stderr."""
    from click.testing import CliRunner

    from dirge import cli as cli_mod

    result = CliRunner().invoke(cli_mod.cli, list(args), standalone_mode=False, catch_exceptions=True)
    if isinstance(result.exception, DirgeError):
        return 1, result.output + str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    code = result.return_value if isinstance(result.return_value, int) else result.exit_code
    return code, result.output


def test_dry_run_removes_nothing_and_reports_what_gc_removes(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    a = make_image([files_layer("a", 50)])
    b = make_image([files_layer("b", 50)])
    c = make_image([files_layer("c", 50)])
    live = prepare(a, cache_dir, base_format="tree")  # protects a's base
    prepare(b, cache_dir, base_format="tree").close()
    prepare(c, cache_dir, base_format="tree", owner_pid=dead_pid()).detach()  # a session whose owner is gone
    cache = Cache(cache_dir)
    rmi(cache, [b])  # b's blobs are now garbage
    before = tree_state(cache_dir)

    dry = collect(cache, max_size=0, dry_run=True, grace=0)
    assert tree_state(cache_dir) == before, "a dry run removed something"
    kinds = {r.kind for r in dry.removed}
    assert {"session", "blob", "base"} <= kinds
    assert not any(r.kind == "base" and r.name == live.info.base for r in dry.removed)

    real = collect(cache, max_size=0, grace=0)
    assert sorted((r.kind, r.name) for r in real.removed) == sorted((r.kind, r.name) for r in dry.removed)
    assert real.freed() == dry.freed()
    assert cache.base_keys() == [live.info.base]  # the live session's base stayed
    assert (live.path / "a" / "f00000").read_bytes()  # and the session still reads it
    assert Sessions(cache).list() == [Sessions(cache).get(live.id)]
    assert verify_cache(cache).ok
    live.close()


def test_gc_skips_a_leased_base(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    ref = make_image([files_layer("a", 10)])
    prepare(ref, cache_dir, base_format="tree").close()
    cache = Cache(cache_dir)
    (key,) = cache.base_keys()
    with cache.base_lease(key):  # what a running prepare holds
        report = collect(cache, max_size=0, grace=0)
        assert cache.base_keys() == [key]
        assert any(key in s for s in report.skipped)
    collect(cache, max_size=0, grace=0)
    assert cache.base_keys() == []


KILLED = r"""
import sys
from dirge.rootfs import prepare
prepare(sys.argv[1], sys.argv[2], base_format="tree")
"""


def test_leftovers_of_a_sigkilled_prepare_are_removed_by_gc(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    ref = make_image([files_layer(f"d{i}", 4000, 512) for i in range(4)], compression="gzip")
    Cache(cache_dir)
    child = subprocess.Popen([PY, "-c", KILLED, ref, str(cache_dir)])
    staging = cache_dir / "staging"
    deadline = time.monotonic() + 60
    try:
        # Mid-unpack: a staging directory whose rootfs already has entries.
        while not any((d / "rootfs").is_dir() and any((d / "rootfs").iterdir())
                      for d in staging.iterdir() if not d.name.startswith(".")):
            assert child.poll() is None, "the prepare ended before it could be killed"
            assert time.monotonic() < deadline, "no staging directory appeared"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [d for d in staging.iterdir() if not d.name.startswith(".")]
    assert leftovers and Cache(cache_dir).base_keys() == []
    dry = collect(Cache(cache_dir), dry_run=True)
    assert {r.name for r in dry.removed if r.kind == "staging"} == {d.name for d in leftovers}
    assert all(d.exists() for d in leftovers)
    report = collect(Cache(cache_dir))
    assert {r.name for r in report.removed if r.kind == "staging"} == {d.name for d in leftovers}
    assert report.freed()["staging"] > 0
    assert not any(d.exists() for d in leftovers)
    assert not mounts_under(cache_dir)


@needs_root
def test_rmi_refuses_while_live_then_force_leaves_no_mount(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    ref = make_image([files_layer("a", 20)])
    other = make_image([files_layer("o", 20)])
    require(erofs_mounts(), "needs erofs mounts: the erofs base under the session is what rmi must unmount")
    session = prepare(ref, cache_dir, base_format="erofs")
    session.detach()
    keep = prepare(other, cache_dir, base_format="tree")
    assert mounts_under(cache_dir), "expected the session (and erofs base) to be mounted"

    code, out = cli("rmi", ref, "--cache-dir", str(cache_dir))
    assert code != 0 and "live session" in out and session.id in out
    assert session.path.joinpath("a", "f00000").exists()

    code, out = cli("rmi", ref, "--force", "--cache-dir", str(cache_dir))
    assert code == 0, out
    assert f"removed session {session.id}" in out
    cache = Cache(cache_dir)
    assert [i.refs for i in images(cache)] == [[other]] or all(other in i.refs for i in images(cache))
    assert not any(ref in i.refs for i in images(cache))
    assert cache.base_keys() == [keep.info.base]
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(session.session_dir) not in mountinfo
    assert not any(str(cache.bases_dir / k) in mountinfo for k in [session.info.base])
    keep.close()
    assert not mounts_under(cache_dir)
    code, out = cli("rmi", ref, "--cache-dir", str(cache_dir))
    assert code != 0 and "no such image" in out


def test_rmi_force_meeting_a_running_prepare_removes_nothing(tmp_path: Path, make_image) -> None:
    """Refused because a prepare holds the base: the image's sessions and refs are all still there
    (the soak found rmi --force had removed them before it refused)."""
    cache_dir = tmp_path / "cache"
    ref = make_image([files_layer("a", 10)])
    session = prepare(ref, cache_dir, base_format="tree")
    session.detach()
    cache = Cache(cache_dir)
    (key,) = cache.base_keys()
    before = images(cache)
    with cache.base_lease(key):  # what a running prepare holds
        code, out = cli("rmi", ref, "--force", "--cache-dir", str(cache_dir))
    assert code != 0
    assert [s.id for s in Sessions(cache).list()] == [session.id]
    assert images(cache) == before and ref in before[0].refs
    assert "running prepare" in out and "nothing was removed" in out
    assert session.path.joinpath("a", "f00000").exists()
    code, out = cli("rmi", ref, "--force", "--cache-dir", str(cache_dir))
    assert code == 0, out
    assert cache.base_keys() == [] and Sessions(cache).list() == []


@pytest.mark.parametrize("fmt", ["erofs", "ext4", "tar"])
def test_gc_never_removes_a_base_an_export_is_reading(tmp_path: Path, make_image, monkeypatch: pytest.MonkeyPatch,
                                                      fmt: str) -> None:
    """An export from a cached base (or base disk) holds the base's lease while it reads: a gc with a
    zero budget that runs meanwhile (here: just before the copy starts) skips it."""
    if fmt == "erofs":
        require(erofs_mounts(), "needs root and erofs mounts: the erofs export clones a cached erofs base")
    from dirge.fsimage import tarball

    export_module = importlib.import_module("dirge.exporting")  # the module (dirge.export is the function)

    cache = Cache(tmp_path / "cache")
    ref = make_image([files_layer("a", 20)])
    # erofs and ext4 exports write from the layers unless a prepare left an erofs base or a base disk
    if fmt == "erofs":
        prepare(ref, cache.root, base_format="erofs").close()
    elif fmt == "ext4":
        prepare(ref, cache.root, disk="ext4").close()
    export_module.export(ref, tmp_path / "first", format=fmt, cache=cache)  # the base (or disk) is cached now
    keys = cache.base_keys()
    assert keys
    removed: list[str] = []

    def gc_first(wrapped):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            removed.extend(r.name for r in collect(cache, max_size=0, grace=0).removed if r.kind == "base")
            return wrapped(*args, **kwargs)
        return run

    monkeypatch.setattr(export_module, "_clone", gc_first(export_module._clone))
    monkeypatch.setattr(tarball, "write_tar", gc_first(tarball.write_tar))
    result = export_module.export(ref, tmp_path / "second", format=fmt, cache=cache)
    assert removed == [] and cache.base_keys() == keys
    assert result.from_cache or fmt == "tar"
    first, second = (tmp_path / "first").read_bytes(), (tmp_path / "second").read_bytes()
    assert first == second
    monkeypatch.undo()
    assert collect(cache, max_size=0, grace=0).removed  # idle: now it goes


def test_images_json(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    shared = files_layer("s", 20)
    a = make_image([shared, files_layer("a", 5)])
    b = make_image([shared, files_layer("b", 5)])
    with prepare(a, cache_dir, base_format="tree") as sa:
        prepare(b, cache_dir, base_format="tree").close()
        code, out = cli("images", "--json", "--cache-dir", str(cache_dir))
        assert code == 0
        items = {i["refs"][0]: i for i in json.loads(out)}
        assert set(items) == {a, b}
        assert items[a]["live_sessions"] == [sa.id] and items[b]["live_sessions"] == []
        assert items[a]["formats"] == ["tree"] and items[a]["bytes"] > 0
        assert items[a]["digest"] == sa.digest and items[a]["last_used"] and items[a]["created"]


# -- must-show 1: the budget under load ---------------------------------------------------------------

WORKER = r"""
import hashlib, json, os, sys, time
from dirge.rootfs import prepare
refs, expected, cache, until, seed = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
n = 0
while time.time() < until:
    i = (seed + n) % len(refs)
    p = prepare(refs[i], cache, base_format=os.environ.get("LOAD_FORMAT", "tree"), lock_timeout=120)
    try:
        for name, digest in expected[i].items():
            got = hashlib.sha256((p.path / name).read_bytes()).hexdigest()
            assert got == digest, (refs[i], name, got, digest)
    finally:
        p.close()
    n += 1
print(json.dumps({"prepares": n}), flush=True)
"""


def test_budget_under_load(tmp_path: Path, make_image) -> None:
    seconds = float(os.environ.get("DIRGE_LOAD_SECONDS", "30"))
    cache_dir = tmp_path / "cache"
    refs, expected = [], []
    for i in range(4):
        layer = files_layer(f"img{i}", 300, 1024, seed=bytes([i]))
        refs.append(make_image([layer]))
        expected.append({f"img{i}/f{j:05d}": hashlib.sha256(
            hashlib.sha256(bytes([i]) + f"img{i}".encode() + str(j).encode()).digest() * 32).hexdigest()
            for j in (0, 7, 299)})
    # Measure one image's footprint to pick a budget smaller than the four together.
    probe = Cache(tmp_path / "probe")
    prepare(refs[0], probe.root, base_format="tree").close()
    one = usage(probe)
    budget = int(one * 2.5)
    until = time.time() + seconds
    workers = [subprocess.Popen([PY, "-c", WORKER, json.dumps(refs), json.dumps(expected), str(cache_dir),
                                 str(until), str(k)], stdout=subprocess.PIPE, text=True) for k in range(8)]
    cache = Cache(cache_dir)
    runs = evicted = 0
    try:
        while any(w.poll() is None for w in workers):
            evicted += sum(r.kind == "base" for r in collect(cache, max_size=budget).removed)
            runs += 1
    finally:
        outs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    total = sum(json.loads(o[0])["prepares"] for o in outs)
    print(f"{seconds:g} s: {total} checked prepares by 8 processes, {runs} gc runs (budget {budget} bytes), "
          f"{evicted} bases evicted")
    assert total >= 8 and runs >= 2, (total, runs)
    # gc did evict under load (tree bases: the budget holds two of them, so while fewer than three are
    # live, one goes); erofs sessions are so quick that every base may be in use at every gc run.
    assert evicted >= 1 or os.environ.get("LOAD_FORMAT", "tree") != "tree", (total, runs, evicted)
    report = verify_cache(cache)
    assert report.ok, report.problems
    collect(cache, max_size=budget)
    assert usage(cache) <= budget
    assert Sessions(cache).list() == []
    assert not mounts_under(cache.sessions_dir)  # (an erofs base stays mounted while it is cached: by design)
    assert {p.parent.name for p in mounts_under(cache.bases_dir)} <= set(cache.base_keys())


def test_prepare_runs_gc_when_over_the_configured_budget(tmp_path: Path, make_image, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    refs = [make_image([files_layer(f"x{i}", 30, 1024)]) for i in range(3)]
    config = tmp_path / "config.toml"  # dirge's own config file (docs/CONFIG.md)
    config.write_text('[cache]\nmax_size = "1"\n')  # every base is over it: only live ones stay
    monkeypatch.setenv("DIRGE_CONFIG", str(config))
    monkeypatch.setenv("DIRGE_REGISTRIES_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("DIRGE_CACHE_MAX_SIZE", raising=False)
    sessions = [prepare(r, cache_dir, base_format="tree") for r in refs]
    cache = Cache(cache_dir)
    assert sorted(cache.base_keys()) == sorted(s.info.base for s in sessions)  # live: kept
    for s in sessions:
        s.close()
    budget = usage(cache) // 2  # room for one of the three bases, not two
    monkeypatch.setenv("DIRGE_CACHE_MAX_SIZE", str(budget))
    with prepare(refs[0], cache_dir, base_format="tree") as s:
        assert cache.base_keys() == [s.info.base]  # the others were least recently used and idle
    assert usage(cache) <= budget


def test_keep_spares_recently_used_bases(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    old, new = make_image([files_layer("o", 5)]), make_image([files_layer("n", 5)])
    prepare(old, cache_dir, base_format="tree").close()
    prepare(new, cache_dir, base_format="tree").close()
    cache = Cache(cache_dir)
    old_key = next(k for k in cache.base_keys() if cache.load_base(k).config is not None
                   and json.loads((cache.base_dir(k) / "image.json").read_text())["image"] == old)
    long_ago = time.time() - 3 * 86400
    os.utime(cache.last_used_path(old_key), (long_ago, long_ago))
    code, out = cli("gc", "--keep", "1d", "--json", "--cache-dir", str(cache_dir))
    assert code == 0
    removed = [(r["kind"], r["name"]) for r in json.loads(out)["removed"]]
    assert removed == [("base", old_key)]
    assert len(cache.base_keys()) == 1
    code, out = cli("gc", "--keep", "1d", "--cache-dir", str(cache_dir))
    assert code == 0 and "freed: nothing" in out


def test_over_budget_gc_evicts_the_least_recently_used_refs_and_their_blobs(tmp_path: Path, make_image) -> None:
    """Step 5: with every idle base gone and the cache still over budget, the least recently used
    images that are only ref records and blobs go, oldest first; an image a live session uses stays."""
    cache_dir = tmp_path / "cache"
    live_ref, old, new = (make_image([files_layer(p, 40, 1024)]) for p in ("l", "o", "n"))
    live = prepare(live_ref, cache_dir, base_format="tree")
    prepare(old, cache_dir, base_format="tree").close()
    prepare(new, cache_dir, base_format="tree").close()
    cache = Cache(cache_dir)
    by_ref = {i.refs[0]: i for i in images(cache)}
    everything = collect(cache, max_size=0, dry_run=True, grace=0)
    ref_of = {r.name: r.bytes for r in everything.removed if r.kind == "ref"}
    assert {Path(f).name for f in by_ref[old].ref_files + by_ref[new].ref_files} == set(ref_of)  # not live's

    held = {f"sha256:{p.name}" for p in cache.blobs_dir.iterdir()}
    blobs = {i.refs[0]: {f"sha256:{h}" for h in reachable(cache, [i.digest[7:]])} & held for i in by_ref.values()}
    assert all(blobs.values())
    freed = {r.name: r.bytes for r in everything.removed if r.kind in ("blob", "base")}
    budget = everything.size_before - sum(freed.values()) + sum(freed[b] for b in blobs[new])
    # (room for the live and the newer image's blobs, not the old one's; ref records are not counted)
    before = tree_state(cache_dir)
    dry = collect(cache, max_size=budget, dry_run=True, grace=0)
    assert tree_state(cache_dir) == before, "a dry run removed something"
    real = collect(cache, max_size=budget, grace=0)
    assert sorted((r.kind, r.name) for r in real.removed) == sorted((r.kind, r.name) for r in dry.removed)
    assert usage(cache) <= budget
    left = {i.refs[0] for i in images(cache)}
    assert old not in left and new in left and live_ref in left  # the oldest went; that was enough
    held = {f"sha256:{p.name}" for p in cache.blobs_dir.iterdir()}
    assert blobs[old].isdisjoint(held) and blobs[new] <= held and blobs[live_ref] <= held
    live.close()
    with prepare(old, cache_dir, base_format="tree") as again:  # from its layout, as before
        assert (again.path / "o/f00039").stat().st_size == 1024
        assert verify_cache(cache).ok


def test_evicting_the_base_of_an_image_without_a_ref_record_frees_its_blobs_too(tmp_path: Path, make_image) -> None:
    """An image prepared by digest has no ref record: once its base goes, its blobs reach nothing, and
    gc counts them as freed at once instead of evicting the next base (or a ref) to get under budget."""
    cache_dir = tmp_path / "cache"
    unnamed, named = make_image([files_layer("u", 40, 1024)]), make_image([files_layer("n", 40, 1024)])
    prepare(unnamed, cache_dir, base_format="tree").close()  # least recently used
    prepare(named, cache_dir, base_format="tree").close()
    cache = Cache(cache_dir)
    by_ref = {i.refs[0]: i for i in images(cache)}
    for ref_file in by_ref[unnamed].ref_files:  # as if prepared by digest: nothing names it
        Path(ref_file).unlink()
    held = {p.name for p in cache.blobs_dir.iterdir()}
    own = reachable(cache, [by_ref[unnamed].digest[7:]]) & held
    assert own and own.isdisjoint(reachable(cache, [by_ref[named].digest[7:]]))
    budget = usage(cache) - by_ref[unnamed].bytes  # its base and the blobs only it uses
    dry = collect(cache, max_size=budget, dry_run=True, grace=0)
    report = collect(cache, max_size=budget, grace=0)
    assert sorted((r.kind, r.name) for r in report.removed) == sorted((r.kind, r.name) for r in dry.removed)
    assert sorted(r.kind for r in report.removed) == ["base"] + ["blob"] * len(own), report.removed
    assert usage(cache) <= budget
    assert [i.refs[0] for i in images(cache)] == [named] and len(cache.base_keys()) == 1


def test_sigkilled_prepare_mid_download_leaves_nothing_after_gc(registry, fault_proxy, tmp_path: Path) -> None:
    """A prepare killed while its layer downloads (and is applied as it arrives) leaves a staging
    directory and a temp blob behind: gc --dry-run names both, gc removes both."""
    import threading

    from registry import push_layout
    from dirge.sources.layout import LayoutWriter

    layout = tmp_path / "layout"
    layer = LayerBuilder().file("first", b"early").file("pad", os.urandom(3 << 20)).file("tail", os.urandom(4 << 20))
    LayoutWriter(layout).add_image([layer.build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/k/app:1")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    proxy = fault_proxy(registry)
    release = threading.Event()
    proxy.fail(f"/blobs/{manifest['layers'][0]['digest']}", "stall_mid_body", method="GET", after_bytes=5 << 20,
               release=release)
    cache_dir = tmp_path / "cache"
    cache = Cache(cache_dir)
    child = subprocess.Popen([PY, "-c", KILLED, f"{proxy.host}/k/app:1", str(cache_dir)])
    deadline = time.monotonic() + 60
    try:
        while not (list(cache.staging_dir.glob("*/rootfs/first")) and list(cache.blobs_dir.glob(".tmp-*"))):
            assert child.poll() is None, "the prepare ended before it could be killed"
            assert time.monotonic() < deadline, "the download never started"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        release.set()
    staging = [d.name for d in cache.staging_dir.iterdir() if not d.name.startswith(".")]
    temps = [f"blobs/sha256/{p.name}" for p in cache.blobs_dir.glob(".tmp-*")]
    assert staging and temps
    before = tree_state(cache_dir)
    dry = collect(cache, dry_run=True, grace=0)
    assert tree_state(cache_dir) == before
    expected = {("staging", n) for n in staging} | {("temp", n) for n in temps}
    assert expected <= {(r.kind, r.name) for r in dry.removed}
    real = collect(cache, grace=0)
    assert sorted((r.kind, r.name) for r in real.removed) == sorted((r.kind, r.name) for r in dry.removed)
    assert not list(cache.blobs_dir.glob(".tmp-*")) and not [d for d in cache.staging_dir.iterdir()
                                                              if not d.name.startswith(".")]
    assert not mounts_under(cache_dir)
    with prepare(f"{proxy.host}/k/app:1", cache_dir, base_format="tree") as s:  # and the next prepare works
        assert (s.path / "first").read_bytes() == b"early"
    assert verify_cache(cache).ok


def test_killed_buildah_export_leftovers_go_once_their_lock_is_free(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    image_id = "ab" * 32
    partial = cache.exports_dir / f".{image_id[:16]}-k1ll3d"  # sources/buildah.py's temp export name
    trash = cache.exports_dir / ".trash-5fe1"
    for d in (partial / "layout", trash):
        d.mkdir(parents=True)
        (d / "blob").write_bytes(b"x" * 4096)
    from dirge.store.lock import FileLock

    with FileLock(cache.lock_path(f"export-{image_id}")):  # an export of that image is running
        report = collect(cache, grace=0)
        assert partial.exists() and not trash.exists()
        assert any("being written" in s for s in report.skipped)
    report = collect(cache, grace=0)
    assert not partial.exists()
    assert {r.name for r in report.removed if r.kind == "export"} == {partial.name}


def test_gc_removes_boot_leftovers_of_kernels_gone_or_superseded(tmp_path: Path, monkeypatch) -> None:
    """``dirge boot``'s cache: an initramfs whose kernel's modules are gone, an older initramfs of the same
    kernel and root kind, a verdict for a kernel file that is gone and a killed writer's temp file go;
    the newest initramfs of an installed kernel and a verdict for a kernel that exists stay."""
    import dirge.lifecycle

    modules = tmp_path / "modules"
    (modules / "6.1.0-9-amd64").mkdir(parents=True)
    monkeypatch.setattr(dirge.lifecycle, "MODULES_ROOT", modules)
    kernel = tmp_path / "vmlinuz-6.1.0-9-amd64"
    kernel.write_bytes(b"kernel")
    cache = Cache(tmp_path / "cache")
    cache.boot_dir.mkdir(parents=True)
    boot = BootCache(cache.root)
    long_ago = time.time() - 3600

    def put(path: Path, data: bytes, mtime: float) -> Path:
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))
        return path

    keep = [put(boot.initramfs_path("6.1.0-9-amd64", "ext4", "a" * 16), b"new", long_ago + 10),  # newest, not last
            put(boot.initramfs_path("6.1.0-9-amd64", "erofs", "c" * 16), b"erofs", long_ago),
            put(boot.accel_record_path("1" * 16), json.dumps({"kvm": False, "kernel": str(kernel)}).encode(), long_ago)]
    gone = [put(boot.initramfs_path("6.1.0-9-amd64", "ext4", "b" * 16), b"old", long_ago),
            put(boot.initramfs_path("5.10.0-1-amd64", "9p", "d" * 16), b"no modules", long_ago),
            put(boot.accel_record_path("2" * 16), json.dumps({"kvm": True, "kernel": "/boot/nowhere"}).encode(), long_ago),
            put(cache.boot_dir / f".{boot.initramfs_path('6.1.0-9-amd64', '9p', 'e' * 16).name}.1.tmp", b"half", long_ago)]
    fresh_temp = cache.boot_dir / ".accel-3333333333333333.json.77"
    fresh_temp.write_bytes(b"being written")
    assert sorted((r, k) for _, r, k in boot.initramfs_images()) == [
        ("5.10.0-1-amd64", "9p"), ("6.1.0-9-amd64", "erofs"), ("6.1.0-9-amd64", "ext4"), ("6.1.0-9-amd64", "ext4")]

    dry = collect(cache, dry_run=True)
    assert all(p.exists() for p in keep + gone)
    real = collect(cache)
    assert sorted((r.kind, r.name) for r in real.removed) == sorted((r.kind, r.name) for r in dry.removed)
    assert sorted(r.name for r in real.removed if r.kind in ("boot", "temp")) == sorted(
        str(p.relative_to(cache.root)) for p in gone)
    assert all(p.exists() for p in keep + [fresh_temp]) and not any(p.exists() for p in gone)
