"""The command line's conventions (issue 20, point 2): --version, -h everywhere, the shared options before
or after the subcommand, a bad --platform as a usage error, sessions named by what `session create`
printed, ls/list aliases, table headers, -q listings and --json on every reporting command. Checked in
process (click's CliRunner) and through the installed console script."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dirge.cli import cli
from dirge.layerbuild import LayerBuilder

DIRGE = str(Path(sys.executable).parent / "dirge")
SRC = str(Path(__file__).resolve().parent.parent / "src")
VERSION = importlib.metadata.version("dirge")
BAD_PLATFORMS = ("windows", "linux/", "a/b/c/d")
# Commands that report nothing a script would parse: demo and boot stream a console; the groups only group.
NO_JSON = {("demo",), ("boot",)}


def script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed console script, running this tree's code."""
    full = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run([DIRGE, *args], capture_output=True, text=True, env=full)


def invoke(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


ALL = list(commands())
WITH_PLATFORM = [p for p, c in ALL if any("--platform" in param.opts for param in c.params)]


def options(command: click.Command) -> set[str]:
    return {name for param in command.params for name in param.opts}


def test_version_in_process_and_from_the_script() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"dirge {VERSION}\n"
    proc = script("--version")
    assert proc.returncode == 0 and proc.stdout == f"dirge {VERSION}\n", proc.stderr


@pytest.mark.parametrize("path", [()] + [p for p, _ in ALL], ids=lambda p: " ".join(p) or "dirge")
def test_dash_h_is_help_everywhere(path: tuple[str, ...]) -> None:
    short, long = invoke(*path, "-h"), invoke(*path, "--help")
    assert short.exit_code == 0 and short.output.startswith("Usage: ")
    assert short.output == long.output and "-h, --help" in short.output


def test_dash_h_from_the_script() -> None:
    proc = script("session", "snapshot", "-h")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: dirge session snapshot"), proc.stderr


def test_every_command_takes_the_shared_options_and_reports_json() -> None:
    assert len(ALL) > 20
    for path, command in ALL:
        opts = options(command)
        assert {"--debug", "--quiet", "-q"} <= opts, path
        assert ("--cache-dir" in opts) != (path == ("demo",)), path  # demo keeps its cache in --dir
        if not isinstance(command, click.Group) and path not in NO_JSON:
            assert "--json" in opts, f"{' '.join(path)} has no --json"


def test_debug_after_the_subcommand_and_from_the_environment(tmp_path: Path) -> None:
    args = ["unpack", "oci:/nonexistent/layout", str(tmp_path / "d")]
    plain = script(*args)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and "not an OCI image layout" in plain.stderr
    for proc in (script(*args, "--debug"), script("--debug", *args), script(*args, env={"DIRGE_DEBUG": "1"})):
        assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", WITH_PLATFORM, ids=" ".join)
@pytest.mark.parametrize("bad", BAD_PLATFORMS)
def test_bad_platform_is_a_usage_error(path: tuple[str, ...], bad: str, tmp_path: Path) -> None:
    positional = {"unpack": ["oci:x", str(tmp_path / "d")], "export": ["oci:x", str(tmp_path / "o")]}
    args = [*path, *positional.get(path[-1], ["oci:x"]), "--platform", bad]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--platform'" in result.output and repr(bad) in result.output
    assert "invalid image reference" not in result.output


def test_bad_platform_from_the_script(tmp_path: Path) -> None:
    proc = script("unpack", "--platform", "windows", "oci:x", str(tmp_path / "d"))
    assert proc.returncode == 2 and "'--platform'" in proc.stderr and "os/arch[/variant]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()


@pytest.fixture
def session(tmp_path: Path, make_image) -> tuple[Path, str, str]:
    """A cache with one copy session of a small image: (cache dir, image ref, the path create printed)."""
    ref = make_image([LayerBuilder().dir("etc").file("etc/hostname", b"vm\n").build()])
    cache = tmp_path / "cache"
    result = invoke("session", "create", ref, "--strategy", "copy", "--base-format", "tree", "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    yield cache, ref, result.output.strip()
    invoke("session", "rm", "--all", "--cache-dir", str(cache))


def test_cache_dir_before_or_after_the_subcommand(session: tuple[Path, str, str], tmp_path: Path) -> None:
    cache, _, path = session
    sid = Path(path).parent.name
    other = str(tmp_path / "other")
    for args, env in ((["--cache-dir", str(cache), "session", "ls", "-q"], None),
                      (["session", "ls", "-q", "--cache-dir", str(cache)], None),
                      (["session", "--cache-dir", str(cache), "ls", "-q"], None),
                      (["-q", "session", "ls"], {"DIRGE_CACHE_DIR": str(cache)}),
                      (["--cache-dir", other, "session", "ls", "--cache-dir", str(cache), "-q"], None)):  # later wins
        result = invoke(*args, env=env)
        assert result.exit_code == 0 and result.output == f"{sid}\n", (args, result.output)
    for args, env in ((["--cache-dir", str(cache), "session", "ls", "-q", "--cache-dir", other], None),
                      (["--cache-dir", other, "session", "ls", "-q"], {"DIRGE_CACHE_DIR": str(cache)})):
        result = invoke(*args, env=env)
        assert result.exit_code == 0 and result.output == "", (args, result.output)
    proc = script("session", "list", "--quiet", "--cache-dir", str(cache))
    assert proc.returncode == 0 and proc.stdout == f"{sid}\n", proc.stderr


def test_sessions_by_the_path_create_printed(session: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, ref, path = session
    sid = Path(path).parent.name
    assert Path(path, "etc/hostname").read_text() == "vm\n"
    c = ["--cache-dir", str(cache)]
    saved = invoke("session", "snapshot", "save", path, "snap", "--json", *c)
    assert saved.exit_code == 0, saved.output
    record = json.loads(saved.output)
    assert record["session"] == sid and record["name"] == "snap" and Path(record["path"]).is_dir()
    # ls and list both work, with a header row; -q prints names only.
    for name in ("ls", "list"):
        table = invoke("session", "snapshot", name, *c).output.splitlines()
        assert table[0].split() == ["NAME", "KIND", "IMAGE", "SESSION"] and table[1].split()[0] == "snap"
        assert invoke("session", "snapshot", name, "-q", *c).output == "snap\n"
        table = invoke("session", name, *c).output.splitlines()
        assert table[0].split() == ["ID", "STRATEGY", "OWNER", "IMAGE", "PATH"] and table[1].startswith(sid)
    help_text = invoke("session", "-h").output
    assert "  ls " in help_text and "  list " not in help_text
    monkeypatch.chdir(Path(path).parent)  # a relative path to the rootfs names it too
    removed = invoke("session", "rm", "rootfs", "--json", *c)
    assert removed.exit_code == 0 and json.loads(removed.output) == [sid]
    assert invoke("session", "ls", "-q", *c).output == ""
    deleted = invoke("session", "snapshot", "delete", "snap", "--json", *c)
    assert deleted.exit_code == 0 and json.loads(deleted.output)["name"] == "snap"


def test_rm_of_a_path_outside_the_sessions_is_one_clear_error(session: tuple[Path, str, str], tmp_path: Path) -> None:
    cache, _, path = session
    proc = script("session", "rm", str(tmp_path), "--cache-dir", str(cache))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "neither a session ID" in proc.stderr and "dirge session ls" in proc.stderr
    assert Path(path).is_dir()
    proc = script("session", "rm", str(Path(path).parent), "--cache-dir", str(cache))  # its directory
    assert proc.returncode == 0, proc.stderr
    assert not Path(path).parent.exists()


def test_images_table_quiet_and_rmi_json(session: tuple[Path, str, str]) -> None:
    cache, ref, path = session
    c = ["--cache-dir", str(cache)]
    table = invoke("images", *c).output.splitlines()
    assert table[0].split() == ["DIGEST", "FORMATS", "SIZE", "SHARED", "PLATFORM", "CREATED", "LAST", "USED",
                                "LIVE", "REFS"]
    assert len(table) == 2 and table[1].endswith(ref)
    assert invoke("-q", "images", *c).output == f"{ref}\n" == invoke("images", "-q", *c).output
    invoke("session", "rm", path, *c)
    result = invoke("rmi", ref, "--json", *c)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["refs"] and len(report["images"]) == 1 and report["images"][0].startswith("sha256:")
    assert invoke("images", "-q", *c).output == ""


def test_gc_and_verify_tables_have_headers(tmp_path: Path, make_image) -> None:
    ref = make_image([LayerBuilder().dir("etc").file("etc/hostname", b"gc\n").build()])
    cache = tmp_path / "cache"
    child = subprocess.Popen(["true"])
    child.wait()  # a pid that has exited: its session is dead
    created = invoke("session", "create", ref, "--strategy", "copy", "--base-format", "tree",
                     "--owner-pid", str(child.pid), "--json", "--cache-dir", str(cache))
    assert created.exit_code == 0, created.output
    sid = json.loads(created.output)["id"]
    lines = invoke("gc", "--dry-run", "--cache-dir", str(cache)).output.splitlines()
    assert lines[0].split() == ["ACTION", "KIND", "NAME", "SIZE"]
    assert any(line.split()[:4] == ["would", "remove", "session", sid] for line in lines[1:])
    [base] = (cache / "bases").iterdir()
    (base / "rootfs" / "etc" / "hostname").write_bytes(b"damaged\n")
    proc = script("cache", "verify", "--cache-dir", str(cache))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0].split() == ["PROBLEM", "KIND", "NAME", "DETAIL"], proc.stderr
    assert any(base.name in line and "etc/hostname" in line for line in lines[1:]), proc.stdout
    invoke("session", "rm", "--all", "--cache-dir", str(cache))


def test_disk_sessions_by_the_disk_create_printed(tmp_path: Path, make_image) -> None:
    """A disk session's printed path is its disk: its own ext4 file names it; an erofs session's disk is
    the shared base image, which names a session only while one session alone uses it."""
    ref = make_image([LayerBuilder().dir("etc").file("etc/hostname", b"disk\n").build()])
    c = ["--cache-dir", str(tmp_path / "cache")]
    try:
        ext4 = invoke("session", "create", ref, "--disk", "ext4", *c)
        assert ext4.exit_code == 0 and Path(ext4.output.strip()).is_file(), ext4.output
        sid = Path(ext4.output.strip()).parent.name
        assert json.loads(invoke("session", "rm", ext4.output.strip(), "--json", *c).output) == [sid]
        first, second = (invoke("session", "create", ref, "--disk", "erofs", "--json", *c) for _ in range(2))
        one, two = json.loads(first.output), json.loads(second.output)
        assert one["disk"] == two["disk"] and one["id"] != two["id"]
        proc = script("session", "rm", one["disk"], *c)
        assert proc.returncode == 1 and "2 sessions share this disk" in proc.stderr and one["id"] in proc.stderr
        assert json.loads(invoke("session", "rm", two["id"], "--json", *c).output) == [two["id"]]
        assert json.loads(invoke("session", "rm", one["disk"], "--json", *c).output) == [one["id"]]
    finally:
        invoke("session", "rm", "--all", *c)
