"""The directory sink: the merge engine's decisions made real in a destination directory, by fd.

Parents are opened inside the root (``Root.dir``: ``openat2(RESOLVE_IN_ROOT)``); the last component is
never followed: creation uses ``O_EXCL``/``mkdirat``/``symlinkat``/``linkat`` on the parent's fd,
metadata the new fd or ``AT_SYMLINK_NOFOLLOW``. So nothing is ever written, chmod-ed, chown-ed,
utime-d or unlinked outside the root, whatever symlinks or hardlinks the image holds, even if the
tree and the disk disagreed.

Metadata order: data, owner, mode (chown clears setuid), xattrs (chown and writes clear
``security.capability``), times; directory modes, default ACLs (the kernel copies them into
every child made after them; GNU tar too sets them last) and times last, after every layer.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from .fs import PrivilegedFS, proc_path
from .root import Root
from ..fsutil import is_no_space, no_space, pwrite_all
from .tree import FileData, Node, Parts, walk
from . import tree

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DEFAULT_ACL = "system.posix_acl_default"


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _space_checked(
    method: "Callable[Concatenate[DirSink, Parts, _P], _R]",
) -> "Callable[Concatenate[DirSink, Parts, _P], _R]":
    """Out of space or inodes while making ``parts``: a ``NoSpace`` naming the entry and the destination."""

    @functools.wraps(method)
    def checked(self: "DirSink", parts: Parts, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, parts, *args, **kwargs)
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(exc, f"write {os.fsdecode(_path(parts))} into {self.dest}") from exc
            raise

    return checked


class DirSink:
    """Writes the merged image into the existing directory ``dest``."""

    def __init__(self, dest: str | os.PathLike[str], fs: PrivilegedFS, max_depth: int = 256) -> None:
        # Parents no entry named are 0755 root:root in the tree: the same on disk (rootless: the caller's).
        self.root = Root(dest, max_depth, owner=None if fs.rootless else (0, 0))
        self.dest = os.fsdecode(os.fspath(dest))
        self.fs = fs
        self._umask = current_umask()

    def close(self) -> None:
        if self.root.fd >= 0:
            self.root.close()
            self.root.fd = -1

    def _parent(self, parts: Parts) -> int:
        if self.root.crowded:  # never between two lookups of one call: their fds must stay open
            self.root.forget()
        fd = self.root.dir(parts[:-1], create=True)
        assert fd is not None
        return fd

    def _clear(self, parent: int, name: bytes) -> None:
        """Something the tree did not expect is in the way (never, unless the disk changed under us)."""
        st = os.lstat(name, dir_fd=parent)
        self._remove_at(parent, name, st.st_mode)

    def _remove_at(self, parent: int, name: bytes, mode: int) -> None:
        if stat.S_ISDIR(mode):
            shutil.rmtree(os.fsdecode(name), dir_fd=parent)
            self.root.forget()  # cached fds may name removed directories
        else:
            os.unlink(name, dir_fd=parent)

    # -- the Sink protocol -------------------------------------------------------------------

    def remove(self, parts: Parts, node: Node) -> None:
        parent = self._parent(parts)
        try:
            st = os.lstat(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            return
        self._remove_at(parent, parts[-1], st.st_mode)

    def release(self, node: Node) -> None:
        pass  # the unlink freed the data

    @_space_checked
    def file(self, parts: Parts, parent_node: Node, node: Node, data: FileData) -> None:
        parent, name, mode = self._parent(parts), parts[-1], node.mode
        try:
            fd = os.open(name, _FILE_FLAGS, mode & 0o777, dir_fd=parent)
        except FileExistsError:
            self._clear(parent, name)
            parent = self._parent(parts)
            fd = os.open(name, _FILE_FLAGS, mode & 0o777, dir_fd=parent)
        try:
            _write_data(fd, data, node.size)
            # Owner and mode calls only when the new inode lacks them (most files): two syscalls saved.
            fs = self.fs
            chown = self._needs_chown(parts, parent_node, node)
            if chown:
                fs.chown_fd(fd, node.uid, node.gid, _path(parts))
            if chown or mode & 0o7000 or mode & self._umask:
                os.fchmod(fd, mode)
            if node.xattrs:
                self._set_xattrs(fd, node, parts)
            os.utime(fd, ns=_times(node))
        finally:
            os.close(fd)

    @_space_checked
    def directory(self, parts: Parts, parent_node: Node | None, node: Node, *, existing: bool) -> None:
        # Rootless: we must keep working inside it; the image's mode is applied in finish().
        mode = node.mode | 0o700 if self.fs.rootless else node.mode
        if not parts:
            self._dir_metadata(self.root.fd, node, parts, mode)
            return
        parent, name = self._parent(parts), parts[-1]
        if not existing:
            # Made with its final permission bits: most directories (0755 under umask 022, our owner)
            # then need no open, fchown, fchmod or close at all. Never more open than the final mode.
            try:
                os.mkdir(name, mode & 0o777, dir_fd=parent)
            except FileExistsError:
                self._clear(parent, name)
                parent = self._parent(parts)
                os.mkdir(name, mode & 0o777, dir_fd=parent)
            chown = self._needs_chown(parts, parent_node, node)
            # A setgid parent passes S_ISGID on to a new directory (the tree's parent mode is the disk's).
            chmod = chown or bool(mode & (0o7000 | self._umask)) or self._setgid_parent(parts, parent_node)
            if not (chown or chmod or _has_xattrs(node)):
                return
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            if existing:
                self._dir_metadata(fd, node, parts, mode)
            else:
                if chown:
                    self.fs.chown_fd(fd, node.uid, node.gid, _path(parts))
                if chmod:
                    os.fchmod(fd, mode)
                self._set_xattrs(fd, node, parts)
        finally:
            os.close(fd)

    def _dir_metadata(self, fd: int, node: Node, parts: Parts, mode: int) -> None:
        """An existing directory's metadata replaced: every call made, whatever is there now."""
        # a directory entry over a directory replaces its xattrs (umoci: clear, then set)
        for key in os.listxattr(fd):
            if key not in node.xattrs and not key.startswith("security.selinux"):
                try:
                    os.removexattr(fd, key)
                except OSError:
                    pass
        self.fs.chown_fd(fd, node.uid, node.gid, _path(parts))
        os.fchmod(fd, mode)
        self._set_xattrs(fd, node, parts)

    def _setgid_parent(self, parts: Parts, parent_node: Node | None) -> bool:
        """Whether the parent on disk is setgid. Below the root the tree's mode is the disk's (this sink
        set it, or Root made the parent 0755); the root itself is the caller's directory until an entry
        names it, so its children are always treated as if it were."""
        return len(parts) <= 1 or parent_node is None or bool(parent_node.mode & stat.S_ISGID)

    def _needs_chown(self, parts: Parts, parent_node: Node | None, node: Node) -> bool:
        """A new inode lacks the node's owner: not ours, or its group came from a setgid parent."""
        fs = self.fs
        return fs.needs_chown(node.uid, node.gid) or (not fs.rootless and self._setgid_parent(parts, parent_node))

    @_space_checked
    def symlink(self, parts: Parts, parent_node: Node, node: Node) -> None:
        parent, name = self._parent(parts), parts[-1]
        try:
            os.symlink(node.target, name, dir_fd=parent)
        except FileExistsError:
            self._clear(parent, name)
            parent = self._parent(parts)
            os.symlink(node.target, name, dir_fd=parent)
        if self._needs_chown(parts, parent_node, node):  # most symlinks are already ours: no fchownat
            self.fs.chown_at(parent, name, node.uid, node.gid, _path(parts), is_link=True)
        if node.xattrs:
            self._set_xattrs(proc_path(parent, name), node, parts)
        os.utime(name, ns=_times(node), dir_fd=parent, follow_symlinks=False)

    @_space_checked
    def hardlink(self, parts: Parts, target: Parts, node: Node) -> None:
        parent = self._parent(parts)
        target_parent = self.root.dir(target[:-1], create=False)
        if target_parent is None:
            raise FileNotFoundError(2, "hardlink target's directory is gone", b"/".join(target))
        try:
            os.link(target[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            self._clear(parent, parts[-1])
            self.hardlink(parts, target, node)

    @_space_checked
    def special(self, parts: Parts, parent_node: Node, node: Node) -> bool:
        parent, name = self._parent(parts), parts[-1]

        def create() -> bool:
            if node.kind == tree.FIFO:
                os.mkfifo(name, 0o600, dir_fd=parent)
                return True
            return self.fs.mknod(parent, name, node.kind | 0o600, node.rdev, _path(parts))

        try:
            created = create()
        except FileExistsError:
            self._clear(parent, name)
            parent = self._parent(parts)
            created = create()
        if not created:
            return False
        self.fs.chown_at(parent, name, node.uid, node.gid, _path(parts), is_link=False)
        # Not a symlink (we just made it), so the follow-by-default chmod acts on the node itself.
        os.chmod(name, node.mode, dir_fd=parent)
        if node.xattrs:
            self._set_xattrs(proc_path(parent, name), node, parts)
        os.utime(name, ns=_times(node), dir_fd=parent, follow_symlinks=False)
        return True

    def finish(self, root: Node) -> None:
        """Every directory's mode and times, children before parents: a parent whose final mode denies
        us entry (rootless) is set after everything below it. The mode is set wherever the disk differs:
        the destination itself was made by the caller, under the caller's umask."""
        self.root.forget()
        for parts, node in reversed(walk(root)):
            if node.children is None:
                continue
            default_acl = node.xattrs.get(_DEFAULT_ACL)
            try:
                fd = self.root.open_nofollow(parts, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) != node.mode:
                    os.fchmod(fd, node.mode)
                if default_acl is not None:
                    self.fs.set_xattr(fd, _DEFAULT_ACL, default_acl, _path(parts))
                if node.mtime_ns is not None:
                    os.utime(fd, ns=_times(node))
            finally:
                os.close(fd)

    def _set_xattrs(self, target: int | bytes, node: Node, parts: Parts) -> None:
        for key, value in node.xattrs.items():
            if key == _DEFAULT_ACL and node.children is not None:
                continue  # set in finish(): until then the kernel would give it to every new child
            self.fs.set_xattr(target, key, value, _path(parts))


def _write_data(fd: int, data: FileData, size: int) -> None:
    """A new file's data (``size``: its logical size, for a sparse file's end)."""
    if data.sparse is not None:
        for off, placed in data.placed():  # holes are never written
            pwrite_all(fd, placed, off)
        os.ftruncate(fd, size)
        return
    write = os.write
    for piece in data.chunks:
        while piece:
            piece = piece[write(fd, piece):]


def _has_xattrs(node: Node) -> bool:
    """Any xattr to set now (a directory's default ACL waits for finish())."""
    return any(key != _DEFAULT_ACL or node.children is None for key in node.xattrs)


def _times(node: Node) -> tuple[int, int]:
    mtime = node.mtime_ns or 0
    return (node.atime_ns if node.atime_ns is not None else mtime, mtime)


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


def _path(parts: Parts) -> bytes:
    return b"/".join(parts)
