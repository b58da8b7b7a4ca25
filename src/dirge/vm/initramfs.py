"""The kernel side of a boot: which kernel, and a small initramfs with the modules it lacks.

Distribution kernels build virtio, 9p, ext4, erofs and overlay as modules, so something must load them
before the root can be mounted. dirge's initramfs is the smallest thing that does: a static busybox,
the modules for the chosen root (dependencies from ``modules.dep``, in load order; what the kernel has
built in, per ``modules.builtin``, is skipped) and a ``/init`` that does what the kernel itself would
do with ``root=``, ``rootfstype=``, ``rootflags=`` and ``init=``, then ``switch_root``. It carries no
policy: everything session-specific is the guest init's (``vm.guest``).

Roots it understands: ``root=9p:TAG`` (virtio-9p; mounted ``access=client,posixacl``: without
``posixacl`` a client-access 9p mount shows and enforces no ACLs), ``root=virtiofs:TAG``,
``root=serial:NAME`` (the virtio disk whose serial is NAME: the kernel's vda/vdb order is the VMM's
business, the serial is ours) and ``root=/dev/...``.
``dirge.probe`` makes it print the exit line and power off at once (the accelerator probe).

Images are cached under ``CACHE/boot/`` by the hash of everything they are made of, uncompressed
(decompressing under TCG costs more than reading the bytes).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .bootcache import BootCache
from ..errors import BootError
from .guest import find_busybox

__all__ = ["ROOT_MODULES", "Kernel", "build_initramfs", "find_kernel", "kernel_release", "modules_for"]

# What each kind of root needs from the kernel, as module names (module names use "_" or "-" alike).
ROOT_MODULES: dict[str, tuple[str, ...]] = {
    "9p": ("virtio_mmio", "9pnet_virtio", "9p"),
    "virtiofs": ("virtio_mmio", "virtiofs"),
    "ext4": ("virtio_mmio", "virtio_blk", "ext4"),
    "erofs": ("virtio_mmio", "virtio_blk", "ext4", "erofs", "overlay"),
    "probe": (),
}

KERNEL_DIR = Path("/boot")

STAGE1 = r"""#!/bin/sh
# dirge initramfs: load the modules the kernel lacks, mount root= like the kernel would, switch_root.
export PATH=/bin
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}"; return;; esac; done; }
has() { for w in $(cat /proc/cmdline); do [ "$w" = "$1" ] && return 0; done; return 1; }
fail() { echo "DIRGE-BOOT-FAILED ${nonce:--} $*"; poweroff -f; reboot -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
nonce=$(arg dirge.nonce)
has dirge.probe && { echo "DIRGE-EXIT $nonce 0"; poweroff -f; reboot -f; }
while read -r m; do
    insmod "/lib/modules/$m" || fail "cannot load module $m"
done < /etc/dirge-modules
root=$(arg root) fstype=$(arg rootfstype) flags=$(arg rootflags) init=$(arg init)
has rw && mode=rw || mode=ro
case "$root" in
9p:*)
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=512000,cache=mmap,access=client,posixacl,$mode${flags:+,$flags}" \
        "${root#9p:}" /newroot || fail "cannot mount the 9p root ${root#9p:}"
    ;;
virtiofs:*)
    mount -t virtiofs -o "$mode" "${root#virtiofs:}" /newroot || fail "cannot mount the virtio-fs root ${root#virtiofs:}"
    ;;
*)
    dev=""
    for i in $(seq 200); do
        case "$root" in
        serial:*) for s in /sys/block/*/serial; do
                      [ -e "$s" ] && [ "$(cat "$s")" = "${root#serial:}" ] && { d=${s%/serial}; dev=/dev/${d##*/}; }
                  done ;;
        *) [ -b "$root" ] && dev=$root ;;
        esac
        [ -n "$dev" ] && break
        sleep 0.05
    done
    [ -n "$dev" ] || fail "no root device $root"
    mount ${fstype:+-t "$fstype"} -o "$mode${flags:+,$flags}" "$dev" /newroot || fail "cannot mount $root"
    ;;
esac
umount /proc /sys /dev
exec switch_root /newroot "${init:-/sbin/init}" "$@"
"""


@dataclass(frozen=True)
class Kernel:
    path: Path
    release: str  # as ``uname -r`` will say: names /lib/modules/<release>

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.release


def kernel_release(path: Path) -> str:
    """The release string a bzImage carries (boot protocol: the ``kernel_version`` field at 0x20e
    points, less 0x200, at "6.1.0-57-amd64 (builder) #1 SMP ...")."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                raise BootError(f"kernel {path}: not an x86 bzImage (no boot protocol header); "
                                "give --kernel a vmlinuz")
            offset, = struct.unpack_from("<H", head, 0x20E)
            f.seek(offset + 0x200)
            text = f.read(256)
    except OSError as e:
        raise BootError(f"kernel {path}: cannot read it: {e.strerror}") from e
    release = text.split(b"\0", 1)[0].split(b" ", 1)[0].decode("ascii", "replace")
    if not release:
        raise BootError(f"kernel {path}: no version string in its header")
    return release


