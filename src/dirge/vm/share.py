"""A directory session as QEMU's 9p ``security_model=mapped-xattr`` serves it, and back.

Why mapped-xattr (see ``vm.qemu``): guest root's chown/chmod/mknod become ``user.virtfs.*`` xattrs on
plain 0600 host files, so the guest can never make a setuid-root file or a device node on the host. What
QEMU's local 9p backend (QEMU 7.2, hw/9pfs/9p-local.c and 9p-xattr.c) then needs from the tree, and what
this module does about it before a boot (``map_session``) and after it (``unmap_session``):

Symlinks: in the mapped models QEMU reads a symlink as a regular file holding the target (it opens the
  path with O_NOFOLLOW: a real symlink gives ELOOP, QEMU issue #173). The image's symlinks become that
  form for the boot (target as content, ``user.virtfs.mode`` = S_IFLNK|0777, owner in
  ``user.virtfs.uid/gid``, times kept) and real symlinks again afterwards, the guest's new ones too
  (a symlink carries no privilege). Regular files, directories and devices the guest made stay in
  mapped form: that is the safety.

Every path is handled by fd (``os.scandir`` on a directory fd, ``*at`` calls), never by joining strings.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["MAPPED_MODE", "map_session", "unmap_session"]

MAPPED_UID, MAPPED_GID, MAPPED_MODE = "user.virtfs.uid", "user.virtfs.gid", "user.virtfs.mode"
_LINK_MAX = 4096  # PATH_MAX: a longer "mapped symlink" is not one of ours; left alone


def _at(dir_fd: int, name: bytes) -> bytes:
    """A path for the xattr calls, which take no dir fd: the entry through its directory's fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def _entries(root: Path) -> Iterator[tuple[int, bytes, os.DirEntry[str]]]:
    """(directory fd, directory path in the rootfs, entry) for every entry under ``root``, depth first
    (one fd per level). A directory's times are put back once its own entries have been used
    (converting one renames in it)."""
    def walk(fd: int, where: bytes) -> Iterator[tuple[int, bytes, os.DirEntry[str]]]:
        before = os.fstat(fd)
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            yield fd, where, entry
        if os.fstat(fd).st_mtime_ns != before.st_mtime_ns:
            os.utime(fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                continue  # replaced meanwhile: nothing of ours to do in it
            try:
                yield from walk(child, where + b"/" + os.fsencode(entry.name))
            finally:
                os.close(child)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield from walk(top, b"")
    finally:
        os.close(top)


def _replace(dir_fd: int, name: bytes, make: Callable[[bytes], None]) -> None:
    """Build a temp entry with ``make(tmp)`` beside ``name``, then rename it over ``name``."""
    tmp = b".dirge-9p-" + uuid.uuid4().hex.encode()
    try:
        make(tmp)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _to_mapped(dir_fd: int, name: bytes) -> None:
    target = os.readlink(name, dir_fd=dir_fd)
    st = os.lstat(name, dir_fd=dir_fd)

    def make(tmp: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, target)
            os.setxattr(fd, MAPPED_UID, struct.pack("<I", st.st_uid))
            os.setxattr(fd, MAPPED_GID, struct.pack("<I", st.st_gid))
            os.setxattr(fd, MAPPED_MODE, struct.pack("<I", stat.S_IFLNK | 0o777))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)

    _replace(dir_fd, name, make)


def _to_symlink(dir_fd: int, name: bytes) -> None:
    path = _at(dir_fd, name)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        target = os.read(fd, _LINK_MAX + 1)
    finally:
        os.close(fd)
    if not target or len(target) > _LINK_MAX or b"\0" in target:
        return

    def owner(attr: str, default: int) -> int:
        try:
            raw = os.getxattr(path, attr, follow_symlinks=False)
        except OSError:
            return default
        return struct.unpack("<I", raw[:4])[0] if len(raw) >= 4 else default

    uid, gid = owner(MAPPED_UID, st.st_uid), owner(MAPPED_GID, st.st_gid)

    def make(tmp: bytes) -> None:
        os.symlink(target, tmp, dir_fd=dir_fd)
        if os.geteuid() == 0:
            os.chown(tmp, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)

    _replace(dir_fd, name, make)


def map_session(rootfs: Path) -> None:
    """Put ``rootfs`` into the form mapped-xattr 9p serves faithfully (module doc)."""
    for dir_fd, _, entry in _entries(rootfs):
        if entry.is_symlink():
            _to_mapped(dir_fd, os.fsencode(entry.name))


def unmap_session(rootfs: Path) -> None:
    """Turn every mapped symlink under ``rootfs`` (the image's and the guest's) back into a real one."""
    for dir_fd, _, entry in _entries(rootfs):
        if not entry.is_file(follow_symlinks=False):
            continue
        name = os.fsencode(entry.name)
        try:
            raw = os.getxattr(_at(dir_fd, name), MAPPED_MODE, follow_symlinks=False)
        except OSError:
            continue
        if len(raw) >= 4 and stat.S_ISLNK(struct.unpack("<I", raw[:4])[0]):
            _to_symlink(dir_fd, name)
