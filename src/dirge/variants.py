"""Local image variants: ``images/NAME/Dockerfile`` built with buildah as ``dirge-microvm:NAME``.

Variants are looked up in ``$DIRGE_IMAGES_PATH`` (colon-separated), then ``~/.config/dirge/images``
(``$XDG_CONFIG_HOME/dirge/images``), then the ones shipped in this package; the first directory that has
``NAME/Dockerfile`` wins. The build context is the variant's own directory.

A built image carries the label ``dev.dirge.variant-hash``: a hash over every file of the variant
directory (paths, modes, contents, symlink targets), and ``dev.dirge.build-args``, a hash of the build
arguments. A variant is current when its image's hash label equals the hash of the directory now (and,
when build arguments are asked for, its args label matches them); otherwise it is rebuilt, once, under
a lock: concurrent prepares of an unbuilt variant build it once, the rest wait and reuse it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .store.cache import Layout
from .errors import BuildError, DirgeError, InvalidReference
from .store.lock import FileLock
from .oci.reference import VARIANT_PREFIX, Reference, parse_reference
from .sources.buildah import Buildah, LocalImage, retire_image

HASH_LABEL = "dev.dirge.variant-hash"
ARGS_LABEL = "dev.dirge.build-args"
VARIANT_LABEL = "dev.dirge.variant"
BUILTIN_DIR = Path(__file__).parent / "images"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")  # also a valid image tag
_HASH_VERSION = b"dirge-variant-hash-1\0"


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path  # the variant directory (build context)
    origin: str  # "built-in", or the search directory it came from

    @property
    def dockerfile(self) -> Path:
        return self.path / "Dockerfile"

    @property
    def tag(self) -> str:
        return f"{VARIANT_PREFIX[len('local://'):]}{self.name}"


@dataclass(frozen=True)
class BuildResult:
    variant: Variant
    image: LocalImage
    built: bool  # False when the existing image was current


def search_dirs() -> list[tuple[Path, str]]:
    """Where variants are looked up, first match wins: (directory, origin label)."""
    dirs = [Path(p) for p in os.environ.get("DIRGE_IMAGES_PATH", "").split(":") if p]
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    dirs.append(Path(config) / "dirge" / "images")
    return [(d, str(d)) for d in dirs] + [(BUILTIN_DIR, "built-in")]


def list_variants() -> list[Variant]:
    """Every variant that can be built, the winning one per name, sorted by name."""
    found: dict[str, Variant] = {}
    for directory, origin in search_dirs():
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _NAME.match(entry.name) and entry.name not in found and _has_dockerfile(entry, strict=False):
                found[entry.name] = Variant(entry.name, entry, origin)
    return sorted(found.values(), key=lambda v: v.name)


def _has_dockerfile(directory: Path, *, strict: bool) -> bool:
    """Whether directory/Dockerfile is a file; an unreadable one is an error when ``strict``, else absent."""
    try:
        return (directory / "Dockerfile").is_file()
    except OSError as exc:  # is_file() lets EACCES through
        if not strict:
            return False
        raise BuildError(f"read variant at {directory}: {exc.strerror or exc}; make it readable or remove "
                         "it from the variant search path") from exc


def find_variant(name: str) -> Variant:
    if _NAME.match(name):
        for directory, origin in search_dirs():
            if _has_dockerfile(directory / name, strict=True):
                return Variant(name, directory / name, origin)
    known = ", ".join(v.name for v in list_variants()) or "none"
    where = ", ".join(str(d) for d, _ in search_dirs())
    raise BuildError(
        f"no Dockerfile found for variant '{name}' (looked in {where}); known variants: {known}; "
        "for a registry image use a full reference such as docker.io/library/debian:bookworm-slim")


def variant_hash(variant: Variant) -> str:
    """A digest of the variant directory: paths, modes, contents, symlink targets (never followed)."""
    try:
        return _hash_tree(variant.path)
    except OSError as exc:
        raise BuildError(f"read variant '{variant.name}' at {exc.filename or variant.path}: "
                         f"{exc.strerror or exc}; make its files readable") from exc


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256(_HASH_VERSION)
    for path in sorted(_walk(root)):
        rel = path.relative_to(root).as_posix().encode()
        st = path.lstat()
        h.update(b"%s\0%o\0" % (rel, st.st_mode))
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(path).encode() + b"\0")
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def args_hash(build_args: Mapping[str, str]) -> str:
    h = hashlib.sha256(_HASH_VERSION)
    for key, value in sorted(build_args.items()):
        h.update(b"%s\0%s\0" % (key.encode(), value.encode()))
    return h.hexdigest()


def is_current(image: LocalImage | None, variant: Variant, build_args: Mapping[str, str] | None) -> bool:
    """Built from this directory (and, if ``build_args`` is given, with exactly these arguments)."""
    if image is None or image.labels.get(HASH_LABEL) != variant_hash(variant):
        return False
    return build_args is None or image.labels.get(ARGS_LABEL) == args_hash(build_args)


def _walk(root: Path) -> Iterable[Path]:
    def fail(exc: OSError) -> None:  # an unreadable directory must not drop out of the hash silently
        raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def dockerfile_bases(dockerfile: Path, build_args: Mapping[str, str] | None = None) -> list[Reference]:
    """The images the Dockerfile's ``FROM`` lines name (ARGs substituted; stages and scratch skipped)."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    bases: list[Reference] = []
    seen_from = False
    try:
        text = dockerfile.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"read {dockerfile}: {getattr(exc, 'strerror', None) or exc}; make it a readable "
                         "UTF-8 file") from exc
    for instruction, rest in _instructions(text):
        if instruction == "ARG" and not seen_from:  # only ARGs before the first FROM apply to FROM
            try:
                pairs = shlex.split(rest)
            except ValueError as exc:
                raise BuildError(f"parse {dockerfile}: ARG {rest}: {exc}; fix the quoting") from None
            for pair in pairs:
                name, _, default = pair.partition("=")
                args[name] = (build_args or {}).get(name, default)
        elif instruction == "FROM":
            seen_from = True
            words = [w for w in rest.split() if not w.startswith("--")]
            if not words:
                raise BuildError(f"parse {dockerfile}: FROM without an image")
            image = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)",
                           lambda m: args.get(m[1] or m[3], "") or (m[2] or ""), words[0])
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() in stages or image == "scratch":
                continue
            try:
                bases.append(parse_reference(image if "/" in image else f"docker.io/library/{image}"))
            except InvalidReference as exc:
                raise BuildError(f"parse {dockerfile}: FROM {words[0]}: {exc}; set the ARG it uses or fix "
                                 "the name") from None
    if not bases and not seen_from:
        raise BuildError(f"parse {dockerfile}: no FROM instruction")
    return bases


