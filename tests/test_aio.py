"""dirge.aio: the sync API off the event loop; progress as a callback or an async iterator; cancellation
that leaves no staging, session, lock or mount behind (issue 13, must-show 8).

pytest-asyncio is not a dependency: each test drives its own loop with ``asyncio.run``."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import needs_root
from dirge import aio, waits
from dirge.oci import blob
from dirge.apply.tar import Entry, EntryStream
from dirge.store.cache import Cache
from dirge.errors import Cancelled, DirgeError
from dirge.events import Apply, Event
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import PreparedRootfs
from dirge.session import Sessions
from dirge.sources.layout import LayoutWriter

LAYERS = 6
FILES = 1500  # per layer: 9,000 small files an image


def _content(image: int, layer: int, i: int) -> bytes:
    return f"image {image} layer {layer} file {i}\n".encode()


def _image(tmp_path: Path, n: int, layers: int = LAYERS, files: int = FILES) -> str:
    tars = []
    for layer in range(layers):
        b = LayerBuilder().dir(f"l{layer}")
        for i in range(files):
            b.file(f"l{layer}/f{i}", _content(n, layer, i))
        tars.append(b.build())
    b = LayerBuilder().dir("etc").file("etc/which", f"image {n}\n".encode())
    tars.insert(0, b.build())
    LayoutWriter(tmp_path / f"layout{n}").add_image(tars, tag="t")
    return f"oci:{tmp_path / f'layout{n}'}:t"


def _check_rootfs(rootfs: PreparedRootfs, n: int) -> None:
    assert (rootfs.path / "etc/which").read_bytes() == f"image {n}\n".encode()
    for layer, i in ((0, 0), (LAYERS // 2, FILES // 2), (LAYERS - 1, FILES - 1)):
        assert (rootfs.path / f"l{layer}/f{i}").read_bytes() == _content(n, layer, i)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == prefix[:-1]:
                points.append(point)
    return points


def _held_locks(cache: Path) -> list[str]:
    """Lock files some open file description holds: flock conflicts across descriptions, even in the
    same process, so a non-blocking attempt tells."""
    held = []
    for path in sorted((cache / "locks").glob("*.lock")):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path.name)
        finally:
            os.close(fd)
    return held


def _leftovers(cache: Path) -> dict[str, list[str]]:
    """What an operation left: an erofs base's own mount is the cache's design, not a leftover."""
    bases = str((cache / "bases").resolve()) + "/"
    return {
        "staging": sorted(p.name for p in (cache / "staging").iterdir()),
        "sessions": sorted(p.name for p in (cache / "sessions").iterdir()),
        "mounts": [m for m in _mounts_under(cache) if not (m.startswith(bases) and m.endswith("/rootfs")
                                                          and "/" not in m[len(bases):-len("/rootfs")])],
        "locks": _held_locks(cache),
    }


NOTHING: dict[str, list[str]] = {"staging": [], "sessions": [], "mounts": [], "locks": []}


async def prepare_many(images: list[str], cache: Path, count: int) -> tuple[float, list[str], float]:
    """``count`` concurrent aio.prepare (image i % len(images), each checked, then closed) from this loop,
    with a ticker task sleeping 10 ms at a time: (its longest gap between ticks, the session ids, seconds).
    bench/aio_loop.py measures with it too."""
    stop = asyncio.Event()
    max_gap = 0.0

    async def ticker() -> None:
        nonlocal max_gap
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now

    async def one(i: int) -> str:
        n = i % len(images)
        async with aio.prepare(images[n], cache, lock_timeout=300) as rootfs:
            await asyncio.sleep(0)  # let the others run while this session is live
            _check_rootfs(rootfs, n)
            return rootfs.id

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.monotonic()
    ids = await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.monotonic() - start
    stop.set()
    await tick
    return max_gap, list(ids), elapsed


@needs_root
def test_twenty_concurrent_prepares_keep_the_loop_responsive(tmp_path: Path) -> None:
    images = [_image(tmp_path, n) for n in range(3)]
    cache = tmp_path / "cache"
    # A fresh cache: the 20 prepares also race on the erofs probe (its record written once, safely)

    max_gap, ids, elapsed = asyncio.run(prepare_many(images, cache, 20))
    print(f"20 prepares of 3 images: {elapsed:.2f}s, the loop's longest stall {max_gap * 1000:.0f} ms")
    assert len(set(ids)) == 20
    assert max_gap < 0.1, f"the event loop stalled {max_gap * 1000:.0f} ms"
    assert len([p for p in (cache / "bases").iterdir() if p.is_dir()]) == 3  # one base per image
    assert _leftovers(cache)["sessions"] == [] and _leftovers(cache)["staging"] == []  # all closed


def _observe_lending(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when an aio call starts a CPU-free wait (a lock another holder has): observed only,
    the real method still lends the slot."""
    event = threading.Event()
    real_lend = aio._Relay._lend

    def lend(self: aio._Relay) -> contextlib.AbstractContextManager[None]:
        event.set()
        return real_lend(self)

    monkeypatch.setattr(aio._Relay, "_lend", lend)
    return event


