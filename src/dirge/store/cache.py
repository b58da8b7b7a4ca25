"""The cache, a store only: content-addressed blobs, ref → digest records, base directories keyed by
manifest digest, staging directories and locks. It knows nothing of how an image is resolved or a base
is built (that is ``bases.py``, above both this package and the applier), so it imports no source, no
pipeline and no session.

    CACHE/
      blobs/sha256/<hex>          verified blobs (manifests, configs, registry layers)
      refs/<sha256 of ref>.json   {"ref", "digest", "time"}: what a ref resolved to last
      bases/<key>/                published bases: image.json + rootfs/ (tree) or rootfs.erofs (erofs)
                                  key: <hex>-<root|rootless>-<format>; <hex>-<root|rootless> is a tree
                                  base of an older dirge, still read
      staging/<key>.<rnd>/        bases being built; removed by the next builder of that key
      locks/<key>.lock            flock per base key (and per variant build, per buildah export)
      locks/<key>.lease           a base's lease: shared while a prepare/restore makes a session of it,
                                  exclusive (non-blocking) while gc/rmi removes it
      bases/<key>/last_used       touched on every prepare of the base (gc's LRU order)
      bases/<key>/verify.json     the record written at publish (``store/records.py``)
      trash/                      what gc/rmi/session rm is removing (renamed here first, then deleted)
      buildah/, exports/<id>/     local variants: buildah storage and OCI exports (sources/buildah.py)
      sessions/, snapshots/       see session/
      boot/                       ``dirge boot``'s initramfs images and ``--accel auto`` verdicts
                                  (named by ``vm/bootcache.py``)

No name under the cache is ever derived from ref text: refs are hashed, bases are named by digest.
A base is published by one rename after its tree has been synced, so it is complete or absent.

Safe as root: a cache root dirge creates is 0700 (missing parents 0755), whatever the umask. Every
``Cache`` checks, as ssh does for ``~/.ssh``, that the cache root, each of its parents up to ``/`` (the
resolved path) and the subdirectories above that exist are owned by root or the caller and not writable
by group or others, a parent with the sticky bit (``/tmp``) excepted; else ``UnsafeCache``. Inside a user
namespace (``unshare --user --map-root-user``) a parent may also be owned by an unmapped user (shown as
the overflow uid: the host's root owns ``/`` and ``/tmp``), which the namespace cannot name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..oci.blob import read_verified
from ..errors import DirgeError, IntegrityError, UnsafeCache
from ..fsutil import fsync_dir, raise_no_space, remove_tree, syncfs
from .lock import FileLock
from ..oci.reference import Digest, parse_digest

__all__ = ["BASE_FORMATS", "Base", "Cache", "Layout", "check_cache_dir", "default_cache_dir", "fsync_dir", "syncfs"]

BASE_FORMATS = ("tree", "erofs", "ext4")  # what a base directory can hold (ext4: a disk, never mounted)


def default_cache_dir() -> Path:
    env = os.environ.get("DIRGE_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "dirge" if xdg else Path.home() / ".cache" / "dirge"


@dataclass(frozen=True)
class Base:
    key: str
    path: Path  # the base directory; the rootfs is path / "rootfs"
    digest: Digest
    config: dict[str, Any]
    created: bool  # True if this call unpacked it
    format: str = "tree"  # one of BASE_FORMATS: "tree" (a directory) or "erofs" (an image mounted there)
    source: str = "layers"  # what it was made from: "layers", or "artifact" (a prepared base, image.json names it)

    @property
    def rootfs(self) -> Path:
        """The tree sessions are made from (for an erofs base, where its image is mounted read-only)."""
        return self.path / "rootfs"

    @property
    def image_file(self) -> Path:
        """The filesystem image of a non-tree base (``rootfs.<format>``)."""
        return self.path / f"rootfs.{self.format}"


class Layout:
    """Where everything lives under a cache root: the one owner of the on-disk layout (paths only; it
    creates nothing, so a caller that must not touch the disk yet can still name things)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def refs_dir(self) -> Path:
        return self.root / "refs"

    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def sessions_dir(self) -> Path:
        return self.root / "sessions"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    @property
    def buildah_dir(self) -> Path:
        return self.root / "buildah"

    @property
    def boot_dir(self) -> Path:
        """``dirge boot``'s initramfs images and accelerator verdicts (their names: ``vm/bootcache.py``)."""
        return self.root / "boot"

    @property
    def erofs_probe_path(self) -> Path:
        return self.root / "erofs-probe.json"

    def lock_path(self, name: str) -> Path:
        """A named lock file (``<base key>``, ``export-<id>``, ``variant-<hash>``)."""
        return self.locks_dir / f"{name}.lock"

    def base_dir(self, key: str) -> Path:
        return self.bases_dir / key

    def verify_record_path(self, key: str) -> Path:
        return self.base_dir(key) / "verify.json"

    def last_used_path(self, key: str) -> Path:
        return self.base_dir(key) / "last_used"


