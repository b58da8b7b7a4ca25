"""The seed's API, re-created: ``prepare(image, cache)`` → a fresh session rootfs; ``cleanup(path)``.

    with prepare("oci:/images/app:1.0") as rootfs:
        run_vm(rootfs.path, rootfs.config)

Disk sessions, for block-device VMs (Firecracker, Cloud Hypervisor): ``prepare(image, disk="ext4")``
gives ``.disk``, the session's own ext4 disk (``disk_format="qcow2"``: a qcow2 overlay on the cached base
disk); ``disk="erofs"`` gives the shared read-only base erofs image as ``.disk`` and the session's own
empty ext4 ``.scratch`` (``upper/``, ``work/``) for an overlay in the guest. They have no directory:
their ``.path`` raises SessionError. ``files=``, ``add_user`` and ``write_krun_config`` write into the
disk (erofs: the scratch's ``upper/``) with debugfs, without mounting or root; not into a qcow2 disk.
"""

from __future__ import annotations

import os
import warnings
import weakref
from contextlib import ExitStack
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .apply.layer import Limits
from .bases import ensure_base, ensure_disk, mount_base
from .store.cache import Cache
from .errors import DirgeError, SessionError
from .fsutil import is_mountpoint, remove_tree, unmount
from .options import (BaseFormat, CacheLike, DiskFormat, DiskKind, PlatformLike, PrepareOptions, PullPolicy,
                      Strategy, as_cache, cache_or_dir)
from .oci.reference import canonicalize_image_ref, local_variant_name
from .session import DISK, SCRATCH_SIZE, Sessions, SessionInfo, backends, destroy
from .sources.auth import Credentials, RegistryOptions
from .session.customize import (DirWriter, Ext4DiskWriter, FileSpec, RootfsWriter, add_user, write_files,
                                write_krun_config)
from .events import ProgressFn, Step, emit

__all__ = [
    "FileSpec",
    "PreparedRootfs",
    "add_user",
    "canonicalize_image_ref",
    "cleanup",
    "local_variant_name",
    "prepare",
    "prepare_with",
    "restore",
    "write_krun_config",
]


class PreparedRootfs:
    """A session rootfs; removed (unmounted first) by ``close()``, on leaving ``with``, or when collected
    (then with a ResourceWarning, as an unclosed file gives: close it, or ``detach()`` to keep it).

    A disk session (``is_disk``) has ``disk`` (and, erofs, ``scratch``) instead of a directory: its
    ``path`` raises SessionError rather than name a directory that does not exist."""

    def __init__(self, info: SessionInfo, session_dir: Path, config: dict[str, Any], base_created: bool,
                 base_format: str = "tree", base_source: str = "layers") -> None:
        self.info = info
        self.session_dir = session_dir
        self.config = config
        self.base_created = base_created
        self.base_format = base_format  # what the base is: "tree", "erofs", or a disk session's "ext4"
        self.base_source = base_source  # what the base was made from: "layers", or "artifact" (docs/FLEET.md)
        destroyer = destroy if info.strategy == DISK else backends.get(info.strategy).destroy
        self._finalizer = weakref.finalize(self, _dropped, destroyer, session_dir, info.id)

    @property
    def is_disk(self) -> bool:
        return self.info.strategy == DISK

    @property
    def path(self) -> Path:
        """The session's rootfs directory (directory sessions only)."""
        if self.is_disk:
            raise SessionError(f"session {self.id} is a disk session: it has no rootfs directory; use .disk")
        return self.session_dir / "rootfs"

    @property
    def disk(self) -> Path | None:
        """The VM's root disk (disk sessions; None otherwise): the session's own file, or for erofs the
        shared read-only base image."""
        return Path(self.info.disk) if self.info.disk else None

    @property
    def scratch(self) -> Path | None:
        """An erofs session's own writable ext4 (``upper/``, ``work/``) for the guest's overlay."""
        return Path(self.info.scratch) if self.info.scratch else None

    disk_format = property(lambda self: self.info.disk_format)
    disk_strategy = property(lambda self: self.info.disk_strategy)

    def writer(self) -> RootfsWriter:
        """Where ``write_files``, ``add_user`` and ``write_krun_config`` write for this session."""
        if not self.is_disk:  # owners as the base keeps them, whoever writes
            return DirWriter(self.path, rootless=Cache.base_is_rootless(self.info.base))
        if self.info.disk_format != "raw":
            raise SessionError(f"session {self.id}: dirge cannot write into a {self.info.disk_format} disk; "
                               "use --disk-format raw to customise")
        if self.scratch is not None:
            return Ext4DiskWriter(self.scratch, under="upper", lower=_erofs_lower(self, Cache(self.session_dir.parent.parent)))
        assert self.disk is not None
        return Ext4DiskWriter(self.disk)

    id = property(lambda self: self.info.id)
    image = property(lambda self: self.info.image)
    digest = property(lambda self: self.info.digest)
    strategy = property(lambda self: self.info.strategy)
    env = property(lambda self: list(self.config.get("Env") or []))
    cmd = property(lambda self: list(self.config.get("Cmd") or []))
    entrypoint = property(lambda self: list(self.config.get("Entrypoint") or []))
    working_dir = property(lambda self: self.config.get("WorkingDir") or "/")
    user = property(lambda self: self.config.get("User") or "")

    def close(self) -> None:
        """Remove the session (once; later calls do nothing)."""
        pending = self._finalizer.detach()  # (self, _dropped, args, kwargs) unless closed or detached
        if pending is not None:
            destroyer, session_dir, _ = pending[2]
            destroyer(session_dir)

    def detach(self) -> None:
        """Keep the session after this object goes away (``dirge session rm`` or ``prune`` removes it)."""
        self._finalizer.detach()

    def __enter__(self) -> "PreparedRootfs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"disk={str(self.disk)!r}" if self.is_disk else f"path={str(self.path)!r}"
        return (f"PreparedRootfs(id={self.id!r}, {where}, strategy={self.strategy!r}, "
                f"base_format={self.base_format!r})")


