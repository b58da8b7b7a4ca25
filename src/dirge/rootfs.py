"""The seed's API, re-created: ``prepare(image, cache_dir)`` → a fresh session rootfs; ``cleanup(path)``.

    with prepare("oci:/images/app:1.0") as rootfs:
        run_vm(rootfs.path, rootfs.config)
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .apply.layer import Limits
from .bases import ensure_base, mount_base
from .cache import Cache
from .errors import SessionError
from .fsutil import is_mountpoint, remove_tree, unmount
from .image import Platform
from .reference import canonicalize_image_ref, local_variant_name
from .session import Sessions, SessionInfo, backends
from .sources.auth import Credentials
from .session.customize import FileSpec, add_user, write_files, write_krun_config
from .unpack import ProgressFn

__all__ = [
    "FileSpec",
    "PreparedRootfs",
    "add_user",
    "canonicalize_image_ref",
    "cleanup",
    "local_variant_name",
    "prepare",
    "restore",
    "write_krun_config",
]


class PreparedRootfs:
    """A session rootfs; removed (unmounted first) by ``close()``, on leaving ``with``, or when collected."""

    def __init__(self, info: SessionInfo, session_dir: Path, config: dict[str, Any], base_created: bool,
                 base_format: str = "tree") -> None:
        self.info = info
        self.path = session_dir / "rootfs"
        self.config = config
        self.base_created = base_created
        self.base_format = base_format  # what the base is: "tree" or "erofs"
        self._finalizer = weakref.finalize(self, backends.get(info.strategy).destroy, session_dir)

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
        self._finalizer()

    def detach(self) -> None:
        """Keep the session after this object goes away (``dirge session rm`` or ``prune`` removes it)."""
        self._finalizer.detach()

    def __enter__(self) -> "PreparedRootfs":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"PreparedRootfs(id={self.id!r}, path={str(self.path)!r}, strategy={self.strategy!r}, "
                f"base_format={self.base_format!r})")


def prepare(
    image: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    strategy: str | None = None,
    base_format: str | None = None,
    platform: Platform | None = None,
    rootless: bool | None = None,
    files: Mapping[str, FileSpec | bytes] | None = None,
    snapshot: str | None = None,
    owner_pid: int | None = None,
    limits: Limits = Limits(),
    lock_timeout: float = 600.0,
    progress: ProgressFn | None = None,
    pull: str = "missing",
    creds: Credentials | None = None,
) -> PreparedRootfs:
    """Resolve ``image``, make sure its base is cached (unpacking under a lock), and return a new session.

    ``base_format`` is what the base is built as: "tree", "erofs" or "auto" (None: ``$DIRGE_BASE_FORMAT``,
    else auto); ``strategy`` how the session is made from it (None: the fastest available)."""
    cache = Cache(cache_dir)
    ref = canonicalize_image_ref(image)
    base = ensure_base(ref, cache=cache, format=base_format, platform=platform, rootless=rootless, limits=limits,
                       lock_timeout=lock_timeout, progress=progress, pull=pull, creds=creds)
    sessions = Sessions(cache)
    info = sessions.create(base, ref, strategy=strategy, owner_pid=owner_pid, snapshot=snapshot)
    prepared = PreparedRootfs(info, sessions.session_dir(info.id), base.config, base.created, base.format)
    try:
        if files:
            write_files(prepared.path, files)
    except BaseException:
        prepared.close()
        raise
    return prepared


def restore(snapshot: str, cache_dir: str | os.PathLike[str] | None = None, *, strategy: str | None = None,
            owner_pid: int | None = None) -> PreparedRootfs:
    """A new session from a snapshot: its base plus the saved changes."""
    cache = Cache(cache_dir)
    sessions = Sessions(cache)
    meta = sessions.snapshot_meta(snapshot)
    base = cache.load_base(meta["base"])
    if base is None:
        raise SessionError(f"restore snapshot {snapshot}: its base {meta['base']} is no longer cached; "
                           f"prepare {meta['image']} again first")
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
    elif (path.parent / "session.json").exists() and path.name == "rootfs":
        backends.destroy(path.parent)
    elif is_mountpoint(path):
        unmount(path)
        remove_tree(path)
    else:
        remove_tree(path)
