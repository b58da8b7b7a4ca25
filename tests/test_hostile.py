"""Hostile layers: a corpus of crafted tars, each from a known class of unpacker CVEs.

Every case unpacks into ``tmp/sentinel/rootfs`` next to a ``tmp/victim`` directory and asserts:

1. containment: nothing outside the destination was created, changed or removed (a full snapshot of
   ``tmp`` minus the destination, and the state of a few host paths, before and after);
2. either a ``DirgeError`` of the expected class with a clear message, the destination absent and no
   ``.dirge-staging`` directory left, or a successful unpack whose specific contained result is checked
   (e.g. ``/etc/passwd`` in the layer landed at ``rootfs/etc/passwd``).

Tars are built with ``LayerBuilder`` where Python's tarfile writes what we want, and by hand (raw
ustar/PAX/GNU headers) where it would normalise or refuse the hostile bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root
from dirge import DirgeError, ImageError, LimitExceeded, Limits, UnpackError, UnsafeLayer, unpack
from dirge.layerbuild import DEFAULT_MTIME, LayerBuilder

pytestmark = needs_root

STAGING = ".dirge-staging"
VICTIM_SECRET = b"top secret, do not touch\n"
OLD_MTIME = 1_000_000_000  # victim files carry this mtime, so any utime through a link shows up


# -- raw tar writing ---------------------------------------------------------------------------------

BLOCK = 512
END = b"\0" * (2 * BLOCK)


def _num(value: int, width: int) -> bytes:
    """An octal numeric field, or GNU base-256 when it does not fit (negative or too large)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    bits = 8 * width
    if value >= 0:
        return (value | 1 << (bits - 1)).to_bytes(width, "big")
    return (value % (1 << bits)).to_bytes(width, "big")  # two's complement: the top bit is already set


