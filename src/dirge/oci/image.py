"""Image-spec data: media types, descriptors, platforms, and parsing of index / manifest / config JSON.

Raw bytes are kept next to parsed forms, because digests are computed over the raw bytes.
Nothing here knows where bytes come from.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from ..errors import ImageError, InvalidReference
from .reference import Digest, parse_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

# Layer media types we apply. The stream's magic bytes decide the decompressor.
LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
})
NONDISTRIBUTABLE_TYPES = frozenset({
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})

MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, other: "Platform") -> bool:
        """Does an image for ``other`` satisfy a request for ``self``? (A missing variant accepts any.)"""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        default = "v8" if self.architecture == "arm64" else None
        return (other.variant or default) == self.variant


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386",
         "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    if machine.startswith("armv7"):
        return Platform("linux", "arm", "v7")
    if machine.startswith("armv6"):
        return Platform("linux", "arm", "v6")
    return Platform("linux", _ARCH.get(machine, machine))


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidReference(text, "a platform is os/arch[/variant], e.g. linux/arm64")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Descriptor":
        if not isinstance(obj, dict):
            raise ImageError(f"parse {where}: a descriptor must be a JSON object")
        try:
            media_type = obj["mediaType"]
            digest_text = obj["digest"]
            size = obj["size"]
        except KeyError as exc:
            raise ImageError(f"parse {where}: descriptor has no {exc.args[0]!r}") from None
        if not isinstance(media_type, str) or not isinstance(digest_text, str):
            raise ImageError(f"parse {where}: descriptor mediaType and digest must be strings")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"parse {where}: descriptor size must be a non-negative integer")
        try:
            digest = parse_digest(digest_text)
        except InvalidReference as exc:
            raise ImageError(f"parse {where}: {exc}") from None
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict) and isinstance(p.get("os"), str) and isinstance(p.get("architecture"), str):
            plat = Platform(p["os"], p["architecture"], p.get("variant") or None)
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise ImageError(f"parse {where}: annotations must be an object of strings")
        return cls(media_type, digest, size, plat, annotations)


def _load(raw: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"parse {where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ImageError(f"parse {where}: expected a JSON object")
    return obj


def _descriptors(obj: dict[str, Any], key: str, where: str) -> list[Descriptor]:
    items = obj.get(key)
    if not isinstance(items, list):
        raise ImageError(f"parse {where}: {key!r} must be a list")
    return [Descriptor.from_json(item, f"{where} {key}[{i}]") for i, item in enumerate(items)]


@dataclass(frozen=True)
class Index:
    raw: bytes
    manifests: list[Descriptor]


def parse_index(raw: bytes, where: str) -> Index:
    obj = _load(raw, where)
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"parse {where}: schemaVersion must be 2")
    return Index(raw, _descriptors(obj, "manifests", where))


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


def parse_manifest(raw: bytes, where: str, media_type: str | None = None) -> Manifest:
    obj = _load(raw, where)
    if obj.get("schemaVersion") != 2:
        raise ImageError(f"parse {where}: schemaVersion must be 2 (Docker schema 1 images are not supported)")
    mt = obj.get("mediaType") or media_type or OCI_MANIFEST
    if mt in INDEX_TYPES or "manifests" in obj:
        raise ImageError(f"parse {where}: this is an index, not a manifest")
    if mt not in MANIFEST_TYPES:
        raise ImageError(f"parse {where}: unsupported manifest media type {mt!r}")
    if "config" not in obj:
        raise ImageError(f"parse {where}: manifest has no config")
    config = Descriptor.from_json(obj["config"], f"{where} config")
    layers = _descriptors(obj, "layers", where)
    for i, layer in enumerate(layers):
        if layer.media_type in NONDISTRIBUTABLE_TYPES:
            raise ImageError(
                f"parse {where}: layer {i} ({layer.digest.short}) is non-distributable ({layer.media_type}); "
                "dirge does not fetch foreign layers"
            )
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(f"parse {where}: layer {i} ({layer.digest.short}) has unsupported media type {layer.media_type!r}")
    return Manifest(raw, mt, config, layers)


@dataclass(frozen=True)
class ImageConfig:
    raw: bytes
    diff_ids: list[Digest]
    platform: Platform | None
    config: dict[str, Any]  # the runtime part: Env, Cmd, Entrypoint, WorkingDir, User, ...


def parse_config(raw: bytes, where: str) -> ImageConfig:
    obj = _load(raw, where)
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageError(f"parse {where}: rootfs must be {{'type': 'layers', 'diff_ids': [...]}}")
    diff_ids: list[Digest] = []
    for i, text in enumerate(rootfs["diff_ids"]):
        if not isinstance(text, str):
            raise ImageError(f"parse {where}: diff_ids[{i}] must be a string")
        try:
            diff_ids.append(parse_digest(text, what="diff_id"))
        except InvalidReference as exc:
            raise ImageError(f"parse {where}: {exc}") from None
    plat = None
    if isinstance(obj.get("os"), str) and isinstance(obj.get("architecture"), str):
        plat = Platform(obj["os"], obj["architecture"], obj.get("variant") or None)
    runtime = obj.get("config") or {}
    if not isinstance(runtime, dict):
        raise ImageError(f"parse {where}: config must be an object")
    return ImageConfig(raw, diff_ids, plat, runtime)
