"""Paths inside a root: ``clean_path`` (a name made relative to ``/``), ``walk_in_root`` (the one
resolver of symlinks inside a root: the merge engine's tree, a directory, an erofs image each give it
one step), and ``Root``, the destination directory, by file descriptor, never by joining host paths.

Parents are resolved with ``openat2(RESOLVE_IN_ROOT)``: the kernel interprets every symlink and ``..`` as
if the root fd were ``/`` (what umoci does with securejoin, but race-free). The last component of a
path is never followed: callers act on it with ``*at`` calls relative to the parent's fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeVar

from ..errors import LimitExceeded, UnpackError, UnsafeLayer

_SYS_OPENAT2 = 437  # same number on every Linux architecture (added in 5.6)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_IN_ROOT = 0x10
MAX_LINK_HOPS = 40  # the kernel's MAXSYMLINKS: symlinks one resolution may follow, then ELOOP
_CACHE_LIMIT = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dir_fd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise UnpackError("openat2 is not available: dirge needs Linux 5.6 or newer")
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def clean_path(name: bytes) -> tuple[bytes, ...]:
    """Lexically clean a tar name as if it were rooted at ``/``: ``..`` can never climb above the root."""
    if b"\0" in name:
        raise UnsafeLayer(name.decode("utf-8", "replace"), "name contains a NUL byte")
    if b"//" not in name and b"/." not in name and name[:1] not in (b"/", b".") and name:
        # the common case (usr/share/doc/x): nothing to clean but a trailing slash
        return tuple(name.rstrip(b"/").split(b"/"))
    parts: list[bytes] = []
    for part in name.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


class NotADirectory(Exception):
    """A step's answer for a component that exists and is not a directory where the walk must go through
    one: ``walk_in_root`` raises UnsafeLayer, naming the component's canonical path."""


class Link(NamedTuple):
    """What a ``walk_in_root`` step gives for a symlink: its target, walked instead of it."""

    target: bytes


N = TypeVar("N")  # what a walk steps through: a tree Node, a directory path, an erofs inode number


def walk_in_root(root: N, parts: Iterable[bytes], step: Callable[[N, bytes], N | Link | None], *,
                 max_depth: int | None = None) -> tuple[list[bytes], list[N]] | None:
    """Resolve ``parts`` from ``root`` as the kernel does with ``RESOLVE_IN_ROOT``: ``..`` goes back to
    where the walk came from and never above the root, an absolute symlink target starts again at the
    root, more than ``MAX_LINK_HOPS`` symlinks is ELOOP (an OSError, as the kernel says it), a canonical
    path deeper than ``max_depth`` is LimitExceeded. Iterative: hostile symlink chains must not recurse.

    ``step(here, name)`` looks ``name`` up in ``here`` and gives what it names, a ``Link``, or None to
    stop (absent, or not something to walk through); it may make what is missing, or raise
    NotADirectory. The result: the canonical names and the walked nodes from the root down (one more
    than the names), or None."""
    canon: list[bytes] = []
    chain = [root]
    pending = list(parts)
    pending.reverse()
    hops = 0
    while pending:
        name = pending.pop()
        if name == b"" or name == b".":
            continue
        if name == b"..":
            if canon:
                canon.pop()
                chain.pop()
            continue
        try:
            found = step(chain[-1], name)
        except NotADirectory:
            raise UnsafeLayer(show_path((*canon, name)), "a parent path component exists and is not a directory") from None
        if found is None:
            return None
        if isinstance(found, Link):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            if found.target.startswith(b"/"):
                canon, chain = [], [root]
            pending.extend(reversed(found.target.split(b"/")))
            continue
        canon.append(name)
        chain.append(found)
        if max_depth is not None and len(canon) > max_depth:
            raise LimitExceeded("max_depth", len(canon), max_depth)
    return canon, chain


