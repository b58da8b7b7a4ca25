"""Exact in every sink (issue 18): the tree (``unpack``), the erofs writer and the ext4 writer give the same
rootfs as the reference (umoci, or GNU tar where umoci has no say), whatever the order of whiteouts and
the entries they spare, the caller's umask and cwd, a tar owner of -1, and for directories no entry names."""

from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import needs_root, needs_tool
from dirge import unpack
from dirge.apply.fs import ROOTLESS_XATTR, Report, decode_rootless_owner
from dirge.fsimage.mount import mount_erofs, unmount
from dirge.oci.image import OCI_CONFIG, OCI_MANIFEST, host_platform
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter
from dirge.sources.open import open_image
from dirge.flatten import write_erofs, write_ext4
from test_conformance import umoci_unpack
from treecmp import diff, file_sha256, snapshot

pytestmark = [needs_root, needs_tool("umoci", "fsck.erofs", "e2fsck", "tar")]

UNSET = 4294967295  # tar's -1


def sink_outputs(ref: str, where: Path, **snap: Any) -> Iterator[tuple[str, dict[str, Any], Report]]:
    """(sink, snapshot of its rootfs, its report) for the tree, the erofs image and the ext4 disk of
    ``ref``; the images pass their fsck and are mounted read-only only while snapshotted."""
    where.mkdir()
    result = unpack(ref, where / "tree")
    yield "tree", snapshot(where / "tree", **snap), result.report
    for sink, write, fsck in (("erofs", write_erofs, ["fsck.erofs"]), ("ext4", write_ext4, ["e2fsck", "-fn"])):
        image = where / f"img.{sink}"
        source, resolved = open_image(ref)
        try:
            report = write(source, resolved, image)
        finally:
            source.close()
        check = subprocess.run([*fsck, str(image)], capture_output=True, text=True)
        assert check.returncode == 0, f"{sink}: {check.stdout}{check.stderr}"
        mnt = where / f"mnt-{sink}"
        mnt.mkdir()
        if sink == "erofs":
            mount_erofs(image, mnt)
        else:
            subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True)
        try:
            snap_ = snapshot(mnt, **snap)
        finally:
            unmount(mnt)
        yield sink, snap_, report


def all_sinks(ref: str, where: Path, **snap: Any) -> dict[str, tuple[dict[str, Any], Report]]:
    return {sink: (s, r) for sink, s, r in sink_outputs(ref, where, **snap)}


# -- whiteouts: lower layers only, in any entry order ---------------------------------------------------

LOWER = (LayerBuilder().dir("b", mode=0o750, uid=5, gid=6).file("b/x", b"lower x").dir("b/sub", mode=0o700)
         .file("b/sub/z", b"lower z").dir("c").file("c/keep", b"kept").build())

# upper layer → the paths under b/ that must remain (c/ is never touched)
WHITEOUT_CASES: dict[str, tuple[Callable[[LayerBuilder], LayerBuilder], set[str]]] = {
    "dir-then-whiteout": (lambda u: u.dir("b", mode=0o711).whiteout("b"), {"b"}),
    "whiteout-then-dir": (lambda u: u.whiteout("b").dir("b", mode=0o711), {"b"}),
    "dir-child-then-whiteout": (lambda u: u.dir("b", mode=0o711).file("b/y", b"y").whiteout("b"), {"b", "b/y"}),
    "whiteout-then-dir-child": (lambda u: u.whiteout("b").dir("b", mode=0o711).file("b/y", b"y"), {"b", "b/y"}),
    "child-then-whiteout": (lambda u: u.file("b/y", b"y").whiteout("b"), {"b", "b/y"}),
    "subdir-then-whiteout": (lambda u: u.dir("b").dir("b/sub", mode=0o701).whiteout("b"), {"b", "b/sub"}),
    "opaque-before-dir": (lambda u: u.opaque("b").dir("b", mode=0o711).file("b/y", b"y"), {"b", "b/y"}),
    "opaque-after-dir": (lambda u: u.dir("b", mode=0o711).file("b/y", b"y").opaque("b"), {"b", "b/y"}),
    "opaque-after-dir-alone": (lambda u: u.dir("b", mode=0o711).opaque("b"), {"b"}),
    "opaque-after-subdir": (lambda u: u.dir("b").dir("b/sub", mode=0o701).opaque("b"), {"b", "b/sub"}),
}


