"""Progress everywhere (issue 20, point 5): the events of dirge.events through the API (sync callback,
async stream), and the CLI's displays: plain lines on a pipe, one live rich display on a terminal
(util-linux ``script`` gives the command a pty), nothing with -q; boot phases from one real boot.

With ``DIRGE_RECORD_PROGRESS=FILE`` the pipe and terminal sessions are also written to FILE
(bench/record_progress.sh makes docs/progress-session.txt so)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_tool
from dirge import aio
from dirge.events import Apply, Boot, Build, Download, Event, Step, Write
from dirge.layerbuild import LayerBuilder
from dirge.progress import PlainProgress, TerminalProgress, line_events, resolve_mode
from dirge.rootfs import prepare
from dirge.sources.layout import LayoutWriter
from registry import push_layout
from test_boot import _boot_missing

DIRGE = Path(sys.executable).parent / "dirge"
RECORD = os.environ.get("DIRGE_RECORD_PROGRESS")
AUTO = {"DIRGE_PROGRESS": "auto"}  # the default (conftest.py quiets the rest of the suite)
SGR = re.compile(r"\x1b\[[0-9;]*m")  # colours: within a line
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def _layers() -> list[bytes]:
    """Three layers; the first big enough (4 MB, incompressible) to arrive in many chunks."""
    big = LayerBuilder().dir("data").file("data/blob", os.urandom(4 << 20)).build()
    files = LayerBuilder().dir("etc")
    for i in range(300):
        files.file(f"etc/f{i:03d}", b"x" * 100)
    return [big, files.build(), LayerBuilder().file("etc/motd", b"hello\n").build()]


@pytest.fixture
def pushed(registry, registry_env, tmp_path: Path) -> str:
    """A three-layer image in the loopback registry; its ref."""
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image(_layers(), tag="t", compression="gzip")
    ref = f"{registry.host}/progress/app:1"
    push_layout(layout, "t", ref)
    return ref


def _dirge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script, stdout and stderr each to a pipe."""
    return subprocess.run([str(DIRGE), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, **AUTO, **(env or {})}, timeout=300)


def _frames(screen: str) -> str:
    """A terminal session as text: escape codes stripped, each redrawn frame's lines once, in order."""
    seen: list[str] = []
    for line in ANSI.sub("\n", SGR.sub("", screen)).splitlines():
        if line.strip() and line.rstrip() not in seen:
            seen.append(line.rstrip())
    return "\n".join(seen)


def _record(title: str, command: str, text: str) -> None:
    if RECORD:
        with open(RECORD, "a") as f:
            f.write(f"==== {title}\n$ {command}\n{text.rstrip()}\n\n")


# --- (a) a pipe: plain lines on stderr, the result alone on stdout

