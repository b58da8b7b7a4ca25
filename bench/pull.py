#!/usr/bin/env python3
"""Benchmark pulling from a registry: `dirge unpack REGISTRY-REF` against `skopeo copy` + `umoci unpack`
and against `curl | tar -xzf` per layer, plus dirge's peak RSS on a 1 GiB layer.

Usage: .venv/bin/python bench/pull.py [--workdir DIR] [--runs N]

A private docker-registry (the Debian package) is started on 127.0.0.1 with a free port and its storage
in WORKDIR/registry (wiped at start, the registry is stopped at exit); the two-layer image of
bench/unpack.py (~58k entries, 280 MB gzip) is pushed to it as bench/big:1. Each timed run starts from
an empty dirge cache and an absent destination, after `sync`, a kernel cache drop and a re-read of the
registry's storage files and the tools (none of which is timed). Runs are interleaved; the medians are
compared. Then a single-layer image with a 1 GiB layer of random data (built once, cached in
WORKDIR/huge-layout) is pushed as bench/huge:1 and the peak RSS of `dirge pull` and of `dirge unpack`
(fresh cache) is measured with /usr/bin/time -v. Root only (umoci unpack, dropping caches, owners).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unpack import TAG, build_image, clear, dirge_exe, drop_caches, layer_blobs, log, run, timed  # noqa: E402

TARGET_UMOCI = 0.25  # dirge unpack <= 0.25 x (skopeo copy + umoci unpack)
TARGET_CURL = 0.8  # dirge unpack <= 0.8 x (curl | tar -xzf, per layer)
TARGET_RSS_MIB = 100  # dirge pull / unpack of a 1 GiB layer
BIG_REPO, HUGE_REPO = "bench/big", "bench/huge"
HUGE_TAG = "huge"
HUGE_FILES = 4  # x 256 MiB of random data = one 1 GiB layer
HUGE_FILE_BYTES = 256 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


# ---------------------------------------------------------------------------------------------
# registry


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_proxy_for_loopback() -> None:
    """All traffic to 127.0.0.1 goes direct, never via a proxy (every tool inherits our environment)."""
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, [os.environ.get(var, ""), "127.0.0.1", "localhost"]))


def registry_up(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/v2/", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextmanager
def registry(work: Path) -> Iterator[tuple[int, Path]]:
    """A docker-registry on 127.0.0.1:PORT with storage in WORKDIR/registry/storage; always stopped."""
    if not shutil.which("docker-registry"):
        raise SystemExit("docker-registry not found (apt-get install -y docker-registry)")
    root = work / "registry"
    clear(root)
    storage = root / "storage"
    storage.mkdir(parents=True)
    proc = None
    try:
        for _attempt in range(5):  # the port is free when picked; another process could still take it
            port = free_port()
            config = root / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
            logf = open(root / "registry.log", "ab")
            proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=logf, stderr=logf,
                                    stdin=subprocess.DEVNULL)
            logf.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and proc.poll() is None and not registry_up(port):
                time.sleep(0.1)
            if proc.poll() is None and registry_up(port):
                break
            stop(proc)
            proc = None
        if proc is None:
            raise SystemExit(f"docker-registry did not start; see {root / 'registry.log'}")
        log(f"docker-registry pid {proc.pid} on 127.0.0.1:{port}, storage {storage}")
        yield port, storage
    finally:
        if proc is not None:
            stop(proc)
            log(f"docker-registry pid {proc.pid} stopped")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(layout: Path, tag: str, port: int, repo: str) -> None:
    dest = f"docker://127.0.0.1:{port}/{repo}:1"
    log(f"skopeo copy --preserve-digests --dest-tls-verify=false oci:{layout}:{tag} {dest}")
    t0 = time.perf_counter()
    run(["skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:{tag}", dest])
    log(f"  pushed in {time.perf_counter() - t0:.1f} s")


def storage_files(storage: Path, repo: str, digests: list[str]) -> list[Path]:
    """The registry files a pull of repo reads: its link files and the blobs' data files."""
    files = [p for p in (storage / "docker/registry/v2/repositories" / repo).rglob("*") if p.is_file()]
    for d in digests:
        algo, hexd = d.split(":", 1)
        data = storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"
        if not data.is_file():
            raise SystemExit(f"{data}: missing after the push")
        files.append(data)
    return files


