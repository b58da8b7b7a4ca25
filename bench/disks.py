#!/usr/bin/env python3
"""Disks for block-device VMs (issue #11), measured in one interleaved run each. Root only.

A. ext4 export of the benchmark image, cold (empty cache) from its OCI layout:
   `dirge export IMG OUT --format ext4` vs `dirge unpack IMG DIR` + `mkfs.ext4 -q -b 4096 -d DIR OUT SIZE`
   (the hand-rolled path), and `dirge export --format erofs` for comparison. Target: ext4 <= 0.15x.
   Also the ext4 disk's size and allocated bytes against the image's content.
B. per-session disk creation from a 1 GiB base disk (random data), `session.disks.make_session_disk`:
   reflink on a loop-mounted xfs (reflink=1), a qcow2 overlay (qemu-img), and the sparse-copy fallback
   on the root filesystem. Targets: reflink and qcow2 <= 50 ms each.

    .venv/bin/python bench/disks.py [--workdir DIR] [--runs N] [--skip-export] [--skip-sessions]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull import warm  # noqa: E402
from unpack import TAG, build_image, drop_caches, log  # noqa: E402

DIRGE = str(Path(sys.executable).parent / "dirge")


def clean(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    elif path.exists():
        path.unlink()


def timed(cmds: list[list[str]]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def du(path: Path, apparent: bool) -> int:
    args = ["du", "-s", "-x", "-B1"] + (["--apparent-size"] if apparent else []) + [str(path)]
    return int(subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()[0])


def bench_export(work: Path, runs: int) -> None:
    layout, blobs = build_image(work)
    ref = f"oci:{layout}:{TAG}"
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    content: int | None = None
    ext4_size = 4 << 30
    entries = sum(int(subprocess.run(["tar", "-tzf", str(b)], capture_output=True, text=True).stdout.count("\n"))
                  for b in blobs)
    times: dict[str, list[float]] = {"dirge export ext4": [], "unpack + mkfs.ext4 -d": [], "dirge export erofs": []}
    for i in range(runs):
        for name in times:
            for p in list(scratch.iterdir()):
                clean(p)
            subprocess.run(["sync"], check=True)
            drop_caches()
            warm(blobs, [[DIRGE, "--help"], ["mkfs.ext4", "-V"]])
            cache = scratch / "cache"
            if name == "dirge export ext4":
                cmds = [[DIRGE, "--quiet", "export", ref, str(scratch / "out.ext4"), "--format", "ext4",
                         "--cache-dir", str(cache)]]
            elif name == "dirge export erofs":
                cmds = [[DIRGE, "--quiet", "export", ref, str(scratch / "out.erofs"), "--format", "erofs",
                         "--cache-dir", str(cache)]]
            else:
                # The hand-rolled path gets the size dirge chose (auto) and room for every entry.
                cmds = [[DIRGE, "--quiet", "unpack", ref, str(scratch / "tree")]]
                cmds.append(["mkfs.ext4", "-q", "-b", "4096", "-N", str(2 * entries), "-d", str(scratch / "tree"),
                             str(scratch / "hand.ext4"), f"{ext4_size // 1024}k"])
            elapsed = timed(cmds)
            times[name].append(elapsed)
            log(f"  run {i + 1}/{runs}  {name:24s} {elapsed:7.2f} s")
            if name == "dirge export ext4" and i == 0:
                out = scratch / "out.ext4"
                ext4_size = out.stat().st_size
                fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
                log(f"    e2fsck -fn: exit {fsck.returncode}; disk {out.stat().st_size / 1e6:.1f} MB, "
                    f"allocated {out.stat().st_blocks * 512 / 1e6:.1f} MB")
            if name == "unpack + mkfs.ext4 -d" and i == 0:
                content = du(scratch / "tree", True)
                log(f"    content (du --apparent-size of the tree): {content / 1e6:.1f} MB; allocated "
                    f"{du(scratch / 'tree', False) / 1e6:.1f} MB")
    for p in list(scratch.iterdir()):
        clean(p)
    med = {name: statistics.median(v) for name, v in times.items()}
    log(f"\nA. median of {runs} runs")
    for name, value in med.items():
        log(f"  {name:24s} {value:7.2f} s   (runs: {', '.join(f'{v:.2f}' for v in times[name])})")
    ratio = med["dirge export ext4"] / med["unpack + mkfs.ext4 -d"]
    log(f"  ext4 export / (unpack + mkfs.ext4 -d) = {ratio:.3f}  target <= 0.15: "
        f"{'HOLDS' if ratio <= 0.15 else 'DOES NOT HOLD'}")
    log(f"  ext4 export / erofs export = {med['dirge export ext4'] / med['dirge export erofs']:.3f}  (report)")


def bench_sessions(work: Path, runs: int) -> None:
    from dirge.session.disks import make_session_disk

    img = work / "xfs.img"
    mnt = work / "xfs-mnt"
    mnt.mkdir(exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(3 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(img)], check=True)
    device = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(mnt)], check=True)
        try:
            places = {"reflink (xfs)": (mnt, "raw"), "qcow2 overlay": (work, "qcow2"), "sparse copy (ext4 root)": (work, "raw")}
            bases: dict[Path, Path] = {}
            for where in {mnt, work}:
                base = where / "base-1g.img"
                with open(base, "wb") as f:
                    for _ in range(1024):
                        f.write(os.urandom(1 << 20))
                bases[where] = base
            results: dict[str, list[float]] = {name: [] for name in places}
            hows: dict[str, str] = {}
            for i in range(runs):
                for name, (where, fmt) in places.items():
                    dest = where / f"session-{i}.{'qcow2' if fmt == 'qcow2' else 'img'}"
                    start = time.perf_counter()
                    hows[name] = make_session_disk(bases[where], dest, disk_format=fmt)
                    results[name].append(time.perf_counter() - start)
                    dest.unlink()
            log(f"\nB. per-session disk from a 1 GiB base, median of {runs}")
            for name, values in results.items():
                ms = statistics.median(values) * 1000
                target = "" if "sparse" in name else f"  target <= 50 ms: {'HOLDS' if ms <= 50 else 'DOES NOT HOLD'}"
                log(f"  {name:26s} {ms:9.1f} ms  strategy reported: {hows[name]}{target}")
            for base in bases.values():
                base.unlink()
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
        img.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-sessions", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/disks.py needs root (mounts, loop devices, owners)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.skip_export:
        bench_export(args.workdir, args.runs)
    if not args.skip_sessions:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="disks-") as tmp:
            bench_sessions(Path(tmp), args.runs)


if __name__ == "__main__":
    main()
