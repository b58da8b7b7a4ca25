#!/usr/bin/env python3
"""Two dirge source trees, A and B, pulling the same image from one registry, runs interleaved
(A B A B ...): `dirge pull` and `dirge unpack` of bench/pull.py's image, each from an empty cache after a
cache drop and a re-read of the registry's storage (untimed), as bench/pull.py does.

Usage: .venv/bin/python bench/pull_ab.py --a SRC_DIR --b SRC_DIR [--workdir DIR] [--runs N]

SRC_DIR is a checkout's src/ (it goes first on PYTHONPATH of the `dirge` runs). Reuses bench/pull.py's
image (WORKDIR/layout, built if missing), registry and helpers. Root only (dropping caches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull import BIG_REPO, image_digests, no_proxy_for_loopback, push, registry, storage_files  # noqa: E402
from unpack import TAG, build_image, clear, dirge_exe, drop_caches, log, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True)
    ap.add_argument("--b", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (dropping caches)")
    no_proxy_for_loopback()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    layout, _ = build_image(work)
    dirge = dirge_exe()
    sides = {"A": args.a.resolve(), "B": args.b.resolve()}
    with registry(work) as (port, storage):
        push(layout, TAG, port, BIG_REPO)
        ref = f"127.0.0.1:{port}/{BIG_REPO}:1"
        digests, _ = image_digests(layout, TAG)
        files = storage_files(storage, BIG_REPO, digests)
        cache, dest, rss = work / "ab-cache", work / "ab-dest", work / "ab-time-v.txt"
        cmds = {"pull": [dirge, "pull", ref, "--cache-dir", str(cache)],
                "unpack": [dirge, "unpack", ref, str(dest), "--cache-dir", str(cache)]}
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for i in range(args.runs):
            for name, cmd in cmds.items():
                for side, src in sides.items():
                    clear(cache)
                    clear(dest)
                    drop_caches()
                    for f in files:
                        with open(f, "rb") as fh:
                            while fh.read(1 << 20):
                                pass
                    os.environ["PYTHONPATH"] = str(src)
                    secs, cpus, _ = timed(cmd, rss)
                    results.setdefault((name, side), []).append((secs, cpus))
                    log(f"  run {i + 1}/{args.runs}  dirge {name:<7} {side} {secs:7.2f} s  cpu {cpus:6.2f} s")
        clear(cache)
        clear(dest)
        rss.unlink(missing_ok=True)
        rss.with_suffix(".stderr").unlink(missing_ok=True)
    log(f"\nmedians of {args.runs} interleaved runs (A = {sides['A']}, B = {sides['B']}):")
    for (name, side), values in results.items():
        log(f"  dirge {name:<7} {side}  wall {statistics.median(v[0] for v in values):6.2f} s  "
            f"cpu {statistics.median(v[1] for v in values):6.2f} s")


if __name__ == "__main__":
    main()
