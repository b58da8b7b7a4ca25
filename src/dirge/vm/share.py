"""A directory session as QEMU's 9p ``security_model=mapped-xattr`` serves it, and back.

Why mapped-xattr (see ``vm.qemu``): guest root's chown/chmod/mknod become ``user.virtfs.*`` xattrs on
plain 0600 host files, so the guest can never make a setuid-root file or a device node on the host. What
QEMU's local 9p backend (QEMU 7.2, hw/9pfs/9p-local.c and 9p-xattr.c) then needs from the tree, and what
this module does about it before a boot (``map_session``) and after it (``unmap_session``):

* Symlinks: in the mapped models QEMU reads a symlink as a regular file holding the target (it opens the
  path with O_NOFOLLOW: a real symlink gives ELOOP, QEMU issue #173). The image's symlinks become that
  form for the boot (target as content, ``user.virtfs.mode`` = S_IFLNK|0777, owner in
  ``user.virtfs.uid/gid``, times kept) and real symlinks again afterwards, the guest's new ones too
  (a symlink carries no privilege). Regular files, directories and devices the guest made stay in
  mapped form: that is the safety.
* ACLs: mapped-xattr reads ``system.posix_acl_*`` from ``user.virtfs.system.posix_acl_*``; the image's
  ACLs are mirrored there once (where the mirror is absent, so the guest's own later changes stand).
* File capabilities: QEMU's 9p serves only ``user.*`` and ACL xattrs (any model): ``security.*`` gets
  EOPNOTSUPP. So the guest init gives each file that carries ``security.capability`` its capability
  itself: a copy on a tmpfs with the xattr set (``setcaps_program``), bind-mounted read-only over the
  9p file. Such a file is therefore read-only in a directory boot (writes, rename or unlink over it
  fail with EROFS/EBUSY) and its changes would not reach the session anyway.

Every path is handled by fd (``os.scandir`` on a directory fd, ``*at`` calls), never by joining strings.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..fsutil import PATH_MAX
from .setid import elf_executable

__all__ = ["CAPS_XATTR", "MAPPED_MODE", "capfiles_text", "map_session", "setcaps_program", "unmap_session"]

MAPPED_UID, MAPPED_GID, MAPPED_MODE = "user.virtfs.uid", "user.virtfs.gid", "user.virtfs.mode"
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
CAPS_XATTR = "security.capability"
_MAPPED_ACL = "user.virtfs."  # + the ACL's own name (QEMU's MAP_ACL_ACCESS / MAP_ACL_DEFAULT)


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
        target = os.read(fd, PATH_MAX + 1)
    finally:
        os.close(fd)
    if not target or len(target) > PATH_MAX or b"\0" in target:
        return  # a longer "mapped symlink" is not one of ours: left alone

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


def map_session(rootfs: Path) -> list[tuple[bytes, bytes]]:
    """Put ``rootfs`` into the form mapped-xattr 9p serves faithfully (module doc); the files that
    carry a file capability, as (absolute path in the rootfs, ``security.capability`` value)."""
    caps: list[tuple[bytes, bytes]] = []
    for dir_fd, where, entry in _entries(rootfs):
        name = os.fsencode(entry.name)
        if entry.is_symlink():
            _to_mapped(dir_fd, name)
            continue
        if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            continue
        path = _at(dir_fd, name)
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.ENOENT):
                continue
            raise
        for acl in ACL_XATTRS:
            if acl in names and _MAPPED_ACL + acl not in names:
                os.setxattr(path, _MAPPED_ACL + acl, os.getxattr(path, acl, follow_symlinks=False),
                            follow_symlinks=False)
        if CAPS_XATTR in names and entry.is_file(follow_symlinks=False):
            caps.append((where + b"/" + name, os.getxattr(path, CAPS_XATTR, follow_symlinks=False)))
    return caps


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


def capfiles_text(caps: list[tuple[bytes, bytes]]) -> bytes:
    """``/.dirge/capfiles`` for the guest init: ``N BASE64(PATH)`` a line; copy N is ``/.dirge/caps/N``."""
    return b"".join(b"%d %s\n" % (i, base64.b64encode(path)) for i, (path, _) in enumerate(caps))


def setcaps_program(values: list[bytes]) -> bytes:
    """A static x86-64 program that sets ``security.capability`` to ``values[N]`` on ``/.dirge/caps/N``
    (busybox has no setcap or setfattr) and exits 0, or writes one line to stderr and exits 1."""
    message = b"dirge: cannot set a file capability\n"
    code = bytearray()
    fixups: list[tuple[int, str, int]] = []  # (rel32 offset in code, data label, index)

    def lea(prefix: bytes, label: str, index: int = 0) -> None:
        code.extend(prefix + b"\0\0\0\0")
        fixups.append((len(code) - 4, label, index))

    for i, value in enumerate(values):
        code.extend(b"\xb8" + struct.pack("<I", 188))           # mov eax, setxattr
        lea(b"\x48\x8d\x3d", "path", i)                          # lea rdi, [rip + path_i]
        lea(b"\x48\x8d\x35", "name")                             # lea rsi, [rip + name]
        lea(b"\x48\x8d\x15", "value", i)                         # lea rdx, [rip + value_i]
        code.extend(b"\x41\xba" + struct.pack("<I", len(value)))  # mov r10d, len
        code.extend(b"\x45\x31\xc0\x0f\x05\x48\x85\xc0")        # xor r8d, r8d; syscall; test rax, rax
        lea(b"\x0f\x88", "fail")                                 # js fail
    code.extend(b"\xb8" + struct.pack("<I", 60) + b"\x31\xff\x0f\x05")  # exit(0)
    labels: dict[tuple[str, int], int] = {("fail", 0): len(code)}
    code.extend(b"\xb8\x01\x00\x00\x00\xbf\x02\x00\x00\x00")   # write(2, message, len)
    lea(b"\x48\x8d\x35", "message")
    code.extend(b"\xba" + struct.pack("<I", len(message)) + b"\x0f\x05")
    code.extend(b"\xb8" + struct.pack("<I", 60) + b"\xbf\x01\x00\x00\x00\x0f\x05")  # exit(1)
    for label, index, data in [("name", 0, CAPS_XATTR.encode() + b"\0"), ("message", 0, message),
                               *[("path", i, b"/.dirge/caps/%d\0" % i) for i in range(len(values))],
                               *[("value", i, v) for i, v in enumerate(values)]]:
        labels[(label, index)] = len(code)
        code.extend(data)
    for at, label, index in fixups:
        code[at:at + 4] = struct.pack("<i", labels[(label, index)] - (at + 4))
    return elf_executable(bytes(code))
