"""Applying an image: its layers' verified streams merged through a sink (a directory, an erofs image, an
ext4 disk), and ``unpack``, an image opened (``sources.open``) and applied to a directory atomically."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .apply.fs import PrivilegedFS, Report, RootlessFS
from .apply.dirsink import DirSink
from .apply.layer import Applier, Limits
from .apply.tar import EntryStream, Token, tokens
from .apply.tree import Sink
from .errors import DirgeError
from .events import Apply, ProgressFn, downloads, emit
from .fsutil import remove_tree
from .oci.blob import LayerStream
from .oci.image import Descriptor
from .oci.resolve import BlobSource, Prefetching, ResolvedImage
from .options import CacheLike, PlatformLike, PullPolicy, as_cache, as_platform
from .sources.open import open_image
from .sources.partial import StreamRestarted
from .variants import build_variant

if TYPE_CHECKING:
    from .sources.auth import Credentials, RegistryOptions


def add_context(exc: DirgeError, context: str) -> DirgeError:
    """Prefix the message in place, keeping the exception's class (messages join level by level)."""
    exc.args = (f"{context}: {exc.args[0] if exc.args else exc}",) + exc.args[1:]
    return exc


@dataclass
class UnpackResult:
    image: ResolvedImage
    report: Report = field(default_factory=Report)


SinkFactory = Callable[[Report], Sink]


def apply_image(
    source: BlobSource,
    resolved: ResolvedImage,
    dest: str | os.PathLike[str],
    *,
    rootless: bool,
    limits: Limits = Limits(),
    progress: ProgressFn | None = None,
) -> Report:
    """Apply every layer of ``resolved`` onto the existing directory ``dest``."""

    def make_sink(report: Report) -> Sink:
        return DirSink(dest, RootlessFS(report) if rootless else PrivilegedFS(report), limits.max_depth)

    def reset() -> None:
        with os.scandir(dest) as children:
            for child in list(children):
                remove_tree(Path(child.path))

    return apply_layers(source, resolved, make_sink, reset, limits=limits, progress=progress)


def image_identity(resolved: ResolvedImage) -> tuple[bytes, int]:
    """The UUID and build time of ``resolved``'s filesystem images, derived from the image itself (the
    manifest digest; the config's ``created``), so one manifest always gives the same bytes."""
    uuid = hashlib.sha256(b"dirge erofs uuid\0" + str(resolved.manifest_digest).encode()).digest()[:16]
    created = 0
    try:
        value = json.loads(resolved.config.raw).get("created")
        if isinstance(value, str):
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
            created = max(0, int(when.timestamp())) * 1_000_000_000
    except (ValueError, AttributeError, OverflowError):
        pass
    return uuid, created


def write_erofs(source: BlobSource, resolved: ResolvedImage, path: Path, *, limits: Limits = Limits(),
                progress: ProgressFn | None = None) -> Report:
    """Write the flattened image as an erofs image file at ``path`` (created or truncated), straight
    from the layer streams: no tree on disk, no privilege needed (owners and devices are data)."""
    from .fsimage.erofs import ErofsSink

    return _write_image(source, resolved, path, lambda uuid, built, report: ErofsSink(
        path, uuid=uuid, build_time_ns=built, report=report), limits, progress)


def write_ext4(source: BlobSource, resolved: ResolvedImage, path: Path, *, size: int | None = None,
               journal: bool = True, inodes: int | None = None, limits: Limits = Limits(),
               progress: ProgressFn | None = None) -> Report:
    """Write the flattened image as an ext4 disk image at ``path`` (``size`` None: content plus
    headroom), straight from the layer streams; no privilege needed."""
    from .fsimage.ext4 import Ext4Sink

    return _write_image(source, resolved, path, lambda uuid, built, report: Ext4Sink(
        path, uuid=uuid, build_time_ns=built, size=size, inodes=inodes, journal=journal, label=b"dirge-rootfs",
        report=report), limits, progress)


def _write_image(source: BlobSource, resolved: ResolvedImage, path: Path,
                 make: Callable[[bytes, int, Report], Sink], limits: Limits, progress: ProgressFn | None) -> Report:
    """One image file from the layers, its identity (UUID, build time) derived from the image; a
    restarted apply starts the file again."""
    uuid, build_time_ns = image_identity(resolved)
    return apply_layers(source, resolved, lambda report: make(uuid, build_time_ns, report),
                        lambda: path.unlink(missing_ok=True), limits=limits, progress=progress)


def apply_layers(source: BlobSource, resolved: ResolvedImage, make_sink: SinkFactory, reset: Callable[[], None],
                 *, limits: Limits = Limits(), progress: ProgressFn | None = None) -> Report:
    """Merge every layer of ``resolved`` through a new sink from ``make_sink``; ``reset`` undoes a
    sink's partial output before a restart."""
    if isinstance(source, Prefetching):  # registries: every layer downloads (in parallel) while it is applied
        source.prefetch(resolved.manifest.layers)
    for attempt in range(_RESTARTS + 1):
        try:
            return _apply_layers(source, resolved, make_sink, limits, progress)
        except StreamRestarted:
            # A mirror sent wrong bytes that were already applied; the download goes on from the
            # origin, so start again from nothing.
            if attempt == _RESTARTS:
                raise
            reset()
    raise AssertionError("unreachable")


