"""Filesystem helpers shared by the store, the pipeline and sessions.

The lowest layer of dirge: it imports nothing of dirge but ``errors``, so any module may use it without
creating an import cycle.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path

from .errors import NoSpace, SessionError

BTRFS_MAGIC = 0x9123683E
OVERLAY_MAGIC = 0x794C7630
_MNT_DETACH = 2

# A file dirge reads whole out of an image, on the host (/etc/passwd and /etc/group for add_user and the
# guest's user lookup; from a directory, an ext4 disk or an erofs base): bounded, checked against the
# file's size before a byte is read, so a huge or sparse file is refused, never read or its holes filled.
READ_MAX = 256 << 20
PATH_MAX = 4096  # Linux's PATH_MAX: a path (or a symlink target) with its NUL
NAME_MAX = 255  # Linux's NAME_MAX: one path component


def over_read_max(path: str, size: int | None = None) -> str:
    """The one message for an image file over ``READ_MAX``: names the path, its size (None: found
    while streaming it) and the cap."""
    return (f"{path} is {f'{size} bytes' if size is not None else 'larger than that'}, over dirge's "
            f"{READ_MAX >> 20} MiB cap on a file it reads from an image (/etc/passwd, /etc/group are read whole)")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def remove_tree(path: Path) -> None:
    """Remove a tree we wrote, even where rootless modes left directories unwritable.

    Anything but a real directory is unlinked directly: never a reason to touch its parent's mode."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
        return

    def onerror(func: object, p: str, exc_info: object) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk without waiting (sync_file_range(2)): a file
    written in one pass then costs the sync before publishing only its tail. Best effort."""
    _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, pos: int) -> None:
    """``pwrite`` until every byte is written (a short write is not an error); out of space: ``NoSpace``."""
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise no_space(exc, f"write {fd_path(fd)}") from exc
        raise


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def fd_path(fd: int) -> str:
    """The path an open file descriptor names (for messages), else ``fd N``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def no_space(exc: OSError, what: str, where: str | os.PathLike[str] | None = None) -> NoSpace:
    """The ``NoSpace`` for an ENOSPC/EDQUOT ``exc`` met doing ``what`` (e.g. ``write PATH``) on the
    filesystem of ``where`` (default: ``exc.filename`` or nothing)."""
    place = where if where is not None else exc.filename
    why = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    on = f" (filesystem of {os.fsdecode(place)})" if place and os.fsdecode(place) not in what else ""
    return NoSpace(f"{what}: {why}{on}; free space there (or choose another location) and retry")


class raise_no_space:
    """``with raise_no_space("copy X to Y", Y):`` turns an ENOSPC/EDQUOT ``OSError`` into ``NoSpace``."""

    def __init__(self, what: str, where: str | os.PathLike[str] | None = None) -> None:
        self.what, self.where = what, where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            raise no_space(exc, self.what, self.where) from exc


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fs_type(path: Path) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_subvolume(path: Path) -> bool:
    return fs_type(path) == BTRFS_MAGIC and os.stat(path).st_ino == 256


# Host-side mounts of image content never honour its setuid bits or device nodes (the files keep them:
# a guest kernel, or a sandbox that mounts the tree itself, still sees and enforces them).
MS_NOSUID, MS_NODEV = 2, 4
# The new mount API (Linux >= 5.2); the numbers are the same on every architecture.
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 2, 4
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
_libc.syscall.restype = ctypes.c_long


