#!/usr/bin/env python3
"""Benchmark an ordinary user's session creation (fuse-overlayfs, issue 20) against `cp -a` of the base.

Usage: .venv/bin/python bench/rootless_session.py [--workdir DIR] [--entries N] [--runs N] [--cp-runs N]

Builds (offline, with dirge.layerbuild) a one-layer image of about 10,000 entries: 100 directories of
99 small files each. Run as root, it re-runs itself as uid/gid 65534 (setpriv) in a work directory it
gives that user; run as an ordinary user, it measures as that user. On a warm cache (the rootless
tree base already unpacked, not timed) it times `dirge.rootfs.prepare()` with the strategy chosen
automatically (it must be fuse-overlayfs) and with `copy` (the previous rootless default), and `cp -a
BASE DEST` of the same base on the same filesystem, as the same user; medians, and the ratio (target
fuse-overlayfs / cp -a <= 1/50). Session removal (fusermount3 -u, then deletion) is timed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

NOBODY = 65534


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_image(layout: Path, entries: int) -> str:
    from dirge.layerbuild import LayerBuilder
    from dirge.sources.layout import LayoutWriter

    if not (layout / "index.json").exists():
        per_dir = 99
        layer = LayerBuilder()
        for d in range(max(1, entries // (per_dir + 1))):
            layer.dir(f"d{d:03}")
            for f in range(per_dir):
                layer.file(f"d{d:03}/f{f:03}", f"{d}/{f}\n".encode() * 8, uid=d % 3, gid=f % 5)
        LayoutWriter(layout).add_image([layer.build()], tag="t")
    return f"oci:{layout}:t"


def measure(work: Path, ref: str, runs: int, cp_runs: int) -> None:
    from dirge.rootfs import prepare
    from dirge.session import Sessions
    from dirge.store.cache import Cache

    cache_dir = work / "cache"
    log(f"unpacking the rootless tree base into {cache_dir} (not timed)")
    with prepare(ref, cache_dir, base_format="tree", strategy="copy") as first:
        base = Cache(cache_dir).base_dir(first.info.base) / "rootfs"
    count = sum(1 for _ in base.rglob("*"))

    def timed_prepare(strategy: str | None, n: int) -> tuple[float, float, str]:
        create, remove, chosen = [], [], ""
        for _ in range(n):
            start = time.perf_counter()
            session = prepare(ref, cache_dir, base_format="tree", strategy=strategy)
            create.append(time.perf_counter() - start)
            chosen = session.info.strategy
            start = time.perf_counter()
            session.close()
            remove.append(time.perf_counter() - start)
        return statistics.median(create), statistics.median(remove), chosen

    cp = []
    for i in range(cp_runs):
        dest = work / f"cp-{i}"
        start = time.perf_counter()
        subprocess.run(["cp", "-a", str(base), str(dest)], check=True)
        cp.append(time.perf_counter() - start)
        shutil.rmtree(dest)
    cp_median = statistics.median(cp)
    fuse, fuse_rm, chosen = timed_prepare(None, runs)
    copy, copy_rm, _ = timed_prepare("copy", cp_runs)
    assert Sessions(Cache(cache_dir)).list() == []
    print(f"uid {os.geteuid()}, base of {count} entries, cache on {work}")
    print(f"{'':22} {'create':>10} {'remove':>10}")
    print(f"{'auto (' + chosen + ')':22} {fuse * 1000:7.1f} ms {fuse_rm * 1000:7.1f} ms   median of {runs}")
    print(f"{'copy':22} {copy * 1000:7.1f} ms {copy_rm * 1000:7.1f} ms   median of {cp_runs}")
    print(f"{'cp -a':22} {cp_median * 1000:7.1f} ms {'':10}   median of {cp_runs}")
    ratio = fuse / cp_median
    print(f"\nauto ({chosen}) / cp -a = {ratio:.4f} (1/{1 / ratio:.0f})  target <= 1/50: "
          f"{'MET' if chosen == 'fuse-overlayfs' and ratio <= 1 / 50 else 'NOT MET'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench-rootless"))
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=21, help="runs of the automatic (fuse-overlayfs) session")
    ap.add_argument("--cp-runs", type=int, default=5, help="runs of cp -a and the copy strategy")
    args = ap.parse_args()
    src = Path(__file__).resolve().parent.parent / "src"
    sys.path.insert(0, str(src))
    if os.geteuid() != 0:
        measure(args.workdir, build_image(args.workdir / "layout", args.entries), args.runs, args.cp_runs)
        return
    # As root: the work directory is the ordinary user's, the measurement runs as that user.
    args.workdir.mkdir(parents=True, exist_ok=True)
    build_image(args.workdir / "layout", args.entries)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(args.workdir)], check=True)
    os.chmod(args.workdir, 0o755)
    proc = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                           __file__, "--workdir", str(args.workdir), "--entries", str(args.entries),
                           "--runs", str(args.runs), "--cp-runs", str(args.cp_runs)],
                          cwd="/", env={**os.environ, "HOME": str(args.workdir), "PYTHONPATH": str(src)})
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
