"""Apply OCI layer tar streams, in order, onto a destination directory.

Every entry goes through the same sequence (umoci's ``UnpackEntry``, made fd-relative):

1. clean the name as if rooted at ``/`` (``..`` cannot climb out) and check the limits;
2. whiteouts: ``.wh.NAME`` hides NAME, ``.wh..wh..opq`` hides the directory's lower content; both spare
   what this same layer wrote (in any order), and never appear in the result;
3. resolve the parent inside the root (``Root.dir``: symlinks followed as if the root were ``/``);
4. create the entry with ``O_EXCL``-style calls on the last component; on EEXIST, remove what is there
   unless both are directories (a new directory entry then only updates metadata);
5. apply metadata in an order that keeps it: data, owner, mode (chown clears setuid), xattrs (chown
   and writes clear ``security.capability``), times; directory times last, after all contents;
6. remember the path as written by this layer, for later whiteouts of the same layer.

The last component is never followed, so nothing is ever written, chmod-ed, chown-ed, utime-d or
unlinked outside the root, whatever symlinks or hardlinks the image holds.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import LimitExceeded, UnpackError, UnsafeLayer
from .fs import PrivilegedFS, Report, proc_path
from .root import Root, clean_path
from .tar import BLK, CHR, DIR, FIFO, LINK, REG, SYMLINK, Entry, EntryStream

OPAQUE = b".wh..wh..opq"
WHITEOUT_PREFIX = b".wh."
_AUFS_META_PREFIX = b".wh..wh."
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """Bounds over a whole unpack, so a decompression bomb or a pathological tar stops early."""

    max_total_bytes: int = 64 << 30
    max_entries: int = 4_000_000
    max_depth: int = 256
    max_file_bytes: int = 16 << 30

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_entries", "max_depth", "max_file_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limit {name} must be positive")


def _display(parts: tuple[bytes, ...]) -> str:
    return b"/".join(parts).decode("utf-8", "backslashreplace") or "/"


class Applier:
    """Applies layers onto one destination directory; ``finish()`` fixes directory times and modes."""

    def __init__(self, dest: str | os.PathLike[str], fs: PrivilegedFS, limits: Limits = Limits()) -> None:
        self.root = Root(dest, limits.max_depth)
        self.fs = fs
        self.report = fs.report
        self.limits = limits
        self._dir_times: dict[tuple[bytes, ...], tuple[int, int]] = {}
        self._dir_modes: dict[tuple[bytes, ...], int] = {}  # rootless: modes applied only at the end
        self._written: set[tuple[bytes, ...]] = set()
        self._written_order: list[tuple[bytes, ...]] = []
        self._touched: set[tuple[bytes, ...]] = set()  # ancestors of what this layer wrote (lazily)
        self._touched_upto = 0
        self._stale = False  # a directory or symlink was removed: cached directory fds may lie
        self._setgid_dirs: set[tuple[bytes, ...]] = set()  # new files there inherit the dir's group
        self._umask = current_umask()

    def close(self) -> None:
        self.root.close()

    # -- layers ------------------------------------------------------------------------------

    def apply_layer(self, reader: EntryStream) -> None:
        """Apply one layer's entries (``tar.tokens`` of the uncompressed stream)."""
        self._written = set()
        self._written_order = []
        self._touched = set()
        self._touched_upto = 0
        for entry in reader:
            if self._stale or self.root.crowded:
                self.root.forget()
                self._stale = False
            try:
                self._apply_entry(reader, entry)
            except OSError as exc:
                raise UnpackError(f"write {_name(entry)}: {exc.strerror or exc}") from exc
            except (ValueError, OverflowError) as exc:  # values the kernel interfaces refuse
                raise UnsafeLayer(_name(entry), str(exc)) from exc
        self.root.forget()
        self.report.layers += 1

    def finish(self) -> None:
        """Directory modes (rootless) and times, after every layer: children change a directory's mtime."""
        for parts, mode in self._dir_modes.items():
            self._fixup(parts, functools.partial(_fchmod, mode=mode))
        for parts, times in self._dir_times.items():
            self._fixup(parts, functools.partial(_futime, times=times))

    def _fixup(self, parts: tuple[bytes, ...], action: Callable[[int], None]) -> None:
        try:
            fd = self.root.open_nofollow(parts, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return  # removed or replaced by a later layer
        try:
            action(fd)
        finally:
            os.close(fd)

    # -- entries -----------------------------------------------------------------------------

    def _apply_entry(self, reader: EntryStream, entry: Entry) -> None:
        parts = entry.parts
        report, limits = self.report, self.limits
        report.entries += 1
        if report.entries > limits.max_entries:
            raise LimitExceeded("max_entries", report.entries, limits.max_entries)
        if len(parts) > limits.max_depth:
            raise LimitExceeded("max_depth", len(parts), limits.max_depth)
        kind = entry.type
        if kind == REG:
            size = entry.file_size
            if size > limits.max_file_bytes:
                raise LimitExceeded("max_file_bytes", size, limits.max_file_bytes)
            report.bytes += size
            if report.bytes > limits.max_total_bytes:
                raise LimitExceeded("max_total_bytes", report.bytes, limits.max_total_bytes)

        if not parts:
            if kind != DIR:
                raise UnsafeLayer(entry.name.decode("utf-8", "replace"), "would replace the root directory")
            self._dir_metadata(self.root.fd, entry, parts, existing=True)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
            return
        parent = self.root.dir(parts[:-1], create=True)
        assert parent is not None
        if kind == REG:
            self._file(reader, entry, parent, base, parts)
        elif kind == DIR:
            self._directory(entry, parent, base, parts)
        elif kind == SYMLINK:
            self._symlink(entry, parent, base, parts)
        elif kind == LINK:
            self._hardlink(entry, parent, base, parts)
        elif kind in (FIFO, CHR, BLK):
            self._special(entry, parent, base, parts)
        self._written.add(parts)
        self._written_order.append(parts)

    def _touched_dirs(self) -> set[tuple[bytes, ...]]:
        """Ancestors of everything this layer wrote; brought up to date only when a whiteout asks."""
        touched, order = self._touched, self._written_order
        for parts in order[self._touched_upto:]:
            up = parts[:-1]
            while up and up not in touched:
                touched.add(up)
                up = up[:-1]
        self._touched_upto = len(order)
        return touched

    def _make_room(self, parent: int, name: bytes, *, keep_dir: bool) -> bool:
        """Something exists at ``name``: remove it, unless both are directories. True if kept."""
        st = os.lstat(name, dir_fd=parent)
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(parent, name, st.st_mode)
        return False

    def _remove(self, parent: int, name: bytes, mode: int) -> None:
        if stat.S_ISDIR(mode):
            shutil.rmtree(os.fsdecode(name), dir_fd=parent)
            self._stale = True
        else:
            os.unlink(name, dir_fd=parent)
            if stat.S_ISLNK(mode):
                self._stale = True

    # -- whiteouts ---------------------------------------------------------------------------

    def _whiteout(self, parts: tuple[bytes, ...]) -> None:
        base = parts[-1]
        parent = self.root.dir(parts[:-1], create=False)
        if base == OPAQUE:
            if parent is not None:
                self._hide_children(parent, parts[:-1])
            return
        if base.startswith(_AUFS_META_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk and the like): no meaning in OCI layers
        name = base[len(WHITEOUT_PREFIX):]
        if name in (b".", b".."):
            raise UnsafeLayer(_display(parts), "whiteout names '.' or '..'")
        if parent is not None:
            self._hide(parent, parts[:-1] + (name,))

    def _hide(self, parent: int, parts: tuple[bytes, ...]) -> None:
        """Hide lower-layer content at ``parts``; what this layer wrote stays."""
        name = parts[-1]
        if parts in self._touched_dirs():
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except (NotADirectoryError, FileNotFoundError, OSError):
                fd = -1
            if fd >= 0:
                try:
                    self._hide_children(fd, parts)
                finally:
                    os.close(fd)
                return
        if parts in self._written:
            return
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return
        self._remove(parent, name, st.st_mode)

    def _hide_children(self, dir_fd: int, parts: tuple[bytes, ...]) -> None:
        with os.scandir(dir_fd) as it:
            names = [os.fsencode(e.name) for e in it]
        for name in names:
            self._hide(dir_fd, parts + (name,))

    # -- entry types -------------------------------------------------------------------------

    def _times(self, entry: Entry) -> tuple[int, int]:
        return (entry.atime_ns if entry.atime_ns is not None else entry.mtime_ns, entry.mtime_ns)

    def _file(self, reader: EntryStream, entry: Entry, parent: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        mode = entry.mode
        try:
            fd = os.open(name, _FILE_FLAGS, mode & 0o777, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            fd = os.open(name, _FILE_FLAGS, mode & 0o777, dir_fd=parent)
        try:
            if entry.sparse is not None:
                self._write_sparse(reader, entry, fd, parts)
            else:
                write = os.write
                for piece in reader.data(entry):
                    while piece:
                        piece = piece[write(fd, piece):]
            # Owner and mode calls only when the new inode lacks them (most files): two syscalls saved.
            fs = self.fs
            chown = fs.needs_chown(entry.uid, entry.gid) or (not fs.rootless and parts[:-1] in self._setgid_dirs)
            if chown:
                fs.chown_fd(fd, entry.uid, entry.gid, _path(parts))
            if chown or mode & 0o7000 or mode & self._umask:
                os.fchmod(fd, mode)
            if entry.xattrs:
                self._set_xattrs(fd, entry, parts)
            os.utime(fd, ns=self._times(entry))
        finally:
            os.close(fd)

    def _write_sparse(self, reader: EntryStream, entry: Entry, fd: int, parts: tuple[bytes, ...]) -> None:
        regions = entry.sparse or []
        realsize = entry.file_size
        if sum(length for _, length in regions) != entry.size or any(
            off < 0 or length < 0 or off + length > realsize for off, length in regions
        ):
            raise UnsafeLayer(_display(parts), "sparse map does not match the stored data")
        index, done = 0, 0  # current region, bytes written into it
        for piece in reader.data(entry):
            while piece:
                while regions[index][1] == done:
                    index, done = index + 1, 0
                off, length = regions[index]
                take = min(len(piece), length - done)
                written = os.pwrite(fd, piece[:take], off + done)
                done += written
                piece = piece[written:]
        os.ftruncate(fd, realsize)

    def _directory(self, entry: Entry, parent: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        existing = False
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            existing = self._make_room(parent, name, keep_dir=True)
            if not existing:
                os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            self._dir_metadata(fd, entry, parts, existing=existing)
        finally:
            os.close(fd)

    def _dir_metadata(self, fd: int, entry: Entry, parts: tuple[bytes, ...], *, existing: bool) -> None:
        if existing:  # a directory entry over a directory replaces its xattrs (umoci: clear, then set)
            for key in os.listxattr(fd):
                if key not in entry.xattrs and not key.startswith("security.selinux"):
                    try:
                        os.removexattr(fd, key)
                    except OSError:
                        pass
        self.fs.chown_fd(fd, entry.uid, entry.gid, _path(parts))
        mode = entry.mode
        if self.fs.rootless and mode & 0o700 != 0o700:
            # We must keep working inside it; the image's mode is applied in finish().
            self._dir_modes[parts] = mode
            mode |= 0o700
        else:
            self._dir_modes.pop(parts, None)
        os.fchmod(fd, mode)
        if mode & stat.S_ISGID:
            self._setgid_dirs.add(parts)
        else:
            self._setgid_dirs.discard(parts)
        self._set_xattrs(fd, entry, parts)
        self._dir_times[parts] = self._times(entry)

    def _symlink(self, entry: Entry, parent: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        if not entry.linkname or b"\0" in entry.linkname:
            raise UnsafeLayer(_display(parts), "symlink with an empty or NUL-containing target")
        try:
            os.symlink(entry.linkname, name, dir_fd=parent)
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            os.symlink(entry.linkname, name, dir_fd=parent)
        self.fs.chown_at(parent, name, entry.uid, entry.gid, _path(parts), is_link=True)
        if entry.xattrs:
            self._set_xattrs(proc_path(parent, name), entry, parts)
        os.utime(name, ns=self._times(entry), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, entry: Entry, parent: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        target = clean_path(entry.linkname)
        if not target:
            raise UnsafeLayer(_display(parts), "hardlink to the root directory")
        if target == parts:
            return
        # Resolved inside the root like any path; the last component is linked, never followed.
        target_parent = self.root.dir(target[:-1], create=False)
        try:
            if target_parent is None:
                raise FileNotFoundError
            target_st = os.lstat(target[-1], dir_fd=target_parent)
        except FileNotFoundError:
            raise UnsafeLayer(_display(parts), f"hardlink target {_display(target)} does not exist") from None
        if stat.S_ISDIR(target_st.st_mode):
            raise UnsafeLayer(_display(parts), f"hardlink target {_display(target)} is a directory")
        try:
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            st = os.lstat(name, dir_fd=parent)
            if (st.st_dev, st.st_ino) == (target_st.st_dev, target_st.st_ino):
                return
            self._make_room(parent, name, keep_dir=False)
            os.link(target[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)

    def _special(self, entry: Entry, parent: int, name: bytes, parts: tuple[bytes, ...]) -> None:
        def create() -> bool:
            if entry.type == FIFO:
                os.mkfifo(name, 0o600, dir_fd=parent)
                return True
            kind = stat.S_IFCHR if entry.type == CHR else stat.S_IFBLK
            device = os.makedev(entry.devmajor, entry.devminor)
            return self.fs.mknod(parent, name, kind | 0o600, device, _path(parts))

        try:
            created = create()
        except FileExistsError:
            self._make_room(parent, name, keep_dir=False)
            created = create()
        if not created:
            try:  # the entry still replaces what a lower layer had there
                self._make_room(parent, name, keep_dir=False)
            except FileNotFoundError:
                pass
            return
        self.fs.chown_at(parent, name, entry.uid, entry.gid, _path(parts), is_link=False)
        # Not a symlink (we just made it), so the follow-by-default chmod acts on the node itself.
        os.chmod(name, entry.mode, dir_fd=parent)
        if entry.xattrs:
            self._set_xattrs(proc_path(parent, name), entry, parts)
        os.utime(name, ns=self._times(entry), dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, target: int | bytes, entry: Entry, parts: tuple[bytes, ...]) -> None:
        for key, value in entry.xattrs.items():
            self.fs.set_xattr(target, key, value, _path(parts))


def _fchmod(fd: int, mode: int) -> None:
    os.fchmod(fd, mode)


def _futime(fd: int, times: tuple[int, int]) -> None:
    os.utime(fd, ns=times)


def current_umask() -> int:
    """Read without changing it (os.umask would briefly change it for every thread)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: always chmod


def _name(entry: Entry) -> str:
    return _display(clean_path(entry.name)) if b"\0" not in entry.name else repr(entry.name)


def _path(parts: tuple[bytes, ...]) -> bytes:
    return b"/".join(parts)
