"""Every prepared rootfs boots: the guest init, ``dirge boot`` and the demo, in a real QEMU microvm (TCG:
this host's /dev/kvm cannot boot a stock kernel) with Debian's generic kernel and dirge's initramfs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guestprobe import build_probe

from dirge.cli import main
from dirge.demo import build_demo_layout, run_demo
from dirge.errors import BootError, GuestFailed
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter
from dirge.vm import boot
from dirge.vm.guest import find_busybox, resolve_user
from dirge.vm.initramfs import ROOT_MODULES, Kernel, build_initramfs, find_kernel, kernel_release, modules_for
from dirge.vm.qemu import choose_accel
from dirge.vm.setid import SETID_FAILED, setid_program
from registry import push_layout


def _boot_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (owners and xattrs in the session)"
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64 (installed by scripts/setup.sh --test)"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "needs a kernel in /boot (linux-image-amd64, installed by scripts/setup.sh --test)"
    return None


needs_boot = pytest.mark.skipif(_boot_missing() is not None, reason=_boot_missing() or "")
needs_binutils = pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                                    reason="needs as and ld (binutils, installed by scripts/setup.sh --test)")
DISKS = ("dir", "ext4", "erofs")
TIMEOUT = 120  # generous: a TCG boot takes ~7 s here, more on a loaded machine


@pytest.fixture(scope="module")
def demo_ref(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_demo_layout(tmp_path_factory.mktemp("demo") / "layout")


def run(ref: str, boot_cache: Path, disk: str, command: list[str] | None, **kwargs) -> tuple[int, list[str]]:
    lines: list[str] = []
    result = boot(ref, boot_cache, disk=disk, command=command, accel="tcg", timeout=TIMEOUT,
                  console=lines.append, **kwargs)
    assert not (boot_cache / "sessions" / result.session).exists(), "the session is removed after the boot"
    return result.status, lines


# --- the demo image from each kind of root (must-show 1)

@needs_boot
@pytest.mark.parametrize("disk", DISKS)
def test_demo_boots_from_each_root(disk: str, tmp_path: Path) -> None:
    _, output, how = run_demo(tmp_path / "demo", boot=True, disk=disk)
    assert how == "boot"
    assert output.splitlines() == [
        "hello from a dirge rootfs (layer 2 replaced this file)",
        "id: uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)",  # the config's User: sandbox
        "user: sandbox:x:1000:1000::/home/sandbox:/bin/sh",
        "setuid: -rwsr-xr-x root",
        "hardlinks to busybox: 2",
        "layer 2 deleted /etc/old.conf",
        "opt/app after the opaque whiteout: v2.txt",
    ]
    # The guest saw what the chroot sees (the chroot runs as root, hence its own id line).
    _, chrooted, _ = run_demo(tmp_path / "chroot", boot=False)
    assert [l for l in output.splitlines() if not l.startswith("id:")] == \
           [l for l in chrooted.splitlines() if not l.startswith("id:")]


@needs_boot
def test_the_base_is_untouched_and_the_guest_writes_only_its_session(demo_ref: str, boot_cache: Path) -> None:
    # An erofs session: the guest writes through its overlay into the scratch disk, never the shared base.
    status, lines = run(demo_ref, boot_cache, "erofs", ["/bin/sh", "-c",
                        "echo changed > /etc/motd && cat /etc/motd && grep -c . /proc/mounts >/dev/null"],
                        user="root")
    assert (status, lines) == (0, ["changed"])
    status, lines = run(demo_ref, boot_cache, "erofs", ["/bin/cat", "/etc/motd"])
    assert (status, lines) == (0, ["hello from a dirge rootfs (layer 2 replaced this file)"])


# --- an image with one static binary and nothing else (must-show 2)

@needs_boot
@needs_binutils
@pytest.mark.parametrize("disk", ["ext4", "erofs"])
def test_static_binary_only_image_runs_its_entrypoint(disk: str, make_image, boot_cache: Path, tmp_path: Path) -> None:
    layer = LayerBuilder().file("probe", build_probe(tmp_path), mode=0o755).build()
    ref = make_image([layer], runtime_config={"Entrypoint": ["/probe"], "WorkingDir": "/srv/app",
                                              "Env": ["GREETING=hello world", "PATH=/bin"]})
    status, lines = run(ref, boot_cache, disk, None)
    assert status == 0
    assert lines[0] == "cwd=/srv/app"
    env = sorted(l.removeprefix("env=") for l in lines[1:])
    assert env == ["GREETING=hello world", "HOME=/", "HOSTNAME=" + env[2].split("=", 1)[1], "PATH=/bin"]
    assert env[2].startswith("HOSTNAME=dirge-")


# --- a multi-layer registry image keeps owners, modes and xattrs in the guest (must-show 4)

@pytest.fixture(scope="module")
def registry_image(module_registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("needs as and ld (binutils, installed by scripts/setup.sh --test)")
    work = tmp_path_factory.mktemp("regimage")
    busybox = find_busybox().read_bytes()
    first = LayerBuilder()
    for d in ("bin", "etc", "data"):
        first.dir(d)
    first.file("bin/busybox", busybox, mode=0o755)
    for applet in ("sh", "stat", "ls", "cat"):
        first.symlink(f"bin/{applet}", "busybox")
    first.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    first.file("data/gone.txt", b"removed by layer 3\n")
    second = LayerBuilder()
    second.file("data/secret", b"s\n", mode=0o4750, uid=1234, gid=1234, xattrs={"user.dirge": b"kept"})
    second.file("bin/probe", build_probe(work), mode=0o755)
    third = LayerBuilder().whiteout("data/gone.txt")
    LayoutWriter(work / "layout").add_image([first.build(), second.build(), third.build()], tag="1",
                                            runtime_config={"Cmd": ["/bin/sh"]})
    ref = f"{module_registry.host}/test/boot:1"
    push_layout(work / "layout", "1", ref)
    return ref


@needs_boot
@pytest.mark.parametrize("disk", DISKS)
def test_registry_image_keeps_owner_mode_and_xattr(disk: str, registry_image: str, boot_cache: Path) -> None:
    status, lines = run(registry_image, boot_cache, disk, [
        "/bin/sh", "-c", "stat -c '%u:%g %a' /data/secret; ls /data; /bin/probe /data/secret user.dirge | tail -n 1"])
    assert status == 0
    assert lines == ["1234:1234 4750", "secret", "xattr=kept"]


# --- dirge boot's exit statuses (must-show 5)

@needs_boot
def test_boot_returns_the_guest_status(demo_ref: str, boot_cache: Path, capsys) -> None:
    base = ["--quiet", "boot", "--accel", "tcg", "--cache-dir", str(boot_cache), "--disk", "ext4", demo_ref, "--"]
    assert main([*base, "/bin/sh", "-c", "echo fine"]) == 0
    assert main([*base, "/bin/sh", "-c", "echo three; exit 3"]) == 3
    out = capsys.readouterr().out.splitlines()
    assert out == ["fine", "three"]


@needs_boot
def test_a_hanging_guest_times_out(demo_ref: str, boot_cache: Path, capsys) -> None:
    # The guest prints, then hangs: the status is 124 after the deadline, with one error line.
    code = main(["boot", "--accel", "tcg", "--timeout", "30", "--cache-dir", str(boot_cache), demo_ref, "--",
                 "/bin/sh", "-c", "echo started; while :; do :; done"])
    captured = capsys.readouterr()
    assert code == 124
    assert "started" in captured.out.splitlines()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "did not finish within 30 s" in errors[0]
    assert not list((boot_cache / "sessions").iterdir()), "the session is removed after a timeout too"


@needs_boot
def test_a_guest_that_cannot_boot_fails_with_125(demo_ref: str, boot_cache: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an initramfs" * 64)  # the kernel finds no root and panics (panic=-1 → reset)
    code = main(["boot", "--accel", "tcg", "--timeout", "90", "--initrd", str(junk), "--cache-dir", str(boot_cache),
                 demo_ref])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 125
    assert len(err) == 1 and err[0].startswith("dirge: error: boot ") and "stopped before" in err[0]
    assert "Kernel panic - not syncing" in err[0]


def test_no_kernel_or_no_qemu_is_one_clear_line(demo_ref: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("DIRGE_KERNEL", raising=False)
    cache = str(tmp_path / "cache")
    assert main(["boot", "--kernel", str(tmp_path / "vmlinuz-none"), "--cache-dir", cache, demo_ref]) == 1
    assert capsys.readouterr().err == (f"dirge: error: kernel {tmp_path}/vmlinuz-none: no such file; "
                                       "give --kernel (or $DIRGE_KERNEL) a vmlinuz\n")
    monkeypatch.setattr("dirge.vm.initramfs.KERNEL_DIR", tmp_path / "empty-boot")
    assert main(["boot", "--cache-dir", cache, demo_ref]) == 1
    assert capsys.readouterr().err == (f"dirge: error: no kernel found: {tmp_path}/empty-boot has no vmlinuz-*; "
                                       "install one (apt-get install linux-image-amd64) or give --kernel PATH\n")
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    assert main(["boot", "--cache-dir", cache, demo_ref]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == \
        "dirge: error: qemu-system-x86_64 not found; install it with: apt-get install qemu-system-x86"
    assert not (tmp_path / "cache" / "sessions").exists() or not list((tmp_path / "cache" / "sessions").iterdir())


@needs_boot
def test_auto_accel_probes_once_and_remembers(boot_cache: Path) -> None:
    kernel = find_kernel()
    first = choose_accel("auto", kernel, boot_cache)
    records = list((boot_cache / "boot").glob("accel-*.json"))
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert len(records) == 1 and json.loads(records[0].read_text())["kvm"] == (first == "kvm")
        stamp = records[0].stat().st_mtime_ns
        assert choose_accel("auto", kernel, boot_cache) == first
        assert records[0].stat().st_mtime_ns == stamp, "the verdict is reused, not probed again"
    else:
        assert first == "tcg" and not records
    assert choose_accel("tcg", kernel, boot_cache) == "tcg"
    with pytest.raises(BootError, match="use auto, kvm or tcg"):
        choose_accel("xen", kernel, boot_cache)


# --- the pieces, without a VM

@pytest.mark.parametrize("user, expected", [
    ("", (0, 0, (0,), "/root")),
    ("sandbox", (1000, 1000, (1000, 27), "/home/sandbox")),
    ("1000", (1000, 1000, (1000, 27), "/home/sandbox")),
    ("1000:27", (1000, 27, (27,), "/home/sandbox")),
    ("sandbox:sudo", (1000, 27, (27,), "/home/sandbox")),
    ("4321", (4321, 0, (0,), "/")),
    ("4321:4321", (4321, 4321, (4321,), "/")),
])
def test_user_is_resolved_against_the_images_files(user: str, expected) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/home/sandbox:/bin/sh\n"
    group = b"root:x:0:\nsudo:x:27:sandbox,other\nsandbox:x:1000:\n"
    ident = resolve_user(user, passwd, group)
    assert (ident.uid, ident.gid, ident.groups, ident.home) == expected


@pytest.mark.parametrize("user, message", [("nobody", "no user 'nobody'"), ("sandbox:wheel", "no group 'wheel'")])
def test_unknown_user_or_group_is_a_clear_error(user: str, message: str) -> None:
    with pytest.raises(BootError, match=message):
        resolve_user(user, b"sandbox:x:1000:1000::/home/sandbox:/bin/sh\n", b"sandbox:x:1000:\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (switching users)")
def test_setid_switches_ids_and_execs(tmp_path: Path) -> None:
    prog = tmp_path / "setid"
    prog.write_bytes(setid_program(1000, 1001, (1001, 27)))
    prog.chmod(0o755)
    out = subprocess.run([str(prog), "/bin/sh", "-c", "id -u; id -g; id -G"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["1000", "1001", "1001", "27"]
    missing = subprocess.run([str(prog), str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == SETID_FAILED and "cannot switch user or execute" in missing.stderr
    assert subprocess.run([str(prog)]).returncode == SETID_FAILED


def _module_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def _assert_load_order(kernel: Kernel) -> None:
    """dirge's load order for an erofs root obeys what the kernel's own metadata says, read here
    independently of dirge: each module's dependencies (modules.dep) and its wished-for predecessors
    (modules.softdep ``pre:``, by name or alias). Nothing else is asserted: an order modules.dep leaves
    open (virtio and virtio_ring, independent in some 6.1 builds) may come out either way."""
    meta = kernel.modules_dir
    deps = {path.strip(): rest.split() for path, _, rest in
            (line.partition(":") for line in (meta / "modules.dep").read_text().splitlines() if ":" in line)}
    builtin = {_module_name(line) for line in (meta / "modules.builtin").read_text().split()}
    aliases: dict[str, set[str]] = {}
    for line in (meta / "modules.alias").read_text().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            aliases.setdefault(words[1], set()).add(_module_name(words[2]))
    pre: dict[str, set[str]] = {}
    for line in (meta / "modules.softdep").read_text().splitlines():
        words = line.split()
        if len(words) > 3 and words[0] == "softdep" and "pre:" in words:
            wished = words[words.index("pre:") + 1:]
            wished = wished[:wished.index("post:")] if "post:" in wished else wished
            pre[_module_name(words[1])] = {m for w in wished for m in aliases.get(w, {_module_name(w)})}

    order = modules_for(kernel, ROOT_MODULES["erofs"])
    assert len(order) == len(set(order)), "each module once"
    at = {path: i for i, path in enumerate(order)}
    by_name = {_module_name(path): i for i, path in enumerate(order)}
    for path in order:
        for dep in deps[path]:  # every dependency is loaded, and before the module that needs it
            assert dep in at and at[dep] < at[path], (path, dep, order)
        for wished in pre.get(_module_name(path), ()):  # a softdep that is loaded at all comes first
            assert by_name.get(wished, -1) < at[path], (path, wished, order)
    for wanted in ROOT_MODULES["erofs"]:
        assert wanted in builtin or wanted in by_name, (wanted, order)


@pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*")), reason="needs a kernel in /boot (linux-image-amd64)")
def test_modules_load_in_dependency_order_of_another_build(tmp_path: Path) -> None:
    # The installed kernel's metadata, changed as Debian's 6.1.0-50 has it: virtio and virtio_ring
    # independent, virtio_mmio needing both (listed virtio_ring first).
    real = find_kernel()

    class Rebuilt(Kernel):
        @property
        def modules_dir(self) -> Path:
            return tmp_path

    for name in ("modules.builtin", "modules.softdep", "modules.alias"):
        (tmp_path / name).write_text((real.modules_dir / name).read_text())
    lines = (real.modules_dir / "modules.dep").read_text().splitlines()
    path_of = {_module_name(line.partition(":")[0]): line.partition(":")[0] for line in lines if ":" in line}
    changed = {"virtio": "", "virtio_mmio": f"{path_of['virtio_ring']} {path_of['virtio']}"}
    (tmp_path / "modules.dep").write_text("".join(
        f"{path}: {changed[_module_name(path)]}\n" if _module_name(path) in changed else f"{line}\n"
        for line in lines for path in [line.partition(":")[0]]))
    _assert_load_order(Rebuilt(real.path, real.release))


@pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*")), reason="needs a kernel in /boot (linux-image-amd64)")
def test_modules_load_in_dependency_order_and_the_initramfs_is_cached(tmp_path: Path) -> None:
    kernel = find_kernel()
    assert kernel_release(kernel.path) == kernel.path.name.removeprefix("vmlinuz-")
    _assert_load_order(kernel)
    first = build_initramfs(kernel, "ext4", tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_initramfs(kernel, "ext4", tmp_path) == first and first.stat().st_mtime_ns == stamp
    listing = subprocess.run(["busybox", "cpio", "-t"], input=first.read_bytes(), capture_output=True).stdout.decode()
    assert {"init", "bin/busybox", "dev/console", "etc/dirge-modules"} <= set(listing.split())
    with pytest.raises(BootError, match="no module nosuchfs"):
        modules_for(kernel, ["nosuchfs"])
