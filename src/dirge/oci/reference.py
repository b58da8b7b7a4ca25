"""Image references: parsing and canonical forms. Pure functions, no I/O.

Accepted forms:

* ``NAME`` / ``NAME:TAG`` (no ``/``)       → a local variant ``local://dirge-microvm:NAME[:TAG]`` (the seed's rule)
* ``local://NAME[:TAG]``                   → an image in buildah's storage
* ``oci:PATH[:TAG]``                       → an OCI image layout directory (skopeo's syntax)
* ``[docker://][HOST[:PORT]/]REPO[:TAG][@DIGEST]`` → a registry image, Docker Hub rules applied
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidReference

LOCAL_PREFIX = "local://"
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/:@-]*$")
VARIANT_PREFIX = "local://dirge-microvm:"
DOCKER_HUB = "docker.io"

# Lowercase hex only, as the image-spec requires for registered algorithms.
_DIGEST_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_LAYOUT_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*")


def canonicalize_image_ref(raw: str) -> str:
    """The seed's rule: a bare name (no ``/``, no ``://``) means a local variant."""
    if "/" in raw or "://" in raw:
        return raw
    return VARIANT_PREFIX + raw


def local_variant_name(image_ref: str) -> str | None:
    """``local://dirge-microvm:NAME`` → ``NAME``; anything else → ``None``."""
    if image_ref.startswith(VARIANT_PREFIX):
        return image_ref[len(VARIANT_PREFIX):]
    return None


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


def parse_digest(text: str, *, what: str = "digest", ref: str | None = None) -> Digest:
    """Validate ``ALG:HEX`` before it can ever become part of a path (``ref``: the whole ref, for errors)."""
    algorithm, sep, hexpart = text.partition(":")
    if ref is None:
        ref = text
    if not sep:
        raise InvalidReference(ref, f"{what} must look like sha256:<64 hex digits>")
    expected_len = _DIGEST_HEX_LEN.get(algorithm)
    if expected_len is None:
        raise InvalidReference(ref, f"{what} algorithm {algorithm!r} is not one of {sorted(_DIGEST_HEX_LEN)}")
    if len(hexpart) != expected_len or not _HEX.fullmatch(hexpart):
        raise InvalidReference(ref, f"{what} must have {expected_len} lowercase hex digits after '{algorithm}:'")
    return Digest(algorithm, hexpart)


@dataclass(frozen=True)
class LayoutReference:
    """An image in an OCI image layout directory."""

    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class LocalReference:
    """An image held in buildah's local storage (``local://NAME[:TAG]``)."""

    name: str

    def __str__(self) -> str:
        return LOCAL_PREFIX + self.name

    @property
    def variant(self) -> str | None:
        return local_variant_name(str(self))


@dataclass(frozen=True)
class RegistryReference:
    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


Reference = LayoutReference | LocalReference | RegistryReference


def parse_reference(raw: str) -> Reference:
    """Parse any accepted form (see the module docstring) into a typed reference."""
    if not raw or raw.strip() != raw:
        raise InvalidReference(raw, "must be non-empty and have no surrounding white space")
    if raw.startswith("oci:"):
        return parse_layout_reference(raw)
    if raw.startswith("docker://"):
        return parse_registry_reference(raw[len("docker://"):])
    canonical = canonicalize_image_ref(raw)
    if canonical.startswith(LOCAL_PREFIX):
        name = canonical[len(LOCAL_PREFIX):]
        if not name or not _LOCAL_NAME.match(name):
            raise InvalidReference(raw, "local://NAME[:TAG] needs a name of letters, digits and ._-/:@, "
                                        "not starting with '-'")
        return LocalReference(name)
    if "://" in canonical:
        raise InvalidReference(raw, "unknown transport; use oci:PATH, docker://REF, local://NAME or a registry ref")
    return parse_registry_reference(canonical)


def parse_layout_reference(raw: str) -> LayoutReference:
    body = raw[len("oci:"):]
    path, sep, tag = body.partition(":")
    if not path:
        raise InvalidReference(raw, "oci:PATH[:TAG] needs a path")
    if sep:
        if not _LAYOUT_TAG.fullmatch(tag):
            raise InvalidReference(raw, "the tag after oci:PATH: must match [A-Za-z0-9_][A-Za-z0-9._/-]*")
        return LayoutReference(path, tag)
    return LayoutReference(path)


def parse_registry_reference(raw: str) -> RegistryReference:
    """``[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` with Docker Hub normalisation."""
    name, at, digest_text = raw.partition("@")
    digest = parse_digest(digest_text, what="image digest", ref=raw) if at else None
    tag: str | None = None
    last_colon, last_slash = name.rfind(":"), name.rfind("/")
    if last_colon > last_slash:
        name, tag = name[:last_colon], name[last_colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(raw, "a tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
        if not _HOST.fullmatch(registry):
            raise InvalidReference(raw, f"registry host {registry!r} is not a valid host[:port]")
    else:
        registry, repository = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise InvalidReference(
                raw, f"repository component {component!r} must be lowercase letters, digits and single separators (. _ __ -)"
            )
    if len(repository) > 255:
        raise InvalidReference(raw, "repository name longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return RegistryReference(registry, repository, tag, digest)