class Root:
    """The destination directory, opened once; hands out fds of directories inside it."""

    def __init__(self, path: str | os.PathLike[str], max_depth: int = 256, *,
                 owner: tuple[int, int] | None = None) -> None:
        """``owner``: what directories made as parents are chowned to when they differ (a setgid
        parent passes its group on); None: left as made (rootless: the caller's)."""
        self.max_depth = max_depth
        self.owner = owner
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._cache: dict[tuple[bytes, ...], int] = {}

    def close(self) -> None:
        self.forget()
        os.close(self.fd)

    def forget(self) -> None:
        """Drop cached directory fds: call after removing or replacing anything that may be a directory."""
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def open_dir(self, parts: tuple[bytes, ...], *, flags: int = os.O_RDONLY) -> int:
        """A new fd for the directory at ``parts``, symlinks resolved inside the root. Caller closes it."""
        if not parts:
            return os.open(".", flags | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        return self.open(parts, flags | os.O_DIRECTORY)

    def open(self, parts: tuple[bytes, ...], flags: int) -> int:
        """A new fd for ``parts``, every symlink (the last component's too) resolved inside the root by
        the kernel, magic links refused. Caller closes it."""
        return openat2(self.fd, b"/".join(parts) or b".", flags, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)

    def open_nofollow(self, parts: tuple[bytes, ...], flags: int) -> int:
        """An fd for ``parts`` only if no component at all is a symlink (for fix-ups after the fact)."""
        return openat2(self.fd, b"/".join(parts) or b".", flags, _RESOLVE_NO_SYMLINKS)

    @property
    def crowded(self) -> bool:
        """Too many cached fds: the caller should ``forget()`` between entries (never during one)."""
        return len(self._cache) >= _CACHE_LIMIT

    def dir(self, parts: tuple[bytes, ...], *, create: bool) -> int | None:
        """A cached fd of the directory ``parts`` (``None`` if absent and not ``create``).

        With ``create``, missing directories are made (0755, as tar does, whatever the umask or a setgid
        parent would give; ``owner``'s); a symlinked component
        that dangles is followed inside the root and its target created. Cached fds stay open until
        ``forget()``, so fds handed out while applying one entry remain valid for all of it.
        """
        if not parts:
            return self.fd
        fd = self._cache.get(parts)
        if fd is None:
            fd = self._resolve(parts, create)
            if fd is not None:
                self._cache[parts] = fd
        return fd

    def _resolve(self, parts: tuple[bytes, ...], create: bool) -> int | None:
        """The kernel resolves it; only when something is missing and ``create`` is the walk ours, making
        the missing directories (a dangling symlink's target included) one by one."""
        try:
            return self.open_dir(parts)
        except (FileNotFoundError, NotADirectoryError):
            if not create:
                return None
        if len(parts) > self.max_depth:
            raise LimitExceeded("max_depth", len(parts), self.max_depth)
        top: tuple[bytes, ...] = ()  # a walk through real directories: each step's node is its path
        walked = walk_in_root(top, parts, self._step, max_depth=self.max_depth)
        assert walked is not None  # (the step makes what is missing: it never stops the walk)
        return self.open_dir(tuple(walked[0]))

    def _step(self, here: tuple[bytes, ...], name: bytes) -> tuple[bytes, ...] | Link:
        """``walk_in_root``'s step through real directories (``here`` has no symlink): ``name`` made if
        missing, a symlink's target read, anything else but a directory refused."""
        parent = self.open_nofollow(here, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                st = os.lstat(name, dir_fd=parent)
            except FileNotFoundError:
                os.mkdir(name, 0o755, dir_fd=parent)
                self._made(parent, name)
                return here + (name,)
            if stat.S_ISLNK(st.st_mode):
                return Link(os.readlink(name, dir_fd=parent))
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectory
            return here + (name,)
        finally:
            os.close(parent)

    def _made(self, parent: int, name: bytes) -> None:
        """A directory just made as a parent: its mode set explicitly (mkdir's is masked by the caller's
        umask, and a setgid parent adds S_ISGID), its owner ``owner`` (mkdir's group may be the parent's)."""
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if self.owner is not None:
                st = os.fstat(fd)
                if (st.st_uid, st.st_gid) != self.owner:
                    os.fchown(fd, *self.owner)
            os.fchmod(fd, 0o755)
        finally:
            os.close(fd)


def show_path(parts: Iterable[bytes]) -> str:
    """A path inside the root, for messages (``/`` for the root itself)."""
    return b"/".join(parts).decode("utf-8", "backslashreplace") or "/"