_SUBDIRS = ("blobs", "blobs/sha256", "refs", "bases", "staging", "locks", "sessions", "snapshots")


def _mkdir_exact(path: Path, mode: int) -> None:
    """``path`` created with exactly ``mode`` (the umask may only have taken bits); existing is fine."""
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def _make_cache_root(root: Path) -> None:
    """The cache root 0700, its missing parents 0755."""
    if root.is_dir():
        return
    missing = []
    for p in [root, *root.absolute().parents]:
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    for p in reversed(missing):
        _mkdir_exact(p, 0o700 if p == missing[0] else 0o755)


def _unmapped_uid() -> int | None:
    """The uid files of users outside this user namespace show (None in the initial namespace)."""
    try:
        if Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]:
            return None
        return int(Path("/proc/sys/kernel/overflowuid").read_text())
    except (OSError, ValueError):
        return None


def _unsafe(st: os.stat_result, uid: int, parent: bool, unmapped: int | None) -> str | None:
    """Why a directory with ``st`` cannot be trusted by ``uid`` (None: it can)."""
    if st.st_uid not in (0, uid) and not (parent and st.st_uid == unmapped):
        return f"owned by uid {st.st_uid} (neither root nor uid {uid})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_mode & 0o022 and not (parent and st.st_mode & stat.S_ISVTX):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_cache_dir(root: Path) -> None:
    """Refuse (``UnsafeCache``) a cache another user could change: see the module's docstring."""
    uid, unmapped = os.geteuid(), _unmapped_uid()
    real = Path(os.path.realpath(root))
    checks = [(real, False), *((p, True) for p in real.parents)]
    checks += [(real / sub, False) for sub in _SUBDIRS]
    for path, parent in checks:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        why = _unsafe(st, uid, parent, unmapped)
        if why is not None:
            what = "" if path == real else f"its {'parent' if parent else 'subdirectory'} {path} is "
            raise UnsafeCache(f"refuse cache {root}: {what or 'it is '}{why}; another user could change what "
                              f"dirge trusts there (fix the owner or mode, or use another --cache-dir)")