def test_pull_and_session_create_through_a_pipe_print_plain_lines(pushed: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    pull = _dirge("pull", "--json", "--cache-dir", cache, pushed)
    assert pull.returncode == 0, pull.stderr
    result = json.loads(pull.stdout)  # stdout is the result, nothing else
    lines = pull.stderr.splitlines()
    _record("dirge pull, stderr to a pipe (auto = plain)", f"dirge pull {pushed} 2>&1 | cat", pull.stderr)
    # the image's total, then per blob: bytes so far / total, and the end of each download
    assert f"pull: {result['digest'][:19]}: 3 layers, 4.2 MB" in lines, lines
    for layer in result["layers"]:
        ends = [ln for ln in lines if ln.startswith(f"pull {layer[:19]} ") and ln.endswith(" done")]
        assert len(ends) == 1 and re.fullmatch(r"pull \S+ (\d+\.\d)/\1 [kM]B done", ends[0]), lines
    big = [ln for ln in lines if re.fullmatch(r"pull sha256:[0-9a-f]{12} \d\.\d/4\.2 MB( done)?", ln)]
    assert big, lines  # the 4 MB layer's line shows its bytes against its total

    create = _dirge("session", "create", "--cache-dir", cache, "--pull", "never", "--base-format", "tree",
                    pushed)
    assert create.returncode == 0, create.stderr
    assert Path(create.stdout.strip()).is_dir() and create.stdout.count("\n") == 1
    _record("dirge session create, stderr to a pipe", f"dirge session create {pushed} 2>&1 | cat", create.stderr)
    lines = create.stderr.splitlines()
    applied = [ln for ln in lines if ln.startswith("apply ")]
    assert applied[0].startswith("apply layer 1/3 sha256:"), lines
    assert re.fullmatch(r"apply layer 3/3 sha256:[0-9a-f]{12} 30\d entries \d+\.\d MB done", applied[-1]), lines
    assert [ln.split()[2] for ln in applied if ln.endswith(" done")] == ["1/3", "2/3", "3/3"]
    assert any(ln.startswith("base: writing tree base sha256:") for ln in lines), lines
    assert re.fullmatch(r"session: session [0-9a-f]{12} ready \(\w+\)", lines[-1]), lines
    assert _dirge("session", "rm", "--all", "--cache-dir", cache).returncode == 0


def test_quiet_and_the_progress_option_choose_what_stderr_gets(pushed: str, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    quiet = _dirge("-q", "pull", "--cache-dir", cache, pushed)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.startswith("sha256:")
    assert _dirge("--progress", "quiet", "pull", "--cache-dir", cache, pushed).stderr == ""
    by_env = _dirge("pull", "--cache-dir", cache, pushed, env={"DIRGE_PROGRESS": "quiet"})
    assert by_env.stderr == ""
    gc = _dirge("--progress", "plain", "gc", "--cache-dir", cache)
    assert gc.returncode == 0 and gc.stderr.splitlines()[0].startswith("gc: collecting"), gc.stderr
    assert "gc:" not in gc.stdout


def test_unpack_and_export_through_a_pipe_print_layers_and_the_written_file(make_image, tmp_path: Path) -> None:
    ref = make_image(_layers()[1:])
    unpacked = _dirge("unpack", ref, str(tmp_path / "tree"))
    assert unpacked.returncode == 0, unpacked.stderr
    assert [ln.split()[2] for ln in unpacked.stderr.splitlines() if ln.endswith(" done")] == ["1/2", "2/2"]
    assert "apply" not in unpacked.stdout and "302 entries" in unpacked.stdout
    out = tmp_path / "root.erofs"
    exported = _dirge("export", "--cache-dir", str(tmp_path / "cache"), ref, str(out))
    assert exported.returncode == 0, exported.stderr
    lines = exported.stderr.splitlines()
    assert lines[0] == "export: writing erofs image", lines
    assert re.fullmatch(r"apply layer 2/2 sha256:[0-9a-f]{12} 302 entries 0\.0 MB done", lines[-2]), lines
    assert lines[-1] == f"erofs root.erofs: {out.stat().st_size / 1e6:.1f} MB written", lines
    assert exported.stdout.startswith(f"{out}: erofs, ")


def test_a_subprocess_output_is_folded_into_build_events() -> None:
    """How ``dirge build`` shows buildah: its output lines become Build events (one folded line on a
    terminal, ``build: ...`` lines on a pipe)."""
    got: list[Event] = []
    with line_events(got.append) as output:
        subprocess.run(["sh", "-c", "echo 'STEP 1/2: FROM scratch'; echo; echo 'STEP 2/2: COPY a /' >&2"],
                       stdout=output, stderr=output, check=True)
    assert got == [Build("STEP 1/2: FROM scratch"), Build("STEP 2/2: COPY a /")]
    out = io.StringIO()
    plain = PlainProgress(out)
    for event in got:
        plain(event)
    assert out.getvalue() == "build: STEP 1/2: FROM scratch\nbuild: STEP 2/2: COPY a /\n"


def test_plain_lines_are_throttled_per_task_but_phase_changes_always_show() -> None:
    now = [0.0]
    out = io.StringIO()
    plain = PlainProgress(out, interval=1.0, clock=lambda: now[0])
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    for done in range(1, 10):  # nine chunks within the same second: one line (the start)
        plain(Download(a, done << 20, 20 << 20))
    plain(Download(b, 1 << 20, 2 << 20))  # another task: its own line
    now[0] = 1.5
    plain(Download(a, 11 << 20, 20 << 20))  # a second later: one more line
    plain(Download(a, 12 << 20, 20 << 20))
    plain(Download(a, 20 << 20, 20 << 20))  # the end always shows
    plain(Apply(0, 2, a))
    plain(Apply(0, 2, a, 5, 100))  # throttled
    plain(Apply(0, 2, a, 9, 200, done=True))  # the layer's end: shown
    plain(Apply(1, 2, b, 9, 200))  # the next layer: shown
    plain(Boot("kernel started"))
    assert out.getvalue().splitlines() == [
        "pull sha256:aaaaaaaaaaaa 1.0/21.0 MB",
        "pull sha256:bbbbbbbbbbbb 1.0/2.1 MB",
        "pull sha256:aaaaaaaaaaaa 11.5/21.0 MB",
        "pull sha256:aaaaaaaaaaaa 21.0/21.0 MB done",
        "apply layer 1/2 sha256:aaaaaaaaaaaa 0 entries 0.0 MB",
        "apply layer 1/2 sha256:aaaaaaaaaaaa 9 entries 0.0 MB done",
        "apply layer 2/2 sha256:bbbbbbbbbbbb 9 entries 0.0 MB",
        "boot: kernel started",
    ]


def test_the_terminal_display_shows_layers_as_a_count_not_bytes() -> None:
    """The old unpack bar read "0/1 bytes" for a count of layers: now "layer i/n" with entries and MB."""
    from rich.console import Console

    buf = io.StringIO()
    display = TerminalProgress(Console(file=buf, force_terminal=True, width=120))
    with display:
        display(Apply(1, 3, "sha256:" + "c" * 64, 41_234, 120_000_000))
        display(Download("sha256:" + "d" * 64, 3_000_000, 6_000_000))
    text = ANSI.sub("", buf.getvalue())
    assert "apply layer 2/3" in text and "41k entries, 120.0 MB" in text
    assert "pull sha256:dddddddddddd" in text and "3.0/6.0 MB" in text
    assert "bytes" not in text


def test_auto_is_plain_off_a_terminal() -> None:
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("tty", io.StringIO()) == "tty"


# --- (b) a terminal: one live rich display on stderr; stdout keeps the result

@needs_tool("script")
def test_on_a_terminal_the_rich_display_renders_and_stdout_is_the_result(pushed: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "stdout.txt"
    command = (f"{DIRGE} pull --cache-dir {cache} {pushed} > {out} && "
               f"{DIRGE} session create --cache-dir {cache} --base-format tree {pushed} >> {out}")
    proc = subprocess.run(["script", "-q", "-e", "-c", command, "/dev/null"], capture_output=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, **AUTO, "TERM": "xterm-256color", "COLUMNS": "120"},
                          timeout=300)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")
    screen = proc.stdout.decode(errors="replace")
    _record("dirge pull + session create on a terminal (script(1); escape codes stripped, frames joined)",
            "dirge pull IMAGE && dirge session create IMAGE", _frames(screen))
    assert "\x1b[" in screen  # drawn and redrawn in place
    plain = ANSI.sub("", screen)
    assert re.search(r"pull sha256:[0-9a-f]{12}", plain) and "MB" in plain
    assert "apply layer 3/3" in plain and "entries" in plain
    assert "session: session" in plain
    assert "━" in plain  # rich's bar
    result = out.read_text().splitlines()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", result[0]) and Path(result[1]).is_dir() and len(result) == 2
    assert subprocess.run([str(DIRGE), "session", "rm", "--all", "--cache-dir", str(cache)]).returncode == 0


# --- (d) the API: the same events, sync callback and async stream

def _check_order(events: list[Event]) -> None:
    downloads = [e for e in events if isinstance(e, Download)]
    applies = [e for e in events if isinstance(e, Apply)]
    assert downloads and applies
    assert {e.digest for e in applies} <= {e.digest for e in downloads}  # every layer downloaded (+ the config)
    for layer in {e.digest for e in applies}:
        got = [e.done for e in downloads if e.digest == layer]
        assert got == sorted(got) and got[-1] == downloads[[e.digest for e in downloads].index(layer)].total
        # a layer's apply ends only after its last byte arrived
        end = next(i for i, e in enumerate(events) if isinstance(e, Apply) and e.digest == layer and e.done)
        last = max(i for i, e in enumerate(events) if isinstance(e, Download) and e.digest == layer)
        assert last < end
    assert [e.index for e in applies] == sorted(e.index for e in applies)
    assert [e.entries for e in applies] == sorted(e.entries for e in applies)
    assert [e.index for e in applies if e.done] == [0, 1, 2]
    assert applies[-1].entries >= 300 and applies[-1].bytes >= 4 << 20
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[-1].task == "session" and steps[-1].text.endswith(")")
    assert events.index(steps[-1]) > events.index(applies[-1])


def test_prepare_reports_downloads_then_layers_to_a_callback(pushed: str, tmp_path: Path) -> None:
    events: list[Event] = []
    with prepare(pushed, tmp_path / "cache", base_format="tree", progress=events.append) as rootfs:
        assert (rootfs.path / "etc/motd").read_bytes() == b"hello\n"
    _check_order(events)
    assert any(isinstance(e, Write) and e.what == "tree base" for e in events)


def test_aio_prepare_yields_the_same_events_as_a_stream(pushed: str, tmp_path: Path) -> None:
    async def main() -> list[Event]:
        stream = aio.ProgressStream()
        task = asyncio.ensure_future(aio.prepare(pushed, tmp_path / "cache", base_format="tree", progress=stream))
        got = [event async for event in stream]
        await aio.close(await task)
        return got

    _check_order(asyncio.run(main()))


# --- (c) boot: its phases, from one real boot

@pytest.mark.skipif(_boot_missing() is not None, reason=_boot_missing() or "")
def test_boot_reports_its_phases_in_plain_lines(boot_cache: Path, tmp_path: Path) -> None:
    from dirge.demo import build_demo_layout

    ref = build_demo_layout(tmp_path / "layout")
    proc = _dirge("--progress", "plain", "boot", "--accel", "tcg", "--timeout", "120", "--disk", "ext4",
                  "--cache-dir", str(boot_cache), ref, "--", "/bin/echo", "hi from the guest")
    _record("dirge boot, stderr to a pipe", "dirge --progress plain boot --disk ext4 IMAGE -- /bin/echo ...",
            proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["hi from the guest"]  # the guest's console; progress is stderr's
    phases = [ln.removeprefix("boot: ") for ln in proc.stderr.splitlines() if ln.startswith("boot: ")]
    assert phases[0] == "preparing the session"
    expected = ["preparing the session", "installing the guest init", "choosing the accelerator",
                "initramfs for ext4", "starting qemu (tcg)", "kernel started", "userspace started",
                "guest exited with 0"]
    assert [p for p in phases if p in expected] == expected, phases
    assert any(ln.startswith("apply layer ") for ln in proc.stderr.splitlines())  # the session's base
    if RECORD:  # the same boot on a terminal, for docs/progress-session.txt only (a second boot)
        tty = subprocess.run(["script", "-q", "-e", "-c", f"{DIRGE} boot --accel tcg --disk ext4 --cache-dir "
                              f"{boot_cache} {ref} -- /bin/echo 'hi from the guest'", "/dev/null"],
                             capture_output=True, env={**os.environ, **AUTO, "TERM": "xterm-256color"}, timeout=300)
        _record("dirge boot on a terminal (script(1))", "dirge boot --disk ext4 IMAGE -- /bin/echo ...",
                _frames(tty.stdout.decode(errors="replace")))
