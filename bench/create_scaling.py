"""Does file creation scale across processes on this filesystem?

Creates N files (8 KB each, with utime, in directories of 100) in one process, then N/2 in each of two
processes at once (separate directory trees), after `sync` and a cache drop each time; prints the wall
times and their ratio. A ratio near 0.5 would make a multi-process applier worth building; near or
above 1, file creation itself is the floor.

Usage: .venv/bin/python bench/create_scaling.py [--workdir DIR] [--files N] [--runs R]   (root: drops caches)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import os, sys
root = sys.argv[1]; n = int(sys.argv[2])
os.makedirs(root)
top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
data = b"x" * 8000
for i in range(n):
    if i % 100 == 0:
        os.mkdir(f"s{i // 100}", dir_fd=top)
        sub = os.open(f"s{i // 100}", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
    fd = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=sub)
    os.write(fd, data)
    os.utime(fd, ns=(0, 0))
    os.close(fd)
"""


def settle(work: Path) -> None:
    for child in work.iterdir():
        shutil.rmtree(child)
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(procs: list[list[str]]) -> float:
    start = time.perf_counter()
    running = [subprocess.Popen(p) for p in procs]
    if any(p.wait() for p in running):
        raise SystemExit("a worker failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/dirge-bench"),
                        help="the trees are made in a fresh temporary directory under it, removed at exit")
    parser.add_argument("--files", type=int, default=40_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("root only (drops the kernel caches between runs)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Only ever delete what this run made: a directory of its own, never WORKDIR's other contents.
    work = Path(tempfile.mkdtemp(prefix="create-scaling.", dir=args.workdir))
    try:
        for run in range(1, args.runs + 1):
            settle(work)
            one = timed([[sys.executable, "-c", WORKER, str(work / "one"), str(args.files)]])
            settle(work)
            two = timed([[sys.executable, "-c", WORKER, str(work / f"two{i}"), str(args.files // 2)]
                         for i in range(2)])
            print(f"run {run}: 1 process × {args.files} files {one:.2f} s; "
                  f"2 processes × {args.files // 2} files {two:.2f} s; ratio {two / one:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
