#!/usr/bin/env python3
"""Benchmark a fleet host's cold prepare: from a prepared-base artifact vs from the layers, vs the floor.

Usage: .venv/bin/python bench/fleet.py [--workdir DIR] [--runs N] [--files N] [--format erofs|ext4|both]

A docker-registry (the Debian package) is started on 127.0.0.1 (storage in WORKDIR/registry, wiped at
start, stopped at exit). A generated image (--files small files in two gzip layers, default 60,000) is
pushed as bench/fleet:1; its erofs and/or ext4 file (``dirge export``) is pushed as its artifact to
bench/bases with ``dirge.push``. Then, interleaved, on an empty cache after `sync` and `echo 3 >
/proc/sys/vm/drop_caches` before each run:

  cli artifact     dirge session create REF SHAPE --artifacts 127.0.0.1:PORT/bench/bases   (a fresh process)
  cli layers       dirge session create REF SHAPE
  prepare artifact dirge.prepare(REF, SHAPE, artifacts=[...]) timed in a Python process that has already
                   imported dirge and loaded the system trust store (a fleet agent, a launcher: what
                   bench/session.py times too)
  prepare layers   dirge.prepare(REF, SHAPE)
  floor            curl the artifact's blob | zstd -d > FILE (the transfer floor; C tools, no lookups, no sync)

SHAPE: erofs, a directory session over the erofs base (root's default: ``--base-format erofs``); ext4, a
disk session (``--disk ext4``: the base disk plus the session's copy of it). Medians and the ratios
artifact/layers and artifact/floor are printed, per way of calling. Each run checks the base it made is
the exported file, byte for byte, and that an artifact run said ``base_source: artifact``.
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
from typing import Any

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


def push_artifact(port: int, fmt: str, cache: Path) -> str:
    """The artifact of the image's ``fmt`` base, pushed with dirge itself (converting in ``cache``)."""
    import dirge

    got = dirge.push(f"127.0.0.1:{port}/{REPO}:1", f"127.0.0.1:{port}/{BASES}", format=fmt,  # type: ignore[arg-type]
                     cache=cache)
    return got.digest


