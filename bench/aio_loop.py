#!/usr/bin/env python3
"""How long the event loop stalls while ``dirge.aio`` prepares sessions.

Usage: .venv/bin/python bench/aio_loop.py [--runs N] [--prepares P] [--workers K]

Builds 3 images like tests/test_aio.py's (7 layers, 9,001 entries each) as OCI layouts, then per run, on a
fresh cache: P concurrent ``aio.prepare`` (image i % 3) from one event loop, cold (the bases are built),
then the same P again, warm (only sessions are made). A ticker task sleeps 10 ms at a time; the figure is
its longest gap between two ticks (the sleep included), and the longest CPython gen-2 collection seen.
``--workers`` sets ``$DIRGE_AIO_WORKERS`` (the work slots). Run as root (overlay and erofs mounts).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--prepares", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    if args.workers:
        os.environ["DIRGE_AIO_WORKERS"] = str(args.workers)

    import test_aio  # noqa: E402 - after the environment: aio reads DIRGE_AIO_WORKERS on import

    from dirge import aio
    from dirge.fsutil import mounts_under, unmount

    collections: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.monotonic()
        elif info["generation"] == 2:
            collections.append(time.monotonic() - started[0])

    gc.callbacks.append(on_gc)
    work = Path(tempfile.mkdtemp(prefix="dirge-aio-bench-"))
    try:
        images = [test_aio._image(work, n) for n in range(3)]

        print(f"{args.prepares} aio.prepare of 3 images, work slots {getattr(aio, 'WORK_SLOTS', '-')}: longest gap of a 10 ms ticker")
        rows: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
        for run in range(args.runs):
            cache = work / f"cache{run}"
            collections.clear()
            for kind in ("cold", "warm"):
                gap, _, took = asyncio.run(test_aio.prepare_many(images, cache, args.prepares))
                rows[kind].append((gap, took))
            print(f"  run {run + 1}: cold {rows['cold'][-1][0] * 1000:.0f} ms ({rows['cold'][-1][1]:.2f} s), "
                  f"warm {rows['warm'][-1][0] * 1000:.0f} ms ({rows['warm'][-1][1]:.2f} s), "
                  f"longest gen-2 gc {max(collections, default=0) * 1000:.0f} ms")
            for point in sorted(mounts_under(cache), key=lambda p: len(p.parts), reverse=True):
                unmount(point)  # the erofs bases' own mounts
        for kind, values in rows.items():
            gaps = [g * 1000 for g, _ in values]
            print(f"{kind}: longest gap median {statistics.median(gaps):.0f} ms, max {max(gaps):.0f} ms")
    finally:
        for point in sorted(mounts_under(work), key=lambda p: len(p.parts), reverse=True):
            unmount(point)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
