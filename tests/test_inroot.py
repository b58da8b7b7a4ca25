"""The one in-root resolver (``apply.root.walk_in_root``) and the three walks that step through it: the
merge engine's tree, a directory (``Root``'s create path, which customisation uses) and an erofs image."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dirge.apply.root import MAX_LINK_HOPS, Link, NotADirectory, Root, walk_in_root
from dirge.errors import LimitExceeded, UnsafeLayer

# A toy filesystem for the walk alone: a directory is a dict, a symlink a Link, a file bytes.
FS = {"a": {"b": {"f": b"data"}, "up": Link(b"../.."), "abs": Link(b"/a/b")}, "loop": Link(b"loop"),
      "f": b"file", "chain0": Link(b"a")}
for i in range(1, MAX_LINK_HOPS + 2):
    FS[f"chain{i}"] = Link(f"chain{i - 1}".encode())


def step(here: object, name: bytes) -> object:
    assert isinstance(here, dict)
    found = here.get(name.decode())
    if isinstance(found, bytes):
        raise NotADirectory
    return found


def names(path: str) -> list[str] | None:
    walked = walk_in_root(FS, path.encode().split(b"/"), step)  # type: ignore[arg-type]
    return None if walked is None else [n.decode() for n in walked[0]]


def test_the_walk_follows_the_kernels_in_root_rules() -> None:
    assert names("a/b") == ["a", "b"] and names("/./a//b/") == ["a", "b"]
    assert names("../../a/../../a") == ["a"]  # ".." never climbs above the root
    assert names("a/up/a/abs") == ["a", "b"]  # a relative target goes up from the link, an absolute from the root
    assert names("a/missing") is None
    assert names(f"chain{MAX_LINK_HOPS - 1}") == ["a"]  # MAX_LINK_HOPS symlinks are fine
    for path in (f"chain{MAX_LINK_HOPS}/b", "loop/x"):  # one more is ELOOP, as the kernel says it
        with pytest.raises(OSError) as info:
            names(path)
        assert info.value.errno == errno.ELOOP
    with pytest.raises(UnsafeLayer, match="'a/b/f': a parent path component exists and is not a directory"):
        names("a/abs/f/x")
    with pytest.raises(LimitExceeded):
        walk_in_root(FS, [b"a", b"b"], step, max_depth=1)  # type: ignore[arg-type]


def test_root_creates_through_a_dangling_symlink_as_the_kernel_resolves(tmp_path: Path) -> None:
    """A dangling symlink below a symlinked directory: its ``..`` goes up from where the link really is
    (x/y), not from the path's spelling, as openat2(RESOLVE_IN_ROOT) would; nothing leaves the root."""
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "a").symlink_to("x/y")
    (tmp_path / "x" / "y" / "b").symlink_to("../z/new")
    (tmp_path / "x" / "y" / "out").symlink_to("/../../etc/../made")
    root = Root(tmp_path)
    try:
        fd = root.dir((b"a", b"b", b"c"), create=True)
        assert fd is not None and os.path.samestat(os.fstat(fd), os.stat(tmp_path / "x/z/new/c"))
        assert root.dir((b"a", b"out"), create=True) is not None
        assert (tmp_path / "made").is_dir() and oct((tmp_path / "made").stat().st_mode & 0o7777) == "0o755"
        (tmp_path / "loop").symlink_to("loop")
        with pytest.raises(OSError) as info:
            root.dir((b"loop", b"x"), create=True)
        assert info.value.errno == errno.ELOOP
        (tmp_path / "file").write_bytes(b"")
        with pytest.raises(UnsafeLayer, match="'file': a parent path component exists and is not a directory"):
            root.dir((b"file", b"x"), create=True)
    finally:
        root.close()
