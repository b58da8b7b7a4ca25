"""``dirge boot --disk dir`` is safe for the host and faithful to the image: guest root's chown/chmod/mknod
never become a setuid-root file or a device node on the host (QEMU's 9p in mapped-xattr mode, ``vm.share``),
while the guest sees the image's owners, modes, setuid bits, ACLs and file capabilities as a disk boot does."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from guestprobe import build_probe
from test_boot import TIMEOUT, needs_boot

from dirge.store.cache import Cache
from dirge.layerbuild import LayerBuilder
from dirge.session import Sessions
from dirge.vm import boot
from dirge.vm.guest import find_busybox
from dirge.vm.share import capfiles_text, map_session, setcaps_program, unmap_session

# What `setcap cap_net_raw=ep` writes (VFS_CAP_REVISION_2 | effective; permitted = 1 << CAP_NET_RAW).
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
_UNDEF = 0xFFFFFFFF
# system.posix_acl_access for u::rw-,u:1000:rw-,g::r--,m::rw-,o::r-- (as the kernel returns it)
ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
                                      [(1, 6, _UNDEF), (2, 6, 1000), (4, 4, _UNDEF), (0x10, 6, _UNDEF),
                                       (0x20, 4, _UNDEF)])


@pytest.fixture(scope="module")
def privileged_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `sudo`-like 4755 root file, a `ping`-like one with cap_net_raw=ep (busybox, so /opt/cat runs it
    as its cat applet), a file with an ACL, and the probe; the config's User is 1000."""
    from dirge.sources.layout import LayoutWriter

    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("needs as and ld (binutils, installed by scripts/setup.sh --test)")
    work = tmp_path_factory.mktemp("privimage")
    busybox = find_busybox().read_bytes()
    layer = LayerBuilder()
    for d in ("bin", "etc", "usr", "usr/bin", "opt", "data"):
        layer.dir(d)
    layer.file("bin/busybox", busybox, mode=0o755)
    for applet in ("sh", "stat", "grep", "tail", "ls", "cat", "chown", "chmod", "mknod"):
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000::/:/bin/sh\n")
    layer.file("etc/group", b"root:x:0:\nsandbox:x:1000:\n")
    layer.file("usr/bin/sudo", b"#!/bin/sh\n", mode=0o4755)
    layer.file("usr/bin/ping", busybox, mode=0o755, xattrs={"security.capability": CAP_NET_RAW_EP})
    layer.symlink("opt/cat", "/usr/bin/ping")
    layer.file("data/acl", b"shared\n", mode=0o664, xattrs={"system.posix_acl_access": ACL})
    layer.file("probe", build_probe(work), mode=0o755)
    LayoutWriter(work / "layout").add_image([layer.build()], tag="1", runtime_config={"Cmd": ["/bin/sh"],
                                                                                       "User": "1000"})
    return f"oci:{work / 'layout'}:1"


def _boot(ref: str, boot_cache: Path, disk: str, script: str, **kwargs) -> tuple[int, list[str], str]:
    lines: list[str] = []
    result = boot(ref, boot_cache, disk=disk, command=["/bin/sh", "-c", script], accel="tcg", timeout=TIMEOUT,
                  console=lines.append, **kwargs)
    return result.status, lines, result.session


@needs_boot
@pytest.mark.parametrize("disk", ["dir", "ext4", "erofs"])
def test_setuid_files_acls_and_file_capabilities_reach_the_guest(disk: str, privileged_image: str,
                                                                 boot_cache: Path) -> None:
    # Run as the image's user 1000: the capability must be effective where the kernel execs the file.
    status, lines, _ = _boot(privileged_image, boot_cache, disk, "stat -c '%n %u:%g %a' /usr/bin/sudo /usr/bin/ping; "
                             "/probe /usr/bin/ping security.capability x | tail -n 1; "
                             "/opt/cat /proc/self/status | grep CapEff; "
                             "/probe /data/acl system.posix_acl_access x | tail -n 1")
    assert status == 0, lines
    assert lines == ["/usr/bin/sudo 0:0 4755", "/usr/bin/ping 0:0 755", f"xattr={CAP_NET_RAW_EP.hex()}",
                     "CapEff:\t0000000000002000", f"xattr={ACL.hex()}"]


