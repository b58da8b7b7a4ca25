"""Bases: an image resolved, then its flattened rootfs built once per (digest, mode, format) in the cache.

This is the one module above both the store (``store/``: where bases live, their locks, staging and
publication) and the pipeline (``sources/`` resolving images, ``flatten.py`` applying layers), so neither
of those needs the other.

    ensure_base(image, cache=..., format=...)  resolve → record the ref → the published base, or build
                                               it in staging under the key's lock (re-checked after the
                                               wait), sync and rename it into place

Formats: ``tree`` (a directory, a btrfs subvolume when the cache is on btrfs), ``erofs``
(``bases/<key>/rootfs.erofs`` written straight from the layers, mounted read-only at
``bases/<key>/rootfs`` when first needed); ``auto`` picks erofs where this process can mount it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store.cache import Base, Cache, default_cache_dir
from .errors import DirgeError
from .fsutil import BTRFS_MAGIC, fs_type, remove_tree
from .options import DiskOptions, PrepareOptions
from .oci.reference import Digest
from .oci.resolve import BlobSource, ResolvedImage
from .fsimage.mount import erofs_supported, mount_erofs, mounted_at, unmount
from .sources.open import open_image
from .store.records import write_record
from .events import ProgressFn, Step, Write, downloads, emit
from .flatten import apply_image, write_erofs, write_ext4
from .variants import build_variant

FORMAT_CHOICES = ("auto", "tree", "erofs")  # what a caller may ask for
FORMAT_ENV = "DIRGE_BASE_FORMAT"


def requested_format(format: str | None) -> str:
    """The caller's choice, else ``$DIRGE_BASE_FORMAT``, else ``auto``; checked against the choices."""
    value = format or os.environ.get(FORMAT_ENV) or "auto"
    if value not in FORMAT_CHOICES:
        raise DirgeError(f"base format {value!r}: choose one of {', '.join(FORMAT_CHOICES)}"
                         + ("" if format else f" (from ${FORMAT_ENV})"))
    return value


def choose_format(format: str | None, cache: Cache, rootless: bool) -> str:
    """The concrete format a base is built in for the request ``format`` (see ``requested_format``):
    ``auto`` is erofs where this process can mount it (root, a kernel with erofs), else a tree."""
    value = requested_format(format)
    if value == "tree":
        return value
    if rootless:
        if value == "auto":
            return "tree"
        raise DirgeError("base format erofs: mounting an erofs base needs root; use --base-format tree or auto")
    works = erofs_mounts_work(cache)
    if value == "auto":
        return "erofs" if works else "tree"
    if not works:
        raise DirgeError("base format erofs: this kernel cannot mount erofs images (no erofs in "
                         "/proc/filesystems, or the probe mount failed); use --base-format tree or auto")
    return value


def erofs_mounts_work(cache: Cache) -> bool:
    """Whether erofs images mount here: probed once per cache and kernel (a tiny image, mounted and
    unmounted in the cache's staging area), then remembered in ``CACHE/erofs-probe.json``."""
    record = cache.erofs_probe_path
    kernel = os.uname().release
    try:
        known = json.loads(record.read_text())
        if known.get("kernel") == kernel and isinstance(known.get("works"), bool):
            return bool(known["works"])
    except (OSError, ValueError, AttributeError):
        pass
    works, how = _probe_erofs(cache.staging_dir)
    # threads of one process may probe at once (dirge.aio): a temp name per writer, not per pid
    fd, tmp = tempfile.mkstemp(prefix=f".{record.name}.", dir=record.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"kernel": kernel, "works": works, "how": how}))
    os.replace(tmp, record)
    return works