def variant_bases(variant: Variant) -> list[str]:
    """The images a variant builds FROM, for listings; a Dockerfile that does not parse gives its error."""
    try:
        return [str(ref) for ref in dockerfile_bases(variant.dockerfile)]
    except BuildError as exc:
        return [f"? ({exc})"]


def _instructions(text: str) -> Iterable[tuple[str, str]]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (pending and not stripped):  # comments and blank lines inside
            continue                                                   # continuations do not end them
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        if whole:
            instruction, _, rest = whole.partition(" ")
            yield instruction.upper(), rest.strip()
    if pending.strip():
        instruction, _, rest = pending.strip().partition(" ")
        yield instruction.upper(), rest.strip()


def variant_status(variant: Variant, cache_root: Path, build_args: Mapping[str, str] | None = None) -> str:
    """"current", "stale" (built from other inputs), "not built", or "unknown" (buildah is not installed)."""
    if shutil.which("buildah") is None:
        return "unknown"
    image = Buildah(cache_root).inspect(variant.tag)
    if image is None:
        return "not built"
    return "current" if is_current(image, variant, build_args) else "stale"


def build_guest_image(
    name: str,
    *,
    cache_root: Path | None = None,
    build_args: Mapping[str, str] | None = None,
    no_cache: bool = False,
    output: IO[str] | None = None,
    lock_timeout: float = 3600.0,
) -> BuildResult:
    """Build variant ``name`` as ``dirge-microvm:NAME`` unless its image is current (or ``no_cache``).

    ``build_args`` None accepts an image built with any arguments; a mapping (even empty) asks for exactly those.
    """
    from .store.cache import default_cache_dir

    variant = find_variant(name)
    cache_root = cache_root or default_cache_dir()
    buildah = Buildah(cache_root)
    image = buildah.inspect(variant.tag)
    if is_current(image, variant, build_args) and not no_cache:
        assert image is not None
        return BuildResult(variant, image, built=False)
    lock_name = hashlib.sha256(variant.tag.encode()).hexdigest()[:32]
    with FileLock(Layout(cache_root).lock_path(f"variant-{lock_name}"), lock_timeout):
        image = buildah.inspect(variant.tag)  # another process may have built it while we waited
        if is_current(image, variant, build_args) and not no_cache:
            assert image is not None
            return BuildResult(variant, image, built=False)
        args = ["bud", "--isolation", "chroot", "--label", f"{HASH_LABEL}={variant_hash(variant)}",
                "--label", f"{ARGS_LABEL}={args_hash(build_args or {})}",
                "--label", f"{VARIANT_LABEL}={variant.name}", "--tag", variant.tag,
                "--file", str(variant.dockerfile)]
        for key, value in sorted((build_args or {}).items()):
            args += ["--build-arg", f"{key}={value}"]
        if no_cache:
            args += ["--no-cache", "--pull-always"]
        if output is None:
            args.append("--quiet")
        buildah.run(*args, str(variant.path), what=f"build variant '{name}' from {variant.dockerfile}",
                    hint="fix the Dockerfile or its FROM image" + (
                        "" if output is not None else f"; `dirge build {name}` shows the whole build"),
                    output=output)
        built = buildah.inspect(variant.tag)
        if built is None:
            raise BuildError(f"build variant '{name}': buildah reported success but {variant.tag} is missing")
        retire_old_images(buildah, cache_root, variant, keep=built.id)
        return BuildResult(variant, built, built=True)


