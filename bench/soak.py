#!/usr/bin/env python3
"""Concurrency soak: N dirge processes on one shared cache against a fault-injecting loopback registry.

Usage: .venv/bin/python bench/soak.py [--minutes M] [--procs N] [--seed S]

Starts Debian's ``docker-registry`` on 127.0.0.1 with tests/registry.py's ``FaultProxy`` in front, pushes 4 small
images (a few hundred files of known content each), then runs N driver threads, each looping over ``dirge``
subprocesses picked at random until the deadline: ``session create IMG --json`` (+ content spot-check by sha256,
+ ``session rm``), ``pull``, ``gc --max-size`` (smaller than the 4 images), ``rmi IMG --force``. A background
thread queues faults (status 500/429, reset_mid_body, corrupt_body) a few times per second.

A failure is a non-zero exit whose stderr is not explained by an injected fault (a registry/network error while
faults fired during the command), or a session vanishing without an rmi running concurrently, or wrong content.
At the end ``dirge gc`` then ``dirge cache verify --json`` must be clean. Run as root (overlay mounts).
Exit status 1 if anything unexplained failed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from registry import FaultProxy, Registry, push_layout  # noqa: E402

from dirge.layerbuild import LayerBuilder  # noqa: E402
from dirge.sources.layout import LayoutWriter  # noqa: E402

DIRGE = str(Path(sys.executable).parent / "dirge")
IMAGES = 4
FILES = 300
FAULT_KINDS = ["status500", "status429", "reset_mid_body", "corrupt_body"]
# stderr that an injected fault may explain (registry/network/integrity errors)
FAULT_WORDS = ("registry", "500", "429", "reset", "connection", "digest", "mismatch", "retries", "too many",
               "incomplete", "peer", "http", "corrupt", "remote", "timed out", "manifest")
GONE_WORDS = ("no such session", "not found", "no session", "gone", "removed", "does not exist", "unknown session",
              "no such file")


def content(seed: int, image: int, index: int) -> bytes:
    rng = random.Random(f"{seed}/{image}/{index}")
    return f"image {image} file {index}\n".encode() + rng.randbytes(rng.randint(64, 2048))


def build_images(seed: int, work: Path, host: str) -> tuple[list[str], list[dict[str, str]]]:
    refs, expected = [], []
    for i in range(IMAGES):
        b = LayerBuilder().dir("data")
        exp: dict[str, str] = {}
        for j in range(FILES):
            sub = f"data/d{j % 10}"
            if j < 10:
                b.dir(sub)
            data = content(seed, i, j)
            b.file(f"{sub}/f{j:03d}", data)
            exp[f"{sub}/f{j:03d}"] = hashlib.sha256(data).hexdigest()
        layers = [b.build(), LayerBuilder().file("etc/soak-image", f"{i}\n".encode()).build()]
        exp["etc/soak-image"] = hashlib.sha256(f"{i}\n".encode()).hexdigest()
        layout = work / f"layout{i}"
        LayoutWriter(layout).add_image(layers, tag="t")
        push_layout(layout, "t", f"{host}/soak/img{i}:1")
        expected.append(exp)
    return refs, expected


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.cache = work / "cache"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ops: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.injected: collections.Counter[str] = collections.Counter()
        self.failures: list[tuple[str, str]] = []
        self.explained: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.rmi_active = 0
        self.rmi_epoch = 0  # bumped at every rmi start/end: a session op overlapping any rmi sees it change
        self.env = {k: v for k, v in os.environ.items() if k.lower() not in
                    ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        self.env.update(NO_PROXY="127.0.0.1", DIRGE_RETRY_BASE="0.01", DOCKER_CONFIG=str(work / "no-docker"),
                        DIRGE_REGISTRIES_CONFIG=str(work / "no-registries.toml"))
        self.env.pop("REGISTRY_AUTH_FILE", None)
        self.env.pop("XDG_RUNTIME_DIR", None)
        self.procs: set[subprocess.Popen[str]] = set()

    def dirge(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [DIRGE, "-q", *argv, "--cache-dir", str(self.cache)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        with self.lock:
            self.procs.add(p)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err = f"TIMEOUT after {timeout}s\n{err}"
        finally:
            with self.lock:
                self.procs.discard(p)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)

    def fail(self, what: str, detail: str) -> None:
        lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
        first = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "(no stderr)")
        with self.lock:
            self.failures.append((what, first[:300]))
            self.outcomes[f"{what}: FAILURE"] += 1

    def note(self, what: str, outcome: str, stderr: str = "") -> None:
        with self.lock:
            self.outcomes[f"{what}: {outcome}"] += 1
            if stderr:
                lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
                line = re.sub(r"\b[0-9a-f]{32}\b", "<id>", lines[0] if lines else "")
                line = re.sub(r"sha256:[0-9a-f]{64}", "sha256:<hex>", line)
                self.explained[(what, outcome, line[:200])] += 1

    def fired(self) -> int:
        return len(self.proxy.faults_fired)

    def judge(self, what: str, r: subprocess.CompletedProcess[str], fired0: int, epoch0: int) -> bool:
        """True if it succeeded; else classifies the failure."""
        if r.returncode == 0:
            self.note(what, "ok")
            return True
        err = r.stderr.lower()
        if what in ("session create", "pull") and self.fired() > fired0 and any(w in err for w in FAULT_WORDS):
            self.note(what, "failed: injected fault", r.stderr)
        elif (self.rmi_epoch != epoch0 or self.rmi_active) and any(w in err for w in GONE_WORDS):
            self.note(what, "failed: removed by rmi", r.stderr)
        else:
            self.fail(what, r.stderr or r.stdout)
        return False

    # operations

    def op_session(self, rng: random.Random) -> None:
        i = rng.randrange(IMAGES)
        f0, e0 = self.fired(), self.rmi_epoch
        r = self.dirge("session", "create", self.refs[i], "--json")
        if not self.judge("session create", r, f0, e0):
            return
        info = json.loads(r.stdout)
        sid, root = info["id"], Path(info["path"])
        exp = self.expected[i]
        for name in rng.sample(sorted(exp), 5) + ["etc/soak-image"]:
            try:
                got = hashlib.sha256((root / name).read_bytes()).hexdigest()
            except OSError as exc:
                if self.rmi_epoch != e0 or self.rmi_active:
                    self.note("session check", "vanished: removed by rmi")
                else:
                    self.fail("session check", f"{sid} {name}: {exc}")
                return
            if got != exp[name]:
                self.fail("session check", f"WRONG CONTENT {sid} image {i} {name}: {got} != {exp[name]}")
                return
        self.note("session check", "ok")
        time.sleep(rng.random() * 0.5)
        r = self.dirge("session", "rm", sid)
        self.judge("session rm", r, f0, e0)

    def op_pull(self, rng: random.Random) -> None:
        f0, e0 = self.fired(), self.rmi_epoch
        self.judge("pull", self.dirge("pull", self.refs[rng.randrange(IMAGES)]), f0, e0)

    def op_gc(self, rng: random.Random) -> None:
        f0, e0 = self.fired(), self.rmi_epoch
        self.judge("gc --max-size", self.dirge("gc", "--max-size", self.max_size), f0, e0)

    def op_rmi(self, rng: random.Random) -> None:
        with self.lock:
            self.rmi_active += 1
            self.rmi_epoch += 1
        try:
            f0, e0 = self.fired(), self.rmi_epoch
            r = self.dirge("rmi", self.refs[rng.randrange(IMAGES)], "--force")
            if r.returncode != 0 and "no such image in the cache" in r.stderr:
                self.note("rmi --force", "not cached", r.stderr)
            elif r.returncode != 0 and "is in use by a running prepare; retry" in r.stderr:
                # gc.rmi's documented refusal while another process prepares that base (sessions and refs
                # are already gone by then)
                self.note("rmi --force", "refused: base busy (prepare)", r.stderr)
            else:
                self.judge("rmi --force", r, f0, e0)
        finally:
            with self.lock:
                self.rmi_active -= 1
                self.rmi_epoch += 1

    def worker(self, n: int) -> None:
        rng = random.Random(f"{self.args.seed}/worker{n}")
        ops = [(self.op_session, 50), (self.op_pull, 20), (self.op_gc, 10), (self.op_rmi, 5)]
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
            with self.lock:
                self.ops[op.__name__[3:]] += 1
            try:
                op(rng)
            except Exception as exc:  # a bug in the soak itself must not end silently
                self.fail(op.__name__, f"soak exception {type(exc).__name__}: {exc}")

    def injector(self) -> None:
        rng = random.Random(f"{self.args.seed}/faults")
        while not self.stop.wait(rng.uniform(0.15, 0.5)):
            with self.proxy._lock:
                pending = len(self.proxy._faults)
            if pending >= 6:
                continue
            kind = rng.choice(FAULT_KINDS)
            path = rng.choice([r"/blobs/sha256:", r"/manifests/", r"/v2/soak/"])
            times = rng.randint(1, 3)
            if kind == "status500":
                self.proxy.fail(path, "status", times, status=500)
            elif kind == "status429":
                self.proxy.fail(path, "status", times, status=429)
            else:
                self.proxy.fail(path, kind, times)
            with self.lock:
                self.injected[kind] += times

    def run(self) -> int:
        args = self.args
        self.registry = Registry(self.work / "registry").start()
        self.proxy = FaultProxy(self.registry.url).start()
        t0 = time.monotonic()
        _, self.expected = build_images(args.seed, self.work, self.registry.host)
        self.refs = [f"{self.proxy.host}/soak/img{i}:1" for i in range(IMAGES)]
        print(f"pushed {IMAGES} images in {time.monotonic() - t0:.1f}s; registry {self.registry.url}, "
              f"proxy {self.proxy.url}; cache {self.cache}", flush=True)
        # size of one image's base, to pick a --max-size below the 4 images
        r = self.dirge("session", "create", self.refs[0], "--json")
        if r.returncode != 0:
            print(f"initial session create failed:\n{r.stderr}", file=sys.stderr)
            return 2
        self.dirge("session", "rm", json.loads(r.stdout)["id"])
        one = sum(p.stat().st_size for p in self.cache.rglob("*") if p.is_file() and not p.is_symlink())
        self.max_size = str(max(one * 2, 1 << 20))
        print(f"cache after one image: {one} bytes; gc --max-size {self.max_size}", flush=True)

        self.deadline = time.monotonic() + args.minutes * 60
        threads = [threading.Thread(target=self.worker, args=(n,), daemon=True) for n in range(args.procs)]
        inj = threading.Thread(target=self.injector, daemon=True)
        inj.start()
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(1)
        self.stop.set()
        inj.join(2)
        self.proxy.clear_faults()
        fired = collections.Counter(k for _, _, k in self.proxy.faults_fired)

        final_ok = True
        rm = self.dirge("session", "rm", "--all")
        gc = self.dirge("gc")
        ver = self.dirge("cache", "verify", "--json")
        for name, r in (("final session rm --all", rm), ("final gc", gc), ("final cache verify", ver)):
            if r.returncode != 0:
                final_ok = False
                self.fail(name, r.stderr or r.stdout)
        try:
            report = json.loads(ver.stdout)
            if not report.get("ok") or report.get("problems"):
                final_ok = False
                self.fail("final cache verify", json.dumps(report.get("problems")))
        except ValueError:
            final_ok = False

        print(f"\n== soak: {args.minutes} min, {args.procs} procs, seed {args.seed}")
        print(f"{'operation':<16}{'count':>8}")
        for k, v in sorted(self.ops.items()):
            print(f"{k:<16}{v:>8}")
        print(f"\n{'outcome':<44}{'count':>8}")
        for k, v in sorted(self.outcomes.items()):
            print(f"{k:<44}{v:>8}")
        print(f"\n{'fault kind':<20}{'queued':>8}{'fired':>8}")
        fired_by = collections.Counter()
        for k, v in fired.items():
            fired_by[k] += v
        for k in FAULT_KINDS:
            fk = "status" if k.startswith("status") else k
            print(f"{k:<20}{self.injected[k]:>8}{'' if k.startswith('status') else fired_by[fk]:>8}")
        print(f"{'status (500+429)':<20}{'':>8}{fired_by['status']:>8}")
        print(f"\nfinal: session rm --all rc={rm.returncode}, gc rc={gc.returncode}, "
              f"cache verify rc={ver.returncode} {ver.stdout.strip()[:400] if ver.returncode else 'ok'}")
        print("\nexpected failures (first stderr line):")
        for (what, outcome, line), n in self.explained.most_common(12):
            print(f"  {n:>4}x {what} [{outcome}]: {line}")
        print(f"\nunexplained failures: {len(self.failures)}")
        seen: collections.Counter[tuple[str, str]] = collections.Counter(self.failures)
        for (what, line), n in seen.most_common():
            print(f"  {n:>4}x {what}: {line}")
        return 0 if not self.failures and final_ok else 1

    def cleanup(self) -> None:
        self.stop.set()
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        for obj in (getattr(self, "proxy", None), getattr(self, "registry", None)):
            if obj is not None:
                try:
                    obj.stop()
                except Exception as exc:
                    print(f"cleanup: {exc}", file=sys.stderr)
        prefix = str(self.work)
        for _ in range(3):
            mounts = [ln.split()[1].encode().decode("unicode_escape") for ln in Path("/proc/mounts").read_text().splitlines()]
            ours = [m for m in mounts if m == prefix or m.startswith(prefix + "/")]
            if not ours:
                break
            for m in reversed(ours):
                subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--procs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dirge-soak-", dir="/var/tmp"))
    soak = Soak(args, work)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return soak.run()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        soak.cleanup()


if __name__ == "__main__":
    sys.exit(main())
