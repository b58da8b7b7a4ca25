"""What shapes a prepare, as one value: ``rootfs.prepare``, ``aio.prepare`` and ``dirge session create``
build a ``PrepareOptions`` and hand it down (``bases`` takes it whole), so the three cannot drift apart.

``prepare``'s keywords are these fields plus its own few (the image, the cache, ``files``, ``snapshot``,
``owner_pid``, ``progress``); tests/test_options.py checks that with ``inspect.signature``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .apply.layer import Limits
from .oci.image import Platform

if TYPE_CHECKING:
    from .sources.auth import Credentials


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

    strategy: str | None = None  # how the session is made from the base; None: the fastest available
    base_format: str | None = None  # tree, erofs or auto; None: $DIRGE_BASE_FORMAT, else auto
    platform: Platform | None = None  # None: the host's
    rootless: bool | None = None  # None: rootless unless root
    limits: Limits = Limits()
    lock_timeout: float = 600.0  # seconds to wait for a base another process is building
    pull: str = "missing"  # registry images: always, missing or never
    creds: Credentials | None = None  # None: docker/podman auth files and helpers
    disk: str | None = None  # "ext4" or "erofs": a disk session instead of a directory
    disk_format: str = "raw"  # ext4 disk sessions: raw or qcow2
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
        a field added here without its keyword there fails at once, not silently)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    @property
    def disk_options(self) -> DiskOptions:
        return DiskOptions(self.disk_size, self.disk_journal, self.disk_inodes)


FIELDS = tuple(f.name for f in dataclasses.fields(PrepareOptions))