def image_digests(layout: Path, tag: str) -> tuple[list[str], list[str]]:
    """(manifest + config + layer digests, layer digests in order) of layout:tag."""
    index = json.loads((layout / "index.json").read_text())
    desc = next(d for d in index["manifests"]
                if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    algo, hexd = desc["digest"].split(":", 1)
    manifest = json.loads((layout / "blobs" / algo / hexd).read_text())
    layers = [d["digest"] for d in manifest["layers"]]
    return [desc["digest"], manifest["config"]["digest"], *layers], layers


# ---------------------------------------------------------------------------------------------
# the 1 GiB image


class _Random:
    """A file-like source of incompressible bytes for tarfile.addfile."""

    def read(self, n: int = -1) -> bytes:
        return os.urandom(min(n, 1 << 20) if n > 0 else 1 << 20)


class _HashingWriter:
    def __init__(self, out) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)


def _put_blob(layout: Path, data: bytes, media_type: str) -> dict:
    hexd = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / hexd).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{hexd}", "size": len(data)}


def build_huge(work: Path) -> Path:
    """WORKDIR/huge-layout: one gzip layer (gzip -1) of 4 x 256 MiB random files, built once."""
    layout = work / "huge-layout"
    stamp = layout / ".bench-complete"
    if stamp.exists():
        log(f"using cached 1 GiB image {layout} (delete it to rebuild)")
    else:
        log(f"building {layout}: one layer, {HUGE_FILES} x {HUGE_FILE_BYTES >> 20} MiB of /dev/urandom, gzip -1")
        t0 = time.perf_counter()
        shutil.rmtree(layout, ignore_errors=True)
        (layout / "blobs/sha256").mkdir(parents=True)
        tmp = layout / "blobs/layer.tmp"
        with open(tmp, "wb") as gz_out:
            gz = subprocess.Popen(["gzip", "-1", "-n", "-c"], stdin=subprocess.PIPE, stdout=gz_out)
            hw = _HashingWriter(gz.stdin)
            with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                d = tarfile.TarInfo("data")
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(d)
                for i in range(HUGE_FILES):
                    ti = tarfile.TarInfo(f"data/random{i}.bin")
                    ti.size, ti.mode, ti.mtime = HUGE_FILE_BYTES, 0o644, 1_700_000_000
                    tf.addfile(ti, _Random())
            gz.stdin.close()
            if gz.wait() != 0:
                raise SystemExit("gzip failed")
        sha = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        layer = {"mediaType": OCI_LAYER_GZIP, "digest": f"sha256:{sha.hexdigest()}", "size": tmp.stat().st_size}
        tmp.rename(layout / "blobs/sha256" / sha.hexdigest())
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        config = {"architecture": arch, "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hw.sha.hexdigest()}"]}}
        cdesc = _put_blob(layout, json.dumps(config).encode(), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": [layer]}
        mdesc = _put_blob(layout, json.dumps(manifest).encode(), OCI_MANIFEST)
        mdesc["annotations"] = {"org.opencontainers.image.ref.name": HUGE_TAG}
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                                       "manifests": [mdesc]}))
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (layout / ".bench-meta.json").write_text(json.dumps({"tar_bytes": hw.size}))
        stamp.touch()
        log(f"  built in {time.perf_counter() - t0:.1f} s")
    (path, desc), = layer_blobs(layout, HUGE_TAG)
    tar_bytes = json.loads((layout / ".bench-meta.json").read_text())["tar_bytes"]
    log(f"  layer: tar {tar_bytes / 2**20:.0f} MiB, gzip {desc['size'] / 2**20:.0f} MiB  {path.name[:16]}")
    return layout


# ---------------------------------------------------------------------------------------------
# runs


