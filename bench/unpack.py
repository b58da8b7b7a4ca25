#!/usr/bin/env python3
"""Benchmark `dirge unpack` against `tar -xzf` and `umoci raw unpack` on a large two-layer image.

Usage: .venv/bin/python bench/unpack.py [--workdir DIR] [--runs N] [--keep] [--profile]

The image (layer 1 = /usr/share, layer 2 = the host's python lib trees) is built offline with
umoci into WORKDIR/layout and cached there; delete WORKDIR/layout to rebuild it.  Run as root
so every tool writes owners (tar with --numeric-owner).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TAG = "bench"
GZIP_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
TARGET = 0.8  # dirge must take <= TARGET x tar -xzf
TIME_V = "/usr/bin/time"


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd: list[str], ok: tuple[int, ...] = (0,), **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, **kw)
    if proc.returncode not in ok:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc


def dirge_exe() -> str:
    exe = Path(sys.executable).with_name("dirge")
    return str(exe) if exe.exists() else (shutil.which("dirge") or sys.exit("dirge executable not found"))


# ---------------------------------------------------------------------------------------------
# image build


def python_lib_dirs() -> list[str]:
    """Relative paths (to /) of the host's python stdlib/site-packages trees."""
    dirs = sorted(p for p in glob.glob("/usr/lib/python3*") if os.path.isdir(p) and not os.path.islink(p))
    if not dirs:
        dirs = [os.path.dirname(os.__file__)]
    return [os.path.relpath(d, "/") for d in dirs]


def make_tar(out: Path, members: list[str]) -> None:
    log(f"  tar -C / --numeric-owner -cf {out.name} {' '.join(members)}")
    # rc 1 = "some files differ/changed while reading" (harmless for a benchmark input).
    run(["tar", "-C", "/", "--numeric-owner", "-cf", str(out), *members], ok=(0, 1),
        stderr=subprocess.DEVNULL)


def tar_entries(path: Path) -> int:
    out = run(["tar", "-tf", str(path)], stdout=subprocess.PIPE).stdout
    return out.count(b"\n")


