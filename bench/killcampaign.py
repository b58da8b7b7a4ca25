#!/usr/bin/env python3
"""kill -9 anywhere, at length: runs tests/test_kill9.py's campaign with more SIGKILLs than CI does.

Usage: .venv/bin/python bench/killcampaign.py [--kills N] [--seed S] [--log FILE]

Each kill hits one of ``pull``, ``session create`` (tree base, erofs base), ``export``, ``gc``, ``rmi``,
``session rm`` after a random delay within that operation's measured duration; then the next command
must succeed at once, ``dirge gc`` + ``cache verify`` be clean and no mount or loop device be left.
Prints the kills per operation, the measured durations and every failure (the full pytest output goes
to the log, default /var/tmp/dirge-killcampaign.log). Run as root (mounts, the loopback registry).
Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--log", type=Path, default=Path("/var/tmp/dirge-killcampaign.log"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dirge-kill-") as tmp:
        report_path = Path(tmp) / "report.json"
        env = {**os.environ, "DIRGE_KILLS": str(args.kills), "DIRGE_KILL_SEED": str(args.seed),
               "DIRGE_KILL_REPORT": str(report_path)}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_kill9.py::test_kill9_anywhere"], cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - start
        args.log.write_text(proc.stdout + proc.stderr)
        if not report_path.exists():
            print(f"no report (pytest exited {proc.returncode}); see {args.log}")
            print(proc.stdout[-2000:])
            return 1
        report = json.loads(report_path.read_text())
    kills = report["kills"]
    print(f"seed {report['seed']}: {sum(kills.values())} kills in {elapsed:.0f} s")
    print(f"{'operation':15} {'kills':>5} {'measured s':>10}")
    for op, n in kills.items():
        print(f"{op:15} {n:5} {report['durations'].get(op, 0.0):10.2f}")
    print(f"failures: {len(report['failures'])}")
    for failure in report["failures"]:
        print(f"  {failure}")
    notes = report.get("notes", [])
    print(f"notes (leftovers outside the cache, not failures): {len(notes)}")
    for note in notes[:10]:
        print(f"  {note}")
    if proc.returncode != 0 and not report["failures"]:
        print(f"pytest exited {proc.returncode}: see {args.log}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