def retire_old_images(buildah: Buildah, cache_root: Path, variant: Variant, keep: str) -> None:
    """Free the space of this variant's replaced images and their exports, best effort: one still being
    read (its export lock is held) or failing to go is left for the next build to retry."""
    try:
        old = [i for i in buildah.labelled(VARIANT_LABEL, variant.name) if i != keep]
    except (BuildError, OSError):
        return
    for image_id in old:
        try:
            retire_image(buildah, cache_root, image_id, timeout=0)
        except (DirgeError, OSError):
            continue


def build_variant(name: str, cache_root: Path, *, offline: bool = False) -> LocalImage:
    """The current image of variant ``name``, built first if missing or stale: the ``build`` hook that
    callers of ``sources.open`` hand in (the sources sit below this module and never import it).
    ``offline`` (``--pull never``) never builds: a build pulls the FROM images and runs the Dockerfile,
    so a variant not built, or whose directory changed since, is an error saying how to build it."""
    if offline:
        variant = find_variant(name)
        image = Buildah(cache_root).inspect(variant.tag)
        if image is None:
            raise BuildError(f"image {name} is not built and --pull never does not build; "
                             f"run `dirge build {name}` (or use --pull missing)")
        if not is_current(image, variant, None):
            raise BuildError(f"image {name} changed since it was built ({variant.path}) and --pull never "
                             f"does not build; run `dirge build {name}` (or use --pull missing)")
        return image
    return build_guest_image(name, cache_root=cache_root).image
