"""dirge's converted bases as OCI 1.1 artifacts: the manifest, its annotations, the referrers tag, and the
transport compression (zstd's seekable format). The format only; pushing and fetching live elsewhere.

An artifact for image manifest D in format F (``erofs`` or ``ext4``) is an OCI image manifest::

    artifactType  application/vnd.dirge.rootfs.F.v1
    config        the empty descriptor (application/vnd.oci.empty.v1+json, ``{}``)
    layers        [ the image file, zstd in independent frames of FRAME_SIZE bytes plus a seek table:
                    mediaType application/vnd.dirge.rootfs.F.v1+zstd ]
    subject       D's descriptor
    annotations   ANNOTATION_* below (the uncompressed sha256 and size, the source, the platform, the
                  writer's version, the options)

The manifest is canonical JSON (sorted keys, no spaces) with no timestamp, so one conversion pushed twice
is one manifest digest. A registry without the referrers API finds it through the referrers tag schema:
the tag ``sha256-<hex of D>`` names an index whose ``manifests`` list the referrers.

The seekable format (zstd's contrib/seekable_format): data frames, then one skippable frame (magic
0x184D2A5E) holding (compressed size, decompressed size) per frame and a footer (frame count, descriptor
byte, magic 0x8F92EAB1). Any zstd decoder skips that frame, so ``zstd -d`` reads the blob unchanged.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from ..errors import ImageError
from .image import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from .reference import Digest, parse_digest

FORMATS = ("erofs", "ext4")
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_DATA).hexdigest()

ANNOTATION_SHA256 = "dev.dirge.rootfs.sha256"          # sha256:<hex> of the uncompressed image file
ANNOTATION_SIZE = "dev.dirge.rootfs.size"              # its size in bytes (decimal)
ANNOTATION_SOURCE_REF = "dev.dirge.source.ref"         # the ref it was converted from, as given
ANNOTATION_SOURCE_DIGEST = "dev.dirge.source.digest"   # D, the image manifest's digest
ANNOTATION_PLATFORM = "dev.dirge.platform"             # os/arch[/variant]
ANNOTATION_WRITER = "dev.dirge.writer.version"         # the writer's output version (fsimage.*.WRITER_VERSION)
ANNOTATION_OPTIONS = "dev.dirge.options"               # canonical JSON of the writer's options
ANNOTATION_FRAME_SIZE = "dev.dirge.zstd.frame-size"    # uncompressed bytes per frame (the last may be less)

FRAME_SIZE = 4 << 20
ZSTD_LEVEL = 3
_SKIPPABLE_MAGIC = 0x184D2A5E
_SEEKABLE_MAGIC = 0x8F92EAB1
_ENTRY = struct.Struct("<II")
_FOOTER = struct.Struct("<IBI")
MAX_FRAMES = 1 << 22  # 16 TiB at 4 MiB a frame; a bound on the seek table a reader accepts


def artifact_type(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"artifact format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return f"application/vnd.dirge.rootfs.{fmt}.v1"


def layer_media_type(fmt: str) -> str:
    return artifact_type(fmt) + "+zstd"


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def referrers_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for ``subject`` (distribution-spec 1.1): ``<alg>-<hex>``."""
    return f"{subject.algorithm}-{subject.hex}"


def descriptor_json(desc: Descriptor, artifact: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": desc.media_type, "digest": str(desc.digest), "size": desc.size}
    if artifact:
        out["artifactType"] = artifact
    if desc.annotations:
        out["annotations"] = dict(desc.annotations)
    return out


@dataclass(frozen=True)
class Artifact:
    """A parsed dirge artifact manifest (see the module docstring)."""

    raw: bytes
    format: str
    layer: Descriptor
    subject: Digest
    sha256: Digest
    size: int
    platform: str | None
    writer_version: str
    frame_size: int
    annotations: dict[str, str]

    @property
    def digest(self) -> Digest:
        return parse_digest("sha256:" + hashlib.sha256(self.raw).hexdigest())


def artifact_manifest(fmt: str, layer: Descriptor, subject: Descriptor, *, sha256: Digest, size: int,
                      source_ref: str, platform: Platform | None, writer_version: str,
                      options: dict[str, Any], frame_size: int = FRAME_SIZE) -> bytes:
    """The manifest bytes (canonical JSON) of format ``fmt``'s artifact for ``subject``."""
    annotations = {
        ANNOTATION_SHA256: str(sha256),
        ANNOTATION_SIZE: str(size),
        ANNOTATION_SOURCE_REF: source_ref,
        ANNOTATION_SOURCE_DIGEST: str(subject.digest),
        ANNOTATION_WRITER: writer_version,
        ANNOTATION_OPTIONS: canonical_json(options).decode(),
        ANNOTATION_FRAME_SIZE: str(frame_size),
    }
    if platform is not None:
        annotations[ANNOTATION_PLATFORM] = str(platform)
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type(fmt),
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_DATA)},
        "layers": [descriptor_json(layer)],
        "subject": {"mediaType": subject.media_type, "digest": str(subject.digest), "size": subject.size},
        "annotations": annotations,
    })


