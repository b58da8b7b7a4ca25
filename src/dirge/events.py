"""Progress events: what the pipeline tells whoever watches it (the CLI's display, an API caller).

A bottom module (imports nothing of dirge), so every stage can emit without importing the display
(``progress.py``, which needs rich). One callback type for all of them, ``ProgressFn``; each event is a
frozen dataclass:

    Download(digest, done, total)        a blob's bytes received so far (every chunk; watchers throttle)
    Apply(index, count, digest, entries, bytes, done)
                                         layer ``index`` (0-based) of ``count`` being merged; entries and
                                         file bytes applied so far in the whole image; ``done`` once the
                                         layer's stream ended (sent at least at a layer's start and end)
    Step(task, text)                     a phase change of a task: "base" ("writing erofs"), "session",
                                         "export", "gc"...
    Write(what, bytes)                   a file written whole: a base image, an export (its size)
    Build(line)                          one line of buildah's output (``dirge build``, variants)
    Boot(phase)                          dirge boot's phases: "preparing session", "kernel started"...
    Push(digest, done, total)            an upload's bytes sent so far. For ``dirge push``: call the
                                         ``ProgressFn`` with one per chunk sent (and one with done == total
                                         at the end); the CLI's displays already render it.

A callback runs in the thread doing the work; it should return quickly. Raising stops the operation
(``dirge.aio`` raises ``errors.Cancelled`` there)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Download:
    digest: str  # "sha256:<hex>"
    done: int
    total: int


@dataclass(frozen=True)
class Apply:
    index: int  # 0-based
    count: int
    digest: str
    entries: int = 0  # in the whole image so far
    bytes: int = 0    # file data bytes so far
    done: bool = False

    @property
    def what(self) -> str:
        """ "layer 2/5 sha256:ab12cd34ef56" (1-based, as shown)."""
        return f"layer {self.index + 1}/{self.count} {short(self.digest)}"


@dataclass(frozen=True)
class Step:
    task: str
    text: str


@dataclass(frozen=True)
class Write:
    what: str
    bytes: int


@dataclass(frozen=True)
class Build:
    line: str


@dataclass(frozen=True)
class Boot:
    phase: str


@dataclass(frozen=True)
class Push:
    digest: str
    done: int
    total: int


Event = Download | Apply | Step | Write | Build | Boot | Push
ProgressFn = Callable[[Event], None]


def short(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits: enough to tell layers apart on one line."""
    algo, _, hex_ = digest.partition(":")
    return f"{algo}:{hex_[:12]}" if hex_ else digest[:19]


def emit(progress: ProgressFn | None, event: Event) -> None:
    """``progress(event)`` if there is a watcher."""
    if progress is not None:
        progress(event)


class _Blob(Protocol):  # an oci.image.Descriptor, without importing it from down here
    @property
    def digest(self) -> object: ...
    @property
    def size(self) -> int: ...


def downloads(progress: ProgressFn | None) -> Callable[[_Blob, int], None] | None:
    """A registry client's ``on_bytes(desc, done)`` that reports Download events to ``progress``."""
    if progress is None:
        return None

    def on_bytes(desc: _Blob, done: int) -> None:
        progress(Download(str(desc.digest), done, desc.size))

    return on_bytes
