#!/usr/bin/env python3
"""Benchmark a cold `dirge.rootfs.prepare()` with an erofs base against a tree base and the reference tools.

Usage: .venv/bin/python bench/prepare.py [--runs N] [--workdir DIR] [--skip-registry] [--entries N]
                                         [--formats erofs,tree] [--json]

Root only (overlay and erofs mounts, owners, dropping caches). Three sections, each run from a fresh,
empty dirge cache (removed afterwards: session closed, mounts under it detached, tree deleted):

A. local OCI layout (the two-layer image of bench/unpack.py, ~58k entries / ~690 MB; `--entries N`
   builds a smaller one from the same sources): `prepare(ref, cache, base_format=F)` for every F of
   `--formats` (the first is the candidate), against `tar -xzf` of the layer blobs, in order, into an
   empty directory. A prepare is timed in a child process, around the call and an `os.stat` of a deep
   file inside `rootfs.path` (interpreter start-up and imports are not timed; tar's process is).
B. a loopback `docker-registry` (bench/pull.py's): `prepare("127.0.0.1:PORT/bench:latest",
   base_format=candidate)` against `curl | tar -xzf` per layer and `skopeo copy` + `umoci unpack`.
C. the candidate's peak RSS over its cold prepares of section A (the child's process tree, from
   /usr/bin/time or wait4; its own VmHWM too) and the disk use of its base against the tree base
   (erofs image file size and allocated blocks, `du -s [--apparent-size]` of each base directory).

Runs are interleaved (every contender once per round) and medians compared; before each run (untimed):
remove the last run's output, `sync`, drop kernel caches, re-read the blobs and the tools. The image
layout is cached in WORKDIR (delete it to rebuild); everything else the script makes is removed at the
end, also on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import inspect
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull import image_digests, no_proxy_for_loopback, registry, storage_files, tree_size, warm  # noqa: E402
from unpack import TAG, build_image, drop_caches, log, python_lib_dirs, run, tar_entries, verify_layout  # noqa: E402

FORMATS = ("erofs", "tree")
TARGET_A_TAR = 0.25  # candidate prepare <= 0.25 x tar -xzf
TARGET_A_TREE = 0.35  # candidate prepare <= 0.35 x prepare(base_format="tree")
TARGET_B_CURL = 0.35  # candidate prepare from the registry <= 0.35 x curl | tar
TARGET_B_UMOCI = 0.15  # ... <= 0.15 x (skopeo copy + umoci unpack)
TARGET_RSS_MIB = 150
REPO = "bench"
EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")  # erofs superblock magic, at byte 1024
LAYER1_SHARE = 0.92  # --entries: the full image is ~92% /usr/share, ~8% python libs; keep the mix
# Modules a prepare loads lazily; the child imports them first so the timed call measures the work,
# not Python's imports (a launcher that prepares sessions has them loaded already).
PRELOAD = ("dirge.rootfs", "dirge.store.cache", "dirge.flatten", "dirge.apply.tar", "dirge.apply.dirsink",
           "dirge.sources.layout", "dirge.sources.registry", "dirge.fsimage.erofs", "dirge.fsimage.mount",
           "httpx")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2
TIME = "/usr/bin/time"

# Processes we started and have not reaped yet: killed (their whole session) if we are interrupted.
_live: set[subprocess.Popen[bytes]] = set()


class BenchError(Exception):
    pass


@dataclass
class Sample:
    seconds: float  # what the ratios use
    cpu: float | None = None  # user + sys seconds of the measured work
    rss_kib: int | None = None  # peak RSS of the process tree (/usr/bin/time %M, else wait4)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Contender:
    name: str
    run: Callable[[bool], Sample]  # argument: first run (count the tree it wrote, measure disk use)
    scratch: list[Path]  # removed before and after every run


# ---------------------------------------------------------------------------------------------
# processes, mounts, scratch space


def spawn(cmd: list[str], *, capture: bool = False) -> tuple[float, float, int, bytes]:
    """(wall s, user+sys s, peak RSS KiB, stdout) of cmd, in its own session, so an interrupted run
    can kill it with everything it started (tar under sh, dirge's threads) by its id.

    The peak RSS comes from /usr/bin/time when it is installed: a child's own ru_maxrss also counts
    the memory of this (Python) process that it was forked from, ~25 MiB, which would hide tar's 3."""
    with tempfile.NamedTemporaryFile(prefix="dirge-bench-rss-") as rss_file, tempfile.TemporaryFile() as err:
        use_time = os.access(TIME, os.X_OK)
        full = [TIME, "-f", "%M", "-o", rss_file.name, *cmd] if use_time else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        _live.add(proc)
        out = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        _live.discard(proc)
        if proc.stdout:
            proc.stdout.close()
        if proc.returncode != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-6000:])
            raise BenchError(f"command failed ({proc.returncode}): {' '.join(cmd)[:300]}")
        rss = usage.ru_maxrss
        if use_time:  # the last line is %M ("Command exited with non-zero status" may precede it)
            lines = Path(rss_file.name).read_text().split()
            rss = int(lines[-1]) if lines and lines[-1].isdigit() else rss
    return elapsed, usage.ru_utime + usage.ru_stime, rss, out


