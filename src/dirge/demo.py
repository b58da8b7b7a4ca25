"""The built-in demo: a tiny two-layer busybox image made offline, unpacked, then run: booted in a QEMU
microVM (``dirge boot``) where QEMU and a kernel are found, else in a chroot."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from .errors import DirgeError
from .fsutil import remove_tree
from .layerbuild import LayerBuilder
from .sources.layout import LayoutWriter
from .events import ProgressFn
from .flatten import UnpackResult, unpack
from .options import BootDisk
from .vm.guest import find_busybox

APPLETS = ("sh", "ls", "cat", "echo", "id", "stat", "test", "grep", "head", "uname", "ln", "rm", "mkdir")

DEMO_SCRIPT = (
    "cat /etc/motd; "
    "echo \"id: $(id)\"; "
    "echo \"user: $(grep ^sandbox: /etc/passwd)\"; "
    "echo \"setuid: $(stat -c '%A %U' /usr/bin/suid-busybox)\"; "
    "echo \"hardlinks to busybox: $(stat -c %h /bin/busybox)\"; "
    "test -e /etc/old.conf || echo 'layer 2 deleted /etc/old.conf'; "
    "echo \"opt/app after the opaque whiteout: $(ls /opt/app)\""
)


def build_demo_layout(layout: Path) -> str:
    """Write the demo image into ``layout`` (replacing it); return its ``oci:`` reference."""
    busybox = find_busybox().read_bytes()
    base = LayerBuilder()
    for d in ("bin", "etc", "usr", "usr/bin", "opt", "opt/app", "home"):
        base.dir(d)
    base.dir("tmp", mode=0o1777)
    base.dir("home/sandbox", mode=0o750, uid=1000, gid=1000)
    base.file("bin/busybox", busybox, mode=0o755)
    for applet in APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.hardlink("usr/bin/busybox", "bin/busybox")
    base.file("usr/bin/suid-busybox", busybox, mode=0o4755)
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\nsandbox:x:1000:\n")
    base.file("etc/motd", b"hello from layer 1\n")
    base.file("etc/old.conf", b"to be deleted\n")
    base.file("opt/app/v1.txt", b"v1\n")
    top = LayerBuilder()
    top.whiteout("etc/old.conf")
    top.file("etc/motd", b"hello from a dirge rootfs (layer 2 replaced this file)\n")
    top.opaque("opt/app")
    top.file("opt/app/v2.txt", b"v2\n")
    if layout.exists():
        shutil.rmtree(layout)
    LayoutWriter(layout).add_image([base.build(), top.build()], tag="demo",
                                   runtime_config={"Cmd": ["/bin/sh"], "User": "sandbox"})
    return f"oci:{layout}:demo"


def run_demo(workdir: Path, *, boot: bool | None = None, disk: BootDisk = "dir",
             console: Callable[[str], None] | None = None,
             progress: ProgressFn | None = None) -> tuple[UnpackResult, str, str]:
    """Build and unpack the demo, then run DEMO_SCRIPT in it; idempotent over ``workdir``.
    ``boot``: in a microVM (None: when QEMU and a kernel are found and we are root). Returns the unpack
    result, the script's output and how it ran ("boot", "chroot" or "none")."""
    workdir.mkdir(parents=True, exist_ok=True)
    ref = build_demo_layout(workdir / "layout")
    rootfs = workdir / "rootfs"
    remove_tree(rootfs)
    result = unpack(ref, rootfs, progress=progress)
    say = console or (lambda line: None)
    say(f"unpacked {ref} ({result.image.manifest_digest.short}, {result.report.entries} entries) into {rootfs}")
    if boot is None:
        boot = os.geteuid() == 0 and _can_boot()
    if boot:
        from .vm import boot as boot_image

        lines: list[str] = []
        say(f"booting it in a QEMU microVM (dirge boot --disk {disk}):")

        def collect(line: str) -> None:
            lines.append(line)
            say(line)

        booted = boot_image(ref, workdir / "cache", disk=disk, command=["/bin/sh", "-c", DEMO_SCRIPT],
                            console=collect, timeout=180, progress=progress)
        if booted.status != 0:
            raise DirgeError(f"demo: /bin/sh in the booted demo image failed ({booted.status}): {lines[-1:]}")
        return result, "".join(line + "\n" for line in lines), "boot"
    say(f"running it in a chroot{'' if boot is False else ' (no QEMU or no kernel found for a boot)'}:")
    if os.geteuid() != 0:
        return result, "(not root: skipping the chroot run)\n", "none"
    proc = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", DEMO_SCRIPT], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DirgeError(f"demo: /bin/sh in {rootfs} failed ({proc.returncode}): {proc.stderr.strip()}")
    return result, proc.stdout, "chroot"


def _can_boot() -> bool:
    from .vm.initramfs import find_kernel
    from .vm.qemu import find_qemu

    try:
        find_qemu()
        find_kernel()
    except DirgeError:
        return False
    return True