def blob_of(port: int, manifest_digest: str) -> str:
    import httpx

    got = httpx.get(f"http://127.0.0.1:{port}/v2/{BASES}/manifests/{manifest_digest}", trust_env=False,
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    return str(got.json()["layers"][0]["digest"])


def clear_bases(cache: Path) -> None:
    """An empty cache that has been used on this host before: its one-off erofs probe record stays (a
    host probes once per cache and kernel; the base, blobs and sessions are what a cold prepare lacks)."""
    probe = cache / "erofs-probe.json"
    kept = probe.read_bytes() if probe.exists() else None
    clear(cache)
    if kept is not None:
        cache.mkdir(parents=True)
        probe.write_bytes(kept)


def timed(cmd: "list[str] | str", shell: bool = False) -> tuple[float, str]:
    subprocess.run(["sync"], check=True)
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, shell=shell, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{proc.stderr}")
    return elapsed, proc.stdout


def child(ref: str, cache: str, fmt: str, artifacts: list[str]) -> None:
    """``prepare`` timed in a process that has imported dirge (as an agent has): caches dropped after
    the imports, the session's record printed as JSON with the seconds."""
    import dirge
    import dirge.bases
    import dirge.config
    import dirge.fsimage.erofs
    import dirge.fsimage.ext4
    import dirge.lifecycle
    import dirge.sources.artifacts
    import dirge.sources.registry  # what a prepare from a registry loads

    dirge.sources.registry.system_tls()  # the trust store, loaded once a process (an agent has it)
    os.sync()
    drop_caches()
    shape: dict[str, Any] = {"base_format": "erofs"} if fmt == "erofs" else {"disk": "ext4"}
    t0 = time.perf_counter()
    session = dirge.prepare(ref, cache=cache, artifacts=tuple(artifacts) if artifacts else None, **shape)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_source": session.base_source, "base": session.info.base,
                      "id": session.info.id}))
    session.detach()  # the parent removes it with the CLI, as for the CLI runs


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench-fleet"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=60_000)
    ap.add_argument("--format", choices=["ext4", "erofs", "both"], default="both")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root only (dropping caches, erofs mounts)")
    no_proxy_for_loopback()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    layout = build_layout(work, args.files)
    # this tree's dirge (an installed one may predate --artifacts)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    dirge = [sys.executable, "-m", "dirge.cli"]
    formats = ["erofs", "ext4"] if args.format == "both" else [args.format]
    kinds = ("cli artifact", "cli layers", "prepare artifact", "prepare layers", "floor")
    times: dict[tuple[str, str], list[float]] = {(f, k): [] for f in formats for k in kinds}
    cache = work / "cache"
    with registry(work) as (port, _storage):
        push(layout, "t", port, REPO)
        ref = f"127.0.0.1:{port}/{REPO}:1"
        arts = f"127.0.0.1:{port}/{BASES}"
        expected: dict[str, bytes] = {}
        blobs: dict[str, str] = {}
        for fmt in formats:
            local = work / f"local.{fmt}"
            subprocess.run([*dirge, "-q", "export", ref, str(local), "--format", fmt,
                            "--cache-dir", str(work / "export-cache")], check=True)
            blobs[fmt] = blob_of(port, push_artifact(port, fmt, work / "export-cache"))
            expected[fmt] = local.read_bytes()
            log(f"image: {args.files} files; {fmt} file {len(expected[fmt]) >> 20} MiB; artifact blob {blobs[fmt][:19]}")
        clear(work / "export-cache")
        for run in range(args.runs):
            for fmt in formats:
                shape = ["--disk", "ext4"] if fmt == "ext4" else ["--base-format", "erofs"]
                for kind in kinds:
                    clear_bases(cache)
                    if kind == "floor":
                        out = work / "floor.out"
                        seconds, _ = timed(f"curl -sf --noproxy '*' http://127.0.0.1:{port}/v2/{BASES}/blobs/"
                                           f"{blobs[fmt]} | zstd -dq -o {out} -f", shell=True)
                        assert out.read_bytes() == expected[fmt]
                        out.unlink()
                    else:
                        from_artifact = kind.endswith("artifact")
                        if kind.startswith("cli"):
                            cmd = [*dirge, "-q", "session", "create", ref, *shape, "--cache-dir", str(cache), "--json"]
                            cmd += ["--artifacts", arts] if from_artifact else []
                            seconds, out_text = timed(cmd)
                            made = json.loads(out_text)
                        else:
                            subprocess.run(["sync"], check=True)
                            proc = subprocess.run([sys.executable, __file__, "--child", ref, str(cache), fmt,
                                                   *([arts] if from_artifact else [])],
                                                  capture_output=True, text=True)
                            if proc.returncode != 0:
                                raise SystemExit(f"{kind} failed: {proc.stderr}")
                            made = json.loads(proc.stdout)
                            seconds = made["seconds"]
                        assert made["base_source"] == ("artifact" if from_artifact else "layers"), made
                        base = cache / "bases" / made["base"] / f"rootfs.{fmt}"
                        assert base.read_bytes() == expected[fmt], f"{kind}: the base is not the exported file"
                        subprocess.run([*dirge, "-q", "session", "rm", made["id"], "--cache-dir", str(cache)],
                                       check=True)
                    times[fmt, kind].append(seconds)
                    log(f"run {run + 1} {fmt:5} {kind:16} {seconds:7.3f} s")
        clear(cache)
    for fmt in formats:
        med = {k: statistics.median(times[fmt, k]) for k in kinds}
        log(f"{fmt} medians: " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        for way in ("cli", "prepare"):
            art, lay = med[f"{way} artifact"], med[f"{way} layers"]
            log(f"{fmt} {way:7}: artifact/layers {art / lay:.2f}x, artifact/floor {art / med['floor']:.2f}x")


if __name__ == "__main__":
    main()
