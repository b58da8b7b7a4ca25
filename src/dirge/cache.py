"""The cache: content-addressed blobs, ref → digest records, and unpacked bases keyed by manifest digest.

    CACHE/
      blobs/sha256/<hex>          verified blobs (manifests, configs, registry layers)
      refs/<sha256 of ref>.json   {"ref", "digest", "time"}: what a ref resolved to last
      bases/<hex>-<mode>/         published bases: rootfs/ + image.json  (mode: root | rootless)
      staging/<hex>-<mode>.<rnd>/ bases being built; removed by the next builder of that key
      locks/<hex>-<mode>.lock     flock per base key (and per variant build, per buildah export)
      buildah/, exports/<id>/     local variants: buildah storage and OCI exports (sources/buildah.py)
      sessions/, snapshots/       see session/

No name under the cache is ever derived from ref text: refs are hashed, bases are named by digest.
A base is published by one rename after its tree has been synced, so it is complete or absent.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .apply.layer import Limits
from .blob import read_verified
from .errors import DirgeError, IntegrityError
from .image import Platform
from .lock import FileLock
from .reference import Digest, parse_digest
from .resolve import BlobSource, ResolvedImage
from .unpack import ProgressFn, apply_image, open_image, remove_tree

if TYPE_CHECKING:
    from .sources.auth import Credentials

_libc = ctypes.CDLL(None, use_errno=True)


def default_cache_dir() -> Path:
    env = os.environ.get("DIRGE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "dirge" if xdg else Path.home() / ".cache" / "dirge"


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_base_dir(path: Path) -> None:
    """A btrfs subvolume where the cache is on btrfs (so sessions can be snapshots), else a directory."""
    from .session.backends import BTRFS_MAGIC, fs_type

    if fs_type(path.parent) == BTRFS_MAGIC and shutil.which("btrfs"):
        if subprocess.run(["btrfs", "subvolume", "create", str(path)], capture_output=True).returncode == 0:
            path.chmod(0o755)
            return
    path.mkdir(mode=0o755)


@dataclass(frozen=True)
class Base:
    key: str
    path: Path  # the base directory; the rootfs is path / "rootfs"
    digest: Digest
    config: dict[str, Any]
    created: bool  # True if this call unpacked it

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


class Cache:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        for sub in ("blobs/sha256", "refs", "bases", "staging", "locks", "sessions", "snapshots"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def put_blob(self, digest: Digest, data: bytes) -> Path:
        """Store verified bytes: temp file → fsync → rename. Bytes that do not match are refused."""
        actual = hashlib.new(digest.algorithm, data).hexdigest()
        if actual != digest.hex:
            raise IntegrityError(f"blob for the cache", str(digest), f"{digest.algorithm}:{actual}")
        final = self.blob_path(digest)
        if final.exists():  # content-addressed: same name, same bytes (and every read re-verifies)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final

    def get_blob(self, digest: Digest, size: int | None, limit: int) -> bytes | None:
        """A cached blob, re-verified on every read; a corrupt one is deleted and reported as absent."""
        path = self.blob_path(digest)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            return read_verified(f, digest, size, f"cached blob {digest.short}", limit)
        except DirgeError:  # IntegrityError included
            path.unlink(missing_ok=True)
            return None

    # -- refs -------------------------------------------------------------------------------

    def _ref_path(self, ref: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(ref.encode()).hexdigest() + ".json")

    def record_ref(self, ref: str, digest: Digest) -> None:
        path = self._ref_path(ref)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ref": ref, "digest": str(digest), "time": time.time()}))
        os.replace(tmp, path)

    def lookup_ref(self, ref: str) -> Digest | None:
        try:
            return parse_digest(json.loads(self._ref_path(ref).read_text())["digest"])
        except (OSError, ValueError, KeyError, DirgeError):
            return None

    # -- bases ------------------------------------------------------------------------------

    @staticmethod
    def base_key(digest: Digest, rootless: bool) -> str:
        return f"{digest.hex}-{'rootless' if rootless else 'root'}"

    def load_base(self, key: str, created: bool = False) -> Base | None:
        """A published base, or None. Keys come from digests, never from user text."""
        if not key.replace("-", "").isalnum():
            return None
        path = self.root / "bases" / key
        try:
            meta = json.loads((path / "image.json").read_text())
            digest = parse_digest(meta["digest"])
        except (OSError, ValueError, KeyError, DirgeError):
            return None
        return Base(key, path, digest, meta.get("config", {}), created)

    def ensure_base(
        self,
        image: str,
        *,
        platform: Platform | None = None,
        rootless: bool | None = None,
        limits: Limits = Limits(),
        lock_timeout: float = 600.0,
        progress: ProgressFn | None = None,
        pull: str = "missing",
        creds: "Credentials | None" = None,
    ) -> Base:
        """The unpacked base of ``image``, built under the key's lock if no complete one exists."""
        if rootless is None:
            rootless = os.geteuid() != 0
        source, resolved = open_image(image, platform, cache=self, pull=pull, creds=creds)
        try:
            return self._ensure_base(image, source, resolved, rootless, limits, lock_timeout, progress)
        finally:
            source.close()

    def _ensure_base(self, image: str, source: BlobSource, resolved: ResolvedImage, rootless: bool,
                     limits: Limits, lock_timeout: float, progress: ProgressFn | None) -> Base:
        self.put_blob(resolved.manifest_digest, resolved.manifest.raw)
        self.put_blob(resolved.manifest.config.digest, resolved.config.raw)
        key = self.base_key(resolved.manifest_digest, rootless)
        base = self.load_base(key)
        if base:
            return base
        with FileLock(self.root / "locks" / f"{key}.lock", lock_timeout):
            base = self.load_base(key)
            if base:  # another process built it while we waited
                return base
            self._build_base(key, source, resolved, image, rootless, limits, progress)
        base = self.load_base(key, created=True)
        assert base is not None
        return base

    def _build_base(self, key: str, source: BlobSource, resolved: ResolvedImage, image: str, rootless: bool,
                    limits: Limits, progress: ProgressFn | None) -> None:
        staging_root = self.root / "staging"
        for leftover in staging_root.glob(f"{key}.*"):  # from a run that was killed: we hold the lock
            remove_tree(leftover)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=staging_root))
        try:
            rootfs = staging / "rootfs"
            make_base_dir(rootfs)
            apply_image(source, resolved, rootfs, rootless=rootless, limits=limits, progress=progress)
            meta = {"image": image, "digest": str(resolved.manifest_digest), "rootless": rootless,
                    "config": resolved.config.config,
                    "platform": str(resolved.platform) if resolved.platform else None}
            (staging / "image.json").write_text(json.dumps(meta, indent=1))
            syncfs(staging)
            os.rename(staging, self.root / "bases" / key)
            fsync_dir(self.root / "bases")
        except BaseException:
            remove_tree(staging)
            raise

    def bases(self) -> list[Path]:
        return sorted(p for p in (self.root / "bases").iterdir() if p.is_dir())
