"""Images in buildah's local storage (``local://NAME[:TAG]``), exported as OCI layouts into the cache.

dirge keeps its own buildah storage, ``CACHE/buildah`` with the vfs driver (it works everywhere, on any
filesystem, without fuse-overlayfs), unless ``$DIRGE_BUILDAH_ROOT`` (and ``$DIRGE_BUILDAH_DRIVER``) name
another. An image is exported once per image ID with ``buildah push --disable-compression ID oci:DIR``
into ``CACHE/exports/<id>`` (temp dir + rename, under a lock), then read like any OCI layout: the same
verified, whiteout-honouring applier as every other source. Readers hold the export's lock shared until
they close, so a rebuild retires the old image and export only after the last reader is done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from ..store.cache import Layout
from ..errors import BuildError, LockTimeout
from ..fsutil import syncfs
from ..oci.image import Descriptor
from ..store.lock import FileLock
from ..oci.reference import LayoutReference, LocalReference
from .layout import LayoutSource

INSTALL_HINT = "install buildah (Debian/Ubuntu: apt-get install buildah; Fedora: dnf install buildah)"
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_OUTPUT_TAIL = 6  # lines of buildah's output kept in an error message


@dataclass(frozen=True)
class LocalImage:
    id: str
    labels: dict[str, str]
    names: list[str]


class Buildah:
    """The buildah command line over one storage (root, runroot, driver)."""

    def __init__(self, cache_root: Path) -> None:
        self.cache_root = cache_root
        root = os.environ.get("DIRGE_BUILDAH_ROOT")
        layout = Layout(cache_root)
        self.root = Path(root) if root else layout.buildah_dir / "storage"
        self.runroot = layout.buildah_dir / "run" if not root else None
        self.driver = os.environ.get("DIRGE_BUILDAH_DRIVER", "vfs")

    def command(self, *args: str) -> list[str]:
        exe = shutil.which("buildah")
        if exe is None:
            raise BuildError(f"buildah is not installed; {INSTALL_HINT}")
        out = [exe, "--root", str(self.root), "--storage-driver", self.driver]
        if self.runroot is not None:
            out += ["--runroot", str(self.runroot)]
        return out + list(args)

    def _run(self, cmd: list[str], *, capture: bool, output: IO[str] | None = None) -> subprocess.CompletedProcess[Any]:
        # buildah stages layers in $TMPDIR (default /var/tmp): keep that inside the cache too.
        tmp = Layout(self.cache_root).buildah_dir / "tmp"
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "TMPDIR": str(tmp)}
            if capture:
                return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      errors="replace", env=env)
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env)
        except OSError as exc:
            raise BuildError(f"run buildah: {exc.filename or tmp}: {exc.strerror or exc}; check that "
                             f"{self.cache_root} is writable and {cmd[0]} can run") from exc

    def run(self, *args: str, what: str, hint: str, output: IO[str] | None = None) -> None:
        """Run buildah; its output goes to ``output`` if given, else its tail goes into the error."""
        proc = self._run(self.command(*args), capture=output is None, output=output)
        if proc.returncode != 0:
            said = "its output is above" if output is not None else _tail(proc)
            raise BuildError(f"{what}: buildah {args[0]} failed (exit {proc.returncode}): {said}; {hint}")

    def inspect(self, name: str) -> LocalImage | None:
        """The image ``name`` (or ID) in this storage, or None if buildah does not know it."""
        proc = self._run(self.command("inspect", "--type", "image", name), capture=True)
        if proc.returncode != 0:
            if "image not known" in proc.stderr or "no such image" in proc.stderr.lower():
                return None
            raise BuildError(f"inspect local image {name} in {self.root}: {_tail(proc)}; check the storage "
                             "($DIRGE_BUILDAH_ROOT, $DIRGE_BUILDAH_DRIVER must match how it was made)")
        try:
            info: dict[str, Any] = json.loads(proc.stdout)
            image_id = info["FromImageID"]
            labels = ((info.get("OCIv1") or {}).get("config") or {}).get("Labels") or {}
            names = str(info.get("FromImage") or "").split(",")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise BuildError(f"inspect local image {name}: unexpected buildah output ({exc})") from None
        if not isinstance(image_id, str) or not _IMAGE_ID.match(image_id):
            raise BuildError(f"inspect local image {name}: unexpected image ID {image_id!r}")
        return LocalImage(image_id, {str(k): str(v) for k, v in dict(labels).items()}, names)

    def remove(self, image_id: str) -> None:
        self._run(self.command("rmi", image_id), capture=True)

    def labelled(self, key: str, value: str) -> list[str]:
        """IDs of the images in this storage whose label ``key`` is ``value``."""
        proc = self._run(self.command("images", "--json", "--no-trunc", "--filter", f"label={key}={value}"),
                         capture=True)
        if proc.returncode != 0:
            raise BuildError(f"list images labelled {key}={value} in {self.root}: {_tail(proc)}")
        try:
            found = json.loads(proc.stdout or "[]") or []
            ids = [str(item["id"]).removeprefix("sha256:") for item in found]
        except (ValueError, KeyError, TypeError) as exc:
            raise BuildError(f"list images in {self.root}: unexpected buildah output ({exc})") from None
        return [i for i in ids if _IMAGE_ID.match(i)]


def _tail(proc: subprocess.CompletedProcess[Any]) -> str:
    """The last lines buildah printed, as one line (the CLI prints an error as one line)."""
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return " | ".join(lines[-_OUTPUT_TAIL:]) or "no output"


def export_image(buildah: Buildah, image: LocalImage, cache_root: Path, what: str) -> Path:
    """The OCI layout of ``image`` under the cache, exported once per image ID."""
    check_export_path(cache_root, what)
    try:
        return _export(buildah, image, cache_root, what)
    except OSError as exc:
        raise BuildError(f"export {what} to {exc.filename or Layout(cache_root).exports_dir}: {exc.strerror or exc}; "
                         f"check permissions and free space under {cache_root}") from exc


def check_export_path(cache_root: Path, what: str) -> None:
    """Refuse a cache path buildah cannot export to, before any build spends minutes on it."""
    if ":" in str(cache_root):  # containers/image splits oci:PATH:TAG at the first colon
        raise BuildError(f"export {what}: the cache path {cache_root} contains ':', which buildah's oci: "
                         "transport cannot name; use a cache directory without ':' (--cache-dir)")


def _export(buildah: Buildah, image: LocalImage, cache_root: Path, what: str) -> Path:
    exports = Layout(cache_root).exports_dir
    final = exports / image.id
    exports.mkdir(parents=True, exist_ok=True)
    if (final / "index.json").exists():
        return final
    with FileLock(_export_lock(cache_root, image.id)):
        if (final / "index.json").exists():
            return final
        _discard(final)  # a half-removed export
        # Left by a killed export of this image (we hold its lock), or by any killed retire (nobody
        # reads a trash directory; a live one being deleted at the same time is harmless).
        for leftover in [*exports.glob(f".{image.id[:16]}-*"), *exports.glob(".trash-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{image.id[:16]}-", dir=exports))
        try:
            # Uncompressed: the export never leaves this machine, and the applier then skips gunzip.
            try:
                buildah.run("push", "--quiet", "--disable-compression", image.id,
                            f"oci:{tmp / 'layout'}:latest", what=f"export {what}",
                            hint=f"check free space under {cache_root}")
            except BuildError:
                if buildah.inspect(image.id) is None:  # removed by a concurrent rebuild, not a disk problem
                    raise _replaced(f"export {what}", image) from None
                raise
            syncfs(tmp)  # durable before it is named: a crash must not leave a complete-looking torn export
            os.rename(tmp / "layout", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def retire_image(buildah: Buildah, cache_root: Path, image_id: str, timeout: float = 3600.0) -> None:
    """Remove a replaced image and its export, under its export lock: no export is cut in half, and
    none is removed while an ``ExportSource`` still reads it (it holds the lock shared)."""
    if _IMAGE_ID.match(image_id):
        with FileLock(_export_lock(cache_root, image_id), timeout):
            buildah.remove(image_id)
            _discard(Layout(cache_root).exports_dir / image_id)


def _export_lock(cache_root: Path, image_id: str) -> Path:
    return Layout(cache_root).lock_path(f"export-{image_id}")


def exports(cache_root: Path) -> list[Path]:
    """The published exports (``exports/<image id>``), not the temp or trash directories beside them."""
    directory = Layout(cache_root).exports_dir
    return sorted(p for p in directory.iterdir() if _IMAGE_ID.match(p.name)) if directory.is_dir() else []


def export_digests(path: Path) -> set[str]:
    """The manifest digests an export's ``index.json`` names (an unreadable one names none)."""
    try:
        index = json.loads((path / "index.json").read_text())
        return {m["digest"] for m in index.get("manifests", []) if isinstance(m.get("digest"), str)}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return set()