def _probe_erofs(parent: Path) -> tuple[bool, str]:
    if os.geteuid() != 0 or not erofs_supported():
        return False, "unsupported"
    from .apply.tree import DIR, Node
    from .fsimage.erofs import ErofsSink

    with tempfile.TemporaryDirectory(prefix=".erofs-probe-", dir=parent) as tmp:
        image, target = Path(tmp) / "probe.erofs", Path(tmp) / "mnt"
        target.mkdir()
        sink = ErofsSink(image, uuid=bytes(16), build_time_ns=0)
        try:
            sink.finish(Node(DIR, 0o755))
        finally:
            sink.close()
        try:
            how = mount_erofs(image, target)
        except DirgeError:
            return False, "mount failed"
        unmount(target)
        return True, how


DISK_FORMATS = ("ext4", "erofs")


def ensure_base(image: str, options: PrepareOptions = PrepareOptions(base_format="tree"), *,
                cache: Cache | None = None, progress: ProgressFn | None = None,
                leases: ExitStack | None = None) -> Base:
    """The base of ``image`` in ``options.base_format`` (None: ``$DIRGE_BASE_FORMAT`` or auto), built under
    the key's lock if no complete one exists. ``cache`` defaults to the default cache.

    ``leases``: the base's lease (shared) is entered on it and so held until the caller closes it (a
    session is recorded by then); without it the lease is held only while this call runs."""
    cache = cache if cache is not None else Cache()
    fmt = choose_format(options.base_format, cache, _rootless(options))
    with ExitStack() as own:
        base = _ensure_base(image, options, cache=cache, fmt=fmt, progress=progress,
                            leases=leases if leases is not None else own)
        mount_base(base, options.lock_timeout)
        return base


def ensure_disk(image: str, options: PrepareOptions = PrepareOptions(disk="ext4"), *, cache: Cache | None = None,
                progress: ProgressFn | None = None, leases: ExitStack | None = None) -> Base:
    """The base disk of ``image`` in ``options.disk`` (``base.image_file``: an ext4 or erofs image for
    block-device VMs; ext4 shaped by ``options.disk_options``), built under the key's lock if missing.
    Never mounted, so no privilege is needed."""
    if options.disk not in DISK_FORMATS:
        raise DirgeError(f"disk format {options.disk!r}: choose one of {', '.join(DISK_FORMATS)}")
    with ExitStack() as own:
        return _ensure_base(image, options, cache=cache if cache is not None else Cache(), fmt=options.disk,
                            progress=progress, leases=leases if leases is not None else own)


def _rootless(options: PrepareOptions) -> bool:
    return os.geteuid() != 0 if options.rootless is None else options.rootless


@dataclass(frozen=True)
class _Job:
    """One base to find or build: what the helpers below share."""

    cache: Cache
    image: str
    fmt: str  # the concrete format: tree, erofs or ext4
    rootless: bool
    disk: DiskOptions  # ext4's (part of the key); the defaults for other formats
    options: PrepareOptions
    progress: ProgressFn | None


def _ensure_base(image: str, options: PrepareOptions, *, cache: Cache, fmt: str, progress: ProgressFn | None,
                 leases: ExitStack) -> Base:
    job = _Job(cache, image, fmt, _rootless(options), options.disk_options if fmt == "ext4" else DiskOptions(),
               options, progress)
    source, resolved = open_image(image, options.platform, cache=cache, pull=options.pull, creds=options.creds,
                                  registry_options=options.registry_options,
                                  on_bytes=downloads(progress), build=build_variant)
    try:
        return _find_or_build(job, source, resolved, leases)
    finally:
        source.close()


