"""The CLI's progress displays of ``dirge.events``: a live rich display on a terminal, plain lines on a
pipe, nothing when quiet (``--progress auto|tty|plain|quiet``, ``$DIRGE_PROGRESS``; auto = tty when
stderr is a terminal, else plain, as ``docker buildx`` does). Both write to stderr only: stdout keeps
the command's result.

Plain: one line when a task starts or changes phase (a download starts or ends, a layer starts or ends,
a Step, Boot, Write or Build line), and at most one line per ``interval`` (1 s) per task in between:

    pull sha256:0123456789ab 12.3/45.6 MB
    apply layer 2/3 sha256:0123456789ab 41k entries 120.0 MB
    boot: kernel started
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TransferSpeedColumn)
from rich.progress_bar import ProgressBar
from rich.text import Text

from .events import Apply, Boot, Build, Download, Event, ProgressFn, Push, Step, Write, short

MODES = ("auto", "tty", "plain", "quiet")
MODE_ENV = "DIRGE_PROGRESS"


def resolve_mode(mode: str, stream: IO[str] | None = None) -> str:
    """``auto`` → tty on a terminal (and not TERM=dumb), else plain; the others as they are."""
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    tty = stream.isatty() and os.environ.get("TERM", "") != "dumb"
    return "tty" if tty else "plain"


class Display(Protocol):
    def __call__(self, event: Event) -> None: ...
    def __enter__(self) -> Display: ...
    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def open_display(mode: str) -> Display | None:
    """The display for ``mode`` (see module doc), or None (quiet)."""
    mode = resolve_mode(mode)
    if mode == "quiet":
        return None
    return TerminalProgress() if mode == "tty" else PlainProgress()


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def amount(done: int, total: int) -> str:
    """ "12.3/45.6 MB"; in kB for a blob under a megabyte (manifests, configs, small layers)."""
    if total >= 1_000_000:
        return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
    return f"{done / 1e3:.1f}/{total / 1e3:.1f} kB"


def count(n: int) -> str:
    """41234 → "41k": entries at a glance."""
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)


class PlainProgress:
    """Plain lines on ``out`` (stderr), flushed (module doc). Thread-safe: downloads report from their
    own threads."""

    def __init__(self, out: IO[str] | None = None, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out or sys.stderr
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}  # task key → when its last line was written
        self._layer: tuple[int, bool] | None = None  # the Apply (index, done) last written
        self._lock = threading.Lock()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        pass

    def __call__(self, event: Event) -> None:
        with self._lock:
            line = self._line(event)
            if line is not None:
                self._out.write(line + "\n")
                self._out.flush()

    def _due(self, key: str, change: bool) -> bool:
        now = self._clock()
        if change or now - self._last.get(key, -1e9) >= self._interval:
            self._last[key] = now
            return True
        return False

    def _line(self, event: Event) -> str | None:
        if isinstance(event, (Download, Push)):
            verb = "pull" if isinstance(event, Download) else "push"
            key = f"{verb} {event.digest}"
            change = key not in self._last or event.done >= event.total
            if not self._due(key, change):
                return None
            end = " done" if event.done >= event.total else ""
            return f"{verb} {short(event.digest)} {amount(event.done, event.total)}{end}"
        if isinstance(event, Apply):
            state = (event.index, event.done)
            if not self._due("apply", state != self._layer):
                return None
            self._layer = state
            end = " done" if event.done else ""
            return f"apply {event.what} {count(event.entries)} entries {mb(event.bytes)} MB{end}"
        if isinstance(event, Step):
            return f"{event.task}: {event.text}"
        if isinstance(event, Boot):
            return f"boot: {event.phase}"
        if isinstance(event, Write):
            return f"{event.what}: {mb(event.bytes)} MB written"
        if isinstance(event, Build):
            return f"build: {event.line}"
        return None


class _Detail(ProgressColumn):
    """Bytes and rate for a transfer; the task's own ``detail`` text for the others (a layer count is no
    byte count)."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._speed = DownloadColumn(), TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        if task.fields.get("kind") == "bytes":
            return Text.assemble(self._bytes.render(task), " ", self._speed.render(task))
        return Text(str(task.fields.get("detail", "")))


