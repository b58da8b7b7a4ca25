"""A full-fidelity tree copy, fd-relative: owners, modes, times, xattrs, hardlinks, symlinks, FIFOs,
device nodes and holes. FIFOs and devices are created, never opened (the seed's copy hung on FIFOs).

File data is cloned (FICLONE) when asked and possible, else copied with ``copy_file_range`` between
the data regions found by SEEK_DATA/SEEK_HOLE, else with read/write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ..apply.dirsink import current_umask
from ..apply.fs import try_set_xattr
from ..fsutil import fd_path, is_no_space, no_space, raise_no_space

FICLONE = 0x40049409
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _proc(fd: int, name: str) -> str:
    return f"/proc/self/fd/{fd}/{name}"


class TreeCopier:
    def __init__(self, *, reflink: bool) -> None:
        self.reflink = reflink
        self.privileged = os.geteuid() == 0
        self._ids = (os.geteuid(), os.getegid())
        self._umask = current_umask()
        self._links: dict[tuple[int, int], str] = {}  # (dev, ino) → path relative to the destination root
        self._dst_root = -1

    def copy(self, src: Path, dst: Path) -> None:
        """Copy the tree ``src`` to ``dst`` (which must not exist)."""
        src_fd = os.open(src, _DIR)
        try:
            os.mkdir(dst, 0o700)
            dst_fd = os.open(dst, _DIR)
            self._dst_root = dst_fd
            try:
                self._copy_dir(src_fd, dst_fd, "")
                self._meta(src_fd, dst_fd, os.fstat(src_fd))
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)

    def _copy_dir(self, src_fd: int, dst_fd: int, rel: str) -> None:
        with os.scandir(src_fd) as it:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        # A new file's group is its directory's when that is setgid (the copy's root may inherit S_ISGID,
        # and so every directory below it until its own mode is set, after its children).
        setgid = self.privileged and bool(os.fstat(dst_fd).st_mode & stat.S_ISGID)
        for name, st in entries:
            mode = st.st_mode
            path = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(mode):
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                s_fd = os.open(name, _DIR, dir_fd=src_fd)
                d_fd = os.open(name, _DIR, dir_fd=dst_fd)
                try:
                    self._copy_dir(s_fd, d_fd, path)
                    self._meta(s_fd, d_fd, st)
                finally:
                    os.close(s_fd)
                    os.close(d_fd)
            elif self._linked(st, name, dst_fd, path):
                continue
            elif stat.S_ISREG(mode):
                self._copy_file(src_fd, dst_fd, name, st, setgid)
            elif stat.S_ISLNK(mode):
                os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                self._meta_at(src_fd, dst_fd, name, st, link=True)
            elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                if stat.S_ISFIFO(mode):
                    os.mkfifo(name, 0o600, dir_fd=dst_fd)
                else:
                    os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst_fd)
                self._meta_at(src_fd, dst_fd, name, st, link=False)
            # sockets are not image content: skipped

    def _linked(self, st: os.stat_result, name: str, dst_fd: int, path: str) -> bool:
        """Hardlinks stay hardlinks: link to the first copy of an inode (not directories or symlinks)."""
        if st.st_nlink < 2 or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            return False
        first = self._links.get((st.st_dev, st.st_ino))
        if first is None:
            self._links[(st.st_dev, st.st_ino)] = path
            return False
        os.link(first, name, src_dir_fd=self._dst_root, dst_dir_fd=dst_fd, follow_symlinks=False)
        return True

    def _copy_file(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, setgid: bool) -> None:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            # Created with its final permission bits (never the special ones: those follow the owner), so
            # most files need neither fchown nor fchmod: two syscalls a file.
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          st.st_mode & 0o777, dir_fd=dst_dir)
            try:
                copy_data(src, dst, st.st_size, reflink=self.reflink)
                self._meta(src, dst, st, fresh=not setgid)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _meta(self, src_fd: int, dst_fd: int, st: os.stat_result, *, fresh: bool = False) -> None:
        """``fresh``: ``dst_fd`` is a file just made with ``st``'s permission bits, its group not a setgid
        directory's: owner and mode are set only where the new inode lacks them."""
        mode = stat.S_IMODE(st.st_mode)
        chown = self.privileged and not (fresh and (st.st_uid, st.st_gid) == self._ids)
        if chown:
            os.fchown(dst_fd, st.st_uid, st.st_gid)
        if chown or not fresh or mode & (0o7000 | self._umask):  # (chown clears setuid: mode after it)
            os.fchmod(dst_fd, mode)
        for key in os.listxattr(src_fd):
            try_set_xattr(dst_fd, key, os.getxattr(src_fd, key))
        os.utime(dst_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _meta_at(self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, *, link: bool) -> None:
        if self.privileged:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        if not link:
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)  # a node we just made, not a symlink
        src_path = _proc(src_dir, name)
        for key in os.listxattr(src_path, follow_symlinks=False):
            try_set_xattr(_proc(dst_dir, name), key, os.getxattr(src_path, key, follow_symlinks=False))
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)


def copy_data(src: int, dst: int, size: int, *, reflink: bool) -> str:
    """Clone or copy ``size`` bytes, keeping holes; returns how ("reflink" or "sparse"). Out of space
    or quota: ``NoSpace`` naming both files."""
    try:
        return _copy_data(src, dst, size, reflink=reflink)
    except OSError as exc:
        if is_no_space(exc):
            raise no_space(exc, f"copy {fd_path(src)} to {fd_path(dst)}") from exc
        raise


def _copy_data(src: int, dst: int, size: int, *, reflink: bool) -> str:
    if reflink:
        try:
            fcntl.ioctl(dst, FICLONE, src)
            return "reflink"
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            start = pos
        try:
            end = os.lseek(src, start, os.SEEK_HOLE)
        except OSError:
            end = size
        _copy_range(src, dst, start, min(end, size) - start)
        pos = end
    os.ftruncate(dst, size)
    return "sparse"


def clone_file(src: Path, dst_fd: int) -> str:
    """The whole file ``src`` into the open file ``dst_fd``: a reflink where the filesystem shares
    blocks (xfs, btrfs), else its data regions in-kernel (holes kept). Returns how."""
    with open(src, "rb") as fin:
        return copy_data(fin.fileno(), dst_fd, os.fstat(fin.fileno()).st_size, reflink=True)


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
            n = 0
            while done < length:
                chunk = os.pread(src, min(1 << 20, length - done), offset + done)
                if not chunk:
                    return
                os.pwrite(dst, chunk, offset + done)
                done += len(chunk)
            return
        if n == 0:
            return  # the file shrank under us
        done += n


def copy_tree(src: Path, dst: Path, *, reflink: bool = False) -> None:
    """Copy ``src`` to the new ``dst``; out of space or quota there: ``NoSpace`` naming both (the caller
    removes the partial copy, as after any failure)."""
    with raise_no_space(f"copy {src} to {dst}"):
        TreeCopier(reflink=reflink).copy(src, dst)
