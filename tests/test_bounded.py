"""Bounded work (issue 18): every decompressed byte of a layer counts against ``Limits.max_layer_bytes``,
and files dirge reads out of an image on the host are capped and streamed."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from isal import isal_zlib

from conftest import needs_tool
from dirge import LimitExceeded, Limits, unpack
from dirge.cli import main
from dirge.errors import SessionError
from dirge.fsimage.erofs_read import ErofsReadError, read_erofs_file
from dirge.fsutil import READ_MAX
from dirge.oci.image import OCI_CONFIG, OCI_MANIFEST, host_platform
from dirge.layerbuild import LayerBuilder
from dirge.session.customize import DirWriter, Ext4DiskWriter, add_user
from dirge.sources.layout import LayoutWriter
from dirge.vm.guest import GuestSpec, install_guest

MiB = 1 << 20


def _zeros(n: int) -> Iterator[bytes]:
    block = bytes(MiB)
    while n > 0:
        yield block[:min(n, MiB)]
        n -= MiB


def _compressed(parts: Iterator[bytes], compression: str) -> tuple[bytes, str]:
    """The blob (streamed through the compressor: the decompressed layer is never held whole) and its
    diff_id."""
    diff = hashlib.sha256()
    if compression == "zstd":
        obj = zstandard.ZstdCompressor(level=1).compressobj()
    else:
        obj = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)  # wbits 31: a gzip member
    out = []
    for part in parts:
        diff.update(part)
        out.append(obj.compress(part))
    out.append(obj.flush())
    return b"".join(out), "sha256:" + diff.hexdigest()


def _image(tmp: Path, parts: Iterator[bytes], compression: str) -> tuple[str, str]:
    """``oci:`` ref of a one-layer image whose layer is ``parts`` (as LayoutWriter.add_image lays it out),
    and the layer's digest."""
    blob, diff_id = _compressed(parts, compression)
    writer = LayoutWriter(tmp / f"layout-{compression}")
    media = f"application/vnd.oci.image.layer.v1.tar+{compression}"
    layer = writer.add_blob(blob, media)
    plat = host_platform()
    config = writer.add_json({"architecture": plat.architecture, "os": plat.os, "config": {},
                              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}, OCI_CONFIG)
    manifest = writer.add_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                "layers": [layer]}, OCI_MANIFEST)
    writer.tag(manifest, "t")
    return f"oci:{tmp / f'layout-{compression}'}:t", layer["digest"]


def _after_end(trailing: int) -> Iterator[bytes]:
    """A valid small tar (one file, end-of-archive marker), then ``trailing`` zero bytes: what GNU tar
    stops reading at the marker, and dirge drains (decompresses and hashes) for the digests."""
    yield LayerBuilder().file("hello", b"hi\n").build()
    yield from _zeros(trailing)


def _entry_claiming(kind: str, size: int) -> Iterator[bytes]:
    """One entry of a type that carries no file data (a symlink with a PAX ``size``, a GNU ``D`` dumpdir
    or ``V`` volume header with a size field) claiming ``size`` bytes, those bytes, then the end marker.
    However the parser takes them (the entry's data, skipped, or zero blocks that end the archive and
    then the drain), every one is decompressed, so every one counts."""
    info = tarfile.TarInfo("entry")
    if kind == "pax-symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "target"
        info.pax_headers = {"size": str(size)}
        yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    else:
        info.type, info.size = kind.encode(), size
        yield info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    yield from _zeros(size + 1024)


LIMIT = 4 * MiB
# Where a layer stops once it crosses the limit: the chunk that crosses (a 1 MiB read, or one zstd
# call's output, a few tens of MiB at most for a bomb) and nothing after it.
STOPPED_BY = LIMIT + 64 * MiB


@pytest.mark.parametrize("compression,trailing", [("zstd", 1 << 30), ("gzip", 512 * MiB)])
def test_bytes_after_the_end_marker_count_against_max_layer_bytes(tmp_path: Path, compression: str,
                                                                   trailing: int) -> None:
    image, digest = _image(tmp_path, _after_end(trailing), compression)
    with pytest.raises(LimitExceeded) as info:
        unpack(image, tmp_path / "out", rootless=True, limits=Limits(max_layer_bytes=LIMIT))
    err = info.value
    assert err.limit == "max_layer_bytes" and err.maximum == LIMIT and err.layer == digest
    assert digest in str(err) and "max_layer_bytes" in str(err) and f"--limit max_layer_bytes=N" in str(err)
    # stopped where the limit was crossed, not after decompressing the whole drain
    assert LIMIT < err.value <= STOPPED_BY


@pytest.mark.parametrize("kind,compression", [("pax-symlink", "zstd"), ("pax-symlink", "gzip"), ("D", "zstd"),
                                              ("V", "zstd")])
