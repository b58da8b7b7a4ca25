"""Cache records and ``cache verify``: each kind of damage is found, ``--repair`` + prepare heals it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dirge.bases import unmount_base
from dirge.store.cache import Cache
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import prepare
from dirge.store.records import read_record
from dirge.verify import verify_cache

from conftest import erofs_mounts, require
from test_gc import cli


def image_layer(tag: str) -> bytes:
    b = LayerBuilder().dir("etc").file("etc/hostname", tag.encode() + b"\n").dir("data")
    for i in range(20):
        b.file(f"data/f{i:02d}", f"{tag} {i}\n".encode() * 50)
    return b.symlink("data/link", "f00").build()


def test_records_are_written_at_publish(tmp_path: Path, make_image) -> None:
    ref = make_image([image_layer("r")])
    prepare(ref, tmp_path / "cache", base_format="tree").close()
    cache = Cache(tmp_path / "cache")
    (key,) = cache.base_keys()
    record = read_record(cache, key)
    assert record is not None and record["format"] == "tree"
    entries = record["entries"]
    assert entries["/data/link"] == {"type": "symlink", "mode": 0o777, "uid": 0, "gid": 0, "xattrs": [],
                                     "target": "f00"}
    assert entries["/etc/hostname"]["size"] == 2 and len(entries["/etc/hostname"]["sha256"]) == 64
    assert cache.last_used_path(key).exists()


def test_verify_finds_each_damage_and_repair_heals(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    tree_ref = make_image([image_layer("tree")])
    prepare(tree_ref, cache_dir, base_format="tree").close()
    require(erofs_mounts(), "needs erofs mounts: a mounted erofs base is damaged, verified and rebuilt")
    erofs_ref = make_image([image_layer("erofs")])
    prepare(erofs_ref, cache_dir, base_format="erofs").close()
    cache = Cache(cache_dir)
    assert verify_cache(cache).ok
    code, _ = cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert code == 0

    tree_base = next(cache.load_base(k) for k in cache.base_keys() if cache.load_base(k).format == "tree")
    erofs_base = next(cache.load_base(k) for k in cache.base_keys() if cache.load_base(k).format == "erofs")
    # a flipped byte in a blob
    blob = cache.blob_path(erofs_base.digest)  # the erofs image's manifest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    # a missing blob (the tree base's config)
    config = json.loads(cache.blob_path(tree_base.digest).read_bytes())["config"]["digest"]
    cache.blobs_dir.joinpath(config[7:]).unlink()
    # a changed, an extra and a deleted file in the tree base
    (tree_base.rootfs / "data" / "f01").write_bytes(b"changed\n")
    (tree_base.rootfs / "data" / "extra").write_bytes(b"new\n")
    (tree_base.rootfs / "data" / "f02").unlink()
    # a truncated erofs base
    unmount_base(erofs_base)
    with open(erofs_base.image_file, "r+b") as f:
        f.truncate(os.fstat(f.fileno()).st_size // 2)

    code, out = cli("cache", "verify", "--json", "--cache-dir", str(cache_dir))
    assert code == 1
    problems = {(p["kind"], p["what"], p["detail"].split(" ")[0], p["name"]) for p in json.loads(out)["problems"]}
    assert ("blob", "corrupt", "content", f"sha256:{blob.name}") in problems
    assert ("blob", "missing", "of", config) in problems
    assert ("base", "changed", "/data/f01", tree_base.key) in problems
    assert ("base", "extra", "/data/extra", tree_base.key) in problems
    assert ("base", "missing", "/data/f02", tree_base.key) in problems
    assert ("base", "truncated", "rootfs.erofs:", erofs_base.key) in problems

    code, out = cli("cache", "verify", "--repair", "--cache-dir", str(cache_dir))
    assert code == 1 and "repaired" in out
    assert not blob.exists() and cache.base_keys() == []
    with prepare(tree_ref, cache_dir, base_format="tree") as s:
        assert s.base_created and (s.path / "data" / "f01").read_bytes() == b"tree 1\n" * 50
        assert not (s.path / "data" / "extra").exists() and (s.path / "data" / "f02").exists()
    with prepare(erofs_ref, cache_dir, base_format="erofs") as s:
        assert s.base_created and (s.path / "etc" / "hostname").read_bytes() == b"erofs\n"
    code, out = cli("cache", "verify", "--cache-dir", str(cache_dir))
    assert code == 0, out


def test_repair_keeps_a_base_a_live_session_stands_on(tmp_path: Path, make_image) -> None:
    cache_dir = tmp_path / "cache"
    ref = make_image([image_layer("live")])
    with prepare(ref, cache_dir, base_format="tree") as s:
        cache = Cache(cache_dir)
        base = cache.load_base(s.info.base)
        (base.rootfs / "data" / "extra").write_bytes(b"x")
        report = verify_cache(cache, repair=True)
        assert not report.ok and report.repaired == [] and cache.base_keys() == [base.key]
    report = verify_cache(cache, repair=True)
    assert report.repaired == [base.key] and cache.base_keys() == []
    assert verify_cache(cache).ok


def test_verify_finds_a_damaged_ext4_base_disk_and_repair_heals(tmp_path: Path, make_image) -> None:
    """A cached ext4 base disk (what disk sessions and exports are cloned from): a byte flipped in place
    (same size) and a truncation are each found; ``--repair`` removes it and the next prepare rebuilds it."""
    cache_dir = tmp_path / "cache"
    ref = make_image([image_layer("disk")])
    prepare(ref, cache_dir, disk="ext4").close()
    cache = Cache(cache_dir)
    (base,) = [cache.load_base(k) for k in cache.base_keys()]
    assert base.format == "ext4" and verify_cache(cache).ok
    disk = base.image_file
    size = disk.stat().st_size
    for damage in ("flip", "truncate"):
        with open(disk, "r+b") as f:
            if damage == "flip":
                f.seek(1024 + 56)  # the superblock's magic: still the same size
                magic = f.read(1)
                f.seek(1024 + 56)
                f.write(bytes([magic[0] ^ 0x01]))
            else:
                f.truncate(size // 2)
        code, out = cli("cache", "verify", "--json", "--cache-dir", str(cache_dir))
        assert code == 1
        problems = [(p["kind"], p["what"], p["name"]) for p in json.loads(out)["problems"]]
        assert problems == [("base", "changed" if damage == "flip" else "truncated", base.key)], (damage, problems)
        if damage == "flip":
            with open(disk, "r+b") as f:  # undone: the record matches again
                f.seek(1024 + 56)
                f.write(magic)
            assert verify_cache(cache).ok
    code, out = cli("cache", "verify", "--repair", "--cache-dir", str(cache_dir))
    assert code == 1 and "repaired" in out and cache.base_keys() == []
    prepare(ref, cache_dir, disk="ext4").close()
    assert [cache.load_base(k).format for k in cache.base_keys()] == ["ext4"]
    assert verify_cache(cache).ok
