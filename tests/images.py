"""Test images: small layer sets that exercise every rule of the layer spec."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dirge.layerbuild import LayerBuilder

# cap_net_raw+ep, VFS_CAP_REVISION_2
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def gnu_tar(tmp: Path, fmt: str, *extra: str) -> bytes:
    """A layer written by GNU tar itself (sparse files, GNU long names), for formats tarfile cannot write."""
    src = tmp / f"src-{fmt}{''.join(extra)}"
    src.mkdir()
    (src / "sparse").mkdir()
    with open(src / "sparse" / "holes.bin", "wb") as f:
        f.seek(300_000)
        f.write(os.urandom(5000))
        f.seek(2_000_000)
        f.write(b"end")
    deep = src / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"long")
    os.symlink("../" + "t" * 150, src / "sparse" / "longlink")
    out = tmp / f"{src.name}.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", *extra, "--numeric-owner", "-C", str(src), "-cf",
                    str(out), "."], check=True)
    return out.read_bytes()


def layered() -> list[bytes]:
    base = (
        LayerBuilder()
        .dir("etc").dir("usr").dir("usr/bin").dir("var").dir("var/lib")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/hosts", b"127.0.0.1 localhost\n", mode=0o600, uid=0, gid=4)
        .dir("etc/conf.d").file("etc/conf.d/a", b"a").file("etc/conf.d/b", b"b")
        .dir("opq").file("opq/lower1", b"l1").dir("opq/sub").file("opq/sub/lower2", b"l2")
        .dir("opq2").file("opq2/lower", b"x").file("opq2/keep", b"lower-keep")
        .file("to-dir", b"was a file").dir("to-file").file("to-file/child", b"c")
        .file("to-link", b"was a file").symlink("link-to-file", "etc/passwd")
        .file("usr/bin/tool", b"#!/bin/sh\n", mode=0o755, uid=1000, gid=1000)
        .dir("var/lib/gone").file("var/lib/gone/x", b"x")
    )
    top = (
        LayerBuilder()
        .whiteout("etc/hosts")
        .whiteout("var/lib/gone")
        .file("opq/new-before", b"same layer, before marker")
        .opaque("opq")
        .file("opq/new-after", b"same layer, after marker")
        .opaque("opq2")
        .file("opq2/keep", b"re-added in the opaque layer")
        .dir("to-dir", mode=0o711).file("to-dir/inside", b"i")
        .file("to-file", b"now a file")
        .symlink("to-link", "/etc/passwd")
        .file("link-to-file", b"symlink replaced by a file")
        .hardlink("usr/bin/tool-hardlink", "usr/bin/tool")
    )
    return [base.build(), top.build()]


def metadata(*, overlay_xattr: bool = True) -> list[bytes]:
    meta = (
        LayerBuilder()
        .dir("m", mode=0o755)
        .file("m/setuid", b"s", mode=0o4755).file("m/setgid", b"g", mode=0o2711, gid=50)
        .dir("m/sticky", mode=0o1777)
        .file("m/cap", b"c", mode=0o755, xattrs={"security.capability": CAP_NET_RAW})
        .file("m/user-xattr", b"u", xattrs={"user.one": b"1", "user.bin": b"\x00\xff\x01"})
        .file("m/trusted-xattr", b"t", xattrs={"trusted.overlay.test": b"y"} if overlay_xattr else {"trusted.x": b"y"})
        .dir("m/xdir", xattrs={"user.dir": b"d"})
        .file("m/owned", b"o", uid=12345, gid=54321, mode=0o640)
        .file("m/old", b"old", mtime=86400)
        .file("m/frac", b"frac", mtime=1_600_000_000.5)
        .fifo("m/fifo", mode=0o620)
        .device("m/null", 1, 3, mode=0o666)
        .device("m/blk", 7, 200, block=True, mode=0o660)
        .symlink("m/dangling", "/does/not/exist", uid=7, gid=8)
        .file("m/" + "n" * 200, b"long name")
        .dir("m/" + "p" * 120).file("m/" + "p" * 120 + "/" + "q" * 150, b"long path")
        .hardlink("m/" + "h" * 140, "m/" + "n" * 200)
        .file("m/ünïcödé-名前", b"utf8")
        .file("m/bad-\udcff\udcfe-bytes", b"non-utf8")
        .file("m/space and\ttab", b"ws")
    )
    return [meta.build()]