def _version_key(name: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", name)]


def find_kernel(path: str | os.PathLike[str] | None = None) -> Kernel:
    """``path``, else ``$DIRGE_KERNEL``, else the newest ``/boot/vmlinuz-*``."""
    chosen = path or os.environ.get("DIRGE_KERNEL")
    if chosen:
        p = Path(chosen)
        if not p.is_file():
            raise BootError(f"kernel {p}: no such file; give --kernel (or $DIRGE_KERNEL) a vmlinuz")
        return Kernel(p, kernel_release(p))
    candidates = sorted(KERNEL_DIR.glob("vmlinuz-*"), key=lambda p: _version_key(p.name[8:]))
    if not candidates:
        raise BootError(f"no kernel found: {KERNEL_DIR} has no vmlinuz-*; install one (apt-get install "
                        "linux-image-amd64) or give --kernel PATH")
    p = candidates[-1]
    return Kernel(p, kernel_release(p))


class _Modules:
    """A kernel's module metadata: modules.dep, modules.builtin, modules.softdep's ``pre:`` and the
    exact aliases softdeps name (``crypto-crc32c`` → crc32c_generic)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.deps: dict[str, list[str]] = {}
        for line in self._lines("modules.dep"):
            if ":" in line:
                path, deps = line.split(":", 1)
                self.deps[_name(path)] = [path.strip(), *deps.split()]
        self.builtin = {_name(line) for line in self._lines("modules.builtin") if line.strip()}
        self.pre: dict[str, list[str]] = {}
        for line in self._lines("modules.softdep"):
            words = line.split()
            if len(words) >= 3 and words[0] == "softdep":
                pre = words[words.index("pre:") + 1:] if "pre:" in words else []
                self.pre[_name(words[1])] = [w for w in pre[:pre.index("post:")] if w] if "post:" in pre else pre
        self.aliases: dict[str, list[str]] = {}
        for line in self._lines("modules.alias"):
            words = line.split()
            if len(words) == 3 and words[0] == "alias":
                self.aliases.setdefault(words[1], []).append(_name(words[2]))

    def _lines(self, name: str) -> list[str]:
        try:
            return (self.kernel.modules_dir / name).read_text().splitlines()
        except OSError:
            return []

    def resolve(self, name: str) -> str | None:
        """A module name for ``name`` (itself, or an alias: the ``_generic`` one, which runs on any CPU)."""
        key = _name(name)
        if key in self.deps or key in self.builtin:
            return key
        found = self.aliases.get(name, [])
        return next((m for m in found if m.endswith("_generic")), found[0] if found else None)

    def load_order(self, name: str, order: list[str], seen: set[str]) -> None:
        key = self.resolve(name)
        if key is None or key in self.builtin or key in seen:
            if key is None:
                raise BootError(f"kernel {self.kernel.path} ({self.kernel.release}): no module {name} in "
                                f"{self.kernel.modules_dir} and not built in; install that kernel's modules "
                                "or choose another --disk")
            return
        seen.add(key)
        for soft in self.pre.get(key, []):
            if self.resolve(soft) is not None:  # a softdep is a wish: skip one this kernel lacks
                self.load_order(soft, order, seen)
        path, *deps = self.deps[key]
        for dep in reversed(deps):  # modules.dep lists the nearest dependency first
            self.load_order(_name(dep), order, seen)
        order.append(path)


def _name(path: str) -> str:
    return path.strip().rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def modules_for(kernel: Kernel, names: Iterable[str]) -> list[str]:
    """Module paths (relative to the modules dir) to insmod in order for ``names``: softdeps and
    dependencies first, each once; built-ins skipped."""
    table = _Modules(kernel)
    order: list[str] = []
    seen: set[str] = set()
    for name in names:
        table.load_order(name, order, seen)
    return order


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data-or-link-target), ending with TRAILER!!!."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        rdev = (5, 1) if name == "dev/console" else (0, 0)
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(kernel: Kernel, root_kind: str, cache_dir: Path) -> Path:
    """The cached initramfs for ``kernel`` booting a ``root_kind`` root (a key of ROOT_MODULES)."""
    modules = modules_for(kernel, ROOT_MODULES[root_kind])
    busybox = find_busybox().read_bytes()
    module_data = [(m, (kernel.modules_dir / m).read_bytes()) for m in modules]
    digest = hashlib.sha256(STAGE1.encode() + busybox + kernel.release.encode())
    for m, data in module_data:
        digest.update(m.encode() + hashlib.sha256(data).digest())
    out = BootCache(cache_dir).initramfs_path(kernel.release, root_kind, digest.hexdigest()[:16])
    if out.exists():
        return out
    dirs = ["bin", "dev", "proc", "sys", "newroot", "etc", "lib", "lib/modules"]
    for m, _ in module_data:
        parts = m.split("/")[:-1]
        dirs += ["lib/modules/" + "/".join(parts[:i + 1]) for i in range(len(parts))]
    entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in dict.fromkeys(dirs)]
    entries.append(("dev/console", 0o20600, b""))
    entries.append(("bin/busybox", 0o100755, busybox))
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "cat", "seq", "sleep", "poweroff", "reboot"):
        entries.append((f"bin/{applet}", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, STAGE1.encode()))
    entries.append(("etc/dirge-modules", 0o100644, "".join(m + "\n" for m, _ in module_data).encode()))
    entries += [(f"lib/modules/{m}", 0o100644, data) for m, data in module_data]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(_cpio(entries))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
