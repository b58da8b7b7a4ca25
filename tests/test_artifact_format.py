"""oci/artifact.py: the artifact manifest, the referrers tag index and zstd's seekable transport format."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess

import pytest

from dirge.errors import ImageError
from dirge.oci import artifact as art
from dirge.oci.image import OCI_MANIFEST, Descriptor, Platform
from dirge.oci.reference import parse_digest


def _digest(data: bytes):
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def _manifest(fmt: str = "erofs", **changes: object) -> bytes:
    layer = Descriptor(art.layer_media_type(fmt), _digest(b"blob"), 4)
    subject = Descriptor(OCI_MANIFEST, _digest(b"image"), 5)
    return art.artifact_manifest(fmt, layer, subject, sha256=_digest(b"file"), size=4096, source_ref="r/x:1",
                                 platform=Platform("linux", "amd64"), writer_version="1",
                                 options={"journal": True, "size": None})


def test_manifest_is_canonical_and_parses_back() -> None:
    raw = _manifest()
    assert raw == _manifest()  # no timestamp: one conversion, one digest
    obj = json.loads(raw)
    assert obj["artifactType"] == "application/vnd.dirge.rootfs.erofs.v1"
    assert obj["config"] == {"mediaType": "application/vnd.oci.empty.v1+json", "digest": art.EMPTY_DIGEST, "size": 2}
    assert obj["subject"]["digest"] == str(_digest(b"image"))
    parsed = art.parse_artifact(raw, "test")
    assert (parsed.format, parsed.size, parsed.writer_version, parsed.platform) == ("erofs", 4096, "1", "linux/amd64")
    assert parsed.sha256 == _digest(b"file") and parsed.subject == _digest(b"image")


@pytest.mark.parametrize("edit", [
    lambda o: o.update(artifactType="application/vnd.other"),
    lambda o: o["layers"].append(o["layers"][0]),
    lambda o: o["layers"][0].update(mediaType="application/octet-stream"),
    lambda o: o["annotations"].pop(art.ANNOTATION_SHA256),
    lambda o: o["annotations"].update({art.ANNOTATION_SIZE: "many"}),
    lambda o: o["annotations"].update({art.ANNOTATION_SOURCE_DIGEST: str(_digest(b"other"))}),
])
def test_a_manifest_that_is_not_exactly_ours_is_refused(edit) -> None:
    obj = json.loads(_manifest())
    edit(obj)
    with pytest.raises(ImageError, match="parse artifact"):
        art.parse_artifact(json.dumps(obj).encode(), "test")


def test_referrers_index_adds_once_and_keeps_others() -> None:
    a = Descriptor(OCI_MANIFEST, _digest(b"a"), 1)
    b = Descriptor(OCI_MANIFEST, _digest(b"b"), 2)
    one = art.referrers_index(None, a, art.artifact_type("erofs"))
    two = art.referrers_index(one, b, art.artifact_type("ext4"))
    again = art.referrers_index(two, a, art.artifact_type("erofs"))
    assert [d.digest for d in art.referrers_from_index(again, "t")] == [b.digest, a.digest]
    assert [d.digest for d in art.referrers_from_index(again, "t", art.artifact_type("ext4"))] == [b.digest]
    assert art.referrers_tag(_digest(b"image")) == "sha256-" + hashlib.sha256(b"image").hexdigest()


def test_seekable_blob_round_trips_in_python_and_with_zstd_cli(tmp_path) -> None:
    data = os.urandom(1 << 20) + bytes(5 << 20) + b"tail"
    out = io.BytesIO()
    frames = art.compress_seekable(io.BytesIO(data), out, frame_size=2 << 20)
    blob = out.getvalue()
    assert [d for _, d in frames] == [2 << 20, 2 << 20, 2 << 20, 4]
    assert art.read_seek_table(blob) == frames
    assert sum(c for c, _ in frames) + len(art.seek_table(frames)) == len(blob)
    chunks = iter([blob[i:i + 65536] for i in range(0, len(blob), 65536)])
    assert b"".join(art.decompress_stream(chunks, len(data))) == data
    with pytest.raises(ValueError, match="annotated"):
        b"".join(art.decompress_stream(iter([blob]), len(data) - 1))
    if shutil.which("zstd") is None:
        pytest.fail("the zstd CLI is missing: scripts/setup.sh --test installs it")
    (tmp_path / "b.zst").write_bytes(blob)
    proc = subprocess.run(["zstd", "-dc", str(tmp_path / "b.zst")], capture_output=True, check=True)
    assert proc.stdout == data


def test_no_seek_table_is_an_error() -> None:
    with pytest.raises(ValueError):
        art.read_seek_table(b"\0" * 64)


def test_a_zstd_bomb_stops_at_the_annotated_size_without_expanding_it() -> None:
    """A few KiB of RLE blocks that expand to 64 MiB: the decompressor hands out at most OUTPUT_CHUNK at a
    time, so the annotated size stops it before the memory is spent (decompressobj would expand it whole)."""
    bomb = io.BytesIO()
    art.compress_seekable(io.BytesIO(bytes(64 << 20)), bomb, frame_size=64 << 20, level=1)
    blob = bomb.getvalue()
    assert len(blob) < 1 << 20
    sizes = []
    with pytest.raises(ValueError, match="annotated"):
        for out in art.decompress_stream(iter([blob]), 3 << 20):
            sizes.append(len(out))
    assert sizes and max(sizes) <= art.OUTPUT_CHUNK and sum(sizes) <= 3 << 20


def test_junk_is_a_value_error_not_a_zstd_one() -> None:
    with pytest.raises(ValueError, match="zstd"):
        b"".join(art.decompress_stream(iter([b"\x28\xb5\x2f\xfd" + os.urandom(4096)]), 1 << 20))


def test_write_sparse_writes_runs_of_data_and_leaves_zero_pieces_as_holes(tmp_path: Path) -> None:
    """What a fetched artifact's file is written with: every 64 KiB piece that is not all zeros lands at its
    offset (runs of them in one write), all-zero pieces stay holes, a short tail included."""
    from dirge.sources.artifacts import _HOLE, _write_sparse

    data = (b"a" * _HOLE + bytes(3 * _HOLE) + b"b" * (2 * _HOLE) + bytes(_HOLE - 1) + b"c"
            + bytes(_HOLE) + b"tail")
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _write_sparse(fd, data[:5 * _HOLE], 0)
        _write_sparse(fd, data[5 * _HOLE:], 5 * _HOLE)  # a second chunk at its offset
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    with open(path, "rb") as f:  # the three all-zero pieces are holes (where the filesystem reports them)
        assert os.lseek(f.fileno(), _HOLE, os.SEEK_HOLE) == _HOLE
        assert os.lseek(f.fileno(), _HOLE, os.SEEK_DATA) == 4 * _HOLE