def test_data_of_entries_that_carry_none_counts_against_max_layer_bytes(tmp_path: Path, kind: str,
                                                                       compression: str) -> None:
    image, digest = _image(tmp_path, _entry_claiming(kind, 256 * MiB), compression)
    with pytest.raises(LimitExceeded) as info:
        unpack(image, tmp_path / "out", rootless=True, limits=Limits(max_layer_bytes=LIMIT))
    assert info.value.layer == digest and digest in str(info.value)
    assert LIMIT < info.value.value <= STOPPED_BY


def test_the_default_limit_passes_a_normal_image_and_the_drain(tmp_path: Path) -> None:
    image, _ = _image(tmp_path, _after_end(8 * MiB), "zstd")
    unpack(image, tmp_path / "out", rootless=True)
    assert (tmp_path / "out" / "hello").read_bytes() == b"hi\n"
    assert Limits().max_layer_bytes == 64 << 30


def test_max_layer_bytes_is_settable_with_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image, digest = _image(tmp_path, _after_end(64 * MiB), "zstd")
    assert main(["-q", "unpack", "--rootless", "--limit", f"max_layer_bytes={LIMIT}", image,
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "max_layer_bytes" in err and digest in err
    assert main(["-q", "unpack", "--rootless", "--limit", f"max_layer_bytes={128 * MiB}", image,
                 str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "hello").read_bytes() == b"hi\n"


# -- files read from an image on the host: capped at fsutil.READ_MAX, refused by size before any read ----------

SPARSE = 512 * MiB  # apparent size; a few blocks on disk


def _tree_with_huge_passwd(root: Path) -> Path:
    """A rootfs whose /etc/passwd is a sparse file over the cap (a real first line, then a hole)."""
    (root / "etc").mkdir(parents=True)
    (root / "upper").mkdir()  # for the erofs-session scratch disk, which keeps its files under upper/
    with open(root / "etc" / "passwd", "wb") as f:
        f.write(b"root:x:0:0::/root:/bin/sh\n")
        f.truncate(SPARSE)
    (root / "etc" / "group").write_bytes(b"root:x:0:\n")
    return root


def _assert_names_path_and_cap(exc: BaseException) -> None:
    message = str(exc)
    assert "/etc/passwd" in message and f"{READ_MAX >> 20} MiB" in message, message
    assert str(SPARSE) in message, message  # refused by its size, before it was read


def test_a_directory_rootfs_refuses_a_huge_sparse_passwd(tmp_path: Path) -> None:
    root = _tree_with_huge_passwd(tmp_path / "rootfs")
    with pytest.raises(SessionError) as info:
        add_user(DirWriter(root), "alice", 1000)
    _assert_names_path_and_cap(info.value)
    with pytest.raises(SessionError) as info:
        install_guest(DirWriter(root), GuestSpec(argv=["/bin/true"], env=[]))
    _assert_names_path_and_cap(info.value)


@needs_tool("mkfs.ext4", "debugfs")
def test_an_ext4_disk_refuses_a_huge_sparse_passwd_before_debugfs_cat(tmp_path: Path) -> None:
    root = _tree_with_huge_passwd(tmp_path / "rootfs")
    disk = tmp_path / "disk.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(disk), "64M"], check=True)
    writer = Ext4DiskWriter(disk)
    with pytest.raises(SessionError) as info:
        writer.read_file("/etc/passwd")
    _assert_names_path_and_cap(info.value)
    with pytest.raises(SessionError) as info:
        add_user(writer, "alice", 1000)
    _assert_names_path_and_cap(info.value)
    assert writer.read_file("/etc/group") == b"root:x:0:\n"  # small files still read


@needs_tool("mkfs.erofs", "mkfs.ext4", "debugfs")
def test_an_erofs_base_refuses_a_huge_sparse_passwd(tmp_path: Path) -> None:
    """What an erofs disk session reads through (``rootfs._erofs_lower``): the guest init's user lookup and
    add_user both refuse the file by its size, and never fill its holes."""
    root = _tree_with_huge_passwd(tmp_path / "rootfs")
    base = tmp_path / "base.erofs"
    subprocess.run(["mkfs.erofs", "--chunksize=1048576", str(base), str(root)], check=True,
                   capture_output=True)
    with pytest.raises(ErofsReadError) as info:
        read_erofs_file(base, "/etc/passwd")
    _assert_names_path_and_cap(info.value)
    assert read_erofs_file(base, "/etc/group") == b"root:x:0:\n"

    scratch_tree = tmp_path / "scratch"
    (scratch_tree / "upper").mkdir(parents=True)
    scratch = tmp_path / "scratch.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(scratch_tree), str(scratch), "16M"], check=True)
    writer = Ext4DiskWriter(scratch, under="upper", lower=lambda path: read_erofs_file(base, path))
    with pytest.raises(ErofsReadError) as info:
        install_guest(writer, GuestSpec(argv=["/bin/true"], env=[]))
    _assert_names_path_and_cap(info.value)
    with pytest.raises(ErofsReadError) as info:
        add_user(writer, "alice", 1000)
    _assert_names_path_and_cap(info.value)


def test_one_cap_everywhere() -> None:
    from dirge.session import customize

    assert READ_MAX == 256 << 20 and customize.READ_MAX is READ_MAX
