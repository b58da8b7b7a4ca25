"""Per-session disk files for block-device VMs, made from a cached base disk in O(1) where possible:

reflink  a FICLONE clone of the base disk (cache on xfs or btrfs): blocks shared, copied on write
qcow2    a qcow2 overlay whose backing file is the base disk (``qemu-img``; QEMU and Cloud Hypervisor
         read it), so the session disk holds only what the guest writes
sparse   the base disk's data regions copied in-kernel (SEEK_DATA/SEEK_HOLE), holes kept: the fallback

The base disk is never written: every session gets its own file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import SessionError
from .copytree import clone_file

DISK_FORMATS = ("raw", "qcow2")


def make_session_disk(base: Path, dest: Path, *, disk_format: str = "raw") -> str:
    """Make ``dest`` (absent) a disk for one session from ``base``; returns how: "reflink", "sparse"
    (raw) or "qcow2"."""
    if disk_format not in DISK_FORMATS:
        raise SessionError(f"disk format {disk_format!r}: choose one of {', '.join(DISK_FORMATS)}")
    if disk_format == "qcow2":
        return _qcow2_overlay(base, dest)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return clone_file(base, fd)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _qcow2_overlay(base: Path, dest: Path) -> str:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise SessionError("a qcow2 session disk needs qemu-img: apt-get install qemu-utils "
                           "(or use --disk-format raw)")
    # The backing file by absolute path and with its format named: qemu never probes a raw base.
    proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base.resolve()),
                           str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        dest.unlink(missing_ok=True)
        raise SessionError(f"make qcow2 overlay {dest} on {base}: {proc.stderr.strip() or proc.stdout.strip()}")
    return "qcow2"
