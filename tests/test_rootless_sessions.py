"""Rootless O(1) sessions (issue 20): an ordinary user's session is a fuse-overlayfs mount over the tree
base, not a copy. Every check runs as uid 65534 (setpriv) in a subprocess that prints what it saw as
JSON; the assertions are made here, as root, which also reads /proc/self/mountinfo (same namespace)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root, needs_tool
from images import layered, metadata

NOBODY = 65534
SRC = Path(__file__).resolve().parent.parent / "src"

pytestmark = [needs_root, needs_tool("setpriv", "fuse-overlayfs", "fusermount3")]


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in the mount table (the test's own reading of it)."""
    base = os.path.realpath(path)
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4]
        if point == base or point.startswith(base + "/"):
            out.append(line)
    return out


@pytest.fixture
def work(make_image) -> Iterator[tuple[Path, str, str]]:
    """(a directory uid 65534 owns, the layered image's ref, the metadata image's ref), readable by it:
    pytest's tmp_path sits below a root-only directory. Whatever is still mounted below is unmounted
    (lazily) before the directory goes, even when the test failed midway."""
    d = Path(tempfile.mkdtemp(prefix="dirge-rootless-", dir="/var/tmp"))
    try:
        os.chmod(d, 0o755)
        os.chown(d, NOBODY, NOBODY)
        refs = []
        for name, layers in (("layered", layered()), ("meta", metadata(overlay_xattr=False))):
            layout = make_image(layers)[len("oci:"):].rpartition(":")[0]
            shutil.copytree(layout, d / name)
            subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(d / name)], check=True)
            refs.append(f"oci:{d / name}:t")
        yield d, refs[0], refs[1]
    finally:
        for line in reversed(_mounts_under(d)):
            subprocess.run(["umount", "-l", line.split(" ")[4]], check=False)
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(script: str, *args: str, cwd: Path = Path("/")) -> Any:
    """Run ``script`` (Python, with ``args`` in sys.argv[1:]) as uid/gid 65534; its stdout's JSON."""
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                           "-c", script, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(SRC), "HOME": "/nonexistent"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


_PRELUDE = """
import json, os, sys
from pathlib import Path
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.store.cache import Cache
ref, cache_dir = sys.argv[1], Path(sys.argv[2])
cache = Cache(cache_dir)

def listing(top):
    return sorted(str(p.relative_to(top)) for p in Path(top).rglob("*"))

def base_of(s):
    return cache.base_dir(s.info.base) / "rootfs"
"""


