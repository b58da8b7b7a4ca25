"""Writing into a session rootfs safely: every path resolved inside it, never through a symlink out.

Used for per-session files (hostname, SSH keys), users in /etc/passwd and /etc/group, and libkrun's
``/.krun_config.json``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..apply.root import Root, clean_path
from ..errors import SessionError


@dataclass(frozen=True)
class FileSpec:
    data: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def write_file(rootfs: Path, path: str, spec: FileSpec | bytes) -> None:
    """Write ``path`` (as seen inside the rootfs) atomically: temp file, then rename over the old one."""
    if isinstance(spec, bytes):
        spec = FileSpec(spec)
    parts = clean_path(os.fsencode(path))
    if not parts:
        raise SessionError(f"write {path}: not a file path")
    root = Root(rootfs)
    try:
        parent = root.dir(parts[:-1], create=True)
        assert parent is not None
        tmp = b".dirge-" + uuid.uuid4().hex.encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
        try:
            view = memoryview(spec.data)
            while view:
                view = view[os.write(fd, view):]
            if os.geteuid() == 0:
                os.fchown(fd, spec.uid, spec.gid)
            os.fchmod(fd, spec.mode)
        finally:
            os.close(fd)
        # rename replaces a symlink itself, never what it points to
        os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
    except OSError as exc:
        raise SessionError(f"write {path} in {rootfs}: {exc.strerror}") from exc
    finally:
        root.close()


def read_file(rootfs: Path, path: str) -> bytes | None:
    parts = clean_path(os.fsencode(path))
    root = Root(rootfs)
    try:
        parent = root.dir(parts[:-1], create=False)
        if parent is None:
            return None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except (FileNotFoundError, OSError):
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read(16 << 20)
    finally:
        root.close()


def write_files(rootfs: Path, files: Mapping[str, FileSpec | bytes]) -> None:
    for path, spec in files.items():
        write_file(rootfs, path, spec)


def add_user(rootfs: Path, name: str, uid: int, gid: int | None = None, *, home: str | None = None,
             shell: str = "/bin/sh") -> None:
    """Add ``name`` to /etc/passwd and /etc/group (if absent) and create its home directory."""
    if not name or any(c in name for c in ":\n/") or name in (".", ".."):
        raise SessionError(f"add user {name!r}: not a valid user name")
    gid = uid if gid is None else gid
    home = home or f"/home/{name}"
    passwd = (read_file(rootfs, "/etc/passwd") or b"").decode()
    if not any(line.split(":", 1)[0] == name for line in passwd.splitlines()):
        line = f"{name}:x:{uid}:{gid}::{home}:{shell}\n"
        write_file(rootfs, "/etc/passwd", FileSpec((passwd if passwd.endswith("\n") or not passwd else passwd + "\n")
                                                   .encode() + line.encode()))
    group = (read_file(rootfs, "/etc/group") or b"").decode()
    if not any(line.split(":", 1)[0] == name for line in group.splitlines()):
        write_file(rootfs, "/etc/group", FileSpec((group if group.endswith("\n") or not group else group + "\n")
                                                  .encode() + f"{name}:x:{gid}:\n".encode()))
    parts = clean_path(os.fsencode(home))
    root = Root(rootfs)
    try:
        fd = root.dir(parts, create=True)
        assert fd is not None
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o755)
    finally:
        root.close()


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


def write_krun_config(rootfs: Path, image_config: Mapping[str, Any], **kwargs: Any) -> None:
    write_file(rootfs, "/.krun_config.json", json.dumps(krun_config(image_config, **kwargs), indent=1).encode())