class _Bar(BarColumn):
    """A bar for what has an amount (bytes, layers); none for a task that is only a line of text."""

    def render(self, task: Task) -> ProgressBar | Text:  # type: ignore[override]  # rich renders either
        if task.fields.get("kind") == "text":
            return Text("")
        return super().render(task)


class TerminalProgress:
    """One live rich display on stderr: a bar per download (bytes, rate), the layers being applied
    (layer i/n, entries, MB, entries/s), one line per Step task, the boot's phase and buildah's latest
    line (folded; its last lines are printed if the command fails)."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(file=sys.stderr)
        self._progress = Progress(TextColumn("{task.description}"), _Bar(), _Detail(),
                                  console=self._console, transient=True,
                                  # stdout is the command's: only a terminal's goes through the display
                                  redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
        self._tasks: dict[str, TaskID] = {}
        self._apply_started: float | None = None
        self._build_tail: deque[str] = deque(maxlen=20)
        self._lock = threading.Lock()

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
        if e is not None and self._build_tail:  # the folded build output explains the failure
            for line in self._build_tail:
                self._console.print(line, markup=False, highlight=False)

    def _task(self, key: str, description: str, kind: str = "text", total: float | None = None) -> TaskID:
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total, kind=kind, detail="")
        return self._tasks[key]

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._show(event)

    def _show(self, event: Event) -> None:
        p = self._progress
        if isinstance(event, (Download, Push)):
            verb = "pull" if isinstance(event, Download) else "push"
            task = self._task(f"{verb} {event.digest}", f"{verb} {short(event.digest)}", "bytes", event.total)
            p.update(task, total=event.total, completed=event.done)
        elif isinstance(event, Apply):
            now = time.monotonic()
            if self._apply_started is None:
                self._apply_started = now
            elapsed = now - self._apply_started
            rate = f", {count(int(event.entries / elapsed))} entries/s" if elapsed >= 1 else ""
            task = self._task("apply", "apply", "layers", event.count)
            p.update(task, total=event.count, completed=event.index + (1 if event.done else 0),
                     description=f"apply layer {event.index + 1}/{event.count}",
                     detail=f"{count(event.entries)} entries, {mb(event.bytes)} MB{rate}")
        elif isinstance(event, Step):
            p.update(self._task(f"step {event.task}", event.task), description=f"{event.task}: {event.text}")
        elif isinstance(event, Write):
            p.update(self._task(f"write {event.what}", event.what), detail=f"{mb(event.bytes)} MB written")
        elif isinstance(event, Boot):
            p.update(self._task("boot", "boot"), description=f"boot: {event.phase}")
        elif isinstance(event, Build):
            self._build_tail.append(event.line)
            p.update(self._task("build", "build"), description=f"build: {event.line[:100]}")


@contextmanager
def line_events(progress: ProgressFn, make: Callable[[str], Event] = Build) -> Iterator[IO[str]]:
    """A writable file whose lines become events (``make(line)``, default Build): hand it to a
    subprocess as its stdout/stderr (buildah's output folded into the display). Lines are read by a
    thread until the writer's end is closed, which leaving the block does (after the subprocess ended)."""
    read_fd, write_fd = os.pipe()
    writer = os.fdopen(write_fd, "w")
    reader = os.fdopen(read_fd, "r", errors="replace")

    def pump() -> None:
        with reader:
            for line in reader:
                if line.strip():
                    progress(make(line.rstrip("\n")))

    thread = threading.Thread(target=pump, name="dirge-lines", daemon=True)
    thread.start()
    try:
        yield writer
    finally:
        writer.close()
        thread.join()