def test_a_rootless_session_is_a_fuse_overlay_of_the_tree_base(work: tuple[Path, str, str]) -> None:
    d, ref, _ = work
    cache = d / "cache"
    seen = as_nobody(_PRELUDE + """
a = prepare(ref, cache_dir, base_format="tree")
b = prepare(ref, cache_dir, base_format="tree")
a.detach(); b.detach()
base = base_of(a)
sdir = a.path.parent
out = {"strategy": a.info.strategy, "record": json.loads((sdir / "session.json").read_text())["strategy"],
       "upper_after_create": listing(sdir / "upper"), "rootfs": str(a.path), "rootfs_b": str(b.path),
       "base": str(base), "base_before": listing(base), "passwd_before": (base / "etc/passwd").read_text()}
# Writes, a replaced file, a deleted file and a deleted directory in session a.
(a.path / "new-file").write_text("mine")
(a.path / "etc/passwd").write_text("changed\\n")
os.unlink(a.path / "etc/conf.d/a")
os.unlink(a.path / "usr/bin/tool")
import shutil; shutil.rmtree(a.path / "opq")
out.update(upper_after_writes=listing(sdir / "upper"), a_listing=listing(a.path), b_listing=listing(b.path),
           a_passwd=(a.path / "etc/passwd").read_text(), b_passwd=(b.path / "etc/passwd").read_text(),
           base_after=listing(base), passwd_after=(base / "etc/passwd").read_text(),
           tool_hardlink=(a.path / "usr/bin/tool-hardlink").read_text())
print(json.dumps(out))
""", ref, str(cache))
    assert seen["strategy"] == seen["record"] == "fuse-overlayfs"
    assert seen["upper_after_create"] == [], "create copied files: not O(1)"
    rootfs, rootfs_b = Path(seen["rootfs"]), Path(seen["rootfs_b"])
    for point in (rootfs, rootfs_b):
        lines = _mounts_under(point)
        assert len(lines) == 1 and " fuse.fuse-overlayfs " in lines[0], lines
        options = lines[0].split(" ")[5].split(",")
        assert "nosuid" in options and "nodev" in options, lines[0]  # an image's setuid file gains nothing
    # The writes went to a's upper dir, and nowhere else: the base and session b are as they were.
    assert "new-file" in seen["upper_after_writes"] and "etc/passwd" in seen["upper_after_writes"]
    assert seen["base_after"] == seen["base_before"] and seen["passwd_after"] == seen["passwd_before"]
    assert seen["b_listing"] == seen["base_before"] and seen["b_passwd"] == seen["passwd_before"]
    assert seen["a_passwd"] == "changed\n"
    expected = (set(seen["base_before"]) | {"new-file"}) - {"etc/conf.d/a", "usr/bin/tool"}
    expected = {p for p in expected if p != "opq" and not p.startswith("opq/")}
    assert set(seen["a_listing"]) == expected
    assert seen["tool_hardlink"] == "#!/bin/sh\n"  # unlinking one name of a hardlink leaves the other

    # Removal, as the user: unmounted (fusermount3), then deleted; the other session is untouched until
    # its own turn, the way `dirge session rm --all` goes through them.
    gone = as_nobody(_PRELUDE + """
sessions = Sessions(cache)
first, second = sorted(sessions.list(), key=lambda s: s.id != Path(sys.argv[3]).parent.name)
sessions.remove(first.id)
out = {"other_still_there": (sessions.rootfs(second.id) / "etc/passwd").read_text()}
for s in sessions.list():
    sessions.remove(s.id)
out["left"] = [p.name for p in sessions.dir.iterdir()]
print(json.dumps(out))
""", ref, str(cache), str(rootfs))
    assert gone["other_still_there"] == seen["passwd_before"]
    assert gone["left"] == []
    assert _mounts_under(cache) == []
    assert Path(seen["base"]).is_dir() and not rootfs.parent.exists() and not rootfs_b.parent.exists()


def test_owners_modes_and_xattrs_through_the_mount_are_the_bases(work: tuple[Path, str, str]) -> None:
    d, _, ref = work
    seen = as_nobody(_PRELUDE + """
import stat
def describe(top):
    out = {}
    for p in sorted(Path(top).rglob("*")):
        st = p.lstat()
        try:
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False).hex() for n in os.listxattr(p, follow_symlinks=False)}
        except OSError as e:
            xattrs = {"error": e.errno}
        out[str(p.relative_to(top))] = [stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                                        st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None, xattrs]
    return out
s = prepare(ref, cache_dir, base_format="tree")
base = base_of(s)
out = {"strategy": s.info.strategy, "base": describe(base), "mount": describe(s.path)}
# A copy-up (the file changes in the session) keeps the image's owner record.
owned = s.path / "m/owned"
with open(owned, "a") as f:
    f.write("more")
out["owned_after"] = describe(s.path)["m/owned"]
out["owned_upper"] = describe(s.path.parent / "upper")["m/owned"]
s.close()
out["left"] = os.path.exists(s.path.parent)
print(json.dumps(out))
""", ref, str(d / "cache"))
    assert seen["strategy"] == "fuse-overlayfs"
    assert seen["mount"] == seen["base"]
    # The base is a rootless tree: the caller's files, the image's owners recorded in xattrs.
    mode, uid, gid, _, _, _, xattrs = seen["base"]["m/owned"]
    assert (mode, uid, gid) == ("-rw-r-----", NOBODY, NOBODY) and "user.rootlesscontainers" in xattrs
    assert seen["owned_after"][:3] == seen["base"]["m/owned"][:3]
    assert seen["owned_after"][6] == xattrs
    # On disk the copied-up file keeps the record too (beside fuse-overlayfs's own, which the mount hides).
    upper_xattrs = seen["owned_upper"][6]
    assert {n: v for n, v in upper_xattrs.items() if not n.startswith("user.fuseoverlayfs.")} == xattrs
    assert seen["base"]["m/setuid"][0] == "-rwsr-xr-x"  # kept as a mode; the mount is nosuid (above)
    assert not seen["left"] and _mounts_under(d / "cache") == []


