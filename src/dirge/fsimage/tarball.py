"""A rootfs tree as one flattened POSIX pax tar, streamed (``dirge export IMAGE OUT --format tar``).

``write_tar(root, out)`` walks ``root`` by file descriptor only: the root is opened with ``O_NOFOLLOW``,
every child is looked up relative to its parent's fd (``O_NOFOLLOW``, ``lstat``/``readlink`` with
``dir_fd``, xattrs through ``/proc/self/fd/N/NAME`` without following), so a symlink in the tree is
stored, never followed, and nothing outside ``root`` is read. The root may be any readable tree: a
directory, a read-only erofs mount, an overlay.

What it writes, and why:

* Order: depth-first, each directory's entries sorted by their name bytes, a directory before its
  children (what ``tar --sort=name`` and ``docker export`` do). Same tree, same bytes: no atime, ctime,
  user or group names, host ids or pids go in, and every header field is derived from the tree. One fd
  per directory level stays open during the walk.
* Names are relative, without ``./`` (``bin/``, ``bin/sh``), as ``docker export`` writes them: the root
  has no entry of its own, because ``tar -xpf`` would otherwise chmod/chown the directory the user
  extracts into. The root's mode, owner, mtime and xattrs go into a leading pax *global* header
  (``DIRGE.root.mode`` …) under a vendor keyword that GNU tar, Go's ``archive/tar`` (docker, containerd)
  and Python's ``tarfile`` read and ignore; a caller that wants them can read them back.
* Names, link targets, owners, sizes and mtimes that do not fit the ustar fields (long or non-ASCII
  names, ids ≥ 2**21, sizes ≥ 8 GiB, sub-second or negative mtimes) go into a pax ``x`` header. Names
  that are not UTF-8 go in as raw bytes without ``hdrcharset``, as GNU tar writes them: GNU tar, Go and
  ``tarfile`` read them back as the same bytes, while GNU tar 1.34 warns about a ``hdrcharset`` record.
* Xattrs: ``SCHILY.xattr.NAME`` records with the raw binary value (``security.capability``,
  ``system.posix_acl_*``, ``trusted.*``, ``user.*``), except ``security.selinux``, which belongs to the
  host's policy, not to the image. ``%`` and ``=`` in a name are escaped as ``%25``/``%3D``, as GNU tar
  does.
* Hardlinks: the first name of an inode with ``st_nlink > 1`` (in walk order) carries the data; later
  names are type ``1`` entries linking to it.
* Sockets cannot be stored in a tar: they are skipped and named in ``report``.
* Sparse files: a file the filesystem reports holes in (``SEEK_HOLE``) is written as GNU pax sparse 1.0
  when its zero 4 KiB blocks save at least 1 MiB; its map is computed from content (all-zero aligned
  blocks), so it does not depend on the filesystem's allocation size. Smaller holes are written as
  zeros, so that simple readers (busybox tar) read most files. GNU tar, bsdtar, Go and ``tarfile`` read
  sparse 1.0; GNU tar recreates the holes. Whether a file counts as sparse depends on the filesystem
  keeping its holes (erofs reports none), so the same content on another filesystem may differ in
  encoding, never in what it extracts to.

File data streams through one 1 MiB buffer; nothing is held whole.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..apply.tar import BLOCK
from ..errors import DirgeError

__all__ = ["write_tar"]

CHUNK = 1 << 20
SPARSE_BLOCK = 4096
SPARSE_MIN_SAVING = 1 << 20  # below this, holes are written as zeros (portability beats a few blocks)

_MAX_OCTAL7 = 0o7777777  # 8-byte ustar fields (mode, uid, gid, devmajor, devminor)
_MAX_OCTAL11 = 0o77777777777  # 12-byte ustar fields (size, mtime)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_SPARSE = bytes(SPARSE_BLOCK)
_SKIP_XATTRS = ("security.selinux",)

_TYPES = {
    stat.S_IFREG: b"0",
    stat.S_IFLNK: b"2",
    stat.S_IFCHR: b"3",
    stat.S_IFBLK: b"4",
    stat.S_IFDIR: b"5",
    stat.S_IFIFO: b"6",
}


def write_tar(root: str | os.PathLike[str], out: BinaryIO, *, report: list[str] | None = None) -> int:
    """Write the tree at ``root`` to ``out`` as a pax tar; return the bytes written.

    Entries that cannot be stored (sockets) are appended to ``report`` as ``"PATH: why"``. Read errors
    raise ``DirgeError`` naming the path; errors writing ``out`` propagate as ``OSError``.
    """
    root_s = os.fspath(root)
    writer = _Writer(out, report if report is not None else [], root_s)
    try:
        root_fd = os.open(root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise DirgeError(f"open {root_s}: {exc.strerror or exc}; give a directory (not a symlink)") from exc
    try:
        writer.write_tree(root_fd)
    finally:
        os.close(root_fd)
    writer.emit(_ZERO_BLOCK * 2)
    return writer.written


# -- header encoding ------------------------------------------------------------------------------------------------


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    """``"LEN KEYWORD=VALUE\\n"`` where LEN counts the whole record, its own digits included."""
    n = len(keyword) + len(value) + 3  # space, '=', newline
    length = n + len(str(n))
    length = n + len(str(length))  # adding the digits can add one more digit, never two
    return b"%d %s=%s\n" % (length, keyword, value)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) when ``name`` fits the ustar fields as portable ASCII, else None (a pax ``path``)."""
    if not name.isascii():
        return None  # non-ASCII goes into pax, whose charset (UTF-8 or raw bytes) readers agree on
    if len(name) <= 100:
        return b"", name
    # split at a '/' so that prefix ≤ 155 and the rest ≤ 100 bytes
    cut = name.find(b"/", len(name) - 101)
    while 0 < cut <= 155:
        if len(name) - cut - 1 <= 100 and cut != len(name) - 1:
            return name[:cut], name[cut + 1:]
        cut = name.find(b"/", cut + 1)
    return None


