"""Auditing prepared-base artifacts: ``verify_artifact`` rebuilds an artifact's image file from the image's
layers and compares it with what the artifact says it holds (docs/FLEET.md: a writer of a trusted
repository can make hosts run a filesystem that is not the image; reproducibility is how that is found).

Comparing the rebuild with the annotated sha256 and size is enough: a host publishes an artifact's bytes
only when they hash to that annotation, so the annotation is exactly what hosts run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DirgeError
from .oci.artifact import parse_artifact
from .oci.image import Platform
from .oci.reference import RegistryReference, parse_reference
from .sources.open import open_image
from .flatten import write_erofs, write_ext4
from .variants import build_variant

if TYPE_CHECKING:
    from .sources.auth import Credentials
    from .store.cache import Cache


@dataclass(frozen=True)
class ArtifactCheck:
    artifact: str  # the artifact manifest's digest
    format: str
    image_digest: str  # the image's manifest digest (the artifact's subject must be it)
    expected_sha256: str  # the artifact's annotation
    expected_size: int
    rebuilt_sha256: str
    rebuilt_size: int
    problems: tuple[str, ...]  # empty: the artifact is the image

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_artifact(image: str, artifact_ref: str, *, platform: Platform | None = None,
                    cache: "Cache | None" = None, pull: str = "missing", creds: "Credentials | None" = None,
                    workdir: Path | None = None) -> ArtifactCheck:
    """Rebuild ``image``'s file in the format of the artifact ``artifact_ref`` (REGISTRY/REPO@sha256:… or
    :TAG) from the layers, with the artifact's options, and compare."""
    from .sources.artifacts import repository_ref
    from .sources.registry import RegistryClient

    ref = parse_reference(artifact_ref if "://" in artifact_ref else f"docker://{artifact_ref}")
    if not isinstance(ref, RegistryReference):
        raise DirgeError(f"verify-artifact: {artifact_ref!r} is not a registry reference (REGISTRY/REPO@DIGEST)")
    repository_ref(f"{ref.registry}/{ref.repository}")
    client = RegistryClient(ref.registry, creds=creds)
    try:
        raw, _, digest = client.fetch_manifest(ref, str(ref.digest) if ref.digest else ref.tag or "latest")
    finally:
        client.close()
    artifact = parse_artifact(raw, artifact_ref)
    from .fsimage import erofs, ext4

    ours = (erofs if artifact.format == "erofs" else ext4).WRITER_VERSION
    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds, build=build_variant)
    problems: list[str] = []
    if artifact.subject != resolved.manifest_digest:
        problems.append(f"its subject {artifact.subject} is not {image} ({resolved.manifest_digest})")
    if artifact.writer_version != ours:
        problems.append(f"writer version {artifact.writer_version!r}: this dirge writes {ours!r} and cannot "
                        "reproduce it (verify with the dirge that wrote it)")
    h, size = hashlib.sha256(), 0
    try:
        if not problems:
            try:
                options = json.loads(artifact.annotations.get("dev.dirge.options", "{}"))
                if not isinstance(options, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise DirgeError(f"verify-artifact {artifact_ref}: bad options annotation ({exc})") from None
            with tempfile.TemporaryDirectory(prefix=".dirge-verify-artifact-", dir=workdir) as tmp:
                path = Path(tmp) / f"rootfs.{artifact.format}"
                if artifact.format == "erofs":
                    write_erofs(source, resolved, path)
                else:
                    write_ext4(source, resolved, path, size=options.get("size"),
                               journal=bool(options.get("journal", True)), inodes=options.get("inodes"))
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                        size += len(chunk)
            if f"sha256:{h.hexdigest()}" != str(artifact.sha256) or size != artifact.size:
                problems.append(f"the rebuild is sha256:{h.hexdigest()} ({size} bytes), the artifact says "
                                f"{artifact.sha256} ({artifact.size} bytes): it is not this image")
    finally:
        source.close()
    return ArtifactCheck(str(digest), artifact.format, str(resolved.manifest_digest), str(artifact.sha256),
                         artifact.size, f"sha256:{h.hexdigest()}" if size else "", size, tuple(problems))
