"""DirSink skips the owner, mode and open calls a new inode does not need (most directories are one
``mkdir``, most symlinks no ``fchownat``): the result must be what the calls would have given, in the
cases where the kernel's defaults differ from the image (setgid parents, the destination's own setgid
bit and group, special mode bits, modes the umask would mask, owners that are not ours)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import needs_root
from dirge.layerbuild import LayerBuilder

pytestmark = [needs_root]

SG_GID = 50


def layers() -> list[bytes]:
    lower = (LayerBuilder()
             .dir("plain", mode=0o755).dir("plain/sub", mode=0o755).file("plain/sub/f", b"f", mode=0o644)
             .symlink("plain/ln", "sub")
             .dir("sg", mode=0o2775, gid=SG_GID)
             .dir("sg/d", mode=0o755).file("sg/f", b"g", mode=0o644).symlink("sg/ln", "f")
             .dir("sg/keep", mode=0o2770, gid=SG_GID)
             .dir("plain/sticky", mode=0o1777).dir("plain/wide", mode=0o777).dir("plain/tight", mode=0o700)
             .dir("plain/owned", mode=0o750, uid=1000, gid=1000).symlink("plain/owned/ln", "x", uid=7, gid=8)
             .dir("top", mode=0o755).file("topfile", b"t", mode=0o644).symlink("toplink", "top")
             .build())
    upper = LayerBuilder().dir("plain/sub", mode=0o711, uid=3, gid=4).dir("sg/d2", mode=0o755).build()
    return [lower, upper]


EXPECTED = {  # path: (mode or None for a symlink, uid, gid)
    "plain": (0o755, 0, 0), "plain/sub": (0o711, 3, 4), "plain/sub/f": (0o644, 0, 0), "plain/ln": (None, 0, 0),
    "sg": (0o2775, 0, SG_GID), "sg/d": (0o755, 0, 0), "sg/f": (0o644, 0, 0), "sg/ln": (None, 0, 0),
    "sg/keep": (0o2770, 0, SG_GID), "sg/d2": (0o755, 0, 0),
    "plain/sticky": (0o1777, 0, 0), "plain/wide": (0o777, 0, 0), "plain/tight": (0o700, 0, 0),
    "plain/owned": (0o750, 1000, 1000), "plain/owned/ln": (None, 7, 8),
    "top": (0o755, 0, 0), "topfile": (0o644, 0, 0), "toplink": (None, 0, 0),
}

UNPACK = r"""
import os, sys
from dirge import unpack
from dirge.flatten import apply_image, open_image
os.umask(int(sys.argv[3], 8))
if sys.argv[4] == "unpack":
    unpack(sys.argv[1], sys.argv[2])
else:  # the sink straight onto the caller's (setgid) directory, as a base build or a library caller may
    source, resolved = open_image(sys.argv[1])
    try:
        apply_image(source, resolved, sys.argv[2], rootless=False)
    finally:
        source.close()
"""


def check(tree: Path) -> list[str]:
    wrong = []
    for rel, (mode, uid, gid) in EXPECTED.items():
        st = os.lstat(tree / rel)
        got = (None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        if got != (mode, uid, gid):
            wrong.append(f"{rel}: {got} != {(mode, uid, gid)}")
    return wrong


def test_skipped_calls_leave_the_image_metadata_in_a_setgid_destination(tmp_path: Path, make_image) -> None:
    """The destination (``apply_image``) or its parent (``unpack``) is setgid and owned by another group,
    under umasks 022 and 077: every inode still has the image's owner and mode (an image that does not
    name the root leaves the caller's directory as it was: the kernel's defaults there are not ours)."""
    ref = make_image(layers())
    outer = tmp_path / "setgid"
    outer.mkdir()
    os.chown(outer, 0, SG_GID)
    os.chmod(outer, 0o2775)
    for how in ("unpack", "apply_image"):
        for umask in ("022", "077"):
            dest = outer / f"{how}{umask}"
            if how == "apply_image":
                dest.mkdir()  # setgid, group SG_GID: inherited from ``outer``
                assert os.stat(dest).st_mode & stat.S_ISGID and os.stat(dest).st_gid == SG_GID
            subprocess.run([sys.executable, "-c", UNPACK, ref, str(dest), umask, how], check=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            assert check(dest) == [], (how, umask)


COPY = r"""
import os, sys
from pathlib import Path
from dirge.session.copytree import copy_tree
os.umask(int(sys.argv[3], 8))
copy_tree(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_copy_tree_skipped_calls_keep_full_fidelity(tmp_path: Path, make_image) -> None:
    """A copy session's tree copy makes files with their final permission bits and skips the owner and
    mode calls they do not need: copied into a setgid directory of another group under umasks 022 and
    077, the copy is still the tree (owners, modes incl. setuid/setgid/sticky, times, contents)."""
    from dirge import unpack
    from treecmp import diff, snapshot

    extra = (LayerBuilder().file("suid", b"s", mode=0o4755).file("sgid", b"g", mode=0o2711, gid=5)
             .file("mine", b"m", mode=0o664).file("theirs", b"t", mode=0o640, uid=1000, gid=1000)
             .file("ro", b"r", mode=0o444).build())
    src = tmp_path / "src"
    unpack(make_image([*layers(), extra]), src)
    outer = tmp_path / "setgid"
    outer.mkdir()
    os.chown(outer, 0, SG_GID)
    os.chmod(outer, 0o2775)
    want = snapshot(src, all_mtimes=True)
    for umask in ("022", "077"):
        dst = outer / f"copy{umask}"
        subprocess.run([sys.executable, "-c", COPY, str(src), str(dst), umask], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert diff(snapshot(dst, all_mtimes=True), want) == [], umask
