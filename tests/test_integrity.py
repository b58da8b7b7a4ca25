"""Blobs and metadata that are not what they claim: each fails with a clear message, nothing is published."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import zstandard
from isal import igzip

from dirge import DirgeError, ImageError, IntegrityError, PlatformNotFound, unpack
from dirge.oci.image import Platform
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter

LAYER = LayerBuilder().dir("etc").file("etc/os-release", b"ID=test\n" * 5000).build()


def _layout(tmp_path: Path, **kwargs) -> tuple[Path, dict]:
    layout = tmp_path / "layout"
    desc = LayoutWriter(layout).add_image([LAYER], tag="t", **kwargs)
    return layout, desc


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


def _manifest(layout: Path) -> tuple[dict, Path]:
    index = json.loads((layout / "index.json").read_text())
    path = _blob(layout, index["manifests"][0]["digest"])
    return json.loads(path.read_bytes()), path


def _rewrite_manifest(layout: Path, manifest: dict) -> None:
    """Store an edited manifest under its new digest and point index.json at it."""
    w = LayoutWriter(layout)
    desc = w.add_json(manifest, manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"))
    w.index = []
    w.tag(desc, "t")


def _replace_layer(layout: Path, new_blob: bytes, *, fix_descriptor: bool) -> None:
    manifest, _ = _manifest(layout)
    old = manifest["layers"][0]
    _blob(layout, old["digest"]).write_bytes(new_blob)
    if fix_descriptor:
        os.rename(_blob(layout, old["digest"]), _blob(layout, "sha256:" + hashlib.sha256(new_blob).hexdigest()))
        old["digest"] = "sha256:" + hashlib.sha256(new_blob).hexdigest()
        old["size"] = len(new_blob)
        _rewrite_manifest(layout, manifest)


def _expect_failure(tmp_path: Path, layout: Path, exc_type: type[DirgeError], *fragments: str) -> str:
    dest = tmp_path / "rootfs"
    with pytest.raises(exc_type) as info:
        unpack(f"oci:{layout}:t", dest)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert not dest.exists(), "a failed unpack must not publish anything"
    assert not [p for p in tmp_path.iterdir() if "dirge-staging" in p.name], "staging left behind"
    return message


def test_layer_digest_mismatch(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path)
    manifest, _ = _manifest(layout)
    blob = _blob(layout, manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(data))
    _expect_failure(tmp_path, layout, IntegrityError, "digest of layer 1/1", manifest["layers"][0]["digest"])


def test_layer_size_mismatch(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path)
    manifest, _ = _manifest(layout)
    blob = _blob(layout, manifest["layers"][0]["digest"])
    blob.write_bytes(blob.read_bytes() + b"\0" * 10)
    _expect_failure(tmp_path, layout, IntegrityError, "size of layer 1/1", "bytes")


def test_diff_id_mismatch(tmp_path: Path) -> None:
    """A layer blob that verifies but whose uncompressed content is not what the config says."""
    layout, _ = _layout(tmp_path)
    other = LayerBuilder().file("evil", b"swapped").build()
    _replace_layer(layout, igzip.compress(other), fix_descriptor=True)
    _expect_failure(tmp_path, layout, IntegrityError, "diff_id of layer 1/1")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_stream(tmp_path: Path, compression: str) -> None:
    """The blob's digest matches (it was published truncated), but the compressed stream ends early."""
    layout, _ = _layout(tmp_path, compression=compression)
    full = igzip.compress(LAYER) if compression == "gzip" else zstandard.ZstdCompressor().compress(LAYER)
    _replace_layer(layout, full[: len(full) // 2], fix_descriptor=True)
    message = _expect_failure(tmp_path, layout, DirgeError, "layer 1/1")
    assert any(word in message for word in ("truncated", "ended", "diff_id")), message


def test_zstd_layer_unpacks(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path, compression="zstd")
    unpack(f"oci:{layout}:t", tmp_path / "rootfs")
    assert (tmp_path / "rootfs/etc/os-release").read_bytes() == b"ID=test\n" * 5000


def test_docker_media_type_that_lies(tmp_path: Path) -> None:
    """Docker 'tar.gzip' media type on an uncompressed blob: the magic bytes decide."""
    layout, _ = _layout(tmp_path, compression="none", docker=True)
    manifest, _ = _manifest(layout)
    manifest["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    _rewrite_manifest(layout, manifest)
    unpack(f"oci:{layout}:t", tmp_path / "rootfs")
    assert (tmp_path / "rootfs/etc/os-release").exists()


def test_missing_blob(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path)
    manifest, _ = _manifest(layout)
    _blob(layout, manifest["layers"][0]["digest"]).unlink()
    _expect_failure(tmp_path, layout, ImageError, "missing from the layout")


@pytest.mark.parametrize(
    "target, content, fragment",
    [
        ("index", b"{not json", "index.json: not valid JSON"),
        ("index", b'{"schemaVersion": 2, "manifests": {}}', "'manifests' must be a list"),
        ("index", b'{"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "sha256:zz", "size": 1}]}',
         "lowercase hex"),
        ("index", b'{"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "md5:00", "size": 1}]}',
         "algorithm 'md5'"),
        ("index", b'{"schemaVersion": 2, "manifests": [{"digest": "sha256:' + b"0" * 64 + b'", "size": 1}]}',
         "no 'mediaType'"),
        ("index", b'[]', "expected a JSON object"),
        ("manifest", b"\xff\xfe garbage", "not valid JSON"),
        ("manifest", b'{"schemaVersion": 1, "name": "x"}', "schema 1"),
        ("manifest", b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}',
         "manifest has no config"),
        ("manifest", b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", '
         b'"config": {"mediaType": "c", "digest": "sha256:' + b"1" * 64 + b'", "size": -4}, "layers": []}',
         "size must be a non-negative integer"),
        ("config", b"{", "not valid JSON"),
        ("config", b'{"rootfs": {"type": "layers"}}', "rootfs must be"),
        ("config", b'{"rootfs": {"type": "layers", "diff_ids": ["sha256:abc"]}}', "diff_id must have 64"),
        ("config", b'{"rootfs": {"type": "layers", "diff_ids": []}}', "manifest lists 1 layers but the config has 0"),
    ],
)
def test_malformed_json(tmp_path: Path, target: str, content: bytes, fragment: str) -> None:
    layout, _ = _layout(tmp_path)
    manifest, manifest_path = _manifest(layout)
    if target == "index":
        (layout / "index.json").write_bytes(content)
    elif target == "manifest":
        w = LayoutWriter(layout)
        desc = w.add_blob(content, "application/vnd.oci.image.manifest.v1+json")
        w.index = []
        w.tag(desc, "t")
    else:
        desc = LayoutWriter(layout).add_blob(content, "application/vnd.oci.image.config.v1+json")
        manifest["config"] = desc
        _rewrite_manifest(layout, manifest)
    _expect_failure(tmp_path, layout, ImageError, fragment)


def test_manifest_digest_mismatch(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path)
    _, manifest_path = _manifest(layout)
    manifest_path.write_bytes(manifest_path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
    _expect_failure(tmp_path, layout, IntegrityError, "manifest")


def test_unknown_and_nondistributable_layers(tmp_path: Path) -> None:
    for media_type, fragment in [
        ("application/vnd.example.weird", "unsupported media type"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "non-distributable"),
    ]:
        layout, _ = _layout(tmp_path / media_type.rsplit(".", 1)[-1])
        manifest, _ = _manifest(layout)
        manifest["layers"][0]["mediaType"] = media_type
        _rewrite_manifest(layout, manifest)
        with pytest.raises(ImageError, match=fragment):
            unpack(f"oci:{layout}:t", tmp_path / "rootfs")


def test_tag_selection(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    w = LayoutWriter(layout)
    w.add_image([LayerBuilder().file("a", b"a").build()], tag="one")
    w.add_image([LayerBuilder().file("b", b"b").build()], tag="two")
    unpack(f"oci:{layout}:two", tmp_path / "r2")
    assert (tmp_path / "r2/b").exists() and not (tmp_path / "r2/a").exists()
    with pytest.raises(ImageError, match=r"holds 2 images; .*tags: one, two"):
        unpack(f"oci:{layout}", tmp_path / "r0")
    with pytest.raises(ImageError, match=r"no image tagged 'three' \(tags: one, two\)"):
        unpack(f"oci:{layout}:three", tmp_path / "r3")


def test_multi_platform_index(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    w = LayoutWriter(layout)
    amd = w.add_image([LayerBuilder().file("arch", b"amd64").build()], platform=Platform("linux", "amd64"))
    arm = w.add_image([LayerBuilder().file("arch", b"arm64").build()], platform=Platform("linux", "arm64", "v8"))
    att = dict(amd, platform={"os": "unknown", "architecture": "unknown"})
    index = w.add_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [amd, arm, att]}, "application/vnd.oci.image.index.v1+json")
    w.tag(index, "multi")
    unpack(f"oci:{layout}:multi", tmp_path / "arm", platform=Platform("linux", "arm64"))
    assert (tmp_path / "arm/arch").read_bytes() == b"arm64"
    unpack(f"oci:{layout}:multi", tmp_path / "amd", platform=Platform("linux", "amd64"))
    assert (tmp_path / "amd/arch").read_bytes() == b"amd64"
    with pytest.raises(PlatformNotFound, match="available: linux/amd64, linux/arm64/v8"):
        unpack(f"oci:{layout}:multi", tmp_path / "s390", platform=Platform("linux", "s390x"))


def test_destination_must_be_empty(tmp_path: Path) -> None:
    layout, _ = _layout(tmp_path)
    dest = tmp_path / "full"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(DirgeError, match="exists and is not an empty directory"):
        unpack(f"oci:{layout}:t", dest)
    assert (dest / "keep").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    unpack(f"oci:{layout}:t", tmp_path / "empty")
    assert (tmp_path / "empty/etc/os-release").exists()
