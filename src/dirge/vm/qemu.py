"""Running a QEMU microvm and reading its console: the VMM side of a boot.

``run_vm`` starts ``qemu-system-x86_64 -M microvm`` with a serial console on a pipe, streams the
console's lines to a callback and returns the status from the guest's ``DIRGE-EXIT <nonce> <status>``
line; the nonce (random per boot, on the kernel command line) means output of the guest's own command
can never be taken for it. A ``DIRGE-BOOT-FAILED`` line, QEMU ending without the line, or the deadline
passing raise ``GuestFailed`` carrying the console's last lines; QEMU is always killed and reaped.

``choose_accel("auto")`` uses KVM only after a probe boot with it has printed the exit line (some hosts
have a /dev/kvm that cannot boot a stock kernel); the verdict is kept in ``CACHE/boot/``.

Host safety of a directory share: QEMU serves it with 9p ``security_model=mapped-xattr``. The guest's
chown/chmod/mknod are then stored as ``user.virtfs.{uid,gid,mode,rdev}`` xattrs on host files that QEMU
creates 0600/0700 and regular (a guest device node or symlink is a plain file on the host); files without
those xattrs (the image's) show their real owner and mode. So guest root never makes a setuid-root file or
a device node on the host. Run as root, QEMU also loses the capabilities it has no use for in that model
(``setpriv``, see ``DROPPED_CAPS``): without CAP_FSETID the kernel strips setuid/setgid whenever the guest
writes to or truncates one of the image's own setuid files, so their content cannot be replaced either;
``-sandbox on`` (seccomp) forbids QEMU to gain privileges, spawn programs or use obsolete syscalls.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import selectors
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .bootcache import BootCache
from ..events import Boot as BootPhase, ProgressFn, emit
from ..errors import BootError, GuestFailed
from .guest import EXIT_MARKER, FAIL_MARKER
from .initramfs import Kernel, build_initramfs

__all__ = ["DROPPED_CAPS", "Drive", "VmSpec", "choose_accel", "find_qemu", "qemu_command", "run_vm", "unprivileged"]

QEMU = "qemu-system-x86_64"
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")
ConsoleFn = Callable[[str], None]


def find_qemu() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise BootError(f"{QEMU} not found; install it with: apt-get install qemu-system-x86")
    return path


@dataclass(frozen=True)
class Drive:
    """A virtio-blk disk, named in the guest by its serial (``root=serial:NAME``)."""
    path: Path
    serial: str
    readonly: bool = False
    format: str = "raw"


@dataclass
class VmSpec:
    kernel: Kernel
    initrd: Path
    cmdline: str
    drives: Sequence[Drive] = ()
    share: Path | None = None        # a directory exported over virtio-9p (mapped-xattr) as tag "dirgeroot"
    virtiofs_socket: Path | None = None  # a running virtiofsd's socket, instead of 9p
    memory: int = 512
    cpus: int = 1
    accel: str = "tcg"
    extra: Sequence[str] = field(default_factory=list)


def qemu_command(spec: VmSpec, qemu: str = QEMU) -> list[str]:
    accel = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    args = [qemu, "-M", "microvm", *accel, "-m", str(spec.memory), "-smp", str(spec.cpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(spec.kernel.path), "-initrd", str(spec.initrd), "-append", spec.cmdline]
    for i, d in enumerate(spec.drives):
        args += ["-drive", f"id=d{i},file={d.path},format={d.format},if=none,cache=unsafe"
                           + (",readonly=on" if d.readonly else ""),
                 "-device", f"virtio-blk-device,drive=d{i},serial={d.serial}"]
    if spec.share is not None:
        # mapped-xattr, never passthrough: the guest's owners, modes and devices stay metadata (module doc)
        args += ["-fsdev", f"local,id=root,path={spec.share},security_model=mapped-xattr,multidevs=remap",
                 "-device", "virtio-9p-device,fsdev=root,mount_tag=dirgeroot"]
    if spec.virtiofs_socket is not None:
        # vhost-user needs guest memory the daemon can map
        args += ["-object", f"memory-backend-memfd,id=mem,size={spec.memory}M,share=on",
                 "-machine", "memory-backend=mem",
                 "-chardev", f"socket,id=vfs,path={spec.virtiofs_socket}",
                 "-device", "vhost-user-fs-device,chardev=vfs,tag=dirgeroot"]
    args += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return [*args, *spec.extra]


# What a root QEMU may not keep (names as setpriv takes them): it needs DAC_OVERRIDE/FOWNER to serve the
# image's files, but never changes real owners (chown, setuid/setgid), keeps setid bits on a write
# (fsetid), makes device nodes (mknod) or sets file capabilities (setfcap) in the mapped-xattr model.
DROPPED_CAPS = ("chown", "fsetid", "mknod", "setfcap", "setuid", "setgid", "setpcap", "linux_immutable",
                "sys_admin", "sys_module", "sys_rawio", "sys_ptrace", "sys_boot", "sys_chroot", "net_admin",
                "net_raw", "mac_admin", "mac_override", "audit_control", "audit_write", "syslog")


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run without ``DROPPED_CAPS`` when we are root (bounding set and inheritable set, so
    neither QEMU nor anything it could exec gets them back); as is otherwise."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise BootError("setpriv not found (util-linux): dirge will not run QEMU as root with all its "
                        "capabilities; install util-linux")
    caps = ",".join(f"-{c}" for c in DROPPED_CAPS)
    return [setpriv, "--inh-caps=-all", f"--bounding-set={caps}", "--", *argv]


def run_vm(spec: VmSpec, nonce: str, *, timeout: float, console: ConsoleFn | None = None,
           qemu: str | None = None, kernel_log: bool = False, progress: ProgressFn | None = None) -> int:
    """Boot ``spec``; the guest command's exit status. Raises GuestFailed (see module doc).
    ``console`` gets the guest's lines; the kernel's own (``[    1.234] ...``) only with ``kernel_log``.
    ``progress`` gets Boot("kernel started") at the console's first line and Boot("userspace started")
    at the first line that is not the kernel's (the initramfs's or the guest's)."""
    argv = unprivileged(qemu_command(spec, qemu or find_qemu()))
    tail: deque[str] = deque(maxlen=40)
    status: int | None = None
    failure: str | None = None
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    pending = {"out": b"", "err": b""}
    errors: list[str] = []
    timed_out = False
    phases = {"kernel": False, "userspace": False}  # the boot phases the console has shown

    def line(kind: str, raw: bytes) -> None:
        nonlocal status, failure
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if kind == "err":
            errors.append(text)
            return
        words = text.split(" ", 2)
        if len(words) >= 3 and words[1] == nonce:
            if words[0] == EXIT_MARKER and words[2].strip().isdigit():
                status = int(words[2])
                return
            if words[0] == FAIL_MARKER:
                failure = words[2]
                return
        tail.append(text)
        kernel = bool(_KERNEL_LINE.match(text))
        if not phases["kernel"]:
            phases["kernel"] = True
            emit(progress, BootPhase("kernel started"))
        if not kernel and not phases["userspace"]:
            phases["userspace"] = True
            emit(progress, BootPhase("userspace started"))
        if console is not None and (kernel_log or not kernel):
            console(text)

    try:
        open_streams = 2
        while open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 1.0)):
                chunk = os.read(key.fd, 65536)
                kind = key.data
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    if pending[kind]:
                        line(kind, pending[kind])
                    continue
                *lines, pending[kind] = (pending[kind] + chunk).split(b"\n")
                for raw in lines:
                    line(kind, raw)
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if status is not None:
        return status
    shown = "\n".join(tail)
    if timed_out:
        raise GuestFailed(f"boot {spec.kernel.path}: the guest did not finish within {timeout:g} s; "
                          "raise --timeout, or look at the console above", timed_out=True, console_tail=shown)
    if failure is not None:
        raise GuestFailed(f"boot {spec.kernel.path}: the guest failed to boot: {failure}", console_tail=shown)
    panic = next((t[t.index("Kernel panic"):] for t in tail if "Kernel panic" in t), None)
    why = panic or "; ".join(e for e in errors if e.strip())[-400:] or f"QEMU exited with {proc.returncode}"
    raise GuestFailed(f"boot {spec.kernel.path}: the VM stopped before the guest command finished ({why})",
                      console_tail=shown)


