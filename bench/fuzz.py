#!/usr/bin/env python3
"""Run the properties of tests/test_fuzz.py for longer than CI does, with fresh random seeds.

Usage: .venv/bin/python bench/fuzz.py [--minutes N] [-k PROPERTY_SUBSTRING] [--shapes all|classic] [--log FILE]

The time is shared evenly by the properties; each runs in batches (pytest on tests/test_fuzz.py with the
``dirge-long`` Hypothesis profile: random seeds, no example database) whose size is chosen from the
measured rate so a batch fits its time slice. Prints, per property, the examples run and the failures; the
full pytest output of every failing batch (with Hypothesis' minimal example and ``@reproduce_failure`` blob)
goes to the log (default /var/tmp/dirge-fuzz.log). Run as root, with umoci, fsck.erofs and e2fsck installed,
as the tests need. Exit status 1 if any batch failed. ``--shapes classic`` leaves out the shapes added for
issue 18 (a directory and its own whiteout in one layer, opaque markers after their directory, owners of
2^32-1, nonzero size fields on entries without data); the default generates them too.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROPERTIES = [
    "test_random_stacks_tree_equals_umoci",
    "test_random_stacks_images_equal_tree",
    "test_mutated_tar_is_an_error_or_a_result",
    "test_mutated_json_is_an_error_or_the_same_result",
]
FIRST_BATCH = 50
STATS = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid")


def run_batch(prop: str, examples: int, log: Path, shapes: str) -> tuple[int, bool, float]:
    """(examples run in the generate phase, failed, seconds) for one pytest batch of ``prop``."""
    env = {**os.environ, "DIRGE_FUZZ_PROFILE": "dirge-long", "DIRGE_FUZZ_EXAMPLES": str(examples),
           "DIRGE_FUZZ_SHAPES": shapes}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
                           f"tests/test_fuzz.py::{prop}"], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    phases = STATS.findall(out)
    run = int(phases[0][0]) + int(phases[0][1]) if phases else 0  # the generate phase; shrinking is extra
    failed = proc.returncode != 0
    if failed:
        with open(log, "a") as f:
            f.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {prop} ({examples} examples) =====\n{out}\n")
    return run, failed, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("-k", dest="only", default="", help="run only the properties whose name contains this")
    parser.add_argument("--shapes", choices=["all", "classic"], default="all",
                        help="classic: without the issue-18 shapes (default: all)")
    parser.add_argument("--log", type=Path, default=Path("/var/tmp/dirge-fuzz.log"))
    args = parser.parse_args()
    props = [p for p in PROPERTIES if args.only in p]
    if not props:
        parser.error(f"no property matches {args.only!r}")
    deadline = time.monotonic() + args.minutes * 60
    totals = {p: {"examples": 0, "failures": 0, "batches": 0, "seconds": 0.0, "rate": 0.0} for p in props}
    while time.monotonic() < deadline:
        for prop in props:
            left = deadline - time.monotonic()
            if left < 5:
                break
            t = totals[prop]
            slice_s = min(left, 120.0, args.minutes * 60 / len(props))
            # ~2 s of pytest start-up per batch; never fewer than 10 examples
            examples = FIRST_BATCH if not t["rate"] else max(10, int(t["rate"] * max(slice_s - 3, 1)))
            run, failed, elapsed = run_batch(prop, examples, args.log, args.shapes)
            t["examples"] += run
            t["failures"] += int(failed)
            t["batches"] += 1
            t["seconds"] += elapsed
            if run:
                t["rate"] = run / max(elapsed - 2, 0.5)
            print(f"{prop}: batch of {examples}: {run} run, {'FAILED' if failed else 'ok'} in {elapsed:.0f} s",
                  flush=True)
    print()
    print(f"{'property':52} {'examples':>9} {'batches':>8} {'failed':>7} {'ex/s':>6}")
    for prop, t in totals.items():
        rate = t["examples"] / t["seconds"] if t["seconds"] else 0.0
        print(f"{prop:52} {t['examples']:>9} {t['batches']:>8} {t['failures']:>7} {rate:>6.1f}")
    failures = sum(t["failures"] for t in totals.values())
    print(f"\nshapes: {args.shapes}; total examples: {sum(t['examples'] for t in totals.values())}, "
          f"failed batches: {failures}"
          + (f" (see {args.log})" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
