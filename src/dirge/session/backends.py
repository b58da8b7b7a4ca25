"""Session strategies: how a session rootfs is made from a base, fastest first.

overlay  an overlayfs mount (base as lowerdir, per-session upper/work); O(1), needs root
fuse-overlayfs  the same through FUSE, for an ordinary user (/dev/fuse, fuse-overlayfs, fusermount3); O(1)
btrfs    a snapshot of the base subvolume; O(1), needs the cache on btrfs
reflink  a per-file FICLONE copy of the tree; metadata work only, needs xfs/btrfs
copy     a full-fidelity copy (copy_file_range, holes kept); works anywhere

Each is a ``Strategy``: it says whether it works here (``probe``), makes and removes a session
(``create``, ``destroy``), saves a session's state (``snapshot``) and says how a saved state becomes a
new session (``restore``). A session's strategy is chosen once, by ``Sessions.create``, and recorded by
name in session.json; everything after looks it up in ``STRATEGIES`` instead of comparing names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..errors import SessionError
from ..fsutil import (BTRFS_MAGIC, OVERLAY_MAGIC, fs_type, is_mountpoint, is_subvolume, mount_overlay, remove_tree,
                      unmount)
from .copytree import FICLONE, copy_tree

if TYPE_CHECKING:
    from . import SessionInfo

__all__ = ["BTRFS_MAGIC", "STRATEGIES", "Strategy", "available", "destroy", "for_session", "fs_type",
           "is_mountpoint", "is_subvolume", "unmount", "usable"]

# Snapshot kinds, as recorded in snapshot.json: the overlay upper layer (changes only, restored
# stacked above the base), or the whole merged tree (restored by copying it).
UPPER, TREE = "upper", "tree"



def _upper_and_work(top_lower: Path, rootfs: Path, session_dir: Path, *, owner: bool) -> tuple[Path, Path]:
    """An overlay's upper and work dirs and its mount point, 0700; the upper dir takes the top lower's mode
    and times (the merged root shows them: the base's, not the umask's), and its owner where ``owner``
    (root's kernel overlay; fuse-overlayfs runs as the user, who owns everything it creates)."""
    upper, work = session_dir / "upper", session_dir / "work"
    upper.mkdir(mode=0o700)
    work.mkdir(mode=0o700)
    rootfs.mkdir(mode=0o700)
    top = os.stat(top_lower)
    if owner:
        os.chown(upper, top.st_uid, top.st_gid)
    os.chmod(upper, top.st_mode & 0o7777)
    os.utime(upper, ns=(top.st_atime_ns, top.st_mtime_ns))
    return upper, work

class Strategy(ABC):
    """One way of making session rootfs; instances are stateless (one per name, in ``STRATEGIES``)."""

    name: ClassVar[str]
    stacks: ClassVar[bool] = False  # takes several lowers, the top first (else exactly one tree)

    @abstractmethod
    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        """Whether sessions of ``base_rootfs`` can be made this way under ``work_dir``."""

    @abstractmethod
    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        """Make ``rootfs`` (absent) from ``lowers`` (the top first)."""

    def create(self, lowers: list[Path], session_dir: Path) -> Path:
        """Make ``session_dir/rootfs`` from ``lowers`` (the top first; only overlay takes more than one)."""
        if len(lowers) != 1 and not self.stacks:
            raise SessionError(f"strategy {self.name} takes one source tree, not {len(lowers)}")
        rootfs = session_dir / "rootfs"
        self.make(lowers, rootfs, session_dir)
        return rootfs

    def destroy(self, session_dir: Path) -> None:
        """Remove a session directory; missing is fine. Whatever is mounted on the rootfs (this
        strategy's overlay or a caller's bind mount) is unmounted first: never delete through a mount."""
        rootfs = session_dir / "rootfs"
        if is_mountpoint(rootfs):
            unmount(rootfs)
            if is_mountpoint(rootfs):
                raise SessionError(f"remove session {session_dir.name}: {rootfs} is still mounted; unmount it first")
        if session_dir.exists():
            remove_tree(session_dir)

    def snapshot(self, session_dir: Path, info: "SessionInfo", dest: Path) -> str:
        """Save the session's state into ``dest`` (a new directory); return the snapshot's kind."""
        copy_tree(session_dir / "rootfs", dest / TREE, reflink=True)
        return TREE

    def restore(self, kind: str, snapshot_dir: Path, base_rootfs: Path,
                work_dir: Path) -> tuple["Strategy", list[Path]]:
        """How a snapshot of ``kind`` becomes a session when this strategy is chosen: the strategy
        that makes it (this one, or another when this one cannot) and its lowers (the top first)."""
        if kind != TREE:
            raise SessionError(f"restore snapshot {snapshot_dir.name}: an overlay snapshot needs the overlay strategy")
        return self, [snapshot_dir / TREE]

    def __repr__(self) -> str:
        return f"<session strategy {self.name}>"


def _tree_copier(tree: Path, work_dir: Path) -> Strategy:
    """The strategy for a plain saved tree: reflink where it works, else a copy."""
    return REFLINK if REFLINK.probe(tree, work_dir) else COPY


class Overlay(Strategy):
    name = "overlay"
    stacks = True

    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        # overlayfs cannot take its upper dir on overlayfs (a cache inside a container's rootfs).
        return os.geteuid() == 0 and _overlay_supported() and fs_type(work_dir) != OVERLAY_MAGIC

    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        upper, work = _upper_and_work(lowers[0], rootfs, session_dir, owner=True)
        # userxattr is only needed (and only accepted) inside a user namespace; as real root it is not.
        mount_overlay(lowers, upper, work, rootfs)

    def snapshot(self, session_dir: Path, info: "SessionInfo", dest: Path) -> str:
        if info.snapshot:  # over an older snapshot's upper: its own upper alone is not the whole state
            return super().snapshot(session_dir, info, dest)
        copy_tree(session_dir / "upper", dest / UPPER, reflink=True)
        return UPPER

    def restore(self, kind: str, snapshot_dir: Path, base_rootfs: Path,
                work_dir: Path) -> tuple[Strategy, list[Path]]:
        if kind == UPPER:
            return self, [snapshot_dir / UPPER, base_rootfs]
        # A saved tree is copied rather than mounted, so a session never depends on a snapshot directory
        # that ``snapshot delete`` may remove.
        return _tree_copier(snapshot_dir / TREE, work_dir).restore(kind, snapshot_dir, base_rootfs, work_dir)


class FuseOverlay(Strategy):
    """An ordinary user's overlay: fuse-overlayfs runs as the user, so it can read and write nothing
    the user could not, and fusermount3 (the setuid helper that mounts for it) forces nosuid,nodev on
    unprivileged mounts (asked for here too): an image's setuid file or device node gains nothing.

    No uid mapping and no squashing: a rootless tree's files are the caller's on disk, with the
    image's owners in ``user.rootlesscontainers`` xattrs, and the mount shows exactly that (xattrs
    pass through, copy-up keeps them), as the base directory itself would. Removal unmounts through
    ``fsutil.unmount`` (``fusermount3 -u`` when not root), before any file is deleted."""

    name = "fuse-overlayfs"

    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        # Root has the kernel's overlay; this is for everyone else. fuse-overlayfs splits lowerdir at
        # ':' and its options at ',': a path holding either (or a backslash) could not be passed intact.
        if os.geteuid() == 0 or shutil.which("fuse-overlayfs") is None or shutil.which("fusermount3") is None:
            return False
        if not _fuse_passable(base_rootfs, work_dir):
            return False
        if not base_rootfs.is_dir() or base_rootfs.is_symlink():
            return False
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        except OSError:
            return False
        return True

    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        upper, work = _upper_and_work(lowers[0], rootfs, session_dir, owner=False)
        # Absolute paths: the daemon runs in "/" (below), where a relative cache path would name
        # something else.
        lower, upper, work, target = (Path(os.path.abspath(p)) for p in (lowers[0], upper, work, rootfs))
        if not _fuse_passable(lower, upper, work):
            raise SessionError(f"mount fuse-overlayfs on {rootfs}: a path holds ',', ':' or '\\', which "
                               "fuse-overlayfs would split; move the cache, or choose --strategy copy")
        options = f"lowerdir={lower},upperdir={upper},workdir={work},nosuid,nodev"
        # The daemon outlives this call: no pipe of ours may stay open in it (run() would wait on
        # it), so its output goes to a file, read if it fails; cwd "/" so it pins no directory.
        with tempfile.TemporaryFile() as err:
            proc = subprocess.run(["fuse-overlayfs", "-o", options, str(target)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=err, cwd="/", start_new_session=True)
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        if proc.returncode != 0 or not is_mountpoint(rootfs):
            raise SessionError(f"mount fuse-overlayfs on {rootfs} (lower {lowers[0]}): "
                               f"{message or f'exit status {proc.returncode}'}; "
                               "check /dev/fuse, or choose --strategy copy")

    def restore(self, kind: str, snapshot_dir: Path, base_rootfs: Path,
                work_dir: Path) -> tuple[Strategy, list[Path]]:
        # A saved tree is copied, not mounted (as Overlay's): ``snapshot delete`` may remove it.
        return _tree_copier(snapshot_dir / TREE, work_dir).restore(kind, snapshot_dir, base_rootfs, work_dir)


class Btrfs(Strategy):
    name = "btrfs"

    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        return is_subvolume(base_rootfs) and shutil.which("btrfs") is not None

    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        proc = subprocess.run(["btrfs", "subvolume", "snapshot", str(lowers[0]), str(rootfs)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SessionError(f"btrfs snapshot of {lowers[0]}: {proc.stderr.strip()}")

    def destroy(self, session_dir: Path) -> None:
        rootfs = session_dir / "rootfs"
        if rootfs.exists() and is_subvolume(rootfs) and shutil.which("btrfs"):
            subprocess.run(["btrfs", "subvolume", "delete", str(rootfs)], capture_output=True)
        super().destroy(session_dir)

    def restore(self, kind: str, snapshot_dir: Path, base_rootfs: Path,
                work_dir: Path) -> tuple[Strategy, list[Path]]:
        # A saved tree is a plain directory, not a subvolume: it cannot be snapshotted.
        return _tree_copier(snapshot_dir / TREE, work_dir).restore(kind, snapshot_dir, base_rootfs, work_dir)


class Reflink(Strategy):
    name = "reflink"

    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        return reflink_works(work_dir)

    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        copy_tree(lowers[0], rootfs, reflink=True)


class Copy(Strategy):
    name = "copy"

    def probe(self, base_rootfs: Path, work_dir: Path) -> bool:
        return True

    def make(self, lowers: list[Path], rootfs: Path, session_dir: Path) -> None:
        copy_tree(lowers[0], rootfs, reflink=False)


OVERLAY, FUSE_OVERLAY, BTRFS, REFLINK, COPY = Overlay(), FuseOverlay(), Btrfs(), Reflink(), Copy()
# Fastest first; fuse-overlayfs before btrfs: an ordinary user may snapshot a subvolume but, without
# the user_subvol_rm_allowed mount option, not delete it again.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (OVERLAY, FUSE_OVERLAY, BTRFS, REFLINK, COPY)}


def _fuse_passable(*paths: Path) -> bool:
    """Whether fuse-overlayfs gets ``paths`` intact in its ``-o`` string (it splits at ',' and ':')."""
    return not any(c in os.fsdecode(os.path.abspath(p)) for p in paths for c in ",:\\")


def _overlay_supported() -> bool:
    try:
        return "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        return False


def reflink_works(directory: Path) -> bool:
    """Probe FICLONE on the filesystem of ``directory`` with two scratch files."""
    with tempfile.TemporaryDirectory(dir=directory, prefix=".probe-") as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.write_bytes(b"x" * 4096)
        with open(a, "rb") as src, open(b, "wb") as dst:
            try:
                import fcntl

                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                return True
            except OSError:
                return False


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise SessionError(f"unknown session strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def usable(base_rootfs: Path, work_dir: Path) -> Iterator[Strategy]:
    """Strategies usable for this base on this machine, fastest first, probed lazily: the common
    case (overlay as root) never pays for the reflink probe's scratch files."""
    return (s for s in STRATEGIES.values() if s.probe(base_rootfs, work_dir))


def available(base_rootfs: Path, work_dir: Path) -> list[str]:
    return [s.name for s in usable(base_rootfs, work_dir)]


def for_session(session_dir: Path) -> Strategy | None:
    """The strategy recorded in ``session_dir/session.json``, or None if it cannot be read."""
    try:
        return STRATEGIES.get(json.loads((session_dir / "session.json").read_text())["strategy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def destroy(session_dir: Path) -> None:
    """Remove a session directory by its recorded strategy; missing is fine. A session whose record is
    unreadable (a crash while it was created) gets every strategy's undoing (btrfs' includes the base's)."""
    (for_session(session_dir) or BTRFS).destroy(session_dir)
