#!/usr/bin/env python3
"""How close dirge is to the limit (issue 19): the stream floor, dirge's outputs and the reference tools,
measured in one interleaved run on the two-layer gzip image of bench/unpack.py. Root only.

Usage: PYTHONPATH=src .venv/bin/python bench/limit.py [--runs N] [--only NAME,...] [--json FILE]
                                                      [--workdir DIR]

Contenders (names for --only), each a separate process timed from outside (wall, user+sys CPU of the
process tree, peak RSS from /usr/bin/time):

  floor          read both blobs, ISA-L gunzip, SHA-256 of each blob and of each decompressed stream,
                 two threads, nothing written (bench/floor.py)
  export-erofs   dirge export IMG OUT --format erofs, fresh cache
  prepare-erofs  dirge session create IMG --base-format erofs on an empty cache (exits once the session
                 exists)
  prepare-tree   the same with --base-format tree
  unpack         dirge unpack IMG DIR
  tar            tar --numeric-owner -xzf of each blob, in order, into one directory
  export-ext4    dirge export IMG OUT --format ext4, fresh cache
  mkfs-erofs     mkfs.erofs 1.9.3 (built once from /work/shared/anchors) --tar=f --aufs --ovlfs-strip=1
                 --sort=none --ungzip on layer 1, then the same plus --incremental=data on layer 2

dirge runs from the checkout this script is in (`python -m dirge.cli` with PYTHONPATH=<repo>/src), so the
script measures whatever branch it is run on. Before each run, untimed: the last run's output removed
(mounts detached, cache deleted), `sync`, kernel caches dropped, the blobs and the tools re-read.
Rounds are interleaved (every contender once per round). The erofs and ext4 exports are hashed after
each run (untimed) to show that every run wrote the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SRC = REPO / "src"
sys.path.insert(0, str(BENCH))

# Targets of issue 19 ("Must show"), with the values it measured before the work ("today").
# (label, numerator, denominator, target, today)
RATIOS: list[tuple[str, str, str, float, float | None]] = [
    ("cold erofs prepare / floor", "prepare-erofs", "floor", 1.4, 2.43),
    ("export erofs / mkfs.erofs", "export-erofs", "mkfs-erofs", 0.6, 0.70),
    ("unpack / tar -xzf", "unpack", "tar", 0.70, 0.92),
    ("tree prepare / tar -xzf", "prepare-tree", "tar", 0.75, None),
    ("export ext4 / export erofs", "export-ext4", "export-erofs", 1.3, 1.54),
]
RSS_TARGET_MIB = 150
DIRGE_CONTENDERS = ("export-erofs", "prepare-erofs", "prepare-tree", "unpack", "export-ext4")
ORDER = ("floor", "export-erofs", "prepare-erofs", "prepare-tree", "unpack", "tar", "export-ext4", "mkfs-erofs")
EROFS_VERSION = "1.9.3"
ANCHORS = Path("/work/shared/anchors")
EROFS_APT = "autoconf automake libtool pkg-config uuid-dev liblz4-dev libzstd-dev zlib1g-dev"
FLOOR = BENCH / "floor.py"


# ---------------------------------------------------------------------------------------------
# runs

from prepare import BenchError, detach_mounts, kill_live, spawn  # noqa: E402
from pull import tree_size, warm  # noqa: E402
from unpack import TAG, build_image, drop_caches, log  # noqa: E402


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_kib: int
    info: dict[str, Any]


@dataclass
class Contender:
    name: str
    run: Callable[[Path, int], Sample]  # (its scratch dir, run index) -> sample; may check its output


def image_digests(layout: Path) -> tuple[list[Path], list[str], list[str]]:
    """(layer blob paths, blob digests, diff IDs) of layout:TAG, for checking the floor's output."""
    def blob(digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return layout / "blobs" / algo / hexd

    index = json.loads((layout / "index.json").read_text())
    desc = next(d for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG)
    manifest = json.loads(blob(desc["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    digests = [d["digest"] for d in manifest["layers"]]
    return [blob(d) for d in digests], digests, config["rootfs"]["diff_ids"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(cmd: list[str], capture: bool = False) -> tuple[Sample, bytes]:
    wall, cpu, rss, out = spawn(cmd, capture=capture)
    return Sample(wall, cpu, rss, {}), out


def build_mkfs_erofs(work: Path) -> str | None:
    """mkfs.erofs 1.9.3 built once into WORKDIR/erofs-utils with the anchors' script; None (and why) if
    that fails."""
    dest = work / "erofs-utils"
    exe = dest / "mkfs" / "mkfs.erofs"
    script = ANCHORS / "build-erofs-utils.sh"
    if not exe.exists():
        if not script.exists():
            log(f"SKIP mkfs-erofs: {script} not found")
            return None
        log(f"building mkfs.erofs {EROFS_VERSION} into {dest} (once)")
        proc = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True)
        if proc.returncode != 0 or not exe.exists():
            log(f"SKIP mkfs-erofs: the build failed (exit {proc.returncode}); it needs "
                f"`apt-get install {EROFS_APT}`\n{proc.stderr[-2000:]}")
            return None
    version = subprocess.run([str(exe), "-V"], capture_output=True, text=True).stdout.strip()
    if EROFS_VERSION not in version:
        log(f"SKIP mkfs-erofs: {exe} says {version!r}, not {EROFS_VERSION}")
        return None
    return str(exe)


def release(scratch: Path, path: Path) -> None:
    """Remove one contender's scratch dir: detach mounts under it (session overlays, erofs bases), rm -rf."""
    if path.parent != scratch or path.name in ("", ".", ".."):  # never anything but our own scratch dirs
        raise BenchError(f"refusing to remove {path}: not in {scratch}")
    detach_mounts(path)
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def contenders(layout: Path, blobs: list[Path], mkfs: str | None,
               checks: dict[str, list[Any]]) -> dict[str, Contender]:
    ref = f"oci:{layout}:{TAG}"
    py = sys.executable
    dirge = [py, "-m", "dirge.cli", "--quiet"]
    _, blob_digests, diff_ids = image_digests(layout)

    def floor(d: Path, i: int) -> Sample:
        s, out = timed([py, str(FLOOR), *map(str, blobs)], capture=True)
        res = json.loads(out.decode().strip().splitlines()[-1])
        got = res["digests"]
        if [c for c, _ in got] != blob_digests or [u for _, u in got] != diff_ids:
            raise BenchError(f"floor: digests {got} do not match the image's {blob_digests} / {diff_ids}")
        s.info = {"inner_seconds": res["seconds"], "bytes": res["bytes"]}
        return s

    def export(fmt: str) -> Callable[[Path, int], Sample]:
        def fn(d: Path, i: int) -> Sample:
            out = d / f"out.{fmt}"
            s, _ = timed([*dirge, "export", ref, str(out), "--format", fmt, "--cache-dir", str(d / "cache")])
            digest = sha256_file(out)  # untimed: every run must write the same bytes
            checks[f"export-{fmt}"].append(digest)
            s.info = {"sha256": digest, "size": out.stat().st_size}
            if fmt == "ext4" and i == 0:
                fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
                s.info["e2fsck_exit"] = fsck.returncode
            return s
        return fn

    def prepare(fmt: str) -> Callable[[Path, int], Sample]:
        def fn(d: Path, i: int) -> Sample:
            cache = d / "cache"
            s, out = timed([*dirge, "session", "create", ref, "--cache-dir", str(cache), "--base-format", fmt],
                           capture=True)
            path = Path(out.decode().strip().splitlines()[-1])
            if not (path / "usr" / "share").is_dir():  # untimed: the session shows the image
                raise BenchError(f"prepare-{fmt}: {path}/usr/share missing")
            if i == 0:
                s.info["entries"], s.info["bytes"] = tree_size(path)
            # Close the session the supported way; the base mount belongs to the cache (release detaches it).
            subprocess.run([*dirge, "session", "rm", "--all", "--cache-dir", str(cache)], check=False,
                           stdout=subprocess.DEVNULL)
            return s
        return fn

    def unpack(d: Path, i: int) -> Sample:
        dest = d / "tree"
        s, _ = timed([*dirge, "unpack", ref, str(dest), "--cache-dir", str(d / "cache")])
        if i == 0:
            s.info["entries"], s.info["bytes"] = tree_size(dest)
        return s

    def tar(d: Path, i: int) -> Sample:
        dest = d / "tree"
        script = ('mkdir -p "$1" && d=$1 && shift && '
                  'for b in "$@"; do tar --numeric-owner -xzf "$b" -C "$d" || exit; done')
        s, _ = timed(["sh", "-c", script, "sh", str(dest), *map(str, blobs)])
        if i == 0:
            s.info["entries"], s.info["bytes"] = tree_size(dest)
        return s

    def mkfs_erofs(d: Path, i: int) -> Sample:
        out = d / "out.erofs"
        flags = "--quiet --tar=f --aufs --ovlfs-strip=1 --sort=none --ungzip"
        # One process tree: layer 1 makes the image, layer 2 is added to it incrementally (its data appended).
        script = f'set -e; m=$1; o=$2; shift 2; "$m" {flags} "$o" "$1"; "$m" {flags} --incremental=data "$o" "$2"'
        s, _ = timed(["sh", "-c", script, "sh", mkfs or "mkfs.erofs", str(out), *map(str, blobs)])
        s.info = {"size": out.stat().st_size}
        return s

    all_ = {"floor": floor, "export-erofs": export("erofs"), "prepare-erofs": prepare("erofs"),
            "prepare-tree": prepare("tree"), "unpack": unpack, "tar": tar, "export-ext4": export("ext4"),
            "mkfs-erofs": mkfs_erofs}
    return {name: Contender(name, fn) for name, fn in all_.items()}


def interleave(chosen: list[Contender], runs: int, scratch: Path, blobs: list[Path],
               tools: list[list[str]]) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {c.name: [] for c in chosen}
    width = max(len(c.name) for c in chosen)
    for i in range(runs):
        for c in chosen:
            d = scratch / c.name
            release(scratch, d)
            d.mkdir(mode=0o700)
            subprocess.run(["sync"], check=True)  # no dirty pages of the last run pending
            drop_caches()
            warm(blobs, tools)
            load = os.getloadavg()[0]  # other work on the machine makes the numbers noisy: say so
            s = c.run(d, i)
            s.info["load1"] = round(load, 2)
            samples[c.name].append(s)
            extra = "".join(f"  {k}={v}" for k, v in s.info.items() if k in ("entries", "e2fsck_exit"))
            if "sha256" in s.info:
                extra += f"  sha256={s.info['sha256'][:16]}"
            if "inner_seconds" in s.info:
                extra += f"  (in-process {s.info['inner_seconds']:.3f} s)"
            log(f"  run {i + 1}/{runs}  {c.name:<{width}} {s.wall:8.3f} s  cpu {s.cpu:6.2f} s  "
                f"peak RSS {s.rss_kib / 1024:6.1f} MiB  load {load:4.1f}{extra}")
            release(scratch, d)
    return samples


def report(samples: dict[str, list[Sample]], checks: dict[str, list[str]]) -> dict[str, Any]:
    med = {k: statistics.median(s.wall for s in v) for k, v in samples.items()}
    runs = len(next(iter(samples.values())))
    width = max(len(k) for k in samples)
    log(f"\nmedian of {runs} run(s); wall and CPU (user+sys of the process tree) in seconds")
    log(f"  {'contender':<{width}} {'median':>8} {'min':>8} {'max':>8} {'cpu med':>8} {'cpu min':>8} "
        f"{'cpu max':>8} {'peak RSS MiB':>13}")
    table: dict[str, Any] = {}
    for k, v in samples.items():
        walls, cpus = [s.wall for s in v], [s.cpu for s in v]
        peak = max(s.rss_kib for s in v) / 1024
        log(f"  {k:<{width}} {med[k]:8.3f} {min(walls):8.3f} {max(walls):8.3f} {statistics.median(cpus):8.2f} "
            f"{min(cpus):8.2f} {max(cpus):8.2f} {peak:13.1f}")
        table[k] = {"wall_median": med[k], "wall_min": min(walls), "wall_max": max(walls),
                    "cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
                    "peak_rss_mib": peak}

    log("\nratios of medians (issue 19)")
    ratios: dict[str, Any] = {}
    lw = max(len(r[0]) for r in RATIOS)
    for label, num, den, target, today in RATIOS:
        if num not in med or den not in med:
            log(f"  {label:<{lw}}   (not measured: {num if num not in med else den} skipped)")
            continue
        r = med[num] / med[den]
        per_run = [a.wall / b.wall for a, b in zip(samples[num], samples[den])]
        # CPU time moves less than wall time when other work shares the machine: shown, not judged.
        cpu_r = statistics.median(s.cpu for s in samples[num]) / statistics.median(s.cpu for s in samples[den])
        was = f"  (issue: {today:.2f})" if today is not None else ""
        log(f"  {label:<{lw}} {r:6.3f}  target <= {target:<4} {'PASS' if r <= target else 'MISS'}{was}   "
            f"per run: {', '.join(f'{x:.3f}' for x in per_run)}   cpu ratio {cpu_r:.3f}")
        ratios[label] = {"numerator": num, "denominator": den, "ratio": r, "target": target,
                         "pass": r <= target, "issue_before": today, "per_run": per_run, "cpu_ratio": cpu_r}

    rss: dict[str, Any] = {}
    for k in DIRGE_CONTENDERS:
        if k in samples:
            peak = max(s.rss_kib for s in samples[k]) / 1024
            rss[k] = {"peak_mib": peak, "pass": peak <= RSS_TARGET_MIB}
    if rss:
        log(f"  peak RSS of each dirge run <= {RSS_TARGET_MIB} MiB: "
            + ", ".join(f"{k} {v['peak_mib']:.0f} {'PASS' if v['pass'] else 'MISS'}" for k, v in rss.items()))

    same: dict[str, Any] = {}
    for k, digests in checks.items():
        if digests:
            ok = len(set(digests)) == 1
            same[k] = {"identical": ok, "sha256": digests}
            log(f"  {k} output identical across {len(digests)} run(s): {'yes' if ok else 'NO'} "
                f"({', '.join(sorted({d[:16] for d in digests}))})")
    return {"table": table, "ratios": ratios, "rss": rss, "identical": same}


def startup_costs(tools: list[list[str]]) -> dict[str, float]:
    """Interpreter start-up plus imports, which every timed process pays (dirge's CLI more than the floor):
    the median of 3 warm runs of each, for reading the ratios."""
    warm([], tools)
    cmds = {"dirge --help": [sys.executable, "-m", "dirge.cli", "--help"],
            "floor imports": [sys.executable, "-c", "import hashlib, json, queue, threading, isal.igzip_lib"]}
    out = {}
    for name, cmd in cmds.items():
        walls = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)
        out[name] = statistics.median(walls)
    log("start-up inside each timed wall (warm): " + ", ".join(f"{k} {v:.3f} s" for k, v in out.items()))
    return out


def git_head() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + (" (dirty)" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help=f"comma-separated contenders (of {', '.join(ORDER)})")
    ap.add_argument("--json", type=Path, help="save the samples, the table and the ratios to this file")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"),
                    help="the image (WORKDIR/layout), mkfs.erofs (WORKDIR/erofs-utils) and scratch space")
    args = ap.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()] or list(ORDER)
    unknown = [n for n in only if n not in ORDER]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(ORDER)})")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, owners, dropping caches)")

    # Children run dirge from this checkout: `python -m dirge.cli` finds src/ first on PYTHONPATH.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    where = subprocess.run([sys.executable, "-c", "import dirge; print(dirge.__file__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(SRC.resolve()):
        raise SystemExit(f"dirge is imported from {where}, not from {SRC}")

    def on_signal(signum: int, _frame: object) -> None:  # unwind like Ctrl-C, so the cleanup runs
        log(f"signal {signum}; cleaning up")
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scratch = work / "limit-scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    t0 = time.perf_counter()
    checks: dict[str, list[str]] = {"export-erofs": [], "export-ext4": []}
    try:
        for leftover in sorted(scratch.iterdir()):  # from a run killed with SIGKILL
            release(scratch, leftover)
        layout, _ = build_image(work)
        blobs, _, _ = image_digests(layout)
        mkfs = build_mkfs_erofs(work) if "mkfs-erofs" in only else None
        if "mkfs-erofs" in only and mkfs is None:
            only.remove("mkfs-erofs")
        if not only:
            raise SystemExit("nothing to run")
        log(f"dirge from {where} (git {git_head()}); python {platform.python_version()}; "
            f"kernel {platform.release()}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
        if shutil.which("e2fsck") is None:
            log("note: e2fsck not found; ext4 exports are not checked")
        everything = contenders(layout, blobs, mkfs, checks)
        chosen = [everything[n] for n in ORDER if n in only]
        tools = [[sys.executable, "-c", "import pkgutil, importlib, dirge, dirge.cli\n"
                  "for m in pkgutil.walk_packages(dirge.__path__, 'dirge.'):\n"
                  "    try: importlib.import_module(m.name)\n    except Exception: pass"],
                 [sys.executable, "-c", "import hashlib, queue, threading, isal.igzip_lib"],
                 ["tar", "--version"], ["sh", "-c", "true"], ["/usr/bin/time", "true"]]
        if mkfs:
            tools.append([mkfs, "-V"])
        log(f"\nbefore each run (untimed): remove the last output, sync, drop caches, re-read "
            f"{sum(b.stat().st_size for b in blobs) / 1e6:.0f} MB of blobs and the tools")
        startup = startup_costs(tools)
        samples = interleave(chosen, args.runs, scratch, blobs, tools)
        results = {**report(samples, checks), "startup_seconds": startup}
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        raise SystemExit(130) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut cleanup short
            signal.signal(sig, signal.SIG_IGN)
        kill_live()
        for leftover in sorted(scratch.iterdir()):
            try:
                release(scratch, leftover)
            except (BenchError, subprocess.CalledProcessError, OSError) as exc:
                log(f"WARNING: cleaning {leftover}: {exc}")
    total = time.perf_counter() - t0
    log(f"\ntotal {total:.0f} s")
    if args.json:
        meta = json.loads((layout / ".bench-meta.json").read_text())
        doc = {"command": " ".join(sys.argv), "git": git_head(), "dirge": where, "runs": args.runs,
               "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "image": {"layout": str(layout), "entries": sum(meta["entries"]), "tar_bytes": sum(meta["tar_bytes"]),
                         "gzip_bytes": sum(b.stat().st_size for b in blobs)},
               "samples": {k: [asdict(s) for s in v] for k, v in samples.items()}, **results,
               "total_seconds": total}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"saved {args.json}")


if __name__ == "__main__":
    main()
