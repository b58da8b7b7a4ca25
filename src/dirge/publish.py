"""``dirge push``: publish a converted base as an OCI 1.1 artifact, or a local variant's image, to a registry.

    push(IMAGE, DEST)          IMAGE's erofs base (or ext4 disk) as dirge's artifact (oci/artifact.py) in
                               DEST's repository: the empty config, one layer (the image file in zstd's
                               seekable format), ``subject`` = IMAGE's manifest; DEST's tag if it names one;
                               the referrers tag ``sha256-<hex>`` unless the registry keeps referrers itself
    push(NAME, DEST)           a local variant (any ``local://`` image): its OCI image, blobs then manifest

Blobs: HEAD first (present: nothing sent), then a cross-repository mount from a repository this cache
pushed the blob to before (``CACHE/pushed/``), else an upload: monolithic up to ``chunk_size``, chunked
(PATCH with Content-Range) above it, resumed from the registry's upload status (GET, ``Range``) after a
failed chunk, restarted when the registry lost the upload. Requests go to the origin (mirrors are for
pulls), with the auth, TLS and retry rules of pulls (sources/registry.py's Endpoint and RegistryClient).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlencode

import httpx

from .bases import ensure_disk
from .errors import DirgeError, RegistryError
from .fsimage import erofs as erofs_writer
from .fsimage import ext4 as ext4_writer
from .oci.artifact import (artifact_options, EMPTY_DATA, EMPTY_DIGEST, EMPTY_MEDIA_TYPE, FRAME_SIZE, artifact_manifest,
                           artifact_type, compress_seekable, layer_media_type, referrers_index,
                           referrers_from_index, referrers_tag)
from .oci.image import INDEX_TYPES, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST, Descriptor, Platform, parse_platform
from .oci.reference import Digest, LocalReference, RegistryReference, parse_digest, parse_reference
from .options import CacheLike, DiskKind, PlatformLike, PrepareOptions, PullPolicy, as_cache, as_platform
from .sources.open import open_image
from .sources.registry import RegistryClient, metadata_deadline, read_limited, retry_base
from .store.cache import Cache
from .store.lock import FileLock
from .events import ProgressFn, Push, emit
from .flatten import add_context
from .variants import build_variant

if TYPE_CHECKING:
    from .sources.auth import Credentials

CHUNK_SIZE = 16 << 20  # blobs up to this go in one PUT; bigger ones in PATCH chunks of this size
_MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX])


@dataclass
class PushResult:
    ref: str  # DEST as pushed: REGISTRY/REPO[:TAG]@DIGEST
    digest: str  # the pushed manifest's digest
    kind: str  # "artifact" or "image"
    format: str | None  # the artifact's format (erofs, ext4); None for an image
    subject: str | None  # the image manifest the artifact describes
    tag: str | None
    referrers: str | None  # "api" (the registry keeps referrers) or "tag" (the referrers tag written)
    blobs: dict[str, str] = field(default_factory=dict)  # digest → exists | mounted | uploaded
    bytes_sent: int = 0  # blob bytes the registry accepted, an abandoned upload's too (0: every blob was there)
    manifest_sent: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "digest": self.digest, "kind": self.kind, "format": self.format,
                "subject": self.subject, "tag": self.tag, "referrers": self.referrers, "blobs": self.blobs,
                "bytes_sent": self.bytes_sent, "manifest_sent": self.manifest_sent}


def push(image: str, dest: str, *, format: DiskKind | None = None, size: int | None = None, journal: bool = True,
         inodes: int | None = None, platform: PlatformLike | None = None, cache: CacheLike | None = None,
         pull: PullPolicy = "missing", creds: "Credentials | None" = None, chunk_size: int = CHUNK_SIZE,
         progress: ProgressFn | None = None) -> PushResult:
    """Push ``image``'s converted base (``format``: erofs, the default, or ext4 with ``size``, ``journal``,
    ``inodes``) as an artifact to ``dest`` (``REGISTRY/REPO[:TAG]``); a local image (a variant name,
    ``local://``) is pushed as itself and takes no format. ``creds`` are DEST's (else its auth files).
    ``progress`` gets the base's events, then Push events: blob bytes present in the registry of all."""
    dref, tag = _destination(dest)
    wanted = as_platform(platform)
    where = as_cache(cache) or Cache()
    is_local = isinstance(parse_reference(image), LocalReference)
    if is_local and (format is not None or size is not None or not journal or inodes is not None):
        raise DirgeError(f"push {image}: a local image is pushed as its OCI image; --format, --size, "
                         "--no-journal and --inodes are for converted bases of other images")
    if not is_local and format != "ext4" and (size is not None or not journal or inodes is not None):
        raise DirgeError(f"push {image}: --size, --no-journal and --inodes shape an ext4 disk; add --format ext4")
    client = RegistryClient(dref.registry, creds=creds)
    try:
        uploader = _Uploader(client, dref, where, chunk_size, progress)
        if is_local:
            return _push_image(image, dref, tag, wanted, where, pull, uploader)
        return _push_artifact(image, dref, tag, format or "erofs", size, journal, inodes, wanted, where, pull,
                              progress, uploader)
    except DirgeError as exc:
        raise add_context(exc, f"push {image} to {dest}") from exc.__cause__
    finally:
        client.close()


def _destination(dest: str) -> tuple[RegistryReference, str | None]:
    ref = parse_reference(dest)
    if not isinstance(ref, RegistryReference) or ref.digest is not None:
        raise DirgeError(f"push destination {dest!r}: give a registry repository, REGISTRY/REPO[:TAG] "
                         "(no digest: the registry names what is pushed)")
    explicit_tag = ":" in dest.split("://", 1)[-1].rsplit("/", 1)[-1]  # parse_reference fills in "latest"
    return ref, ref.tag if explicit_tag else None


def _push_artifact(image: str, dref: RegistryReference, tag: str | None, fmt: DiskKind, size: int | None,
                   journal: bool, inodes: int | None, platform: Platform | None, cache: Cache, pull: PullPolicy,
                   progress: ProgressFn | None, uploader: "_Uploader") -> PushResult:
    artifact = artifact_type(fmt) if fmt in ("erofs", "ext4") else None
    if artifact is None:
        raise DirgeError(f"artifact format {fmt!r}: choose erofs or ext4")
    options = PrepareOptions(platform=platform, pull=pull, disk=fmt, disk_size=size, disk_journal=journal,
                             disk_inodes=inodes)
    with ExitStack() as leases:  # the base file is read under its lease: gc leaves it alone meanwhile
        base = ensure_disk(image, options, cache=cache, progress=progress, leases=leases)
        raw = cache.get_blob(base.digest, None, MAX_MANIFEST_BYTES)
        if raw is None:
            raise DirgeError(f"the manifest {base.digest} of {image} is not in the cache; pull it again")
        subject = Descriptor(_media_type(raw), base.digest, len(raw))
        meta = json.loads((base.path / "image.json").read_text())
        plat = parse_platform(meta["platform"]) if meta.get("platform") else None
        key = f"push-{base.key}"
        with cache.base_lock(key, options.lock_timeout):  # one push of a base at a time; gc spares staging
            staging = cache.new_staging(key)
            try:
                writer = (erofs_writer if fmt == "erofs" else ext4_writer).WRITER_VERSION
                packed = _Packed(cache, base.key, base.image_file, staging / f"rootfs.{fmt}.zst", writer)
                layer = Descriptor(layer_media_type(fmt), packed.digest, packed.size)
                manifest = artifact_manifest(fmt, layer, subject, sha256=packed.plain_digest, size=packed.plain_size,
                                             source_ref=image, platform=plat, writer_version=writer,
                                             options=artifact_options(fmt, size=size, journal=journal, inodes=inodes))
                uploader.total = len(EMPTY_DATA) + layer.size
                uploader.put_blob(Descriptor(EMPTY_MEDIA_TYPE, parse_digest(EMPTY_DIGEST), len(EMPTY_DATA)),
                                  _bytes_opener(EMPTY_DATA))
                uploader.put_blob(layer, packed.open)
            finally:
                _remove(staging)
    digest, sent, api = uploader.put_manifest(manifest, OCI_MANIFEST, tag)
    result = _result(dref, tag, digest, "artifact", fmt, str(subject.digest), uploader, sent)
    desc = Descriptor(OCI_MANIFEST, digest, len(manifest))
    if api is None:
        api = uploader.referrers_api(subject.digest)
    result.referrers = "api" if api else "tag"
    if not api:
        uploader.add_referrer(subject.digest, desc, artifact)
    return result


def _push_image(image: str, dref: RegistryReference, tag: str | None, platform: Platform | None, cache: Cache,
                pull: PullPolicy, uploader: "_Uploader") -> PushResult:
    source, resolved = open_image(image, platform, cache=cache, pull=pull, build=build_variant)
    try:
        blobs = [resolved.manifest.config, *resolved.manifest.layers]
        uploader.total = sum(d.size for d in blobs)
        for desc in blobs:
            uploader.put_blob(desc, lambda desc=desc: source.open_blob(desc))  # type: ignore[misc]
    finally:
        source.close()
    digest, sent, _ = uploader.put_manifest(resolved.manifest.raw, resolved.manifest.media_type, tag)
    if digest != resolved.manifest_digest:
        raise RegistryError(f"the registry named the manifest {digest}, not {resolved.manifest_digest}")
    return _result(dref, tag, digest, "image", None, None, uploader, sent)


def _result(dref: RegistryReference, tag: str | None, digest: Digest, kind: str, fmt: str | None,
            subject: str | None, uploader: "_Uploader", sent: bool) -> PushResult:
    name = f"{dref.registry}/{dref.repository}" + (f":{tag}" if tag else "") + f"@{digest}"
    return PushResult(name, str(digest), kind, fmt, subject, tag, None, dict(uploader.actions), uploader.sent, sent)


def _media_type(raw: bytes) -> str:
    try:
        value = json.loads(raw).get("mediaType")
    except (ValueError, AttributeError):
        value = None
    return value if isinstance(value, str) else OCI_MANIFEST


def _remove(path: Path) -> None:
    from .fsutil import remove_tree

    remove_tree(path)


def _bytes_opener(data: bytes) -> Callable[[], BinaryIO]:
    import io

    return lambda: io.BytesIO(data)


class _Hashing:
    """A file wrapper that hashes (sha256) and counts what is read from or written to it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        self.size += len(data)
        return data

    def write(self, data: bytes) -> int:
        self._h.update(data)
        self.size += len(data)
        return self._f.write(data)

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self._h.hexdigest())


class _Packed:
    """A base file's transport blob (zstd seekable). Compressing costs ~0.2 s per 40 MB, so the blob's
    digest and size are remembered per base (bases never change once published) in
    ``CACHE/pushed/layers/<base key>.json``, and the blob is made again only when an upload needs its bytes
    (a registry that has the blob, or can mount it, needs none)."""

    def __init__(self, cache: Cache, key: str, image_file: Path, blob: Path, writer: str) -> None:
        self._source, self._blob = image_file, blob
        self._record = cache.root / "pushed" / "layers" / f"{key}.json"
        st = image_file.stat()
        # this very file (a base removed and rebuilt, by another writer version too, is another one)
        identity = {"frame_size": FRAME_SIZE, "writer": writer, "file": [st.st_ino, st.st_size, st.st_mtime_ns]}
        try:
            rec = json.loads(self._record.read_text())
            self.digest, self.size = parse_digest(rec["digest"]), int(rec["size"])
            self.plain_digest, self.plain_size = parse_digest(rec["sha256"]), int(rec["image_size"])
            if any(rec.get(k) != v for k, v in identity.items()):
                raise ValueError("another file")
        except (OSError, ValueError, KeyError, TypeError, DirgeError):
            self._compress()
            self._record.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
            tmp = self._record.with_name(f".{self._record.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"digest": str(self.digest), "size": self.size, "sha256": str(self.plain_digest),
                                       "image_size": self.plain_size, **identity}))
            os.replace(tmp, self._record)

    def _compress(self) -> None:
        with open(self._source, "rb") as src, open(self._blob, "wb") as dst:
            plain, packed = _Hashing(src), _Hashing(dst)
            compress_seekable(plain, packed, FRAME_SIZE)  # type: ignore[arg-type]
        self.digest, self.size = packed.digest, packed.size
        self.plain_digest, self.plain_size = plain.digest, plain.size

    def open(self) -> BinaryIO:
        if not self._blob.exists():
            expected = self.digest, self.plain_digest
            self._compress()
            if (self.digest, self.plain_digest) != expected:  # another zstd, or a damaged base
                self._record.unlink(missing_ok=True)
                raise DirgeError(f"compressing {self._source} again gave other bytes than the last push "
                                 f"({self.digest}, not {expected[0]}); push again (`dirge cache verify` checks the base)")
        return open(self._blob, "rb")


class _Restart(Exception):
    """The registry lost the upload session (404/400 on its status): start a new one."""


class _Uploader:
    """Blobs and manifests into one repository of one registry (see the module docstring)."""

    def __init__(self, client: RegistryClient, dref: RegistryReference, cache: Cache, chunk_size: int,
                 progress: ProgressFn | None) -> None:
        if chunk_size <= 0:
            raise DirgeError(f"push chunk size must be positive, not {chunk_size}")
        self.client, self.repo, self.cache = client, dref.repository, cache
        self.registry = dref.registry
        self.scope = f"repository:{self.repo}:pull,push"
        self.chunk_size = chunk_size
        self.progress = progress
        self.actions: dict[str, str] = {}
        self.sent = 0  # blob bytes the registry accepted from us
        self.done = 0  # blob bytes present (sent, mounted or already there): progress
        self.total = 0

    # -- where blobs were pushed before (mount sources), per registry ---------------------------------

    def _hints_path(self) -> Path:
        return self.cache.root / "pushed" / (hashlib.sha256(self.registry.encode()).hexdigest()[:32] + ".json")

    def _hints(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self._hints_path().read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember(self, digest: Digest) -> None:
        path = self._hints_path()
        path.parent.mkdir(mode=0o700, exist_ok=True)
        with FileLock(self.cache.lock_path("pushed-" + path.stem), 60.0):
            hints = self._hints()
            repos = [r for r in hints.get(str(digest), []) if r != self.repo]
            hints[str(digest)] = [self.repo, *repos][:8]  # newest first; a hint, not a record
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(hints))
            os.replace(tmp, path)

    # -- blobs ---------------------------------------------------------------------------------------

    def _what(self, digest: Digest) -> str:
        return f"blob {digest.short} to {self.registry}/{self.repo}"

    def _progress(self, n: int) -> None:
        self.done += n
        emit(self.progress, Push(f"{self.registry}/{self.repo}", self.done, self.total))

    def exists(self, digest: Digest) -> bool:
        what = self._what(digest)
        r = self.client.origin_call("HEAD", f"/v2/{self.repo}/blobs/{digest}", self.scope, what)
        if r.status_code in (200, 404):
            r.close()
            return r.status_code == 200
        raise self.client.error_for(r, what)

    def put_blob(self, desc: Descriptor, opener: Callable[[], BinaryIO]) -> str:
        """Make ``desc`` present in the repository; returns how (exists, mounted, uploaded)."""
        what = self._what(desc.digest)
        done = self.done
        for attempt in range(1, self.client.attempts + 1):
            try:
                action = self._put_once(desc, opener)
                break
            except _Restart:
                self.done = done  # progress starts this blob again (bytes_sent keeps what was sent)
                if attempt == self.client.attempts:
                    raise RegistryError(f"{what}: the registry lost the upload {attempt} times; try again later",
                                        retryable=True) from None
                time.sleep(retry_base() * attempt)
        self.actions[str(desc.digest)] = action
        if action != "exists":
            self._remember(desc.digest)
        else:
            self._progress(desc.size)
        return action

    def _put_once(self, desc: Descriptor, opener: Callable[[], BinaryIO]) -> str:
        if self.exists(desc.digest):
            return "exists"
        location = None
        for source in self._hints().get(str(desc.digest), []):
            if source == self.repo:
                continue
            location = self._start(desc.digest, source)
            if location is None:
                self._progress(desc.size)
                return "mounted"
            break  # a 202 is an upload session: use it
        if location is None:
            location = self._start(desc.digest, None)
            assert location is not None
        with opener() as f:
            if desc.size <= self.chunk_size:
                self._finish(location, desc, f.read(desc.size + 1))
            else:
                self._finish(self._chunks(location, desc, f), desc, b"")
        return "uploaded"

    def _start(self, digest: Digest, mount_from: str | None) -> str | None:
        """POST an upload (``mount_from``: try a mount first): its Location, or None when mounted (201)."""
        path, scope = f"/v2/{self.repo}/blobs/uploads/", self.scope
        if mount_from is not None:
            path += "?" + urlencode({"mount": str(digest), "from": mount_from})
            scope += f" repository:{mount_from}:pull"
        what = self._what(digest)
        r = self.client.origin_call("POST", path, scope, what, content=b"")
        if r.status_code == 201 and mount_from is not None:
            r.close()
            return None
        if r.status_code == 202 and r.headers.get("Location"):
            r.close()
            return self._absolute(r.headers["Location"])
        raise self.client.error_for(r, what)

    def _absolute(self, location: str) -> str:
        return str(httpx.URL(self.client.origin.url + "/").join(location))

    def _finish(self, location: str, desc: Descriptor, data: bytes) -> None:
        """The closing PUT (with the whole blob when monolithic)."""
        what = self._what(desc.digest)
        if len(data) > desc.size:
            raise DirgeError(f"{what}: the local blob is larger than its descriptor's {desc.size} bytes")
        url = str(httpx.URL(location).copy_merge_params({"digest": str(desc.digest)}))
        try:
            r = self.client.origin_call("PUT", url, self.scope, what, content=data,
                                        headers={"Content-Type": "application/octet-stream"})
        except RegistryError:
            if self.exists(desc.digest):  # the PUT landed; its answer did not
                self._count(len(data))
                return
            raise _Restart() from None
        if r.status_code == 201:
            r.close()
            self._count(len(data))
            return
        if r.status_code == 404 and self.exists(desc.digest):  # a retried PUT after one that landed
            r.close()
            self._count(len(data))
            return
        if r.status_code == 404:
            r.close()
            raise _Restart()
        raise self.client.error_for(r, what)

    def _count(self, n: int) -> None:
        self.sent += n
        if n:
            self._progress(n)

    def _chunks(self, location: str, desc: Descriptor, f: BinaryIO) -> str:
        """PATCH ``f`` in chunks from offset 0; after a failed chunk ask the registry where the upload is
        (GET, ``Range``) and go on from there. Returns the Location for the closing PUT."""
        what = self._what(desc.digest)
        offset, failures = 0, 0
        while offset < desc.size:
            f.seek(offset)
            chunk = f.read(min(self.chunk_size, desc.size - offset))
            if not chunk:
                raise DirgeError(f"{what}: the local blob ended at {offset} of {desc.size} bytes")
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
            try:
                r = self.client.origin_call("PATCH", location, self.scope, what, content=chunk, headers=headers,
                                            retry=False)
            except RegistryError:
                r = None
            if r is not None and r.status_code == 202 and r.headers.get("Location"):
                r.close()
                location = self._absolute(r.headers["Location"])
                end = _range_end(r.headers.get("Range"))
                new = end + 1 if end is not None else offset + len(chunk)
                self._count(new - offset)
                offset, failures = new, 0
                continue
            if r is not None and r.status_code not in (416, 429, 500, 502, 503, 504):
                if r.status_code in (400, 404):
                    r.close()
                    raise _Restart()
                raise self.client.error_for(r, what)
            if r is not None:
                r.close()
            failures += 1
            if failures >= self.client.attempts:
                raise RegistryError(f"{what}: chunk at byte {offset} kept failing; try again later",
                                    retryable=True)
            time.sleep(retry_base() * failures)
            location, new = self._status(location, what)
            self.done -= offset - new  # the registry kept less than it acknowledged: sent again
            offset = new
        return location

    def _status(self, location: str, what: str) -> tuple[str, int]:
        """Where an upload stands: (its Location, the offset it continues from). _Restart if it is gone."""
        r = self.client.origin_call("GET", location, self.scope, what)
        if r.status_code == 204:
            r.close()
            end = _range_end(r.headers.get("Range"))
            return self._absolute(r.headers.get("Location") or location), (end + 1 if end else 0)
        if r.status_code in (400, 404):
            r.close()
            raise _Restart()
        raise self.client.error_for(r, what)

    # -- manifests ------------------------------------------------------------------------------------

    def put_manifest(self, raw: bytes, media_type: str, tag: str | None) -> tuple[Digest, bool, bool | None]:
        """PUT the manifest under ``tag`` (else its digest) unless it is there already; returns its digest,
        whether it was sent, and whether the registry said it keeps referrers (``OCI-Subject``; None: not
        asked)."""
        digest = Digest("sha256", hashlib.sha256(raw).hexdigest())
        reference = tag or str(digest)
        what = f"manifest {digest.short} to {self.registry}/{self.repo}:{reference}"
        path = f"/v2/{self.repo}/manifests/{reference}"
        r = self.client.origin_call("HEAD", path, self.scope, what, headers={"Accept": _MANIFEST_ACCEPT + ", "
                                                                             + media_type})
        r.close()
        if r.status_code == 200 and r.headers.get("Docker-Content-Digest") == str(digest):
            return digest, False, None
        r = self.client.origin_call("PUT", path, self.scope, what, content=raw, headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise self.client.error_for(r, what)
        r.close()
        named = r.headers.get("Docker-Content-Digest")
        if named and named != str(digest):
            raise RegistryError(f"{what}: the registry named it {named}")
        return digest, True, "OCI-Subject" in r.headers

    def referrers_api(self, subject: Digest) -> bool:
        """Whether the registry answers the referrers API (GET /v2/NAME/referrers/D with an index)."""
        what = f"referrers of {subject.short} in {self.registry}/{self.repo}"
        r = self.client.origin_call("GET", f"/v2/{self.repo}/referrers/{subject}", self.scope, what,
                                    headers={"Accept": OCI_INDEX}, stream=True)
        r.close()
        return r.status_code == 200 and r.headers.get("Content-Type", "").split(";")[0].strip() in INDEX_TYPES

    def add_referrer(self, subject: Digest, desc: Descriptor, artifact: str) -> bool:
        """List ``desc`` in the referrers tag's index of ``subject`` (the tag schema); False if it was."""
        tag = referrers_tag(subject)
        what = f"referrers tag {tag} of {self.registry}/{self.repo}"
        path = f"/v2/{self.repo}/manifests/{tag}"
        r = self.client.origin_call("GET", path, self.scope, what, headers={"Accept": OCI_INDEX}, stream=True)
        existing: bytes | None = None
        if r.status_code == 200:
            existing = read_limited(r, MAX_MANIFEST_BYTES, time.monotonic() + metadata_deadline(), what,
                                    "referrers index")
            try:
                if any(d.digest == desc.digest for d in referrers_from_index(existing, what)):
                    return False
            except DirgeError:
                pass  # unreadable: replaced, as the spec's clients do
        elif r.status_code == 404:
            r.close()
        else:
            raise self.client.error_for(r, what)
        index = referrers_index(existing, desc, artifact)
        r = self.client.origin_call("PUT", path, self.scope, what, content=index, headers={"Content-Type": OCI_INDEX})
        if r.status_code != 201:
            raise self.client.error_for(r, what)
        r.close()
        return True


def _range_end(value: str | None) -> int | None:
    """The last byte of an upload's ``Range: 0-N`` (distribution writes 0-0 for an empty upload)."""
    if not value:
        return None
    start, _, end = value.removeprefix("bytes=").partition("-")
    if not start.isdigit() or not end.isdigit():
        return None
    return int(end) if int(end) > 0 else None
