"""The exception tree of dirge.

Every failure a user can meet is a ``DirgeError``; the CLI prints ``str(err)`` as one line, after the
error's ``kind`` when it has one, so the line says whose failure it is: the image's (``unsafe image``,
``image over a limit``), an output format's (``image writer``) or the host's (``host filesystem``,
``no space``). Only the engine's decisions about the image are ``UnsafeLayer``.
Messages are lowercase verb phrases joined level by level, e.g.
``apply layer sha256:ab12…: create etc/passwd: permission denied``, and never contain credentials.

    DirgeError
    ├── InvalidReference          a ref that breaks a syntax rule (names the ref and the rule)
    ├── ImageError                a malformed or unsupported image (index, manifest, config, media type)
    │   └── PlatformNotFound      no manifest for the wanted platform, or an ambiguous choice
    ├── IntegrityError            a blob whose size or digest is not what its descriptor says
    ├── UnsafeLayer               a layer entry that would escape or damage the destination
    ├── LimitExceeded             a layer beyond a configured limit (bytes, entries, depth, file size)
    ├── UnpackError               an OS-level failure while writing the rootfs
    ├── SinkError                 an output format cannot hold the tree (erofs/ext4 writer limits, a too-small size)
    ├── RegistryError             a registry said no (status, error codes, whether a retry may help)
    │   ├── AuthError             401/403: missing or wrong credentials
    │   ├── NotFound              404: no such repository, tag, manifest or blob
    │   └── RateLimited           429 after every retry
    ├── BuildError                a local variant or buildah image that cannot be found, built or exported
    ├── LockTimeout               another process holds a cache lock for too long (names its pid)
    ├── UnsafeCache               a cache (or a lock file in it) another user could change or redirect
    ├── SessionError              a session or snapshot that cannot be made, found or removed
    ├── Cancelled                 an operation stopped at its caller's request (a cancelled dirge.aio call)
    ├── BootError                 a boot that cannot start: no kernel, QEMU, busybox or module
    │   └── GuestFailed           the guest did not run its command to the end (failed, timed out)
    └── NoSpace                   a write ran out of space (ENOSPC/EDQUOT): names what and where, says to free space
"""

from __future__ import annotations


class DirgeError(Exception):
    """Root of every error dirge raises on purpose."""

    kind = ""  # whose failure it is, for the CLI's line (empty: the message says it)


class InvalidReference(DirgeError):
    def __init__(self, ref: str, rule: str) -> None:
        super().__init__(f"invalid image reference {ref!r}: {rule}")
        self.ref = ref
        self.rule = rule


class ImageError(DirgeError):
    """The image's JSON or structure is malformed or unsupported."""


class PlatformNotFound(ImageError):
    pass


class IntegrityError(DirgeError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"verify {what}: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class UnsafeLayer(DirgeError):
    kind = "unsafe image"

    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"unsafe layer entry {entry!r}: {reason}")
        self.entry = entry
        self.reason = reason


class LimitExceeded(DirgeError):
    kind = "image over a limit"

    def __init__(self, limit: str, value: int, maximum: int, *, layer: str | None = None) -> None:
        super().__init__(
            f"{f'layer {layer}' if layer else 'layer'} exceeds limit {limit} ({value} > {maximum}); "
            f"raise it with --limit {limit}=N if the image is trusted"
        )
        self.layer = layer
        self.limit = limit
        self.value = value
        self.maximum = maximum


class UnpackError(DirgeError):
    """An operating-system error while writing the rootfs."""

    kind = "host filesystem"


class SinkError(DirgeError):
    """An output format cannot hold what the image holds (an erofs or ext4 writer limit, a ``size`` too
    small): neither the image's fault nor the host's. ``ErofsError`` and ``Ext4Error`` are ones."""

    kind = "image writer"


class BuildError(DirgeError):
    pass


class LockTimeout(DirgeError):
    def __init__(self, path: str, timeout: float, holder: str) -> None:
        super().__init__(
            f"wait for lock {path}: still held by {'pid ' + holder if holder.isdigit() else holder} "
            f"after {timeout:g}s; "
            "wait for that process or stop it, then retry"
        )
        self.path = path
        self.holder = holder


class UnsafeCache(DirgeError):
    """The cache directory, a parent of it, or a file in it is not safe to trust: owned by another
    (non-root) user, writable by group or others, or a symlink where dirge opens a file."""


class SessionError(DirgeError):
    """A session or snapshot that cannot be created, found or removed."""


class RegistryError(DirgeError):
    def __init__(self, message: str, *, status: int | None = None, codes: tuple[str, ...] = (),
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.codes = codes
        self.retryable = retryable


class AuthError(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class RateLimited(RegistryError):
    pass


class BootError(DirgeError):
    """A boot that cannot start: no kernel, QEMU, busybox or module; an unusable image user."""


class GuestFailed(BootError):
    """The VM started but the guest did not run its command to the end (boot failure or timeout)."""

    def __init__(self, message: str, *, timed_out: bool = False, console_tail: str = "") -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.console_tail = console_tail


class Cancelled(DirgeError):
    """Raised in a worker thread at its next progress callback once its ``dirge.aio`` caller was
    cancelled, so the sync pipeline undoes what it began; the caller sees CancelledError."""


class NoSpace(DirgeError):
    """A write that ran out of disk space or quota; the message names what was written and where."""

    kind = "no space"
