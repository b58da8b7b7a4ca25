"""The unpack pipeline: reference → resolve → fetch (verified streams) → apply, published atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .apply.fs import PrivilegedFS, Report, RootlessFS
from .apply.layer import Applier, Limits
from .apply.tar import EntryStream, tokens
from .blob import LayerStream
from .errors import DirgeError
from .image import Platform
from .reference import LayoutReference, parse_reference
from .resolve import BlobSource, ResolvedImage, resolve_manifest
from .sources.layout import LayoutSource


def add_context(exc: DirgeError, context: str) -> DirgeError:
    """Prefix the message in place, keeping the exception's class (messages join level by level)."""
    exc.args = (f"{context}: {exc.args[0] if exc.args else exc}",) + exc.args[1:]
    return exc


@dataclass
class UnpackResult:
    image: ResolvedImage
    report: Report = field(default_factory=Report)


ProgressFn = Callable[[str, int, int], None]  # (what, layer index, layer count)


def open_image(image: str, platform: Platform | None = None) -> tuple[BlobSource, ResolvedImage]:
    """Resolve ``image`` to one manifest and config, from the source its reference names."""
    ref = parse_reference(image)
    if isinstance(ref, LayoutReference):
        source = LayoutSource(ref.path)
        return source, resolve_manifest(source, source.select(ref), str(ref), platform)
    raise DirgeError(
        f"open {image}: only oci:PATH[:TAG] images can be unpacked in this version "
        "(registry pulls and local variants are not implemented yet)"
    )


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
    report = Report()
    fs = RootlessFS(report) if rootless else PrivilegedFS(report)
    applier = Applier(dest, fs, limits)
    layers = resolved.manifest.layers
    try:
        for i, (desc, diff_id) in enumerate(zip(layers, resolved.config.diff_ids)):
            what = f"layer {i + 1}/{len(layers)} {desc.digest.short}"
            if progress:
                progress(what, i, len(layers))
            stream = LayerStream(source.open_blob(desc), desc.digest, desc.size, diff_id, what, transform=tokens)
            try:
                applier.apply_layer(EntryStream(stream.items()))
                stream.close()
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
) -> UnpackResult:
    """Write the flattened rootfs of ``image`` into ``dest`` (absent or empty), all or nothing."""
    dest = Path(dest)
    if rootless is None:
        rootless = os.geteuid() != 0
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise DirgeError(f"unpack {image}: destination {dest} exists and is not an empty directory")
    source, resolved = open_image(image, platform)  # its errors name the ref already
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".dirge-staging", dir=dest.parent))
    try:
        staging.chmod(0o755)
        report = apply_image(source, resolved, staging, rootless=rootless, limits=limits, progress=progress)
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    except DirgeError as exc:
        remove_tree(staging)
        raise add_context(exc, f"unpack {image}") from exc.__cause__
    except BaseException:
        remove_tree(staging)
        raise
    return UnpackResult(resolved, report)


def remove_tree(path: Path) -> None:
    """Remove a tree we wrote, even where rootless modes left directories unwritable."""
    def onerror(func: object, p: str, exc_info: object) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)
