#!/usr/bin/env python3
"""Benchmark `dirge push` of a cached erofs base (issue 21): the first push (compress + upload) and a second
one (nothing to send), wall time and blob bytes sent.

Usage: .venv/bin/python bench/push.py [--workdir DIR] [--runs N]

A private docker-registry (bench/pull.py's) is started on 127.0.0.1 with its storage in WORKDIR/registry.
The image is a small synthetic one (busybox, 2,000 small text files, 16 MiB of random data, 16 MiB of
zeros-and-text) in an OCI layout; its erofs base is built once in WORKDIR/cache (not timed). Each run
pushes to a fresh repository (push/base-N:1), then pushes the same again; the mount hints are removed
before each first push, so it uploads. Root only (erofs bases are root's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "src"))

from pull import registry  # noqa: E402
from unpack import dirge_exe, log  # noqa: E402


def make_image(work: Path) -> str:
    from dirge.layerbuild import LayerBuilder
    from dirge.sources.layout import LayoutWriter

    layout = work / "push-layout"
    if not (layout / "index.json").exists():
        rng = __import__("random").Random(21)
        layer = LayerBuilder().dir("bin").file("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755)
        for i in range(2000):
            layer.file(f"usr/share/doc/f{i:04d}.txt", (f"line {i} of a small text file\n" * (1 + i % 40)).encode())
        layer.file("var/lib/random.bin", rng.randbytes(16 << 20))
        layer.file("var/lib/mixed.bin", (b"\0" * 4096 + b"some text " * 400) * 2048)
        LayoutWriter(layout).add_image([layer.build()], tag="1")
    return f"oci:{layout}:1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench-push"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    image = make_image(work)
    cache = work / "cache"
    from dirge.bases import ensure_disk
    from dirge.options import PrepareOptions
    from dirge.store.cache import Cache

    base = ensure_disk(image, PrepareOptions(disk="erofs"), cache=Cache(cache))
    log(f"erofs base {base.image_file}: {base.image_file.stat().st_size} bytes")
    env = {**os.environ, "DIRGE_CACHE_DIR": str(cache)}
    firsts, seconds = [], []
    with registry(work) as (port, _storage):
        for n in range(args.runs):
            shutil.rmtree(cache / "pushed", ignore_errors=True)  # no mount source: the first push uploads
            dest = f"127.0.0.1:{port}/push/base-{n}-{time.time_ns()}:1"
            for times in (firsts, seconds):
                t0 = time.perf_counter()
                proc = subprocess.run([dirge_exe(), "-q", "push", image, dest, "--json"], capture_output=True,
                                      text=True, env=env)
                elapsed = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                out = json.loads(proc.stdout)
                times.append((elapsed, out["bytes_sent"]))
                log(f"run {n}: {elapsed:.2f} s, {out['bytes_sent']} blob bytes sent, {out['blobs']}")
    for name, rows in (("first push", firsts), ("second push", seconds)):
        print(f"{name}: median {statistics.median(t for t, _ in rows):.2f} s over {len(rows)} runs, "
              f"blob bytes sent {sorted({b for _, b in rows})}")


if __name__ == "__main__":
    main()