def _dropped(destroyer: Callable[[Path], None], session_dir: Path, session_id: str) -> None:
    """A PreparedRootfs collected without ``close()``: say so (a leak the caller should see, as Python
    says of unclosed files), then remove the session as ``close()`` would have."""
    warnings.warn(f"session {session_id} was never closed: removed when its PreparedRootfs was collected; "
                  "close() it, use it in a with block, or detach() it to keep it", ResourceWarning, stacklevel=2)
    destroyer(session_dir)


def _erofs_lower(prepared: PreparedRootfs, cache: Cache) -> "Callable[[str], bytes | None]":
    """How an erofs disk session reads a file its scratch upper lacks (``add_user``'s /etc/passwd):
    straight from the base image file, without mounting it, so no root is needed."""
    from .fsimage.erofs_read import read_erofs_file

    def read(path: str) -> bytes | None:
        base = cache.load_base(prepared.info.base)
        if base is None:
            raise SessionError(f"session {prepared.id}: its base {prepared.info.base} is no longer cached")
        return read_erofs_file(base.image_file, path)

    return read


def prepare(
    image: str,
    cache: CacheLike | None = None,
    *,
    files: Mapping[str, FileSpec | bytes] | None = None,
    snapshot: str | None = None,
    owner_pid: int | None = None,
    progress: ProgressFn | None = None,
    cache_dir: str | os.PathLike[str] | None = None,  # deprecated: cache=
    # the PrepareOptions fields, with its defaults (tests/test_options.py keeps them the same):
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
) -> PreparedRootfs:
    """Resolve ``image``, make sure its base is cached (unpacking under a lock), and return a new session.

    ``cache`` is the cache directory or a ``Cache`` (None: the default, ``$DIRGE_CACHE_DIR`` else
    ``~/.cache/dirge``); ``platform`` "os/arch[/variant]" or a ``Platform`` (None: the host's).

    ``base_format`` is what the base is built as: "tree", "erofs" or "auto" (None: ``$DIRGE_BASE_FORMAT``,
    else auto); ``strategy`` how the session is made from it (None: the fastest available).

    ``disk`` ("ext4" or "erofs") makes a disk session instead (module doc): ``disk_format`` "raw" or
    "qcow2" (ext4 only); ``disk_size`` the ext4 base disk's size (None: content plus headroom; erofs:
    the scratch disk's, default 256 MiB), ``disk_journal`` its journal and ``disk_inodes`` its inode
    count. No mount, no root. ``artifacts`` ("REGISTRY/REPO", ...; None: the config's ``[fleet] artifacts``)
    are the repositories a cold erofs or ext4 base may be fetched from as a prepared artifact instead of
    converted from the layers (``.base_source`` says which). The options are ``options.PrepareOptions``'s
    (``prepare_with`` takes one)."""
    return prepare_with(image, PrepareOptions.pick(locals()), cache_or_dir(cache, cache_dir, "prepare"),
                        files=files, snapshot=snapshot, owner_pid=owner_pid, progress=progress)