def _find_or_build(job: _Job, source: BlobSource, resolved: ResolvedImage, leases: ExitStack) -> Base:
    cache, timeout = job.cache, job.options.lock_timeout
    key = cache.base_key(resolved.manifest_digest, job.rootless, job.fmt, job.disk.key())
    # The lease first: from here on gc leaves this base (and the blobs of this image) alone.
    leases.enter_context(cache.base_lease(key, timeout))
    cache.put_blob(resolved.manifest_digest, resolved.manifest.raw)
    cache.put_blob(resolved.manifest.config.digest, resolved.config.raw)
    base = _find_leased(job, resolved.manifest_digest, key, leases)
    if base:
        emit(job.progress, Step("base", f"{job.fmt} base {resolved.manifest_digest.short} cached"))
        return base
    with cache.base_lock(key, timeout):
        base = _find_leased(job, resolved.manifest_digest, key, leases)
        if base:  # another process built it while we waited
            return base
        staging = cache.new_staging(key)
        try:
            emit(job.progress, Step("base", f"writing {job.fmt} base {resolved.manifest_digest.short}"))
            origin = _from_artifact(staging, resolved, job)
            if origin is None:
                _BUILDERS[job.fmt](staging, source, resolved, job)
                origin = {"from": "layers"}
            meta: dict[str, Any] = {
                "image": job.image, "digest": str(resolved.manifest_digest), "rootless": job.rootless,
                "format": job.fmt,
                "options": {"size": job.disk.size, "journal": job.disk.journal, "inodes": job.disk.inodes}
                if job.fmt == "ext4" else None,
                "config": resolved.config.config,
                "platform": str(resolved.platform) if resolved.platform else None,
                "source": origin}
            emit(job.progress, Step("base", f"recording and syncing the {job.fmt} base"))
            known = origin.get("sha256")  # a fetched artifact's file was hashed as it was written
            record = write_record(staging, job.fmt, known.split(":")[-1] if known else None)
            meta["bytes"] = record["bytes"]  # gc's budget reads it here, cheaply
            base = cache.publish_base(staging, key, meta)
            emit(job.progress, Write(f"{job.fmt} base", int(meta["bytes"])))
            cache.touch_base(key)
            return base
        except BaseException:
            remove_tree(staging)
            raise


def _find_leased(job: _Job, digest: Digest, key: str, leases: ExitStack) -> Base | None:
    """The published base, its lease held (a legacy-keyed tree's too), marked as just used."""
    cache = job.cache
    base = cache.find_base(digest, job.rootless, job.fmt, job.disk.key())
    if base is not None and base.key != key:  # an older dirge's key: lease it, then look again
        leases.enter_context(cache.base_lease(base.key, job.options.lock_timeout))
        base = cache.load_base(base.key)
    if base is not None:
        cache.touch_base(base.key)
    return base


BaseBuilder = Callable[[Path, BlobSource, ResolvedImage, _Job], None]


def _from_artifact(staging: Path, resolved: ResolvedImage, job: _Job) -> dict[str, Any] | None:
    """An erofs or ext4 base from a prepared artifact in the trusted repositories (``options.artifacts``,
    else ``[fleet] artifacts``) into ``staging``; its ``image.json`` "source", or None: build from the
    layers (none found, damaged, another writer version or other options; logged once)."""
    if job.fmt not in ("erofs", "ext4"):
        return None
    from .oci.artifact import artifact_options
    from .oci.reference import RegistryReference, parse_reference
    from .sources.artifacts import configured_repositories, fetch_artifact

    if job.options.pull == "never":  # artifacts are fetched, never read offline
        return None
    repos = configured_repositories(job.options.artifacts, job.image)
    if not repos:
        return None
    if job.fmt == "erofs":
        from .fsimage.erofs import WRITER_VERSION
    else:
        from .fsimage.ext4 import WRITER_VERSION
    options = artifact_options(job.fmt, size=job.disk.size, journal=job.disk.journal, inodes=job.disk.inodes)
    image_ref = parse_reference(job.image)
    fetched = fetch_artifact(repos, resolved.manifest_digest, job.fmt, writer_version=WRITER_VERSION,
                             options=options, dest=staging / f"rootfs.{job.fmt}", cache=job.cache,
                             creds=job.options.creds,
                             # what the layers could make at most (every byte twice: data and metadata), or the
                             # disk size asked for: an artifact cannot ask for more work than a conversion
                             max_size=max(2 * job.options.limits.max_total_bytes, job.disk.size or 0),
                             creds_registry=image_ref.registry if isinstance(image_ref, RegistryReference) else None)
    if fetched is None:
        return None
    if job.fmt == "erofs":
        (staging / "rootfs").mkdir(mode=0o755)  # where it will be mounted, as _build_erofs makes it
    return {"from": "artifact", "repository": fetched.repository, "artifact": str(fetched.artifact.digest),
            "blob": str(fetched.artifact.layer.digest), "sha256": str(fetched.artifact.sha256)}