def header(name: bytes, typeflag: bytes = b"0", *, size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0,
           mtime: int = DEFAULT_MTIME, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0,
           bad_checksum: bool = False) -> bytes:
    """One 512-byte POSIX ustar header, fields written verbatim (no normalisation of hostile names)."""
    h = bytearray(BLOCK)

    def put(off: int, width: int, data: bytes) -> None:
        assert len(data) <= width, (off, data)
        h[off:off + len(data)] = data

    put(0, 100, name)
    put(100, 8, _num(mode, 8))
    put(108, 8, _num(uid, 8))
    put(116, 8, _num(gid, 8))
    put(124, 12, _num(size, 12))
    put(136, 12, _num(mtime, 12))
    put(156, 1, typeflag)
    put(157, 100, linkname)
    put(257, 8, b"ustar\x0000")
    put(329, 8, _num(devmajor, 8))
    put(337, 8, _num(devminor, 8))
    h[148:156] = b" " * 8
    checksum = sum(h) + (1 if bad_checksum else 0)
    h[148:156] = b"%06o\0 " % checksum
    return bytes(h)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def member(name: bytes, typeflag: bytes = b"0", data: bytes = b"", **kw: Any) -> bytes:
    kw.setdefault("size", len(data))
    return header(name, typeflag, **kw) + _pad(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def pax(records: dict[bytes, bytes], *, typeflag: bytes = b"x") -> bytes:
    body = b"".join(pax_record(k, v) for k, v in records.items())
    return member(b"PaxHeaders/x", typeflag, body)


def raw_tar(*members: bytes) -> bytes:
    return b"".join(members) + END


def pax_member(info: tarfile.TarInfo, pax_headers: dict[str, str], data: bytes = b"") -> bytes:
    """A LayerBuilder layer holding one entry with extra PAX records."""
    info.pax_headers = pax_headers
    return LayerBuilder().add(info, data).build()


def _global_pax(records: dict[str, str]) -> bytes:
    """A tar that opens with a global ('g') PAX header holding ``records``, then one file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as tar:
        info = tarfile.TarInfo("f")
        tar.addfile(info)
    return buf.getvalue()


def strip_end(tar: bytes) -> bytes:
    """A built tar without its end-of-archive zero blocks, to append hostile blocks after it."""
    data = tar.rstrip(b"\0")
    return data + b"\0" * (-len(data) % BLOCK)


# -- snapshots ---------------------------------------------------------------------------------------


def _record(path: str, st: os.stat_result, *, volatile: bool) -> dict[str, Any]:
    kind = stat.S_IFMT(st.st_mode)
    rec: dict[str, Any] = {"type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if not volatile:  # the destination's parent gains and loses entries: its times and link count move
        rec.update(mtime=st.st_mtime_ns, ctime=st.st_ctime_ns, nlink=st.st_nlink, ino=st.st_ino)
    if stat.S_ISREG(kind):
        with open(path, "rb") as f:
            rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
        rec["size"] = st.st_size
    elif stat.S_ISLNK(kind):
        rec["target"] = os.readlink(path)
    elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
        rec["rdev"] = st.st_rdev
    try:
        names = os.listxattr(path, follow_symlinks=False)
        rec["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}
    except OSError:
        pass
    return rec


def snapshot(root: Path, *, exclude: Path, volatile: Path) -> dict[str, dict[str, Any]]:
    """Every path under ``root`` except ``exclude``: type, mode, owner, size, hash, target, times, xattrs.

    Iterative (a hostile layer can leave trees deeper than Python's recursion limit behind).
    """
    out: dict[str, dict[str, Any]] = {}
    stack = [str(root)]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        out[os.path.relpath(path, root)] = _record(path, st, volatile=path == str(volatile))
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                stack.extend(e.path for e in it if e.path != str(exclude))
    return out


HOST_PATHS = ["/victim", "/x", "/pwned", "/evil", "/etc/passwd", "/etc/shadow", "/etc/hosts", "/dev/null"]


def host_state() -> dict[str, Any]:
    """Absolute host paths a broken unpacker would write: must look the same before and after."""
    out: dict[str, Any] = {}
    for p in HOST_PATHS:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
            continue
        rec: dict[str, Any] = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                               "uid": st.st_uid, "gid": st.st_gid, "ino": st.st_ino}
        if stat.S_ISREG(st.st_mode):
            rec.update(size=st.st_size, mtime=st.st_mtime_ns, ctime=st.st_ctime_ns, nlink=st.st_nlink)
            with open(p, "rb") as f:
                rec["sha256"] = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISCHR(st.st_mode):
            rec["rdev"] = st.st_rdev  # /dev/null's times move whenever anything writes to it
        out[p] = rec
    return out


def report(diffs: list[str], limit: int = 20) -> str:
    more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "\n".join(d[:300] for d in diffs[:limit]) + more


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            out.append(f"removed: {path}")
        elif path not in before:
            out.append(f"created: {path} {after[path]}")
        elif before[path] != after[path]:
            a, b = before[path] or {}, after[path] or {}
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"changed: {path}: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
    return out


# -- the environment each case runs in ---------------------------------------------------------------


@dataclass
class Ctx:
    tmp: Path
    sentinel: Path
    victim: Path
    dest: Path

    def inside(self, host_path: Path | str) -> Path:
        """Where an absolute host path lands when resolved inside the destination."""
        return self.dest / str(host_path).lstrip("/")


def make_victim(victim: Path) -> None:
    victim.mkdir()
    (victim / "secret").write_bytes(VICTIM_SECRET)
    os.chmod(victim / "secret", 0o600)
    os.chown(victim / "secret", 1234, 1234)
    (victim / "dir").mkdir()
    (victim / "dir" / "inner").write_bytes(b"inner\n")
    os.symlink("secret", victim / "link")
    for p in (victim / "secret", victim / "dir" / "inner", victim / "dir", victim):
        os.utime(p, ns=(OLD_MTIME * 10**9, OLD_MTIME * 10**9))
    os.utime(victim / "link", ns=(OLD_MTIME * 10**9, OLD_MTIME * 10**9), follow_symlinks=False)


def make_sentinel(sentinel: Path) -> None:
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"sentinel\n")
    (sentinel / "sub").mkdir()
    (sentinel / "sub" / "file").write_bytes(b"sub\n")
    os.symlink("../victim", sentinel / "victim-link")
    os.utime(sentinel / "keep", ns=(OLD_MTIME * 10**9, OLD_MTIME * 10**9))


# -- the cases ---------------------------------------------------------------------------------------

Layers = Callable[[Ctx], list[bytes]]
Check = Callable[[Ctx], None]


@dataclass
class Case:
    id: str
    layers: Layers
    error: type[DirgeError] | None = None  # expected failure class, or None for a contained success
    fragment: str | tuple[str, ...] | None = None  # in the message (a tuple: any one of; only for bugs)
    check: Check | None = None  # for successes: the specific contained result
    compression: str = "gzip"
    limits: Limits = field(default_factory=Limits)


def B() -> LayerBuilder:
    return LayerBuilder()


def reads(path: Path, data: bytes) -> None:
    assert not path.is_symlink(), f"{path} is a symlink"
    assert path.is_file(), f"{path} is not a regular file"
    assert path.read_bytes() == data


def is_link(path: Path, target: str) -> None:
    assert path.is_symlink() and os.readlink(path) == target, f"{path} is not a symlink to {target}"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _deep_name(count: int, width: int, leaf: str = "f") -> str:
    return "/".join(f"{i:03d}".ljust(width, "d") for i in range(count)) + "/" + leaf


def _cache_flush_hardlink(ctx: Ctx) -> list[bytes]:
    b = B().file("t/f", b"target\n").symlink("s", "x")  # the symlink makes the next entry start with an empty cache
    for i in range(255):  # fill the directory-fd cache up to one short of its 256 limit
        b.file(f"d{i}/f", b"")
    return [b.hardlink("h/h", "t/f").build()]


def _check_cache_flush_hardlink(ctx: Ctx) -> None:
    assert os.stat(ctx.dest / "h/h").st_ino == os.stat(ctx.dest / "t/f").st_ino


def _deep_tree_then_failure(ctx: Ctx) -> list[bytes]:
    # Each dangling symlink target is created as directories (up to ~250 levels per entry, within the
    # recursion limit of Root.dir); chaining four gives a ~1000-level tree, then a bad block fails the layer.
    b = B()
    prefix, link = "", "s1"
    for i, ch in enumerate("abcd"):
        prefix += "/" + "/".join([ch] * 250)
        b.symlink(link, prefix).file(link + "/f", b"x")
        link += f"/s{i + 2}"
    return [strip_end(b.build()) + header(b"bad", bad_checksum=True) + END]


CASES: list[Case] = [
    # ---- names with .. and absolute names --------------------------------------------------------
    Case("dotdot-relative-file", lambda c: [B().file("../../victim/x", b"pwned").build()],
         check=lambda c: reads(c.dest / "victim/x", b"pwned")),
    Case("dotdot-inside-name", lambda c: [B().file("a/../../x", b"pwned").build()],
         check=lambda c: reads(c.dest / "x", b"pwned")),
    Case("dotdot-pax-path-overwrites-secret",
         lambda c: [raw_tar(pax({b"path": b"../../../victim/secret"}), member(b"harmless", data=b"pwned"))],
         compression="none", check=lambda c: reads(c.dest / "victim/secret", b"pwned")),
    Case("absolute-victim-path", lambda c: [B().file("/victim/secret", b"pwned").build()],
         check=lambda c: reads(c.dest / "victim/secret", b"pwned")),
    Case("absolute-host-path-of-victim", lambda c: [B().file(f"{c.victim}/secret", b"pwned").build()],
         check=lambda c: reads(c.inside(c.victim / "secret"), b"pwned")),
    Case("absolute-etc-passwd", lambda c: [B().file("/etc/passwd", b"root::0:0::/:/bin/sh\n").build()],
         compression="zstd", check=lambda c: reads(c.dest / "etc/passwd", b"root::0:0::/:/bin/sh\n")),
    Case("ustar-name-with-nul-truncates",
         lambda c: [raw_tar(member(b"evil\0/../../victim/secret", data=b"pwned"))], compression="none",
         check=lambda c: (reads(c.dest / "evil", b"pwned"), that(sorted(os.listdir(c.dest)) == ["evil"]))),

    # ---- symlink, then write through it ----------------------------------------------------------
    Case("symlink-absolute-then-write", lambda c: [B().symlink("evil", "/victim").file("evil/pwned", b"p").build()],
         check=lambda c: (is_link(c.dest / "evil", "/victim"), reads(c.dest / "victim/pwned", b"p"))),
    Case("symlink-host-path-then-overwrite",
         lambda c: [B().symlink("evil", str(c.victim)).file("evil/secret", b"pwned").build()],
         check=lambda c: (is_link(c.dest / "evil", str(c.victim)), reads(c.inside(c.victim / "secret"), b"pwned"))),
    Case("symlink-relative-climb-then-write",
         lambda c: [B().symlink("evil", "../../../..").file("evil/x", b"p").build()],
         check=lambda c: (is_link(c.dest / "evil", "../../../.."), reads(c.dest / "x", b"p"))),
    Case("symlink-slash-dot-then-write", lambda c: [B().symlink("evil", "/.").file("evil/x", b"p").build()],
         check=lambda c: (is_link(c.dest / "evil", "/."), reads(c.dest / "x", b"p"))),
    Case("symlink-chain-then-write",
         lambda c: [B().symlink("l1", "l2").symlink("l2", "/l3").symlink("l3", "../../victim/dir")
                    .file("l1/pwned", b"p").build()],
         check=lambda c: reads(c.dest / "victim/dir/pwned", b"p")),
    Case("nested-symlink-climb-then-write",
         lambda c: [B().dir("d").symlink("d/evil", "../../../../victim").file("d/evil/secret", b"pwned").build()],
         check=lambda c: reads(c.dest / "victim/secret", b"pwned")),
    Case("symlink-in-layer1-write-in-layer2",
         lambda c: [B().symlink("evil", str(c.victim)).build(),
                    B().file("evil/secret", b"pwned").file("evil/dir/inner", b"pwned").build()],
         check=lambda c: (reads(c.inside(c.victim / "secret"), b"pwned"),
                          reads(c.inside(c.victim / "dir/inner"), b"pwned"))),
    Case("symlink-replaces-dir-then-write",
         lambda c: [B().dir("d").file("d/a", b"a").symlink("d", "/victim").file("d/b", b"p").build()],
         check=lambda c: (is_link(c.dest / "d", "/victim"), reads(c.dest / "victim/b", b"p"),
                          that(not (c.dest / "victim/a").exists()))),
    Case("symlink-replaces-dir-across-layers",
         lambda c: [B().dir("d").file("d/a", b"a").build(),
                    B().symlink("d", str(c.victim)).file("d/secret", b"pwned").build()],
         check=lambda c: (is_link(c.dest / "d", str(c.victim)), reads(c.inside(c.victim / "secret"), b"pwned"))),
    Case("symlink-to-file-then-child",
         lambda c: [B().file("f", b"f").symlink("evil", "/f").file("evil/x", b"p").build()],
         UnsafeLayer, "a parent path component exists and is not a directory"),
    Case("symlink-loop-as-parent", lambda c: [B().symlink("a", "b").symlink("b", "a").file("a/x", b"p").build()],
         UnpackError, "write a/x: Too many levels of symbolic links"),
    # etc -> /etc is a loop inside the root (/etc *is* the link): every resolver fails with ELOOP.
    Case("etc-symlink-to-host-etc", lambda c: [B().symlink("etc", "/etc").file("etc/passwd", b"pwned").build()],
         UnpackError, "write etc/passwd: Too many levels of symbolic links"),
    Case("etc-symlink-elsewhere", lambda c: [B().symlink("etc", "/host/etc").file("etc/passwd", b"pwned").build()],
         check=lambda c: (is_link(c.dest / "etc", "/host/etc"), reads(c.dest / "host/etc/passwd", b"pwned"))),
    Case("dev-symlink-to-host-dev", lambda c: [B().symlink("dev", "/dev").device("dev/null", 1, 3).build()],
         UnpackError, "write dev/null: Too many levels of symbolic links"),
    Case("dev-symlink-via-proc-magic-link",
         lambda c: [B().symlink("dev", "/proc/self/root/dev").device("dev/null", 1, 3)
                    .file("dev/pwned", b"p").build()],
         check=lambda c: (that(stat.S_ISCHR(os.lstat(c.dest / "proc/self/root/dev/null").st_mode)),
                          reads(c.dest / "proc/self/root/dev/pwned", b"p"))),

    # ---- hardlinks -------------------------------------------------------------------------------
    Case("hardlink-dotdot-victim-then-write",
         lambda c: [B().hardlink("h", "../../victim/secret").file("h", b"pwned").build()],
         UnsafeLayer, "hardlink target victim/secret does not exist"),
    Case("hardlink-absolute-victim-then-write",
         lambda c: [B().hardlink("h", "/victim/secret").build(), B().file("h", b"pwned").build()],
         UnsafeLayer, "hardlink target victim/secret does not exist"),
    Case("hardlink-host-path-then-write",
         lambda c: [B().hardlink("h", f"{c.victim}/secret").file("h", b"pwned").build()],
         UnsafeLayer, "does not exist"),
    Case("hardlink-through-symlink-outside",
         lambda c: [B().symlink("evil", str(c.victim)).hardlink("h", "evil/secret").file("h", b"pwned").build()],
         UnsafeLayer, "hardlink target evil/secret does not exist"),
    Case("hardlink-through-symlink-lands-inside",
         lambda c: [B().file("victim/secret", b"inner copy").symlink("evil", "/victim")
                    .hardlink("h", "evil/secret").build(),
                    B().file("h", b"pwned").build()],
         check=lambda c: (reads(c.dest / "h", b"pwned"), reads(c.dest / "victim/secret", b"inner copy"),
                          that(os.stat(c.dest / "victim/secret").st_nlink == 1))),
    Case("hardlink-to-symlink-pointing-out-then-write",
         lambda c: [B().symlink("evil", f"{c.victim}/secret").hardlink("h", "evil").file("h", b"pwned").build()],
         check=lambda c: (is_link(c.dest / "evil", f"{c.victim}/secret"), reads(c.dest / "h", b"pwned"))),
    Case("hardlink-then-overwrite-next-layer",
         lambda c: [B().file("a", b"A").hardlink("h", "a").build(), B().file("h", b"B").build()],
         check=lambda c: (reads(c.dest / "a", b"A"), reads(c.dest / "h", b"B"))),
    Case("hardlink-to-directory", lambda c: [B().dir("d").hardlink("h", "d").build()],
         UnsafeLayer, "hardlink target d is a directory"),
    Case("hardlink-to-itself", lambda c: [B().file("x", b"keep").hardlink("x", "x").hardlink("y", "./y").build()],
         check=lambda c: (reads(c.dest / "x", b"keep"), that(not os.path.lexists(c.dest / "y")))),
    Case("hardlink-to-root", lambda c: [B().hardlink("h", "/").build()], UnsafeLayer, "hardlink to the root"),
    Case("hardlink-after-256-directories", _cache_flush_hardlink, check=_check_cache_flush_hardlink),

    # ---- whiteouts -------------------------------------------------------------------------------
    Case("whiteout-dotdot-path",
         lambda c: [B().file("victim/secret", b"copy").file("victim/keep", b"k").build(),
                    B().whiteout("../../victim/secret").build()],
         check=lambda c: (that(not os.path.lexists(c.dest / "victim/secret")),
                          reads(c.dest / "victim/keep", b"k"))),
    Case("whiteout-dot", lambda c: [B().file(".wh..", mode=0o600).build()], UnsafeLayer, "whiteout names '.' or '..'"),
    Case("whiteout-dotdot-name", lambda c: [B().dir("a").file("a/.wh...").build()],
         UnsafeLayer, "whiteout names '.' or '..'"),
    Case("whiteout-empty-name", lambda c: [B().file("a", b"a").build(), B().file(".wh.").build()],
         check=lambda c: reads(c.dest / "a", b"a")),
    Case("whiteout-through-symlink",
         lambda c: [B().file("victim/secret", b"copy").file("victim/keep", b"k").symlink("evil", "/victim").build(),
                    B().whiteout("evil/secret").build()],
         check=lambda c: (that(not os.path.lexists(c.dest / "victim/secret")),
                          reads(c.dest / "victim/keep", b"k"), is_link(c.dest / "evil", "/victim"))),
    Case("whiteout-through-host-symlink",
         lambda c: [B().symlink("evil", str(c.victim)).build(),
                    B().whiteout("evil/secret").whiteout("evil/dir").whiteout("evil/link").build()],
         check=lambda c: (is_link(c.dest / "evil", str(c.victim)), that(sorted(os.listdir(c.dest)) == ["evil"]))),
    Case("opaque-through-symlink",
         lambda c: [B().file("victim/secret", b"copy").file("victim/dir/inner", b"i").symlink("evil", "/victim").build(),
                    B().opaque("evil").build()],
         check=lambda c: (that(os.listdir(c.dest / "victim") == []), is_link(c.dest / "evil", "/victim"))),
    Case("opaque-through-host-symlink",
         lambda c: [B().symlink("evil", str(c.victim)).symlink("evil2", f"{c.victim}/dir").build(),
                    B().opaque("evil").opaque("evil2").build()],
         check=lambda c: that(sorted(os.listdir(c.dest)) == ["evil", "evil2"])),

    # ---- entries that would replace the root -----------------------------------------------------
    Case("root-entry-symlink", lambda c: [raw_tar(member(b"./", b"2", linkname=str(c.victim).encode()))],
         UnsafeLayer, "would replace the root directory", compression="none"),
    Case("root-entry-file", lambda c: [raw_tar(member(b".", b"0", b"pwned"))],
         UnsafeLayer, "would replace the root directory", compression="none"),
    Case("root-entry-hardlink",
         lambda c: [raw_tar(member(b"etc/passwd", data=b"x"), member(b"/", b"1", linkname=b"etc/passwd"))],
         UnsafeLayer, "would replace the root directory", compression="none"),
    Case("root-entry-dotdot-symlink", lambda c: [raw_tar(member(b"../..", b"2", linkname=b"/"))],
         UnsafeLayer, "would replace the root directory"),
    Case("root-entry-dir-sets-only-dest",
         lambda c: [raw_tar(member(b"./", b"5", mode=0o750, uid=4242, gid=4243), member(b"./f", data=b"f"))],
         check=lambda c: (that(mode_of(c.dest) == 0o750), that(os.lstat(c.dest).st_uid == 4242),
                          reads(c.dest / "f", b"f"))),

    # ---- chmod / chown / utime through a symlink --------------------------------------------------
    Case("chmod-via-symlink-dir-entry",
         lambda c: [B().symlink("evil", f"{c.victim}/secret").dir("evil", mode=0o777).build()],
         check=lambda c: (that(os.path.isdir(c.dest / "evil") and not os.path.islink(c.dest / "evil")),
                          that(mode_of(c.dest / "evil") == 0o777))),
    Case("chmod-via-symlink-file-entry",
         lambda c: [B().symlink("evil", f"{c.victim}/secret").build(),
                    B().file("evil", b"pwned", mode=0o4777, xattrs={"user.pwned": b"1"}).build()],
         check=lambda c: (reads(c.dest / "evil", b"pwned"), that(mode_of(c.dest / "evil") == 0o4777))),
    Case("chown-utime-via-symlink-to-victim-dir",
         lambda c: [B().symlink("evil", f"{c.victim}/dir").build(),
                    B().dir("evil", mode=0o700, uid=4242, gid=4242, mtime=0).build()],
         check=lambda c: (that(os.lstat(c.dest / "evil").st_uid == 4242),
                          that(stat.S_ISDIR(os.lstat(c.dest / "evil").st_mode)),
                          that(os.lstat(c.dest / "evil").st_mtime == 0))),
    Case("fifo-over-symlink-to-victim",
         lambda c: [B().symlink("evil", f"{c.victim}/secret").fifo("evil", mode=0o666).build()],
         check=lambda c: (that(stat.S_ISFIFO(os.lstat(c.dest / "evil").st_mode)),
                          that(mode_of(c.dest / "evil") == 0o666))),
    Case("symlink-entry-utime-not-followed",
         lambda c: [B().symlink("evil", f"{c.victim}/secret", uid=4242, mtime=5).build()],
         check=lambda c: (is_link(c.dest / "evil", f"{c.victim}/secret"),
                          that(os.lstat(c.dest / "evil").st_mtime == 5),
                          that(os.lstat(c.dest / "evil").st_uid == 4242))),

    # ---- NUL bytes -------------------------------------------------------------------------------
    Case("pax-path-with-nul",
         lambda c: [raw_tar(pax({b"path": b"evil\0/../../victim/x"}), member(b"harmless", data=b"p"))],
         UnsafeLayer, "name contains a NUL byte", compression="none"),
    Case("pax-symlink-target-with-nul",
         lambda c: [raw_tar(pax({b"linkpath": b"/victim\0/secret"}), member(b"evil", b"2", linkname=b"x"))],
         UnsafeLayer, "symlink with an empty or NUL-containing target"),
    Case("pax-hardlink-target-with-nul",
         lambda c: [raw_tar(member(b"a", data=b"a"), pax({b"linkpath": b"a\0../../victim/secret"}),
                            member(b"h", b"1", linkname=b"a"))],
         UnsafeLayer, "name contains a NUL byte"),

    # ---- limits: decompression bombs and pathological tars ----------------------------------------
    Case("bomb-total-bytes", lambda c: [B().file("zeros", b"\0" * (4 << 20)).build()],
         LimitExceeded, "max_total_bytes (4194304 > 1048576)", compression="zstd",
         limits=Limits(max_total_bytes=1 << 20)),
    Case("bomb-total-bytes-across-layers", lambda c: [B().file(f"f{i}", b"\0" * (512 << 10)).build() for i in range(3)],
         LimitExceeded, "max_total_bytes (1572864 > 1048576)", limits=Limits(max_total_bytes=1 << 20)),
    Case("too-many-entries", lambda c: [_many_entries(50)], LimitExceeded, "max_entries (11 > 10)",
         limits=Limits(max_entries=10)),
    Case("too-many-entries-across-layers", lambda c: [_many_entries(6), _many_entries(6)],
         LimitExceeded, "max_entries (11 > 10)", limits=Limits(max_entries=10)),
    Case("too-deep-custom-limit", lambda c: [B().file("a/" * 20 + "f", b"deep").build()],
         LimitExceeded, "max_depth (21 > 8)", limits=Limits(max_depth=8)),
    Case("too-deep-default-limit", lambda c: [B().file("a/" * 300 + "f", b"deep").build()],
         LimitExceeded, "max_depth (301 > 256)"),
    Case("file-too-big", lambda c: [B().file("big", b"x" * 2000).build()],
         LimitExceeded, "max_file_bytes (2000 > 1000)", limits=Limits(max_file_bytes=1000)),
    Case("size-field-claims-1tib", lambda c: [raw_tar(header(b"huge", size=1 << 40) + b"x" * BLOCK)],
         LimitExceeded, "max_file_bytes", compression="none"),
    Case("pax-header-claims-100mb",
         lambda c: [raw_tar(header(b"PaxHeaders/x", b"x", size=100_000_000) + _pad(pax_record(b"path", b"x")))],
         LimitExceeded, "max_header_bytes (100000000 > 1048576)", compression="none"),
    Case("pax-size-100mb-with-little-data",
         lambda c: [strip_end(pax_member(tarfile.TarInfo("f"), {"size": "100000000"}, b"a" * 600))],
         ImageError, "truncated"),
    Case("gnu-longname-over-1mib",
         lambda c: [raw_tar(member(b"././@LongLink", b"L", b"n" * ((1 << 20) + 1)), member(b"x", data=b"x"))],
         LimitExceeded, "max_header_bytes (1048577 > 1048576)"),
    Case("gnu-longlink-over-1mib",
         lambda c: [raw_tar(member(b"././@LongLink", b"K", b"l" * (2 << 20)), member(b"x", b"2", linkname=b"y"))],
         LimitExceeded, "max_header_bytes (2097152 > 1048576)"),

    # ---- broken tars -----------------------------------------------------------------------------
    Case("bad-header-checksum",
         lambda c: [strip_end(B().file("ok", b"written first").build()) + header(b"evil", bad_checksum=True) + END],
         ImageError, "bad tar header checksum at byte"),
    Case("truncated-in-data", lambda c: [B().file("ok", b"o").file("big", b"b" * 10_000).build()[:3 * BLOCK + 3000]],
         ImageError, "truncated", compression="none"),
    Case("truncated-in-header", lambda c: [B().file("ok", b"o").file("next", b"n").build()[:2 * BLOCK + 200]],
         ImageError, "truncated", compression="zstd"),
    Case("negative-size-field", lambda c: [raw_tar(header(b"neg", size=-5))], ImageError, "negative size"),
    Case("unsupported-entry-type", lambda c: [raw_tar(member(b"z", b"Z", b"zz"))],
         ImageError, "unsupported tar entry type"),

    # ---- very long names -------------------------------------------------------------------------
    Case("name-4000-char-component", lambda c: [B().file("x" * 4000, b"long").build()],
         UnpackError, "File name too long"),
    Case("path-4000-chars-nested", lambda c: [B().file(_deep_name(16, 249), b"deep").build()],
         check=lambda c: reads(c.dest / _deep_name(16, 249), b"deep")),
    Case("path-beyond-path-max", lambda c: [B().file(_deep_name(20, 249), b"deep").build()],
         UnpackError, "File name too long"),

    # ---- hostile values that must end in a DirgeError, within the limits ---------------------------
    Case("pax-negative-size-bypasses-total-limit",
         lambda c: [pax_member(tarfile.TarInfo("neg"), {"size": str(-(1 << 62))}),
                    B().file("zeros", b"\0" * (4 << 20)).build()],
         DirgeError, ("negative", "max_total_bytes"), limits=Limits(max_total_bytes=1 << 20)),
    Case("gnu-volume-headers-many",  # skipped in a loop, not by recursion
         lambda c: [raw_tar(*(member(b"vol%d" % i, b"V") for i in range(3000)), member(b"x", data=b"x"))],
         check=lambda c: reads(c.dest / "x", b"x")),
    Case("dangling-symlink-deep-target-recursion",
         lambda c: [B().symlink("evil", "a/" * 2000).file("evil/x", b"x").build()],
         DirgeError, ("max_depth", "symbolic link", "too deep")),
    Case("deep-tree-through-dangling-symlinks", _deep_tree_then_failure, LimitExceeded, "max_depth"),
    Case("pax-mtime-overflow", lambda c: [pax_member(tarfile.TarInfo("t"), {"mtime": "9" * 30})],
         DirgeError, ("mtime", "time")),
    Case("pax-uid-overflow", lambda c: [pax_member(tarfile.TarInfo("t"), {"uid": "9" * 30})],
         DirgeError, "uid"),
    Case("pax-sparse-map-garbage", lambda c: [pax_member(tarfile.TarInfo("t"), {"GNU.sparse.map": "a,b"})],
         ImageError, "sparse"),
    Case("xattr-name-with-nul", lambda c: [pax_member(tarfile.TarInfo("t"), {"SCHILY.xattr.user.a\0b": "v"})],
         DirgeError, "xattr"),
    Case("tree-memory-bound", lambda c: [_many_entries(2000)], LimitExceeded, "max_tree_bytes",
         limits=Limits(max_tree_bytes=200_000)),
    Case("global-pax-records-flood",  # each global record is merged into every later entry
         lambda c: [_global_pax({f"k{i}": "v" for i in range(100)})],
         LimitExceeded, "max_global_records (100 > 64)"),
]


def that(condition: bool, what: str = "") -> None:
    assert condition, what or "unexpected contained result"


def _many_entries(n: int) -> bytes:
    b = B()
    for i in range(n):
        b.file(f"f{i}", b"")
    return b.build()


def _param(case: Case) -> Any:
    return pytest.param(case, id=case.id)


# -- the test ----------------------------------------------------------------------------------------


@pytest.fixture
def via(tmp_path_factory: pytest.TempPathFactory):
    """``via(fmt)(ref, dest, limits) -> verb``: the tree applier (``unpack``), or the erofs writer
    (``export`` to an image outside the watched tree, then mounted read-only at ``dest``)."""
    mounted: list[Path] = []

    def make(fmt: str) -> Callable[[str, Path, Limits], str]:
        def tree(ref: str, dest: Path, limits: Limits) -> str:
            unpack(ref, dest, limits=limits)
            return "unpack"

        def erofs(ref: str, dest: Path, limits: Limits) -> str:
            from dirge.exporting import export
            from dirge.fsimage.mount import mount_erofs

            image = tmp_path_factory.mktemp("erofs") / "rootfs.erofs"
            export(ref, image, format="erofs", limits=limits)
            fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
            assert fsck.returncode == 0, f"fsck.erofs: {fsck.stdout}{fsck.stderr}"
            assert subprocess.run(["dump.erofs", "-s", str(image)], capture_output=True).returncode == 0
            dest.mkdir()
            mount_erofs(image, dest)
            mounted.append(dest)
            return "export"

        return tree if fmt == "tree" else erofs

    yield make
    from dirge.fsimage.mount import unmount

    for dest in reversed(mounted):
        unmount(dest)


@pytest.mark.parametrize("fmt", ["tree", "erofs"])
@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile_layer(case: Case, fmt: str, tmp_path: Path, make_image, via) -> None:
    sentinel, victim = tmp_path / "sentinel", tmp_path / "victim"
    make_sentinel(sentinel)
    make_victim(victim)
    ctx = Ctx(tmp_path, sentinel, victim, sentinel / "rootfs")
    ref = make_image(case.layers(ctx), compression=case.compression)

    before, host_before = snapshot(tmp_path, exclude=ctx.dest, volatile=sentinel), host_state()
    raised: Exception | None = None
    try:
        via(fmt)(ref, ctx.dest, case.limits)
    except Exception as exc:  # noqa: BLE001 - the class is asserted below, after containment
        raised = exc
    try:
        after, host_after = snapshot(tmp_path, exclude=ctx.dest, volatile=sentinel), host_state()
        leftovers = [p.name for p in sentinel.iterdir() if STAGING in p.name]

        # 1. containment, whatever happened
        outside = differences(before, after)
        assert not outside, "changed outside the destination:\n" + report(outside)
        host = differences(host_before, host_after)
        assert not host, "changed host paths:\n" + report(host)
        assert not leftovers, f"staging directories left behind: {leftovers}"

        # 2. a clear DirgeError and nothing published, or the specific contained result
        if case.error is not None:
            assert raised is not None, f"expected {case.error.__name__}, but the unpack succeeded"
            assert isinstance(raised, case.error), f"expected {case.error.__name__}, got {raised!r}"
            fragments = (case.fragment,) if isinstance(case.fragment, str) else case.fragment
            if fragments:
                assert any(f in str(raised) for f in fragments), f"{fragments} not in {str(raised)!r}"
            verb = "unpack" if fmt == "tree" else "export"
            assert str(raised).startswith(f"{verb} {ref}: "), str(raised)
            assert not os.path.lexists(ctx.dest), "a failed unpack left its destination behind"
        else:
            assert raised is None, f"expected a contained success, got {raised!r}"
            assert ctx.dest.is_dir() and not ctx.dest.is_symlink()
            assert case.check is not None
            case.check(ctx)
    finally:
        # Trees deeper than Python's recursion limit defeat shutil.rmtree (and pytest's cleanup).
        for p in sentinel.iterdir():
            if STAGING in p.name:
                subprocess.run(["rm", "-rf", "--", str(p)], check=False)