def prepare_with(image: str, options: PrepareOptions, cache: CacheLike | None = None, *,
                 files: Mapping[str, FileSpec | bytes] | None = None, snapshot: str | None = None,
                 owner_pid: int | None = None, progress: ProgressFn | None = None) -> PreparedRootfs:
    """``prepare`` with its options as one value (what ``aio.prepare`` and ``dirge session create`` build)."""
    cache = as_cache(cache) or Cache()
    ref = canonicalize_image_ref(image)
    sessions = Sessions(cache)
    # The base's lease is held from finding (or building) it until the session is recorded: then the
    # session's record keeps gc away from the base for as long as its owner lives.
    with ExitStack() as leases:
        if options.disk is not None:
            if options.strategy is not None:
                raise SessionError(f"session strategy {options.strategy!r}: a disk session has none "
                                   "(it is a disk file)")
            base = ensure_disk(ref, options, cache=cache, progress=progress, leases=leases)
            emit(progress, Step("session", f"creating the {options.disk} disk session"))
            scratch = options.disk_size if options.disk == "erofs" and options.disk_size else SCRATCH_SIZE
            info = sessions.create_disk(base, ref, disk_format=options.disk_format, owner_pid=owner_pid,
                                        snapshot=snapshot, scratch_size=scratch)
        else:
            base = ensure_base(ref, options, cache=cache, progress=progress, leases=leases)
            emit(progress, Step("session", f"creating a session on the {base.format} base"))
            info = sessions.create(base, ref, strategy=options.strategy, owner_pid=owner_pid, snapshot=snapshot)
    prepared = PreparedRootfs(info, sessions.session_dir(info.id), base.config, base.created, base.format,
                              base.source)
    try:  # the event is a cancellation point for aio: the session is closed if it raises
        emit(progress, Step("session", f"session {info.id[:12]} ready ({info.strategy})"))
        if files:
            write_files(prepared, files)
    except BaseException:
        prepared.close()
        raise
    _collect_if_over_budget(cache)
    return prepared


def _collect_if_over_budget(cache: Cache) -> None:
    """Run gc when the cache is over the configured budget (``[cache] max_size``, ``$DIRGE_CACHE_MAX_SIZE``)."""
    from .config import cache_max_size
    from .lifecycle import collect, over_budget

    budget = cache_max_size()
    if budget is not None and over_budget(cache, budget):
        try:
            collect(cache, max_size=budget)
        except (DirgeError, OSError):
            pass  # best effort: the session is made; the next prepare (or ``dirge gc``) tries again


def restore(snapshot: str, cache: CacheLike | None = None, *, strategy: Strategy | None = None,
            owner_pid: int | None = None, cache_dir: str | os.PathLike[str] | None = None) -> PreparedRootfs:
    """A new session from a snapshot: its base plus the saved changes (``cache_dir``: deprecated, ``cache``)."""
    cache = as_cache(cache_or_dir(cache, cache_dir, "restore")) or Cache()
    sessions = Sessions(cache)
    meta = sessions.snapshot_meta(snapshot)
    with cache.base_lease(meta["base"]):  # as in prepare: held until the session is recorded
        base = cache.load_base(meta["base"])
        if base is None:
            raise SessionError(f"restore snapshot {snapshot}: its base {meta['base']} is no longer cached; "
                               f"prepare {meta['image']} again first")
        cache.touch_base(base.key)
        if meta["kind"] == DISK:
            info = sessions.create_disk(base, meta["image"], owner_pid=owner_pid, snapshot=snapshot)
            return PreparedRootfs(info, sessions.session_dir(info.id), base.config, False, base.format)
        mount_base(base)
        info = sessions.create(base, meta["image"], strategy=strategy, owner_pid=owner_pid, snapshot=snapshot)
    return PreparedRootfs(info, sessions.session_dir(info.id), base.config, False, base.format)


def cleanup(path: str | os.PathLike[str]) -> None:
    """Remove a session rootfs (or any tree dirge made); a missing path is fine, as in the seed."""
    path = Path(path)
    base_dir = path.parent if path.name == "rootfs" and path.parent.parent.name == "bases" else path
    if base_dir.parent.name == "bases" and (base_dir / "image.json").exists():
        # A cached base: its image's mount goes first (sessions still on it keep it until they go).
        if is_mountpoint(base_dir / "rootfs"):
            unmount(base_dir / "rootfs")
        remove_tree(base_dir)
    elif (path.parent / "session.json").exists() and path.name in ("rootfs", "disk.ext4", "disk.qcow2"):
        destroy(path.parent)
    elif (path / "session.json").exists() and path.parent.name == "sessions":  # a session directory
        destroy(path)
    elif is_mountpoint(path):
        unmount(path)
        remove_tree(path)
    else:
        remove_tree(path)