def kill_live() -> None:
    for proc in list(_live):
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session we made for it: pgid == its pid
            except ProcessLookupError:
                pass
            proc.wait()
        _live.discard(proc)


def _unescape(field_: str) -> str:
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path, or whose source is (an image file, directly or through a loop
    device) below path, from /proc/self/mountinfo; deepest first."""
    base = os.path.realpath(path).rstrip("/")

    def inside(p: str) -> bool:
        return p == base or p.startswith(base + "/")

    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        point = _unescape(fields[4])
        source = _unescape(fields[fields.index("-") + 2])
        if source.startswith("/dev/loop"):  # a loop-mounted image: what file backs it?
            try:
                source = Path(f"/sys/block/{source[5:]}/loop/backing_file").read_text().strip()
            except OSError:
                pass
        if inside(point) or inside(source):
            found.add(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def detach_mounts(path: Path) -> int:
    """Lazily unmount everything at or below path (session overlays, erofs bases); returns how many.

    dirge's session close unmounts the overlay; the base mount belongs to the cache, and removing a
    whole cache is not an API operation, so it is detached here. Stacked mounts need several passes."""
    n = 0
    for _ in range(64):
        points = mounts_under(path)
        if not points:
            return n
        for p in points:
            if _libc.umount2(os.fsencode(p), _MNT_DETACH) == 0:
                n += 1
            elif ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
                raise BenchError(f"umount2({p}, MNT_DETACH): {os.strerror(ctypes.get_errno())}")
    raise BenchError(f"mounts under {path} keep coming back: {mounts_under(path)}")


class Scratch:
    """Every path the runs write (caches, destinations): emptied before and after each run, and at exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.paths: list[Path] = []

    def path(self, name: str) -> Path:
        p = self.work / name
        self.paths.append(p)
        return p

    def release(self, path: Path) -> None:
        # Never anything but a direct child of the workdir (a mount sweep or rm -rf of "/" must be impossible).
        if path.parent != self.work or path.name in ("", ".", ".."):
            raise BenchError(f"refusing to remove {path}: not a scratch path of {self.work}")
        detach_mounts(path)
        if path.exists() or path.is_symlink():
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)

    def release_all(self) -> None:
        for p in self.paths:
            try:
                self.release(p)
            except (BenchError, subprocess.CalledProcessError, OSError) as exc:
                log(f"WARNING: cleaning {p}: {exc}")


# ---------------------------------------------------------------------------------------------
# the image


def first_entries(roots: list[str], n: int) -> list[str]:
    """The first n entries (paths relative to /) of a sorted top-down walk of roots: every directory
    comes before its children, so a tar made with --no-recursion from the list is self-consistent."""
    out: list[str] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk("/" + root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, "/")
            if dirpath == "/" + root:
                out.append(rel)
            for name in sorted(dirnames + filenames):
                out.append(os.path.join(rel, name))
            if len(out) >= n:
                return out[:n]
    return out