@pytest.mark.parametrize("case", list(WHITEOUT_CASES))
def test_whiteouts_hide_lower_layers_only_in_any_order(case: str, tmp_path: Path, make_image) -> None:
    """A layer that declares b/ (with or without children) and whites b out, or marks it opaque, in
    either order: the lower layer's b/x and b/sub/z go, what this layer wrote stays; every sink as umoci."""
    build, kept = WHITEOUT_CASES[case]
    ref = make_image([LOWER, build(LayerBuilder()).build()])
    theirs = tmp_path / "umoci"
    umoci_unpack(ref, theirs)
    reference = snapshot(theirs)
    for sink, (ours, _) in all_sinks(ref, tmp_path / "sinks").items():
        assert set(ours["entries"]) == kept | {"c", "c/keep"}, sink
        differences = diff(ours, reference)
        assert not differences, f"{sink} vs umoci:\n" + "\n".join(differences)


# -- no umask, no cwd in the output ------------------------------------------------------------------

_RUN_UNDER_UMASK = """
import os, sys
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from dirge import unpack
from dirge.session.customize import FileSpec, add_user, write_files
from dirge.sources.open import open_image
from dirge.flatten import write_erofs, write_ext4
ref = sys.argv[1]
unpack(ref, "tree")  # relative to the cwd, as a caller may give it
write_files("tree", {"/new/deep/f": FileSpec(b"f", 0o640), "/etc/motd": b"hi"})
add_user("tree", "alice", 1000)  # /home is not in the image: made as a parent
source, resolved = open_image(ref)
try:
    write_erofs(source, resolved, Path("img.erofs"))
    write_ext4(source, resolved, Path("img.ext4"))
finally:
    source.close()
"""


def umask_layers() -> list[bytes]:
    lower = (LayerBuilder().file("a/b/c/f", b"implicit parents", mode=0o666).file("a/x", b"x", mode=0o777)
             .dir("d", mode=0o777).fifo("d/p", mode=0o666).symlink("d/l", "../a/x").build())
    upper = LayerBuilder().file("d/e/f", b"implicit under a declared 0777", mode=0o664).build()
    return [lower, upper]


