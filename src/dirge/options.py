"""What shapes a prepare, as one value: ``rootfs.prepare``, ``aio.prepare`` and ``dirge session create``
build a ``PrepareOptions`` and hand it down (``bases`` takes it whole), so the three cannot drift apart.

``prepare``'s keywords are these fields plus its own few (the image, the cache, ``files``, ``snapshot``,
``owner_pid``, ``progress``); tests/test_options.py checks that with ``inspect.signature``.

The option values are declared here once, as ``Literal`` types: the public functions are annotated with
them (so mypy rejects ``pull="misssing"``) and the CLI's ``click.Choice`` lists are ``choices(...)`` of
them, so the two cannot drift; tests/test_api_surface.py checks them against the modules that act on
the values (session strategies, base formats, pull policies).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from .apply.layer import Limits
from .oci.image import Platform, parse_platform
from .store.cache import Cache

if TYPE_CHECKING:
    from .sources.auth import Credentials, RegistryOptions


PullPolicy: TypeAlias = Literal["always", "missing", "never"]  # registry images: when to ask the registry
BaseFormat: TypeAlias = Literal["auto", "tree", "erofs"]  # what a cached base is built as
Strategy: TypeAlias = Literal["overlay", "fuse-overlayfs", "btrfs", "reflink", "copy"]  # how a session is made from its base
DiskKind: TypeAlias = Literal["ext4", "erofs"]  # a disk session's root disk
DiskFormat: TypeAlias = Literal["raw", "qcow2"]  # an ext4 disk session's file
ExportFormat: TypeAlias = Literal["erofs", "ext4", "tar", "dir"]  # what ``export`` writes
BootDisk: TypeAlias = Literal["dir", "ext4", "erofs"]  # what ``dirge boot`` gives the VM as its root
PlatformLike: TypeAlias = str | Platform  # "os/arch[/variant]", e.g. "linux/arm64", or a Platform


def choices(option: Any) -> list[str]:
    """The values of one of the ``Literal`` option types above, in order (for ``click.Choice``)."""
    return [str(value) for value in get_args(option)]


def as_platform(platform: PlatformLike | None) -> Platform | None:
    """``platform`` as a Platform: "os/arch[/variant]" parsed (InvalidReference naming a bad one)."""
    if platform is None or isinstance(platform, Platform):
        return platform
    if not isinstance(platform, str):
        raise TypeError(f"platform must be 'os/arch[/variant]' or a Platform, not {type(platform).__name__}")
    return parse_platform(platform)


CacheLike: TypeAlias = str | os.PathLike[str] | Cache  # a cache directory, or an open Cache


def as_cache(cache: CacheLike | None) -> Cache | None:
    """``cache`` as a Cache (None stays None: each function says what it does without one)."""
    if cache is None or isinstance(cache, Cache):
        return cache
    return Cache(cache)


def cache_or_dir(cache: CacheLike | None, cache_dir: str | os.PathLike[str] | None, where: str) -> CacheLike | None:
    """The one ``cache=`` of a function that used to take ``cache_dir=``: the old keyword still works,
    with a DeprecationWarning (``where`` names the function), but not with both."""
    if cache_dir is None:
        return cache
    warnings.warn(f"{where}(cache_dir=...) is deprecated; pass cache= (a path or a dirge.Cache)",
                  DeprecationWarning, stacklevel=3)
    if cache is not None:
        raise TypeError(f"{where}: give cache= or the deprecated cache_dir=, not both")
    return cache_dir


@dataclass(frozen=True)
class DiskOptions:
    """What shapes an ext4 base disk's bytes besides the image (part of its cache key)."""

    size: int | None = None  # bytes; None: the content plus headroom
    journal: bool = True
    inodes: int | None = None  # None: the entries plus headroom

    def key(self) -> str:
        return ("" if self.journal else "nojournal") + (f"size{self.size}" if self.size else "") + \
            (f"inodes{self.inodes}" if self.inodes else "")


@dataclass(frozen=True)
class PrepareOptions:
    """How an image is fetched, its base built and its session made (``rootfs.prepare``'s doc)."""

    strategy: Strategy | None = None  # how the session is made from the base; None: the fastest available
    base_format: BaseFormat | None = None  # tree, erofs or auto; None: $DIRGE_BASE_FORMAT, else auto
    platform: Platform | None = None  # None: the host's (the public functions also take "os/arch")
    rootless: bool | None = None  # None: rootless unless root
    limits: Limits = Limits()
    lock_timeout: float = 600.0  # seconds to wait for a base another process is building
    pull: PullPolicy = "missing"  # registry images: always, missing or never
    creds: Credentials | None = None  # None: docker/podman auth files and helpers
    registry_options: RegistryOptions | None = None  # --authfile, --cert-dir, --tls-verify; None: the config files
    disk: DiskKind | None = None  # "ext4" or "erofs": a disk session instead of a directory
    disk_format: DiskFormat = "raw"  # ext4 disk sessions: raw or qcow2
    disk_size: int | None = None  # the ext4 base disk's size (erofs: the scratch disk's); None: automatic
    disk_journal: bool = True
    disk_inodes: int | None = None  # the ext4 base disk's inode count; None: the entries plus headroom
    artifacts: tuple[str, ...] | None = None  # REGISTRY/REPO to fetch prepared bases from; None: [fleet] artifacts

    def __post_init__(self) -> None:
        if isinstance(self.artifacts, str):  # not silently one repository per character
            raise TypeError("artifacts: give a list of \"REGISTRY/REPO\" strings, not one string")
        if self.artifacts is not None and not isinstance(self.artifacts, tuple):  # prepare(artifacts=[...])
            object.__setattr__(self, "artifacts", tuple(self.artifacts))

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> PrepareOptions:
        """The options among ``values`` (a function's ``locals()``, whose parameters include every field:
        a field added here without its keyword there fails at once, not silently). A ``platform`` given
        as "os/arch[/variant]" is parsed."""
        picked = {f.name: values[f.name] for f in dataclasses.fields(cls)}
        picked["platform"] = as_platform(picked["platform"])
        return cls(**picked)

    @property
    def disk_options(self) -> DiskOptions:
        return DiskOptions(self.disk_size, self.disk_journal, self.disk_inodes)


FIELDS = tuple(f.name for f in dataclasses.fields(PrepareOptions))