@needs_root
def test_a_prepare_waiting_for_a_lock_lends_its_work_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Operations run in few work slots (aio.WORK_SLOTS, 1 by default); one blocked on a lock another
    holder has gives its slot up meanwhile, or every other operation of the process would wait behind it."""
    assert aio.WORK_SLOTS == 1  # else the second prepare could simply run in another slot
    images = [_image(tmp_path, n) for n in range(2)]
    cache = tmp_path / "cache"

    async def first() -> None:
        async with aio.prepare(images[0], cache):
            pass

    asyncio.run(first())
    (lease,) = (cache / "locks").glob("*.lease")  # image 0's base: a prepare takes it shared
    lent = _observe_lending(monkeypatch)
    fd = os.open(lease, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as gc holds it while it removes that base

        async def main() -> bool:
            blocked = asyncio.ensure_future(aio.prepare(images[0], cache, lock_timeout=60))
            assert await asyncio.to_thread(lent.wait, 30), "the first prepare never waited for the lease"
            async with aio.prepare(images[1], cache) as rootfs:  # without lending: waits for the slot forever
                _check_rootfs(rootfs, 1)
            still_waiting = not blocked.done()
            fcntl.flock(fd, fcntl.LOCK_UN)
            rootfs = await blocked
            _check_rootfs(rootfs, 0)
            await aio.close(rootfs)
            return still_waiting

        assert asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        os.close(fd)
    assert _leftovers(cache) == NOTHING


@needs_root
def test_a_prepare_waiting_for_a_lock_is_cancelled_while_it_waits(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel reaches a prepare blocked on a lock another holder keeps (gc removing its base, another
    process building it): it stops waiting within a poll, not when the lock is free or times out."""
    image = _image(tmp_path, 0, layers=1, files=10)
    cache = tmp_path / "cache"

    async def first() -> None:
        async with aio.prepare(image, cache):
            pass

    asyncio.run(first())
    (lease,) = (cache / "locks").glob("*.lease")
    waiting = _observe_lending(monkeypatch)
    fd = os.open(lease, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)

        async def main() -> BaseException | None:
            task = asyncio.ensure_future(aio.prepare(image, cache, lock_timeout=45))
            assert await asyncio.to_thread(waiting.wait, 30), "the prepare never waited for the lease"
            task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), 30)  # the lock is still held throughout
            except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
                return exc
            return None

        outcome = asyncio.run(main())
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        assert _leftovers(cache)["sessions"] == [] and _leftovers(cache)["staging"] == []
    finally:
        os.close(fd)
    assert _leftovers(cache) == NOTHING


@needs_root
@pytest.mark.parametrize("via", ["stream", "callback"])
def test_cancel_mid_unpack_leaves_nothing_behind(tmp_path: Path, via: str) -> None:
    image = _image(tmp_path, 0)
    cache = tmp_path / "cache"

    async def main() -> tuple[BaseException | None, dict[str, list[str]], list[str], float]:
        during: dict[str, list[str]] = {}
        events: list[str] = []
        cancelled_at = 0.0
        task: asyncio.Future[object]

        def on_progress(event: Event) -> None:
            nonlocal cancelled_at
            if not isinstance(event, Apply) or event.done or event.what in events:
                return  # a layer's start only
            events.append(event.what)
            if event.index == 1 and not cancelled_at:  # the first layer of files is being applied now
                during.update(_leftovers(cache))
                cancelled_at = time.monotonic()
                task.cancel()
                task.cancel()  # a second cancel does not cut the cleanup short

        if via == "stream":
            stream = aio.ProgressStream()
            task = asyncio.ensure_future(aio.prepare(image, cache, progress=stream))
            async for event in stream:  # ends when the prepare has ended
                on_progress(event)
        else:
            async def callback(event: Event) -> None:
                on_progress(event)

            async def hold() -> None:
                async with aio.prepare(image, cache, progress=callback):
                    raise AssertionError("the prepare was not cancelled")

            task = asyncio.ensure_future(hold())
        outcome: BaseException | None = None
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome = exc
        return outcome, during, events, time.monotonic() - cancelled_at

    outcome, during, events, latency = asyncio.run(main())
    print(f"cancelled after {events}: the task ended {latency * 1000:.0f} ms after cancel()")
    assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
    assert during["staging"] and during["locks"], during  # it was mid-unpack: staging and lock present
    assert len(events) < LAYERS + 1  # stopped before the last layer
    assert _leftovers(cache) == NOTHING
    assert not [p for p in (cache / "bases").iterdir()]

    async def again() -> float:
        start = time.monotonic()
        async with aio.prepare(image, cache, lock_timeout=5) as rootfs:
            _check_rootfs(rootfs, 0)
        return time.monotonic() - start

    assert asyncio.run(again()) < 5
    assert _leftovers(cache)["sessions"] == []


