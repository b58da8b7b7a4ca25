"""Shared fixtures: image layouts built from layer tars, and skip rules that say what a test needs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dirge.sources.layout import LayoutWriter  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, device nodes, setpriv)")


def needs_tool(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (installed by scripts/setup.sh --test)")


@pytest.fixture
def make_image(tmp_path: Path):
    """``make_image([layer_tar, ...], **add_image_kwargs) -> "oci:PATH:TAG"`` in a fresh layout."""
    counter = iter(range(1_000_000))

    def make(layers: list[bytes], *, tag: str = "t", **kwargs) -> str:
        layout = tmp_path / f"layout{next(counter)}"
        LayoutWriter(layout).add_image(layers, tag=tag, **kwargs)
        return f"oci:{layout}:{tag}"

    return make


@pytest.fixture
def loop_fs(tmp_path: Path):
    """``loop_fs("xfs"|"btrfs") -> mountpoint``: a loop-mounted filesystem, detached in teardown."""
    import subprocess

    attached: list[tuple[Path, str]] = []

    def make(fstype: str) -> Path:
        mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}[fstype]
        if os.geteuid() != 0 or shutil.which(mkfs[0]) is None or shutil.which("losetup") is None:
            pytest.skip(f"needs root, {mkfs[0]} and losetup for a loop-mounted {fstype}")
        image = tmp_path / f"{fstype}.img"
        with open(image, "wb") as f:
            f.truncate(512 << 20)
        subprocess.run(mkfs + [str(image)], check=True, capture_output=True)
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                text=True).stdout.strip()
        mnt = tmp_path / f"{fstype}-mnt"
        mnt.mkdir()
        attached.append((mnt, device))
        subprocess.run(["mount", device, str(mnt)], check=True)
        return mnt

    yield make
    for mnt, device in reversed(attached):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)
