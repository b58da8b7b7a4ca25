"""The records of published bases: what a base was when it was published, and what it costs on disk.

    bases/<key>/verify.json   tree:  {"format": "tree", "bytes": N, "entries": {path: entry}}
                                     entry: type, mode, uid, gid, size, link target, rdev, xattr
                                     names and, for regular files, the content's sha256
                              erofs/ext4: {"format", "bytes", "file": "rootfs.<fmt>", "size", "sha256"}

``bases.py`` writes the record into staging before publication (so base and record share one rename);
``verify.py`` checks bases against it, gc reads their sizes from it. Trees are walked fd-relatively
(``dir_fd``), never following a symlink.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from .cache import Cache

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


def make_record(base_dir: Path, fmt: str, sha256: str | None = None) -> dict[str, Any]:
    """The record of a base directory (staging, before publication) in format ``fmt``; ``sha256``: the
    image file's hex digest when the writer already hashed what it wrote (a fetched artifact), saving a pass."""
    if fmt == "tree":
        return {"format": fmt, "bytes": disk_usage(base_dir), "entries": tree_entries(base_dir / "rootfs")}
    image = base_dir / f"rootfs.{fmt}"
    return {"format": fmt, "bytes": disk_usage(base_dir), "file": image.name, "size": image.stat().st_size,
            "sha256": sha256 or hash_file(image)}


def write_record(base_dir: Path, fmt: str, sha256: str | None = None) -> dict[str, Any]:
    """Write ``verify.json`` into ``base_dir`` (staging); returns the record."""
    record = make_record(base_dir, fmt, sha256)
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