@needs_boot
def test_guest_root_makes_no_setuid_root_file_or_device_node_on_the_host(privileged_image: str,
                                                                         boot_cache: Path) -> None:
    status, lines, session = _boot(
        privileged_image, boot_cache, "dir",
        "cd / && echo planted > f && chown 0:0 f && chmod 4755 f && mknod d c 1 3; "
        "echo more >> /usr/bin/sudo && stat -c '%n %u:%g %a %F' f d && ls -l /bin/sh | grep -c 'sh -> busybox'",
        user="root", keep=True)
    sessions = Sessions(Cache(boot_cache))
    try:
        # The guest did it all, and sees what it asked for.
        assert status == 0, lines
        assert lines == ["f 0:0 4755 regular file", "d 0:0 644 character special file", "1"]
        sdir = sessions.session_dir(session)
        tree = sdir / "upper" if (sdir / "upper").is_dir() else sdir / "rootfs"
        found: dict[str, os.stat_result] = {}
        for where, dirs, files in os.walk(tree):
            for name in dirs + files:
                path = os.path.join(where, name)
                found[os.path.relpath(path, tree)] = os.lstat(path)
        assert "f" in found and "d" in found
        setuid_root = [p for p, st in found.items() if st.st_mode & stat.S_ISUID and st.st_uid == 0]
        # overlayfs's own whiteouts are 0/0 character devices; no other device may appear
        devices = [p for p, st in found.items()
                   if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and st.st_rdev != 0]
        assert (setuid_root, devices) == ([], [])
        assert stat.S_IMODE(found["f"].st_mode) == 0o600 and stat.S_ISREG(found["d"].st_mode)
        # the image's symlinks are real symlinks again on the host once the VM is gone
        assert os.readlink(sdir / "rootfs" / "bin" / "sh") == "busybox"
    finally:
        sessions.remove(session)


# --- the pieces, without a VM

@needs_root
def test_map_and_unmap_session_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "ping").write_bytes(b"elf")
    os.setxattr(root / "usr" / "bin" / "ping", "security.capability", CAP_NET_RAW_EP)
    (root / "acl").write_bytes(b"x")
    os.setxattr(root / "acl", "system.posix_acl_access", ACL)
    os.symlink("usr/bin/ping", root / "link")
    os.chown(root / "link", 7, 8, follow_symlinks=False)
    os.utime(root / "link", ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
    os.utime(root, ns=(2_000_000_000, 2_000_000_000))
    caps = map_session(root)
    assert caps == [(b"/usr/bin/ping", CAP_NET_RAW_EP)]
    assert capfiles_text(caps) == b"0 L3Vzci9iaW4vcGluZw==\n"
    link = root / "link"
    assert stat.S_ISREG(link.lstat().st_mode) and link.read_bytes() == b"usr/bin/ping"
    assert os.getxattr(link, "user.virtfs.mode") == struct.pack("<I", 0o120777)
    assert os.getxattr(link, "user.virtfs.uid") == struct.pack("<I", 7)
    assert os.getxattr(root / "acl", "user.virtfs.system.posix_acl_access") == ACL
    assert root.stat().st_mtime_ns == 2_000_000_000, "a directory's times survive the conversion"
    made = root / "guest-made"  # a symlink the guest made: QEMU wrote it in mapped form
    made.write_bytes(b"/etc/passwd")
    os.setxattr(made, "user.virtfs.mode", struct.pack("<I", 0o120777))
    os.utime(root, ns=(2_000_000_000, 2_000_000_000))
    unmap_session(root)
    assert os.readlink(link) == "usr/bin/ping" and os.readlink(made) == "/etc/passwd"
    st = link.lstat()
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, 1_000_000_000)
    assert root.stat().st_mtime_ns == 2_000_000_000


@needs_root
@needs_tool("chroot")
def test_setcaps_program_sets_each_capability(tmp_path: Path) -> None:
    caps = tmp_path / ".dirge" / "caps"
    caps.mkdir(parents=True)
    values = [CAP_NET_RAW_EP, struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)]
    for i in range(len(values)):
        (caps / str(i)).write_bytes(b"x")
    program = tmp_path / ".dirge" / "setcaps"
    program.write_bytes(setcaps_program(values))
    program.chmod(0o700)
    done = subprocess.run(["chroot", str(tmp_path), "/.dirge/setcaps"], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert [os.getxattr(caps / str(i), "security.capability") for i in range(2)] == values
    (caps / "1").unlink()
    failed = subprocess.run(["chroot", str(tmp_path), "/.dirge/setcaps"], capture_output=True)
    assert failed.returncode == 1 and b"cannot set a file capability" in failed.stderr
