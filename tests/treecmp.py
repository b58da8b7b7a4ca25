"""A tree-compare helper: everything a rootfs must keep, per path, for equality checks between unpackers."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        if name.startswith("security.selinux"):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    return out


def snapshot(root: str | os.PathLike[str], *, mtimes: bool = True, owners: bool = True,
             all_mtimes: bool = False, with_root: bool = False) -> dict[str, Any]:
    """Map of relative path → (type, mode, uid, gid, size, sha256, link target, xattrs, mtime) plus hardlink
    groups. ``mtimes``: of regular files; ``all_mtimes``: of directories and symlinks too (for images
    that set every one); ``with_root``: the root directory too, as ``"."``."""
    root = os.fspath(root)
    entries: dict[str, Any] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + (["."] if with_root and dirpath == root else []):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            rec: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "xattrs": _xattrs(full)}
            if owners:
                rec["uid"], rec["gid"] = st.st_uid, st.st_gid
            if stat.S_ISREG(kind):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                rec["size"], rec["sha256"] = st.st_size, h.hexdigest()
                if mtimes:
                    rec["mtime"] = st.st_mtime_ns
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                rec["target"] = os.readlink(full)
                del rec["mode"]
            if all_mtimes and (stat.S_ISDIR(kind) or stat.S_ISLNK(kind)):
                rec["mtime"] = st.st_mtime_ns
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                rec["rdev"] = st.st_rdev
            entries[rel] = rec
    groups = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"entries": entries, "hardlinks": groups}


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences (empty when the trees are the same)."""
    out = []
    ea, eb = a["entries"], b["entries"]
    for path in sorted(set(ea) | set(eb)):
        if path not in ea:
            out.append(f"only in second: {path}")
        elif path not in eb:
            out.append(f"only in first: {path}")
        elif ea[path] != eb[path]:
            keys = sorted(k for k in set(ea[path]) | set(eb[path]) if ea[path].get(k) != eb[path].get(k))
            out.append(f"{path}: " + ", ".join(f"{k}: {ea[path].get(k)!r} != {eb[path].get(k)!r}" for k in keys))
    if a["hardlinks"] != b["hardlinks"]:
        out.append(f"hardlink groups: {a['hardlinks']} != {b['hardlinks']}")
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ext4_disk_differences(disk: str | os.PathLike[str], tree: dict[str, Any], mountpoint: Path) -> list[str]:
    """An ext4 disk image against a tree ``snapshot``: ``e2fsck -fn`` must be clean, then the disk is
    loop-mounted read-only at ``mountpoint`` (made here, unmounted before returning) and compared."""
    import subprocess

    fsck = subprocess.run(["e2fsck", "-fn", os.fspath(disk)], capture_output=True, text=True)
    if fsck.returncode != 0:
        return [f"e2fsck -fn exit {fsck.returncode}: {fsck.stdout}"]
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop,ro", os.fspath(disk), str(mountpoint)], check=True)
    try:
        return diff(snapshot(mountpoint), tree)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def erofs_snapshot(ref: str, tmp_path: Path, all_mtimes: bool = False) -> dict[str, Any]:
    """``ref`` written as an erofs image by dirge, checked by fsck.erofs, mounted, snapshotted, unmounted."""
    import subprocess

    from dirge.fsimage.mount import mount_erofs, unmount
    from dirge.sources.open import open_image
    from dirge.flatten import write_erofs

    source, resolved = open_image(ref)
    try:
        write_erofs(source, resolved, tmp_path / "img.erofs")
    finally:
        source.close()
    fsck = subprocess.run(["fsck.erofs", str(tmp_path / "img.erofs")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(tmp_path / "img.erofs", mnt)
    try:
        return snapshot(mnt, all_mtimes=all_mtimes)
    finally:
        unmount(mnt)
