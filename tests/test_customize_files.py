"""Customisation never loses an image's file: add_user rewrites /etc/passwd and /etc/group, so a file
it cannot read must be an error, never "absent" (issue 14's known defect: a symlinked or unreadable
passwd was replaced by a single line, and files were cut at 16 MiB)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dirge.errors import SessionError
from dirge.session.customize import DirWriter, Ext4DiskWriter, add_user

PASSWD = b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n"


def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/group").write_bytes(b"root:x:0:\n")
    return root


def test_symlinked_passwd_is_followed_inside_the_root(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/passwd").write_bytes(PASSWD)
    os.symlink("/usr/lib/passwd", root / "etc/passwd")  # absolute: inside the root, not the host's
    add_user(root, "sandbox", 1000)
    assert (root / "etc/passwd").read_bytes() == PASSWD + b"sandbox:x:1000:1000::/home/sandbox:/bin/sh\n"


def test_large_passwd_is_kept_whole(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    big = PASSWD + b"".join(b"u%07d:x:%d:%d::/:/bin/false\n" % (i, 2000 + i, 2000 + i) for i in range(600_000))
    assert len(big) > 16 << 20
    (root / "etc/passwd").write_bytes(big)
    add_user(root, "sandbox", 1000)
    assert (root / "etc/passwd").read_bytes() == big + b"sandbox:x:1000:1000::/home/sandbox:/bin/sh\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-loop"])
def test_an_unreadable_passwd_is_an_error_and_stays(kind: str, tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    target = root / "etc/passwd"
    if kind == "fifo":
        os.mkfifo(target)  # opening it blocking would hang: it must not
    elif kind == "directory":
        target.mkdir()
    else:
        os.symlink("passwd", target)  # a loop
    def hang(signum: int, frame: object) -> None:
        raise TimeoutError("add_user hung on /etc/passwd")

    previous = signal.signal(signal.SIGALRM, hang)  # a hang fails the test instead of the run
    signal.alarm(20)
    try:
        with pytest.raises(SessionError, match="etc/passwd"):
            add_user(root, "sandbox", 1000)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert os.path.lexists(target) and not (target.is_file() and not target.is_symlink())


def test_missing_passwd_is_created(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    add_user(root, "sandbox", 1000)
    assert (root / "etc/passwd").read_bytes() == b"sandbox:x:1000:1000::/home/sandbox:/bin/sh\n"
    assert DirWriter(root).read_file("/etc/shadow") is None


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                    reason="needs e2fsprogs (mkfs.ext4, debugfs)")
def test_symlinked_passwd_in_a_disk_is_an_error_not_absent(tmp_path: Path) -> None:
    tree = rootfs(tmp_path)
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/passwd").write_bytes(PASSWD)
    os.symlink("../usr/lib/passwd", tree / "etc/passwd")
    disk = tmp_path / "disk.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(disk), "8M"], check=True)
    with pytest.raises(SessionError, match="it is a symlink"):
        add_user(Ext4DiskWriter(disk), "sandbox", 1000)
    out = subprocess.run(["debugfs", "-R", "cat /usr/lib/passwd", str(disk)], capture_output=True).stdout
    assert out == PASSWD


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a rootless base built by root)")
def test_files_written_into_a_rootless_session_keep_owners_as_its_base_does(tmp_path: Path, make_image) -> None:
    # Owners follow the base's recorded mode, not os.geteuid(): root preparing a rootless base writes
    # user.rootlesscontainers as the base itself does, never a real chown.
    from dirge.apply.fs import ROOTLESS_XATTR, encode_rootless_owner
    from dirge.layerbuild import LayerBuilder
    from dirge.rootfs import FileSpec, prepare

    ref = make_image([LayerBuilder().dir("etc").file("etc/owned", b"o", uid=1000, gid=1000).build()])
    with prepare(ref, tmp_path / "cache", rootless=True, strategy="copy",
                 files={"/etc/added": FileSpec(b"a", uid=1000, gid=1000)}) as session:
        base_file, added = session.path / "etc/owned", session.path / "etc/added"
        assert os.getxattr(base_file, ROOTLESS_XATTR) == encode_rootless_owner(1000, 1000)
        assert (added.stat().st_uid, added.stat().st_gid) == (base_file.stat().st_uid, base_file.stat().st_gid)
        assert os.getxattr(added, ROOTLESS_XATTR) == encode_rootless_owner(1000, 1000)