def test_a_crashed_sessions_mount_is_cleaned_without_its_record(work: tuple[Path, str, str]) -> None:
    """A session still mounted whose session.json is gone (a crash, or a hand): removal by strategy
    falls back to every strategy's undoing, which unmounts through fusermount3 first."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
from dirge.session import destroy
s = prepare(ref, cache_dir, base_format="tree")
s.detach()
sdir = s.path.parent
(sdir / "session.json").unlink()
out = {"rootfs": str(s.path), "listed": [x.id for x in Sessions(cache).list()]}
destroy(sdir)
out["left"] = os.path.exists(sdir)
print(json.dumps(out))
""", ref, str(d / "cache"))
    assert seen["listed"] == [] and not seen["left"]
    assert _mounts_under(Path(seen["rootfs"]).parent) == []


def test_fuse_overlayfs_is_not_chosen_as_root(tmp_path: Path) -> None:
    """Root gets the kernel's overlay; fuse-overlayfs is probed only for an ordinary user."""
    from dirge.session import backends

    (tmp_path / "base").mkdir()
    assert not backends.FUSE_OVERLAY.probe(tmp_path / "base", tmp_path)


def test_a_cache_path_fuse_overlayfs_cannot_take_falls_back_to_a_copy(work: tuple[Path, str, str]) -> None:
    """fuse-overlayfs splits its options at ',' and lowerdir at ':': a cache path holding one is never
    handed to it (no option injection); the session is a copy (or reflink) instead, and says so."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
with prepare(ref, cache_dir, base_format="tree") as s:
    print(json.dumps({"strategy": s.info.strategy, "passwd": (s.path / "etc/passwd").read_text()}))
""", ref, str(d / "ca,che:x"))
    assert seen["strategy"] in ("reflink", "copy")  # reflink where /var/tmp is xfs or btrfs
    assert seen["passwd"] == "root:x:0:0::/root:/bin/sh\n"
    assert _mounts_under(d) == []


def test_a_snapshot_of_a_fuse_session_saves_its_tree_and_restores_as_a_copy(work: tuple[Path, str, str]) -> None:
    """The upper dir alone holds fuse-overlayfs's own whiteout forms, so the merged tree is saved; a
    restore copies it (a session never depends on a snapshot that ``snapshot delete`` may remove)."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
from dirge.rootfs import restore
with prepare(ref, cache_dir, base_format="tree") as s:
    (s.path / "saved").write_text("kept")
    os.unlink(s.path / "etc/conf.d/a")
    Sessions(cache).snapshot_save(s.info.id, "snap")
with restore("snap", cache_dir) as r:
    out = {"strategy": r.info.strategy, "saved": (r.path / "saved").read_text(),
           "deleted_stays_deleted": not (r.path / "etc/conf.d/a").exists(),
           "kind": Sessions(cache).snapshot_meta("snap")["kind"]}
Sessions(cache).snapshot_delete("snap")
print(json.dumps(out))
""", ref, str(d / "cache"))
    assert seen["strategy"] in ("reflink", "copy")  # reflink where /var/tmp is xfs or btrfs
    assert (seen["saved"], seen["deleted_stays_deleted"], seen["kind"]) == ("kept", True, "tree")
    assert _mounts_under(d) == []


