"""``dirge export``: an image as one artifact for a VM or another tool.

    erofs  the flattened image as an erofs image file: a read-only root disk for block-device VMs
           (with an overlay in the guest); from the cached erofs base when there is one (reflink, else
           a copy), else written straight from the layers; byte-identical either way
    ext4   a writable root disk (Firecracker, Cloud Hypervisor): the cached ext4 base disk for these
           options (size, journal), built straight from the layers when missing, then cloned
    tar    a flattened tar (``mke2fs -d``, ``docker import``), written from the image's cached base
           (built first when missing)
    dir    a directory tree, as ``dirge unpack`` writes it

``OUT`` is written as a temp file beside it, synced, then renamed over it: readers see the old file or
the whole new one, never a part.
"""

from __future__ import annotations

import functools
import hashlib
import fcntl
import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from .apply.layer import Limits
from .errors import DirgeError, NoSpace
from .fsutil import is_no_space, no_space
from .options import CacheLike, DiskKind, DiskOptions, ExportFormat, PlatformLike, PullPolicy, as_cache, as_platform
from .oci.image import Platform
from .sources.open import open_image
from .events import ProgressFn, Step, Write, downloads, emit
from .flatten import add_context, unpack, write_erofs, write_ext4
from .variants import build_variant

if TYPE_CHECKING:
    from .store.cache import Cache
    from .sources.auth import Credentials, RegistryOptions

FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: ExportFormat
    size: int  # bytes of OUT (a directory: its files' bytes)
    digest: str  # the image's manifest digest
    from_cache: bool  # copied from a cached base rather than written from the layers
    base_source: str = "layers"  # "artifact": the file came from a prepared artifact (docs/FLEET.md)

    @functools.cached_property
    def sha256(self) -> str | None:
        """Of OUT (None for a directory); read when first asked: hashing a disk costs ~0.5 s a GB."""
        if self.format == "dir":
            return None
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def export(
    image: str,
    out: str | os.PathLike[str],
    *,
    format: ExportFormat = "erofs",
    platform: PlatformLike | None = None,
    cache: CacheLike | None = None,
    pull: PullPolicy = "missing",
    creds: "Credentials | None" = None,
    registry_options: "RegistryOptions | None" = None,
    limits: Limits = Limits(),
    progress: ProgressFn | None = None,
    disk: "DiskOptions | None" = None,
    artifacts: tuple[str, ...] | None = None,
) -> ExportResult:
    """Write ``image`` to ``out`` as ``format`` (``erofs``, ``ext4``, ``tar`` or ``dir``); ``disk``: an
    ext4 disk's size and journal; ``platform``: "os/arch[/variant]" or a Platform; ``cache``: a directory
    or a Cache. ``artifacts``: repositories (None: the config's ``[fleet] artifacts``) an erofs or ext4 file
    missing from the cache is fetched from as a prepared base (docs/FLEET.md)."""
    out = Path(out)
    wanted, where = as_platform(platform), as_cache(cache)
    if format not in FORMATS:
        raise DirgeError(f"export {image}: unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    try:
        if format == "dir":
            result = unpack(image, out, platform=wanted, limits=limits, progress=progress, cache=where,
                            pull=pull, creds=creds, registry_options=registry_options)
            size = sum(e.stat(follow_symlinks=False).st_size for e in _scan(out))
            return ExportResult(out, format, size, str(result.image.manifest_digest), False)
        if out.is_dir() and not out.is_symlink():
            raise DirgeError(f"{out} is a directory; give a file path for --format {format}")
        if format in ("erofs", "ext4"):
            from .sources.artifacts import configured_repositories

            repos = configured_repositories(artifacts, image) if pull != "never" else ()
            if repos:
                return _export_fetched(image, out, format, wanted, where, pull, creds, registry_options, limits,
                                       progress, disk or DiskOptions(), repos)
            return _export_image(image, out, format, wanted, where, pull, creds, registry_options, limits, progress,
                                 (disk or DiskOptions()) if format == "ext4" else None)
        return _export_tar(image, out, wanted, where, pull, creds, registry_options, limits, progress)
    except DirgeError as exc:
        raise add_context(exc, f"export {image}") from exc.__cause__


def _export_image(image: str, out: Path, fmt: ExportFormat, platform: Platform | None, cache: "Cache | None",
                  pull: PullPolicy, creds: "Credentials | None", registry_options: "RegistryOptions | None",
                  limits: Limits, progress: ProgressFn | None, disk: "DiskOptions | None") -> ExportResult:
    """An erofs image or ext4 disk: the cached base's file cloned when there is one, else written straight
    from the layers into OUT's temp file (caching it would cost a hash, a sync and a copy of the whole disk)."""
    from .bases import cached_image

    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds,
                                  registry_options=registry_options, on_bytes=downloads(progress),
                                  build=build_variant)
    try:
        with ExitStack() as leases:  # a cached base is read under its lease: gc cannot remove it meanwhile
            cached = cached_image(cache, resolved.manifest_digest, fmt, leases, disk.key() if disk else "")
            with _replacing(out) as tmp:
                emit(progress, Step("export", f"{'cloning the cached' if cached else 'writing'} {fmt} image"))
                if cached is not None:
                    _clone(cached, tmp)
                elif disk is None:
                    write_erofs(source, resolved, tmp, limits=limits, progress=progress)
                else:
                    write_ext4(source, resolved, tmp, size=disk.size, journal=disk.journal, inodes=disk.inodes,
                               limits=limits, progress=progress)
    finally:
        source.close()
    result = _file_result(out, fmt, str(resolved.manifest_digest), cached is not None)
    emit(progress, Write(f"{fmt} {out.name}", result.size))
    return result


