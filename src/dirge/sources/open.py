"""Choosing the source a reference names, and reading an image's start from it.

    oci:PATH[:TAG]    → LayoutSource (sources/layout.py)
    HOST/REPO[:TAG]   → RegistrySource, its blobs kept in the cache (sources/registry.py)
    local://NAME      → ExportSource: a buildah image exported once into the cache (sources/buildah.py)

A variant (``local://debian``) is built by ``build``, which the caller hands in: the variant builder
(``variants.py``) sits above the sources, so no source imports it; with ``--pull never`` it builds nothing
and refuses a variant that is not built or changed since. Without ``build`` a variant's image is read as it
is in buildah's storage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import DirgeError
from ..events import ProgressFn, Step, downloads, emit
from ..oci.image import Descriptor, Platform
from ..oci.reference import LayoutReference, RegistryReference, parse_reference
from ..oci.resolve import BlobSource, Prefetching, ResolvedImage, resolve_manifest
from .layout import LayoutSource

if TYPE_CHECKING:
    from ..store.cache import Cache
    from .auth import Credentials, RegistryOptions
    from .buildah import VariantBuilder


PULL_POLICIES = ("always", "missing", "never")


def open_image(
    image: str,
    platform: Platform | None = None,
    *,
    cache: "Cache | None" = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
    registry_options: "RegistryOptions | None" = None,
    on_bytes: "Callable[[Descriptor, int], None] | None" = None,
    build: "VariantBuilder | None" = None,
) -> tuple[BlobSource, ResolvedImage]:
    """Resolve ``image`` to one manifest and config, from the source its reference names.

    Registry images keep their blobs in ``cache`` (the default cache if None); local variants are built
    by ``build`` (if missing or stale) and exported there too. The caller closes the source.
    """
    source, start, name = open_start(image, cache=cache, pull=pull, creds=creds, registry_options=registry_options,
                                    on_bytes=on_bytes, build=build)
    try:
        return source, resolve_manifest(source, start, name, platform)
    except BaseException:
        source.close()
        raise


def open_start(
    image: str,
    *,
    cache: "Cache | None" = None,
    pull: str = "missing",
    creds: "Credentials | None" = None,
    registry_options: "RegistryOptions | None" = None,
    on_bytes: "Callable[[Descriptor, int], None] | None" = None,
    build: "VariantBuilder | None" = None,
) -> tuple[BlobSource, Descriptor, str]:
    """The source of ``image``, the descriptor its reference names (an index or a manifest) and the
    canonical ref text, before any platform is chosen (``open_image``, ``inspect``). The caller closes
    the source."""
    if pull not in PULL_POLICIES:
        raise DirgeError(f"--pull must be one of {', '.join(PULL_POLICIES)}, not {pull!r}")
    ref = parse_reference(image)
    if isinstance(ref, LayoutReference):
        source = LayoutSource(ref.path)
        start = source.select(ref)
        if cache is not None:
            cache.record_ref(str(ref), start.digest)
        return source, start, str(ref)
    if isinstance(ref, RegistryReference):
        from ..store.cache import Cache
        from .registry import RegistryClient, RegistrySource, start_descriptor

        cache = cache or Cache()
        registry_ref = ref

        def make_client() -> RegistryClient:
            client = RegistryClient(registry_ref.registry, creds=creds, options=registry_options)
            client.on_bytes = on_bytes
            return client

        # Built only when a blob is missing (credential helpers run then); never with --pull never.
        registry_source = RegistrySource(make_client if pull != "never" else None, ref, cache)
        try:
            return registry_source, start_descriptor(ref, cache, registry_source.client, pull), str(ref)
        except BaseException:
            registry_source.close()
            raise
    from ..store.cache import Cache
    from .buildah import open_local

    cache = cache or Cache()
    # --pull never builds nothing (a build pulls its FROM images): a variant not built, or changed
    # since, is an error naming the command that builds it.
    local_source, local_start = open_local(ref, cache.root, build=build, offline=pull == "never")
    try:
        cache.record_ref(str(ref), local_start.digest)
    except BaseException:
        local_source.close()
        raise
    return local_source, local_start, str(ref)


def pull_image(image: str, platform: Platform | None = None, *, cache: "Cache | None" = None,
               pull: str = "always", creds: "Credentials | None" = None,
               registry_options: "RegistryOptions | None" = None,
               progress: ProgressFn | None = None,
               build: "VariantBuilder | None" = None) -> ResolvedImage:
    """Make sure the manifest, config and every layer blob of ``image`` are in the cache; ``progress``
    gets a Download event per chunk received (nothing for blobs already cached)."""
    source, resolved = open_image(image, platform, cache=cache, pull=pull, creds=creds,
                                  registry_options=registry_options, on_bytes=downloads(progress), build=build)
    try:
        layers = resolved.manifest.layers
        emit(progress, Step("pull", f"{resolved.manifest_digest.short}: {len(layers)} layers, "
                                    f"{sum(d.size for d in layers) / 1e6:.1f} MB"))
        if isinstance(source, Prefetching):
            source.prefetch(resolved.manifest.layers)
            source.wait()
        else:
            for desc in resolved.manifest.layers:
                source.open_blob(desc).close()
    finally:
        source.close()
    return resolved
