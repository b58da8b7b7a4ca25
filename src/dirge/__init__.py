"""dirge: OCI images → exact, safe root filesystems for microVM sandboxes."""

from .apply.layer import Limits
from .errors import (
    DirgeError,
    ImageError,
    IntegrityError,
    InvalidReference,
    LimitExceeded,
    PlatformNotFound,
    UnpackError,
    UnsafeLayer,
)
from .oci.image import Platform, parse_platform
from .oci.reference import canonicalize_image_ref, local_variant_name, parse_reference
from .exporting import ExportResult, export
from .flatten import UnpackResult, unpack

__all__ = [
    "DirgeError",
    "ExportResult",
    "ImageError",
    "IntegrityError",
    "InvalidReference",
    "LimitExceeded",
    "Limits",
    "Platform",
    "PlatformNotFound",
    "UnpackError",
    "UnpackResult",
    "UnsafeLayer",
    "canonicalize_image_ref",
    "export",
    "local_variant_name",
    "parse_platform",
    "parse_reference",
    "unpack",
]
