"""Verified, decompressed blob streams.

A layer is read by a producer thread: raw bytes → size and digest check → decompression (chosen by the
stream's magic bytes, not by the media type, which Docker images sometimes get wrong) → diff_id check →
a bounded queue of chunks. The applier consumes the queue in the calling thread, so decompression and
hashing (which release the GIL) overlap with the filesystem work. Nothing is ever held whole in memory.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sized
from typing import Any, BinaryIO, Protocol, runtime_checkable

import zstandard
from isal import igzip

from ..errors import DirgeError, ImageError, IntegrityError, LimitExceeded
from .reference import Digest
from ..waits import checkpoint, waiting

CHUNK = 1 << 20
_QUEUE_DEPTH = 8  # batches in flight: at most ~8 MiB of decompressed data
_BATCH_BYTES = CHUNK
_BATCH_ITEMS = 2048
_LEND_AFTER = 0.05  # s: a wait for the stage upstream this long is I/O, not its CPU (see items())
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@runtime_checkable
class Interruptible(Protocol):
    """A raw blob reader whose blocked read can be ended from another thread (a download in progress:
    ``sources.partial.PartialReader``); ``LayerStream.close`` uses it to stop promptly."""

    def interrupt(self) -> None: ...


def new_hash(digest: Digest) -> "hashlib._Hash":
    return hashlib.new(digest.algorithm)


class VerifyingReader:
    """Reads a raw blob, hashing and counting; ``verify()`` at the end checks both against the descriptor."""

    def __init__(self, raw: BinaryIO, digest: Digest, size: int | None, what: str) -> None:
        self._raw = raw
        self._digest = digest
        self._size = size
        self._hash = new_hash(digest)
        self._count = 0
        self._pending = b""
        self.what = what

    def peek(self, n: int) -> bytes:
        while len(self._pending) < n:
            more = self._read_raw(CHUNK)
            if not more:
                break
            self._pending += more
        return self._pending[:n]

    def _read_raw(self, n: int) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self._count += len(data)
            if self._size is not None and self._count > self._size:
                raise IntegrityError(f"size of {self.what}", f"{self._size} bytes", f"more than {self._size} bytes")
        return data

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            out, self._pending = (self._pending, b"") if n < 0 or n >= len(self._pending) else (
                self._pending[:n], self._pending[n:])
            return out
        return self._read_raw(CHUNK if n < 0 else n)

    def readinto(self, buf: memoryview | bytearray) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def verify(self) -> None:
        if self._size is not None and self._count != self._size:
            raise IntegrityError(f"size of {self.what}", f"{self._size} bytes", f"{self._count} bytes")
        actual = f"{self._digest.algorithm}:{self._hash.hexdigest()}"
        if actual != str(self._digest):
            raise IntegrityError(f"digest of {self.what}", str(self._digest), actual)


def read_verified(raw: BinaryIO, digest: Digest, size: int | None, what: str, limit: int) -> bytes:
    """A small blob (manifest, config), whole, after checking size and digest; bounded by ``limit``."""
    if size is not None and size > limit:
        raise ImageError(f"read {what}: {size} bytes is more than the {limit} byte bound for metadata")
    reader = VerifyingReader(raw, digest, size, what)
    data = raw_read_bounded(reader, limit, what)
    reader.verify()
    return data


def raw_read_bounded(reader: _Readable, limit: int, what: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    while chunk := reader.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise ImageError(f"read {what}: more than the {limit} byte bound for metadata")
        parts.append(chunk)
    return b"".join(parts)


def sniff_compression(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


def _zstd_chunks(reader: VerifyingReader) -> Iterator[bytes]:
    """Multi-frame zstd with truncation detection (python-zstandard's stream readers end silently).

    ``decompressobj`` has no output bound, so input is fed in slices sized from the ratio seen so far:
    a decompression bomb gets 1 KiB slices, which caps one call's output at a few tens of MiB.
    """
    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj(write_size=CHUNK)
    in_frame = False
    step = 1024
    pending = b""
    while True:
        if not pending:
            pending = reader.read(CHUNK)
            if not pending:
                break
        piece, pending = pending[:step], pending[step:]
        while piece:
            out = obj.decompress(piece)
            in_frame = True
            ratio = len(out) // max(len(piece), 1)
            step = max(1024, min(1 << 17, (4 << 20) // max(ratio, 1)))
            if out:
                yield out
            if obj.eof:
                piece = obj.unused_data
                obj = dctx.decompressobj(write_size=CHUNK)
                in_frame = False
            else:
                piece = b""
    if in_frame:
        raise EOFError("zstd stream ended inside a frame")


def _decompressed(reader: VerifyingReader, compression: str) -> Iterator[bytes]:
    if compression == "gzip":
        gz = igzip.GzipFile(fileobj=reader, mode="rb")  # type: ignore[no-untyped-call]
        return iter(lambda: gz.read(CHUNK), b"")
    if compression == "zstd":
        return _zstd_chunks(reader)
    return iter(lambda: reader.read(CHUNK), b"")


class _Stop(DirgeError):
    """The stream was closed before its end: raised in each stage still running, which then ends."""


class _StoppingReader(VerifyingReader):
    """The raw side of a ``LayerStream``: once stopped, a read raises instead of reading on, so the
    decompress stage never reads (or drains after an error) the rest of a blob nobody wants."""

    def __init__(self, raw: BinaryIO, digest: Digest, size: int | None, what: str, stop: threading.Event) -> None:
        super().__init__(raw, digest, size, what)
        self._stop = stop

    def _read_raw(self, n: int) -> bytes:
        if self._stop.is_set():
            raise _Stop(f"{self.what}: reading stopped")
        return super()._read_raw(n)


class _Pipe:
    """A generator run on its own thread; its items come out of ``items()`` in order, in batches
    (one queue operation per ~1 MiB, not per tar entry). An error is raised to the consumer after
    everything produced before it.

    Stopping (``stop`` set, then ``cancel()``) ends both sides wherever they wait: the consumer checks
    ``stop`` before each ``get()`` and a stop marker wakes one already blocked there; the producer checks
    it before each ``put()`` and the emptied queue wakes one already blocked there."""

    def __init__(self, produce: Callable[[], Generator[Sized, None, None]], name: str, what: str,
                 stop: threading.Event) -> None:
        self.what = what
        self._queue: queue.Queue[list[Sized] | BaseException | None] = queue.Queue(_QUEUE_DEPTH)
        self._stop = stop
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: list[Sized] | BaseException | None) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop(f"{self.what}: reading stopped")
            try:
                self._queue.put(item, timeout=0.1)  # the timeout is a safety net: cancel() wakes this
                return
            except queue.Full:
                continue

    def _run(self, produce: Callable[[], Generator[Sized, None, None]]) -> None:
        items = produce()
        batch: list[Sized] = []
        try:
            size = 0
            for item in items:
                batch.append(item)
                size += len(item)
                if size >= _BATCH_BYTES or len(batch) >= _BATCH_ITEMS:
                    self._put(batch)
                    batch, size = [], 0
            if batch:
                self._put(batch)
            self._put(None)
            return
        except _Stop:
            pass
        except BaseException as exc:
            try:
                if batch:
                    self._put(batch)
                self._put(exc)
                return
            except _Stop:
                pass
        # Stopped: the stage downstream may be blocked in get() on this queue, and ends only on a marker
        # (it was a hang when this thread just returned). Clean up the generator here, not in whatever
        # thread collects it.
        self._wake()
        try:
            items.close()
        except Exception:  # nobody wants its errors any more
            pass

    def _wake(self) -> None:
        try:
            self._queue.put_nowait(_Stop(f"{self.what}: reading stopped"))
        except queue.Full:  # then the consumer is not blocked in get(), and checks stop before the next one
            pass

    def cancel(self) -> None:
        """After ``stop`` is set: drop what is queued (waking a producer blocked in put()) and leave a stop
        marker (waking a consumer blocked in get())."""
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._wake()

    def items(self) -> Iterator[Any]:
        while not self._done:
            if self._stop.is_set():  # once per batch, so a stage stopped mid-stream ends promptly
                raise _Stop(f"{self.what}: reading stopped")
            checkpoint()  # and a dirge.aio call cancelled mid-layer stops here, not at the next layer
            try:
                item = self._queue.get(timeout=_LEND_AFTER)
            except queue.Empty:  # the stage upstream is stalled, on a download most often (not on parsing,
                with waiting():  # which takes the GIL: lending then would only add runnable threads)
                    item = self._queue.get()
            if isinstance(item, list):
                yield from item
                continue
            self._done = True
            if item is None:
                return
            if isinstance(item, DirgeError):
                raise item
            raise ImageError(f"read {self.what}: {item}") from item

    def join(self) -> None:
        self._thread.join()


class LayerStream:
    """A layer blob, verified and decompressed by a pipeline of threads; ``close()`` ends it and raises
    what it found.

    Thread 1 reads the blob (size and digest), and decompresses; thread 2 hashes the result for the
    diff_id and runs ``transform`` (the tar parser); ``items()`` hands its output to the caller. zlib-ng
    /ISA-L, zstd and hashlib release the GIL, so the stages overlap with the caller's filesystem work.
    Call ``close()`` after consuming: it drains whatever the caller left, so the digest and diff_id
    always cover the whole blob.

    ``max_bytes`` (``Limits.max_layer_bytes``) bounds the decompressed stream. It is counted here, as
    thread 1 produces it, because every later byte passes this point: entry data of any type, records
    the tar parser skips, and whatever follows the end-of-archive marker (which the drain in
    ``_parsed`` and ``close()`` would otherwise decompress and hash without end).
    """

    def __init__(self, raw: BinaryIO, digest: Digest, size: int | None, diff_id: Digest | None, what: str,
                 transform: Callable[[Iterator[bytes]], Iterator[Sized]] | None = None,
                 max_bytes: int | None = None) -> None:
        self.what = what
        self.compression = "none"
        self._digest = digest
        self._max_bytes = max_bytes
        self._raw = raw
        self._stop = threading.Event()
        self._reader = _StoppingReader(raw, digest, size, what, self._stop)
        self._diff_id = diff_id
        self._transform = transform or (lambda chunks: chunks)
        self._decompress = _Pipe(self._decompressed, f"dirge-decompress {what}", what, self._stop)
        self._parse = _Pipe(self._parsed, f"dirge-parse {what}", what, self._stop)

    def _decompressed(self) -> Generator[bytes, None, None]:
        """Decompressed chunks; at the end, the blob's size and digest are checked."""
        self.compression = sniff_compression(self._reader.peek(4))
        try:
            yield from self._bounded(_decompressed(self._reader, self.compression))
        except (EOFError, OSError, zstandard.ZstdError) as exc:
            # Check the blob itself first: a truncated or altered blob is an integrity failure.
            self._reader.drain()
            self._reader.verify()
            raise ImageError(f"decompress {self.what} ({self.compression}): {exc or 'stream ended early'}") from exc
        self._reader.drain()
        self._reader.verify()

    def _bounded(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks``, stopping with ``LimitExceeded`` at the chunk that crosses ``max_bytes`` (which is
        not passed on: nothing downstream ever sees a byte past the limit)."""
        limit = self._max_bytes
        if limit is None:
            yield from chunks
            return
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise LimitExceeded("max_layer_bytes", total, limit, layer=str(self._digest))
            yield chunk

    def _hashed(self) -> Iterator[bytes]:
        diff_hash = new_hash(self._diff_id) if self._diff_id else None
        for chunk in self._decompress.items():
            if diff_hash:
                diff_hash.update(chunk)
            yield chunk
        if diff_hash and self._diff_id:
            actual = f"{self._diff_id.algorithm}:{diff_hash.hexdigest()}"
            if actual != str(self._diff_id):
                raise IntegrityError(f"diff_id of {self.what}", str(self._diff_id), actual)

    def _parsed(self) -> Generator[Sized, None, None]:
        source = self._hashed()
        yield from self._transform(source)
        for _ in source:  # what the transform left (tar padding) still counts for the digests
            pass

    def items(self) -> Iterator[Any]:
        """The stream's items (decompressed chunks, or what ``transform`` made of them), in order."""
        return self._parse.items()

    def close(self, *, drain: bool = True) -> None:
        """Consume the rest (so verification covers the whole blob) and surface any error."""
        try:
            if drain:
                for _ in self.items():
                    pass
        finally:
            # Stop every stage wherever it waits, so the joins return: a raw read of a download in
            # progress (interrupt), a put() on a full queue or a get() on an empty one (cancel).
            self._stop.set()
            if isinstance(self._raw, Interruptible):
                self._raw.interrupt()
            self._parse.cancel()
            self._decompress.cancel()
            self._parse.join()
            self._decompress.join()
            self._raw.close()