def _syscall(what: str, nr: int, *args: object) -> int:
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _fs_log(fd: int) -> str:
    """The messages a filesystem context logged (why ``fsconfig`` refused), joined for an error."""
    lines = []
    for _ in range(16):
        try:
            lines.append(os.read(fd, 512).decode(errors="replace").strip())
        except OSError:  # ENODATA: no more
            break
    return "; ".join(line for line in lines if line)


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlayfs (``lowers`` top first) on ``target``, ``nosuid,nodev``, whatever the paths hold.

    With the new mount API every layer is its own ``fsconfig`` string, so no ``,`` or ``:`` in a path can
    split an option or a layer list. The kernel unescapes ``upperdir``/``workdir`` (a ``\\`` is doubled
    for it) but takes each ``lowerdir+`` (Linux >= 6.8) verbatim; before that one ``lowerdir`` list is
    escaped, and a kernel without the API (< 5.2) gets ``mount(2)`` with every separator escaped."""
    try:
        _overlay_fsmount(lowers, upper, work, target, lowerdir_plus=True)
    except _NoNewMountAPI:
        _overlay_mount2(lowers, upper, work, target)


class _NoNewMountAPI(Exception):
    pass


def _overlay_fsmount(lowers: list[Path], upper: Path, work: Path, target: Path, *, lowerdir_plus: bool) -> None:
    try:
        fd = _syscall("fsopen", _SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise _NoNewMountAPI() from None
        raise SessionError(f"mount overlay on {target}: {exc.strerror}") from None
    try:
        def config(key: str, value: bytes) -> None:
            _syscall(f"fsconfig {key}", _SYS_FSCONFIG, fd, _FSCONFIG_SET_STRING, key.encode(), value, 0)

        try:
            config("source", b"overlay")
            if lowerdir_plus:
                try:
                    config("lowerdir+", os.fsencode(lowers[0]))
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    lowerdir_plus = False  # Linux < 6.8: one list, its separators escaped
            if lowerdir_plus:
                for lower in lowers[1:]:
                    config("lowerdir+", os.fsencode(lower))
            else:
                config("lowerdir", b":".join(_escape(p, b":") for p in lowers))
            config("upperdir", _escape(upper, b""))
            config("workdir", _escape(work, b""))
            _syscall("create", _SYS_FSCONFIG, fd, _FSCONFIG_CMD_CREATE, None, None, 0)
            mnt = _syscall("fsmount", _SYS_FSMOUNT, fd, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV)
        except OSError as exc:
            log = _fs_log(fd)
            raise SessionError(f"mount overlay on {target}: {exc.strerror}" + (f" ({log})" if log else "")) from None
        try:
            _syscall("move_mount", _SYS_MOVE_MOUNT, mnt, b"", _AT_FDCWD, os.fsencode(target),
                     _MOVE_MOUNT_F_EMPTY_PATH)
        except OSError as exc:
            raise SessionError(f"mount overlay on {target}: {exc.strerror}") from None
        finally:
            os.close(mnt)  # an open mount fd would keep the mount busy
    finally:
        os.close(fd)


def _overlay_mount2(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    options = (b"lowerdir=" + b":".join(_escape(p, b",:") for p in lowers) +
               b",upperdir=" + _escape(upper, b",") + b",workdir=" + _escape(work, b","))
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", MS_NOSUID | MS_NODEV, options) != 0:
        raise SessionError(f"mount overlay on {target}: {os.strerror(ctypes.get_errno())}")


def _escape(path: Path, separators: bytes) -> bytes:
    """``path`` as overlayfs' option parser reads it back: a backslash before ``\\`` and each separator."""
    out = os.fsencode(path).replace(b"\\", b"\\\\")
    for sep in separators:
        out = out.replace(bytes([sep]), b"\\" + bytes([sep]))
    return out


def _mount_table() -> list[tuple[str, str]] | None:
    """(mount point, filesystem type) of every mount, in mount order; None if unreadable."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    out = []
    for line in lines:
        fields = line.split(" ")
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        out.append((point, fields[fields.index("-") + 1]))
    return out


def is_mountpoint(path: Path) -> bool:
    """From the mount table: st_dev tests mistake btrfs subvolumes for mounts."""
    table = _mount_table()
    if table is None:
        return os.path.ismount(path)
    want = os.path.realpath(path)
    return any(point == want for point, _ in table)


def mounted_at(path: Path) -> str | None:
    """The filesystem type visible at ``path`` if something is mounted exactly there (the last mount)."""
    want = os.path.realpath(path)
    found = None
    for point, fstype in _mount_table() or []:
        if point == want:
            found = fstype
    return found


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    inside = {p for p, _ in _mount_table() or [] if p == base or p.startswith(base.rstrip("/") + "/")}
    return [Path(p) for p in sorted(inside, key=lambda p: p.count("/"), reverse=True)]


def unmount(target: Path) -> None:
    """Unmount ``target`` (lazily if busy); not mounted is fine. An ordinary user's FUSE mount (a
    fuse-overlayfs session) goes through ``fusermount3 -u``: umount2 needs CAP_SYS_ADMIN."""
    if _libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM and (mounted_at(target) or "").startswith("fuse"):
            _fusermount_unmount(target)
        elif err == errno.EBUSY:
            _libc.umount2(os.fsencode(target), _MNT_DETACH)
        elif err not in (errno.EINVAL, errno.ENOENT):
            raise SessionError(f"unmount {target}: {os.strerror(err)}")


def _fusermount_unmount(target: Path) -> None:
    """``fusermount3 -u`` (lazily, ``-z``, if busy): the setuid helper that lets the user who made a
    FUSE mount remove it; it refuses anyone else's."""
    import subprocess

    tool = shutil.which("fusermount3")
    if tool is None:
        raise SessionError(f"unmount {target}: it is a FUSE mount and fusermount3 is not installed "
                           "(apt-get install fuse3), or unmount it as root")
    proc = subprocess.run([tool, "-u", "--", str(target)], capture_output=True, text=True)
    if proc.returncode != 0 and is_mountpoint(target):
        proc = subprocess.run([tool, "-u", "-z", "--", str(target)], capture_output=True, text=True)
        if proc.returncode != 0 and is_mountpoint(target):
            raise SessionError(f"unmount {target}: fusermount3 -u failed ({proc.stderr.strip()}); "
                               "unmount it as the user who mounted it, or as root")