def build_scaled_image(work: Path, entries: int) -> tuple[Path, list[Path]]:
    """WORKDIR/layout-N: the image of bench/unpack.py cut to about N entries (for smoke runs)."""
    layout = work / f"layout-{entries}"
    stamp = layout / ".bench-complete"
    if stamp.exists():
        log(f"using cached image {layout} (delete it to rebuild)")
        blobs = verify_layout(layout)
    else:
        log(f"building image {layout} (~{entries:,} entries)")
        shutil.rmtree(layout, ignore_errors=True)
        n1 = max(1, round(entries * LAYER1_SHARE))
        parts = [first_entries(["usr/share"], n1), first_entries(python_lib_dirs(), max(1, entries - n1))]
        tars = [work / f"layer{i + 1}-{entries}.tar" for i in range(2)]
        try:
            for t, members in zip(tars, parts):
                listing = t.with_suffix(".list")
                listing.write_bytes(b"".join(os.fsencode(m) + b"\0" for m in members))
                # rc 1 = "file changed as we read it": harmless for a benchmark input
                run(["tar", "-C", "/", "--numeric-owner", "--no-recursion", "--null", "-T", str(listing),
                     "-cf", str(t)], ok=(0, 1), stderr=subprocess.DEVNULL)
                listing.unlink()
            counts = [tar_entries(t) for t in tars]
            run(["umoci", "init", "--layout", str(layout)])
            run(["umoci", "new", "--image", f"{layout}:{TAG}"])
            for t in tars:
                run(["umoci", "raw", "add-layer", "--image", f"{layout}:{TAG}", str(t)])
            blobs = verify_layout(layout)
            (layout / ".bench-meta.json").write_text(json.dumps(
                {"entries": counts, "tar_bytes": [t.stat().st_size for t in tars]}))
            stamp.touch()
        finally:
            for t in tars:
                t.unlink(missing_ok=True)
                t.with_suffix(".list").unlink(missing_ok=True)
    meta = json.loads((layout / ".bench-meta.json").read_text())
    log(f"  {sum(meta['entries']):,} entries, tar {sum(meta['tar_bytes']) / 1e6:.1f} MB, "
        f"gzip {sum(b.stat().st_size for b in blobs) / 1e6:.1f} MB")
    return layout, blobs


def deep_file(layout: Path, blobs: list[Path]) -> str:
    """The deepest regular file of the last layer (so no later layer can remove it): the file a run
    stats to show that the rootfs is usable. Cached beside the layout."""
    cache = layout / ".bench-deep-file"
    if cache.exists():
        return cache.read_text()
    best = ""
    with tarfile.open(blobs[-1], "r|gz") as tf:
        for member in tf:
            name = member.name[2:] if member.name.startswith("./") else member.name
            if member.isreg() and "/.wh." not in "/" + name and name.count("/") > best.count("/"):
                best = name
    if not best:
        raise BenchError(f"{blobs[-1]}: no regular file in the last layer")
    cache.write_text(best)
    return best


def image_summary(layout: Path, blobs: list[Path]) -> dict[str, Any]:
    meta = json.loads((layout / ".bench-meta.json").read_text())
    return {"layout": str(layout), "entries": sum(meta["entries"]), "tar_bytes": sum(meta["tar_bytes"]),
            "gzip_bytes": sum(b.stat().st_size for b in blobs), "layers": len(blobs)}


# ---------------------------------------------------------------------------------------------
# the prepare child


def prepare_accepts_base_format() -> bool:
    from dirge.rootfs import prepare

    return "base_format" in inspect.signature(prepare).parameters


