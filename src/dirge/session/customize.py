"""Writing into a session rootfs safely: every path resolved inside it, never through a symlink out.

Used for per-session files (hostname, SSH keys), users in /etc/passwd and /etc/group, and libkrun's
``/.krun_config.json``. The logic is written once against a ``RootfsWriter``; the targets are

    DirWriter      a directory rootfs (fd-relative, ``Root``: never through a symlink out)
    Ext4DiskWriter an ext4 disk file, written with e2fsprogs' ``debugfs -w``: no mount, no root (the
                   owners are the image's). ``under="upper"``: inside that directory of the disk, for
                   an erofs session's scratch disk whose ``upper/`` the guest stacks over the base

Disk writes are not atomic (debugfs cannot rename over a file: the old one is removed first): write a
disk only while no VM has it open.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

from ..apply.fs import ROOTLESS_XATTR, encode_rootless_owner
from ..apply.root import Root, clean_path
from ..errors import SessionError
from ..fsutil import READ_MAX, over_read_max


@dataclass(frozen=True)
class FileSpec:
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@runtime_checkable
class RootfsWriter(Protocol):
    """Where customisation writes: paths are as seen inside the rootfs (``/etc/passwd``)."""

    def read_file(self, path: str) -> bytes | None: ...

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None: ...

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        """Make ``path`` and any missing parents (those 0o755 root:root); set ``path``'s mode and owner."""


@runtime_checkable
class HasWriter(Protocol):
    """Something that knows its writer (``PreparedRootfs``: a directory or a disk session)."""

    def writer(self) -> RootfsWriter: ...


Target = Union[str, "os.PathLike[str]", RootfsWriter, HasWriter]


def as_writer(target: Target) -> RootfsWriter:
    if isinstance(target, (str, os.PathLike)):
        return DirWriter(Path(target))
    if isinstance(target, HasWriter):
        return target.writer()
    return target