_RESTARTS = 2


def _apply_layers(source: BlobSource, resolved: ResolvedImage, make_sink: SinkFactory,
                  limits: Limits, progress: ProgressFn | None) -> Report:
    report = Report()
    # Directories no entry names get the image's build time, in every sink (docs/ARCHITECTURE.md).
    applier = Applier(make_sink(report), report, limits, implicit_mtime_ns=image_identity(resolved)[1])
    layers = resolved.manifest.layers
    try:
        for i, (desc, diff_id) in enumerate(zip(layers, resolved.config.diff_ids)):
            what = f"layer {i + 1}/{len(layers)} {desc.digest.short}"
            event = Apply(i, len(layers), str(desc.digest), report.entries, report.bytes)
            emit(progress, event)
            stream = LayerStream(source.open_blob(desc), desc.digest, desc.size, diff_id, what,
                                 transform=functools.partial(tokens, limits=limits),
                                 max_bytes=limits.max_layer_bytes)
            try:
                items = stream.items() if progress is None else _reporting(stream.items(), event, report, progress)
                applier.apply_layer(EntryStream(items))
                stream.close()
                emit(progress, Apply(i, len(layers), str(desc.digest), report.entries, report.bytes, done=True))
            except StreamRestarted:
                stream.close(drain=False)
                raise
            except DirgeError as exc:
                stream.close(drain=False)
                raise add_context(exc, f"apply {what}") from exc.__cause__
            except BaseException:
                stream.close(drain=False)
                raise
        applier.finish()
    finally:
        applier.close()
    return report


_APPLY_EVERY = 0.2  # seconds between Apply events within a layer: a display redraws no faster


def _reporting(items: Iterator[Token], layer: Apply, report: Report, progress: ProgressFn) -> Iterator[Token]:
    """``items`` as they are, with an Apply event (entries and bytes so far) at most every _APPLY_EVERY."""
    last = time.monotonic()
    for n, item in enumerate(items):
        yield item
        if n & 63 == 63:  # the clock read every 64 items: cheap beside the work per item
            now = time.monotonic()
            if now - last >= _APPLY_EVERY:
                last = now
                progress(Apply(layer.index, layer.count, layer.digest, report.entries, report.bytes))


def unpack(
    image: str,
    dest: str | os.PathLike[str],
    *,
    platform: PlatformLike | None = None,
    rootless: bool | None = None,
    limits: Limits = Limits(),
    progress: ProgressFn | None = None,
    cache: CacheLike | None = None,
    pull: PullPolicy = "missing",
    creds: "Credentials | None" = None,
    registry_options: "RegistryOptions | None" = None,
) -> UnpackResult:
    """Write the flattened rootfs of ``image`` into ``dest`` (absent or empty), all or nothing.
    ``platform``: "os/arch[/variant]" or a Platform (None: the host's); ``cache``: a directory or a Cache
    for registry blobs and built variants (None: the default cache when one is needed; an ``oci:`` layout
    needs none). ``progress`` gets every ``dirge.events`` event: downloads, then each layer's Apply events."""
    dest = Path(dest)
    wanted = as_platform(platform)
    if rootless is None:
        rootless = os.geteuid() != 0
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise DirgeError(f"unpack {image}: destination {dest} exists and is not an empty directory")
    source, resolved = open_image(image, wanted, cache=as_cache(cache), pull=pull, creds=creds,
                                  registry_options=registry_options, on_bytes=downloads(progress),
                                  build=build_variant)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The tree is written inside a 0700 directory (mkdtemp's): until every layer's digest has been
        # checked and the tree moved to ``dest``, no other user can reach a file of it.
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".dirge-staging", dir=dest.parent))
    except BaseException:
        source.close()
        raise
    try:
        tree = staging / "rootfs"
        tree.mkdir()
        os.chmod(tree, 0o755)  # the root's mode unless the image sets it
        report = apply_image(source, resolved, tree, rootless=rootless, limits=limits, progress=progress)
        if dest.exists():
            dest.rmdir()
        mode = stat.S_IMODE(os.stat(tree).st_mode)
        if not mode & 0o200:  # moving a directory to another parent rewrites its "..": rootless needs u+w
            os.chmod(tree, mode | 0o200)
        os.rename(tree, dest)
        if not mode & 0o200:
            os.chmod(dest, mode)
        staging.rmdir()
    except DirgeError as exc:
        remove_tree(staging)
        raise add_context(exc, f"unpack {image}") from exc.__cause__
    except BaseException:
        remove_tree(staging)
        raise
    finally:
        source.close()
    return UnpackResult(resolved, report)