def child_main(spec_json: str) -> None:
    """Run one cold prepare (in this fresh process) and print what it measured as JSON on stdout."""
    import importlib

    spec = json.loads(spec_json)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # absent or broken: prepare will say so if it needs it
            pass
    from dirge.rootfs import prepare

    kwargs: dict[str, Any] = {}
    if prepare_accepts_base_format():
        kwargs["base_format"] = spec["format"]
    elif spec["format"] != "tree":  # before base_format existed every base was a tree
        raise SystemExit(f"dirge.rootfs.prepare() has no base_format parameter yet; "
                         f"cannot prepare a {spec['format']} base")
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rootfs = prepare(spec["ref"], spec["cache"], **kwargs)
    try:
        os.stat(rootfs.path / spec["deep"])  # usable: a deep file resolves through the session
        seconds = time.perf_counter() - t0
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        status = Path("/proc/self/status").read_text()
        hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
        result: dict[str, Any] = {
            "seconds": seconds,
            "cpu": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                    + c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime),
            "vmhwm_kib": hwm, "strategy": rootfs.strategy, "base_created": rootfs.base_created,
            "base_format": kwargs.get("base_format", "tree (implicit)"),
        }
        if spec["count"]:  # untimed sanity check: the session shows the whole image
            result["entries"], result["bytes"] = tree_size(rootfs.path)
    finally:
        rootfs.close()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# disk use


def find_erofs_images(root: Path, max_depth: int = 4) -> list[Path]:
    """Regular files carrying the erofs magic within max_depth levels of root, not crossing mounts
    (so neither the mounted base nor a session overlay is walked)."""
    found: list[Path] = []
    dev = root.stat().st_dev

    def walk(d: Path, depth: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if st.st_dev != dev:
                continue
            if e.is_dir(follow_symlinks=False):
                if depth < max_depth:
                    walk(Path(e.path), depth + 1)
            elif e.is_file(follow_symlinks=False) and st.st_size >= 1028:
                with open(e.path, "rb") as f:
                    f.seek(1024)
                    if f.read(4) == EROFS_MAGIC:
                        found.append(Path(e.path))

    walk(root, 1)
    return found


def du(path: Path, apparent: bool) -> int:
    cmd = ["du", "-s", "-x", "-B1", *(["--apparent-size"] if apparent else []), str(path)]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[0])


def disk_use(cache: Path) -> dict[str, Any]:
    """Bases in the cache: du of each base directory (not crossing into a mounted base) and any erofs
    image files (size and allocated bytes)."""
    bases = sorted(p for p in (cache / "bases").iterdir() if p.is_dir()) if (cache / "bases").is_dir() else []
    out: dict[str, Any] = {
        "bases": [{"key": b.name, "du_apparent": du(b, True), "du_allocated": du(b, False)} for b in bases],
        "erofs_images": [],
    }
    for img in find_erofs_images(cache):
        st = img.stat()
        out["erofs_images"].append({"path": str(img.relative_to(cache)), "size": st.st_size,
                                    "allocated": st.st_blocks * 512})
    return out


# ---------------------------------------------------------------------------------------------
# runs