def test_a_relative_cache_path_mounts_the_right_directories(work: tuple[Path, str, str]) -> None:
    """The daemon runs in "/": it is handed absolute paths, whatever the caller's cache path was."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
with prepare(ref, cache_dir, base_format="tree") as s:
    (s.path / "x").write_text("x")
    print(json.dumps({"strategy": s.info.strategy, "upper": listing(s.path.parent / "upper"),
                      "passwd": (s.path / "etc/passwd").read_text()}))
""", ref, "cache", cwd=d)
    assert seen == {"strategy": "fuse-overlayfs", "upper": ["x"], "passwd": "root:x:0:0::/root:/bin/sh\n"}
    assert _mounts_under(d) == []


def test_prune_and_gc_unmount_dead_fuse_sessions(work: tuple[Path, str, str]) -> None:
    """prune removes sessions whose owner is gone; gc does too, and unmounts a session directory left
    mounted without its record. Each fuse mount goes (fusermount3 -u) before any file is deleted."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
import subprocess
from dirge.lifecycle import collect
dead = subprocess.Popen(["true"]); dead.wait()
for _ in range(2):
    prepare(ref, cache_dir, base_format="tree", owner_pid=dead.pid).detach()
out = {"strategies": sorted(s.strategy for s in Sessions(cache).list())}
out["pruned"] = len(Sessions(cache).prune())
orphan = prepare(ref, cache_dir, base_format="tree", owner_pid=dead.pid)
orphan.detach()
(orphan.path.parent / "session.json").unlink()  # a crash: mounted, no record
leftover = prepare(ref, cache_dir, base_format="tree", owner_pid=dead.pid)
leftover.detach()
collect(cache, grace=0)
out["orphan"] = orphan.path.parent.name
out["left"] = sorted(p.name for p in Path(cache.sessions_dir).iterdir())
out["orphan_upper_kept"] = listing(orphan.path.parent / "upper")
print(json.dumps(out))
""", ref, str(d / "cache"))
    assert seen["strategies"] == ["fuse-overlayfs", "fuse-overlayfs"] and seen["pruned"] == 2
    # The dead session with a record is gone; the record-less directory is unmounted and left for
    # its owner to look at (gc's rule for any strategy; ``session.destroy`` removes it, tested above).
    assert seen["left"] == [seen["orphan"]] and seen["orphan_upper_kept"] == []
    assert _mounts_under(d) == []


def test_a_session_whose_fuse_daemon_died_is_still_removed(work: tuple[Path, str, str]) -> None:
    """A killed fuse-overlayfs leaves a dead mount ("Transport endpoint is not connected"); removal
    still unmounts it and deletes the session."""
    d, ref, _ = work
    seen = as_nobody(_PRELUDE + """
import signal
s = prepare(ref, cache_dir, base_format="tree")
s.detach()
sdir = str(s.path.parent)
def cmdline(p):
    try:
        return (p / "cmdline").read_bytes()
    except OSError:  # exited meanwhile, or not ours to read
        return b""
daemons = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
           and b"fuse-overlayfs" in cmdline(p) and sdir.encode() in cmdline(p)]
import select
for pid in daemons:
    fd = os.pidfd_open(pid)
    os.kill(pid, signal.SIGKILL)
    select.select([fd], [], [])  # readable once the daemon has exited
    os.close(fd)
try:
    os.listdir(s.path)
    dead = False
except OSError as e:
    dead = e.errno
Sessions(cache).remove(s.info.id)
print(json.dumps({"daemons": len(daemons), "dead": dead, "rootfs": str(s.path), "left": os.path.exists(sdir)}))
""", ref, str(d / "cache"))
    assert seen["daemons"] == 1 and seen["dead"] in (errno.ENOTCONN, errno.ECONNABORTED)
    assert not seen["left"] and _mounts_under(Path(seen["rootfs"]).parent) == []
