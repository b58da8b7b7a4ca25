"""Sessions on erofs bases: many overlay sessions over one read-only image, and crash safety while an
erofs base is being written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from treecmp import file_sha256
from conftest import needs_root, needs_tool
from dirge.fsimage.mount import mounts_under
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import prepare
from dirge.session import Sessions
from dirge.store.cache import Cache

pytestmark = [needs_root, needs_tool("fsck.erofs")]


def base_images(cache: Path) -> list[Path]:
    return sorted((cache / "bases").glob("*/rootfs.erofs"))


def test_sixteen_sessions_share_one_erofs_base(tmp_path: Path, make_image) -> None:
    layer = LayerBuilder().dir("etc").file("etc/motd", b"base motd\n").dir("data")
    for i in range(16):
        layer = layer.file(f"data/f{i}", f"base {i}\n".encode())
    ref = make_image([layer.build()])
    cache = tmp_path / "cache"
    first = prepare(ref, cache, base_format="erofs")
    assert first.base_format == "erofs" and first.strategy == "overlay"
    [image] = base_images(cache)
    before = file_sha256(image)

    def work(i: int):
        s = prepare(ref, cache, base_format="erofs")
        root = s.path
        (root / f"mine-{i}").write_text(f"session {i}\n")  # new file
        (root / "etc/motd").write_text(f"motd of {i}\n")  # replaced
        os.unlink(root / f"data/f{i}")  # deleted
        os.rename(root / f"data/f{(i + 1) % 16}", root / f"data/renamed-{i}")
        return s

    with ThreadPoolExecutor(8) as pool:
        sessions = list(pool.map(work, range(16)))
    try:
        for i, s in enumerate(sessions):
            root = s.path
            names = sorted(os.listdir(root / "data"))
            expected = sorted({f"f{j}" for j in range(16)} - {f"f{i}", f"f{(i + 1) % 16}"} | {f"renamed-{i}"})
            assert names == expected, (i, names)
            assert (root / "etc/motd").read_text() == f"motd of {i}\n"
            assert [n for n in os.listdir(root) if n.startswith("mine-")] == [f"mine-{i}"]
        assert (first.path / "etc/motd").read_text() == "base motd\n"
        assert sorted(os.listdir(first.path / "data")) == sorted(f"f{j}" for j in range(16))
        assert file_sha256(image) == before, "a session wrote into the shared base image"
        assert len(base_images(cache)) == 1
    finally:
        for s in sessions:
            s.close()
        first.close()
    assert not [m for m in mounts_under(cache / "sessions")], "session rm left a mount behind"
    assert not os.listdir(cache / "sessions")
    assert file_sha256(image) == before


def _kill_script(ref: str, cache: Path) -> str:
    return (
        "import sys\n"
        "from dirge.rootfs import prepare\n"
        f"s = prepare({ref!r}, {str(cache)!r}, base_format='erofs')\n"
        "s.detach()\n"
        "print('ok', flush=True)\n"
    )


def _losetup_for(cache: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(cache) in line]


@needs_tool("losetup")
def test_sigkill_while_an_erofs_base_is_written(tmp_path: Path, make_image) -> None:
    """Killed at several points of the write, a prepare never publishes a partial image, leaks no
    mount or loop device, and the next prepare succeeds at once."""
    layer = LayerBuilder()
    for d in range(40):
        layer = layer.dir(f"d{d}")
        for f in range(100):
            layer = layer.file(f"d{d}/f{f}", os.urandom(2000 + 97 * f))
    ref = make_image([layer.build()])
    cache = tmp_path / "cache"
    # The final size, from a complete build elsewhere, tells where the kill points are.
    reference = prepare(ref, tmp_path / "ref-cache", base_format="erofs")
    full = base_images(tmp_path / "ref-cache")[0].stat().st_size
    reference.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for fraction in (0.0, 0.1, 0.4, 0.8, 0.99):
        proc = subprocess.Popen([sys.executable, "-c", _kill_script(ref, cache)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        killed = False
        while proc.poll() is None and time.monotonic() < deadline:
            staged = list((cache / "staging").glob("*/rootfs.erofs")) if (cache / "staging").exists() else []
            if staged:
                try:
                    size = staged[0].stat().st_size
                except FileNotFoundError:
                    continue
                if size >= fraction * full:
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
        proc.wait(timeout=60)
        if not killed:  # it finished before reaching this point: still a valid run
            assert proc.returncode == 0, proc.stderr.read()
        for image in base_images(cache):  # whatever was published is whole
            fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
            assert fsck.returncode == 0, f"published a broken image after a kill at {fraction}: {fsck.stderr}"
        assert not mounts_under(cache / "staging"), "a staging image was mounted"
        assert not [line for line in _losetup_for(cache) if "/staging/" in line], "a loop device leaked"
        for s in Sessions(Cache(cache)).list():  # sessions of the killed process
            Sessions(Cache(cache)).remove(s.id)
    started = time.monotonic()
    after = prepare(ref, cache, base_format="erofs", lock_timeout=5)
    try:
        assert time.monotonic() - started < 30
        assert (after.path / "d39/f99").stat().st_size == 2000 + 97 * 99
        [image] = base_images(cache)
        assert subprocess.run(["fsck.erofs", str(image)], capture_output=True).returncode == 0
    finally:
        after.close()
    assert not [line for line in _losetup_for(cache) if "/staging/" in line]


def test_base_remounted_when_needed_and_removed_by_cleanup(tmp_path: Path, make_image) -> None:
    """After a reboot (here: the base's mount undone by hand) the next prepare mounts it again;
    ``cleanup`` of a base directory unmounts and removes it, and the next prepare rebuilds it."""
    from dirge.fsimage.mount import mounted_at, unmount
    from dirge.rootfs import cleanup

    ref = make_image([LayerBuilder().file("hello", b"hi\n").build()])
    cache = tmp_path / "cache"
    with prepare(ref, cache, base_format="erofs") as s:
        base_dir = cache / "bases" / s.info.base
    assert mounted_at(base_dir / "rootfs") == "erofs"
    unmount(base_dir / "rootfs")
    with prepare(ref, cache, base_format="erofs") as s:
        assert not s.base_created and (s.path / "hello").read_bytes() == b"hi\n"
        assert mounted_at(base_dir / "rootfs") == "erofs"
    cleanup(base_dir)
    assert not base_dir.exists() and not mounts_under(cache)
    with prepare(ref, cache, base_format="erofs") as s:
        assert s.base_created and (s.path / "hello").read_bytes() == b"hi\n"
