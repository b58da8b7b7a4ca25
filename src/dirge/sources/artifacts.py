"""Prepared bases from OCI artifacts (the format: ``oci/artifact.py``): find an artifact of format F for
image manifest D in the repositories the caller trusts, download its one blob into the cache (resumable,
verified against its digest while streaming), and decompress it into a staging file whose sha256 and size
must equal the artifact's annotations.

    fetch_artifact(repos, D, F, ...) → FetchedArtifact | None

Finding: the referrers API (``GET /v2/<repo>/referrers/<D>?artifactType=…``) where the registry has it
(and lists one), else the referrers tag schema (``<repo>:sha256-<hex of D>``). Every candidate manifest
is fetched by digest (so its bytes are checked) and parsed strictly; one whose subject is not D, whose
writer version or options are not the ones this dirge would build with, whose sizes are out of bounds or
whose blob is damaged is skipped, and None (after one log line saying why) means: build from the layers. Nothing here trusts an artifact beyond its digests: the
repositories it is read from are the trust decision (docs/FLEET.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import DirgeError
from ..fsutil import pwrite_all, start_writeback
from ..oci.artifact import (Artifact, artifact_type, canonical_json, decompress_stream, parse_artifact,
                            referrers_from_index, referrers_tag)
from ..oci.reference import Digest, RegistryReference, parse_reference
from ..store.cache import Cache
from ..waits import checkpoint, waiting
from .auth import Credentials

if TYPE_CHECKING:  # registry.py loads httpx: imported when a fetch runs
    from .partial import PartialReader
    from .registry import RegistryClient

log = logging.getLogger("dirge.artifacts")

MAX_CANDIDATES = 16  # referrers tried per repository: a listing cannot make a prepare try forever
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchedArtifact:
    """An artifact written to ``path``, its bytes checked against the annotated sha256 and size."""

    repository: str  # REGISTRY/REPO it came from
    artifact: Artifact
    path: Path


def configured_repositories(explicit: list[str] | tuple[str, ...] | None, image: str) -> tuple[str, ...]:
    """The repositories to read artifacts for ``image`` from: ``explicit`` (--artifacts,
    ``prepare(artifacts=…)``) when given, else, for a registry image, the config's ``[fleet] artifacts``
    (an ``oci:`` layout or a local variant reads no config: its export or prepare never did). Only these are
    ever read (the trust decision)."""
    if explicit is not None:
        return tuple(explicit)
    if not isinstance(parse_reference(image), RegistryReference):
        return ()
    from ..config import load_config

    return load_config().fleet_artifacts


def repository_ref(repo: str) -> RegistryReference:
    """``REGISTRY/REPO`` (no tag, no digest) as a registry reference; DirgeError if it is not one."""
    ref = parse_reference(repo if "://" in repo else f"docker://{repo}")
    if not isinstance(ref, RegistryReference) or ref.digest is not None or (ref.tag not in (None, "latest")):
        raise DirgeError(f"artifact repository {repo!r}: give REGISTRY/REPO (no tag or digest), e.g. "
                         "registry.internal/dirge-bases")
    return ref


ClientFactory = Callable[[str], "RegistryClient"]


def _default_client(creds: Credentials | None) -> ClientFactory:
    from .registry import RegistryClient

    return lambda registry: RegistryClient(registry, creds=creds)


def fetch_artifact(repos: list[str] | tuple[str, ...], subject: Digest, fmt: str, *, writer_version: str,
                   options: dict[str, object], dest: Path, cache: Cache, creds: Credentials | None = None,
                   creds_registry: str | None = None, client: ClientFactory | None = None,
                   max_size: int | None = None) -> FetchedArtifact | None:
    """The first usable artifact of format ``fmt`` for ``subject`` in ``repos`` (in order), written to
    ``dest`` and checked; None (after one log line saying why) when there is none. ``creds`` (--creds) go
    only to ``creds_registry`` (the image's registry): a repository elsewhere uses its own auth files.
    ``max_size``: the largest image file accepted (a bound on the work an artifact can ask for)."""
    wanted = canonical_json(options).decode()
    reasons: list[str] = []
    for repo in repos:
        ref = repository_ref(repo)
        make = client or _default_client(creds if ref.registry == creds_registry else None)
        registry = make(ref.registry)
        try:
            found = _from_repository(registry, ref, repo, subject, fmt, writer_version, wanted, dest, cache,
                                     reasons, max_size)
        except DirgeError as exc:  # unreachable, refused, …: the layers remain
            reasons.append(f"{repo}: {exc}")
            found = None
        finally:
            registry.close()
        if found is not None:
            return found
    why = " ".join(("; ".join(reasons) if reasons else "none found").split())  # one line, whatever the errors said
    log.warning("dirge: no usable %s artifact for %s in %s (%s): converting from the layers", fmt, subject,
                ", ".join(repos), why[:1000])
    return None


def _from_repository(client: "RegistryClient", ref: RegistryReference, repo: str, subject: Digest, fmt: str,
                     writer_version: str, options: str, dest: Path, cache: Cache,
                     reasons: list[str], max_size: int | None) -> FetchedArtifact | None:
    from ..errors import NotFound

    kind = artifact_type(fmt)
    raw = client.fetch_referrers(ref, subject, kind)
    candidates = referrers_from_index(raw, f"{repo} (referrers API)", kind) if raw is not None else []
    if not candidates:
        # No referrers API, or none listed by it (a pusher that wrote only the tag, e.g. before the registry
        # gained the API): the referrers tag schema.
        try:
            raw, _, _ = client.fetch_manifest(ref, referrers_tag(subject))
        except NotFound:
            reasons.append(f"{repo}: no artifact for this image")
            return None
        candidates = referrers_from_index(raw, f"{repo}:{referrers_tag(subject)}", kind)
    if not candidates:
        reasons.append(f"{repo}: no {fmt} artifact for this image")
        return None
    for desc in reversed(candidates[-MAX_CANDIDATES:]):  # the newest (last added) first
        try:
            manifest, _, _ = client.fetch_manifest(ref, str(desc.digest))
            artifact = parse_artifact(manifest, f"{repo}@{desc.digest}")
            _check(artifact, subject, fmt, writer_version, options)
            if max_size is not None and artifact.size > max_size:
                raise DirgeError(f"its file is {artifact.size} bytes, over the {max_size} this prepare accepts")
            _download(client, ref, artifact, dest, cache)
            return FetchedArtifact(repo, artifact, dest)
        except DirgeError as exc:
            reasons.append(f"{repo}@{desc.digest.short}: {exc}")
            dest.unlink(missing_ok=True)
    return None


def _check(artifact: Artifact, subject: Digest, fmt: str, writer_version: str, options: str) -> None:
    if artifact.subject != subject:
        raise DirgeError(f"its subject is {artifact.subject}, not the image {subject}")
    if artifact.format != fmt:
        raise DirgeError(f"it is a {artifact.format} artifact, not {fmt}")
    if artifact.writer_version != writer_version:
        raise DirgeError(f"writer version {artifact.writer_version!r} is not this dirge's {writer_version!r}")
    # zstd never grows data by more than a few bytes a 128 KiB block (plus frame headers and the seek
    # table): a blob much larger than its annotated content is refused before a byte is downloaded
    if artifact.layer.size > artifact.size + artifact.size // 1024 + (1 << 16):
        raise DirgeError(f"its blob ({artifact.layer.size} bytes) is larger than zstd makes "
                         f"{artifact.size} bytes")
    got = artifact.annotations.get("dev.dirge.options", "{}")
    if got != options:
        raise DirgeError(f"options {got} are not the wanted {options}")


def _download(client: "RegistryClient", ref: RegistryReference, artifact: Artifact, dest: Path,
              cache: Cache) -> str:
    """The blob into the cache (resumable, digest-checked before it is published there) and, while it
    downloads, decompressed into ``dest`` (a reader follows the download, as layers are applied while they
    arrive), bounded by and checked against the annotated size and sha256; returns that sha256. ``dest``
    counts only once the download's digest matched too. The compressed blob is removed afterwards: the base
    is what stays."""
    from .partial import PartialBlob, StreamRestarted, sweep_orphans

    desc = artifact.layer
    sweep_orphans(cache.blobs_dir)  # a killed fetch's temp file (as a layer pull sweeps them)
    partial = PartialBlob(cache.blob_path(desc.digest), desc,
                          f"artifact blob {desc.digest.short} of {ref.registry}/{ref.repository}")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dirge-artifact") as pool:
        try:
            future = pool.submit(client.download_blob, ref, desc, cache, partial)
        except BaseException as exc:
            partial.fail(exc)
            raise
        try:
            for _ in range(3):  # a mirror's wrong bytes restart the download from the origin: start over
                reader = partial.reader()
                try:
                    sha = _decompress(reader, dest, artifact)
                    break
                except StreamRestarted:
                    continue
                finally:
                    reader.close()
            else:
                raise DirgeError(f"blob {desc.digest.short}: restarted too often")
            with waiting():
                future.result()  # the digest of every byte read above
        except BaseException:
            partial.abandon()  # stops the download at once; its temp file goes
            raise
        finally:
            cache.blob_path(desc.digest).unlink(missing_ok=True)
    return sha


_HOLE = 1 << 16  # all-zero runs of this size stay holes, as the image writers leave them
_ZEROS = bytes(_HOLE)


def _write_sparse(fd: int, data: bytes, at: int) -> None:
    """``data`` at offset ``at``, each run of pieces that are not all zeros in one write (an erofs image is
    one such run; an ext4 disk a few runs between holes)."""
    view = memoryview(data)
    start = None  # where the current run of data pieces began
    for off in range(0, len(data), _HOLE):
        n = min(_HOLE, len(data) - off)
        if data.startswith(_ZEROS if n == _HOLE else _ZEROS[:n], off):  # a memcmp, no copy
            if start is not None:
                pwrite_all(fd, view[start:off], at + start)
                start = None
        elif start is None:
            start = off
    if start is not None:
        pwrite_all(fd, view[start:], at + start)


def _decompress(reader: "BinaryIO | PartialReader", dest: Path, artifact: Artifact) -> str:
    """Into ``dest``, sparse: all-zero 64 KiB pieces are not written (an ext4 disk is mostly holes, and
    the writers leave them so too), then the size is set."""
    h = hashlib.sha256()
    written = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    # sha256 (which releases the GIL) runs in its own thread, one chunk behind: it overlaps decompressing
    # and writing the next chunk
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dirge-artifact-hash")
    hashing: Future[None] | None = None
    try:
        chunks: Iterator[bytes] = iter(lambda: reader.read(_CHUNK), b"")
        try:
            for data in decompress_stream(chunks, artifact.size):
                checkpoint()  # a cancelled aio call stops here
                if hashing is not None:
                    hashing.result()
                hashing = hasher.submit(h.update, data)
                _write_sparse(fd, data, written)
                start_writeback(fd, written, len(data))  # publishing syncs: most of it is on disk by then
                written += len(data)
        except ValueError as exc:
            raise DirgeError(f"blob {artifact.layer.digest.short}: {exc}") from None
        os.ftruncate(fd, written)  # no fsync: publishing the base syncs its filesystem once (syncfs)
        if hashing is not None:
            hashing.result()
    finally:
        hasher.shutdown(wait=True)
        os.close(fd)
    if written != artifact.size:
        raise DirgeError(f"decompressed to {written} bytes, the annotation says {artifact.size}")
    if f"sha256:{h.hexdigest()}" != str(artifact.sha256):
        raise DirgeError(f"decompressed sha256:{h.hexdigest()} is not the annotated {artifact.sha256}")
    return str(artifact.sha256)
