"""Sessions: per-sandbox rootfs made from a cached base, recorded on disk, removable, snapshottable.

    CACHE/sessions/<id>/session.json   id, image, digest, strategy, base, owner pid (+ its start time), created
    CACHE/sessions/<id>/rootfs         what the sandbox gets (an overlay mount, a snapshot or a copy)
    CACHE/sessions/<id>/upper, work    overlay only
    CACHE/snapshots/<name>/            snapshot.json + upper/ (overlay sessions) or tree/ (the others)

Ids are random (uuid4), never the pid. The base is never written: restoring a snapshot makes a new
session from the base plus the snapshot.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cache import Base, Cache
from ..errors import SessionError
from ..fsutil import fsync_dir, remove_tree
from . import backends
from .backends import Strategy

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

    def alive(self) -> bool:
        return self.pid_start is not None and process_start_time(self.pid) == self.pid_start


class Sessions:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.dir = cache.root / "sessions"
        self.snapshots = cache.root / "snapshots"

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
            restoring = snap_meta["kind"], self._snapshot_dir(snapshot)
        chosen = self.choose(base.rootfs, strategy)
        lowers = [base.rootfs]
        if restoring is not None:
            chosen, lowers = chosen.restore(*restoring, base.rootfs, self.dir)
        pid = owner_pid or os.getpid()
        info = SessionInfo(uuid.uuid4().hex, image, str(base.digest), chosen.name, base.key, pid,
                           process_start_time(pid), time.time(), snapshot)
        sdir = self.dir / info.id
        sdir.mkdir(mode=0o755)
        try:
            (sdir / "session.json").write_text(json.dumps(asdict(info), indent=1))
            chosen.create(lowers, sdir)
        except BaseException:
            chosen.destroy(sdir)
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

    def remove(self, session_id: str) -> None:
        backends.destroy(self.session_dir(session_id))

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
        staging.mkdir()
        try:
            kind = self.strategy(info).snapshot(sdir, info, staging)
            meta = {"name": name, "kind": kind, "base": info.base, "image": info.image, "digest": info.digest,
                    "session": session_id, "created": time.time()}
            (staging / "snapshot.json").write_text(json.dumps(meta, indent=1))
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
