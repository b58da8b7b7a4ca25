"""The package ships py.typed: its annotations must hold under mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "dirge"


def test_mypy_strict_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--no-incremental",
                           str(SRC)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