class DirWriter:
    """A directory rootfs, written fd-relative (a symlink inside never leads out)."""

    def __init__(self, rootfs: Path, *, rootless: bool | None = None) -> None:
        """``rootless``: the rootfs keeps owners as umoci does (``user.rootlesscontainers``), as its base
        was built; None: as this process would build one (rootless unless root)."""
        self.rootfs = rootfs
        self.rootless = os.geteuid() != 0 if rootless is None else rootless

    def _root(self) -> Root:
        # Missing parents are made 0755 root:root (the caller's when rootless), whatever the umask.
        return Root(self.rootfs, owner=None if self.rootless else (0, 0))

    def _own(self, fd: int, uid: int, gid: int) -> None:
        if self.rootless:
            if uid or gid:
                os.setxattr(fd, ROOTLESS_XATTR, encode_rootless_owner(uid, gid))
        else:
            os.fchown(fd, uid, gid)

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        """Atomically: temp file, then rename over the old one."""
        parts = clean_path(os.fsencode(path))
        if not parts:
            raise SessionError(f"write {path}: not a file path")
        root = self._root()
        try:
            parent = root.dir(parts[:-1], create=True)
            assert parent is not None
            tmp = b".dirge-" + uuid.uuid4().hex.encode()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                self._own(fd, uid, gid)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            # rename replaces a symlink itself, never what it points to
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        except OSError as exc:
            raise SessionError(f"write {path} in {self.rootfs}: {exc.strerror}") from exc
        finally:
            root.close()

    def read_file(self, path: str) -> bytes | None:
        """The file's bytes, symlinks followed inside the rootfs; None only when it does not exist.
        Anything else (not a regular file, unreadable, too large) is an error: callers that rewrite
        the file (``add_user``) must never take it for absent and lose the image's content."""
        parts = clean_path(os.fsencode(path))
        root = self._root()
        try:
            fd = root.open(parts, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise SessionError(f"read {path} in {self.rootfs}: {exc.strerror}") from exc
        finally:
            root.close()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SessionError(f"read {path} in {self.rootfs}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            if st.st_size > READ_MAX:
                raise SessionError(f"read {path} in {self.rootfs}: {over_read_max(path, st.st_size)}")
            try:
                data = f.read(READ_MAX + 1)  # a file growing meanwhile is still bounded
            except OSError as exc:
                raise SessionError(f"read {path} in {self.rootfs}: {exc.strerror}") from exc
            if len(data) > READ_MAX:
                raise SessionError(f"read {path} in {self.rootfs}: {over_read_max(path)}")
            return data

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        root = self._root()
        try:
            fd = root.dir(clean_path(os.fsencode(path)), create=True)
            assert fd is not None
            self._own(fd, uid, gid)
            os.fchmod(fd, mode)
        except OSError as exc:
            raise SessionError(f"mkdir {path} in {self.rootfs}: {exc.strerror}") from exc
        finally:
            root.close()


_BANNER = re.compile(r"^debugfs \d")  # debugfs' version line on stderr, not an error
_UNSAFE = re.compile(r'["\\\s]')  # what debugfs' request parser cannot carry inside a quoted name


class Ext4DiskWriter:
    """An ext4 disk file, written with ``debugfs -w`` (e2fsprogs): no mount, so no root needed.
    ``lower``: where a file absent here is read from (an erofs session's base)."""

    def __init__(self, image: Path, *, under: str = "",
                 lower: Callable[[str], bytes | None] | None = None) -> None:
        self.image = image
        self.under = clean_path(os.fsencode(under)) if under else ()
        self.lower = lower
        # debugfs pipes long output through a pager unless told not to
        self.env = {**os.environ, "DEBUGFS_PAGER": "__none__", "PAGER": "__none__"}
        if shutil.which("debugfs") is None:
            raise SessionError("writing into a disk session needs debugfs: apt-get install e2fsprogs")

    def _path(self, path: str, *, inside: bool = True) -> str:
        parts = clean_path(os.fsencode(path))
        if inside:
            parts = self.under + parts
        text = "/" + "/".join(p.decode("utf-8", "surrogateescape") for p in parts)
        if _UNSAFE.search(text) or not text.isprintable():
            raise SessionError(f"write {path} into disk {self.image}: debugfs cannot name paths with "
                               "quotes, backslashes or whitespace")
        return f'"{text}"'

    def _run(self, requests: list[str], *, write: bool) -> bytes:
        """Run debugfs requests (one process: ``-R`` for one, which echoes nothing to stdout, else a
        request file on stdin); raise on any error it reports."""
        how = ["-R", requests[0]] if len(requests) == 1 else ["-f", "-"]
        proc = subprocess.run(["debugfs", *(["-w"] if write else []), *how, str(self.image)], env=self.env,
                              input="\n".join(requests).encode() + b"\n", capture_output=True)
        errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
                  if line.strip() and not _BANNER.match(line)]
        if proc.returncode != 0 or errors:
            raise SessionError(f"debugfs on {self.image}: {'; '.join(errors) or f'exit {proc.returncode}'}")
        return proc.stdout

    def _kind(self, quoted: str) -> str | None:
        """"file", "dir", another type name, or None when absent (``stat`` of the name itself)."""
        return self._stat(quoted)[0]

    def _stat(self, quoted: str) -> tuple[str | None, int]:
        """The type (as ``_kind``) and the size (apparent: holes count) of a name."""
        proc = subprocess.run(["debugfs", "-R", f"stat {quoted}", str(self.image)], env=self.env,
                              capture_output=True)
        m = re.search(rb"Type: (\w+)", proc.stdout)
        size = re.search(rb"\bSize: (\d+)", proc.stdout)
        return (m.group(1).decode() if m else None), int(size.group(1)) if size else 0

    def _cat(self, path: str, quoted: str) -> bytes:
        """``debugfs cat``, streamed and cut at ``READ_MAX`` (its output fills holes with zeros)."""
        with tempfile.TemporaryFile() as err, subprocess.Popen(
                ["debugfs", "-R", f"cat {quoted}", str(self.image)], env=self.env, stdout=subprocess.PIPE,
                stderr=err) as proc:
            assert proc.stdout is not None
            data = proc.stdout.read(READ_MAX + 1)
            if len(data) > READ_MAX:
                proc.kill()
                raise SessionError(f"read {path} in disk {self.image}: {over_read_max(path)}")
            proc.wait()
            err.seek(0)
            errors = [line for line in err.read().decode(errors="replace").splitlines()
                      if line.strip() and not _BANNER.match(line)]
        if proc.returncode != 0 or errors:
            raise SessionError(f"debugfs on {self.image}: {'; '.join(errors) or f'exit {proc.returncode}'}")
        return data

    def _mkdirs(self, parts: tuple[bytes, ...]) -> None:
        """Every missing directory of ``parts`` (mkdir -p), new ones 0o755 root:root."""
        for i in range(1, len(parts) + 1):
            quoted = self._path(os.fsdecode(b"/".join(parts[:i])), inside=False)
            kind = self._kind(quoted)
            if kind == "directory":
                continue
            if kind is not None:
                raise SessionError(f"disk {self.image}: {quoted} is a {kind}, not a directory")
            self._run([f"mkdir {quoted}", f"sif {quoted} mode 040755"], write=True)

    def read_file(self, path: str) -> bytes | None:
        quoted = self._path(path)
        kind, size = self._stat(quoted)
        if kind == "regular":
            if size > READ_MAX:  # refused before a byte is read
                raise SessionError(f"read {path} in disk {self.image}: {over_read_max(path, size)}")
            return self._cat(path, quoted)
        if kind is not None:  # never "absent": add_user would replace the image's file
            raise SessionError(f"read {path} in disk {self.image}: it is a {kind}, which dirge cannot read "
                               "in a disk; make it a regular file in the image")
        return self.lower(path) if self.lower is not None else None

    def write_file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        parts = self.under + clean_path(os.fsencode(path))
        if len(parts) == len(self.under):
            raise SessionError(f"write {path}: not a file path")
        self._mkdirs(parts[:-1])
        quoted = self._path(path)
        kind = self._kind(quoted)
        if kind == "directory":
            raise SessionError(f"write {path} into disk {self.image}: it is a directory")
        with tempfile.NamedTemporaryFile(prefix="dirge-debugfs-") as tmp:
            tmp.write(data)
            tmp.flush()
            # debugfs' write never replaces a file: remove the old one (a symlink itself, never its target)
            self._run(([f"rm {quoted}"] if kind is not None else []) +
                      [f'write "{tmp.name}" {quoted}', f"sif {quoted} mode 0{0o100000 | (mode & 0o7777):o}",
                       f"sif {quoted} uid {uid}", f"sif {quoted} gid {gid}"], write=True)

    def mkdir(self, path: str, mode: int, uid: int, gid: int) -> None:
        parts = self.under + clean_path(os.fsencode(path))
        self._mkdirs(parts)
        quoted = self._path(path)
        self._run([f"sif {quoted} mode 0{0o40000 | (mode & 0o7777):o}", f"sif {quoted} uid {uid}",
                   f"sif {quoted} gid {gid}"], write=True)


def write_file(rootfs: Target, path: str, spec: FileSpec | bytes) -> None:
    """Write ``path`` (as seen inside the rootfs); in a directory atomically."""
    if isinstance(spec, bytes):
        spec = FileSpec(spec)
    as_writer(rootfs).write_file(path, spec.data, spec.mode, spec.uid, spec.gid)


def read_file(rootfs: Target, path: str) -> bytes | None:
    return as_writer(rootfs).read_file(path)


def write_files(rootfs: Target, files: Mapping[str, FileSpec | bytes]) -> None:
    writer = as_writer(rootfs)
    for path, spec in files.items():
        write_file(writer, path, spec)


def add_user(rootfs: Target, name: str, uid: int, gid: int | None = None, *, home: str | None = None,
             shell: str = "/bin/sh") -> None:
    """Add ``name`` to /etc/passwd and /etc/group (if absent) and create its home directory."""
    if not name or any(c in name for c in ":\n/") or name in (".", ".."):
        raise SessionError(f"add user {name!r}: not a valid user name")
    writer = as_writer(rootfs)
    gid = uid if gid is None else gid
    home = home or f"/home/{name}"
    passwd = (writer.read_file("/etc/passwd") or b"").decode()
    if not any(line.split(":", 1)[0] == name for line in passwd.splitlines()):
        line = f"{name}:x:{uid}:{gid}::{home}:{shell}\n"
        write_file(writer, "/etc/passwd", FileSpec((passwd if passwd.endswith("\n") or not passwd else passwd + "\n")
                                                   .encode() + line.encode()))
    group = (writer.read_file("/etc/group") or b"").decode()
    if not any(line.split(":", 1)[0] == name for line in group.splitlines()):
        write_file(writer, "/etc/group", FileSpec((group if group.endswith("\n") or not group else group + "\n")
                                                  .encode() + f"{name}:x:{gid}:\n".encode()))
    writer.mkdir(home, 0o755, uid, gid)


def krun_config(image_config: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The image's runtime config in the shape libkrun's init reads from ``/.krun_config.json``."""
    out: dict[str, Any] = {}
    for key in ("Cmd", "Entrypoint", "Env", "WorkingDir", "User"):
        if image_config.get(key):
            out[key] = image_config[key]
    if env:
        merged = {e.split("=", 1)[0]: e for e in out.get("Env", [])}
        merged.update({k: f"{k}={v}" for k, v in env.items()})
        out["Env"] = list(merged.values())
    return out


def write_krun_config(rootfs: Target, image_config: Mapping[str, Any], **kwargs: Any) -> None:
    write_file(rootfs, "/.krun_config.json", json.dumps(krun_config(image_config, **kwargs), indent=1).encode())
