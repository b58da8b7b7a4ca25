"""``dirge inspect``: what an image is (digests, platforms, layers, config) without unpacking anything.

Every kind of ref goes through ``sources.open.open_start``, so registry refs honour the pull policy (``never``:
from the cache only, no client, no credential helper) and local variants resolve as ``prepare`` does.
Only the top manifest or index, the chosen manifest and its config are read; no layer is fetched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .oci.image import INDEX_TYPES, MAX_MANIFEST_BYTES, Platform, parse_index
from .oci.resolve import read_blob, resolve_manifest
from .sources.open import open_start
from .variants import build_variant

if TYPE_CHECKING:
    from .store.cache import Cache
    from .sources.auth import Credentials, RegistryOptions


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Inspection:
    image: str  # the canonical ref
    digest: str  # of what the ref names: an index or a manifest
    media_type: str
    raw: bytes = field(repr=False)  # those bytes as fetched (they hash to ``digest``)
    platforms: list[str]  # an index's platforms, in its order; empty for a manifest
    manifest_digest: str  # the chosen manifest (== digest when the ref names a manifest)
    manifest_media_type: str
    platform: str | None  # the config's
    config_digest: str
    config_media_type: str
    config_raw: bytes = field(repr=False)
    layers: list[LayerInfo]
    env: list[str]
    cmd: list[str] | None
    entrypoint: list[str] | None
    working_dir: str | None
    user: str | None
    labels: dict[str, str]
    exposed_ports: list[str]
    created: str | None
    history: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """Everything but the raw bytes (``--raw``/``--config`` print those)."""
        return {
            "image": self.image, "digest": self.digest, "media_type": self.media_type,
            "platforms": self.platforms, "manifest_digest": self.manifest_digest,
            "manifest_media_type": self.manifest_media_type, "platform": self.platform,
            "config_digest": self.config_digest, "config_media_type": self.config_media_type,
            "layers": [{"digest": layer.digest, "size": layer.size, "media_type": layer.media_type}
                       for layer in self.layers],
            "env": self.env, "cmd": self.cmd, "entrypoint": self.entrypoint, "working_dir": self.working_dir,
            "user": self.user, "labels": self.labels, "exposed_ports": self.exposed_ports,
            "created": self.created, "history": self.history,
        }


def inspect_image(
    image: str,
    *,
    cache: "Cache | None" = None,
    pull: str = "missing",
    platform: Platform | None = None,
    creds: "Credentials | None" = None,
    registry_options: "RegistryOptions | None" = None,
) -> Inspection:
    """Inspect ``image``; an index is followed to the manifest for ``platform`` (default: the host's)."""
    source, start, name = open_start(image, cache=cache, pull=pull, creds=creds, registry_options=registry_options,
                                      build=build_variant)
    try:
        raw = read_blob(source, start, f"manifest {start.digest.short} of {name}", MAX_MANIFEST_BYTES)
        platforms: list[str] = []
        if start.media_type in INDEX_TYPES:
            platforms = [str(d.platform) for d in parse_index(raw, f"index {start.digest.short} of {name}").manifests
                         if d.platform is not None and d.platform.os != "unknown"]  # not attestations
        resolved = resolve_manifest(source, start, name, platform)
    finally:
        source.close()
    top = _object(resolved.config.raw)
    runtime = resolved.config.config
    return Inspection(
        image=name, digest=str(start.digest), media_type=start.media_type, raw=raw, platforms=platforms,
        manifest_digest=str(resolved.manifest_digest), manifest_media_type=resolved.manifest.media_type,
        platform=str(resolved.platform) if resolved.platform else None,
        config_digest=str(resolved.manifest.config.digest), config_media_type=resolved.manifest.config.media_type,
        config_raw=resolved.config.raw,
        layers=[LayerInfo(str(d.digest), d.size, d.media_type) for d in resolved.manifest.layers],
        env=_strings(runtime.get("Env")) or [],
        cmd=_strings(runtime.get("Cmd")),
        entrypoint=_strings(runtime.get("Entrypoint")),
        working_dir=_text(runtime.get("WorkingDir")),
        user=_text(runtime.get("User")),
        labels={str(k): str(v) for k, v in (runtime.get("Labels") or {}).items()}
        if isinstance(runtime.get("Labels"), dict) else {},
        exposed_ports=sorted(str(p) for p in runtime.get("ExposedPorts") or {})
        if isinstance(runtime.get("ExposedPorts"), dict) else [],
        created=_text(top.get("created")),
        history=[h for h in top.get("history") or [] if isinstance(h, dict)]
        if isinstance(top.get("history"), list) else [],
    )


def _object(raw: bytes) -> dict[str, Any]:
    obj = json.loads(raw)  # parse_config has already accepted it as a JSON object
    return obj if isinstance(obj, dict) else {}


def _strings(value: object) -> list[str] | None:
    """A config string list; images in the wild also carry null, or a lone string."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        return [value]
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