def warm(files: list[Path], tools: list[list[str]]) -> None:
    for cmd in tools:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def tree_size(path: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) under path, not following symlinks."""
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        n += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000:
                size += st.st_size
    return n, size


def bench(work: Path, port: int, storage: Path, layout: Path, runs: int) -> None:
    dirge = dirge_exe()
    ref = f"127.0.0.1:{port}/{BIG_REPO}:1"
    digests, layers = image_digests(layout, TAG)
    files = storage_files(storage, BIG_REPO, digests)
    base = f"http://127.0.0.1:{port}/v2/{BIG_REPO}/blobs/"
    tools = [[dirge, "--help"], [sys.executable, "-c", "import dirge, dirge.cli, dirge.sources.registry, httpx"],
             ["skopeo", "--version"], ["umoci", "--version"], ["curl", "--version"], ["tar", "--version"],
             ["bash", "-c", "true"]]
    p = {k: work / f"pull-{k}" for k in ("cache", "dest-dirge", "tmplayout", "bundle", "dest-curl")}
    rss_file = work / "time-v.txt"

    def t(cmd: list[str]) -> tuple[float, float, int]:
        return timed(cmd, rss_file)

    def run_dirge() -> tuple[float, float, int]:
        return t([dirge, "unpack", ref, str(p["dest-dirge"]), "--cache-dir", str(p["cache"])])

    def run_dirge_pull() -> tuple[float, float, int]:
        return t([dirge, "pull", ref, "--cache-dir", str(p["cache"])])

    def run_umoci() -> tuple[float, float, int]:
        s1, c1, r1 = t(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                        f"oci:{p['tmplayout']}:x"])
        s2, c2, r2 = t(["umoci", "unpack", "--image", f"{p['tmplayout']}:x", str(p["bundle"])])
        return s1 + s2, c1 + c2, max(r1, r2)

    def run_curl() -> tuple[float, float, int]:
        script = ('set -eo pipefail; mkdir -p "$1"; dest=$1; base=$2; shift 2; for d in "$@"; do '
                  'curl -sS --fail "$base$d" | tar --numeric-owner -xzf - -C "$dest"; done')
        return t(["bash", "-c", script, "bash", str(p["dest-curl"]), base, *layers])

    cmds = {
        "dirge unpack": (run_dirge, [p["cache"], p["dest-dirge"]], p["dest-dirge"]),
        "skopeo copy + umoci unpack": (run_umoci, [p["tmplayout"], p["bundle"]], p["bundle"] / "rootfs"),
        "curl | tar -xzf": (run_curl, [p["dest-curl"]], p["dest-curl"]),
        "dirge pull (info)": (run_dirge_pull, [p["cache"]], None),
    }
    log(f"\n{ref}: layers {', '.join(d[7:19] for d in layers)}")
    log("before each run (untimed): rm -rf cache/dest; sync; drop caches; "
        f"re-read {sum(f.stat().st_size for f in files) / 1e6:.0f} MB of registry storage + tools")
    times = {k: [] for k in cmds}
    cpu = {k: [] for k in cmds}
    rss = {k: [] for k in cmds}
    for path in p.values():
        clear(path)
    for i in range(runs):
        for name, (fn, dirty, tree) in cmds.items():
            for path in dirty:
                clear(path)
            drop_caches()
            warm(files, tools)
            secs, cpus, kib = fn()
            times[name].append(secs)
            cpu[name].append(cpus)
            rss[name].append(kib or 0)
            extra = ""
            if i == 0 and tree is not None:  # sanity check: every tool wrote the same tree
                n, size = tree_size(tree)
                extra = f"  [{n:,} entries, {size / 1e6:.0f} MB]"
            log(f"  run {i + 1}/{runs}  {name:<27} {secs:7.2f} s  cpu {cpus:6.2f} s  "
                f"peak RSS {kib / 1024 if kib else 0:6.1f} MiB{extra}")
            for path in dirty:
                clear(path)

    med = {k: statistics.median(v) for k, v in times.items()}
    d, u, c = med["dirge unpack"], med["skopeo copy + umoci unpack"], med["curl | tar -xzf"]
    log(f"\nresults: median of {runs} runs, registry on 127.0.0.1, cache and destinations on {work}")
    log(f"  {'tool':<28} {'median s':>9} {'min s':>8} {'max s':>8} {'cpu s (med)':>12} {'peak RSS MiB':>13}")
    for k, v in times.items():
        log(f"  {k:<28} {med[k]:9.2f} {min(v):8.2f} {max(v):8.2f} {statistics.median(cpu[k]):12.2f} "
            f"{max(rss[k]) / 1024:13.1f}")
    log(f"  dirge / (skopeo + umoci) = {d / u:.3f}  target <= {TARGET_UMOCI}: "
        f"{'HOLDS' if d <= TARGET_UMOCI * u else 'DOES NOT HOLD'}")
    log(f"  dirge / (curl | tar)     = {d / c:.3f}  target <= {TARGET_CURL}: "
        f"{'HOLDS' if d <= TARGET_CURL * c else 'DOES NOT HOLD'}")
    pairs = [f"{a / b:.2f}" for a, b in zip(times["dirge unpack"], times["curl | tar -xzf"])]
    log(f"  per-run dirge / (curl | tar): {', '.join(pairs)}")
    rss_file.unlink(missing_ok=True)
    rss_file.with_suffix(".stderr").unlink(missing_ok=True)


def memory(work: Path, port: int, storage: Path, layout: Path) -> None:
    dirge = dirge_exe()
    ref = f"127.0.0.1:{port}/{HUGE_REPO}:1"
    digests, _ = image_digests(layout, HUGE_TAG)
    files = storage_files(storage, HUGE_REPO, digests)
    cache, dest = work / "huge-cache", work / "huge-dest"
    rss_file = work / "time-v.txt"
    log(f"\npeak memory, {ref} (one 1 GiB layer), fresh cache each, /usr/bin/time -v:")
    results = {}
    try:
        for name, cmd in (("dirge pull", [dirge, "pull", ref, "--cache-dir", str(cache)]),
                          ("dirge unpack", [dirge, "unpack", ref, str(dest), "--cache-dir", str(cache)])):
            clear(cache)
            clear(dest)
            drop_caches()
            warm(files, [[dirge, "--help"]])
            secs, cpus, kib = timed(cmd, rss_file)
            results[name] = kib / 1024
            extra = ""
            if name == "dirge unpack":
                n, size = tree_size(dest)
                extra = f"  [{n} entries, {size / 2**20:.0f} MiB written]"
            log(f"  {' '.join(Path(cmd[0]).name if i == 0 else a for i, a in enumerate(cmd))}")
            log(f"    {secs:6.2f} s  cpu {cpus:6.2f} s  peak RSS {kib / 1024:6.1f} MiB{extra}")
    finally:
        clear(cache)
        clear(dest)
        rss_file.unlink(missing_ok=True)
        rss_file.with_suffix(".stderr").unlink(missing_ok=True)
    for name, mib in results.items():
        log(f"  {name:<13} peak RSS {mib:6.1f} MiB  target <= {TARGET_RSS_MIB} MiB: "
            f"{'HOLDS' if mib <= TARGET_RSS_MIB else 'DOES NOT HOLD'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if os.geteuid() != 0:
        raise SystemExit("run as root (umoci unpack, dropping caches, owners)")
    for tool in ("skopeo", "umoci", "curl", "tar", "gzip"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found")
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the registry is always stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    no_proxy_for_loopback()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layout, _ = build_image(work)
    huge = build_huge(work)
    with registry(work) as (port, storage):
        push(layout, TAG, port, BIG_REPO)
        push(huge, HUGE_TAG, port, HUGE_REPO)
        bench(work, port, storage, layout, args.runs)
        memory(work, port, storage, huge)
    clear(work / "registry" / "storage")  # 1.3 GB; the config and registry.log stay for inspection
    log(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
