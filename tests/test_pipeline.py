"""The layer pipeline ends promptly when its consumer stops early, whatever its threads are blocked on.

Each test stops a real ``LayerStream`` (real tar bytes, parsed by the real tar tokenizer) the way it is
stopped in practice -- Ctrl-C, an unsafe entry, a full disk while the layer still downloads, a sink that
fails after the first batch -- and asserts that ``close(drain=False)`` (or ``unpack``) returns within a
bounded time and leaves no ``dirge-`` thread behind. Nothing sleeps: raw readers block on events, and a
hang shows up as a watchdog ``join(timeout=...)`` that runs out.

Most layers are plain tars whose one big file's data is laid out so the parse stage flushes a batch
exactly at each MiB of the blob (``_aligned_layer``). With the raw reader blocked at a MiB boundary, a
consumer that has seen every byte before it knows the parse stage has nothing left to hand over and can
only wait on the decompress stage: the state in which a stop that did not travel downstream hung.
"""

from __future__ import annotations

import errno
import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

from dirge import DirgeError, IntegrityError, UnsafeLayer, unpack
from dirge.apply.tar import tokens
from dirge.oci.blob import _BATCH_BYTES, _QUEUE_DEPTH, CHUNK, LayerStream
from dirge.layerbuild import LayerBuilder
from dirge.oci.reference import Digest, parse_digest
from dirge.sources.layout import LayoutSource

DEADLINE = 10.0  # seconds; a prompt shutdown takes milliseconds, a hang takes forever
MIB = 1 << 20
LARGE = 3 * _QUEUE_DEPTH * _BATCH_BYTES  # more than both stages' queues hold together


# -- layers and readers ------------------------------------------------------------------------------


