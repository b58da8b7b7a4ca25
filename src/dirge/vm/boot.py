"""``boot(image)``: prepare a session, put the guest init into it, boot it in a QEMU microvm, return
the guest command's exit status.

    disk="dir"    the session's rootfs directory over virtio-9p, mapped-xattr (``vm.share``; or virtio-fs
                  with ``virtiofsd=``, which serves real owners and modes: not for untrusted guests)
    disk="ext4"   the session's own ext4 disk as the root            (root=serial:dirge-root)
    disk="erofs"  the shared erofs base read-only + the session's scratch ext4 for the overlay upper

The session is removed afterwards unless ``keep``.
"""

from __future__ import annotations

import base64
import dataclasses
import contextlib
import os
import subprocess
import tempfile
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..store.cache import Cache
from ..errors import BootError
from ..events import Boot as BootPhase, ProgressFn, emit
from ..options import BootDisk, CacheLike, PlatformLike, PullPolicy, as_cache, cache_or_dir
from ..rootfs import PreparedRootfs, prepare
from ..session.customize import DirWriter, Ext4DiskWriter
from .guest import GuestSpec, install_guest
from .initramfs import build_initramfs, find_kernel
from .qemu import ConsoleFn, Drive, VmSpec, choose_accel, find_qemu, run_vm
from .share import capfiles_text, map_session, setcaps_program, unmap_session

if TYPE_CHECKING:
    from ..sources.auth import Credentials, RegistryOptions

__all__ = ["BOOT_DISKS", "BOOT_FAILED", "BOOT_TIMED_OUT", "BootResult", "Booted", "boot", "boot_session"]

BOOT_DISKS: tuple[BootDisk, ...] = typing.get_args(BootDisk)
BOOT_TIMED_OUT = 124  # as timeout(1)
BOOT_FAILED = 125     # as docker run when the container cannot start
CMDLINE_ARGS_MAX = 1024  # base64 argv beyond this goes into /.dirge/config (x86 cmdline: 2048 bytes)


@dataclass
class Booted:
    """One boot of a session: the guest command's status and where the time went."""
    status: int
    accel: str
    setup_seconds: float  # guest init into the session, initramfs, accelerator choice
    vm_seconds: float     # QEMU launch to exit


@dataclass
class BootResult(Booted):
    session: str = ""
    kept: bool = False
    prepare_seconds: float = 0.0  # the session (and, on a cold cache, its base)


def boot_session(prepared: PreparedRootfs, *, cache_dir: Path, kernel: str | os.PathLike[str] | None = None,
                 initrd: str | os.PathLike[str] | None = None, command: Sequence[str] | None = None,
                 memory: int = 512, cpus: int = 1, accel: str = "auto", timeout: float = 300.0,
                 console: ConsoleFn | None = None, virtiofsd: str | None = None,
                 qemu: str | None = None, kernel_log: bool = False, user: str | None = None,
                 env: Mapping[str, str] | None = None, progress: ProgressFn | None = None) -> Booted:
    """Boot an existing session (raw disks only). ``user`` and ``env``
    override the image config's ``User`` and add to its ``Env``, as ``docker run --user/--env``."""
    started = time.monotonic()
    qemu = qemu or find_qemu()
    k = find_kernel(kernel)
    hostname = f"dirge-{prepared.id[:8]}"
    config = {**prepared.config, **({"User": user} if user is not None else {})}
    default = GuestSpec.from_config(config, hostname=hostname, env=env)
    wanted = GuestSpec.from_config(config, hostname=hostname, command=command, env=env)
    if not wanted.argv:
        raise BootError(f"boot {prepared.image}: the image has no Entrypoint or Cmd; give a command after --")
    # A command goes on the kernel command line (each word base64) when it fits, else into the config.
    words = [base64.b64encode(a.encode()).decode() for a in wanted.argv] if command else []
    on_cmdline = bool(words) and sum(len(w) + 1 for w in words) <= CMDLINE_ARGS_MAX
    installed = wanted if command and not on_cmdline else default

    nonce = os.urandom(8).hex()
    args = ["console=ttyS0", "panic=-1", "reboot=t", "quiet", "rw", "init=/.dirge/init", f"dirge.nonce={nonce}",
            f"dirge.hostname={hostname}"]
    drives: list[Drive] = []
    share: Path | None = None
    writer: DirWriter | None = None
    emit(progress, BootPhase("installing the guest init"))
    if not prepared.is_disk:
        kind = "virtiofs" if virtiofsd else "9p"
        writer = DirWriter(prepared.path)
        install_guest(writer, installed)
        share = prepared.path
        args.append(f"root={kind}:dirgeroot")
    elif prepared.disk_format != "raw":
        raise BootError(f"boot session {prepared.id}: its disk is {prepared.disk_format}; boot needs a raw disk")
    elif prepared.scratch is not None:
        kind = "erofs"
        # The scratch disk is the kernel's root: /.dirge sits at its top, beside upper/ and work/.
        install_guest(Ext4DiskWriter(prepared.scratch), installed, user_source=prepared.writer())
        assert prepared.disk is not None
        drives = [Drive(prepared.disk, "dirge-base", readonly=True), Drive(prepared.scratch, "dirge-scratch")]
        args += ["root=serial:dirge-scratch", "rootfstype=ext4", "dirge.lower=dirge-base"]
    else:
        kind = "ext4"
        install_guest(prepared.writer(), installed)
        assert prepared.disk is not None
        drives = [Drive(prepared.disk, "dirge-root")]
        args += ["root=serial:dirge-root", "rootfstype=ext4"]
    emit(progress, BootPhase("choosing the accelerator"))
    chosen = choose_accel(accel, k, cache_dir, qemu)
    if chosen == "tcg":
        args.append("tsc_early_khz=2000000")  # without it half the TCG boots hang calibrating the TSC
    if on_cmdline:
        args += ["--", *words]
    emit(progress, BootPhase(f"initramfs for {kind}"))
    ramfs = Path(initrd) if initrd else build_initramfs(k, kind, cache_dir)
    vm = VmSpec(k, ramfs, " ".join(args), drives=drives, share=None if virtiofsd else share,
                memory=memory, cpus=cpus, accel=chosen)
    with contextlib.ExitStack() as stack:
        if virtiofsd:
            assert share is not None and writer is not None
            writer.write_file("/.dirge/capfiles", b"", 0o600, 0, 0)  # virtio-fs serves capabilities itself
            vm.virtiofs_socket = stack.enter_context(_virtiofsd(virtiofsd, share))
        elif share is not None and writer is not None:
            stack.enter_context(_mapped_share(writer, share))
        launched = time.monotonic()
        emit(progress, BootPhase(f"starting qemu ({chosen})"))
        status = run_vm(vm, nonce, timeout=timeout, console=console, qemu=qemu, kernel_log=kernel_log,
                        progress=progress)
    emit(progress, BootPhase(f"guest exited with {status}"))
    return Booted(status, chosen, launched - started, time.monotonic() - launched)


