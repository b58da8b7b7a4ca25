"""The cache's check: whether every blob still hashes to its name and every base is still what its
record (``store/records.py``) says it was at publication.

``verify_cache`` rehashes every blob and checks every base against its record; ``repair`` removes what is
bad (under gc's locks and rules) so the next prepare rebuilds (or re-fetches) it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import LockTimeout
from .lifecycle import base_users, remove_base_dir
from .store.cache import Cache
from .store.records import hash_file, read_record, tree_entries


@dataclass
class Problem:
    kind: str  # "blob" or "base"
    name: str  # the blob digest or the base key
    what: str  # "corrupt", "missing", "changed", "extra", "truncated", "unrecorded"
    detail: str = ""


@dataclass
class VerifyReport:
    blobs: int = 0
    bases: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # bases without a record (an older dirge): not errors
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "blobs": self.blobs, "bases": self.bases,
                "problems": [asdict(p) for p in self.problems], "notes": [asdict(p) for p in self.notes],
                "repaired": self.repaired}


def check_blobs(cache: Cache) -> tuple[int, list[Problem]]:
    count, problems = 0, []
    for path in sorted(cache.blobs_dir.iterdir()):
        if path.name.startswith("."):
            continue  # a temp file of a writer (gc removes orphans)
        count += 1
        try:
            actual = hash_file(path)
        except OSError as exc:
            problems.append(Problem("blob", f"sha256:{path.name}", "corrupt", f"unreadable: {exc.strerror}"))
            continue
        if actual != path.name:
            problems.append(Problem("blob", f"sha256:{path.name}", "corrupt", f"content hashes to sha256:{actual}"))
    return count, problems


def missing_blobs(cache: Cache) -> list[Problem]:
    """The manifest and config blobs of every base (stored when it was made, kept by gc) that are gone;
    the next prepare of the image stores them again."""
    out = []
    for key in cache.base_keys():
        base = cache.load_base(key)
        if base is None:
            continue
        wanted = [str(base.digest)]
        try:
            manifest = json.loads(cache.blob_path(base.digest).read_bytes())
            if isinstance(manifest, dict) and isinstance(manifest.get("config"), dict):
                wanted.append(str(manifest["config"].get("digest")))
        except (OSError, ValueError):
            pass
        for digest in wanted:
            hex_digest = digest.removeprefix("sha256:")
            if len(hex_digest) == 64 and not (cache.blobs_dir / hex_digest).exists():
                out.append(Problem("blob", digest, "missing", f"of base {key}"))
    return out


def check_base(cache: Cache, key: str) -> list[Problem]:
    """What is wrong with base ``key`` against its record ([] if nothing; "unrecorded" if it has none)."""
    base = cache.load_base(key)
    if base is None:
        return [Problem("base", key, "corrupt", "no readable image.json")]
    record = read_record(cache, key)
    if record is None:
        return [Problem("base", key, "unrecorded", "no verify.json (published by an older dirge)")]
    if base.format == "tree":
        try:
            now = tree_entries(base.rootfs)
        except OSError as exc:
            return [Problem("base", key, "missing", f"rootfs unreadable: {exc.strerror}")]
        was: dict[str, Any] = record.get("entries") or {}
        out = []
        for path in sorted(set(was) - set(now)):
            out.append(Problem("base", key, "missing", path))
        for path in sorted(set(now) - set(was)):
            out.append(Problem("base", key, "extra", path))
        for path in sorted(set(was) & set(now)):
            if was[path] != now[path]:
                fields = sorted(k for k in set(was[path]) | set(now[path]) if was[path].get(k) != now[path].get(k))
                out.append(Problem("base", key, "changed", f"{path} ({', '.join(fields)})"))
        return out
    image = base.image_file
    try:
        size = image.stat().st_size
    except OSError:
        return [Problem("base", key, "missing", image.name)]
    if size != record.get("size"):
        what = "truncated" if size < int(record.get("size") or 0) else "changed"
        return [Problem("base", key, what, f"{image.name}: {size} bytes, recorded {record.get('size')}")]
    if hash_file(image) != record.get("sha256"):
        return [Problem("base", key, "changed", f"{image.name}: content differs from its record")]
    return []


def verify_cache(cache: Cache, repair: bool = False) -> VerifyReport:
    """Rehash every blob, check every base against its record; ``repair`` removes the bad ones (a bad
    base only while nothing holds its lease: one in use is reported and kept)."""
    report = VerifyReport()
    report.blobs, blob_problems = check_blobs(cache)
    report.problems.extend(blob_problems)
    report.problems.extend(missing_blobs(cache))
    for key in cache.base_keys():
        report.bases += 1
        for problem in check_base(cache, key):
            (report.notes if problem.what == "unrecorded" else report.problems).append(problem)
    if repair:
        for problem in report.problems:
            if problem.kind == "blob" and problem.what == "missing":
                continue  # nothing to remove: the next prepare stores it again
            if problem.kind == "blob":
                cache.blobs_dir.joinpath(problem.name.removeprefix("sha256:")).unlink(missing_ok=True)
                report.repaired.append(problem.name)
            elif problem.name not in report.repaired:
                try:
                    with cache.base_lease(problem.name, 0, shared=False), cache.base_lock(problem.name, 0):
                        if problem.name in base_users(cache):  # read under the lease, as gc does
                            continue  # a live session or a snapshot stands on it: kept, still reported
                        remove_base_dir(cache, problem.name)
                except LockTimeout:
                    continue  # in use right now: left for the next repair
                report.repaired.append(problem.name)
    return report
