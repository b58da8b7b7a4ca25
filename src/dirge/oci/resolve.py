"""Choosing: index → manifest for a platform, then manifest → config. Ambiguity is an error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from .blob import read_verified
from ..errors import ImageError, PlatformNotFound
from .image import (
    DOCKER_SCHEMA1,
    INDEX_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    host_platform,
    parse_config,
    parse_index,
    parse_manifest,
)
from .reference import Digest

_MAX_NESTING = 4


class BlobSource(Protocol):
    """Where blobs come from (an OCI layout, a registry, the cache). ``open_blob`` returns raw bytes."""

    def open_blob(self, desc: Descriptor) -> BinaryIO: ...

    def close(self) -> None: ...


@runtime_checkable
class Prefetching(Protocol):
    """A source that downloads ahead (a registry): ``prefetch`` starts the layers' downloads, ``wait``
    blocks until every one is stored (or raises the first failure)."""

    def prefetch(self, descs: list[Descriptor]) -> None: ...

    def wait(self) -> None: ...


@runtime_checkable
class Committing(Protocol):
    """A source that keeps what it resolved only once the whole image resolved (a registry's manifests)."""

    def commit(self) -> None: ...


@dataclass(frozen=True)
class ResolvedImage:
    ref: str
    manifest_digest: Digest
    manifest: Manifest
    config: ImageConfig
    platform: Platform | None


def read_blob(source: BlobSource, desc: Descriptor, what: str, limit: int) -> bytes:
    raw = source.open_blob(desc)
    try:
        return read_verified(raw, desc.digest, desc.size, what, limit)
    finally:
        raw.close()  # ours: an unclosed blob file is an fd per manifest/config read until collected


def resolve_manifest(source: BlobSource, desc: Descriptor, ref: str, platform: Platform | None) -> ResolvedImage:
    """Follow ``desc`` (an index or a manifest) down to one manifest and its config."""
    wanted = platform or host_platform()
    for _ in range(_MAX_NESTING):
        if desc.media_type in DOCKER_SCHEMA1:
            raise ImageError(f"resolve {ref}: Docker schema 1 manifests are not supported")
        raw = read_blob(source, desc, f"manifest {desc.digest.short} of {ref}", MAX_MANIFEST_BYTES)
        if desc.media_type in INDEX_TYPES:
            desc = select_platform(parse_index(raw, f"index {desc.digest.short} of {ref}").manifests, wanted, ref)
            continue
        manifest = parse_manifest(raw, f"manifest {desc.digest.short} of {ref}", desc.media_type)
        config_raw = read_blob(source, manifest.config, f"config {manifest.config.digest.short} of {ref}", MAX_CONFIG_BYTES)
        config = parse_config(config_raw, f"config {manifest.config.digest.short} of {ref}")
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(
                f"resolve {ref}: manifest lists {len(manifest.layers)} layers but the config has "
                f"{len(config.diff_ids)} diff_ids"
            )
        if platform and config.platform and not platform.matches(config.platform):
            raise PlatformNotFound(f"resolve {ref}: the image is for {config.platform}, not {platform}")
        if isinstance(source, Committing):  # a registry caches its manifests only now (resolved)
            source.commit()
        return ResolvedImage(ref, desc.digest, manifest, config, config.platform)
    raise ImageError(f"resolve {ref}: indexes nested more than {_MAX_NESTING} deep")


def select_platform(manifests: list[Descriptor], wanted: Platform, ref: str) -> Descriptor:
    candidates = [
        d for d in manifests
        if d.platform is not None and d.platform.os != "unknown" and wanted.matches(d.platform)
    ]
    digests = {d.digest for d in candidates}
    if not candidates:
        available = sorted({str(d.platform) for d in manifests if d.platform and d.platform.os != "unknown"})
        raise PlatformNotFound(
            f"resolve {ref}: no manifest for platform {wanted}; available: {', '.join(available) or 'none'} "
            "(choose one with --platform)"
        )
    if len(digests) > 1:
        raise PlatformNotFound(
            f"resolve {ref}: {len(digests)} manifests match platform {wanted} "
            f"({', '.join(str(d.platform) for d in candidates)}); name a variant with --platform os/arch/variant"
        )
    return candidates[0]
