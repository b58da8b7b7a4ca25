"""Waits that need no CPU, announced to whoever runs the sync core.

The sync core blocks in a few places where its thread only waits: for a lock another holder has, for
the next bytes of a layer still downloading, for downloads to be published. ``dirge.aio`` runs each
operation in a thread that holds one of a few work slots (so the event loop never queues behind a
crowd of threads for the GIL) and sets ``lend`` for that thread: while it waits, another operation
runs in its slot. Without ``lend`` set (the CLI, the sync API) ``waiting()`` does nothing.

A wait that may last (a lock held by another process for minutes) also calls ``checkpoint()`` as it
polls, and a layer's stream calls it once per batch of entries: ``dirge.aio`` sets ``cancelled`` so
that a cancelled call stops there (``errors.Cancelled``) instead of once it has the lock or the layer."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar

lend: ContextVar[Callable[[], AbstractContextManager[None]] | None] = ContextVar("dirge_lend", default=None)
cancelled: ContextVar[Callable[[], None] | None] = ContextVar("dirge_cancelled", default=None)


def waiting() -> AbstractContextManager[None]:
    """Enter around a wait that needs no CPU. It may raise on leaving (``errors.Cancelled``: the waiter's
    operation was cancelled meanwhile)."""
    hook = lend.get()
    return nullcontext() if hook is None else hook()


def checkpoint() -> None:
    """Called as a long wait polls: raises if the caller's operation was cancelled meanwhile."""
    hook = cancelled.get()
    if hook is not None:
        hook()