def _mtime_text(ns: int) -> bytes:
    sign = b"-" if ns < 0 else b""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    if not frac:
        return sign + b"%d" % sec
    return sign + (b"%d.%09d" % (sec, frac)).rstrip(b"0")


def _ustar(name: bytes, prefix: bytes, *, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes,
           linkname: bytes = b"", devmajor: int = 0, devminor: int = 0) -> bytes:
    header = b"".join((
        name.ljust(100, b"\0")[:100],
        _octal(mode, 8), _octal(uid, 8), _octal(gid, 8), _octal(size, 12), _octal(mtime, 12),
        b" " * 8,  # checksum placeholder: spaces while summing
        kind,
        linkname.ljust(100, b"\0")[:100],
        b"ustar\x0000",
        bytes(64),  # uname, gname: numeric ids only, nothing looked up on this host
        _octal(devmajor, 8), _octal(devminor, 8),
        prefix.ljust(155, b"\0")[:155],
        bytes(12),
    ))
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _pad(size: int) -> bytes:
    return bytes(-size % BLOCK)


@dataclass
class _Entry:
    """One member: its ustar fields plus the pax records it needs."""

    path: bytes
    kind: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # extra, after the standard ones

    def encode(self) -> bytes:
        """The pax ``x`` header (when needed) and the ustar header of this member."""
        pax: list[tuple[bytes, bytes]] = []
        split = _split_ustar_name(self.path)
        if split is None:
            pax.append((b"path", self.path))
            prefix, name = b"", self.path[:100]
        else:
            prefix, name = split
        linkname = self.linkname
        if len(linkname) > 100 or not linkname.isascii():
            pax.append((b"linkpath", linkname))
            linkname = linkname[:100]
        uid, gid, size = self.uid, self.gid, self.size
        if uid > _MAX_OCTAL7:
            pax.append((b"uid", b"%d" % uid))
            uid = 0
        if gid > _MAX_OCTAL7:
            pax.append((b"gid", b"%d" % gid))
            gid = 0
        if size > _MAX_OCTAL11:
            pax.append((b"size", b"%d" % size))
            size = 0
        sec = self.mtime_ns // 1_000_000_000
        if self.mtime_ns % 1_000_000_000 or not 0 <= sec <= _MAX_OCTAL11:
            pax.append((b"mtime", _mtime_text(self.mtime_ns)))
            sec = min(max(sec, 0), _MAX_OCTAL11)
        pax.extend(self.records)
        ustar = _ustar(name, prefix, mode=self.mode, uid=uid, gid=gid, size=size, mtime=sec, kind=self.kind,
                       linkname=linkname, devmajor=self.devmajor, devminor=self.devminor)
        if not pax:
            return ustar
        return _extended(b"x", b"././@PaxHeader", pax) + ustar


def _extended(kind: bytes, name: bytes, records: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_pax_record(k, v) for k, v in records)
    header = _ustar(name, b"", mode=0o644, uid=0, gid=0, size=len(body), mtime=0, kind=kind)
    return header + body + _pad(len(body))


# -- the walk -------------------------------------------------------------------------------------------------------


