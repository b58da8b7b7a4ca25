"""Judged from outside: what dirge pulls from a registry, and what a session shows, equal what skopeo +
umoci make of the same image (not dirge's own unpack), directory and symlink times included."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge import unpack
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import prepare
from dirge.sources.layout import LayoutWriter
from registry import push_layout
from test_conformance import umoci_unpack
from treecmp import diff, snapshot

pytestmark = [needs_root, needs_tool("umoci", "skopeo")]


def timed_image() -> list[bytes]:
    """Two layers where every directory and symlink carries its own mtime (and the second layer changes
    some), so a sink that forgets a time, or sets it before a child lands, differs."""
    base = LayerBuilder()
    for i, d in enumerate(("etc", "usr", "usr/bin", "usr/lib", "var", "var/cache", "opt", "opt/app")):
        base.dir(d, mtime=1_000_000 + i * 1000)
    base.dir("home", mode=0o755, mtime=1_500_000).dir("home/u", mode=0o700, uid=1000, gid=1000, mtime=1_600_000)
    base.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime=2_000_000)
    base.file("usr/bin/tool", b"#!/bin/sh\n", mode=0o4755, mtime=2_000_001)
    base.symlink("usr/bin/alias", "tool", mtime=2_100_000)
    base.symlink("opt/app/current", "/usr/lib", mtime=2_200_000)
    base.file("var/cache/old", b"old", mtime=2_300_000)
    base.file("home/u/.profile", b"x", uid=1000, gid=1000, mtime=2_400_000, xattrs={"user.k": b"v"})
    top = LayerBuilder()
    top.dir("var/cache", mtime=3_000_000).whiteout("var/cache/old")
    top.file("var/cache/new", b"new", mtime=3_000_100)
    top.dir("opt/app", mtime=3_100_000).symlink("opt/app/current", "/usr/bin", mtime=3_100_100)
    top.hardlink("usr/lib/tool-link", "usr/bin/tool")
    return [base.build(), top.build()]


@pytest.fixture
def pushed(registry, tmp_path: Path) -> tuple[str, Path]:
    """The image in the loopback registry, and umoci's unpack of it as skopeo pulled it."""
    LayoutWriter(tmp_path / "layout").add_image(timed_image(), tag="1")
    ref = f"{registry.host}/outside/timed:1"
    push_layout(tmp_path / "layout", "1", ref)
    pulled = tmp_path / "skopeo"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{pulled}:1"],
                   check=True, capture_output=True)
    reference = tmp_path / "umoci"
    umoci_unpack(f"oci:{pulled}:1", reference)
    return ref, reference


def test_registry_pull_equals_skopeo_and_umoci(pushed: tuple[str, Path], tmp_path: Path) -> None:
    ref, reference = pushed
    ours = tmp_path / "dirge"
    unpack(ref, ours, cache=tmp_path / "cache")
    mine = snapshot(ours, all_mtimes=True)
    differences = diff(mine, snapshot(reference, all_mtimes=True))
    assert not differences, "\n".join(differences)
    # the times compared are the image's (a directory changed by layer 2, a replaced symlink)
    assert mine["entries"]["var/cache"]["mtime"] == 3_000_000 * 10**9
    assert mine["entries"]["opt/app/current"]["mtime"] == 3_100_100 * 10**9


@pytest.mark.parametrize("base_format", ["tree", "erofs"])
def test_session_equals_skopeo_and_umoci(base_format: str, pushed: tuple[str, Path], tmp_path: Path) -> None:
    ref, reference = pushed
    with prepare(ref, tmp_path / "cache", base_format=base_format) as session:
        # the session's root directory itself is the session's, not the image's: compare below it
        differences = diff(snapshot(session.path, all_mtimes=True), snapshot(reference, all_mtimes=True))
    assert not differences, "\n".join(differences)
