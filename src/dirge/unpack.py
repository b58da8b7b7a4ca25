"""The unpack pipeline: reference → resolve → fetch (verified streams) → apply, published atomically."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .apply.fs import PrivilegedFS, Report, RootlessFS
from .apply.dirsink import DirSink
from .apply.layer import Applier, Limits
from .apply.tar import EntryStream, tokens
from .apply.tree import Sink
from .blob import LayerStream
from .errors import DirgeError
from .fsutil import remove_tree
from .image import Descriptor, Platform
from .reference import LayoutReference, RegistryReference, parse_reference
from .resolve import BlobSource, Prefetching, ResolvedImage, resolve_manifest
from .sources.layout import LayoutSource
from .sources.partial import StreamRestarted

if TYPE_CHECKING:
    from .cache import Cache
    from .sources.auth import Credentials
    from .sources.buildah import LocalImage


def add_context(exc: DirgeError, context: str) -> DirgeError:
    """Prefix the message in place, keeping the exception's class (messages join level by level)."""
    exc.args = (f"{context}: {exc.args[0] if exc.args else exc}",) + exc.args[1:]
    return exc


@dataclass
class UnpackResult:
    image: ResolvedImage
    report: Report = field(default_factory=Report)


ProgressFn = Callable[[str, int, int], None]  # (what, layer index, layer count)


PULL_POLICIES = ("always", "missing", "never")


def open_image(
    image: str,
    platform: Platform | None = None,
    *,
    cache: "Cache | None" = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
    on_bytes: "Callable[[Descriptor, int], None] | None" = None,
) -> tuple[BlobSource, ResolvedImage]:
    """Resolve ``image`` to one manifest and config, from the source its reference names.

    Registry images keep their blobs in ``cache`` (the default cache if None); local variants are built
    (if missing or stale) and exported there too. The caller closes the source.
    """
    source, start, name = open_start(image, cache=cache, pull=pull, creds=creds, on_bytes=on_bytes)
    try:
        return source, resolve_manifest(source, start, name, platform)
    except BaseException:
        source.close()
        raise


def open_start(
    image: str,
    *,
    cache: "Cache | None" = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
    on_bytes: "Callable[[Descriptor, int], None] | None" = None,
) -> tuple[BlobSource, Descriptor, str]:
    """The source of ``image``, the descriptor its reference names (an index or a manifest) and the
    canonical ref text, before any platform is chosen (``open_image``, ``inspect``). The caller closes
    the source."""
    if pull not in PULL_POLICIES:
        raise DirgeError(f"--pull must be one of {', '.join(PULL_POLICIES)}, not {pull!r}")
    ref = parse_reference(image)
    if isinstance(ref, LayoutReference):
        source = LayoutSource(ref.path)
        start = source.select(ref)
        if cache is not None:
            cache.record_ref(str(ref), start.digest)
        return source, start, str(ref)
    if isinstance(ref, RegistryReference):
        from .cache import Cache
        from .sources.registry import RegistryClient, RegistrySource, start_descriptor

        cache = cache or Cache()
        registry_ref = ref

        def make_client() -> RegistryClient:
            client = RegistryClient(registry_ref.registry, creds=creds)
            client.on_bytes = on_bytes
            return client

        # Built only when a blob is missing (credential helpers run then); never with --pull never.
        registry_source = RegistrySource(make_client if pull != "never" else None, ref, cache)
        try:
            return registry_source, start_descriptor(ref, cache, registry_source.client, pull), str(ref)
        except BaseException:
            registry_source.close()
            raise
    from .cache import Cache
    from .sources.buildah import open_local

    cache = cache or Cache()
    local_source, local_start = open_local(ref, cache.root, build=_build_variant)
    try:
        cache.record_ref(str(ref), local_start.digest)
    except BaseException:
        local_source.close()
        raise
    return local_source, local_start, str(ref)


def _build_variant(name: str, cache_root: Path) -> LocalImage:
    """The current image of local variant ``name``, built first if missing or stale (handed to the
    buildah source, which does not import the variant builder above it)."""
    from .variants import build_guest_image

    return build_guest_image(name, cache_root=cache_root).image


def pull_image(image: str, platform: Platform | None = None, *, cache: "Cache | None" = None,
               pull: str = "always", creds: "Credentials | None" = None,
               on_bytes: "Callable[[Descriptor, int], None] | None" = None) -> ResolvedImage:
    """Make sure the manifest, config and every layer blob of ``image`` are in the cache."""
    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds, on_bytes=on_bytes)
    try:
        if isinstance(source, Prefetching):
            source.prefetch(resolved.manifest.layers)
            source.wait()
        else:
            for desc in resolved.manifest.layers:
                source.open_blob(desc).close()
    finally:
        source.close()
    return resolved


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
            if progress:
                progress(what, i, len(layers))
            stream = LayerStream(source.open_blob(desc), desc.digest, desc.size, diff_id, what,
                                 transform=functools.partial(tokens, limits=limits),
                                 max_bytes=limits.max_layer_bytes)
            try:
                applier.apply_layer(EntryStream(stream.items()))
                stream.close()
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


def unpack(
    image: str,
    dest: str | os.PathLike[str],
    *,
    platform: Platform | None = None,
    rootless: bool | None = None,
    limits: Limits = Limits(),
    progress: ProgressFn | None = None,
    cache: "Cache | None" = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
    on_bytes: "Callable[[Descriptor, int], None] | None" = None,
) -> UnpackResult:
    """Write the flattened rootfs of ``image`` into ``dest`` (absent or empty), all or nothing."""
    dest = Path(dest)
    if rootless is None:
        rootless = os.geteuid() != 0
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise DirgeError(f"unpack {image}: destination {dest} exists and is not an empty directory")
    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds, on_bytes=on_bytes)
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
