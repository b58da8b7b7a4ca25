"""kill -9 anywhere (issue 14 item 4): SIGKILL ``dirge pull``, ``session create`` (tree and erofs bases),
``export``, ``gc``, ``rmi`` and ``session rm`` at random moments; after each kill the next command
succeeds at once (no lock wait: a killed holder's flock is gone), ``cache verify`` is clean after
``dirge gc`` (the documented cleaner of a killed process's leftovers), and no mount or loop device
leaks.

The moments come from a seeded ``random.Random`` (``$DIRGE_KILL_SEED``, default 14): each kill lands after
a random delay within the operation's measured duration -- the one place where a delay is the point,
not a timing assertion. ``$DIRGE_KILLS`` (default 30) sets how many; ``bench/killcampaign.py`` runs 100
and prints the counts (``$DIRGE_KILL_REPORT``: where this test writes them as JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_root
from dirge.store.cache import Cache
from dirge.fsimage.mount import erofs_supported
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter
from dirge.verify import verify_cache

PY = sys.executable
OPS = ("pull", "prepare-tree", "prepare-erofs", "export", "gc", "rmi", "session-rm")
NEXT_SLACK = 10.0  # seconds beyond an operation's own measured duration the next command may take


def files_layer(prefix: str, n: int, seed: str) -> bytes:
    b = LayerBuilder().dir(prefix)
    for i in range(n):
        b.file(f"{prefix}/f{i:05d}", hashlib.sha256(f"{seed}/{prefix}/{i}".encode()).digest() * 8)
    return b.build()


def make_layout(path: Path, seed: str, files: int = 1500) -> str:
    LayoutWriter(path).add_image([files_layer("a", files, seed), files_layer("b", files, seed)], tag="t")
    return f"oci:{path}:t"


def mounts_below(root: Path) -> list[str]:
    """Mount points in /proc/self/mountinfo under ``root``."""
    top = str(root.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == top or point.startswith(top + "/"):
            out.append(point)
    return sorted(out)


def loops_below(root: Path) -> list[str]:
    proc = subprocess.run(["losetup", "-a"], capture_output=True, text=True)
    top = str(root.resolve())
    return sorted(line for line in proc.stdout.splitlines() if top in line)


class Campaign:
    def __init__(self, tmp: Path, registry_ref: str | None, seed: int) -> None:
        self.tmp = tmp
        self.cache_dir = tmp / "cache"
        self.rng = random.Random(seed)
        self.images = {name: make_layout(tmp / f"layout-{name}", name)
                       for name in ("tree", "erofs", "export", "gc", "rmi", "rm")}
        self.registry_ref = registry_ref
        self.env = {**os.environ, "DIRGE_CACHE_DIR": str(self.cache_dir)}
        self.duration: dict[str, float] = {}
        self.kills: dict[str, int] = {op: 0 for op in OPS}
        self.failures: list[str] = []
        self.notes: list[str] = []  # what a fix outside the campaign's files must address
        self.last_follow_id: str | None = None
        self.session_id: str | None = None

    # -- running dirge ---------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        return [PY, "-m", "dirge.cli", *args]

    def run(self, *args: str, timeout: float = 120.0, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if ok and proc.returncode != 0:
            raise AssertionError(f"dirge {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
        return proc

    def sessions(self) -> list[dict]:
        return json.loads(self.run("session", "ls", "--json").stdout)

    # -- each operation: (setup, command) --------------------------------------------------------

    def setup(self, op: str) -> list[str]:
        """Bring the cache to a state where ``op`` has work to do; return its command."""
        if op == "pull":
            assert self.registry_ref is not None
            for blob in self.cache_dir.joinpath("blobs", "sha256").glob("*"):
                if blob.name in self.pull_blobs:
                    blob.unlink()
            return ["pull", self.registry_ref, "--pull", "always"]
        if op in ("prepare-tree", "prepare-erofs"):
            fmt = op.split("-")[1]
            image = self.images[fmt]
            self.clear_image(image)
            return ["session", "create", image, "--base-format", fmt, "--json"]
        if op == "export":
            out = self.tmp / "export.erofs"
            out.unlink(missing_ok=True)
            return ["export", self.images["export"], str(out), "--format", "erofs"]
        if op == "gc":
            self.run("session", "create", self.images["gc"], "--base-format", "tree", "--json")
            self.remove_sessions(self.images["gc"])
            return ["gc", "--max-size", "0"]
        if op == "rmi":
            self.run("session", "create", self.images["rmi"], "--base-format", "tree", "--json")
            return ["rmi", "--force", self.images["rmi"]]
        if op == "session-rm":
            out = self.run("session", "create", self.images["rm"], "--base-format", "tree", "--strategy", "copy",
                           "--json").stdout
            self.session_id = json.loads(out)["id"]
            return ["session", "rm", self.session_id]
        raise AssertionError(op)

    def next_command(self, op: str, killed_cmd: list[str]) -> list[str]:
        """What must succeed at once after ``op`` was killed."""
        if op in ("rmi", "gc"):  # a prepare of what the killed command was removing
            return ["session", "create", self.images[op], "--base-format", "tree", "--json"]
        if op == "session-rm":
            return ["session", "rm", "--all"]  # the killed session, whatever state it was left in
        return killed_cmd

    def clear_image(self, image: str) -> None:
        self.remove_sessions(image)
        proc = self.run("rmi", "--force", image, ok=False)
        if proc.returncode != 0 and "no such image" not in proc.stderr:
            raise AssertionError(f"rmi {image}: {proc.stderr.strip()}")

    def remove_sessions(self, image: str) -> None:
        for s in self.sessions():
            if s["image"] == image:
                self.run("session", "rm", s["id"])

    # -- the campaign ------------------------------------------------------------------------------

    def measure(self) -> None:
        if self.registry_ref is not None:
            self.run("pull", self.registry_ref)
            cache = Cache(self.cache_dir)
            self.pull_blobs = {p.name for p in cache.blobs_dir.iterdir() if not p.name.startswith(".")}
        for op in OPS:
            if op == "pull" and self.registry_ref is None:
                continue
            cmd = self.setup(op)
            start = time.monotonic()
            self.run(*cmd)
            self.duration[op] = time.monotonic() - start

    def kill_once(self, op: str) -> None:
        cmd = self.setup(op)
        before = {s["id"] for s in self.sessions()}
        delay = self.rng.uniform(0.0, self.duration[op])
        proc = subprocess.Popen(self.argv(*cmd), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills[op] += 1
        where = f"{op} killed after {delay:.3f}s of {self.duration[op]:.3f}s"
        try:
            follow = self.next_command(op, cmd)
            limit = self.duration[op] * 3 + NEXT_SLACK
            start = time.monotonic()
            try:
                done = self.run(*follow, timeout=limit, ok=False)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"next command {' '.join(follow)} still running after {limit:.1f}s") from None
            self.last_follow_id = None
            if done.returncode == 0 and follow[:2] == ["session", "create"]:
                self.last_follow_id = json.loads(done.stdout)["id"]
            if done.returncode != 0:
                raise AssertionError(f"next command {' '.join(follow)} exited {done.returncode} after "
                                     f"{time.monotonic() - start:.1f}s: {done.stderr.strip()[-600:]}")
            self.run("gc")
            report = verify_cache(Cache(self.cache_dir))
            if not report.ok:
                raise AssertionError(f"cache verify: {report.as_json()['problems'][:5]}")
            leaked = self.unowned_mounts()
            if leaked:
                raise AssertionError(f"mounts nothing owns: {leaked}")
            cache = Cache(self.cache_dir)
            torn = [p.name for p in cache.sessions_dir.iterdir() if not (p / "session.json").is_file()
                    and not p.name.startswith(".")]
            if torn:
                raise AssertionError(f"session directories without a record: {torn}")
            if cache.trash_dir.exists() and any(cache.trash_dir.iterdir()):
                raise AssertionError(f"trash left after gc: {[p.name for p in cache.trash_dir.iterdir()]}")
            if op.startswith("prepare"):  # the killed create's session: gone, or whole and handed over
                for s in self.sessions():
                    if s["id"] not in before and s["id"] != self.last_follow_id and \
                            (s["pid"] != os.getpid() or not Path(s["path"]).is_dir()):
                        raise AssertionError(f"a killed create left session {s['id']} (pid {s['pid']})")
            stray = sorted(p.name for p in self.tmp.glob(".export.erofs.*"))
            if stray:
                self.notes.append(f"{where}: temp files beside OUT: {stray}")
                for name in stray:
                    (self.tmp / name).unlink()
        except AssertionError as exc:
            self.failures.append(f"{where}: {exc}")

    def unowned_mounts(self) -> list[str]:
        """Mounts under the cache that are neither a recorded session's nor a published erofs base's."""
        cache = Cache(self.cache_dir)
        root = str(self.cache_dir.resolve())
        owned = {str((cache.sessions_dir / s["id"] / "rootfs").resolve()) for s in self.sessions()}
        owned |= {str(cache.base_dir(k) / "rootfs") for k in cache.base_keys() if cache.load_base(k) is not None}
        owned = {p.replace(str(self.cache_dir), root) for p in owned}
        return [m for m in mounts_below(self.cache_dir) if m not in owned]

    def finish(self) -> None:
        """Remove everything: no mount, no loop device may remain."""
        self.run("session", "rm", "--all")
        for image in self.images.values():
            self.run("rmi", "--force", image, ok=False)
        if self.registry_ref is not None:
            self.run("rmi", "--force", self.registry_ref, ok=False)
        self.run("gc")
        report = verify_cache(Cache(self.cache_dir))
        if not report.ok:
            self.failures.append(f"final cache verify: {report.as_json()['problems'][:5]}")
        if mounts_below(self.tmp):
            self.failures.append(f"final: mounts left under {self.tmp}: {mounts_below(self.tmp)}")


def run_campaign(tmp: Path, registry_ref: str | None, kills: int, seed: int) -> Campaign:
    campaign = Campaign(tmp, registry_ref, seed)
    campaign.measure()
    ops = [op for op in OPS if op in campaign.duration]
    for i in range(kills):
        campaign.kill_once(ops[i % len(ops)] if i < len(ops) else campaign.rng.choice(ops))
    campaign.finish()
    return campaign


@needs_root
def test_kill9_anywhere(tmp_path: Path, registry) -> None:
    if not erofs_supported():
        pytest.skip("needs erofs mounts for the erofs base")
    from registry import push_layout

    kills = int(os.environ.get("DIRGE_KILLS", "30"))
    seed = int(os.environ.get("DIRGE_KILL_SEED", "14"))
    layout = tmp_path / "layout-pull"
    make_layout(layout, "pull")
    ref = f"{registry.host}/kill/pull:1"
    push_layout(layout, "t", ref)
    loops_before = loops_below(tmp_path)
    campaign = run_campaign(tmp_path, ref, kills, seed)
    report = {"seed": seed, "kills": campaign.kills, "durations": campaign.duration, "failures": campaign.failures,
              "notes": campaign.notes}
    if os.environ.get("DIRGE_KILL_REPORT"):
        Path(os.environ["DIRGE_KILL_REPORT"]).write_text(json.dumps(report, indent=1))
    assert loops_below(tmp_path) == loops_before
    assert not campaign.failures, "\n".join(campaign.failures)


# -- regressions: what the campaign found ------------------------------------------------------------


def _kill_when(argv: list[str], env: dict[str, str], ready, timeout: float = 60.0) -> bool:
    """Start ``argv``, SIGKILL it as soon as ``ready()``; False if it exited first."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ready():
                proc.send_signal(signal.SIGKILL)
                return True
            time.sleep(0.001)
        raise AssertionError(f"{argv}: not ready within {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@needs_root
def test_killed_session_create_leaves_no_live_session(tmp_path: Path) -> None:
    """A ``session create`` killed while making the session (its record written, its copy half done)
    must not leave a session that looks alive for as long as the caller lives: the caller never got
    its id, so nothing would ever remove it (nor its mount, nor the hold on its base). Its record names
    the creating process until the session is complete; then gc (and prune) see it dead."""
    cache_dir = tmp_path / "cache"
    image = make_layout(tmp_path / "layout", "create", files=4000)
    env = {**os.environ, "DIRGE_CACHE_DIR": str(cache_dir)}
    base = [PY, "-m", "dirge.cli", "session", "create", image, "--base-format", "tree", "--json"]
    subprocess.run(base, env=env, check=True, capture_output=True)  # the base, built once
    sessions_dir = cache_dir / "sessions"
    before = {p.name for p in sessions_dir.iterdir()}

    def recorded() -> bool:
        return any((p / "session.json").exists() for p in sessions_dir.iterdir() if p.name not in before)

    for _ in range(5):
        if _kill_when(base + ["--strategy", "copy"], env, recorded):
            break
    else:
        pytest.skip("session create finished before it could be killed")
    subprocess.run([PY, "-m", "dirge.cli", "gc"], env=env, check=True, capture_output=True)
    left = sorted(p.name for p in sessions_dir.iterdir() if p.name not in before)
    assert left == [], f"the killed create's session survived gc: {left}"
    assert verify_cache(Cache(cache_dir)).ok


@needs_root
def test_killed_session_rm_leaves_nothing_after_gc(tmp_path: Path) -> None:
    """A ``session rm`` killed midway must not leave a session directory without its record (which no
    command lists, so none removes): the session is renamed into trash/ at once, and gc empties it."""
    cache_dir = tmp_path / "cache"
    image = make_layout(tmp_path / "layout", "rm", files=4000)
    env = {**os.environ, "DIRGE_CACHE_DIR": str(cache_dir)}
    cli = [PY, "-m", "dirge.cli"]
    killed = 0
    for _ in range(2):
        out = subprocess.run(cli + ["session", "create", image, "--base-format", "tree", "--strategy", "copy", "--json"],
                             env=env, check=True, capture_output=True, text=True).stdout
        sdir = cache_dir / "sessions" / json.loads(out)["id"]
        rootfs_entries = sum(1 for _ in (sdir / "rootfs").rglob("*"))

        def midway() -> bool:  # its record gone, or some of its tree
            try:
                return not (sdir / "session.json").exists() or \
                    sum(1 for _ in (sdir / "rootfs").rglob("*")) < rootfs_entries
            except OSError:
                return True

        killed += _kill_when(cli + ["session", "rm", sdir.name], env, midway)
        subprocess.run(cli + ["gc"], env=env, check=True, capture_output=True)
        assert not sdir.exists(), f"{sdir} survived a killed rm and gc: {sorted(p.name for p in sdir.iterdir())}"
    trash = cache_dir / "trash"
    assert not trash.exists() or not any(trash.iterdir())
    assert killed, "every session rm finished before it could be killed"


@needs_root
def test_killed_export_leaves_no_temp_file_beside_out(tmp_path: Path) -> None:
    """``dirge export IMAGE OUT`` writes ``.OUT.<rnd>.dirge-tmp`` beside OUT (flocked) and renames it: killed
    midway, the temp file stayed for good (it is outside the cache); the next export to OUT removes it."""
    cache_dir = tmp_path / "cache"
    image = make_layout(tmp_path / "layout", "export", files=4000)
    env = {**os.environ, "DIRGE_CACHE_DIR": str(cache_dir)}
    cli = [PY, "-m", "dirge.cli"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def writing() -> bool:
        return any(p.stat().st_size > 0 for p in out_dir.glob(".root.erofs.*"))

    if not _kill_when(cli + ["export", image, str(out_dir / "root.erofs"), "--format", "erofs"], env, writing):
        pytest.skip("export finished before it could be killed")
    subprocess.run(cli + ["export", image, str(out_dir / "root.erofs"), "--format", "erofs"], env=env, check=True,
                   capture_output=True)
    subprocess.run(cli + ["gc"], env=env, check=True, capture_output=True)
    assert sorted(p.name for p in out_dir.iterdir()) == ["root.erofs"]
