"""What `pip install` and a new user see: the license, the metadata, the quick start, shell completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "License :: OSI Approved :: Apache Software License" in project["classifiers"]


def test_metadata_is_complete() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    minor = {c.rsplit(" ", 1)[-1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    assert "3.11" in minor
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(project["urls"])
    assert "Typing :: Typed" in project["classifiers"] and (ROOT / "src" / "dirge" / "py.typed").exists()


def test_quick_start_starts_with_the_clone_and_runs_the_ci_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].startswith("git clone ") and "cd dirge" in block[0]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in [line.split("#")[0].strip() for line in block]  # CI runs the README's test command
    assert re.search(r"amd64", readme.split("## Quick start", 1)[1].split("##", 1)[0])


def test_shell_completion_script_is_generated() -> None:
    env = dict(os.environ, _DIRGE_COMPLETE="bash_source", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", "from dirge.cli import main; main()"], env=env,
                          capture_output=True, text=True)
    assert "complete -o nosort -F _dirge_completion dirge" in proc.stdout, proc.stdout + proc.stderr