def _build_tree(staging: Path, source: BlobSource, resolved: ResolvedImage, job: _Job) -> None:
    rootfs = staging / "rootfs"
    make_base_dir(rootfs)
    apply_image(source, resolved, rootfs, rootless=job.rootless, limits=job.options.limits, progress=job.progress)


def _build_erofs(staging: Path, source: BlobSource, resolved: ResolvedImage, job: _Job) -> None:
    # One sequential file, no tree on the host; ``rootfs`` is where it will be mounted.
    write_erofs(source, resolved, staging / "rootfs.erofs", limits=job.options.limits, progress=job.progress)
    (staging / "rootfs").mkdir(mode=0o755)


def _build_ext4(staging: Path, source: BlobSource, resolved: ResolvedImage, job: _Job) -> None:
    write_ext4(source, resolved, staging / "rootfs.ext4", size=job.disk.size, journal=job.disk.journal,
               inodes=job.disk.inodes, limits=job.options.limits, progress=job.progress)


# How each format's content is written into a staging directory (publication is the store's).
_BUILDERS: dict[str, BaseBuilder] = {"tree": _build_tree, "erofs": _build_erofs, "ext4": _build_ext4}


def mount_base(base: Base, lock_timeout: float = 600.0) -> None:
    """Make an erofs base's tree readable at ``base.rootfs``: mounted once (after a reboot, again),
    under the base's lock so two processes never stack two mounts. Trees need nothing."""
    if base.format != "erofs" or mounted_at(base.rootfs) == "erofs":
        return
    with _cache_of(base).base_lock(base.key, lock_timeout):
        if mounted_at(base.rootfs) != "erofs":
            mount_erofs(base.image_file, base.rootfs)


def unmount_base(base: Base) -> None:
    """Undo ``mount_base`` (sessions still stacked on it keep it alive until they go: lazy unmount)."""
    if base.format == "erofs" and mounted_at(base.rootfs) == "erofs":
        unmount(base.rootfs)


def _cache_of(base: Base) -> Cache:
    return Cache(base.path.parent.parent)  # CACHE/bases/<key>


def make_base_dir(path: Path) -> None:
    """A btrfs subvolume where the cache is on btrfs (so sessions can be snapshots), else a directory."""
    if fs_type(path.parent) == BTRFS_MAGIC and shutil.which("btrfs"):
        if subprocess.run(["btrfs", "subvolume", "create", str(path)], capture_output=True).returncode == 0:
            path.chmod(0o755)
            return
    path.mkdir(mode=0o755)


@contextmanager
def base_rootfs(base: Base) -> Iterator[Path]:
    """The readable tree of ``base`` for the length of the block (an erofs base: mounted)."""
    mount_base(base)
    yield base.rootfs


def cached_image(cache: Cache | None, digest: Digest, fmt: str, leases: ExitStack, options: str = "") -> Path | None:
    """The published image file (erofs, or an ext4 disk shaped by ``options``, a ``DiskOptions.key()``) of
    ``digest`` in ``cache`` (either mode: its bytes do not depend on it), or None. Its base's lease is
    entered on ``leases``, so it stays until the caller closes them."""
    if cache is None:
        root = default_cache_dir()
        if not root.is_dir():
            return None  # no default cache yet, so nothing cached: a lookup makes no cache directory
        cache = Cache(root)
    for rootless in (False, True):
        base = cache.find_base(digest, rootless, fmt, options)
        if base is None:
            continue
        lease = leases.enter_context(ExitStack())
        lease.enter_context(cache.base_lease(base.key))
        if base.image_file.is_file():  # looked at again under the lease: gc may have just removed it
            return base.image_file
        lease.close()
    return None
