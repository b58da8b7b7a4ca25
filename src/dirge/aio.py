"""The asyncio face of dirge, for agent frameworks: the sync API run off the event loop.

    async with aio.prepare("oci:/images/app:1.0", cache) as rootfs:       # closed on leaving the block
        await run_vm(rootfs.path, rootfs.config)

    rootfs = await aio.prepare(image, cache)                              # the caller closes it
    try: ... finally: await aio.close(rootfs)

    result = await aio.export(image, "/srv/app.erofs", format="erofs")
    resolved = await aio.pull("docker.io/library/alpine:3.21", platform="linux/arm64")
    report = await aio.gc(cache, max_size=10 << 30)                       # dirge.gc's arguments

``cache`` is a cache directory or a ``dirge.Cache`` everywhere (None: the default cache).

The sync functions stay the core: each call here runs one of them in its own thread (so a prepare
waiting minutes on a base lock never takes a slot of the loop's default executor) and awaits its end.

Progress: ``progress=`` (prepare, pull, export) takes a callback, sync or async, of one ``dirge.events``
event (Download, Apply, Step, Write: the sync ``ProgressFn``'s), called on the loop (async ones awaited
in order), or a ``ProgressStream``, an async iterator of the same events that ends when the operation
ends:

    events = aio.ProgressStream()
    task = asyncio.ensure_future(aio.prepare(image, cache_dir, progress=events))
    async for event in events:          # Download(...), Apply(...), Step("session", ...), ...
        print(event)
    rootfs = await task

Cancellation: cancelling the awaiting task sets a flag that the worker thread sees at its next progress
or download callback, lock poll or batch of a layer's entries, where it raises ``errors.Cancelled``; the
sync pipeline then undoes what it began (staging removed, lock released, temp files deleted) as it does
for any error. The task waits for the worker's end (a second cancel does not cut that short), closes
a session that was completed anyway, then raises CancelledError. The unpack pipeline calls ``progress`` once per layer, and the
layer's stream checks once per batch of entries (``waits.checkpoint``, at most 2,048 tar items): a
prepare stops within the layer being applied, and one waiting for a lock another holder has stops
within one poll (50 ms).

Work slots: the sync core is Python work that holds the GIL, and a thread that wants the GIL waits
behind every other runnable one (CPython hands it over every 5 ms, to any waiter): 20 operations in 20
threads stalled the loop ~40-110 ms on 2 CPUs, one at a time ~15-35 ms. So an operation's thread runs
only while it holds one of ``WORK_SLOTS`` slots (``$DIRGE_AIO_WORKERS``, default 1; on CPython the
others would mostly wait for the GIL anyway), and lends it to another operation while it waits without
using the CPU (``dirge.waits``: a lock another holder has, a layer's next bytes still downloading).
Waiting for a slot, and each poll of a lock another holder has, are cancellation points too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .apply.layer import Limits
from .errors import Cancelled
from .events import Event
from .exporting import ExportResult
from .exporting import export as sync_export
from .oci.resolve import ResolvedImage
from .options import (BaseFormat, CacheLike, DiskFormat, DiskKind, DiskOptions, ExportFormat, PlatformLike,
                      PrepareOptions, PullPolicy, Strategy, as_cache, as_platform, cache_or_dir)
from .rootfs import FileSpec, PreparedRootfs, prepare_with
from .sources.auth import Credentials, RegistryOptions
from .sources.open import pull_image
from .variants import build_variant
from .waits import cancelled, lend

if TYPE_CHECKING:
    from .lifecycle import GcReport

__all__ = [
    "Cancelled",
    "Event",
    "Preparing",
    "ProgressCallback",
    "ProgressEvent",
    "ProgressStream",
    "close",
    "export",
    "gc",
    "prepare",
    "pull",
]

T = TypeVar("T")


ProgressEvent = Event  # one dirge.events event (Download, Apply, Step, Write, ...)
ProgressCallback = Callable[[Event], Awaitable[None] | None]  # sync or async, on the loop


class ProgressStream:
    """The progress events of one operation as an async iterator; it ends when the operation ends
    (done, failed or cancelled). Pass it as ``progress=`` and iterate it in another task:

        events = aio.ProgressStream()
        task = asyncio.ensure_future(aio.prepare(image, cache, progress=events))
        async for event in events:
            print(event)
        rootfs = await task
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()
        self._ended = False

    def __aiter__(self) -> ProgressStream:
        return self

    async def __anext__(self) -> ProgressEvent:
        if self._ended:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._ended = True
            raise StopAsyncIteration
        return event

    def _put(self, event: ProgressEvent | None) -> None:
        self._queue.put_nowait(event)