class Cache(Layout):
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        super().__init__(root)
        _make_cache_root(self.root)
        check_cache_dir(self.root)
        for sub in _SUBDIRS:
            _mkdir_exact(self.root / sub, 0o755)

    def touch_base(self, key: str) -> None:
        """Record that base ``key`` was just used (gc evicts least recently used first)."""
        try:
            self.last_used_path(key).touch()
        except OSError:
            pass

    def last_used(self, key: str) -> float:
        """When base ``key`` was last used (its publication if never since)."""
        for path in (self.last_used_path(key), self.base_dir(key) / "image.json"):
            try:
                return path.stat().st_mtime
            except OSError:
                continue
        return 0.0

    def base_lease(self, key: str, timeout: float = 600.0, *, shared: bool = True) -> FileLock:
        """The lease of base ``key``: held shared by whoever is making a session of it (from finding the
        base until the session is recorded), taken exclusively, without waiting, by gc and rmi."""
        return FileLock(self.locks_dir / f"{key}.lease", timeout, shared=shared)

    def new_trash(self, what: str) -> Path:
        """A fresh name under ``trash/`` to rename something into before deleting it."""
        self.trash_dir.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{what}.", dir=self.trash_dir))

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def put_blob(self, digest: Digest, data: bytes) -> Path:
        """Store verified bytes: temp file → fsync → rename. Bytes that do not match are refused."""
        actual = hashlib.new(digest.algorithm, data).hexdigest()
        if actual != digest.hex:
            raise IntegrityError("blob for the cache", str(digest), f"{digest.algorithm}:{actual}")
        final = self.blob_path(digest)
        if final.exists():  # content-addressed: same name, same bytes (and every read re-verifies)
            return final
        with raise_no_space(f"store blob {digest}", final.parent):
            final.parent.mkdir(parents=True, exist_ok=True)
            _write_replace(final, ".tmp-", data, sync=True)
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
        return self.refs_dir / (hashlib.sha256(ref.encode()).hexdigest() + ".json")

    def record_ref(self, ref: str, digest: Digest) -> None:
        path = self._ref_path(ref)
        with raise_no_space(f"record ref {ref}", path.parent):
            data = json.dumps({"ref": ref, "digest": str(digest), "time": time.time()}).encode()
            _write_replace(path, ".ref-", data, sync=False)

    def ref_records(self) -> list[tuple[Path, dict[str, Any]]]:
        """Every ref record (its file and {"ref", "digest", "time"}); unreadable ones are skipped."""
        out = []
        for path in sorted(self.refs_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and isinstance(data.get("digest"), str):
                    out.append((path, data))
            except (OSError, ValueError):
                continue
        return out

    def lookup_ref(self, ref: str) -> Digest | None:
        try:
            return parse_digest(json.loads(self._ref_path(ref).read_text())["digest"])
        except (OSError, ValueError, KeyError, DirgeError):
            return None

    # -- bases ------------------------------------------------------------------------------

    @staticmethod
    def base_key(digest: Digest, rootless: bool, format: str = "tree", options: str = "") -> str:
        """``options``: what else shapes the base's bytes (an ext4 disk's size and journal), [a-z0-9]."""
        return f"{digest.hex}-{'rootless' if rootless else 'root'}-{format}" + (f"-{options}" if options else "")

    @staticmethod
    def base_is_rootless(key: str) -> bool:
        """Whether base ``key`` keeps owners rootless (``user.rootlesscontainers``)."""
        return key.split("-")[1:2] == ["rootless"]

    @staticmethod
    def legacy_base_key(digest: Digest, rootless: bool) -> str:
        """The key of a tree base written before bases had formats."""
        return f"{digest.hex}-{'rootless' if rootless else 'root'}"

    def load_base(self, key: str, created: bool = False) -> Base | None:
        """A published base, or None. Keys come from digests, never from user text."""
        if not key.replace("-", "").isalnum():
            return None
        path = self.base_dir(key)
        try:
            meta = json.loads((path / "image.json").read_text())
            digest = parse_digest(meta["digest"])
        except (OSError, ValueError, KeyError, DirgeError):
            return None
        fmt = meta.get("format") or "tree"  # an older dirge's image.json has none: it only made trees
        if fmt not in BASE_FORMATS:
            return None
        source = meta.get("source")
        kind = source.get("from") if isinstance(source, dict) else None
        return Base(key, path, digest, meta.get("config", {}), created, fmt,
                    "artifact" if kind == "artifact" else "layers")

    def find_base(self, digest: Digest, rootless: bool, format: str, options: str = "") -> Base | None:
        """The published base of ``digest`` in this mode and format, under its key or, for a tree, under
        the key an older dirge gave it (so existing caches keep their bases)."""
        keys = [self.base_key(digest, rootless, format, options)]
        if format == "tree":
            keys.append(self.legacy_base_key(digest, rootless))
        for key in keys:
            base = self.load_base(key)
            if base is not None and base.format == format:
                return base
        return None

    def base_lock(self, key: str, timeout: float) -> FileLock:
        """The lock that serialises building (and replacing) the base ``key``."""
        return FileLock(self.lock_path(key), timeout)

    def new_staging(self, key: str) -> Path:
        """A fresh staging directory for base ``key``. The caller holds the key's lock, so any other
        staging directory of that key is a killed builder's and is removed first."""
        staging_root = self.staging_dir
        for leftover in staging_root.glob(f"{key}.*"):
            remove_tree(leftover)
        with raise_no_space(f"make a staging directory for base {key}", staging_root):
            return Path(tempfile.mkdtemp(prefix=f"{key}.", dir=staging_root))

    def publish_base(self, staging: Path, key: str, meta: dict[str, Any]) -> Base:
        """Write ``image.json``, make ``staging`` durable, then rename it to the base ``key``: a base is
        complete or absent, never torn, even after a crash."""
        (staging / "image.json").write_text(json.dumps(meta, indent=1))
        syncfs(staging)
        os.rename(staging, self.base_dir(key))
        fsync_dir(self.bases_dir)
        base = self.load_base(key, created=True)
        assert base is not None
        return base

    def bases(self) -> list[Path]:
        return sorted(p for p in self.bases_dir.iterdir() if p.is_dir())

    def base_keys(self) -> list[str]:
        return [p.name for p in self.bases()]


def _write_replace(path: Path, prefix: str, data: bytes, *, sync: bool) -> None:
    """``data`` into ``path`` by a temp file beside it (unique per thread, not per pid) and a rename;
    on any failure (a full filesystem: a short write) the temp file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