def parse_artifact(raw: bytes, where: str) -> Artifact:
    """Parse and check a dirge artifact manifest; ImageError naming ``where`` on anything unexpected."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"parse artifact {where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("schemaVersion") != 2 or obj.get("mediaType") != OCI_MANIFEST:
        raise ImageError(f"parse artifact {where}: not an OCI image manifest")
    fmt = next((f for f in FORMATS if obj.get("artifactType") == artifact_type(f)), None)
    if fmt is None:
        raise ImageError(f"parse artifact {where}: artifactType {obj.get('artifactType')!r} is not a dirge rootfs")
    layers = obj.get("layers")
    if not isinstance(layers, list) or len(layers) != 1:
        raise ImageError(f"parse artifact {where}: expected exactly one layer")
    layer = Descriptor.from_json(layers[0], f"artifact {where} layer")
    if layer.media_type != layer_media_type(fmt):
        raise ImageError(f"parse artifact {where}: layer media type {layer.media_type!r}, "
                         f"expected {layer_media_type(fmt)!r}")
    subject = Descriptor.from_json(obj.get("subject"), f"artifact {where} subject")
    ann = obj.get("annotations")
    if not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values()):
        raise ImageError(f"parse artifact {where}: annotations must be an object of strings")
    try:
        sha = parse_digest(ann[ANNOTATION_SHA256])
        size = int(ann[ANNOTATION_SIZE])
        frame_size = int(ann[ANNOTATION_FRAME_SIZE])
        writer = ann[ANNOTATION_WRITER]
        if ann.get(ANNOTATION_SOURCE_DIGEST) not in (None, str(subject.digest)):
            raise ValueError(f"{ANNOTATION_SOURCE_DIGEST} is not the subject's digest")
    except KeyError as exc:
        raise ImageError(f"parse artifact {where}: annotation {exc.args[0]} is missing") from None
    except Exception as exc:  # a bad digest or number
        raise ImageError(f"parse artifact {where}: bad annotation ({exc})") from None
    if sha.algorithm != "sha256" or size < 0 or frame_size <= 0:
        raise ImageError(f"parse artifact {where}: bad sha256, size or frame size annotation")
    return Artifact(raw, fmt, layer, subject.digest, sha, size, ann.get(ANNOTATION_PLATFORM), writer,
                    frame_size, dict(ann))


def referrers_index(existing: bytes | None, manifest: Descriptor, artifact: str) -> bytes:
    """The referrers tag's index with ``manifest`` added (or kept, once) beside what ``existing`` lists."""
    entries: list[dict[str, Any]] = []
    if existing:
        try:
            obj = json.loads(existing)
            entries = [m for m in obj.get("manifests", []) if isinstance(m, dict)]
        except (ValueError, UnicodeDecodeError, AttributeError):
            entries = []  # an unreadable tag is replaced, as the spec's clients do
    entries = [m for m in entries if m.get("digest") != str(manifest.digest)]
    entries.append(descriptor_json(manifest, artifact))
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def referrers_from_index(raw: bytes, where: str, artifact: str | None = None) -> list[Descriptor]:
    """The descriptors a referrers response or referrers tag index lists (of ``artifact`` type if given)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"parse referrers {where}: not valid JSON ({exc})") from None
    items = obj.get("manifests") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise ImageError(f"parse referrers {where}: 'manifests' must be a list")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and (artifact is None or item.get("artifactType") == artifact):
            out.append(Descriptor.from_json(item, f"referrers {where} manifests[{i}]"))
    return out


# -- transport compression: zstd's seekable format ------------------------------------------------------


def compress_seekable(src: BinaryIO, dst: BinaryIO, frame_size: int = FRAME_SIZE,
                      level: int = ZSTD_LEVEL) -> list[tuple[int, int]]:
    """Copy ``src`` to ``dst`` as independent zstd frames of ``frame_size`` input bytes, then the seek
    table; returns the (compressed, decompressed) size of each frame."""
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
    frames: list[tuple[int, int]] = []
    while True:
        chunk = src.read(frame_size)
        if not chunk:
            break
        frame = cctx.compress(chunk)
        dst.write(frame)
        frames.append((len(frame), len(chunk)))
    dst.write(seek_table(frames))
    return frames


def seek_table(frames: list[tuple[int, int]]) -> bytes:
    body = b"".join(_ENTRY.pack(c, d) for c, d in frames) + _FOOTER.pack(len(frames), 0, _SEEKABLE_MAGIC)
    return struct.pack("<II", _SKIPPABLE_MAGIC, len(body)) + body


def read_seek_table(tail: bytes) -> list[tuple[int, int]]:
    """The frame table from the blob's last bytes (at least the whole seek table); ValueError if absent."""
    if len(tail) < _FOOTER.size:
        raise ValueError("too short for a seek table")
    count, descriptor, magic = _FOOTER.unpack_from(tail, len(tail) - _FOOTER.size)
    if magic != _SEEKABLE_MAGIC or count > MAX_FRAMES or descriptor & 0x7C:
        raise ValueError("no zstd seek table at the end")
    entry = _ENTRY.size + (4 if descriptor & 0x80 else 0)
    body = count * entry + _FOOTER.size
    start = len(tail) - body - 8
    if start < 0:
        raise ValueError("seek table truncated")
    magic, length = struct.unpack_from("<II", tail, start)
    if magic != _SKIPPABLE_MAGIC or length != body:
        raise ValueError("seek table frame header does not match")
    return [struct.unpack_from("<II", tail, start + 8 + i * entry) for i in range(count)]


