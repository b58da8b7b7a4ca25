"""Does file creation scale across processes, or across threads of one process, on this filesystem?

Each worker creates files (8 KB each, written, then utime'd, in directories of 100: what DirSink does for
most files) after a `sync` and a cache drop. Modes, interleaved within each run:

- ``process``: N files in one process, then N/2 in each of two processes at once (separate trees);
- ``thread``: N files from 1 thread, then from K threads of one process (``--threads``, default 2 and 4),
  either each thread in its own directories (``split``) or all threads filling the same directories
  (``same``: file i of a directory goes to thread i % K, as a sink's pool without per-directory affinity
  would). Every syscall releases the GIL, so only the kernel (and the GIL hand-offs) can serialise them.

Prints each run's wall times (the variants' order rotates from run to run), then min / median per mode. A ratio near
1/K would make a parallel applier worth building; near or above 1, file creation itself is the floor.

Usage: .venv/bin/python bench/create_scaling.py [--workdir DIR] [--files N] [--runs R]
                                               [--modes process,thread] [--threads 2,4]   (root: drops caches)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One process: makes its directories (in the timed part: a sink makes them too), then creates files from
# `threads` threads. Prints its own wall time (interpreter start-up excluded) and user + sys CPU seconds.
WORKER = r"""
import os, resource, sys, threading, time
root, n, threads, layout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = b"x" * 8000
FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
start = time.perf_counter()
os.makedirs(root)
top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
if layout == "split":  # thread t: its own subtree, files t*per .. (t+1)*per-1, directories of 100
    per = n // threads
    def dirs_of(t):
        os.mkdir(f"t{t}", dir_fd=top)
        sub = os.open(f"t{t}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
        out = []
        for d in range((per + 99) // 100):
            os.mkdir(f"s{d}", dir_fd=sub)
            out.append(os.open(f"s{d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=sub))
        return out
    fds = [dirs_of(t) for t in range(threads)]
    jobs = [[(fds[t][i // 100], f"f{i}") for i in range(per)] for t in range(threads)]
else:  # same: the directories are shared, file i goes to thread i % threads
    dfds = []
    for d in range((n + 99) // 100):
        os.mkdir(f"s{d}", dir_fd=top)
        dfds.append(os.open(f"s{d}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top))
    jobs = [[(dfds[i // 100], f"f{i}") for i in range(t, n, threads)] for t in range(threads)]

def work(items):
    for dfd, name in items:
        fd = os.open(name, FLAGS, 0o644, dir_fd=dfd)
        os.write(fd, data)
        os.utime(fd, ns=(0, 0))
        os.close(fd)

if threads == 1:
    work(jobs[0])
else:
    pool = [threading.Thread(target=work, args=(j,)) for j in jobs]
    for t in pool: t.start()
    for t in pool: t.join()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"{time.perf_counter() - start:.4f} {ru.ru_utime + ru.ru_stime:.4f}")
"""


def settle(work: Path, drop: bool) -> None:
    for child in work.iterdir():
        shutil.rmtree(child)
    subprocess.run(["sync"], check=True)
    if drop:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(procs: list[list[str]]) -> tuple[float, float]:
    """Wall time of the slowest worker (its own clock) and the CPU seconds of all of them."""
    running = [subprocess.Popen(p, stdout=subprocess.PIPE, text=True) for p in procs]
    outs = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise SystemExit("a worker failed")
    pairs = [tuple(map(float, o.split())) for o in outs]
    return max(w for w, _ in pairs), sum(c for _, c in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"),
                        help="the trees are made in a fresh temporary directory under it, removed at exit")
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--modes", default="process,thread", help="comma-separated: process, thread")
    parser.add_argument("--threads", default="2,4", help="thread counts to compare with 1 thread")
    parser.add_argument("--no-drop-caches", action="store_true", help="(tmpfs: nothing to drop)")
    args = parser.parse_args()
    if os.geteuid() != 0 and not args.no_drop_caches:
        raise SystemExit("root only (drops the kernel caches between runs)")
    modes = args.modes.split(",")
    counts = [int(k) for k in args.threads.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Only ever delete what this run made: a directory of its own, never WORKDIR's other contents.
    work = Path(tempfile.mkdtemp(prefix="create-scaling.", dir=args.workdir))
    n = args.files
    variants: list[tuple[str, list[tuple[str, int, str]]]] = [("1 thread", [("one", 1, "same")])]
    if "process" in modes:
        variants.append(("2 processes", [("p0", 1, "same"), ("p1", 1, "same")]))
    if "thread" in modes:
        for k in counts:
            variants.append((f"{k} threads, split dirs", [("ts", k, "split")]))
            variants.append((f"{k} threads, same dirs", [("tm", k, "same")]))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in variants}
    try:
        for run in range(1, args.runs + 1):
            line = []
            # The order rotates from run to run: no variant always runs first after the previous run's rm.
            shift = (run - 1) % len(variants)
            for name, workers in variants[shift:] + variants[:shift]:
                settle(work, not args.no_drop_caches)
                share = n // len(workers)
                wall, cpu = timed([[sys.executable, "-c", WORKER, str(work / sub), str(share), str(k), layout]
                                   for sub, k, layout in workers])
                results[name].append((wall, cpu))
                line.append(f"{name} {wall:.2f} s")
            print(f"run {run}: " + "; ".join(line), flush=True)
        base = statistics.median(w for w, _ in results["1 thread"])
        print(f"\n{n} files, {args.runs} runs, interleaved; workdir {args.workdir}")
        print(f"{'variant':28} {'min s':>7} {'median s':>9} {'cpu s (median)':>15} {'ratio (median)':>15}")
        for name, _ in variants:
            walls = [w for w, _ in results[name]]
            med = statistics.median(walls)
            cpu = statistics.median(c for _, c in results[name])
            print(f"{name:28} {min(walls):7.2f} {med:9.2f} {cpu:15.2f} {med / base:15.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
