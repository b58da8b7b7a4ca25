"""The cache's records and their check: what a base was when it was published, and whether it still is.

    bases/<key>/verify.json   tree:  {"format": "tree", "bytes": N, "entries": {path: entry}}
                                     entry: type, mode, uid, gid, size, link target, rdev, xattr
                                     names and, for regular files, the content's sha256
                              erofs/ext4: {"format", "bytes", "file": "rootfs.<fmt>", "size", "sha256"}

Trees are walked fd-relatively (``dir_fd``), never following a symlink. ``verify_cache`` rehashes every
blob and checks every base against its record; ``repair`` removes what is bad so the next prepare
rebuilds (or re-fetches) it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import Cache
from .errors import LockTimeout
from .fsutil import remove_tree, unmount, mounts_under

RECORD = "verify.json"
_CHUNK = 1 << 20

_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return h.hexdigest()


def hash_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _entry(dirfd: int, name: str, st: os.stat_result) -> dict[str, Any]:
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
    entry: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    try:
        entry["xattrs"] = sorted(os.listxattr(f"/proc/self/fd/{dirfd}/{name}", follow_symlinks=False))
    except OSError:
        entry["xattrs"] = []
    if kind == "file":
        entry["size"] = st.st_size
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except OSError:
            entry["sha256"] = None
        else:
            try:
                entry["sha256"] = _hash_fd(fd)
            finally:
                os.close(fd)
    elif kind == "symlink":
        entry["target"] = os.readlink(name, dir_fd=dirfd)
    elif kind in ("char", "block"):
        entry["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    return entry


def tree_entries(root: Path) -> dict[str, dict[str, Any]]:
    """Every entry under ``root`` by path ("/" for root itself), walked without following symlinks."""
    out: dict[str, dict[str, Any]] = {}
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(top)
        out["/"] = {"type": "dir", "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}

        def walk(dirfd: int, prefix: str) -> None:
            for name in sorted(os.listdir(dirfd)):
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                path = f"{prefix}/{name}"
                out[path] = _entry(dirfd, name, st)
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                    try:
                        walk(sub, path)
                    finally:
                        os.close(sub)

        walk(top, "")
    finally:
        os.close(top)
    return out


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (files counted once per inode; mounts below it not entered)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        top_dev = os.lstat(path).st_dev
    except OSError:
        return 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode) and (st.st_dev == top_dev or current == path):
            try:
                stack.extend(Path(e.path) for e in os.scandir(current))
            except OSError:
                continue
    return total


def make_record(base_dir: Path, fmt: str) -> dict[str, Any]:
    """The record of a base directory (staging, before publication) in format ``fmt``."""
    if fmt == "tree":
        return {"format": fmt, "bytes": disk_usage(base_dir), "entries": tree_entries(base_dir / "rootfs")}
    image = base_dir / f"rootfs.{fmt}"
    return {"format": fmt, "bytes": disk_usage(base_dir), "file": image.name, "size": image.stat().st_size,
            "sha256": hash_file(image)}


def write_record(base_dir: Path, fmt: str) -> dict[str, Any]:
    """Write ``verify.json`` into ``base_dir`` (staging); returns the record."""
    record = make_record(base_dir, fmt)
    (base_dir / RECORD).write_text(json.dumps(record))
    return record


def read_record(cache: Cache, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(cache.verify_record_path(key).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def base_bytes(cache: Cache, key: str) -> int:
    """A base's bytes on disk: from its image.json or its record (cheap), else measured."""
    try:
        meta = json.loads((cache.base_dir(key) / "image.json").read_text())
        if isinstance(meta, dict) and isinstance(meta.get("bytes"), int):
            return int(meta["bytes"])
    except (OSError, ValueError):
        pass
    record = read_record(cache, key)
    if record is not None and isinstance(record.get("bytes"), int):
        return int(record["bytes"])
    return disk_usage(cache.base_dir(key))


@dataclass
class Problem:
    kind: str  # "blob" or "base"
    name: str  # the blob digest or the base key
    what: str  # "corrupt", "missing", "changed", "extra", "truncated", "unrecorded"
    detail: str = ""


@dataclass
class VerifyReport:
    blobs: int = 0
    bases: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # bases without a record (an older dirge): not errors
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "blobs": self.blobs, "bases": self.bases,
                "problems": [asdict(p) for p in self.problems], "notes": [asdict(p) for p in self.notes],
                "repaired": self.repaired}


def check_blobs(cache: Cache) -> tuple[int, list[Problem]]:
    count, problems = 0, []
    for path in sorted(cache.blobs_dir.iterdir()):
        if path.name.startswith("."):
            continue  # a temp file of a writer (gc removes orphans)
        count += 1
        try:
            actual = hash_file(path)
        except OSError as exc:
            problems.append(Problem("blob", f"sha256:{path.name}", "corrupt", f"unreadable: {exc.strerror}"))
            continue
        if actual != path.name:
            problems.append(Problem("blob", f"sha256:{path.name}", "corrupt", f"content hashes to sha256:{actual}"))
    return count, problems


