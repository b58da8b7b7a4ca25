"""The cache's lifecycle: filling it (``pull``), what it holds (``images``), removing images (``rmi``) and
collecting garbage (``collect``, the ``gc`` command; ``gc``, its public face as ``dirge.gc``). The protocol (leases, who locks what) is in docs/ARCHITECTURE.md,
"Cache lifecycle: records, leases, gc".

gc's order: sessions whose owner is gone; leftovers of killed processes (staging directories whose base
lock is free, temp blobs no writer holds, trash, mounts nothing owns) and of ``dirge boot`` (initramfs
images of kernels gone or superseded, accelerator verdicts of kernels gone); blobs no ref record, base,
session, snapshot or running prepare reaches; then least-recently-used bases (and base disks) and
local variants' OCI exports until under the budget; still over it, the least-recently-used images left
with only ref records and blobs lose their records, and their blobs are swept. A base is removed only
under its lease and its build lock, both taken exclusively without waiting, and only if no live session
and no snapshot names it (read after the lease is taken); an export only under its export lock, taken
the same way (a prepare reading it holds it shared).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bases import unmount_base
from .events import ProgressFn
from .oci.resolve import ResolvedImage
from .options import CacheLike, PlatformLike, PullPolicy, as_cache, as_platform
from .store.cache import Cache
from .errors import DirgeError, LockTimeout
from .fsutil import mounts_under, remove_tree, unmount
from .oci.reference import canonicalize_image_ref
from .session import Sessions
from .sources.buildah import discard_export, export_digests, export_exclusive, exports
from .sources.open import pull_image
from .store.records import base_bytes, disk_usage
from .variants import build_variant

if TYPE_CHECKING:
    from .sources.auth import Credentials

TEMP_GRACE = 60.0  # seconds: a temp file or blob younger than this may be a writer's that is not yet locked/recorded
_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_JSON = 4 << 20


# -- the blob graph ----------------------------------------------------------------------------


def _blob_doc(cache: Cache, hex_digest: str) -> dict[str, Any] | None:
    path = cache.blobs_dir / hex_digest
    try:
        if path.stat().st_size > _MAX_JSON:
            return None
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _hex(digest: object) -> str | None:
    if isinstance(digest, str) and digest.startswith("sha256:") and _HEX.fullmatch(digest[7:]):
        return digest[7:]
    return None


def _children(doc: dict[str, Any]) -> list[str]:
    """The digests (hex) an index (its manifests) or a manifest (config, layers) names."""
    out: list[str] = []
    descs: list[Any] = list(doc.get("manifests") or []) + list(doc.get("layers") or [])
    if isinstance(doc.get("config"), dict):
        descs.append(doc["config"])
    for desc in descs:
        h = _hex(desc.get("digest")) if isinstance(desc, dict) else None
        if h:
            out.append(h)
    return out


def reachable(cache: Cache, roots: Iterable[str]) -> set[str]:
    """Every blob (hex) named, directly or through cached indexes and manifests, by ``roots`` (hex)."""
    seen: set[str] = set()
    todo = [r for r in roots if r]
    while todo:
        h = todo.pop()
        if h in seen:
            continue
        seen.add(h)
        doc = _blob_doc(cache, h)
        if doc is not None:
            todo.extend(_children(doc))
    return seen


def _blob_files(cache: Cache) -> dict[str, int]:
    out = {}
    for entry in os.scandir(cache.blobs_dir):
        if not entry.name.startswith("."):
            try:
                out[entry.name] = entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return out


def usage(cache: Cache) -> int:
    """What the budget counts: blobs, bases (and base disks) and local variants' exports (sessions and
    snapshots are their owners', not the cache's)."""
    return (sum(_blob_files(cache).values()) + sum(base_bytes(cache, k) for k in cache.base_keys())
            + sum(disk_usage(p) for p in exports(cache.root)))


def over_budget(cache: Cache, budget: int) -> bool:
    return usage(cache) > budget


# -- what the cache holds ----------------------------------------------------------------------


def _base_meta(cache: Cache, key: str) -> dict[str, Any]:
    try:
        meta = json.loads((cache.base_dir(key) / "image.json").read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class ImageInfo:
    digest: str
    refs: list[str] = field(default_factory=list)
    platform: str | None = None
    formats: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)
    bytes: int = 0  # its bases plus the blobs only it uses
    shared_bytes: int = 0  # blobs it shares with other images (counted here, and in each of them)
    created: float | None = None
    last_used: float | None = None
    live_sessions: list[str] = field(default_factory=list)
    ref_files: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)  # a local variant's OCI exports (image ids) holding it
    artifacts: list[str] = field(default_factory=list)  # REPO@DIGEST of prepared artifacts its bases came from


def images(cache: Cache) -> list[ImageInfo]:
    """Every cached image (a manifest digest with a base, or a ref record leading to a cached manifest)."""
    found: dict[str, ImageInfo] = {}

    def image(h: str) -> ImageInfo:
        return found.setdefault(h, ImageInfo(f"sha256:{h}"))

    for key in cache.base_keys():
        meta = _base_meta(cache, key)
        h = _hex(meta.get("digest"))
        if not h:
            continue
        info = image(h)
        info.bases.append(key)
        fmt = str(meta.get("format") or "tree")
        if fmt not in info.formats:
            info.formats.append(fmt)
        info.platform = info.platform or meta.get("platform")
        source = meta.get("source")
        if isinstance(source, dict) and source.get("from") == "artifact":  # what to audit: dirge verify-artifact
            info.artifacts.append(f"{source.get('repository')}@{source.get('artifact')}")
        if isinstance(meta.get("image"), str) and meta["image"] not in info.refs:
            info.refs.append(meta["image"])
        published = cache.base_dir(key) / "image.json"
        try:
            created = published.stat().st_mtime
            info.created = min(info.created or created, created)
        except OSError:
            pass
        used = cache.last_used(key)
        info.last_used = max(info.last_used or 0.0, used) or None
        info.bytes += base_bytes(cache, key)
    for path, record in cache.ref_records():
        h = _hex(record.get("digest"))
        if not h:
            continue
        doc = _blob_doc(cache, h)
        targets = [h]
        if doc is not None and "manifests" in doc:  # an index: the images are its manifests we hold
            targets = [c for c in _children(doc) if c in found or (cache.blobs_dir / c).exists()]
        elif doc is None and h not in found:
            targets = []  # neither a base nor a cached manifest: nothing of it is held
        for t in targets:
            info = image(t)
            if record.get("ref") not in info.refs:
                info.refs.append(str(record.get("ref")))
            info.ref_files.append(str(path))
            if isinstance(record.get("time"), (int, float)):
                info.created = min(info.created or record["time"], record["time"])
    for path in exports(cache.root):
        for digest in export_digests(path):
            h = _hex(digest)
            if h in found:  # an export of an image nothing else names is gc's to evict, not an image
                found[h].exports.append(path.name)
                found[h].bytes += disk_usage(path)
    blobs = _blob_files(cache)
    owners: dict[str, int] = {}
    per_image = {h: reachable(cache, [h]) & set(blobs) for h in found}
    for hs in per_image.values():
        for b in hs:
            owners[b] = owners.get(b, 0) + 1
    for h, hs in per_image.items():
        for b in hs:
            if owners[b] > 1:
                found[h].shared_bytes += blobs[b]
            else:
                found[h].bytes += blobs[b]
    for s in Sessions(cache).list():
        h = _hex(s.digest)
        if h in found and s.alive():
            found[h].live_sessions.append(s.id)
    return sorted(found.values(), key=lambda i: (i.refs[:1], i.digest))


# -- rmi ---------------------------------------------------------------------------------------


@dataclass
class RmiReport:
    images: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    bases: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)


def _match(name: str, all_images: list[ImageInfo]) -> list[ImageInfo]:
    wanted = name.removeprefix("sha256:")
    if re.fullmatch(r"[0-9a-f]{12,64}", wanted):
        hits = [i for i in all_images if i.digest[7:].startswith(wanted)]
        if hits:
            return hits
    names = {name}
    try:
        names.add(canonicalize_image_ref(name))
    except DirgeError:
        pass
    return [i for i in all_images if names & set(i.refs)]


@contextmanager
def _exclusive(cache: Cache, key: str) -> Iterator[bool]:
    """The base's lease and build lock, both exclusive, without waiting: yields False if either is busy."""
    with ExitStack() as stack:
        try:
            stack.enter_context(cache.base_lease(key, 0, shared=False))
            stack.enter_context(cache.base_lock(key, 0))
        except LockTimeout:
            yield False
            return
        yield True