def layer_blobs(layout: Path, tag: str = TAG) -> list[tuple[Path, dict]]:
    """(blob path, descriptor) of each layer of layout:tag, via index.json -> manifest."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index.get("manifests", []):
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            break
    else:
        raise SystemExit(f"tag {tag!r} not in {layout}/index.json")

    def blob(d: dict) -> Path:
        algo, hexd = d["digest"].split(":", 1)
        return layout / "blobs" / algo / hexd

    manifest = json.loads(blob(desc).read_text())
    return [(blob(d), d) for d in manifest["layers"]]


def verify_layout(layout: Path) -> list[Path]:
    layers = layer_blobs(layout)
    if len(layers) != 2:
        raise SystemExit(f"{layout}: expected 2 layers, found {len(layers)}")
    for path, desc in layers:
        with open(path, "rb") as f:
            magic = f.read(2)
        if desc.get("mediaType") not in GZIP_TYPES or magic != b"\x1f\x8b":
            raise SystemExit(f"{path}: not a gzip layer ({desc.get('mediaType')}, magic {magic!r})")
    return [p for p, _ in layers]


def build_image(work: Path) -> tuple[Path, list[Path]]:
    layout = work / "layout"
    stamp = layout / ".bench-complete"
    if stamp.exists():
        log(f"using cached image {layout} (delete it to rebuild)")
        blobs = verify_layout(layout)
    else:
        if not shutil.which("umoci"):
            raise SystemExit("umoci not found (apt-get install -y umoci)")
        log(f"building image {layout}")
        shutil.rmtree(layout, ignore_errors=True)
        tars = [work / "layer1.tar", work / "layer2.tar"]
        make_tar(tars[0], ["usr/share"])
        make_tar(tars[1], python_lib_dirs())
        counts = [tar_entries(t) for t in tars]
        run(["umoci", "init", "--layout", str(layout)])
        run(["umoci", "new", "--image", f"{layout}:{TAG}"])
        for t in tars:
            log(f"  umoci raw add-layer {t.name}")
            run(["umoci", "raw", "add-layer", "--image", f"{layout}:{TAG}", str(t)])
        blobs = verify_layout(layout)
        (layout / ".bench-meta.json").write_text(json.dumps(
            {"entries": counts, "tar_bytes": [t.stat().st_size for t in tars]}))
        for t in tars:
            t.unlink()
        stamp.touch()
    meta = json.loads((layout / ".bench-meta.json").read_text())
    entries, tar_bytes = meta["entries"], meta["tar_bytes"]
    for i, blob in enumerate(blobs):
        log(f"  layer {i + 1}: {entries[i]:>7,} entries, tar {tar_bytes[i] / 1e6:7.1f} MB, "
            f"gzip {blob.stat().st_size / 1e6:7.1f} MB  {blob.name[:16]}")
    log(f"  total:   {sum(entries):>7,} entries, tar {sum(tar_bytes) / 1e6:7.1f} MB, "
        f"gzip {sum(b.stat().st_size for b in blobs) / 1e6:7.1f} MB")
    if sum(entries) < 40_000:
        log("  WARNING: fewer than 40,000 entries")
    return layout, blobs


# ---------------------------------------------------------------------------------------------
# timing


def timed(cmd: list[str], rss_file: Path | None = None) -> tuple[float, float, int | None]:
    """Wall seconds, user+sys CPU seconds and peak RSS in KiB (/usr/bin/time -v, else wait4) of cmd."""
    use_time_v = rss_file is not None and os.access(TIME_V, os.X_OK)
    full = [TIME_V, "-v", "-o", str(rss_file), *cmd] if use_time_v else cmd
    err = open(rss_file.with_suffix(".stderr") if rss_file else os.devnull, "w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    errtext = err.read() if rss_file else ""
    err.close()
    if proc.returncode != 0:
        sys.stderr.write(errtext)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    rss = None
    if use_time_v:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", rss_file.read_text())
        rss = int(m.group(1)) if m else None
    if rss is None:
        rss = usage.ru_maxrss  # KiB on Linux; covers the child and its waited-for descendants
    return elapsed, usage.ru_utime + usage.ru_stime, rss


def clear(path: Path) -> None:
    # a cache keeps its erofs bases mounted between sessions (until gc): unmount them, deepest first
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)
    subprocess.run(["sync"], check=True)  # start every run with no dirty pages pending


def drop_caches() -> bool:
    """Drop page/dentry/inode caches (root only).

    On ext4 (seen without a journal, kernel 6.x) inode allocation after a big rm -rf gets
    several times slower while the freed inode-table blocks sit in the buffer cache
    (find_inode_bit -> recently_deleted -> find_get_block), which makes back-to-back runs
    unrepeatable.  Dropping caches and re-warming the blobs gives every run the same state.
    """
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(blobs: list[Path], tools: list[list[str]] = ()) -> None:
    for cmd in tools:  # executables and python modules
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for b in blobs:
        with open(b, "rb") as f:
            while f.read(1 << 20):
                pass


def bench(work: Path, layout: Path, blobs: list[Path], runs: int, keep: bool, drop: bool) -> None:
    dirge = dirge_exe()
    ref = f"oci:{layout}:{TAG}"
    cmds = {
        "dirge unpack": lambda d: [dirge, "unpack", ref, str(d)],
        "tar -xzf": lambda d: ["sh", "-c", 'mkdir -p "$1" && tar --numeric-owner -xzf "$2" -C "$1" '
                               '&& tar --numeric-owner -xzf "$3" -C "$1"', "sh", str(d), *map(str, blobs)],
        "umoci raw unpack": lambda d: ["umoci", "raw", "unpack", "--image", f"{layout}:{TAG}", str(d)],
    }
    if os.geteuid() != 0:
        log("WARNING: not root; dirge runs rootless and tar cannot preserve owners")
    tools = [[dirge, "--help"], [sys.executable, "-c", "import dirge, dirge.cli"], ["tar", "--version"],
             ["umoci", "--version"], ["sh", "-c", "true"]]
    if drop and os.geteuid() != 0:
        log("WARNING: not root; cannot drop caches between runs (expect noisy numbers)")
        drop = False
    log(f"\nbefore each run: rm -rf dest; sync; {'drop caches; ' if drop else ''}"
        f"warm page cache ({sum(b.stat().st_size for b in blobs) / 1e6:.0f} MB of blobs + tools)")
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, list[int]] = {k: [] for k in cmds}
    dests = {k: work / f"dest-{k.split()[0]}" for k in cmds}
    rss_file = work / "time-v.txt"
    for d in dests.values():
        clear(d)
    for i in range(runs):  # interleave tools so drift affects all of them alike
        for name, mk in cmds.items():
            dest = dests[name]
            clear(dest)
            if drop:
                drop_caches()
            warm(blobs, tools)
            secs, cpus, kib = timed(mk(dest), rss_file)
            times[name].append(secs)
            cpu[name].append(cpus)
            if kib is not None:
                rss[name].append(kib)
            log(f"  run {i + 1}/{runs}  {name:<17} {secs:7.2f} s  cpu {cpus:6.2f} s  peak RSS {kib / 1024 if kib else 0:7.1f} MiB")
            if not (keep and i == runs - 1):
                clear(dest)

    med = {k: statistics.median(v) for k, v in times.items()}
    d, t, u = med["dirge unpack"], med["tar -xzf"], med["umoci raw unpack"]
    log(f"\nresults: median of {runs} runs, warm page cache, dest on {work}")
    log(f"  {'tool':<18} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s (med)':>12} {'peak RSS MiB':>13}")
    for k, v in times.items():
        peak = max(rss[k]) / 1024 if rss[k] else float("nan")
        log(f"  {k:<18} {med[k]:9.2f} {min(v):8.2f} {max(v):8.2f} {statistics.median(cpu[k]):12.2f} {peak:13.1f}")
    log(f"  dirge/tar   = {d / t:.3f}")
    log(f"  dirge/umoci = {d / u:.3f}")
    verdict = "HOLDS" if d <= TARGET * t else "DOES NOT HOLD"
    log(f"  target dirge <= {TARGET} x tar -xzf ({TARGET * t:.2f} s): {verdict}")
    if rss["dirge unpack"]:
        log(f"  dirge peak RSS: {max(rss['dirge unpack']) / 1024:.1f} MiB")
    if keep:
        log(f"  kept last destinations: {', '.join(str(p) for p in dests.values())}")
    rss_file.unlink(missing_ok=True)
    rss_file.with_suffix(".stderr").unlink(missing_ok=True)


def profile(work: Path, layout: Path, blobs: list[Path]) -> None:
    import cProfile
    import pstats

    import dirge

    dest = work / "dest-profile"
    clear(dest)
    drop_caches()
    warm(blobs)
    ref = f"oci:{layout}:{TAG}"
    log(f"\nprofiling dirge.unpack({ref!r}, {str(dest)!r}) in-process")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = dirge.unpack(ref, dest)
    prof.disable()
    log(f"  {result.report.entries:,} entries, {result.report.bytes:,} bytes in "
        f"{time.perf_counter() - t0:.2f} s (with profiler overhead); "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    prof.dump_stats(str(work / "dirge.prof"))
    for key in ("cumulative", "tottime"):
        log(f"\n--- top 25 by {key} ---")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats(key).print_stats(25)
    log(f"profile saved to {work / 'dirge.prof'}")
    clear(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the last destination of each tool")
    ap.add_argument("--no-drop-caches", dest="drop", action="store_false",
                    help="do not drop kernel caches before each run (they are re-warmed either way)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run dirge.unpack once in-process under cProfile")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    layout, blobs = build_image(work)
    if args.profile:
        profile(work, layout, blobs)
    else:
        bench(work, layout, blobs, args.runs, args.keep, args.drop)


if __name__ == "__main__":
    main()
