"""A terminal progress display (rich): bytes and rate per layer download, then layer-by-layer unpack."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from .oci.image import Descriptor


class TerminalProgress:
    """Use as a context manager; pass ``.download`` and ``.apply`` as the pipeline's callbacks."""

    def __init__(self) -> None:
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=Console(file=sys.stderr), transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._apply: TaskID | None = None

    @staticmethod
    def wanted(quiet: bool) -> bool:
        return not quiet and sys.stderr.isatty()

    def __enter__(self) -> "TerminalProgress":
        self._progress.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def download(self, desc: Descriptor, done: int) -> None:
        key = str(desc.digest)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(f"pull {desc.digest.short}", total=desc.size)
        self._progress.update(self._tasks[key], completed=done)

    def upload(self, done: int, total: int) -> None:
        """Blob bytes a push has made present in the registry (``push``'s ``on_bytes``)."""
        if "push" not in self._tasks:
            self._tasks["push"] = self._progress.add_task("push", total=total)
        self._progress.update(self._tasks["push"], completed=done, total=total)

    def apply(self, what: str, index: int, count: int) -> None:
        if self._apply is None:
            self._apply = self._progress.add_task("unpack", total=count)
        self._progress.update(self._apply, completed=index, description=f"unpack {what}")
