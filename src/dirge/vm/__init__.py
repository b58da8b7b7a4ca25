"""Booting a session in a microVM: the guest init dirge puts into it (``guest``, ``setid``), the kernel
and its initramfs (``initramfs``), the VMM (``qemu``) and the whole run (``boot``)."""

from .boot import BOOT_DISKS, BootResult, boot, boot_session

__all__ = ["BOOT_DISKS", "BootResult", "boot", "boot_session"]
