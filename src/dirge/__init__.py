"""dirge: OCI images → exact, safe root filesystems for microVM sandboxes.

The public API (docs/API.md): ``prepare`` (a session rootfs), ``unpack`` (a directory), ``export`` (an erofs
or ext4 disk, a tar, a directory), ``pull`` (into the cache), ``push`` (a converted base to a registry, as an OCI artifact), ``gc`` (collect the cache), ``aio`` (the same
off an asyncio loop), and every exception dirge raises (all ``DirgeError``). Each takes ``cache=`` (a
directory or a ``Cache``) and ``platform=`` ("os/arch[/variant]" or a ``Platform``) where it applies; the
option values are the ``Literal`` types below. The implementation modules have names of their own
(``flatten``, ``exporting``, ``lifecycle``, ``publish``), so no function here hides a submodule.
"""

import importlib as _importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # what mypy and readers see; at run time __getattr__ below imports each on first use
    from . import aio
    from .apply.layer import Limits
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

    __version__: str

# name → the module that defines it: ``import dirge`` (and so every CLI start) loads only the exceptions;
# the API's modules (httpx, asyncio, rich behind them) load when a name is first used (PEP 562)
_LAZY: dict[str, str] = {
    "aio": ".aio",
    "Limits": ".apply.layer",
    "ExportResult": ".exporting",
    "export": ".exporting",
    "UnpackResult": ".flatten",
    "unpack": ".flatten",
    "GcReport": ".lifecycle",
    "gc": ".lifecycle",
    "pull": ".lifecycle",
    "Platform": ".oci.image",
    "parse_platform": ".oci.image",
    "canonicalize_image_ref": ".oci.reference",
    "local_variant_name": ".oci.reference",
    "parse_reference": ".oci.reference",
    "ResolvedImage": ".oci.resolve",
    "BaseFormat": ".options",
    "BootDisk": ".options",
    "CacheLike": ".options",
    "DiskFormat": ".options",
    "DiskKind": ".options",
    "DiskOptions": ".options",
    "ExportFormat": ".options",
    "PlatformLike": ".options",
    "PullPolicy": ".options",
    "Strategy": ".options",
    "PushResult": ".publish",
    "push": ".publish",
    "FileSpec": ".rootfs",
    "PreparedRootfs": ".rootfs",
    "add_user": ".rootfs",
    "cleanup": ".rootfs",
    "prepare": ".rootfs",
    "restore": ".rootfs",
    "write_krun_config": ".rootfs",
    "Credentials": ".sources.auth",
    "Cache": ".store.cache",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib import metadata

        try:
            value: Any = metadata.version("dirge")
        except metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src) without installing
            value = "0+unknown"
    elif name in _LAZY:
        module = _importlib.import_module(_LAZY[name], __name__)
        value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
