"""Reference parsing: the seed's vectors, skopeo's oci: syntax, Docker Hub rules, digest validation."""

from __future__ import annotations

import pytest

from dirge import InvalidReference, canonicalize_image_ref, local_variant_name, parse_reference
from dirge.oci.reference import LayoutReference, LocalReference, RegistryReference, parse_digest

HEX = "a" * 64


# The seed's own test vectors, unchanged.
def test_canonicalize_bare_name() -> None:
    assert canonicalize_image_ref("alpine") == "local://dirge-microvm:alpine"
    assert canonicalize_image_ref("debian") == "local://dirge-microvm:debian"


def test_canonicalize_passthrough() -> None:
    assert canonicalize_image_ref("local://dirge-microvm:debian") == "local://dirge-microvm:debian"
    assert canonicalize_image_ref("docker.io/library/alpine:latest") == "docker.io/library/alpine:latest"


def test_canonicalize_bare_name_with_tag() -> None:
    assert canonicalize_image_ref("alpine:3.21") == "local://dirge-microvm:alpine:3.21"
    assert canonicalize_image_ref("debian:bookworm") == "local://dirge-microvm:debian:bookworm"


def test_local_variant_extraction() -> None:
    assert local_variant_name("local://dirge-microvm:debian") == "debian"
    assert local_variant_name("local://dirge-microvm:alpine") == "alpine"
    assert local_variant_name("docker.io/library/alpine:latest") is None
    assert local_variant_name("alpine") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("oci:demo", LayoutReference("demo")),
        ("oci:./rel/path:v1", LayoutReference("./rel/path", "v1")),
        ("oci:/abs/layout:latest", LayoutReference("/abs/layout", "latest")),
        ("alpine", LocalReference("dirge-microvm:alpine")),
        ("alpine:3.21", LocalReference("dirge-microvm:alpine:3.21")),
        ("local://myimage:tag", LocalReference("myimage:tag")),
        ("library/alpine", RegistryReference("docker.io", "library/alpine", "latest")),
        ("user/app:1.0", RegistryReference("docker.io", "user/app", "1.0")),
        ("docker.io/alpine", RegistryReference("docker.io", "library/alpine", "latest")),
        ("index.docker.io/library/python:3.12-slim", RegistryReference("docker.io", "library/python", "3.12-slim")),
        ("docker://ubuntu", RegistryReference("docker.io", "library/ubuntu", "latest")),
        ("ghcr.io/org/app@sha256:" + HEX, RegistryReference("ghcr.io", "org/app", None, parse_digest("sha256:" + HEX))),
        ("registry.internal:5000/team/img", RegistryReference("registry.internal:5000", "team/img", "latest")),
        ("localhost/img:t", RegistryReference("localhost", "img", "t")),
        ("127.0.0.1:5000/a/b:c@sha256:" + HEX,
         RegistryReference("127.0.0.1:5000", "a/b", "c", parse_digest("sha256:" + HEX))),
    ],
)
def test_parse(raw: str, expected: object) -> None:
    assert parse_reference(raw) == expected


def test_local_variant_property() -> None:
    ref = parse_reference("debian")
    assert isinstance(ref, LocalReference) and ref.variant == "debian"


@pytest.mark.parametrize(
    "raw, rule",
    [
        ("", "non-empty"),
        (" alpine", "white space"),
        ("oci:", "needs a path"),
        ("oci:dir:bad tag", "the tag after oci:PATH"),
        ("docker.io/Library/Alpine", "lowercase"),
        ("ghcr.io/org/app:bad!tag", "a tag must match"),
        ("ghcr.io/org/app@sha256:abc", "64 lowercase hex"),
        ("ghcr.io/org/app@sha256:" + "A" * 64, "lowercase hex"),
        ("ghcr.io/org/app@md5:" + "a" * 32, "algorithm 'md5'"),
        ("ghcr.io/org/app@sha256:../../../../etc/passwd", "hex"),
        ("ghcr.io/org/../app", "repository component '..'"),
        ("ftp://host/x", "unknown transport"),
        ("bad_host:99999x/repo", "registry host"),
    ],
)
def test_invalid(raw: str, rule: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse_reference(raw)
    assert rule in str(info.value) and repr(raw) in str(info.value)


def test_digest_validation() -> None:
    assert str(parse_digest("sha512:" + "b" * 128)) == "sha512:" + "b" * 128
    with pytest.raises(InvalidReference):
        parse_digest("sha256")