def _aligned_layer(size: int, *, hardlink_first: bool = False) -> bytes:
    """A tar of a few header-only entries then one file of ``size`` bytes; the headers plus the first
    data piece weigh exactly one MiB, so each of the parse stage's batches ends on a MiB of the blob."""
    b = LayerBuilder()
    if hardlink_first:
        b.hardlink("h", "missing")  # a hardlink to nothing: the applier refuses it
    b.dir("d").file("d/big", bytes(range(256)) * (size // 256))
    tar = b.build()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:  # pinned: no PAX headers sneaked in
        assert t.getmember("d/big").offset_data == 512 * (3 if hardlink_first else 2)
    assert CHUNK == _BATCH_BYTES == MIB
    return tar


def _gzip_layer(files: int, size: int, *, hardlink_first: bool = False) -> bytes:
    """Moderately compressible files, so gzip has real work to do."""
    b = LayerBuilder()
    if hardlink_first:
        b.hardlink("h", "missing")
    b.dir("d")
    for i in range(files):
        rng = random.Random(i)
        block = bytes(rng.getrandbits(8) for _ in range(4096))
        b.file(f"d/f{i}", (block * (size // len(block) + 1))[:size])
    return b.build()


def _digest(data: bytes) -> Digest:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


class GatedReader:
    """A raw blob reader like a download in progress: ``data[:gate]`` has arrived, the rest arrives on
    ``release()``; until then a read at the gate blocks (and sets ``blocked``). No ``interrupt()``."""

    def __init__(self, data: bytes, gate: int | None = None) -> None:
        self.data = data
        self.gate = len(data) if gate is None else gate
        self._open = threading.Event()
        self.position = 0
        self.blocked = threading.Event()
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if self.position == self.gate < len(self.data) and not self._open.is_set():
            self.blocked.set()
            self._open.wait()
        self._check()
        end = len(self.data) if self._open.is_set() else self.gate
        out = self.data[self.position:end if n < 0 else min(end, self.position + n)]
        self.position += len(out)
        return out

    def _check(self) -> None:
        pass

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.closed = True


class InterruptibleReader(GatedReader):
    """A ``GatedReader`` with ``interrupt()``, like ``PartialReader``: a blocked (or later) read raises."""

    interrupted = False

    def interrupt(self) -> None:
        self.interrupted = True
        self._open.set()

    def _check(self) -> None:
        if self.interrupted:
            raise DirgeError("reading stopped")


def _stream(tar: bytes, reader: GatedReader | None = None, *, gzip: bool = False,
            gate: int | None = None, interruptible: bool = True, what: str) -> tuple[LayerStream, GatedReader]:
    blob = igzip.compress(tar, compresslevel=1) if gzip else tar
    if reader is None:
        reader = (InterruptibleReader if interruptible else GatedReader)(blob, gate)
    stream = LayerStream(reader, _digest(blob), len(blob), _digest(tar), what,  # type: ignore[arg-type]
                         transform=tokens)
    return stream, reader


# -- watchdogs ---------------------------------------------------------------------------------------


def _pipeline_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dirge-") and t not in before]


@pytest.fixture
def no_thread_left() -> Iterator[None]:
    """Fails the test if a ``dirge-`` thread started during it is still alive at its end (bounded wait)."""
    before = set(threading.enumerate())
    yield
    for t in _pipeline_threads(before):
        t.join(timeout=DEADLINE)
    left = _pipeline_threads(before)
    assert not left, f"pipeline threads left running: {[t.name for t in left]}"


def _within_deadline(fn: Callable[[], Any], what: str) -> BaseException | None:
    """Run ``fn`` on a watchdog thread and fail if it has not returned after ``DEADLINE``; returns what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test
            raised.append(exc)

    t = threading.Thread(target=run, name=f"watchdog {what}", daemon=True)
    t.start()
    t.join(timeout=DEADLINE)
    assert not t.is_alive(), f"{what} hung (still running after {DEADLINE} s)"
    return raised[0] if raised else None


def _close_promptly(stream: LayerStream, reader: GatedReader, *, release: bool = False) -> None:
    """``close(drain=False)`` on a watchdog; ``release``: the download goes on meanwhile."""
    closer = threading.Thread(target=lambda: stream.close(drain=False), name="watchdog close", daemon=True)
    closer.start()
    if release:
        reader.release()
    closer.join(timeout=DEADLINE)
    assert not closer.is_alive(), f"close(drain=False) hung (still running after {DEADLINE} s)"
    assert reader.closed


def _consume(stream: LayerStream, fail: Callable[[int, int], BaseException | None]) -> None:
    """The consumer (the applier's side): ``fail(index, bytes so far)`` may return an error to raise."""
    seen = 0
    for i, item in enumerate(stream.items()):
        seen += len(item)
        error = fail(i, seen)
        if error is not None:
            raise error


def _consume_and_close(stream: LayerStream, reader: GatedReader, fail: Callable[[int, int], BaseException | None],
                       *, release: bool = False) -> None:
    """What ``unpack`` does: consume; on any error, ``close(drain=False)`` and re-raise."""
    try:
        _consume(stream, fail)
    except BaseException:
        _close_promptly(stream, reader, release=release)
        raise
    raise AssertionError("the consumer was meant to fail")


# -- one test per way a consumer stops early ---------------------------------------------------------


def test_keyboard_interrupt_mid_layer(no_thread_left: None) -> None:
    """Ctrl-C in the consuming thread while the layer is still downloading (the raw reader is blocked)."""
    stream, reader = _stream(_aligned_layer(12 * MIB), gate=3 * MIB, what="layer ctrl-c")
    with pytest.raises(KeyboardInterrupt):
        _consume_and_close(stream, reader, lambda i, seen: KeyboardInterrupt() if seen >= reader.gate else None)
    assert reader.interrupted and reader.position == reader.gate


def test_unsafe_layer_after_first_entry(no_thread_left: None) -> None:
    """The applier refuses the first entry (a hardlink to nothing); many MB of the layer are still to come."""
    stream, reader = _stream(_aligned_layer(16 * MIB, hardlink_first=True), gate=MIB, what="layer unsafe")

    def fail(i: int, seen: int) -> BaseException | None:
        assert i == 0  # the first entry; its batch holds the whole first MiB
        return UnsafeLayer("h", "hardlink target missing does not exist")

    with pytest.raises(UnsafeLayer):
        _consume_and_close(stream, reader, fail)
    assert reader.position == MIB


def test_enospc_while_layer_downloads(no_thread_left: None) -> None:
    """The sink hits a full disk while the raw reader is blocked mid-blob, waiting for the download."""
    stream, reader = _stream(_aligned_layer(8 * MIB), gate=2 * MIB, what="layer enospc")

    def fail(i: int, seen: int) -> BaseException | None:
        if seen < reader.gate:
            return None
        assert reader.blocked.wait(DEADLINE)
        return OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        _consume_and_close(stream, reader, fail)
    assert info.value.errno == errno.ENOSPC
    assert reader.position == reader.gate  # the rest of the blob was never read


def test_enospc_while_reader_still_producing(no_thread_left: None) -> None:
    """Same with a raw reader that has no ``interrupt()`` and goes on producing while the stream closes."""
    stream, reader = _stream(_aligned_layer(8 * MIB), gate=2 * MIB, interruptible=False, what="layer enospc 2")

    def fail(i: int, seen: int) -> BaseException | None:
        return OSError(errno.ENOSPC, "No space left on device") if seen >= reader.gate else None

    with pytest.raises(OSError):
        _consume_and_close(stream, reader, fail, release=True)
    assert reader.position < len(reader.data)  # stop travelled upstream: not read to the end


def test_sink_fails_after_first_batch_of_large_layer(no_thread_left: None) -> None:
    """A layer bigger than both stages' queues; the sink fails after the first batch while the rest arrives."""
    stream, reader = _stream(_aligned_layer(LARGE), gate=MIB, interruptible=False, what="layer first batch")

    def fail(i: int, seen: int) -> BaseException | None:
        return RuntimeError("sink failed") if seen >= _BATCH_BYTES else None

    with pytest.raises(RuntimeError, match="sink failed"):
        _consume_and_close(stream, reader, fail, release=True)
    assert reader.position < len(reader.data)  # stop travelled upstream: not read to the end


def test_sink_fails_after_first_batch_everything_arrived(no_thread_left: None) -> None:
    """Same, gzip, with the whole blob there: both stages run ahead, fill their queues and block in put()."""
    stream, reader = _stream(_gzip_layer(2 * LARGE // MIB, MIB), gzip=True, what="layer first batch gzip")
    with pytest.raises(RuntimeError, match="sink failed"):
        _consume_and_close(stream, reader, lambda i, seen: RuntimeError("sink failed") if seen >= _BATCH_BYTES
                           else None)
    assert reader.position < len(reader.data) // 2  # the queues hold ~16 MiB of the 48 decompressed


# -- close() still verifies the whole blob -----------------------------------------------------------


@pytest.mark.parametrize("gzip", [False, True], ids=["tar", "gzip"])
def test_close_drains_and_verifies(no_thread_left: None, gzip: bool) -> None:
    tar = _aligned_layer(LARGE) if not gzip else _gzip_layer(LARGE // MIB, MIB)
    stream, reader = _stream(tar, gzip=gzip, what="layer verify")
    next(iter(stream.items()))
    assert _within_deadline(stream.close, "close()") is None
    assert reader.position == len(reader.data) and reader.closed

    blob = igzip.compress(tar, compresslevel=1) if gzip else tar
    bad = GatedReader(blob)
    stream = LayerStream(bad, _digest(blob + b"x"), len(blob), _digest(tar), "layer bad",  # type: ignore[arg-type]
                         transform=tokens)
    next(iter(stream.items()))
    error = _within_deadline(stream.close, "close() of a bad blob")
    assert isinstance(error, IntegrityError) and "digest of layer bad" in str(error), error
    assert bad.position == len(blob) and bad.closed


def test_items_after_close_raise(no_thread_left: None) -> None:
    stream, reader = _stream(_aligned_layer(4 * MIB), gate=MIB, what="layer reuse")
    next(iter(stream.items()))
    _close_promptly(stream, reader)
    with pytest.raises(DirgeError, match="stopped"):
        next(iter(stream.items()))


# -- end to end --------------------------------------------------------------------------------------


@pytest.mark.parametrize("download", [False, True], ids=["file", "download-in-progress"])
def test_unpack_unsafe_first_entry_returns_promptly(tmp_path: Path, make_image, monkeypatch: pytest.MonkeyPatch,
                                                    no_thread_left: None, download: bool) -> None:
    """``unpack`` of an image whose first entry is unsafe, followed by many MB: it fails, promptly."""
    if download:  # the first MiB has arrived when the applier refuses the first entry; the rest is slow
        ref = make_image([_aligned_layer(16 * MIB, hardlink_first=True)], compression="none")
        opened = LayoutSource.open_blob
        readers: list[InterruptibleReader] = []

        def open_blob(self: LayoutSource, desc: Any) -> Any:
            f = opened(self, desc)
            if not desc.media_type.endswith(".tar"):
                return f
            with f:
                readers.append(InterruptibleReader(f.read(), MIB))
            return readers[-1]

        monkeypatch.setattr(LayoutSource, "open_blob", open_blob)
    else:
        ref = make_image([_gzip_layer(16, MIB, hardlink_first=True)])

    error = _within_deadline(lambda: unpack(ref, tmp_path / "rootfs"), "unpack")
    assert isinstance(error, UnsafeLayer), error
    assert "hardlink target missing does not exist" in str(error)
    assert not (tmp_path / "rootfs").exists()
    if download:
        assert len(readers) == 1 and readers[0].closed and readers[0].interrupted
