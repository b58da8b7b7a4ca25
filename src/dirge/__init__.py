"""dirge: OCI images → exact, safe root filesystems for microVM sandboxes.

The public API (docs/API.md): ``prepare`` (a session rootfs), ``unpack`` (a directory), ``export`` (an erofs
or ext4 disk, a tar, a directory), ``pull`` (into the cache), ``push`` (a converted base to a registry, as an OCI artifact), ``gc`` (collect the cache), ``aio`` (the same
off an asyncio loop), and every exception dirge raises (all ``DirgeError``). Each takes ``cache=`` (a
directory or a ``Cache``) and ``platform=`` ("os/arch[/variant]" or a ``Platform``) where it applies; the
option values are the ``Literal`` types below. The implementation modules have names of their own
(``flatten``, ``exporting``, ``lifecycle``, ``publish``), so no function here hides a submodule.
"""

from importlib import metadata as _metadata

from . import aio
from .apply.layer import Limits
from .errors import (
    AuthError,
    BootError,
    BuildError,
    Cancelled,
    DirgeError,
    GuestFailed,
    ImageError,
    IntegrityError,
    InvalidReference,
    LimitExceeded,
    LockTimeout,
    NoSpace,
    NotFound,
    PlatformNotFound,
    RateLimited,
    RegistryError,
    SessionError,
    SinkError,
    UnpackError,
    UnsafeCache,
    UnsafeLayer,
)
from .exporting import ExportResult, export
from .flatten import UnpackResult, unpack
from .lifecycle import GcReport, gc, pull
from .oci.image import Platform, parse_platform
from .oci.reference import canonicalize_image_ref, local_variant_name, parse_reference
from .oci.resolve import ResolvedImage
from .options import (
    BaseFormat,
    BootDisk,
    CacheLike,
    DiskFormat,
    DiskKind,
    DiskOptions,
    ExportFormat,
    PlatformLike,
    PullPolicy,
    Strategy,
)
from .publish import PushResult, push
from .rootfs import FileSpec, PreparedRootfs, add_user, cleanup, prepare, restore, write_krun_config
from .sources.auth import Credentials
from .store.cache import Cache

try:
    __version__: str = _metadata.version("dirge")
except _metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing
    __version__ = "0+unknown"

__all__ = [
    "AuthError",
    "BaseFormat",
    "BootDisk",
    "BootError",
    "BuildError",
    "Cache",
    "CacheLike",
    "Cancelled",
    "Credentials",
    "DirgeError",
    "DiskFormat",
    "DiskKind",
    "DiskOptions",
    "ExportFormat",
    "ExportResult",
    "FileSpec",
    "GcReport",
    "GuestFailed",
    "ImageError",
    "IntegrityError",
    "InvalidReference",
    "LimitExceeded",
    "Limits",
    "LockTimeout",
    "NoSpace",
    "NotFound",
    "Platform",
    "PlatformLike",
    "PlatformNotFound",
    "PreparedRootfs",
    "PullPolicy",
    "PushResult",
    "RateLimited",
    "RegistryError",
    "ResolvedImage",
    "SessionError",
    "SinkError",
    "Strategy",
    "UnpackError",
    "UnpackResult",
    "UnsafeCache",
    "UnsafeLayer",
    "__version__",
    "add_user",
    "aio",
    "canonicalize_image_ref",
    "cleanup",
    "export",
    "gc",
    "local_variant_name",
    "parse_platform",
    "parse_reference",
    "prepare",
    "pull",
    "push",
    "restore",
    "unpack",
    "write_krun_config",
]