class _Chunks:
    """A file-like reader over an iterator of byte chunks (what zstandard's stream_reader reads)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def read(self, n: int = -1) -> bytes:
        while not self._rest:
            try:
                self._rest = next(self._chunks)
            except StopIteration:
                return b""
        if n < 0 or n >= len(self._rest):
            out, self._rest = self._rest, b""
        else:
            out, self._rest = self._rest[:n], self._rest[n:]
        return out


OUTPUT_CHUNK = 1 << 20


def decompress_stream(chunks: Iterator[bytes], max_output: int) -> Iterator[bytes]:
    """Decompress a seekable (or any multi-frame) zstd stream chunk by chunk; skippable frames are
    ignored by zstd itself. Raises ValueError past ``max_output`` bytes (the annotated size).

    Output comes at most OUTPUT_CHUNK bytes at a time (a reader, not ``decompressobj``, which expands a
    whole input chunk at once: a few bytes of RLE blocks can be gigabytes), so the bound holds before the
    memory is spent; windows over 128 MiB are refused (zstd -19 --long uses 128 MiB at most)."""
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    total = 0
    try:
        with dctx.stream_reader(_Chunks(chunks),  # type: ignore[arg-type]  # duck-typed: read() only
                                 read_size=1 << 20, read_across_frames=True) as reader:
            while out := reader.read(OUTPUT_CHUNK):
                total += len(out)
                if total > max_output:
                    raise ValueError(f"decompresses to more than the annotated {max_output} bytes")
                yield out
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a valid zstd stream ({exc})") from None


def artifact_options(fmt: str, *, size: int | None = None, journal: bool = True,
                     inodes: int | None = None) -> dict[str, Any]:
    """The writer options an artifact of ``fmt`` carries (``ANNOTATION_OPTIONS``): what shapes the image
    file's bytes besides the image. erofs has none; an ext4 disk has its size, journal and inode count
    (None: automatic), as the base's ``image.json`` records them. A fetcher takes an artifact only when
    these equal the options it would build with."""
    if fmt == "erofs":
        return {}
    return {"inodes": inodes, "journal": journal, "size": size}