def _prepare_cancelled_by(image: str, cache: Path, arm: Callable[[Callable[[], object]], None]) -> BaseException | None:
    """How an ``aio.prepare`` held open ends when ``arm(cancel)`` has planted a call to ``cancel`` (which
    cancels the awaiting task from any thread) somewhere in the sync pipeline."""

    async def main() -> BaseException | None:
        loop = asyncio.get_running_loop()
        task: asyncio.Future[object]
        arm(lambda: loop.call_soon_threadsafe(task.cancel))

        async def hold() -> None:
            async with aio.prepare(image, cache):
                raise AssertionError("the prepare was not cancelled")

        task = asyncio.ensure_future(hold())
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the tests check
            return exc
        return None

    return asyncio.run(main())


@needs_root
def test_a_session_completed_despite_a_late_cancel_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled once the session exists, the worker has no later cancellation point: it finishes (the
    base is published, as a finished build should be), and the session it made is closed."""
    image = _image(tmp_path, 0, layers=2, files=50)
    cache = tmp_path / "cache"
    create = Sessions.create

    def arm(cancel: Callable[[], object]) -> None:
        def create_then_cancel(self: Sessions, *args: object, **kwargs: object) -> object:
            info = create(self, *args, **kwargs)  # type: ignore[arg-type]
            cancel()  # queued on the loop before the worker's result: seen first
            return info

        monkeypatch.setattr(Sessions, "create", create_then_cancel)

    assert isinstance(_prepare_cancelled_by(image, cache, arm), asyncio.CancelledError)
    assert _leftovers(cache) == NOTHING
    assert len(list((cache / "bases").iterdir())) == 1


@needs_root
def test_a_cancel_mid_layer_stops_within_the_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose files are all in one layer: a cancel that arrives while that layer is applied stops
    it within a batch of entries, not once the whole layer (and the base) is done."""
    image = _image(tmp_path, 0, layers=1, files=12_000)
    cache = tmp_path / "cache"
    entries = EntryStream.__iter__
    applied: list[int] = []  # the big layer's entry at which the cancel came; -1: it reached its end

    def arm(cancel: Callable[[], object]) -> None:
        def counted(self: EntryStream) -> Iterator[Entry]:
            relay = getattr(waits.cancelled.get(), "__self__")  # the call's relay: cancel sets its stop
            big = False
            for n, entry in enumerate(entries(self)):
                big = big or b"l0/f" in entry.name
                if n == 10 and big:
                    cancel()
                    relay.stop.wait(60)  # the loop has seen the cancel; the entries go on from here
                    applied.append(n)
                yield entry
            if big:
                applied.append(-1)

        monkeypatch.setattr(EntryStream, "__iter__", counted)
        monkeypatch.setattr(blob, "checkpoint", checkpoint)

    stopped: list[Cancelled] = []

    def checkpoint() -> None:  # the layer stream's: it is where the call stops (not a lent wait)
        try:
            waits.checkpoint()
        except Cancelled as exc:
            stopped.append(exc)
            raise

    assert isinstance(_prepare_cancelled_by(image, cache, arm), asyncio.CancelledError)
    assert applied == [10] and len(stopped) == 1, (applied, stopped)  # mid-layer; never reached its end
    assert _leftovers(cache) == NOTHING
    assert not list((cache / "bases").iterdir())


@needs_root
def test_timeouts_cancel_like_cancel(tmp_path: Path) -> None:
    image = _image(tmp_path, 0, layers=3, files=300)
    cache = tmp_path / "cache"

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(aio.prepare(image, cache), 0.001)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.001):
                async with aio.prepare(image, cache):
                    raise AssertionError("not timed out")

    asyncio.run(main())
    assert _leftovers(cache) == NOTHING