def prepare_contender(name: str, ref: str, fmt: str, cache: Path, deep: str,
                      disks: dict[str, Any] | None) -> Contender:
    """A cold prepare in a child process; on the first run the disk use of its base goes into disks."""
    def fn(first: bool) -> Sample:
        spec = {"ref": ref, "cache": str(cache), "format": fmt, "deep": deep, "count": first}
        wall, _cpu, rss, out = spawn([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                     capture=True)
        res = json.loads(out.decode().strip().splitlines()[-1])
        if first and disks is not None:
            disks[name] = disk_use(cache)
        info = {k: res[k] for k in ("strategy", "base_format", "base_created", "entries", "bytes", "vmhwm_kib")
                if k in res}
        info["process_wall"] = wall
        return Sample(res["seconds"], res["cpu"], rss, info)
    return Contender(name, fn, [cache])


def command_contender(name: str, cmds: Callable[[], list[list[str]]], scratch: list[Path],
                      tree: Path | None) -> Contender:
    """One or more commands run one after the other; their times add up, their peak RSS is the max."""
    def fn(first: bool) -> Sample:
        secs = cpu = 0.0
        rss = 0
        for cmd in cmds():
            w, c, r, _ = spawn(cmd)
            secs, cpu, rss = secs + w, cpu + c, max(rss, r)
        info: dict[str, Any] = {}
        if first and tree is not None:
            info["entries"], info["bytes"] = tree_size(tree)
        return Sample(secs, cpu, rss, info)
    return Contender(name, fn, scratch)


def interleave(section: str, contenders: list[Contender], runs: int, scratch: Scratch, files: list[Path],
               tools: list[list[str]]) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {c.name: [] for c in contenders}
    width = max(len(c.name) for c in contenders)
    for i in range(runs):
        for c in contenders:
            for p in c.scratch:
                scratch.release(p)
            subprocess.run(["sync"], check=True)  # no dirty pages of the last run pending
            drop_caches()
            warm(files, tools)
            s = c.run(i == 0)
            samples[c.name].append(s)
            extra = ""
            if "entries" in s.info:
                extra = f"  [{s.info['entries']:,} entries, {s.info['bytes'] / 1e6:.0f} MB]"
            if "strategy" in s.info:
                extra += f"  ({s.info['base_format']} base, {s.info['strategy']} session)"
            log(f"  {section} run {i + 1}/{runs}  {c.name:<{width}} {s.seconds:8.3f} s  cpu {s.cpu or 0:6.2f} s  "
                f"peak RSS {(s.rss_kib or 0) / 1024:6.1f} MiB{extra}")
            for p in c.scratch:
                scratch.release(p)
    return samples


def verdict(ratio: float, target: float) -> str:
    return "HOLDS" if ratio <= target else "DOES NOT HOLD"


def summarize(section: str, samples: dict[str, list[Sample]],
              ratios: list[tuple[str, str, str, float]]) -> dict[str, Any]:
    """Print the medians and each (label, numerator, denominator, target) ratio with its per-run values."""
    med = {k: statistics.median(s.seconds for s in v) for k, v in samples.items()}
    width = max(len(k) for k in samples)
    log(f"\n{section}: median of {len(next(iter(samples.values())))} runs")
    log(f"  {'contender':<{width}} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s (med)':>12} {'peak RSS MiB':>13}")
    for k, v in samples.items():
        secs = [s.seconds for s in v]
        log(f"  {k:<{width}} {med[k]:9.3f} {min(secs):8.3f} {max(secs):8.3f} "
            f"{statistics.median(s.cpu or 0 for s in v):12.2f} {max(s.rss_kib or 0 for s in v) / 1024:13.1f}")
    out_ratios = {}
    lw = max((len(r[0]) for r in ratios), default=0)
    for label, num, den, target in ratios:
        r = med[num] / med[den]
        per_run = [a.seconds / b.seconds for a, b in zip(samples[num], samples[den])]
        log(f"  {label:<{lw}} = {r:.3f}  target <= {target}: {verdict(r, target)}   "
            f"per run: {', '.join(f'{x:.3f}' for x in per_run)}")
        out_ratios[label] = {"numerator": num, "denominator": den, "median_ratio": r, "target": target,
                             "holds": r <= target, "per_run": per_run}
    return {"medians": med, "runs": {k: [asdict(s) for s in v] for k, v in samples.items()}, "ratios": out_ratios}


def labels(formats: list[str]) -> list[str]:
    out: list[str] = []
    for fmt in formats:
        name = f"prepare {fmt}"
        n = sum(1 for o in out if o.split(" #")[0] == name)
        out.append(name if n == 0 else f"{name} #{n + 1}")
    return out


def section_a(work: Path, scratch: Scratch, layout: Path, blobs: list[Path], deep: str, formats: list[str],
              runs: int, disks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Sample]]]:
    ref = f"oci:{layout}:{TAG}"
    names = labels(formats)
    contenders = [prepare_contender(n, ref, f, scratch.path(f"a-cache-{i}"), deep, disks)
                  for i, (n, f) in enumerate(zip(names, formats))]
    dest = scratch.path("a-tar")
    tar_script = ('mkdir -p "$1" && d=$1 && shift && '
                  'for b in "$@"; do tar --numeric-owner -xzf "$b" -C "$d" || exit; done')
    tar_cmd = ["sh", "-c", tar_script, "sh", str(dest), *map(str, blobs)]
    contenders.append(command_contender("tar -xzf", lambda: [tar_cmd], [dest], dest))
    tools = [[sys.executable, "-c", "import dirge.rootfs"], ["tar", "--version"], ["sh", "-c", "true"]]
    log(f"\nA. {ref}: cold prepare vs tar -xzf of {len(blobs)} layers; stat of /{deep} ends a prepare")
    samples = interleave("A", contenders, runs, scratch, blobs, tools)
    cand = names[0]
    ratios = [(f"{cand} / tar -xzf", cand, "tar -xzf", TARGET_A_TAR)]
    for n, f in zip(names[1:], formats[1:]):
        if f == "tree":
            ratios.append((f"{cand} / {n}", cand, n, TARGET_A_TREE))
    return summarize("A (local OCI layout)", samples, ratios), samples


