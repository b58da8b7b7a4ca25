"""The command line: success output, one-line errors, exit codes, and the demo (README command 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root
from dirge.cli import main
from dirge.layerbuild import LayerBuilder

DIRGE = [str(Path(sys.executable).parent / "dirge")]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(DIRGE + list(args), capture_output=True, text=True)


def test_unpack_json(tmp_path: Path, make_image) -> None:
    ref = make_image([LayerBuilder().dir("etc").file("etc/hostname", b"vm\n").build()])
    proc = run("unpack", "--json", ref, str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["layers"] == 1 and summary["digest"].startswith("sha256:")
    assert (tmp_path / "out/etc/hostname").read_text() == "vm\n"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["unpack", "oci:/nonexistent/layout", "DEST"], "not an OCI image layout"),
        (["unpack", "ghcr.io/Bad/Name", "DEST"], "invalid image reference 'ghcr.io/Bad/Name'"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [a.replace("DEST", str(tmp_path / "d")) for a in args]
    proc = run(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dirge: error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = run("--debug", "unpack", "oci:/nonexistent/layout", str(tmp_path / "d"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_bad_limit_is_usage_error(tmp_path: Path, capsys) -> None:
    assert main(["unpack", "--limit", "max_things=3", "oci:x", str(tmp_path / "d")]) == 2
    assert "max_depth" in capsys.readouterr().err


def test_limit_option_applies(tmp_path: Path, make_image) -> None:
    ref = make_image([LayerBuilder().file("big", b"x" * 5000).build()])
    proc = run("unpack", "--limit", "max_file_bytes=100", ref, str(tmp_path / "d"))
    assert proc.returncode == 1 and "max_file_bytes (5000 > 100)" in proc.stderr
    assert not (tmp_path / "d").exists()


@needs_root
def test_demo(tmp_path: Path) -> None:
    """README command 1, run twice: the second run (idempotence) gives the same output."""
    outputs = []
    for _ in range(2):
        proc = run("demo", "--dir", str(tmp_path / "demo"))
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout.split("\n", 1)[1])
    assert outputs[0] == outputs[1]
    out = outputs[0]
    assert "hello from a dirge rootfs" in out
    assert "sandbox:x:1000:1000" in out
    assert "setuid: -rwsr-xr-x root" in out
    assert "hardlinks to busybox: 2" in out
    assert "layer 2 deleted /etc/old.conf" in out
    assert "opt/app after the opaque whiteout: v2.txt" in out
    assert os.stat(tmp_path / "demo/rootfs/home/sandbox").st_uid == 1000
