#!/usr/bin/env python3
"""Benchmark session creation per strategy against `cp -a` of the same cached base.

Usage: .venv/bin/python bench/session.py [--workdir DIR] [--runs N] [--skip-loop]

Uses the large image of bench/unpack.py (built there if missing: /usr/share + python libs, >40,000
entries). For each strategy available on this machine it times `dirge.rootfs.prepare()` on a warm
cache (the base already unpacked), which is what a sandbox launcher calls per session, and prints the
median against the median `cp -a BASE DEST` measured in the same run on the same filesystem.
reflink and btrfs run on loop-mounted xfs / btrfs images made here and detached afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack import TAG, build_image, log  # noqa: E402  (the image builder of bench/unpack.py)

from dirge.store.cache import Cache  # noqa: E402
from dirge.rootfs import prepare  # noqa: E402
from dirge.session import Sessions  # noqa: E402


@contextmanager
def loop_fs(work: Path, fstype: str, size: int) -> Iterator[Path]:
    image, mnt = work / f"{fstype}.img", work / f"{fstype}-mnt"
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}[fstype]
    subprocess.run(mkfs + [str(image)], check=True)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    mnt.mkdir(exist_ok=True)
    try:
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        image.unlink(missing_ok=True)


def median_prepare(ref: str, cache: Path, strategy: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session = prepare(ref, cache, strategy=strategy)
        times.append(time.perf_counter() - start)
        assert session.strategy == strategy
        session.close()
    return statistics.median(times)


def median_cp(base: Path, scratch: Path, runs: int) -> float:
    times = []
    for i in range(runs):
        dest = scratch / f"cp-{i}"
        start = time.perf_counter()
        subprocess.run(["cp", "-a", str(base), str(dest)], check=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(dest)
    return statistics.median(times)


def measure(label: str, ref: str, cache: Path, strategies: list[str], runs: int, cp_runs: int,
            rows: list[tuple[str, str, float, float]]) -> None:
    log(f"[{label}] unpacking the base into {cache} (not timed)")
    first = prepare(ref, cache, strategy="copy" if "copy" in strategies else strategies[0])
    first.close()
    base = Cache(cache).bases()[0] / "rootfs"
    cp = median_cp(base, cache, cp_runs)
    log(f"[{label}] cp -a median {cp:.3f}s")
    for strategy in strategies:
        t = median_prepare(ref, cache, strategy, runs if strategy not in ("copy",) else cp_runs)
        log(f"[{label}] {strategy:8} median {t * 1000:9.1f} ms")
        rows.append((label, strategy, t, cp))
    assert Sessions(Cache(cache)).list() == []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"))
    ap.add_argument("--runs", type=int, default=11, help="runs of the O(1) strategies (median)")
    ap.add_argument("--cp-runs", type=int, default=3, help="runs of cp -a and the copy strategy")
    ap.add_argument("--skip-loop", action="store_true", help="skip the xfs/btrfs loop filesystems")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (overlay mounts, loop devices, owners)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    layout, _ = build_image(args.workdir)
    ref = f"oci:{layout}:{TAG}"
    rows: list[tuple[str, str, float, float]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="session-bench-") as tmp:
        measure("ext4", ref, Path(tmp) / "cache", ["overlay", "copy"], args.runs, args.cp_runs, rows)
    if not args.skip_loop:
        for fstype, strategies in (("xfs", ["reflink"]), ("btrfs", ["btrfs", "reflink"])):
            with loop_fs(args.workdir, fstype, 3 << 30) as mnt:
                measure(fstype, ref, mnt / "cache", strategies, args.runs, args.cp_runs, rows)
    print()
    print(f"{'fs':6} {'strategy':9} {'median':>11} {'cp -a':>9} {'ratio':>9}")
    for fs, strategy, t, cp in rows:
        print(f"{fs:6} {strategy:9} {t * 1000:8.1f} ms {cp:8.3f}s {t / cp:9.4f}")
    default = next(t / cp for fs, s, t, cp in rows if fs == "ext4" and s == "overlay")
    verdict = "MET" if default <= 0.01 else "NOT MET"
    print(f"\ndefault strategy (overlay, root) / cp -a = {default:.4f}  target <= 0.01: {verdict}")


if __name__ == "__main__":
    main()
