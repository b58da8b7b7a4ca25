"""OCI image layout directories (``oci:PATH[:TAG]``): reading, and a small writer for demos and tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

from isal import igzip
import zstandard

from ..oci.blob import raw_read_bounded
from ..errors import ImageError
from ..oci.image import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    host_platform,
    parse_index,
)
from ..oci.reference import LayoutReference

REF_NAME = "org.opencontainers.image.ref.name"


class LayoutSource:
    """Blobs of an OCI image layout, by validated digest only (a digest never escapes ``blobs/``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        marker = self.path / "oci-layout"
        try:
            with open(marker, "rb") as f:
                version = json.loads(raw_read_bounded(f, 4096, str(marker))).get("imageLayoutVersion")
        except FileNotFoundError:
            raise ImageError(f"open {self.path}: not an OCI image layout (no oci-layout file)") from None
        except (ValueError, AttributeError):
            raise ImageError(f"open {marker}: not valid JSON") from None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"open {marker}: unsupported imageLayoutVersion {version!r}")

    def close(self) -> None:
        pass

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        blob = self.path / "blobs" / desc.digest.algorithm / desc.digest.hex
        try:
            return open(blob, "rb")
        except FileNotFoundError:
            raise ImageError(f"open blob {desc.digest} in {self.path}: missing from the layout") from None

    def select(self, ref: LayoutReference) -> Descriptor:
        """The index.json entry named by the tag, or the only one when no tag is given."""
        index_path = self.path / "index.json"
        try:
            with open(index_path, "rb") as f:
                raw = raw_read_bounded(f, MAX_MANIFEST_BYTES, str(index_path))
        except FileNotFoundError:
            raise ImageError(f"open {index_path}: missing") from None
        manifests = parse_index(raw, str(index_path)).manifests
        tags = sorted({d.annotations.get(REF_NAME, "") for d in manifests} - {""})
        if ref.tag is None:
            if len(manifests) == 1:
                return manifests[0]
            raise ImageError(
                f"resolve {ref}: the layout holds {len(manifests)} images; name one as oci:PATH:TAG "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        chosen = [d for d in manifests if d.annotations.get(REF_NAME) == ref.tag]
        if not chosen:
            raise ImageError(f"resolve {ref}: no image tagged {ref.tag!r} (tags: {', '.join(tags) or 'none'})")
        if len({d.digest for d in chosen}) > 1:
            raise ImageError(f"resolve {ref}: tag {ref.tag!r} names {len(chosen)} different images")
        return chosen[0]


# -- writing (demo and test fixtures) -------------------------------------------------------------


class LayoutWriter:
    """Writes blobs and an index into a layout directory. Not for untrusted input."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []
        index_file = self.path / "index.json"
        if index_file.exists():
            self.index = json.loads(index_file.read_bytes()).get("manifests", [])

    def add_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        hexd = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / hexd).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{hexd}", "size": len(data)}

    def add_json(self, obj: dict[str, Any], media_type: str) -> dict[str, Any]:
        return self.add_blob(json.dumps(obj, separators=(",", ":")).encode(), media_type)

    def add_image(
        self,
        layers: list[bytes],
        *,
        tag: str | None = None,
        compression: str = "gzip",
        runtime_config: dict[str, Any] | None = None,
        docker: bool = False,
        platform: Platform | None = None,
    ) -> dict[str, Any]:
        """Add an image from uncompressed layer tars; returns its manifest descriptor."""
        plat = platform or host_platform()
        layer_descs, diff_ids = [], []
        for tar in layers:
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
            if compression == "gzip":
                blob, mt = igzip.compress(tar, mtime=0), ("application/vnd.docker.image.rootfs.diff.tar.gzip" if docker
                                                  else "application/vnd.oci.image.layer.v1.tar+gzip")
            elif compression == "zstd":
                blob, mt = zstandard.ZstdCompressor().compress(tar), "application/vnd.oci.image.layer.v1.tar+zstd"
            else:
                blob, mt = tar, ("application/vnd.docker.image.rootfs.diff.tar" if docker
                                 else "application/vnd.oci.image.layer.v1.tar")
            layer_descs.append(self.add_blob(blob, mt))
        config = {
            "architecture": plat.architecture,
            "os": plat.os,
            **({"variant": plat.variant} if plat.variant else {}),
            "config": runtime_config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_desc = self.add_json(config, DOCKER_CONFIG if docker else OCI_CONFIG)
        manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": manifest_type, "config": config_desc, "layers": layer_descs}
        desc = self.add_json(manifest, manifest_type)
        desc["platform"] = {"os": plat.os, "architecture": plat.architecture,
                            **({"variant": plat.variant} if plat.variant else {})}
        if tag is not None:
            self.tag(desc, tag)
        return desc

    def tag(self, desc: dict[str, Any], tag: str) -> None:
        self.index = [d for d in self.index if d.get("annotations", {}).get(REF_NAME) != tag]
        self.index.append({**desc, "annotations": {REF_NAME: tag}})
        self.write_index()

    def write_index(self) -> None:
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index}, indent=1)
        tmp = self.path / "index.json.tmp"
        tmp.write_text(data)
        os.replace(tmp, self.path / "index.json")

