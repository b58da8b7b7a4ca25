"""Bases: an image resolved, then its flattened rootfs built once per (digest, mode, format) in the cache.

This is the one module above both the store (``cache.py``: where bases live, their locks, staging and
publication) and the pipeline (``unpack.py``: resolving images, applying layers), so neither of those
needs the other.

    ensure_base(image, cache=..., format=...)  resolve → record the ref → the published base, or build
                                               it in staging under the key's lock (re-checked after the
                                               wait), sync and rename it into place

Formats: ``tree`` (a directory, a btrfs subvolume when the cache is on btrfs) is the one built today;
``erofs`` (``bases/<key>/rootfs.erofs``, mounted read-only at ``bases/<key>/rootfs``) comes next;
``auto`` picks the best available (a tree, for now).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .apply.layer import Limits
from .cache import Base, Cache
from .errors import DirgeError
from .fsutil import BTRFS_MAGIC, fs_type, remove_tree
from .image import Platform
from .reference import Digest
from .resolve import BlobSource, ResolvedImage
from .unpack import ProgressFn, apply_image, open_image

if TYPE_CHECKING:
    from .sources.auth import Credentials

FORMAT_CHOICES = ("auto", "tree", "erofs")  # what a caller may ask for
FORMAT_ENV = "DIRGE_BASE_FORMAT"


def requested_format(format: str | None) -> str:
    """The caller's choice, else ``$DIRGE_BASE_FORMAT``, else ``auto``; checked against the choices."""
    value = format or os.environ.get(FORMAT_ENV) or "auto"
    if value not in FORMAT_CHOICES:
        raise DirgeError(f"base format {value!r}: choose one of {', '.join(FORMAT_CHOICES)}"
                         + ("" if format else f" (from ${FORMAT_ENV})"))
    return value


def choose_format(format: str | None) -> str:
    """The concrete format a base is built in for the request ``format`` (see ``requested_format``)."""
    value = requested_format(format)
    if value == "auto":
        return "tree"  # the only one built so far
    if value not in _BUILDERS:
        raise DirgeError(f"base format {value}: not implemented yet; use --base-format tree")
    return value


def ensure_base(
    image: str,
    *,
    cache: Cache | None = None,
    format: str | None = "tree",
    platform: Platform | None = None,
    rootless: bool | None = None,
    limits: Limits = Limits(),
    lock_timeout: float = 600.0,
    progress: ProgressFn | None = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
) -> Base:
    """The base of ``image`` in ``format`` (None: ``$DIRGE_BASE_FORMAT`` or auto), built under the
    key's lock if no complete one exists. ``cache`` defaults to the default cache."""
    fmt = choose_format(format)
    cache = cache if cache is not None else Cache()
    if rootless is None:
        rootless = os.geteuid() != 0
    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds)
    try:
        return _ensure_base(cache, image, source, resolved, fmt, rootless, limits, lock_timeout, progress)
    finally:
        source.close()


def _ensure_base(cache: Cache, image: str, source: BlobSource, resolved: ResolvedImage, fmt: str,
                 rootless: bool, limits: Limits, lock_timeout: float, progress: ProgressFn | None) -> Base:
    cache.put_blob(resolved.manifest_digest, resolved.manifest.raw)
    cache.put_blob(resolved.manifest.config.digest, resolved.config.raw)
    base = cache.find_base(resolved.manifest_digest, rootless, fmt)
    if base:
        return base
    key = cache.base_key(resolved.manifest_digest, rootless, fmt)
    with cache.base_lock(key, lock_timeout):
        base = cache.find_base(resolved.manifest_digest, rootless, fmt)
        if base:  # another process built it while we waited
            return base
        staging = cache.new_staging(key)
        try:
            _BUILDERS[fmt](staging, source, resolved, rootless, limits, progress)
            meta: dict[str, Any] = {
                "image": image, "digest": str(resolved.manifest_digest), "rootless": rootless, "format": fmt,
                "config": resolved.config.config,
                "platform": str(resolved.platform) if resolved.platform else None}
            return cache.publish_base(staging, key, meta)
        except BaseException:
            remove_tree(staging)
            raise


BaseBuilder = Callable[[Path, BlobSource, ResolvedImage, bool, Limits, ProgressFn | None], None]


def _build_tree(staging: Path, source: BlobSource, resolved: ResolvedImage, rootless: bool, limits: Limits,
                progress: ProgressFn | None) -> None:
    rootfs = staging / "rootfs"
    make_base_dir(rootfs)
    apply_image(source, resolved, rootfs, rootless=rootless, limits=limits, progress=progress)


# How each format's content is written into a staging directory (publication is the store's).
_BUILDERS: dict[str, BaseBuilder] = {"tree": _build_tree}


def make_base_dir(path: Path) -> None:
    """A btrfs subvolume where the cache is on btrfs (so sessions can be snapshots), else a directory."""
    if fs_type(path.parent) == BTRFS_MAGIC and shutil.which("btrfs"):
        if subprocess.run(["btrfs", "subvolume", "create", str(path)], capture_output=True).returncode == 0:
            path.chmod(0o755)
            return
    path.mkdir(mode=0o755)


@contextmanager
def base_rootfs(base: Base) -> Iterator[Path]:
    """The readable tree of ``base`` for the length of the block."""
    if base.format != "tree":
        raise DirgeError(f"base {base.key}: reading a {base.format} base is not implemented yet")
    yield base.rootfs


def cached_erofs_image(cache: Cache | None, digest: Digest) -> Path | None:
    """The published erofs image of ``digest`` in ``cache`` (either mode: its bytes do not depend on
    it), or None."""
    cache = cache if cache is not None else Cache()
    for rootless in (False, True):
        base = cache.find_base(digest, rootless, "erofs")
        if base is not None and base.image_file.is_file():
            return base.image_file
    return None