@contextlib.contextmanager
def _mapped_share(writer: DirWriter, share: Path) -> Iterator[None]:
    """The session in the form QEMU's mapped-xattr 9p serves (``vm.share``) while the VM runs, with the
    guest init's list of files to give their capabilities; symlinks are real again afterwards."""
    try:
        try:
            caps = map_session(share)
        except OSError as e:
            raise BootError(f"boot: cannot prepare {share} for 9p: {e}") from e
        writer.write_file("/.dirge/capfiles", capfiles_text(caps), 0o600, 0, 0)
        writer.write_file("/.dirge/setcaps", setcaps_program([value for _, value in caps]), 0o700, 0, 0)
        writer.mkdir("/.dirge/caps", 0o700, 0, 0)
        yield
    finally:
        unmap_session(share)


@contextlib.contextmanager
def _virtiofsd(binary: str, shared: Path) -> Iterator[Path]:
    """A virtiofsd (the Rust one's flags) serving ``shared`` on a private socket, stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="dirge-vfs-") as tmp:
        socket = Path(tmp) / "vfs.sock"
        try:
            proc = subprocess.Popen([binary, f"--socket-path={socket}", f"--shared-dir={shared}", "--cache=auto",
                                     "--xattr", "--sandbox=chroot"], stdin=subprocess.DEVNULL)
        except OSError as e:
            raise BootError(f"virtiofsd {binary}: cannot start it: {e.strerror}") from e
        try:
            for _ in range(500):  # its socket appears once it listens (bounded: ~5 s)
                if socket.exists() or proc.poll() is not None:
                    break
                time.sleep(0.01)
            if not socket.exists():
                raise BootError(f"virtiofsd {binary}: it did not start serving {shared}")
            yield socket
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def boot(image: str, cache: CacheLike | None = None, *, disk: BootDisk = "dir",
         command: Sequence[str] | None = None, kernel: str | os.PathLike[str] | None = None,
         initrd: str | os.PathLike[str] | None = None, memory: int = 512, cpus: int = 1, accel: str = "auto",
         timeout: float = 300.0, keep: bool = False, console: ConsoleFn | None = None,
         virtiofsd: str | None = None, pull: PullPolicy = "missing", kernel_log: bool = False,
         user: str | None = None, env: Mapping[str, str] | None = None,
         cache_dir: str | os.PathLike[str] | None = None, progress: ProgressFn | None = None,
         platform: PlatformLike | None = None, creds: "Credentials | None" = None,
         registry_options: "RegistryOptions | None" = None, artifacts: tuple[str, ...] | None = None) -> BootResult:
    """Prepare ``image`` as a ``disk`` session and boot it (module doc). Raises BootError when no
    kernel/QEMU/busybox is found (before preparing anything) and GuestFailed when the guest does not
    finish its command. ``cache``: a directory or a Cache (``cache_dir``: deprecated)."""
    where = cache_or_dir(cache, cache_dir, "boot")
    if disk not in BOOT_DISKS:
        raise BootError(f"boot disk {disk!r}: use one of {', '.join(BOOT_DISKS)}")
    qemu = find_qemu()
    find_kernel(kernel)
    cache = as_cache(where) or Cache()
    started = time.monotonic()
    emit(progress, BootPhase("preparing the session"))
    prepared = prepare(image, cache.root, disk=None if disk == "dir" else disk, pull=pull, platform=platform,
                       creds=creds, registry_options=registry_options, progress=progress, artifacts=artifacts)
    prepared_at = time.monotonic()
    try:
        booted = boot_session(prepared, cache_dir=cache.root, kernel=kernel, initrd=initrd,
                                      command=command, memory=memory, cpus=cpus, accel=accel, timeout=timeout,
                                      console=console, virtiofsd=virtiofsd, qemu=qemu,
                                      kernel_log=kernel_log, user=user, env=env, progress=progress)
    finally:
        if keep:
            prepared.detach()
        else:
            prepared.close()
    return BootResult(**dataclasses.asdict(booted), session=prepared.id, kept=keep,
                      prepare_seconds=prepared_at - started)
