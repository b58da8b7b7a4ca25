"""Bounded work (issue 18): every decompressed byte of a layer counts against ``Limits.max_layer_bytes``,
and files dirge reads out of an image on the host are capped and streamed."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from isal import isal_zlib

from dirge import LimitExceeded, Limits, unpack
from dirge.cli import main
from dirge.image import OCI_CONFIG, OCI_MANIFEST, host_platform
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter

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


def _symlink_with_pax_size(size: int) -> Iterator[bytes]:
    """A symlink whose PAX header says ``size``, that many bytes after it, then the end marker."""
    info = tarfile.TarInfo("link")
    info.type = tarfile.SYMTYPE
    info.linkname = "target"
    info.pax_headers = {"size": str(size)}
    yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
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


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_symlinks_pax_size_counts_against_max_layer_bytes(tmp_path: Path, compression: str) -> None:
    image, digest = _image(tmp_path, _symlink_with_pax_size(256 * MiB), compression)
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
