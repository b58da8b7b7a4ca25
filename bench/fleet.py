#!/usr/bin/env python3
"""Benchmark a fleet host's cold prepare: from a prepared-base artifact vs from the layers, vs the floor.

Usage: .venv/bin/python bench/fleet.py [--workdir DIR] [--runs N] [--files N] [--format ext4|erofs]

A docker-registry (the Debian package) is started on 127.0.0.1 (storage in WORKDIR/registry, wiped at
start, stopped at exit). A generated image (--files small files in two gzip layers, default 60,000) is
pushed as bench/fleet:1; its --format file (default ext4: `dirge export`, no root needed to run it) is
pushed as its artifact to bench/bases, with ``dirge.push`` when it exists, else tests/artifacts.py's
helper. Then, interleaved, after `sync` and `echo 3 > /proc/sys/vm/drop_caches` before each run:

  artifact  dirge session create REF --disk ext4 --artifacts 127.0.0.1:PORT/bench/bases  (empty cache)
  layers    dirge session create REF --disk ext4                                       (empty cache)
  floor     curl the artifact's blob | zstd -d > FILE                                 (the transfer floor)

(erofs: ``--base-format erofs`` directory sessions instead; root and a kernel with erofs.) Medians and
the ratios artifact/layers and artifact/floor are printed. Each run checks the base it made is the
exported file, byte for byte, and that the artifact run said ``base_source: artifact``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
from pull import no_proxy_for_loopback, push, registry  # noqa: E402
from unpack import clear, drop_caches, log  # noqa: E402

REPO, BASES = "bench/fleet", "bench/bases"


def build_layout(work: Path, files: int) -> Path:
    from dirge.layerbuild import LayerBuilder
    from dirge.sources.layout import LayoutWriter

    layout = work / f"layout-{files}"
    if (layout / "index.json").exists():
        return layout
    layers = []
    for half in range(2):
        b = LayerBuilder().dir(f"d{half}")
        for i in range(files // 2):
            if i % 500 == 0:
                b.dir(f"d{half}/{i // 500:04d}")
            b.file(f"d{half}/{i // 500:04d}/f{i:06d}", hashlib.sha256(f"{half}/{i}".encode()).digest() * (1 + i % 64))
        layers.append(b.build())
    LayoutWriter(layout).add_image(layers, tag="t")
    return layout


def push_artifact(port: int, fmt: str, image_file: Path) -> str:
    try:
        from dirge import push as dirge_push  # type: ignore[attr-defined]  # the real pusher, once merged
    except ImportError:
        dirge_push = None
    if dirge_push is not None and callable(getattr(dirge_push, "push_artifact", None)):
        return str(dirge_push.push_artifact(f"127.0.0.1:{port}/{REPO}:1", f"127.0.0.1:{port}/{BASES}", fmt,
                                            image_file))
    sys.path.insert(0, str(HERE.parent / "tests"))
    import httpx
    from artifacts import push_artifact as helper

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
        return helper(client, BASES, f"{REPO}:1", fmt, image_file)


def blob_of(port: int, manifest_digest: str) -> str:
    import httpx

    got = httpx.get(f"http://127.0.0.1:{port}/v2/{BASES}/manifests/{manifest_digest}", trust_env=False,
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    return str(got.json()["layers"][0]["digest"])


def timed(cmd: "list[str] | str", shell: bool = False) -> tuple[float, str]:
    subprocess.run(["sync"], check=True)
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, shell=shell, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{proc.stderr}")
    return elapsed, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench-fleet"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=60_000)
    ap.add_argument("--format", choices=["ext4", "erofs"], default="ext4")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root only (dropping caches)")
    no_proxy_for_loopback()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    layout = build_layout(work, args.files)
    # this tree's dirge (an installed one may predate --artifacts)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    dirge = [sys.executable, "-m", "dirge.cli"]
    times: dict[str, list[float]] = {"artifact": [], "layers": [], "floor": []}
    with registry(work) as (port, _storage):
        push(layout, "t", port, REPO)
        ref = f"127.0.0.1:{port}/{REPO}:1"
        local = work / f"local.{args.format}"
        subprocess.run([*dirge, "-q", "export", f"oci:{layout}:t", str(local), "--format", args.format,
                        "--cache-dir", str(work / "export-cache")], check=True)
        manifest = push_artifact(port, args.format, local)
        blob = blob_of(port, manifest)
        expected = local.read_bytes()
        log(f"image: {args.files} files; {args.format} file {len(expected) >> 20} MiB; artifact {manifest[:19]}")
        shape = (["--disk", "ext4"] if args.format == "ext4" else ["--base-format", "erofs"])
        for run in range(args.runs):
            for kind in ("artifact", "layers", "floor"):
                cache = work / "cache"
                clear(cache)
                if kind == "floor":
                    out = work / "floor.out"
                    seconds, _ = timed(f"curl -sf --noproxy '*' http://127.0.0.1:{port}/v2/{BASES}/blobs/{blob} "
                                       f"| zstd -dq -o {out} -f", shell=True)
                    assert out.read_bytes() == expected
                else:
                    cmd = [*dirge, "-q", "session", "create", ref, *shape, "--cache-dir", str(cache), "--json"]
                    if kind == "artifact":
                        cmd += ["--artifacts", f"127.0.0.1:{port}/{BASES}"]
                    seconds, out_text = timed(cmd)
                    made = json.loads(out_text)
                    assert made["base_source"] == ("artifact" if kind == "artifact" else "layers"), made
                    base = cache / "bases" / made["base"] / f"rootfs.{args.format}"
                    assert base.read_bytes() == expected, f"{kind}: the base is not the exported file"
                    subprocess.run([*dirge, "session", "rm", made["id"], "--cache-dir", str(cache)], check=True)
                times[kind].append(seconds)
                log(f"run {run + 1} {kind:8} {seconds:7.2f} s")
        clear(work / "cache")
    med = {k: statistics.median(v) for k, v in times.items()}
    log(f"medians: artifact {med['artifact']:.2f} s, layers {med['layers']:.2f} s, floor {med['floor']:.2f} s")
    log(f"artifact/layers {med['artifact'] / med['layers']:.2f}x, artifact/floor {med['artifact'] / med['floor']:.2f}x")


if __name__ == "__main__":
    main()