def section_b(work: Path, scratch: Scratch, layout: Path, deep: str, fmt: str, runs: int) -> dict[str, Any]:
    try:
        with registry(work) as (port, storage):
            dest = f"docker://127.0.0.1:{port}/{REPO}:latest"
            log(f"\nB. skopeo copy --preserve-digests oci:{layout}:{TAG} {dest}")
            run(["skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", dest])
            ref = f"127.0.0.1:{port}/{REPO}:latest"
            digests, layers = image_digests(layout, TAG)
            files = storage_files(storage, REPO, digests)
            cand = labels([fmt])[0]
            tmplayout, bundle, curl_dest = scratch.path("b-oci"), scratch.path("b-bundle"), scratch.path("b-curl")
            blob_url = f"http://127.0.0.1:{port}/v2/{REPO}/blobs/"
            curl_script = ('set -eo pipefail; mkdir -p "$1"; dest=$1; base=$2; shift 2; for d in "$@"; do '
                           'curl -sS --fail "$base$d" | tar --numeric-owner -xzf - -C "$dest"; done')
            contenders = [
                prepare_contender(cand, ref, fmt, scratch.path("b-cache"), deep, None),
                command_contender("curl | tar -xzf", lambda: [["bash", "-c", curl_script, "bash", str(curl_dest),
                                                               blob_url, *layers]], [curl_dest], curl_dest),
                command_contender("skopeo copy + umoci unpack", lambda: [
                    ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmplayout}:x"],
                    ["umoci", "unpack", "--image", f"{tmplayout}:x", str(bundle)]],
                    [tmplayout, bundle], bundle / "rootfs"),
            ]
            tools = [[sys.executable, "-c", "import dirge.rootfs, httpx"], ["curl", "--version"], ["tar", "--version"],
                     ["skopeo", "--version"], ["umoci", "--version"], ["bash", "-c", "true"]]
            samples = interleave("B", contenders, runs, scratch, files, tools)
            return summarize(f"B (registry 127.0.0.1:{port})", samples, [
                (f"{cand} / (curl | tar)", cand, "curl | tar -xzf", TARGET_B_CURL),
                (f"{cand} / (skopeo + umoci)", cand, "skopeo copy + umoci unpack", TARGET_B_UMOCI)])
    finally:
        # The registry is stopped by now; its storage holds a copy of the image.
        reg = work / "registry"
        if reg.exists():
            shutil.rmtree(reg, ignore_errors=True)