AsyncProgress = ProgressStream | ProgressCallback


async def _settle(fut: asyncio.Future[Any], on_cancel: Callable[[], None]) -> asyncio.CancelledError | None:
    """Wait until ``fut`` is done however often the awaiting task is cancelled meanwhile (``fut`` itself
    is never cancelled); returns the first CancelledError, calling ``on_cancel`` on each."""
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait([fut])
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
            on_cancel()
    return cancelled


WORK_SLOTS = max(1, int(os.environ.get("DIRGE_AIO_WORKERS", "1") or 1))
_work_slots = threading.BoundedSemaphore(WORK_SLOTS)

_launches: queue.SimpleQueue[tuple[threading.Thread, Callable[[BaseException], None]]] = queue.SimpleQueue()
_launcher: threading.Thread | None = None
_launcher_lock = threading.Lock()


def _start_thread(thread: threading.Thread, failed: Callable[[BaseException], None]) -> None:
    """Have ``thread`` started by the launcher thread, not the loop's: ``Thread.start()`` waits until
    the new thread runs, which with busy unpack threads competing for the GIL takes up to ~100 ms, a
    stall of the whole event loop."""
    global _launcher
    with _launcher_lock:
        if _launcher is None or not _launcher.is_alive():
            _launcher = threading.Thread(target=_launch_forever, name="dirge-aio-launcher", daemon=True)
            _launcher.start()
    _launches.put((thread, failed))


def _launch_forever() -> None:
    while True:
        thread, failed = _launches.get()
        try:
            thread.start()
        except BaseException as exc:  # e.g. "can't start new thread": the operation fails with it
            failed(exc)


