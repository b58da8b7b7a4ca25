"""How a session rootfs is made from a base, fastest first:

overlay  an overlayfs mount (base as lowerdir, per-session upper/work); O(1), needs root
btrfs    a snapshot of the base subvolume; O(1), needs the cache on btrfs
reflink  a per-file FICLONE copy of the tree; metadata work only, needs xfs/btrfs
copy     a full-fidelity copy (copy_file_range, holes kept); works anywhere
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SessionError
from .copytree import FICLONE, copy_tree

STRATEGIES = ("overlay", "btrfs", "reflink", "copy")
BTRFS_MAGIC = 0x9123683E
OVERLAY_MAGIC = 0x794C7630
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def fs_type(path: Path) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _overlay_supported() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def is_subvolume(path: Path) -> bool:
    return fs_type(path) == BTRFS_MAGIC and os.stat(path).st_ino == 256


def reflink_works(directory: Path) -> bool:
    """Probe FICLONE on the filesystem of ``directory`` with two scratch files."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".probe-") as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.write_bytes(b"x" * 4096)
        with open(a, "rb") as src, open(b, "wb") as dst:
            try:
                import fcntl

                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                return True
            except OSError:
                return False


def usable(base_rootfs: Path, work_dir: Path) -> Iterator[str]:
    """Strategies usable for this base on this machine, fastest first, probed lazily: the common
    case (overlay as root) never pays for the reflink probe's scratch files."""
    if os.geteuid() == 0 and _overlay_supported() and fs_type(work_dir) != OVERLAY_MAGIC:
        yield "overlay"
    if is_subvolume(base_rootfs) and shutil.which("btrfs"):
        yield "btrfs"
    if reflink_works(work_dir):
        yield "reflink"
    yield "copy"


def available(base_rootfs: Path, work_dir: Path) -> list[str]:
    return list(usable(base_rootfs, work_dir))


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    # userxattr is only needed (and only accepted) inside a user namespace; as real root it is not.
    options = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise SessionError(f"mount overlay on {target}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    """From the mount table: st_dev tests mistake btrfs subvolumes for mounts."""
    want = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(path)
    for line in lines:
        mount_point = line.split(" ")[4]
        decoded = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount_point)
        if decoded == want:
            return True
    return False


def unmount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            _libc.umount2(os.fsencode(target), _MNT_DETACH)
        elif err not in (errno.EINVAL, errno.ENOENT):
            raise SessionError(f"unmount {target}: {os.strerror(err)}")


def create(strategy: str, lowers: list[Path], session_dir: Path) -> Path:
    """Make ``session_dir/rootfs`` from ``lowers`` (the top first; only overlay takes more than one)."""
    rootfs = session_dir / "rootfs"
    if strategy == "overlay":
        (session_dir / "upper").mkdir()
        (session_dir / "work").mkdir()
        rootfs.mkdir()
        mount_overlay(lowers, session_dir / "upper", session_dir / "work", rootfs)
    elif len(lowers) != 1:
        raise SessionError(f"strategy {strategy} takes one source tree, not {len(lowers)}")
    elif strategy == "btrfs":
        proc = subprocess.run(["btrfs", "subvolume", "snapshot", str(lowers[0]), str(rootfs)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SessionError(f"btrfs snapshot of {lowers[0]}: {proc.stderr.strip()}")
    elif strategy in ("reflink", "copy"):
        copy_tree(lowers[0], rootfs, reflink=strategy == "reflink")
    else:
        raise SessionError(f"unknown session strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return rootfs


def destroy(session_dir: Path) -> None:
    """Unmount (if mounted) and remove a session directory; missing is fine."""
    rootfs = session_dir / "rootfs"
    if is_mountpoint(rootfs):
        unmount(rootfs)
        if is_mountpoint(rootfs):
            raise SessionError(f"remove session {session_dir.name}: {rootfs} is still mounted; unmount it first")
    if rootfs.exists() and is_subvolume(rootfs) and shutil.which("btrfs"):
        subprocess.run(["btrfs", "subvolume", "delete", str(rootfs)], capture_output=True)
    if session_dir.exists():
        from ..unpack import remove_tree

        remove_tree(session_dir)