@pytest.mark.parametrize("umask", ["027", "077"])
def test_output_does_not_depend_on_umask_or_cwd(umask: str, tmp_path: Path, make_image) -> None:
    """The same image unpacked, customised (files=, add_user) and exported under umask 022 and
    ``umask``, each from its own cwd with relative paths: the same trees, byte-identical images."""
    ref = make_image(umask_layers())
    src = str(Path(__import__("dirge").__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = {}
    for mask in ("022", umask):
        cwd = tmp_path / f"umask{mask}"
        cwd.mkdir()
        proc = subprocess.run([sys.executable, "-c", _RUN_UNDER_UMASK, ref, mask], cwd=cwd, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[mask] = cwd
    base, other = runs["022"], runs[umask]
    # customisation writes files now: their mtimes are the clock's, everything else must be equal
    differences = diff(snapshot(other / "tree", mtimes=False, with_root=True),
                       snapshot(base / "tree", mtimes=False, with_root=True))
    assert not differences, f"umask {umask} vs 022:\n" + "\n".join(differences)
    tree = snapshot(base / "tree", with_root=True)["entries"]
    for implicit in (".", "a", "a/b", "a/b/c", "d/e", "new", "new/deep", "home"):
        assert (tree[implicit]["mode"], tree[implicit]["uid"], tree[implicit]["gid"]) == (0o755, 0, 0), implicit
    assert tree["a/x"]["mode"] == 0o777 and tree["d"]["mode"] == 0o777 and tree["d/p"]["mode"] == 0o666
    assert (tree["home/alice"]["mode"], tree["home/alice"]["uid"]) == (0o755, 1000)
    for image in ("img.erofs", "img.ext4"):
        assert file_sha256(other / image) == file_sha256(base / image), f"{image} differs under umask {umask}"


# -- tar's -1 owner ---------------------------------------------------------------------------------

def unset_owner_layers() -> list[bytes]:
    """What GNU tar and Python's tarfile write for an id of 4294967295: GNU base-256 and a PAX record."""
    gnu = (LayerBuilder(tarfile.GNU_FORMAT).file("gnu-both", b"g", uid=UNSET, gid=UNSET)
           .dir("gnu-dir", mode=0o750, uid=7, gid=UNSET).file("gnu-dir/f", b"f", mode=0o4755, uid=UNSET, gid=9)
           .build())
    pax = (LayerBuilder().file("pax-uid", b"p", uid=UNSET, gid=3).dir("pax-dir", mode=0o700, uid=UNSET, gid=UNSET)
           .symlink("pax-dir/l", "../pax-uid", uid=UNSET, gid=4).file("pax-ok", b"ok", uid=5, gid=5).build())
    return [gnu, pax]


def gnu_tar_extract(layers: list[bytes], dest: Path) -> dict[str, Any]:
    """GNU tar as root (owners and modes kept, ids as numbers), layer after layer."""
    dest.mkdir()
    for i, layer in enumerate(layers):
        tar = dest.parent / f"layer{i}.tar"
        tar.write_bytes(layer)
        subprocess.run(["tar", "--numeric-owner", "-xpf", str(tar), "-C", str(dest)], check=True, capture_output=True)
    return snapshot(dest)


def test_owner_minus_one_is_left_to_the_extracting_user(tmp_path: Path, make_image) -> None:
    """An owner or group of 4294967295 is extracted as GNU tar does as root (0), in every sink, and each
    such path is in ``Report.skipped``."""
    layers = unset_owner_layers()
    ref = make_image(layers)
    reference = gnu_tar_extract(layers, tmp_path / "gnu-tar")
    assert (reference["entries"]["gnu-both"]["uid"], reference["entries"]["gnu-both"]["gid"]) == (0, 0)
    for sink, (ours, report) in all_sinks(ref, tmp_path / "sinks").items():
        differences = diff(ours, reference)
        assert not differences, f"{sink} vs GNU tar:\n" + "\n".join(differences)
        skipped = {line.split(":", 1)[0] for line in report.skipped if "4294967295" in line}
        assert skipped == {"gnu-both", "gnu-dir", "gnu-dir/f", "pax-uid", "pax-dir", "pax-dir/l"}, (sink, report.skipped)


def test_owner_minus_one_rootless_is_the_callers(tmp_path: Path, make_image) -> None:
    """Rootless, an id of -1 is what an owner 0 is there: the caller's (no ``user.rootlesscontainers``
    entry for it), while the other id of the pair is kept."""
    ref = make_image(unset_owner_layers())
    result = unpack(ref, tmp_path / "rootless", rootless=True)
    dest = tmp_path / "rootless"
    assert ROOTLESS_XATTR not in os.listxattr(dest / "gnu-both")
    assert decode_rootless_owner(os.getxattr(dest / "gnu-dir", ROOTLESS_XATTR)) == (7, 0)
    assert decode_rootless_owner(os.getxattr(dest / "gnu-dir/f", ROOTLESS_XATTR)) == (0, 9)
    assert decode_rootless_owner(os.getxattr(dest / "pax-ok", ROOTLESS_XATTR)) == (5, 5)
    assert any(line.startswith("gnu-both: ") and "4294967295" in line for line in result.report.skipped)


def test_group_minus_one_under_a_setgid_directory_is_gnu_tars(tmp_path: Path, make_image) -> None:
    """A new inode in a setgid directory gets that directory's group from the kernel. GNU tar extracts into
    directories still 0700 (their modes come last), so a group of -1 is 0 there too, and so it is in every
    dirge sink; umoci (like containerd) leaves the directory's group: the one known difference, which
    bench/fuzz.py found and its generator now steers around."""
    layers = [LayerBuilder().dir("s", mode=0o2775, gid=1000).file("s/f", b"f", uid=3, gid=UNSET)
              .dir("s/d", mode=0o755, gid=UNSET).file("s/g", b"g", uid=UNSET, gid=7).build()]
    ref = make_image(layers)
    reference = gnu_tar_extract(layers, tmp_path / "gnu-tar")
    entries = reference["entries"]
    assert [(entries[p]["uid"], entries[p]["gid"]) for p in ("s/f", "s/d", "s/g")] == [(3, 0), (0, 0), (0, 7)]
    for sink, (ours, _) in all_sinks(ref, tmp_path / "sinks").items():
        differences = diff(ours, reference)
        assert not differences, f"{sink} vs GNU tar:\n" + "\n".join(differences)
    theirs = tmp_path / "umoci"
    umoci_unpack(ref, theirs)
    assert sorted(diff(reference, snapshot(theirs))) == ["s/d: gid: 0 != 1000", "s/f: gid: 0 != 1000"]


def _cpython_testtar() -> Path | None:
    stdlib = sysconfig.get_paths()["stdlib"]
    for pattern in (f"{stdlib}/test/archivetestdata/testtar.tar", f"{stdlib}/test/testtar.tar",
                    "/usr/lib/python3*/test/archivetestdata/testtar.tar", "/usr/lib/python3*/test/testtar.tar"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[-1])
    return None


def test_cpython_testtar_owner_minus_one(tmp_path: Path, make_image) -> None:
    """CPython's own test archive, whose gnu/regtype-gnu-uid has owner and group 4294967295, is accepted
    by every sink, and that member comes out as GNU tar extracts it."""
    archive = _cpython_testtar()
    if archive is None:
        pytest.skip("CPython's test package (testtar.tar) is not installed")
    layer = archive.read_bytes()
    ref = make_image([layer])
    reference = gnu_tar_extract([layer], tmp_path / "gnu-tar")["entries"]["gnu/regtype-gnu-uid"]
    assert (reference["uid"], reference["gid"]) == (0, 0)
    for sink, (ours, report) in all_sinks(ref, tmp_path / "sinks").items():
        assert ours["entries"]["gnu/regtype-gnu-uid"] == reference, sink
        assert any(line.startswith("gnu/regtype-gnu-uid: ") for line in report.skipped), (sink, report.skipped)


# -- one mtime rule for directories no entry names ------------------------------------------------------

def image_with_created(tmp_path: Path, layers: list[bytes], created: str | None) -> str:
    """An uncompressed layout whose config has ``created`` (``make_image`` writes none)."""
    writer = LayoutWriter(tmp_path / "layout")
    plat = host_platform()
    descs = [writer.add_blob(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers]
    config = {"architecture": plat.architecture, "os": plat.os, "config": {},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]},
              **({"created": created} if created else {})}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": writer.add_json(config, OCI_CONFIG),
                "layers": descs}
    writer.tag(writer.add_json(manifest, OCI_MANIFEST), "t")
    return f"oci:{writer.path}:t"


def implicit_layers() -> list[bytes]:
    lower = (LayerBuilder().dir("s", mode=0o2775, gid=50).file("top/deep/f", b"f")
             .symlink("dang", "made/here").dir("named", mode=0o700, mtime=1_234_567_890).build())
    upper = LayerBuilder().file("s/t/u/f", b"under setgid").file("dang/f", b"via a dangling link").build()
    return [lower, upper]


@pytest.mark.parametrize("created", [None, "2021-06-01T12:00:00Z"])
def test_implicit_parents_same_mode_owner_and_mtime_in_every_sink(created: str | None, tmp_path: Path) -> None:
    """Directories no entry names (parents, a dangling link's target, one under a setgid directory, and
    the root when no layer names it) are 0755 root:root with the image's build time (config ``created``,
    else 0) as mtime, in the tree, the erofs image and the ext4 disk alike."""
    ref = image_with_created(tmp_path, implicit_layers(), created)
    expected_ns = 1_622_548_800 * 10**9 if created else 0
    outputs = all_sinks(ref, tmp_path / "sinks", all_mtimes=True, with_root=True)
    tree = outputs["tree"][0]
    for implicit in (".", "top", "top/deep", "s/t", "s/t/u", "made", "made/here"):
        entry = tree["entries"][implicit]
        assert (entry["mode"], entry["uid"], entry["gid"], entry["mtime"]) == (0o755, 0, 0, expected_ns), implicit
    assert tree["entries"]["named"]["mtime"] == 1_234_567_890 * 10**9
    for sink in ("erofs", "ext4"):
        differences = diff(outputs[sink][0], tree)
        assert not differences, f"{sink} vs tree:\n" + "\n".join(differences)