@contextmanager
def export_exclusive(cache_root: Path, image_id: str) -> Iterator[bool]:
    """The export's lock, exclusive, without waiting (gc, rmi): False while an export is being written
    or read. Held, the export may be removed with ``discard_export``."""
    lock = FileLock(_export_lock(cache_root, image_id), 0)
    try:
        lock.acquire()
    except LockTimeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def discard_export(cache_root: Path, image_id: str) -> None:
    """Remove an export (its lock held: ``export_exclusive``); the next read exports it again from
    buildah's storage."""
    _discard(Layout(cache_root).exports_dir / image_id)


def _discard(path: Path) -> None:
    """Rename away first, so no reader ever sees a half-deleted layout under the real name."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class ExportSource(LayoutSource):
    """An exported layout, read under a shared export lock so a rebuild cannot remove it mid-read."""

    def __init__(self, path: Path, lock: FileLock) -> None:
        self._lock = lock
        try:
            super().__init__(path)
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        self._lock.release()


def _open_export(buildah: Buildah, image: LocalImage, cache_root: Path, what: str) -> ExportSource:
    for _ in range(2):  # gc may remove an idle export between its check and our lock: export it again
        layout = export_image(buildah, image, cache_root, what)
        lock = FileLock(_export_lock(cache_root, image.id), shared=True)
        lock.acquire()
        if (layout / "index.json").exists():
            break
        lock.release()
    else:  # gone twice: a rebuild retired the image meanwhile
        raise _replaced(f"open {what}", image)
    try:
        os.utime(layout)  # its last use, for gc's least-recently-used order
    except OSError:
        pass
    return ExportSource(layout, lock)


def _replaced(what: str, image: LocalImage) -> BuildError:
    return BuildError(f"{what}: its image {image.id[:12]} was replaced by a rebuild meanwhile; run the "
                      "command again to use the new one")


class VariantBuilder(Protocol):
    """(variant name, cache root) → its current image, built first if missing or stale; ``offline``
    (``--pull never``): never build, and a variant not built or changed since is an error."""

    def __call__(self, name: str, cache_root: Path, *, offline: bool = False) -> LocalImage: ...


def open_local(ref: LocalReference, cache_root: Path, *, build: VariantBuilder | None = None,
               offline: bool = False) -> tuple[LayoutSource, Descriptor]:
    """A source and start descriptor for ``local://NAME``. A variant's image comes from ``build``
    (which builds it if missing or stale, unless ``offline``: then it only checks it is current): the
    variant builder sits above this module and is handed in, so sources never import it. Without
    ``build``, a variant is read as it is in the storage."""
    check_export_path(cache_root, str(ref))
    buildah = Buildah(cache_root)
    if ref.variant is not None and build is not None:
        image = build(ref.variant, cache_root, offline=offline)
    else:
        found = buildah.inspect(ref.name)
        if found is None:
            raise BuildError(
                f"open {ref}: no image {ref.name!r} in buildah storage {buildah.root}; build it there "
                f"(buildah --root {buildah.root} --storage-driver {buildah.driver} bud -t {ref.name} DIR) "
                "or point $DIRGE_BUILDAH_ROOT at the storage that has it")
        image = found
    source = _open_export(buildah, image, cache_root, str(ref))
    try:
        return source, source.select(LayoutReference(str(source.path), "latest"))
    except BaseException:
        source.close()
        raise