@needs_root
def test_async_with_closes_the_session_on_exit_and_on_an_exception(tmp_path: Path) -> None:
    image = _image(tmp_path, 0, layers=1, files=10)
    cache = tmp_path / "cache"

    async def main() -> None:
        async with aio.prepare(image, cache, files={"/etc/hostname": b"vm\n"}) as rootfs:
            session = rootfs.session_dir
            assert session.is_dir() and (rootfs.path / "etc/hostname").read_bytes() == b"vm\n"
        assert not session.exists()

        with pytest.raises(ZeroDivisionError):
            async with aio.prepare(image, cache) as rootfs:
                session = rootfs.session_dir
                assert session.is_dir()
                1 / 0
        assert not session.exists()

        op = aio.prepare(image, cache)
        rootfs = await op  # awaited: the caller owns it
        assert rootfs.session_dir.is_dir()
        with pytest.raises(RuntimeError):
            await op  # once only
        await aio.close(rootfs)
        assert not rootfs.session_dir.exists()

    asyncio.run(main())
    assert _leftovers(cache) == NOTHING


@needs_root
def test_progress_callbacks_sync_and_async_and_stream(tmp_path: Path) -> None:
    image = _image(tmp_path, 0, layers=3, files=5)

    async def main() -> None:
        seen: list[Apply] = []
        async with aio.prepare(image, tmp_path / "c1",
                               progress=lambda e: seen.append(e) if isinstance(e, Apply) and e.done else None):
            pass
        assert [(e.index, e.count) for e in seen] == [(i, 4) for i in range(4)]
        assert seen[0].what.startswith("layer 1/4 sha256:")

        seen_async: list[int] = []

        async def slow(event: Event) -> None:
            await asyncio.sleep(0.01)
            if isinstance(event, Apply) and event.done:
                seen_async.append(event.index)

        async with aio.prepare(image, tmp_path / "c2", progress=slow):
            assert seen_async == [0, 1, 2, 3]  # every callback awaited before the rootfs is handed over

        stream = aio.ProgressStream()
        runner = asyncio.ensure_future(aio.prepare(image, tmp_path / "c3", progress=stream))
        indexes = [event.index async for event in stream if isinstance(event, Apply) and event.done]
        rootfs = await runner
        await aio.close(rootfs)
        assert indexes == [0, 1, 2, 3]

    asyncio.run(main())


@needs_root
def test_a_failing_progress_callback_stops_the_prepare(tmp_path: Path) -> None:
    image = _image(tmp_path, 0, layers=4, files=200)
    cache = tmp_path / "cache"

    def fail(event: Event) -> None:
        if isinstance(event, Apply) and event.index == 1:
            raise ValueError("callback says no")

    async def main() -> None:
        with pytest.raises(ValueError, match="callback says no"):
            await aio.prepare(image, cache, progress=fail)

    asyncio.run(main())
    assert _leftovers(cache) == NOTHING


def test_export_and_pull_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _image(tmp_path, 0, layers=2, files=20)

    async def main() -> None:
        resolved = await aio.pull(image, pull="never")
        assert len(resolved.manifest.layers) == 3
        seen: list[int] = []
        result = await aio.export(image, tmp_path / "out.erofs", format="erofs", cache=None,
                                  progress=lambda e: seen.append(e.index) if isinstance(e, Apply) and e.done else None)
        assert result.path.stat().st_size > 0 and result.digest == str(resolved.manifest_digest)
        assert seen == [0, 1, 2]
        with pytest.raises(DirgeError, match="unknown format"):
            await aio.export(image, tmp_path / "out.x", format="nope")

    monkeypatch.setenv("DIRGE_CACHE_DIR", str(tmp_path / "cache"))
    asyncio.run(main())


@needs_root
def test_gc_off_the_loop(tmp_path: Path) -> None:
    from dirge.lifecycle import GcReport

    image = _image(tmp_path, 0, layers=1, files=10)
    cache = tmp_path / "cache"

    async def main() -> tuple[GcReport, GcReport]:
        async with aio.prepare(image, cache):
            pass
        return await aio.gc(cache, dry_run=True), await aio.gc(Cache(cache))

    dry, real = asyncio.run(main())
    assert isinstance(dry, GcReport) and dry.dry_run and isinstance(real, GcReport) and not real.dry_run
    assert real.size_after <= real.size_before


def test_cancelled_is_a_dirge_error() -> None:
    assert issubclass(Cancelled, DirgeError) and aio.Cancelled is Cancelled
