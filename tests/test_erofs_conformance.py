"""The image writers give the tree path's result: every conformance image, written as an erofs image by
dirge straight from its layers, mounted by the kernel, equals the tree base and umoci's unpack; every
image passes ``fsck.erofs``, reads with ``dump.erofs -s`` and rebuilds byte-identically; as an ext4
disk, every image passes ``e2fsck -fn`` and loop-mounts equal to the tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge import unpack
from dirge.fsimage.mount import mount_erofs, unmount
from dirge.sources.open import open_image
from dirge.flatten import write_erofs
from images import layered, metadata
from test_conformance import CASE_NAMES, CASES, GNU_ONLY, check_layer_rules, umoci_unpack
from treecmp import diff, ext4_disk_differences, file_sha256, snapshot

pytestmark = [needs_root, needs_tool("fsck.erofs", "dump.erofs", "umoci")]


def erofs_image(ref: str, path: Path) -> Path:
    source, resolved = open_image(ref)
    try:
        write_erofs(source, resolved, path)
    finally:
        source.close()
    return path


@pytest.fixture
def mounted(tmp_path: Path):
    """``mounted(image) -> mountpoint``; every mount is undone in teardown, even after a failure."""
    points: list[Path] = []

    def mount(image: Path) -> Path:
        target = tmp_path / f"mnt{len(points)}"
        target.mkdir()
        mount_erofs(image, target)
        points.append(target)
        return target

    yield mount
    for target in reversed(points):
        unmount(target)


def check_image(image: Path) -> None:
    fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run(["dump.erofs", "-s", str(image)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Filesystem magic number" in dump.stdout, dump.stdout + dump.stderr


@pytest.mark.parametrize("name", CASE_NAMES)
def test_erofs_equals_tree_and_umoci(name: str, tmp_path: Path, make_image, mounted) -> None:
    layers = CASES[name](tmp_path)
    ref = make_image(layers)
    tree = tmp_path / "tree"
    unpack(ref, tree)
    image = erofs_image(ref, tmp_path / "a.erofs")
    check_image(image)
    assert file_sha256(erofs_image(ref, tmp_path / "b.erofs")) == file_sha256(image), "a rebuild is not byte-identical"
    ours = snapshot(mounted(image))
    differences = diff(ours, snapshot(tree))
    assert not differences, "erofs vs tree:\n" + "\n".join(differences)
    if name not in GNU_ONLY:  # umoci 0.4 rejects old-GNU sparse entries
        theirs = tmp_path / "umoci"
        umoci_unpack(ref, theirs)
        differences = diff(ours, snapshot(theirs))
        assert not differences, "erofs vs umoci:\n" + "\n".join(differences)


def test_erofs_layer_rules_hold(tmp_path: Path, make_image, mounted) -> None:
    ref = make_image(layered() + metadata())
    image = erofs_image(ref, tmp_path / "img.erofs")
    check_image(image)
    check_layer_rules(mounted(image))


def test_erofs_sparse_files_keep_holes(tmp_path: Path, make_image, mounted) -> None:
    from images import gnu_tar

    for fmt in ("gnu", "posix"):
        ref = make_image([gnu_tar(tmp_path, fmt)])
        image = erofs_image(ref, tmp_path / f"{fmt}.erofs")
        check_image(image)
        path = mounted(image) / "sparse/holes.bin"
        assert path.stat().st_size == 2_000_003
        # erofs reports i_blocks from i_size for every uncompressed inode: the image's size shows the holes
        assert image.stat().st_size < 400_000, "the image holds the holes as data"
        data = path.read_bytes()
        assert data[:300_000] == bytes(300_000) and data[-3:] == b"end"


def test_dead_data_does_not_stay(tmp_path: Path, make_image, mounted) -> None:
    """Files a later layer removes or replaces leave no data behind in the image."""
    from dirge.layerbuild import LayerBuilder

    big = os.urandom(4 << 20)
    lower = LayerBuilder().dir("d").file("d/big", big).file("replaced", big).file("kept", b"k" * 10000).build()
    upper = LayerBuilder().whiteout("d").file("replaced", b"small").build()
    ref = make_image([lower, upper])
    image = erofs_image(ref, tmp_path / "img.erofs")
    check_image(image)
    assert image.stat().st_size < 1 << 20, f"{image.stat().st_size} bytes: removed data stayed in the image"
    root = mounted(image)
    assert sorted(os.listdir(root)) == ["kept", "replaced"]
    assert (root / "replaced").read_bytes() == b"small"


@needs_tool("e2fsck")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_ext4_export_equals_the_tree(name: str, tmp_path: Path, make_image) -> None:
    """Every conformance image as an ext4 disk (issue 11): e2fsck-clean, loop-mounted equal to the tree."""
    from dirge import export

    ref = make_image(CASES[name](tmp_path))
    tree = tmp_path / "tree"
    unpack(ref, tree)
    disk = export(ref, tmp_path / "root.ext4", format="ext4").path
    differences = ext4_disk_differences(disk, snapshot(tree), tmp_path / "mnt")
    assert not differences, "ext4 vs tree:\n" + "\n".join(differences)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_reader_reads_every_file_without_mounting(name: str, tmp_path: Path, make_image) -> None:
    """``fsimage.erofs_read`` (what rootless erofs disk sessions use) returns every regular file's bytes,
    follows symlinks inside the image, and says None for what is absent or not a file."""
    from dirge.fsimage.erofs_read import read_erofs_file

    ref = make_image(CASES[name](tmp_path))
    tree = tmp_path / "tree"
    unpack(ref, tree)
    image = erofs_image(ref, tmp_path / "img.erofs")
    checked = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for entry in filenames:
            full = Path(dirpath) / entry
            rel = "/" + str(full.relative_to(tree))
            if full.is_symlink():
                target = full.resolve()
                expected = target.read_bytes() if target.is_relative_to(tree) and target.is_file() else None
                if not os.readlink(full).startswith("/"):
                    assert read_erofs_file(image, rel) == expected, rel
            elif full.is_file():
                assert read_erofs_file(image, rel) == full.read_bytes(), rel
                checked += 1
    assert checked > 0 or name == "empty-layer"
    assert read_erofs_file(image, "/no/such/file") is None
    assert read_erofs_file(image, "/") is None
