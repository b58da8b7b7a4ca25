"""The filesystem seam: the operations whose meaning depends on privilege, one method each.

The applier never asks "am I root?": it is handed a ``PrivilegedFS`` or a ``RootlessFS`` (umoci's
fseval split). Rootless mode keeps owners in umoci's ``user.rootlesscontainers`` xattr and turns
what an unprivileged user cannot do (device nodes, ``security.*``/``trusted.*`` xattrs) into
recorded skips.
"""

from __future__ import annotations

import builtins
import errno
import os
from dataclasses import dataclass, field

from .tar import UNSET_ID

ROOTLESS_XATTR = "user.rootlesscontainers"
_NOOP_ID = UNSET_ID  # the protobuf's "no owner set": (uid_t)-1


@dataclass
class Report:
    """What an unpack did, including everything it had to leave out."""

    entries: int = 0
    bytes: int = 0
    layers: int = 0
    skipped: list[str] = field(default_factory=list)

    def skip(self, path: builtins.bytes, why: str) -> None:  # (the field above shadows bytes)
        self.skipped.append(f"{path.decode('utf-8', 'replace')}: {why}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_rootless_owner(uid: int, gid: int) -> bytes:
    """umoci's protobuf ``Resource{uint32 uid = 1; uint32 gid = 2}``; root (0) is stored as "no change"."""
    out = b""
    if uid:
        out += b"\x08" + _varint(uid)
    else:
        out += b"\x08" + _varint(_NOOP_ID)
    if gid:
        out += b"\x10" + _varint(gid)
    else:
        out += b"\x10" + _varint(_NOOP_ID)
    return out


def decode_rootless_owner(data: bytes) -> tuple[int, int]:
    values = {1: 0, 2: 0}
    pos = 0
    while pos < len(data):
        key = data[pos]
        pos += 1
        shift = value = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values[key >> 3] = 0 if value == _NOOP_ID else value
    return values[1], values[2]


def try_set_xattr(target: int | str | bytes, key: str, value: bytes) -> OSError | None:
    """Set an xattr on an fd, or on a path without following its last component. An xattr the
    filesystem or our privilege refuses is returned, not raised (umoci's rule: skipped, not fatal)."""
    try:
        if isinstance(target, int):
            os.setxattr(target, key, value)
        else:
            os.setxattr(target, key, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return exc
        raise
    return None


def _proc_path(dir_fd: int, name: bytes) -> bytes:
    # The xattr calls have no *at form; the magic link pins the parent we already resolved.
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


class PrivilegedFS:
    """As root: real owners, device nodes, every xattr namespace."""

    rootless = False

    def __init__(self, report: Report) -> None:
        self.report = report
        self._ids = (os.geteuid(), os.getegid())

    def needs_chown(self, uid: int, gid: int) -> bool:
        """False when a new file already has these owners (the common root:root case saves a syscall)."""
        return (uid, gid) != self._ids

    def chown_fd(self, fd: int, uid: int, gid: int, path: bytes) -> None:
        os.fchown(fd, uid, gid)

    def chown_at(self, dir_fd: int, name: bytes, uid: int, gid: int, path: bytes, *, is_link: bool) -> None:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def mknod(self, dir_fd: int, name: bytes, mode: int, device: int, path: bytes) -> bool:
        os.mknod(name, mode, device, dir_fd=dir_fd)
        return True

    def set_xattr(self, target: int | bytes, key: str, value: bytes, path: bytes) -> None:
        """``target`` is an fd, or a /proc path whose last component is not followed."""
        refused = try_set_xattr(target, key, value)
        if refused is not None:
            self.report.skip(path, f"xattr {key}: {refused.strerror}")


class RootlessFS(PrivilegedFS):
    """As an ordinary user: files are ours; intended owners go into ``user.rootlesscontainers``."""

    rootless = True

    def needs_chown(self, uid: int, gid: int) -> bool:
        return bool(uid or gid)

    def chown_fd(self, fd: int, uid: int, gid: int, path: bytes) -> None:
        if uid or gid:
            self.set_xattr(fd, ROOTLESS_XATTR, encode_rootless_owner(uid, gid), path)

    def chown_at(self, dir_fd: int, name: bytes, uid: int, gid: int, path: bytes, *, is_link: bool) -> None:
        if is_link:
            return  # user.* xattrs are not allowed on symlinks; umoci drops these owners too
        if uid or gid:
            self.set_xattr(_proc_path(dir_fd, name), ROOTLESS_XATTR, encode_rootless_owner(uid, gid), path)

    def mknod(self, dir_fd: int, name: bytes, mode: int, device: int, path: bytes) -> bool:
        self.report.skip(path, "device node not created (rootless)")
        return False

    def set_xattr(self, target: int | bytes, key: str, value: bytes, path: bytes) -> None:
        if not key.startswith("user."):
            self.report.skip(path, f"xattr {key} not set (rootless)")
            return
        super().set_xattr(target, key, value, path)


def proc_path(dir_fd: int, name: bytes) -> bytes:
    return _proc_path(dir_fd, name)
