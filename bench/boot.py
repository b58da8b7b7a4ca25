#!/usr/bin/env python3
"""Benchmark `dirge boot`: launch-to-exit per root kind under TCG, and the share spent preparing.

Usage: .venv/bin/python bench/boot.py [--runs N] [--image REF] [--accel tcg|kvm|auto] [--json]

Root only (9p passthrough, mounts). Per round, interleaved, each contender once:

  floor        the kernel and dirge's initramfs alone (its ``dirge.probe`` boot: no root, no disk):
               what any boot costs here before a root is touched
  dir / ext4 / erofs, warm   ``boot(IMAGE, disk=D, command=["/bin/sh", "-c", ":"])`` on a cache that holds the base
  dir / ext4 / erofs, cold   the same from an empty cache (the base is built first)

IMAGE defaults to the demo image (two busybox layers). Each boot's time is split into prepare (the
session; cold: also its base), setup (the guest init written into the session, the initramfs, the
accelerator choice) and vm (QEMU launch to exit). Medians are printed with each kind's ratio to the
floor. Every cache and session the script makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from dirge.demo import build_demo_layout  # noqa: E402
from dirge.fsimage.mount import mounts_under, unmount  # noqa: E402
from dirge.vm import boot  # noqa: E402
from dirge.vm.initramfs import build_initramfs, find_kernel  # noqa: E402
from dirge.vm.qemu import VmSpec, choose_accel, run_vm  # noqa: E402

DISKS = ("dir", "ext4", "erofs")


def floor_boot(cache: Path, accel: str) -> float:
    kernel = find_kernel()
    nonce = os.urandom(8).hex()
    extra = " tsc_early_khz=2000000" if accel == "tcg" else ""
    spec = VmSpec(kernel, build_initramfs(kernel, "probe", cache),
                  f"console=ttyS0 panic=-1 reboot=t quiet dirge.nonce={nonce} dirge.probe{extra}", accel=accel)
    started = time.monotonic()
    if run_vm(spec, nonce, timeout=120) != 0:
        raise SystemExit("floor boot failed")
    return time.monotonic() - started


def one(image: str, cache: Path, disk: str, accel: str) -> dict[str, float]:
    started = time.monotonic()
    result = boot(image, cache, disk=disk, command=["/bin/sh", "-c", ":"], accel=accel, timeout=300)
    total = time.monotonic() - started
    if result.status != 0:
        raise SystemExit(f"boot {disk} exited {result.status}")
    return {"total": total, "prepare": result.prepare_seconds, "setup": result.setup_seconds,
            "vm": result.vm_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", help="image to boot (default: the demo image)")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/boot.py needs root")
    work = Path(tempfile.mkdtemp(prefix="dirge-bench-boot-"))
    try:
        image = args.image or build_demo_layout(work / "layout")
        warm = work / "warm"
        accel = choose_accel(args.accel, find_kernel(), warm)
        for disk in DISKS:  # fill the warm cache (untimed)
            one(image, warm, disk, accel)
        samples: dict[str, list[dict[str, float]]] = {}
        for r in range(args.runs):
            samples.setdefault("floor", []).append({"total": floor_boot(warm, accel)})
            for disk in DISKS:
                samples.setdefault(f"{disk} warm", []).append(one(image, warm, disk, accel))
                cold = work / f"cold-{disk}-{r}"
                samples.setdefault(f"{disk} cold", []).append(one(image, cold, disk, accel))
                for point in mounts_under(cold):
                    unmount(point)
                shutil.rmtree(cold)
            print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
        med = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
        floor = med["floor"]["total"]
        if args.json:
            print(json.dumps({"accel": accel, "runs": args.runs, "image": image, "medians": med}, indent=2))
            return
        print(f"accel {accel}, {args.runs} interleaved runs, image {image}; medians in seconds")
        print(f"{'contender':12} {'total':>7} {'prepare':>8} {'setup':>7} {'vm':>7} {'prep %':>7} {'x floor':>8}")
        for name, m in med.items():
            if name == "floor":
                print(f"{name:12} {floor:7.2f} {'':>8} {'':>7} {floor:7.2f} {'':>7} {1:8.2f}")
                continue
            print(f"{name:12} {m['total']:7.2f} {m['prepare']:8.3f} {m['setup']:7.3f} {m['vm']:7.2f} "
                  f"{100 * m['prepare'] / m['total']:6.1f}% {m['total'] / floor:8.2f}")
    finally:
        for point in mounts_under(work):
            unmount(point)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
