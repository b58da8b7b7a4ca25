"""CI=true turns every skip into a failure (tests/ci_skips.py); without it, a skip is a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_runs():\n    assert True\n"
        "@pytest.mark.skipif(True, reason='needs a tool that is missing')\n"
        "def test_skipped():\n    assert True\n"
        "def test_skips_inside():\n    pytest.skip('needs root')\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_xfail():\n    assert False\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_skips_fail_under_ci(tmp_path: Path) -> None:
    proc = run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 xfailed, 1 error" in proc.stdout, proc.stdout  # skipif fails at setup
    assert "skipped under CI=true, where every test must run: needs a tool that is missing" in proc.stdout
    assert "needs root" in proc.stdout


def test_skips_stay_skips_elsewhere(tmp_path: Path) -> None:
    proc = run(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in proc.stdout, proc.stdout