class _Relay:
    """One operation: its worker thread, the worker's events carried to the loop
    (``call_soon_threadsafe``) and the loop's cancellation carried to the worker (a flag it checks in
    every callback the sync pipeline makes)."""

    def __init__(self, progress: AsyncProgress | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = threading.Event()
        self._stream = progress if isinstance(progress, ProgressStream) else None
        self._progress = None if isinstance(progress, ProgressStream) else progress
        self._calls: asyncio.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = asyncio.Queue()
        self._failure: BaseException | None = None  # a callback's exception: it stops the operation
        self._slot = False  # whether this operation's worker holds a work slot

    # -- in the worker thread ------------------------------------------------------------------

    def check(self) -> None:
        if self.stop.is_set():
            raise Cancelled("cancelled by the caller")

    def _take_slot(self) -> None:
        while not self._slot:
            self.check()
            self._slot = _work_slots.acquire(timeout=0.05)

    def _drop_slot(self) -> None:
        if self._slot:
            self._slot = False
            _work_slots.release()

    @contextlib.contextmanager
    def _lend(self) -> Iterator[None]:
        """``dirge.waits.lend`` for this operation's thread: its slot is another's while it waits."""
        self._drop_slot()
        try:
            yield
        finally:
            self._take_slot()

    def progress(self, event: Event) -> None:
        """The sync pipeline's ``ProgressFn``: the cancellation point, and the events' source."""
        self.check()
        if self._stream is not None:
            self._post(self._stream._put, event)
        elif self._progress is not None:
            self._post(self._calls.put_nowait, (self._progress, (event,)))

    def _post(self, fn: Callable[[Any], None], arg: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _thread(self, work: Callable[[_Relay], T], done: asyncio.Future[T], context: contextvars.Context) -> None:
        try:
            self._take_slot()  # raises if cancelled before the thread even started
            result = context.run(self._with_lend, work)
        except BaseException as exc:  # delivered to the awaiting task, raised there
            self._fail(done, exc)
        else:
            self._post(lambda r: None if done.done() else done.set_result(r), result)
        finally:
            self._drop_slot()

    def _with_lend(self, work: Callable[[_Relay], T]) -> T:
        lend.set(self._lend)  # in the operation's own context copy: no other thread sees it
        cancelled.set(self.check)
        return work(self)

    def _fail(self, done: asyncio.Future[Any], exc: BaseException) -> None:
        self._post(lambda e: None if done.done() else done.set_exception(e), exc)

    # -- on the loop ---------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Callbacks run here, in order, one at a time; one that raises stops the operation."""
        while (item := await self._calls.get()) is not None:
            if self._failure is not None:
                continue
            fn, args = item
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self._failure = exc
                self.stop.set()

    async def run(self, work: Callable[[_Relay], T], discard: Callable[[T], None] | None = None) -> T:
        """``work(self)`` in a new thread; its result, or its exception, or CancelledError after it
        ended (and ``discard`` was given a result that came anyway)."""
        done: asyncio.Future[T] = self.loop.create_future()
        consumer = self.loop.create_task(self._consume()) if self._progress else None
        thread = threading.Thread(target=self._thread, args=(work, done, contextvars.copy_context()),
                                  name="dirge-aio")
        _start_thread(thread, lambda exc: self._fail(done, exc))
        cancelled = await _settle(done, self.stop.set)
        if consumer is not None:
            self._calls.put_nowait(None)
            cancelled = await _settle(consumer, self.stop.set) or cancelled
        if self._stream is not None:
            self._stream._put(None)
        if cancelled is not None:
            if done.exception() is None and discard is not None:
                await _shielded(discard, done.result())
            raise cancelled
        if self._failure is not None:
            if done.exception() is None and discard is not None:
                await _shielded(discard, done.result())
            raise self._failure
        return done.result()


async def _shielded(fn: Callable[[T], None], arg: T) -> None:
    """``fn(arg)`` in a thread, waited for to the end even if the awaiting task is cancelled meanwhile
    (then CancelledError is raised after it)."""
    relay = _Relay()
    done: asyncio.Future[None] = relay.loop.create_future()
    thread = threading.Thread(target=relay._thread, args=(lambda _: fn(arg), done, contextvars.copy_context()),
                              name="dirge-aio-close")
    _start_thread(thread, lambda exc: relay._fail(done, exc))
    cancelled = await _settle(done, lambda: None)
    done.result()
    if cancelled is not None:
        raise cancelled


async def close(rootfs: PreparedRootfs) -> None:
    """``rootfs.close()`` off the loop (an unmount and a tree removal); finished even if cancelled."""
    await _shielded(PreparedRootfs.close, rootfs)


class Preparing:
    """What ``aio.prepare`` returns: ``await`` it for a PreparedRootfs the caller closes (``aio.close`` or
    ``.close()``), or ``async with`` it for one closed on leaving the block (also on an exception or a
    cancellation). Either, once."""

    def __init__(self, work: Callable[[_Relay], PreparedRootfs], progress: AsyncProgress | None) -> None:
        self._work = work
        self._progress = progress
        self._started = False
        self._rootfs: PreparedRootfs | None = None

    async def _run(self) -> PreparedRootfs:
        if self._started:
            raise RuntimeError("an aio.prepare(...) result can be awaited or entered only once")
        self._started = True
        return await _Relay(self._progress).run(self._work, discard=PreparedRootfs.close)

    def __await__(self) -> Generator[Any, None, PreparedRootfs]:
        return self._run().__await__()

    async def __aenter__(self) -> PreparedRootfs:
        self._rootfs = await self._run()
        return self._rootfs

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        rootfs, self._rootfs = self._rootfs, None
        if rootfs is not None:
            await close(rootfs)


def prepare(
    image: str,
    cache: CacheLike | None = None,
    *,
    files: Mapping[str, FileSpec | bytes] | None = None,
    snapshot: str | None = None,
    owner_pid: int | None = None,
    progress: AsyncProgress | None = None,
    cache_dir: str | os.PathLike[str] | None = None,  # deprecated: cache=
    # the PrepareOptions fields, as dirge.rootfs.prepare takes them (tests/test_options.py checks it):
    strategy: Strategy | None = None,
    base_format: BaseFormat | None = None,
    platform: PlatformLike | None = None,
    rootless: bool | None = None,
    limits: Limits = Limits(),
    lock_timeout: float = 600.0,
    pull: PullPolicy = "missing",
    creds: Credentials | None = None,
    registry_options: RegistryOptions | None = None,
    disk: DiskKind | None = None,
    disk_format: DiskFormat = "raw",
    disk_size: int | None = None,
    disk_journal: bool = True,
    disk_inodes: int | None = None,
    artifacts: tuple[str, ...] | None = None,
) -> Preparing:
    """``dirge.rootfs.prepare`` off the loop (the same arguments; ``progress`` as in the module doc).
    Nothing starts until the result is awaited or entered."""
    options = PrepareOptions.pick(locals())  # a bad platform string raises here, not in the worker
    where = as_cache(cache_or_dir(cache, cache_dir, "aio.prepare"))

    def work(relay: _Relay) -> PreparedRootfs:
        return prepare_with(image, options, where, files=files, snapshot=snapshot, owner_pid=owner_pid,
                            progress=relay.progress)

    return Preparing(work, progress)


async def pull(
    image: str,
    platform: PlatformLike | None = None,
    *,
    cache: CacheLike | None = None,
    pull: PullPolicy = "always",
    creds: Credentials | None = None,
    registry_options: RegistryOptions | None = None,
    progress: AsyncProgress | None = None,
) -> ResolvedImage:
    """``dirge.pull`` off the loop; ``progress`` as in the module doc (Download events).
    Cancelled between two received chunks of a download (the partial blob is removed)."""
    policy = pull
    wanted = as_platform(platform)
    where = as_cache(cache)

    def work(relay: _Relay) -> ResolvedImage:
        return pull_image(image, wanted, cache=where, pull=policy, creds=creds, registry_options=registry_options,
                          progress=relay.progress,
                          build=build_variant)

    return await _Relay(progress).run(work)


async def export(
    image: str,
    out: str | os.PathLike[str],
    *,
    format: ExportFormat = "erofs",
    platform: PlatformLike | None = None,
    cache: CacheLike | None = None,
    pull: PullPolicy = "missing",
    creds: Credentials | None = None,
    registry_options: RegistryOptions | None = None,
    limits: Limits = Limits(),
    progress: AsyncProgress | None = None,
    disk: DiskOptions | None = None,
    artifacts: tuple[str, ...] | None = None,
) -> ExportResult:
    """``dirge.exporting.export`` off the loop. A cancelled export leaves ``out`` as it was (or, when the
    export had already finished, complete)."""
    wanted = as_platform(platform)
    where = as_cache(cache)

    def work(relay: _Relay) -> ExportResult:
        return sync_export(image, out, format=format, platform=wanted, cache=where, pull=pull, creds=creds,
                           registry_options=registry_options, limits=limits, progress=relay.progress, disk=disk,
                           artifacts=artifacts)

    return await _Relay(progress).run(work)


async def gc(cache: CacheLike | None = None, *, max_size: int | None = None, keep: float | None = None,
             dry_run: bool = False, grace: float | None = None,
             cache_dir: str | os.PathLike[str] | None = None) -> GcReport:
    """``dirge.gc`` off the loop (the same arguments; ``cache_dir``: deprecated, ``cache``). It is not
    interrupted: a cancelled call waits for it to finish, then raises CancelledError."""
    where = cache_or_dir(cache, cache_dir, "aio.gc")

    def work(relay: _Relay) -> GcReport:
        from .lifecycle import gc as sync_gc  # imported when first used: gc is not needed to prepare

        return sync_gc(where, max_size=max_size, keep=keep, dry_run=dry_run, grace=grace)

    return await _Relay().run(work)
