"""``dirge boot``'s files in the cache: which initramfs and accelerator verdict lives where.

    CACHE/boot/initramfs-<release>-<root kind>-<hash>.cpio   one per kernel, root kind and content
    CACHE/boot/accel-<hash>.json                              ``--accel auto``'s verdict per QEMU and kernel

The store knows only that ``boot/`` exists (``Layout.boot_dir``); these names are vm/'s, so they live
here, where ``initramfs`` and ``qemu`` write them and gc reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..store.cache import Layout


class BootCache:
    """The boot files of the cache at ``root``."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.dir = Layout(root).boot_dir

    def initramfs_path(self, release: str, kind: str, tag: str) -> Path:
        """The initramfs for kernel ``release`` booting a ``kind`` root; ``tag``: its content's hash."""
        return self.dir / f"initramfs-{release}-{kind}-{tag}.cpio"

    def initramfs_images(self) -> list[tuple[Path, str, str]]:
        """Every cached initramfs: (path, kernel release, root kind)."""
        found = []
        for path in sorted(self.dir.glob("initramfs-*.cpio")) if self.dir.is_dir() else []:
            release, _, rest = path.name[len("initramfs-"):-len(".cpio")].rpartition("-")[0].rpartition("-")
            if release:
                found.append((path, release, rest))
        return found

    def accel_record_path(self, key: str) -> Path:
        """The remembered ``--accel auto`` verdict for one QEMU, kernel and host kernel."""
        return self.dir / f"accel-{key}.json"