class _Writer:
    def __init__(self, out: BinaryIO, report: list[str], root: str) -> None:
        self.out = out
        self.report = report
        self.root = root
        self.written = 0
        self.links: dict[tuple[int, int], bytes] = {}  # (dev, ino) → first name, for nlink > 1
        self.buf = bytearray(CHUNK)

    def emit(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = self.out.write(view)
            # a raw (unbuffered) file may take part of it; buffered ones take all or raise
            view = view[n if n is not None else len(view):]
        self.written += len(data)

    def fail(self, rel: bytes, exc: OSError | str) -> DirgeError:
        why = exc if isinstance(exc, str) else (exc.strerror or str(exc)).lower()
        shown = os.fsdecode(rel).encode("utf-8", "backslashreplace").decode() or "."
        return DirgeError(f"read {shown} in {self.root}: {why}")

    def write_tree(self, root_fd: int) -> None:
        try:
            st = os.fstat(root_fd)
            xattrs = self.xattrs(root_fd, None, b"")
        except OSError as exc:
            raise self.fail(b"", exc) from exc
        root_records = [
            (b"DIRGE.root.mode", b"%04o" % stat.S_IMODE(st.st_mode)),
            (b"DIRGE.root.uid", b"%d" % st.st_uid),
            (b"DIRGE.root.gid", b"%d" % st.st_gid),
            (b"DIRGE.root.mtime", _mtime_text(st.st_mtime_ns)),
        ] + [(b"DIRGE.root." + k[len(b"SCHILY."):], v) for k, v in self.xattr_records(xattrs)]
        # named without a directory so that readers that create parents for every member create none
        self.emit(_extended(b"g", b"pax_global_header", root_records))

        # one (fd, prefix, remaining names) frame per open directory: no recursion, any depth
        stack: list[tuple[int, bytes, Iterator[bytes]]] = [(root_fd, b"", iter(self.listdir(root_fd, b"")))]
        try:
            while stack:
                dir_fd, prefix, names = stack[-1]
                name = next(names, None)
                if name is None:
                    stack.pop()
                    if dir_fd != root_fd:
                        os.close(dir_fd)
                    continue
                child = self.entry(dir_fd, name, prefix + name)
                if child is not None:
                    rel = prefix + name + b"/"
                    stack.append((child, rel, iter(self.listdir(child, rel))))
        finally:
            for dir_fd, _, _ in stack:
                if dir_fd != root_fd:
                    os.close(dir_fd)

    def listdir(self, dir_fd: int, rel: bytes) -> list[bytes]:
        try:
            with os.scandir(dir_fd) as it:
                return sorted(os.fsencode(e.name) for e in it)
        except OSError as exc:
            raise self.fail(rel, exc) from exc

    def xattrs(self, fd: int, name: bytes | None, rel: bytes) -> list[tuple[bytes, bytes]]:
        """Sorted (name, value) pairs; ``name`` None: of ``fd`` itself, else of ``name`` in directory ``fd``."""
        # the /proc/self/fd/N magic link pins the parent; the last component is looked up without following
        path = None if name is None else b"/proc/self/fd/%d/%s" % (fd, name)
        try:
            keys = os.listxattr(fd) if path is None else os.listxattr(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return []
            raise self.fail(rel, exc) from exc
        pairs = []
        for key in sorted(keys, key=os.fsencode):
            if key.startswith(_SKIP_XATTRS):
                continue
            try:
                value = os.getxattr(fd, key) if path is None else os.getxattr(path, key, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENODATA:
                    continue  # removed between list and get
                raise self.fail(rel, exc) from exc
            pairs.append((os.fsencode(key), value))
        return pairs

    def entry(self, dir_fd: int, name: bytes, rel: bytes) -> int | None:
        """Write the member ``rel``; return an open fd when it is a directory to descend into."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise self.fail(rel, exc) from exc
        fmt = stat.S_IFMT(st.st_mode)
        kind = _TYPES.get(fmt)
        if kind is None:
            what = "socket" if fmt == stat.S_IFSOCK else f"file type {fmt:o}"
            self.report.append(f"{os.fsdecode(rel)}: {what}, cannot be stored in a tar")
            return None
        entry = _Entry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)

        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                entry.kind, entry.linkname = b"1", first
                self.emit(entry.encode())
                return None

        if fmt == stat.S_IFDIR:
            entry.path = rel + b"/"
            try:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise self.fail(rel, exc) from exc
            try:
                self.check_same(fd, st, rel)
                entry.records = self.xattr_records(self.xattrs(fd, None, rel))
                self.emit(entry.encode())
            except BaseException:
                os.close(fd)
                raise
            return fd
        if fmt == stat.S_IFREG:
            self.regular(dir_fd, name, st, entry)
            return None

        if fmt == stat.S_IFLNK:
            try:
                entry.linkname = os.readlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise self.fail(rel, exc) from exc
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        entry.records = self.xattr_records(self.xattrs(dir_fd, name, rel))
        self.emit(entry.encode())
        return None

    @staticmethod
    def xattr_records(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        # a pax keyword ends at '=': GNU tar escapes it (and '%') in xattr names and unescapes on extract
        return [(b"SCHILY.xattr." + k.replace(b"%", b"%25").replace(b"=", b"%3D"), v) for k, v in pairs]

    def check_same(self, fd: int, st: os.stat_result, rel: bytes) -> os.stat_result:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise self.fail(rel, "replaced while being read; export a tree nothing else writes to")
        return now

    def regular(self, dir_fd: int, name: bytes, st: os.stat_result, entry: _Entry) -> None:
        rel = entry.path
        try:
            # O_NONBLOCK: should a FIFO have been swapped in since the lstat, open must not hang
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as exc:
            raise self.fail(rel, exc) from exc
        try:
            st = self.check_same(fd, st, rel)
            entry.records = self.xattr_records(self.xattrs(fd, None, rel))
            size = st.st_size
            segments = self.sparse_map(fd, st, rel)
            if segments is None:
                entry.size = size
                self.emit(entry.encode())
                self.copy(fd, 0, size, rel)
                self.emit(_pad(size))
                return
            # GNU pax sparse 1.0: the real name in GNU.sparse.name, a stand-in name in the header, the map
            # as decimal lines at the start of the data, then the data segments back to back
            text = b"%d\n" % len(segments) + b"".join(b"%d\n%d\n" % seg for seg in segments)
            text += _pad(len(text))
            head, _, base = rel.rpartition(b"/")
            entry.path = (head + b"/" if head else b"") + b"GNUSparseFile.0/" + base
            entry.size = len(text) + sum(length for _, length in segments)
            entry.records = [
                (b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                (b"GNU.sparse.name", rel), (b"GNU.sparse.realsize", b"%d" % size),
            ] + entry.records
            self.emit(entry.encode())
            self.emit(text)
            for offset, length in segments:
                self.copy(fd, offset, length, rel)
            self.emit(_pad(entry.size))
        finally:
            os.close(fd)

    def copy(self, fd: int, offset: int, length: int, rel: bytes) -> None:
        view = memoryview(self.buf)
        end = offset + length
        while offset < end:
            try:
                n = os.preadv(fd, [view[:min(CHUNK, end - offset)]], offset)
            except OSError as exc:
                raise self.fail(rel, exc) from exc
            if n == 0:
                raise self.fail(rel, "shrank while being read; export a tree nothing else writes to")
            self.emit(view[:n])
            offset += n

    def sparse_map(self, fd: int, st: os.stat_result, rel: bytes) -> list[tuple[int, int]] | None:
        """Data segments (offset, length) when the file is worth writing sparse, else None."""
        size = st.st_size
        if size < SPARSE_MIN_SAVING or st.st_blocks * 512 >= size:
            return None  # cheap test first: a file with all its blocks allocated has no holes
        try:
            if os.lseek(fd, 0, os.SEEK_HOLE) >= size:
                return None
        except OSError:
            return None  # no SEEK_HOLE here: write it dense
        segments: list[tuple[int, int]] = []
        view = memoryview(self.buf)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole from pos to the end
                raise self.fail(rel, exc) from exc
            # classify aligned 4 KiB blocks by content, so the map does not depend on the fs's block size
            start = data - data % SPARSE_BLOCK
            stop = min(size, hole + -hole % SPARSE_BLOCK)
            while start < stop:
                want = min(CHUNK, stop - start)
                try:
                    n = os.preadv(fd, [view[:want]], start)
                except OSError as exc:
                    raise self.fail(rel, exc) from exc
                if n == 0:
                    raise self.fail(rel, "shrank while being read; export a tree nothing else writes to")
                for off in range(0, n, SPARSE_BLOCK):
                    block = view[off:min(off + SPARSE_BLOCK, n)]
                    if block != _ZERO_SPARSE[:len(block)]:
                        at = start + off
                        if segments and segments[-1][0] + segments[-1][1] == at:
                            segments[-1] = (segments[-1][0], segments[-1][1] + len(block))
                        else:
                            segments.append((at, len(block)))
                start += n
            pos = max(stop, hole)
        if size - sum(length for _, length in segments) < SPARSE_MIN_SAVING:
            return None
        if not segments or segments[-1][0] + segments[-1][1] < size:
            segments.append((size, 0))  # a trailing hole: GNU tar sets the size from this empty segment
        return segments
