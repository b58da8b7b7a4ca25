"""Sessions: per-sandbox rootfs made from a cached base, recorded on disk, removable, snapshottable.

    CACHE/sessions/<id>/session.json   id, image, digest, strategy, base, owner pid (+ its start time), created
    CACHE/sessions/<id>/rootfs         what the sandbox gets (an overlay mount, a snapshot or a copy)
    CACHE/sessions/<id>/upper, work    overlay and fuse-overlayfs only
    CACHE/snapshots/<name>/            snapshot.json + upper/ (overlay sessions) or tree/ (the others)

Disk sessions (for block-device VMs; strategy "disk", no rootfs directory):

    CACHE/sessions/<id>/disk.ext4      an ext4 session's own disk, from the cached base disk (reflink or
                                       a sparse copy; ``disk.qcow2``: a qcow2 overlay backed by it)
    CACHE/sessions/<id>/scratch.ext4   an erofs session's small empty ext4 (``upper/``, ``work/``) for
                                       the guest's overlay; its disk is the shared base erofs image itself
    CACHE/snapshots/<name>/            snapshot.json (kind "disk") + a copy of disk.* or scratch.ext4

Ids are random (uuid4), never the pid. The base is never written: restoring a snapshot makes a new
session from the base plus the snapshot.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..store.cache import Base, Cache
from ..errors import SessionError
from ..fsutil import fsync_dir, raise_no_space, remove_tree
from . import backends
from .backends import Strategy
from .copytree import copy_data
from .disks import DISK_FORMATS, make_session_disk

DISK = "disk"  # the strategy name and the snapshot kind of disk sessions
SCRATCH_SIZE = 256 << 20  # an erofs session's scratch disk (sparse: costs only what the guest writes)

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9._-]+")


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (guards against pid reuse); None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


@dataclass
class SessionInfo:
    id: str
    image: str
    digest: str
    strategy: str
    base: str
    pid: int
    pid_start: int | None
    created: float
    snapshot: str | None = None
    # Disk sessions only (None for directory sessions; absent from an older dirge's session.json):
    disk: str | None = None  # the VM's root disk: the session's own file, or (erofs) the shared base image
    disk_fs: str | None = None  # "ext4" or "erofs"
    disk_format: str | None = None  # "raw" or "qcow2"
    disk_strategy: str | None = None  # "reflink", "sparse", "qcow2", or "shared" (erofs: the base itself)
    scratch: str | None = None  # erofs: the session's writable ext4 for the guest's overlay upper

    def record(self) -> str:
        """session.json's text: a directory session's without the (empty) disk fields, as before them."""
        fields = asdict(self)
        for name in _DISK_FIELDS:
            if fields[name] is None:
                del fields[name]
        return json.dumps(fields, indent=1)

    def alive(self) -> bool:
        return self.pid_start is not None and process_start_time(self.pid) == self.pid_start


def destroy(session_dir: Path) -> None:
    """Remove a session directory (missing is fine): a disk session's files are all inside it (its
    erofs base image is not, and stays); a directory session goes by its strategy (unmounting first)."""
    try:
        is_disk = json.loads((session_dir / "session.json").read_text()).get("strategy") == DISK
    except (OSError, ValueError, AttributeError):
        is_disk = False
    if is_disk:
        remove_tree(session_dir)
    else:
        backends.destroy(session_dir)


def make_scratch(path: Path, size: int = SCRATCH_SIZE) -> None:
    """An empty ext4 with ``upper/`` and ``work/`` (an overlay's upper and work dirs in the guest),
    written by dirge's own ext4 writer: no mkfs, no mount, no root."""
    from ..apply.tree import DIR, Node
    from ..fsimage.ext4 import Ext4Error, Ext4Sink

    now = time.time_ns()
    root = Node(DIR, 0o755, mtime_ns=now)
    assert root.children is not None
    for name in (b"upper", b"work"):
        root.children[name] = Node(DIR, 0o755, mtime_ns=now)
    try:
        sink = Ext4Sink(path, uuid=uuid.uuid4().bytes, build_time_ns=now, size=size, journal=False)
        try:
            sink.finish(root)
        finally:
            sink.close()
    except (Ext4Error, ValueError) as exc:
        raise SessionError(f"scratch disk {path} of {size} bytes: {exc}") from exc
    os.chmod(path, 0o600)


def copy_file(src: Path, dst: Path) -> str:
    """``dst`` (absent) a copy of ``src``: a reflink where the filesystem shares blocks, else sparse."""
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            return copy_data(fin.fileno(), fd, os.fstat(fin.fileno()).st_size, reflink=True)
        finally:
            os.close(fd)


_DISK_FIELDS = ("disk", "disk_fs", "disk_format", "disk_strategy", "scratch")


def _as_creators(info: SessionInfo) -> SessionInfo:
    """``info`` owned by this (the creating) process: what is recorded while the session is being made."""
    me = os.getpid()
    return dataclasses.replace(info, pid=me, pid_start=process_start_time(me))


def _write_record(sdir: Path, info: SessionInfo) -> None:
    """``session.json`` replaced whole (temp file, rename): a kill never leaves a torn record."""
    tmp = sdir / ".session.json.tmp"
    tmp.write_text(info.record())
    os.replace(tmp, sdir / "session.json")


def _publish(sdir: Path) -> None:
    """A complete session directory opened to readers (0755, as a session has always been): while it
    is made it is 0700, so nobody else sees a half-made rootfs."""
    os.chmod(sdir, 0o755)


class Sessions:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.dir = cache.sessions_dir
        self.snapshots = cache.snapshots_dir

    def session_dir(self, session_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{32}", session_id):
            raise SessionError(f"session {session_id!r}: not a session id (32 hex digits)")
        return self.dir / session_id

    def rootfs(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "rootfs"

    def choose(self, base_rootfs: Path, strategy: str | None) -> Strategy:
        """The named strategy if it works here, else (None) the fastest that does."""
        if strategy is None:
            return next(backends.usable(base_rootfs, self.dir))
        wanted = backends.get(strategy)
        if not wanted.probe(base_rootfs, self.dir):
            usable = backends.available(base_rootfs, self.dir)
            raise SessionError(f"session strategy {strategy!r} is not available here (available: {', '.join(usable)})")
        return wanted

    def strategy(self, info: SessionInfo) -> Strategy:
        """The strategy a session was made with (recorded by name in its session.json)."""
        return backends.get(info.strategy)

    def create(self, base: Base, image: str, *, strategy: str | None = None, owner_pid: int | None = None,
               snapshot: str | None = None) -> SessionInfo:
        restoring: tuple[str, Path] | None = None  # (kind, directory) of the snapshot to start from
        if snapshot is not None:
            snap_meta = self.snapshot_meta(snapshot)
            if snap_meta["base"] != base.key:
                raise SessionError(f"restore snapshot {snapshot}: it belongs to another base ({snap_meta['base']})")
            if snap_meta["kind"] == DISK:
                raise SessionError(f"restore snapshot {snapshot}: it is of a disk session; restore it as one")
            restoring = snap_meta["kind"], self._snapshot_dir(snapshot)
        chosen = self.choose(base.rootfs, strategy)
        lowers = [base.rootfs]
        if restoring is not None:
            chosen, lowers = chosen.restore(*restoring, base.rootfs, self.dir)
        pid = owner_pid or os.getpid()
        info = SessionInfo(uuid.uuid4().hex, image, str(base.digest), chosen.name, base.key, pid,
                           process_start_time(pid), time.time(), snapshot)
        sdir = self._new_dir(_as_creators(info))
        try:
            # Recorded first as this process's (a kill midway leaves a dead session gc removes), handed
            # to its owner once complete: the owner never learnt of a session its creator died making.
            with raise_no_space(f"create session {info.id} in {self.dir}"):
                chosen.create(lowers, sdir)
                _write_record(sdir, info)
            _publish(sdir)
        except BaseException:
            chosen.destroy(sdir)
            raise
        return info

    def create_disk(self, base: Base, image: str, *, disk_format: str = "raw", owner_pid: int | None = None,
                    snapshot: str | None = None, scratch_size: int = SCRATCH_SIZE) -> SessionInfo:
        """A disk session of ``base`` (an ext4 or erofs base disk, ``bases.ensure_disk``): ext4 gets its
        own copy of the disk (``disks.make_session_disk``); erofs shares the read-only base image and
        gets its own scratch disk. From ``snapshot``: a copy of the saved disk (or scratch) instead."""
        fs = base.format
        if fs not in ("ext4", "erofs"):
            raise SessionError(f"disk session of {image}: its base is a {fs}, not a disk (ext4 or erofs)")
        if disk_format not in DISK_FORMATS:
            raise SessionError(f"disk format {disk_format!r}: choose one of {', '.join(DISK_FORMATS)}")
        saved: Path | None = None
        if snapshot is not None:
            meta = self.snapshot_meta(snapshot)
            if meta["kind"] != DISK or meta["base"] != base.key:
                raise SessionError(f"restore snapshot {snapshot}: it is not a disk snapshot of base {base.key}")
            disk_format = meta.get("disk_format") or "raw"
            saved = self._snapshot_dir(snapshot) / meta["file"]
        if fs == "erofs" and disk_format != "raw":
            raise SessionError("an erofs disk session shares the read-only base image: use --disk-format raw")
        pid = owner_pid or os.getpid()
        session_id = uuid.uuid4().hex
        sdir = self.dir / session_id
        own = sdir / ("disk.qcow2" if disk_format == "qcow2" else f"disk.{fs}")
        scratch = sdir / "scratch.ext4" if fs == "erofs" else None
        info = SessionInfo(session_id, image, str(base.digest), DISK, base.key, pid, process_start_time(pid),
                           time.time(), snapshot, disk=str(own if fs == "ext4" else base.image_file), disk_fs=fs,
                           disk_format=disk_format, scratch=str(scratch) if scratch else None)
        # Recorded first (as this process's, handed to the owner at the end), so a crash midway
        # leaves a dead session that ``prune`` and gc remove.
        self._new_dir(_as_creators(info))
        try:
            if scratch is not None:
                info.disk_strategy = "shared"
                if saved is not None:
                    copy_file(saved, scratch)
                else:
                    make_scratch(scratch, scratch_size)
            elif saved is not None:  # a saved qcow2 still names the base as its backing file
                how = copy_file(saved, own)
                info.disk_strategy = "qcow2" if disk_format == "qcow2" else how
            else:
                info.disk_strategy = make_session_disk(base.image_file, own, disk_format=disk_format)
            _write_record(sdir, info)
            _publish(sdir)
        except BaseException:
            remove_tree(sdir)
            raise
        return info

    def get(self, session_id: str) -> SessionInfo:
        path = self.session_dir(session_id) / "session.json"
        try:
            return SessionInfo(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise SessionError(f"session {session_id}: no such session in {self.dir}") from None
        except (ValueError, TypeError) as exc:
            raise SessionError(f"session {session_id}: unreadable state {path} ({exc})") from None

    def list(self) -> list[SessionInfo]:
        out = []
        for sdir in sorted(self.dir.iterdir()):
            try:
                out.append(self.get(sdir.name))
            except SessionError:
                continue
        return sorted(out, key=lambda s: s.created)

    def _new_dir(self, info: SessionInfo) -> Path:
        """``sessions/<id>/`` holding its record from the moment it appears (made as ``.new-<id>``,
        then renamed): a kill never leaves a session directory no record names (gc removes the
        ``.new-*`` a killed creator leaves)."""
        sdir = self.dir / info.id
        staging = self.dir / f".new-{info.id}"
        with raise_no_space(f"create session {info.id} in {self.dir}"):
            staging.mkdir(mode=0o700)  # 0755 once complete (``_publish``)
        try:
            with raise_no_space(f"create session {info.id} in {self.dir}"):
                _write_record(staging, info)
            os.rename(staging, sdir)
        except BaseException:
            remove_tree(staging)
            raise
        return sdir

    def remove(self, session_id: str) -> None:
        """Remove a session: unmounted, then renamed into the cache's trash at once (a kill midway
        leaves either the whole recorded session or trash that gc empties), then deleted."""
        sdir = self.session_dir(session_id)
        if not sdir.exists():
            return
        rootfs = sdir / "rootfs"
        if backends.is_mountpoint(rootfs):
            backends.unmount(rootfs)
            if backends.is_mountpoint(rootfs):
                raise SessionError(f"remove session {session_id}: {rootfs} is still mounted; unmount it first")
        trash = self.cache.new_trash(f"session-{session_id}")
        try:
            os.rename(sdir, trash / "session")
        except FileNotFoundError:  # removed by another process meanwhile
            remove_tree(trash)
            return
        destroy(trash / "session")
        remove_tree(trash)

    def prune(self) -> builtins.list[str]:  # (the method list() shadows the builtin here)
        """Remove sessions whose creating process has exited; return their ids."""
        gone = [s.id for s in self.list() if not s.alive()]
        for session_id in gone:
            self.remove(session_id)
        return gone

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot_dir(self, name: str) -> Path:
        if not _SNAPSHOT_NAME.fullmatch(name) or name in (".", ".."):
            raise SessionError(f"snapshot name {name!r}: use letters, digits, '.', '_' and '-' (not '.' or '..')")
        return self.snapshots / name

    def snapshot_meta(self, name: str) -> dict[str, str]:
        try:
            meta: dict[str, str] = json.loads((self._snapshot_dir(name) / "snapshot.json").read_text())
            return meta
        except FileNotFoundError:
            raise SessionError(f"snapshot {name}: no such snapshot") from None

    def snapshot_save(self, session_id: str, name: str) -> Path:
        """Record a session's state as its strategy saves it (the overlay upper layer, else the whole tree)."""
        final = self._snapshot_dir(name)
        info = self.get(session_id)
        if final.exists():
            raise SessionError(f"snapshot {name}: already exists; delete it first")
        sdir = self.session_dir(session_id)
        staging = self.snapshots / f".{name}.{uuid.uuid4().hex}"
        with raise_no_space(f"save snapshot {name} in {self.snapshots}"):
            staging.mkdir(mode=0o700)
        try:
            extra: dict[str, Any] = {}
            if info.strategy == DISK:  # a copy of what the session wrote: its disk, or its scratch disk
                kind, saved = DISK, Path(info.scratch or info.disk or "")
                copy_file(saved, staging / saved.name)
                extra = {"file": saved.name, "disk_fs": info.disk_fs, "disk_format": info.disk_format}
            else:
                kind = self.strategy(info).snapshot(sdir, info, staging)
            meta = {"name": name, "kind": kind, "base": info.base, "image": info.image, "digest": info.digest,
                    "session": session_id, "created": time.time(), **extra}
            with raise_no_space(f"save snapshot {name} in {self.snapshots}"):
                (staging / "snapshot.json").write_text(json.dumps(meta, indent=1))
            os.chmod(staging, 0o755)
            os.rename(staging, final)
            fsync_dir(self.snapshots)
        except BaseException:
            remove_tree(staging)
            raise
        return final

    def snapshot_list(self) -> builtins.list[dict[str, str]]:
        out = []
        for p in sorted(self.snapshots.iterdir()):
            if not p.name.startswith("."):
                try:
                    out.append(self.snapshot_meta(p.name))
                except (SessionError, ValueError):
                    continue
        return out

    def snapshot_delete(self, name: str) -> None:
        path = self._snapshot_dir(name)
        if not path.exists():
            raise SessionError(f"snapshot {name}: no such snapshot")
        remove_tree(path)