def _live_base_refs(cache: Cache) -> set[str]:
    """Base keys live sessions and snapshots name."""
    return base_users(cache)


def rmi(cache: Cache, names: list[str], force: bool = False) -> RmiReport:
    """Remove images: their ref records, bases (erofs mounts first) and local variants' exports. Refused
    while live sessions use them unless ``force`` (then those sessions go first). Blobs are left to gc."""
    all_images = images(cache)
    chosen: dict[str, ImageInfo] = {}
    for name in names:
        hits = _match(name, all_images)
        if not hits:
            raise DirgeError(f"rmi {name}: no such image in the cache (see dirge images)")
        for hit in hits:
            chosen[hit.digest] = hit
    owner = {k: i.digest for i in chosen.values() for k in i.bases}
    export_owner = {e: i.digest for i in chosen.values() for e in i.exports}
    with ExitStack() as held:
        # Every base and export first, without waiting: one a running prepare holds refuses the whole
        # rmi before anything is removed, and no new session can start on them while this runs.
        for key in sorted(owner):
            if not held.enter_context(_exclusive(cache, key)):
                raise DirgeError(f"rmi {owner[key]}: base {key} is in use by a running prepare; nothing was "
                                 "removed; retry when it has finished")
        for image_id in sorted(export_owner):
            if not held.enter_context(export_exclusive(cache.root, image_id)):
                raise DirgeError(f"rmi {export_owner[image_id]}: its export {image_id[:12]} is being written or "
                                 "read by a running prepare; nothing was removed; retry when it has finished")
        sessions = Sessions(cache)
        users = [s for s in sessions.list() if s.base in owner and s.alive()]
        if users and not force:
            raise DirgeError(f"rmi: {len(users)} live session(s) use {', '.join(sorted(chosen))} "
                             f"({', '.join(s.id for s in users)}); remove them first or use --force")
        report = RmiReport(images=sorted(chosen))
        for s in sessions.list():
            if s.base in owner:  # live ones only with --force (checked above); dead ones are garbage anyway
                sessions.remove(s.id)
                report.sessions.append(s.id)
        named = set(names) | {r for i in chosen.values() for r in i.refs}
        ref_files = {f for i in chosen.values() for f in i.ref_files}
        ref_files |= {str(path) for path, record in cache.ref_records() if record.get("ref") in named}
        for ref_file in sorted(ref_files):  # what they resolved to, and what their names resolve to
            Path(ref_file).unlink(missing_ok=True)
            report.refs.append(ref_file)
        for key in sorted(owner):
            base = cache.load_base(key)
            if base is not None:
                unmount_base(base)
            remove_base_dir(cache, key)
            report.bases.append(key)
        for image_id in sorted(export_owner):
            discard_export(cache.root, image_id)
            report.exports.append(image_id)
    return report