def section_c(cand: str, samples: dict[str, list[Sample]], disks: dict[str, Any]) -> dict[str, Any]:
    runs = samples[cand]
    peak = max(s.rss_kib or 0 for s in runs)
    hwm = max(s.info.get("vmhwm_kib") or 0 for s in runs)
    log(f"\nC. {cand}, cold, local layout: peak RSS {peak / 1024:.1f} MiB "
        f"(the child process tree, max of {len(runs)} runs; VmHWM {hwm / 1024:.1f} MiB)  "
        f"target <= {TARGET_RSS_MIB} MiB: {verdict(peak / 1024, TARGET_RSS_MIB)}")
    for name, d in disks.items():
        for b in d["bases"]:
            log(f"  {name:<16} base dir (du -x): apparent {b['du_apparent'] / 1e6:9.1f} MB, "
                f"allocated {b['du_allocated'] / 1e6:9.1f} MB")
        for img in d["erofs_images"]:
            log(f"  {name:<16} erofs image .../{Path(img['path']).name}: size {img['size'] / 1e6:9.1f} MB, "
                f"allocated {img['allocated'] / 1e6:9.1f} MB")
    out: dict[str, Any] = {"peak_rss_kib": peak, "vmhwm_kib": hwm, "target_mib": TARGET_RSS_MIB,
                           "holds": peak / 1024 <= TARGET_RSS_MIB, "disk": disks}
    cand_disk = disks.get(cand)
    tree_disk = next((d for n, d in disks.items() if n.startswith("prepare tree") and n != cand), None)
    if cand_disk and cand_disk["erofs_images"] and tree_disk and tree_disk["bases"]:
        img, tb = cand_disk["erofs_images"][0], tree_disk["bases"][0]
        out["erofs_vs_tree"] = {"size_over_apparent": img["size"] / tb["du_apparent"],
                                "allocated_over_allocated": img["allocated"] / tb["du_allocated"]}
        log(f"  erofs image / tree base: size / apparent {out['erofs_vs_tree']['size_over_apparent']:.3f}, "
            f"allocated / allocated {out['erofs_vs_tree']['allocated_over_allocated']:.3f}")
    elif cand_disk and not cand_disk["erofs_images"]:
        log(f"  (no erofs image found in {cand}'s cache)")
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench-prepare"))
    ap.add_argument("--skip-registry", action="store_true", help="skip section B")
    ap.add_argument("--entries", type=int, default=None,
                    help="build a smaller image of about N entries (smoke runs); default: the full ~58k image")
    ap.add_argument("--formats", default="erofs,tree",
                    help="base formats to prepare, comma-separated; the first is the candidate (default erofs,tree)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the log goes to stderr)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one prepare in a fresh process
    args = ap.parse_args()
    if args.child is not None:
        child_main(args.child)
        return
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        ap.error(f"--formats: a comma-separated list of {', '.join(FORMATS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.entries is not None and args.entries < 10:
        ap.error("--entries must be >= 10")
    if os.geteuid() != 0:
        raise SystemExit("run as root (overlay and erofs mounts, owners, dropping caches)")
    needed = ["tar", "gzip", "umoci", "du"]
    if not args.skip_registry:
        needed += ["skopeo", "curl", "bash", "docker-registry"]
    missing = [t for t in needed if not shutil.which(t)]
    if missing:
        raise SystemExit(f"not found: {', '.join(missing)}")
    if any(f != "tree" for f in formats) and not prepare_accepts_base_format():
        raise SystemExit("dirge.rootfs.prepare() has no base_format parameter yet; "
                         "smoke-test with --formats tree,tree")

    json_out = None
    if args.json:  # keep stdout for the JSON: everything else (ours and the tools') goes to stderr
        json_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the cleanup below always runs.
    def on_signal(signum: int, _frame: object) -> None:
        log(f"signal {signum}; cleaning up")
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    no_proxy_for_loopback()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = Scratch(work)
    results: dict[str, Any] = {"formats": formats, "runs": args.runs}
    t0 = time.perf_counter()
    try:
        for leftover in sorted(work.glob("[ab]-*")):  # from a run killed with SIGKILL
            scratch.paths.append(leftover)
        scratch.release_all()
        scratch.paths.clear()
        layout, blobs = build_scaled_image(work, args.entries) if args.entries else build_image(work)
        deep = deep_file(layout, blobs)
        results["image"] = {**image_summary(layout, blobs), "deep_file": deep}
        disks: dict[str, Any] = {}
        results["A"], a_samples = section_a(work, scratch, layout, blobs, deep, formats, args.runs, disks)
        if not args.skip_registry:
            results["B"] = section_b(work, scratch, layout, deep, formats[0], args.runs)
        results["C"] = section_c(labels(formats)[0], a_samples, disks)
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        raise SystemExit(130) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        kill_live()
        scratch.release_all()
    log(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if json_out is not None:
        json.dump(results, json_out, indent=1)
        json_out.write("\n")
        json_out.close()


if __name__ == "__main__":
    main()
