"""The built-in demo: a tiny two-layer busybox image made offline, unpacked, then run in a chroot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .errors import DirgeError
from .fsutil import remove_tree
from .layerbuild import LayerBuilder
from .sources.layout import LayoutWriter
from .unpack import UnpackResult, unpack

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "id", "stat", "test", "grep", "head", "uname", "ln", "rm", "mkdir")

DEMO_SCRIPT = (
    "cat /etc/motd; "
    "echo \"user: $(grep ^sandbox: /etc/passwd)\"; "
    "echo \"setuid: $(stat -c '%A %U' /usr/bin/suid-busybox)\"; "
    "echo \"hardlinks to busybox: $(stat -c %h /bin/busybox)\"; "
    "test -e /etc/old.conf || echo 'layer 2 deleted /etc/old.conf'; "
    "echo \"opt/app after the opaque whiteout: $(ls /opt/app)\""
)


def find_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if os.path.exists(candidate):
            return Path(candidate)
    raise DirgeError("demo: no static busybox found; install it with: apt-get install busybox-static")


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


def run_demo(workdir: Path) -> tuple[UnpackResult, str]:
    """Build, unpack and (as root) run the demo; idempotent over ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ref = build_demo_layout(workdir / "layout")
    rootfs = workdir / "rootfs"
    remove_tree(rootfs)
    result = unpack(ref, rootfs)
    if os.geteuid() != 0:
        return result, "(not root: skipping the chroot run)\n"
    proc = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", DEMO_SCRIPT], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DirgeError(f"demo: /bin/sh in {rootfs} failed ({proc.returncode}): {proc.stderr.strip()}")
    return result, proc.stdout
