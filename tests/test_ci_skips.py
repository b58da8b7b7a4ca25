"""CI=true turns every skip into a failure (tests/ci_skips.py), also a module skipped at collection and an
xfail; without it, a skip is a skip and an xfail an xfail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def run(tmp_path: Path, ci: str | None, files: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    files = files or {"test_sample.py": (
        "import pytest\n"
        "def test_runs():\n    assert True\n"
        "@pytest.mark.skipif(True, reason='needs a tool that is missing')\n"
        "def test_skipped():\n    assert True\n"
        "def test_skips_inside():\n    pytest.skip('needs root')\n"
        "@pytest.mark.xfail(reason='known', strict=True)\n"
        "def test_xfail():\n    assert False\n"
    )}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-q", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_skips_fail_under_ci(tmp_path: Path) -> None:
    proc = run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "2 failed, 1 passed, 1 error" in proc.stdout, proc.stdout  # skipif fails at setup
    assert "skipped under CI=true, where every test must run: needs a tool that is missing" in proc.stdout
    assert "needs root" in proc.stdout
    assert "xfailed under CI=true, where a known failure is a failure: known" in proc.stdout


def test_skips_stay_skips_elsewhere(tmp_path: Path) -> None:
    proc = run(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in proc.stdout, proc.stdout


MODULE_SKIPS = {
    "test_importorskip.py": "import pytest\nnothing = pytest.importorskip('no_such_module_dirge')\n"
                            "def test_a():\n    assert True\n",
    "test_module_skip.py": "import pytest\npytest.skip('no tool here', allow_module_level=True)\n"
                           "def test_b():\n    assert True\n",
    "test_fine.py": "def test_c():\n    assert True\n",
}


def test_a_module_skipped_at_collection_fails_under_ci(tmp_path: Path) -> None:
    proc = run(tmp_path, "true", MODULE_SKIPS)
    assert proc.returncode != 0, proc.stdout
    assert "Interrupted: 2 errors during collection" in proc.stdout, proc.stdout  # like an import error
    assert "module skipped under CI=true, where every test must run: could not import 'no_such_module_dirge'" \
        in proc.stdout, proc.stdout
    assert "module skipped under CI=true, where every test must run: no tool here" in proc.stdout, proc.stdout


def test_a_module_skipped_at_collection_is_a_skip_elsewhere(tmp_path: Path) -> None:
    proc = run(tmp_path, None, MODULE_SKIPS)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout, proc.stdout


XFAILS = {
    "test_xf.py": "import pytest\n"
                  "def test_imperative():\n    pytest.xfail('known bug 1')\n"
                  "@pytest.mark.xfail(reason='known bug 2', strict=False)\n"
                  "def test_passes_anyway():\n    assert True\n"
                  "@pytest.mark.xfail(reason='known bug 3')\n"
                  "def test_strict_by_default():\n    assert True\n",
    "pytest.ini": "[pytest]\nxfail_strict = true\n",
}


def test_an_xfail_never_passes_silently_under_ci(tmp_path: Path) -> None:
    proc = run(tmp_path, "true", XFAILS)
    assert proc.returncode == 1, proc.stdout
    assert "3 failed" in proc.stdout and "xfailed" not in proc.stdout.splitlines()[-1], proc.stdout
    assert "xfailed under CI=true, where a known failure is a failure: known bug 1" in proc.stdout
    assert "xpassed under CI=true, where an xfail marker must go once the test passes: known bug 2" in proc.stdout
    assert "[XPASS(strict)] known bug 3" in proc.stdout, proc.stdout


def test_xfail_strict_elsewhere(tmp_path: Path) -> None:
    proc = run(tmp_path, None, XFAILS)
    assert proc.returncode == 1, proc.stdout  # xfail_strict: an xfail that passes fails, CI or not
    assert "1 failed, 1 xfailed, 1 xpassed" in proc.stdout, proc.stdout


def test_the_project_sets_xfail_strict() -> None:
    import tomllib

    ini = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["xfail_strict"] is True