def _export_fetched(image: str, out: Path, fmt: ExportFormat, platform: Platform | None, cache: "Cache | None",
                    pull: PullPolicy, creds: "Credentials | None", registry_options: "RegistryOptions | None",
                    limits: Limits, progress: ProgressFn | None, disk: DiskOptions,
                    repos: tuple[str, ...]) -> ExportResult:
    """With artifact repositories configured, the file goes through the cache as a base disk
    (``bases.ensure_disk``: the cached one, else a prepared artifact, else the layers), then is cloned."""
    from .bases import ensure_disk
    from .options import PrepareOptions

    kind: DiskKind = "ext4" if fmt == "ext4" else "erofs"
    options = PrepareOptions(disk=kind, platform=platform, limits=limits, pull=pull, creds=creds,
                             registry_options=registry_options,
                             disk_size=disk.size if fmt == "ext4" else None, disk_journal=disk.journal,
                             disk_inodes=disk.inodes, artifacts=repos)
    with ExitStack() as leases:  # read under the base's lease: gc cannot remove it meanwhile
        base = ensure_disk(image, options, cache=cache, progress=progress, leases=leases)
        with _replacing(out) as tmp:
            _clone(base.image_file, tmp)
    result = ExportResult(out, fmt, out.stat().st_size, str(base.digest), not base.created, base.source)
    emit(progress, Write(f"{fmt} {out.name}", result.size))
    return result


def _export_tar(image: str, out: Path, platform: Platform | None, cache: "Cache | None", pull: PullPolicy,
                creds: "Credentials | None", registry_options: "RegistryOptions | None", limits: Limits,
                progress: ProgressFn | None) -> ExportResult:
    from .bases import base_rootfs, ensure_base
    from .options import PrepareOptions
    from .fsimage.tarball import write_tar

    with ExitStack() as leases:  # the base is read under its lease: gc cannot remove it meanwhile
        base = ensure_base(image, PrepareOptions(base_format="tree", platform=platform, limits=limits, pull=pull,
                                                 creds=creds, registry_options=registry_options), cache=cache,
                             progress=progress, leases=leases)
        emit(progress, Step("export", "writing the tar"))
        with base_rootfs(base) as rootfs, _replacing(out) as tmp:
            with open(tmp, "wb") as f:
                write_tar(rootfs, f)
    result = _file_result(out, "tar", str(base.digest), True)
    emit(progress, Write(f"tar {out.name}", result.size))
    return result


def _file_result(out: Path, format: ExportFormat, digest: str, from_cache: bool) -> ExportResult:
    return ExportResult(out, format, out.stat().st_size, digest, from_cache)


@contextmanager
def _replacing(out: Path) -> Iterator[Path]:
    """A temp path beside ``out``; renamed onto ``out`` (after an fsync) when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock_fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".dirge-tmp", dir=out.parent)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # ours while we live: a later export sweeps only unlocked ones
    tmp = Path(name)
    _sweep_killed_temps(out, keep=tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space(exc, f"write {out}") from exc
        raise DirgeError(f"write {out}: {exc.strerror or exc}; free space or fix permissions there") from exc
    except NoSpace as exc:  # name OUT, not the temp file that ran out of space
        tmp.unlink(missing_ok=True)
        exc.args = (str(exc).replace(str(tmp), str(out)),) + exc.args[1:]
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock_fd)


def _sweep_killed_temps(out: Path, keep: Path) -> None:
    """Temp files a killed export left beside ``out`` (nobody holds their flock any more)."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.dirge-tmp"):
        if stale == keep:
            continue
        try:
            sfd = os.open(stale, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(sfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.unlink(missing_ok=True)
        except OSError:
            pass  # a live export's
        finally:
            os.close(sfd)


def _clone(src: Path, dst: Path) -> None:
    from .session.copytree import clone_file

    with open(dst, "wb") as out:
        clone_file(src, out.fileno())


def _scan(root: Path) -> Iterator[os.DirEntry[str]]:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))

