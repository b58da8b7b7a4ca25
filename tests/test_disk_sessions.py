"""Disk sessions for block-device VMs: an ext4 session's own disk (raw or qcow2) from the cached base disk,
an erofs session's shared base image plus its own scratch disk; customised with debugfs (no mount, no
root); removed with the session, never the base disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool, require
from dirge.errors import SessionError
from dirge.rootfs import add_user, prepare, restore, write_krun_config
from dirge.session import Sessions
from dirge.store.cache import Cache
from dirge.session.customize import FileSpec
from images import layered, metadata
from treecmp import file_sha256

pytestmark = needs_tool("debugfs", "e2fsck")
DIRGE = str(Path(sys.executable).parent / "dirge")
MiB = 1 << 20


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True,
                          env={**os.environ, "DEBUGFS_PAGER": "__none__"})
    return proc.stdout


def fsck(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def base_disks(cache: Path, fs: str = "ext4") -> list[Path]:
    return sorted((cache / "bases").glob(f"*/rootfs.{fs}"))


@needs_root
@needs_tool("mount", "umount")
def test_ext4_session_takes_writes_and_leaves_base_and_others_alone(tmp_path: Path, make_image) -> None:
    ref = make_image(layered() + metadata())
    cache = tmp_path / "cache"
    a = prepare(ref, cache, disk="ext4", disk_size=512 * MiB)
    b = prepare(ref, cache, disk="ext4", disk_size=512 * MiB)
    try:
        assert a.disk == cache / "sessions" / a.id / "disk.ext4" and a.disk.is_file()
        assert a.disk_strategy in ("reflink", "sparse") and a.strategy == "disk"
        with pytest.raises(SessionError, match="disk session"):
            a.path
        [base] = base_disks(cache)
        base_sum, b_sum = file_sha256(base), file_sha256(b.disk)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop", str(a.disk), str(mnt)], check=True)
        try:
            (mnt / "big").mkdir()
            block = os.urandom(MiB)
            for i in range(100):
                (mnt / "big" / f"f{i}").write_bytes(block[i:] + block[:i])
            for i in range(0, 100, 3):
                os.unlink(mnt / "big" / f"f{i}")
            os.rename(mnt / "big" / "f1", mnt / "renamed")
            os.rename(mnt / "etc" / "conf.d", mnt / "conf.d-moved")
            os.unlink(mnt / "etc" / "passwd")
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        fsck(a.disk)
        assert "renamed" in debugfs(a.disk, "ls /") and "f2" in debugfs(a.disk, "ls /big")
        assert file_sha256(base) == base_sum, "a session wrote into the base disk"
        assert file_sha256(b.disk) == b_sum
        assert debugfs(b.disk, "cat /etc/passwd") == "root:x:0:0::/root:/bin/sh\n"
        assert "File not found" not in debugfs(b.disk, "stat /etc/conf.d/a")
    finally:
        a.close()
        b.close()
    assert not os.listdir(cache / "sessions") and file_sha256(base) == base_sum


def test_customise_ext4_and_erofs_disk_sessions(tmp_path: Path, make_image) -> None:
    ref = make_image(layered())
    cache = tmp_path / "cache"
    files = {"/etc/hostname": b"box\n", "/new/dir/key": FileSpec(b"secret", mode=0o600, uid=1000, gid=1001)}
    s = prepare(ref, cache, disk="ext4", files=files)
    try:
        add_user(s, "alice", 1000)
        write_krun_config(s, {"Cmd": ["/bin/sh"]})
        add_user(s, "alice", 1000)  # idempotent
        disk = s.disk
        assert disk is not None
        assert debugfs(disk, "cat /etc/hostname") == "box\n"
        assert debugfs(disk, "cat /new/dir/key") == "secret"
        stat = debugfs(disk, "stat /new/dir/key")
        assert "Mode:  0600" in stat and "User:  1000   Group:  1001" in stat, stat
        assert debugfs(disk, "cat /etc/passwd") == ("root:x:0:0::/root:/bin/sh\n"
                                                    "alice:x:1000:1000::/home/alice:/bin/sh\n")
        assert "alice:x:1000:" in debugfs(disk, "cat /etc/group")
        home = debugfs(disk, "stat /home/alice")
        assert "Type: directory" in home and "User:  1000" in home
        assert json.loads(debugfs(disk, "cat /.krun_config.json")) == {"Cmd": ["/bin/sh"]}
        fsck(disk)
    finally:
        s.close()

    e = prepare(ref, cache, disk="erofs", files=files)
    try:
        [image] = base_disks(cache, "erofs")
        before = file_sha256(image)
        assert e.disk == image and e.disk_strategy == "shared" and e.scratch is not None
        require(os.geteuid() == 0, "needs root: add_user reads the base's /etc/passwd through its mount")
        add_user(e, "bob", 1002)
        assert debugfs(e.scratch, "cat /upper/etc/passwd").endswith("bob:x:1002:1002::/home/bob:/bin/sh\n")
        assert "User:  1002" in debugfs(e.scratch, "stat /upper/home/bob")
        assert debugfs(e.scratch, "cat /upper/etc/hostname") == "box\n"
        assert "Mode:  0600" in debugfs(e.scratch, "stat /upper/new/dir/key")
        assert "Type: directory" in debugfs(e.scratch, "stat /work")
        fsck(e.scratch)
        assert file_sha256(image) == before
    finally:
        e.close()
    assert image.exists() and not os.listdir(cache / "sessions")


@needs_tool("qemu-img")
def test_qcow2_session_is_backed_by_the_base_disk(tmp_path: Path, make_image) -> None:
    ref = make_image(layered())
    cache = tmp_path / "cache"
    s = prepare(ref, cache, disk="ext4", disk_format="qcow2")
    try:
        [base] = base_disks(cache)
        assert s.disk_strategy == "qcow2" and s.disk == cache / "sessions" / s.id / "disk.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(s.disk)], check=True,
                                         capture_output=True, text=True).stdout)
        assert info["format"] == "qcow2" and info["backing-filename"] == str(base.resolve())
        with pytest.raises(SessionError, match="--disk-format raw"):
            add_user(s, "alice", 1000)
    finally:
        s.close()
    assert base.exists()


def test_snapshot_and_restore_of_a_disk_session(tmp_path: Path, make_image) -> None:
    ref = make_image(layered())
    cache = tmp_path / "cache"
    s = prepare(ref, cache, disk="ext4", files={"/etc/motd": b"saved\n"})
    try:
        Sessions(Cache(cache)).snapshot_save(s.id, "snap")
    finally:
        s.close()
    r = restore("snap", cache)
    try:
        assert r.disk is not None and r.disk.parent.name == r.id and r.info.snapshot == "snap"
        assert debugfs(r.disk, "cat /etc/motd") == "saved\n"
    finally:
        r.close()
    assert (cache / "snapshots" / "snap" / "disk.ext4").is_file()


def test_cli_disk_session_create_rm_prune(tmp_path: Path, make_image) -> None:
    ref = make_image(layered())
    cache = tmp_path / "cache"

    def dirge(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([DIRGE, *args, "--cache-dir", str(cache)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc

    out = json.loads(dirge("session", "create", ref, "--disk", "ext4", "--json").stdout)
    disk = Path(out["disk"])
    assert disk == cache / "sessions" / out["id"] / "disk.ext4" and disk.is_file()
    assert out["disk_strategy"] in ("reflink", "sparse") and out["disk_format"] == "raw" and out["path"] is None
    [base] = base_disks(cache)
    listed = json.loads(dirge("session", "ls", "--json").stdout)
    assert [(x["id"], x["disk"]) for x in listed] == [(out["id"], str(disk))]
    dirge("session", "rm", out["id"])
    assert not disk.exists() and not (cache / "sessions" / out["id"]).exists() and base.is_file()

    # the owner (a short-lived shell) is gone at once: prune removes the session and its scratch disk
    path = Path(subprocess.run(["sh", "-c", f"{DIRGE} session create {ref} --disk erofs --cache-dir {cache}"],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert path == base_disks(cache, "erofs")[0]
    assert len(os.listdir(cache / "sessions")) == 1
    assert "removed" in dirge("session", "prune").stdout
    assert not os.listdir(cache / "sessions") and path.is_file() and base.is_file()


@needs_root
@needs_tool("setpriv")
def test_disk_session_as_an_ordinary_user(tmp_path: Path, make_image) -> None:
    ref = make_image(layered())
    work = Path(tempfile.mkdtemp(prefix="dirge-disk-nobody-", dir="/tmp"))  # pytest's tmp is root-only
    try:
        os.chmod(work, 0o1777)  # sticky, as /tmp: a cache below may not sit in a dir others can rename in
        layout = ref[len("oci:"):].rpartition(":")[0]
        shutil.copytree(layout, work / "layout")
        subprocess.run(["chmod", "-R", "a+rX", str(work / "layout")], check=True)
        script = ("import sys\n"
                  "from dirge.rootfs import prepare, add_user\n"
                  "s = prepare(sys.argv[1], sys.argv[2], disk='ext4', files={'/etc/hostname': b'nobody\\n'})\n"
                  "add_user(s, 'alice', 1000)\n"
                  "s.detach()\n"
                  "e = prepare(sys.argv[1], sys.argv[2], disk='erofs')\n"
                  "add_user(e, 'bob', 1001)  # reads the image's /etc/passwd from the erofs file, no mount\n"
                  "e.detach()\n"
                  "print(s.disk)\n"
                  "print(e.scratch)\n")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               script, f"oci:{work / 'layout'}:t", str(work / "cache")], capture_output=True,
                              text=True, env={**os.environ, "HOME": str(work)})
        assert proc.returncode == 0, proc.stderr
        disk, scratch = (Path(line) for line in proc.stdout.split())
        passwd = debugfs(scratch, "cat /upper/etc/passwd")
        assert passwd.startswith("root:x:0:0::/root:/bin/sh\n") and "bob:x:1001" in passwd, passwd
        assert disk.stat().st_uid == 65534
        assert debugfs(disk, "cat /etc/hostname") == "nobody\n"
        assert "alice:x:1000" in debugfs(disk, "cat /etc/passwd")
        assert "User:     0" in debugfs(disk, "stat /etc/passwd")  # the image's owners, not the caller's
        fsck(disk)
    finally:
        shutil.rmtree(work, ignore_errors=True)