def missing_blobs(cache: Cache) -> list[Problem]:
    """The manifest and config blobs of every base (stored when it was made, kept by gc) that are gone;
    the next prepare of the image stores them again."""
    out = []
    for key in cache.base_keys():
        base = cache.load_base(key)
        if base is None:
            continue
        wanted = [str(base.digest)]
        try:
            manifest = json.loads(cache.blob_path(base.digest).read_bytes())
            if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
                wanted.append(str(manifest["config"].get("digest")))
        except (OSError, ValueError):
            pass
        for digest in wanted:
            hex_digest = digest.removeprefix("sha256:")
            if len(hex_digest) == 64 and not (cache.blobs_dir / hex_digest).exists():
                out.append(Problem("blob", digest, "missing", f"of base {key}"))
    return out


def check_base(cache: Cache, key: str) -> list[Problem]:
    """What is wrong with base ``key`` against its record ([] if nothing; "unrecorded" if it has none)."""
    base = cache.load_base(key)
    if base is None:
        return [Problem("base", key, "corrupt", "no readable image.json")]
    record = read_record(cache, key)
    if record is None:
        return [Problem("base", key, "unrecorded", "no verify.json (published by an older dirge)")]
    if base.format == "tree":
        try:
            now = tree_entries(base.rootfs)
        except OSError as exc:
            return [Problem("base", key, "missing", f"rootfs unreadable: {exc.strerror}")]
        was: dict[str, Any] = record.get("entries") or {}
        out = []
        for path in sorted(set(was) - set(now)):
            out.append(Problem("base", key, "missing", path))
        for path in sorted(set(now) - set(was)):
            out.append(Problem("base", key, "extra", path))
        for path in sorted(set(was) & set(now)):
            if was[path] != now[path]:
                fields = sorted(k for k in set(was[path]) | set(now[path]) if was[path].get(k) != now[path].get(k))
                out.append(Problem("base", key, "changed", f"{path} ({', '.join(fields)})"))
        return out
    image = base.image_file
    try:
        size = image.stat().st_size
    except OSError:
        return [Problem("base", key, "missing", image.name)]
    if size != record.get("size"):
        what = "truncated" if size < int(record.get("size") or 0) else "changed"
        return [Problem("base", key, what, f"{image.name}: {size} bytes, recorded {record.get('size')}")]
    if hash_file(image) != record.get("sha256"):
        return [Problem("base", key, "changed", f"{image.name}: content differs from its record")]
    return []


def remove_base_dir(cache: Cache, key: str) -> None:
    """Unmount (lazily if busy) and remove base ``key``: renamed into trash first, so it is gone at once."""
    path = cache.base_dir(key)
    if not path.exists():
        return
    for point in mounts_under(path):
        unmount(point)
    trash = cache.new_trash(key)
    os.rename(path, trash / "base")
    remove_tree(trash)


def base_users(cache: Cache) -> set[str]:
    """Base keys that live sessions and snapshots name."""
    from .session import Sessions

    sessions = Sessions(cache)
    return {x.base for x in sessions.list() if x.alive()} | {str(m.get("base")) for m in sessions.snapshot_list()}


def verify_cache(cache: Cache, repair: bool = False) -> VerifyReport:
    """Rehash every blob, check every base against its record; ``repair`` removes the bad ones (a bad
    base only while nothing holds its lease: one in use is reported and kept)."""
    report = VerifyReport()
    report.blobs, blob_problems = check_blobs(cache)
    report.problems.extend(blob_problems)
    report.problems.extend(missing_blobs(cache))
    for key in cache.base_keys():
        report.bases += 1
        for problem in check_base(cache, key):
            (report.notes if problem.what == "unrecorded" else report.problems).append(problem)
    if repair:
        for problem in report.problems:
            if problem.kind == "blob" and problem.what == "missing":
                continue  # nothing to remove: the next prepare stores it again
            if problem.kind == "blob":
                cache.blobs_dir.joinpath(problem.name.removeprefix("sha256:")).unlink(missing_ok=True)
                report.repaired.append(problem.name)
            elif problem.name not in report.repaired:
                try:
                    with cache.base_lease(problem.name, 0, shared=False), cache.base_lock(problem.name, 0):
                        if problem.name in base_users(cache):  # read under the lease, as gc does
                            continue  # a live session or a snapshot stands on it: kept, still reported
                        remove_base_dir(cache, problem.name)
                except LockTimeout:
                    continue  # in use right now: left for the next repair
                report.repaired.append(problem.name)
    return report
