"""Mounting erofs images read-only: the file itself on Linux >= 6.12, a loop device before that.

A file-backed mount is one ``mount(2)`` (~0.1 ms) and leaves nothing to detach. Older kernels refuse a
regular file as the source (ENOTBLK); then util-linux's ``mount -o loop`` attaches a loop device with
autoclear, so unmounting detaches it and a crash cannot leak it past the next unmount.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import DirgeError
from ..fsutil import MS_NODEV, MS_NOSUID, mounted_at, mounts_under, unmount

__all__ = ["MountError", "erofs_supported", "mount_erofs", "mounted_at", "mounts_under", "unmount"]

MS_RDONLY = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class MountError(DirgeError):
    pass


def erofs_supported() -> bool:
    """The running kernel knows erofs (built in or loaded)."""
    try:
        return any(line.split()[-1] == "erofs" for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


def mount_erofs(image: Path, target: Path) -> str:
    """Mount ``image`` read-only, nosuid and nodev on ``target``; returns how ("file" or "loop")."""
    # nosuid,nodev: the image's setuid files and device nodes mean nothing on the host (they keep their
    # bits, for the guests and sandboxes that mount the image themselves).
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV
    if _libc.mount(os.fsencode(image), os.fsencode(target), b"erofs", flags, None) == 0:
        return "file"
    err = ctypes.get_errno()
    if err not in (errno.ENOTBLK, errno.EINVAL) or shutil.which("mount") is None:
        raise MountError(f"mount erofs image {image} on {target}: {os.strerror(err)}; "
                         f"this needs root and a kernel with erofs (use --base-format tree otherwise)")
    # A kernel without file-backed erofs mounts: util-linux attaches a loop device (autoclear).
    proc = subprocess.run(["mount", "-t", "erofs", "-o", "ro,nosuid,nodev,loop", str(image), str(target)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"mount erofs image {image} on {target} (loop): {proc.stderr.strip()}")
    return "loop"