def choose_accel(accel: str, kernel: Kernel, cache_dir: Path, qemu: str | None = None) -> str:
    """"kvm" or "tcg" for ``accel`` ("auto": KVM only where a probe boot with it has worked)."""
    if accel in ("kvm", "tcg"):
        return accel
    if accel != "auto":
        raise BootError(f"accelerator {accel!r}: use auto, kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    qemu = qemu or find_qemu()
    key = hashlib.sha256(f"{qemu}\0{kernel.path}\0{kernel.release}\0{os.uname().release}".encode()).hexdigest()[:16]
    record = BootCache(cache_dir).accel_record_path(key)
    try:
        return "kvm" if json.loads(record.read_text())["kvm"] else "tcg"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    nonce = os.urandom(8).hex()
    spec = VmSpec(kernel, build_initramfs(kernel, "probe", cache_dir), f"console=ttyS0 panic=-1 reboot=t dirge.nonce={nonce} dirge.probe",
                  memory=128, accel="kvm")
    try:
        works = run_vm(spec, nonce, timeout=20.0, qemu=qemu) == 0
    except GuestFailed:
        works = False
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"kvm": works, "kernel": str(kernel.path.resolve()), "probed": time.time()}))
    os.replace(tmp, record)
    return "kvm" if works else "tcg"
