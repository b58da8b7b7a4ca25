"""Mounting erofs images read-only: the file itself on Linux >= 6.12, a loop device before that.

A file-backed mount is one ``mount(2)`` (~0.1 ms) and leaves nothing to detach. Older kernels refuse a
regular file as the source (ENOTBLK); then util-linux's ``mount -o loop`` attaches a loop device with
autoclear, so unmounting detaches it and a crash cannot leak it past the next unmount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import DirgeError

MS_RDONLY = 1
_MS_NODEV = 4
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(DirgeError):
    pass


def erofs_supported() -> bool:
    """The running kernel knows erofs (built in or loaded)."""
    try:
        return any(line.split()[-1] == "erofs" for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def mount_erofs(image: Path, target: Path) -> str:
    """Mount ``image`` read-only on ``target``; returns how ("file" or "loop")."""
    flags = MS_RDONLY | _MS_NODEV
    if _libc.mount(os.fsencode(image), os.fsencode(target), b"erofs", flags, None) == 0:
        return "file"
    err = ctypes.get_errno()
    if err not in (errno.ENOTBLK, errno.EINVAL) or shutil.which("mount") is None:
        raise MountError(f"mount erofs image {image} on {target}: {os.strerror(err)}; "
                         f"this needs root and a kernel with erofs (use --base-format tree otherwise)")
    # A kernel without file-backed erofs mounts: util-linux attaches a loop device (autoclear).
    proc = subprocess.run(["mount", "-t", "erofs", "-o", "ro,nodev,loop", str(image), str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"mount erofs image {image} on {target} (loop): {proc.stderr.strip()}")
    return "loop"


def unmount(target: Path) -> None:
    """Unmount ``target`` (lazily if busy); not mounted is fine."""
    if _libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            _libc.umount2(os.fsencode(target), _MNT_DETACH)
        elif err not in (errno.EINVAL, errno.ENOENT):
            raise MountError(f"unmount {target}: {os.strerror(err)}")


def mounted_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path`` (from the mount table), or None."""
    want = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:  # the last mount at a path is the visible one
        fields = line.split(" ")
        if _unescape(fields[4]) == want:
            found = fields[fields.index("-") + 1]
    return found


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = {_unescape(line.split(" ")[4]) for line in lines}
    inside = [p for p in points if p == base or p.startswith(base.rstrip("/") + "/")]
    return [Path(p) for p in sorted(inside, key=lambda p: p.count("/"), reverse=True)]


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