# -- gc ----------------------------------------------------------------------------------------


@dataclass
class Removal:
    kind: str  # session, staging, temp, trash, export, mount, blob, base, ref, boot
    name: str
    bytes: int


@dataclass
class GcReport:
    dry_run: bool
    budget: int | None
    size_before: int = 0
    size_after: int = 0
    removed: list[Removal] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # busy or protected, with why

    def freed(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.removed:
            out[r.kind] = out.get(r.kind, 0) + r.bytes
        return out

    def as_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "budget": self.budget, "size_before": self.size_before,
                "size_after": self.size_after, "freed": self.freed(),
                "removed": [asdict(r) for r in self.removed], "skipped": self.skipped}


def _unlocked_and_old(path: Path, grace: float, now: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if now - os.fstat(fd).st_mtime < grace:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _evict_export(cache: Cache, image_id: str, report: GcReport, dry_run: bool) -> int:
    """A local variant's export, unless a prepare is writing or reading it: the bytes freed. The next
    prepare that needs it (its base gone too) exports it again from buildah's storage."""
    with export_exclusive(cache.root, image_id) as free:
        if not free:
            report.skipped.append(f"export {image_id[:12]}: being written or read")
            return 0
        size = disk_usage(cache.exports_dir / image_id)
        report.removed.append(Removal("export", image_id, size))
        if not dry_run:
            discard_export(cache.root, image_id)
        return size


def _old(path: Path, grace: float, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime >= grace
    except OSError:
        return False


def collect(cache: Cache, *, max_size: int | None = None, keep: float | None = None, dry_run: bool = False,
            grace: float = TEMP_GRACE) -> GcReport:
    """Collect the cache's garbage (module doc). ``max_size``: then evict least-recently-used bases and
    exports (then images that are only ref records and blobs) until the cache is at most that big;
    ``keep``: never evict one used within that many seconds (and with no ``max_size``, evict every one
    unused for longer). ``dry_run``: remove nothing, report the same."""
    report = GcReport(dry_run, max_size)
    report.size_before = usage(cache)
    run = _Run(cache, Sessions(cache), report, time.time(), grace, dry_run, max_size, keep)
    _remove_dead_sessions(run)
    _remove_leftovers(run)
    _sweep_blobs(cache, run.sessions, report, set(), grace, run.now, dry_run)  # blobs nothing reaches
    current = report.size_before - sum(r.bytes for r in report.removed if r.kind == "blob")
    base_used: dict[str, float] = {}  # digest (hex) → its bases' last use, as it was before the eviction
    if max_size is not None or keep is not None:
        base_used = _bases_last_used(cache)
        current = _evict_lru_bases(run, current)
    if max_size is not None and current > max_size:
        _evict_lru_refs(run, current, base_used)
    report.size_after = report.size_before if dry_run else usage(cache)
    return report


def gc(cache: CacheLike | None = None, *, max_size: int | None = None, keep: float | None = None,
       dry_run: bool = False, grace: float | None = None) -> GcReport:
    """Collect the cache's garbage (``dirge gc``): ``cache`` a directory or a Cache (None: the default);
    ``max_size`` a budget in bytes (least-recently-used bases, then images, go until the cache fits);
    ``keep`` seconds: spare what was used within them; ``dry_run``: report what would go, remove
    nothing; ``grace`` seconds a temp file must be old to count as a killed writer's (default 60)."""
    return collect(as_cache(cache) or Cache(), max_size=max_size, keep=keep, dry_run=dry_run,
                   grace=TEMP_GRACE if grace is None else grace)


def pull(image: str, platform: PlatformLike | None = None, *, cache: CacheLike | None = None,
         pull: PullPolicy = "always", creds: Credentials | None = None,
         progress: ProgressFn | None = None) -> ResolvedImage:
    """Fetch ``image`` (manifest, config and every layer) into ``cache`` (a directory or a Cache; None: the
    default) and return it resolved for ``platform`` ("os/arch[/variant]" or a Platform; None: the host's).
    ``pull``: "always" asks the registry for the tag, "missing" only when it is not cached, "never" stays
    offline. A local variant is built when missing or stale. ``progress`` gets a Download event per chunk."""
    return pull_image(image, as_platform(platform), cache=as_cache(cache) or Cache(), pull=pull, creds=creds,
                      progress=progress, build=build_variant)


@dataclass(frozen=True)
class _Run:
    """One ``collect``: what its phases share."""

    cache: Cache
    sessions: Sessions
    report: GcReport
    now: float
    grace: float
    dry_run: bool
    max_size: int | None
    keep: float | None


def _remove_dir(run: _Run, kind: str, name: str, entry: Path) -> None:
    """Report ``entry`` (a directory) and, unless a dry run, unmount what is mounted below it and remove it."""
    run.report.removed.append(Removal(kind, name, disk_usage(entry)))
    if not run.dry_run:
        for point in mounts_under(entry):
            unmount(point)
        remove_tree(entry)


def _remove_dead_sessions(run: _Run) -> None:
    """Phase 1: sessions whose owner is gone."""
    for s in run.sessions.list():
        if not s.alive():
            run.report.removed.append(Removal("session", s.id, disk_usage(run.sessions.session_dir(s.id))))
            if not run.dry_run:
                run.sessions.remove(s.id)


def _remove_leftovers(run: _Run) -> None:
    """Phase 2: what killed processes left: staging, temp files, half-made sessions, trash, temp exports,
    ``dirge boot``'s leftovers and mounts nothing owns."""
    cache, report, now = run.cache, run.report, run.now
    for entry in sorted(cache.staging_dir.iterdir()):
        if entry.name.startswith("."):
            continue  # a probe's temporary directory, removed by its own process
        key = entry.name.partition(".")[0]
        try:
            with cache.base_lock(key, 0):  # free: its builder is gone
                _remove_dir(run, "staging", entry.name, entry)
        except LockTimeout:
            report.skipped.append(f"staging {entry.name}: being built")
        except DirgeError:
            continue
    for directory, prefix in ((cache.blobs_dir, ".tmp-"), (cache.refs_dir, ".ref-")):
        for path in sorted(directory.glob(f"{prefix}*")):
            if _unlocked_and_old(path, run.grace, now):
                report.removed.append(Removal("temp", str(path.relative_to(cache.root)), disk_usage(path)))
                if not run.dry_run:
                    path.unlink(missing_ok=True)
    for entry in sorted(cache.sessions_dir.glob(".new-*")):  # a killed creator's, before its session was named
        if _old(entry, run.grace, now):
            _remove_dir(run, "staging", f"sessions/{entry.name}", entry)
    if cache.trash_dir.exists():
        for entry in sorted(cache.trash_dir.iterdir()):
            _remove_dir(run, "trash", entry.name, entry)
    for entry in sorted(cache.exports_dir.glob(".*")) if cache.exports_dir.exists() else []:
        # sources/buildah.py's temp exports (.<id16>-*: free once no export of that id holds its lock)
        # and retired exports being deleted (.trash-*: nobody reads them)
        if not entry.name.startswith(".trash-") and any(
                not _unlocked_and_old(lock, 0, now) for lock in cache.locks_dir.glob(f"export-{entry.name[1:17]}*.lock")):
            report.skipped.append(f"export {entry.name}: being written")
            continue
        report.removed.append(Removal("export", entry.name, disk_usage(entry)))
        if not run.dry_run:
            remove_tree(entry)
    _boot_leftovers(cache, report, run.grace, now, run.dry_run)
    _remove_stale_mounts(run)


def _remove_stale_mounts(run: _Run) -> None:
    """Mounts under ``sessions/<id>`` without a session.json, or ``bases/<key>`` without an image.json."""
    cache = run.cache
    root = cache.root.resolve()
    for point in mounts_under(cache.root):
        rel = point.relative_to(root).parts if point.is_relative_to(root) else ()
        stale = (len(rel) >= 2 and rel[0] == "sessions" and not (cache.sessions_dir / rel[1] / "session.json").exists()) \
            or (len(rel) >= 2 and rel[0] == "bases" and cache.load_base(rel[1]) is None)
        if stale:
            run.report.removed.append(Removal("mount", str(point), 0))
            if not run.dry_run:
                unmount(point)


def _bases_last_used(cache: Cache) -> dict[str, float]:
    """Each image's (digest hex) bases' last use, the latest of them."""
    used: dict[str, float] = {}
    for key in cache.base_keys():
        h = _hex(_base_meta(cache, key).get("digest")) or ""
        used[h] = max(used.get(h, 0.0), cache.last_used(key))
    return used


def _evict_lru_bases(run: _Run, current: int) -> int:
    """Phase 4: least-recently-used bases (and base disks) and local variants' exports, until ``current``
    (the cache's bytes) is under the budget (or, with only ``keep``, every one unused for longer). Each
    base's blobs that nothing reaches any more go with it. Returns the bytes left."""
    cache, report = run.cache, run.report
    candidates = [(cache.last_used(key), "base", key) for key in cache.base_keys()]
    candidates += [(_mtime(path), "export", path.name) for path in exports(cache.root)]
    for used, kind, name in sorted(candidates):
        if run.max_size is not None and current <= run.max_size:
            break
        if run.keep is not None and run.now - used < run.keep:
            continue
        if kind == "export":
            current -= _evict_export(cache, name, report, run.dry_run)
            continue
        freed = _evict_base(run, name)
        if freed is None:
            continue
        current -= freed
        # an image with no ref record (prepared by digest) leaves blobs nothing reaches: counted free
        current -= _sweep_blobs(cache, run.sessions, report, set(), run.grace, run.now, run.dry_run)
    return current


def _evict_base(run: _Run, key: str) -> int | None:
    """Base ``key``, unless a prepare holds it or a live session or snapshot names it (None): the bytes freed."""
    cache, report = run.cache, run.report
    with _exclusive(cache, key) as free:
        if not free:
            report.skipped.append(f"base {key}: in use by a running prepare")
            return None
        if key in _live_base_refs(cache):  # read under the lease: no new session can appear now
            report.skipped.append(f"base {key}: used by a live session or a snapshot")
            return None
        size = base_bytes(cache, key)
        report.removed.append(Removal("base", key, size))
        if not run.dry_run:
            base = cache.load_base(key)
            if base is not None:
                unmount_base(base)
            remove_base_dir(cache, key)
        return size


def _evict_lru_refs(run: _Run, current: int, base_used: dict[str, float]) -> None:
    """Phase 5, still over the budget: least-recently-used images that have nothing left but ref records
    and blobs (no base, export, live session, snapshot or running prepare) lose their refs, then their
    blobs. ``base_used``: the bases' last uses from before phase 4 (a dry run's are the same)."""
    cache, sessions, report, max_size = run.cache, run.sessions, run.report, run.max_size
    assert max_size is not None
    gone = {r.name for r in report.removed if r.kind in ("base", "export")}
    ref_times = {str(path): float(record["time"]) for path, record in cache.ref_records()
                 if isinstance(record.get("time"), (int, float))}
    snapshots = {_hex(m.get("digest")) for m in sessions.snapshot_list()}
    reaching: dict[str, list[ImageInfo]] = {}
    for info in images(cache):
        for ref_file in info.ref_files:
            reaching.setdefault(ref_file, []).append(info)

    def last_use(ref_file: str) -> float:
        return max([ref_times.get(ref_file, 0.0)] + [base_used.get(i.digest[7:], 0.0) for i in reaching[ref_file]])

    skip: set[str] = set()
    for ref_file in sorted(reaching, key=last_use):
        if current <= max_size:
            break
        if (run.keep is not None and run.now - last_use(ref_file) < run.keep) or not _old(Path(ref_file), run.grace,
                                                                                            run.now):
            continue  # (a record just written may be a starting prepare's, not yet under its lease)
        roots, leased = _roots(cache, sessions, report, skip | {ref_file})  # leases as they are now
        pinned = snapshots | leased
        if not all((set(i.bases) | set(i.exports)) <= gone and not i.live_sessions and i.digest[7:] not in pinned
                   for i in reaching[ref_file]):
            continue
        freeable = _unreached(cache, roots, report, run.grace, run.now)
        if not freeable:
            continue  # its blobs are shared or too young: removing the record would free nothing
        skip.add(ref_file)
        report.removed.append(Removal("ref", Path(ref_file).name, disk_usage(Path(ref_file))))  # (not budgeted)
        if not run.dry_run:
            Path(ref_file).unlink(missing_ok=True)
        current -= _remove_blobs(cache, freeable, report, run.dry_run)


MODULES_ROOT = Path("/lib/modules")  # where an installed kernel keeps its modules (vm/initramfs's Kernel)


def _boot_leftovers(cache: Cache, report: GcReport, grace: float, now: float, dry_run: bool) -> None:
    """``dirge boot``'s cache: temp files of killed writers; initramfs images of kernels no longer
    installed, or superseded (same kernel and root kind, older: busybox or the modules changed since);
    accelerator verdicts for kernels no longer there. Each is rebuilt when next needed."""
    if not cache.boot_dir.is_dir():
        return
    from .vm.bootcache import BootCache  # here: importing vm/ loads the boot machinery, needed only now

    stale = [("temp", p) for p in sorted(cache.boot_dir.glob(".*")) if p.is_file() and _old(p, grace, now)]
    newest: dict[tuple[str, str], Path] = {}
    for path, release, kind in BootCache(cache.root).initramfs_images():
        if not (MODULES_ROOT / release).is_dir():
            stale.append(("boot", path))
            continue
        best = newest.setdefault((release, kind), path)
        if best != path:
            older, newer = sorted((best, path), key=_mtime)
            newest[(release, kind)] = newer
            stale.append(("boot", older))
    for path in sorted(cache.boot_dir.glob("accel-*.json")):
        try:
            kernel = json.loads(path.read_text()).get("kernel")
        except (OSError, ValueError, AttributeError):
            kernel = None
        if not isinstance(kernel, str) or not Path(kernel).exists():
            stale.append(("boot", path))
    for kind, path in stale:
        report.removed.append(Removal(kind, str(path.relative_to(cache.root)), disk_usage(path)))
        if not dry_run:
            path.unlink(missing_ok=True)


def _roots(cache: Cache, sessions: Sessions, report: GcReport, skip_refs: set[str]) -> tuple[set[str], set[str]]:
    """The manifest digests (hex) the cache's blobs are kept for: ref records (but ``skip_refs``), bases,
    sessions, snapshots and running prepares (held leases); and the last of those alone. What ``report``
    already removed is left out, so a dry run reaches what the real run then does."""
    removed = {(r.kind, r.name) for r in report.removed}
    roots: set[str] = set()
    for path, record in cache.ref_records():
        if str(path) not in skip_refs:
            roots.add(_hex(record.get("digest")) or "")
    for key in cache.base_keys():
        if ("base", key) not in removed:
            roots.add(_hex(_base_meta(cache, key).get("digest")) or "")
            roots.add(key[:64])
    for s in sessions.list():
        if ("session", s.id) not in removed:
            roots.add(_hex(s.digest) or "")
    for m in sessions.snapshot_list():
        roots.add(_hex(m.get("digest")) or "")
    leased: set[str] = set()
    for lease in cache.locks_dir.glob("*.lease"):  # a running prepare's image, even if its ref just went
        try:
            with cache.base_lease(lease.name.removesuffix(".lease"), 0, shared=False):
                pass
        except LockTimeout:
            leased.add(lease.name[:64])
        except DirgeError:
            continue
    return roots | leased, leased


def _unreached(cache: Cache, roots: set[str], report: GcReport, grace: float, now: float) -> dict[str, int]:
    """The blobs (hex → bytes) ``roots`` do not reach, that no writer may still record (the grace period)
    and that ``report`` has not removed already."""
    done = {r.name for r in report.removed if r.kind == "blob"}
    keep_blobs = reachable(cache, roots)
    return {h: size for h, size in sorted(_blob_files(cache).items())
            if h not in keep_blobs and f"sha256:{h}" not in done and _unlocked_and_old(cache.blobs_dir / h, grace, now)}


def _remove_blobs(cache: Cache, blobs: dict[str, int], report: GcReport, dry_run: bool) -> int:
    for h, size in blobs.items():
        report.removed.append(Removal("blob", f"sha256:{h}", size))
        if not dry_run:
            (cache.blobs_dir / h).unlink(missing_ok=True)
    return sum(blobs.values())


def _sweep_blobs(cache: Cache, sessions: Sessions, report: GcReport, skip_refs: set[str], grace: float, now: float,
                 dry_run: bool) -> int:
    """Remove (report) the blobs nothing but ``skip_refs`` reaches; returns the bytes."""
    roots, _ = _roots(cache, sessions, report, skip_refs)
    return _remove_blobs(cache, _unreached(cache, roots, report, grace, now), report, dry_run)


# Removing a base and finding who stands on one: gc's, also used by ``cache verify --repair`` under the
# same locks and rules.


def remove_base_dir(cache: Cache, key: str) -> None:
    """Unmount (lazily if busy) and remove base ``key``: renamed into trash first, so it is gone at once."""
    path = cache.base_dir(key)
    if not path.exists():
        return
    for point in mounts_under(path):
        unmount(point)
    trash = cache.new_trash(key)
    os.rename(path, trash / "base")
    remove_tree(trash)


def base_users(cache: Cache) -> set[str]:
    """Base keys that live sessions and snapshots name."""
    sessions = Sessions(cache)
    return {x.base for x in sessions.list() if x.alive()} | {str(m.get("base")) for m in sessions.snapshot_list()}
