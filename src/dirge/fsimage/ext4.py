"""An ext4 image written straight from the merge engine: a ``Sink`` (``apply/tree.py``).

Layout (4 KiB blocks, 32 768 blocks a group, features ``has_journal ext_attr dir_index filetype meta_bg
extent flex_bg sparse_super large_file huge_file dir_nlink extra_isize``)::

    group g, first blocks   superblock copy (sparse_super groups) and the meta_bg descriptor block
                            (groups 128m, 128m+1, 128m+127): fixed by g alone, never by the size
    2 .. D                  file data, allocated as the layers stream by, skipping those blocks
    D ..                    placed at finish: directory blocks, slow symlinks, xattr blocks, extent
                            tree blocks, then (flex_bg) every bitmap and inode table, then the journal
    .. blocks_count         free space (auto size: max(10 %, 16 MiB) of what is used, see below)

Why meta_bg: without it the backup descriptor tables in groups 1, 3, 5, 7, 9, 25, ... are as long as
the filesystem has groups, unknown until ``finish``. With meta_bg (``s_first_meta_bg`` 0) what sits
at the start of a group depends on the group number only, so file data goes to its final block the
moment it arrives (one sequential write, no spool, no move) whatever size the image ends up; flex_bg
lets bitmaps and inode tables live anywhere, so they go after the data once the inode count is known
(a table is one run: one that would reach a group's fixed blocks starts after them, and the blocks it
skips are free space like any other).
The kernel, e2fsck and resize2fs (growing and shrinking) all handle meta_bg without resize_inode.

Dead data: ``release`` punches the file's blocks (or writes zeros where punching is unsupported),
so no byte of a removed file stays in the image, and puts them on a free list that later files of
the same layer stream reuse (first fit among the first 64 holes; a file that fits none goes to the
frontier). Holes still free at finish are ordinary free space. Sparse files get fresh blocks only
(never-written blocks of the image file read as zeros, which the unwritten parts of their blocks need).

Directories: linear up to ``_LINEAR_MAX_BLOCKS`` blocks (a few hundred names: a lookup scans at most
that much, and hashing every name of every mid-sized directory cost ~0.7 s on a 58k-entry image; the
kernel and e2fsck accept unindexed multi-block directories with dir_index on), htree (half_md4, the
hash seed from the UUID, unsigned hash) when larger, one or two index levels (no large_dir). Extents: up to 4 in the inode, else a tree
of minimal depth with full leaves (e2fsck -E no_optimize_extents has nothing to suggest). Xattrs: in
the inode's 96 spare bytes while they fit (sorted), the rest in one xattr block shared by inodes with
identical blocks (refcount up to 1024). ``system.posix_acl_*`` are converted to ext4's compact ACL
format (fs/ext4/acl.c). A journal sized as mke2fs sizes it (``journal=False``: none). No lost+found:
the image holds exactly the tree (``e2fsck -fn`` is clean; ``e2fsck -fy`` would add one).

No metadata_csum (and no uninit_bg/gdt_csum): every bitmap and inode table is written in full and
free inode tables are never-written (zero) blocks, so nothing needs lazy init; crc32c of all metadata
in Python would cost more than it protects for a read-mostly VM disk. Without the 64bit feature the
limit is 2^32 blocks (16 TiB).

Memory: per regular file 9 bytes in arrays (first block, block count, released flag) plus the int
in ``node.data``; files in more than one extent (sparse, reused holes, crossing a group's fixed
blocks) keep their extent list. ``finish`` adds about 120 bytes an inode at its peak (the node →
number dict, parent and link arrays, one directory's names and blocks at a time; measured with
tracemalloc on 50k files), and one group's inode table being packed (at most 32 768 inodes: 8 MiB);
xattr block bodies are kept until written. File data is never held.

Speed (50k files of 100-3100 bytes in 100 directories, one core): 1.1 s for the sink (0.3 s
streaming, 0.8 s finish, htree hashing included), where ``mkfs.ext4 -d`` takes 2.0 s from an
already-unpacked tree; large files stream at ~440 MiB/s (page cache). ``finish`` does per inode one
``pack_into`` into its group's table buffer (one write per group) and per directory block one buffer;
htree names are hashed by libext2fs's ``ext2fs_dirhash`` where it loads (the function e2fsck checks
them with; ~5x faster than half_md4 in Python, which stays as the fallback and gives the same values).
On the 61.8k-entry benchmark image the finish takes ~1.4 s of CPU (3.1 s before these), less than
the erofs writer's.

Auto size (``size=None``): blocks_count = used blocks (data, metadata, inode tables, journal) plus
max(10 %, 16 MiB), rounded up to 1 MiB; inodes = max(used + max(10 %, 1024), one per 16 KiB) as
mke2fs' default ratio. ``size`` too small for the content raises ``Ext4SizeError``.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import os
import struct
from array import array
from collections.abc import Callable, Iterable

from . import ext4_format as fmt
from ..apply import tree
from ..apply.tree import FileData, Node, Parts
from ..fsutil import fd_path, raise_no_space
from .imagesink import XATTR_ACLS, Inodes, Skips, TreeImageSink, pwrite_all, punch, show, split_xattr_name, text
from ..errors import SinkError

# The output's version: bump it whenever the same image would give different bytes (an artifact made by
# another version is not trusted as this image's ext4; oci/artifact.py's writer annotation).
WRITER_VERSION = "1"
BLKSZ = fmt.BLOCK_SIZE
_BITS = fmt.BLOCK_BITS
_MASK = BLKSZ - 1
_BPG = fmt.BLOCKS_PER_GROUP
_BPG_BITS = _BPG.bit_length() - 1
assert 1 << _BPG_BITS == _BPG
_ZEROS = memoryview(bytes(fmt.BLOCK_SIZE))
_FLUSH = 1 << 20  # buffered bytes before a write
_DIRECT = 256 << 10  # a piece this big skips the buffer
_HOLE_SCAN = 64  # free-list entries looked at per allocation (bounded: many tiny holes stay cheap)
_MIN_FREE = (16 << 20) >> _BITS  # auto size: at least 16 MiB free
_MAX_BLOCKS = 1 << 32

_FTYPES = {tree.REG: fmt.FT_REG_FILE, tree.DIR: fmt.FT_DIR, tree.LNK: fmt.FT_SYMLINK, tree.CHR: fmt.FT_CHRDEV,
           tree.BLK: fmt.FT_BLKDEV, tree.FIFO: fmt.FT_FIFO, tree.SOCK: fmt.FT_SOCK}

XattrKey = tuple[int, bytes, bytes]  # (name index, name suffix, on-disk value)
Extent = tuple[int, int, int]  # (logical block, physical block, length)



class Ext4Error(SinkError):
    """The tree holds something an ext4 image cannot represent (or a caller broke the Sink contract)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"write ext4 image: {what}")


class Ext4SizeError(Ext4Error):
    """The requested ``size`` (or inode count) cannot hold the content."""


# -- pure helpers ------------------------------------------------------------------------------------


def acl_to_disk(value: bytes) -> bytes | str:
    """A ``system.posix_acl_*`` xattr value in ext4's on-disk form (ext4_acl_to_disk), or why not."""
    head, entry = fmt.POSIX_ACL_XATTR_HEADER.size, fmt.POSIX_ACL_XATTR_ENTRY.size
    if len(value) < head or (len(value) - head) % entry:
        return "malformed POSIX ACL"
    (version,) = fmt.POSIX_ACL_XATTR_HEADER.unpack_from(value)
    if version != fmt.POSIX_ACL_XATTR_VERSION:
        return f"POSIX ACL version {version}"
    out = bytearray(fmt.EXT4_ACL_HEADER.pack(fmt.EXT4_ACL_VERSION))
    for tag, perm, ident in fmt.POSIX_ACL_XATTR_ENTRY.iter_unpack(value[head:]):
        if tag in (fmt.ACL_USER, fmt.ACL_GROUP):
            out += fmt.EXT4_ACL_ENTRY.pack(tag, perm, ident)
        elif tag in (fmt.ACL_USER_OBJ, fmt.ACL_GROUP_OBJ, fmt.ACL_MASK, fmt.ACL_OTHER):
            out += fmt.EXT4_ACL_ENTRY_SHORT.pack(tag, perm)
        else:
            return f"POSIX ACL tag {tag:#x}"
    return bytes(out)


def xattr_key(name: str, value: bytes) -> XattrKey | str:
    """The on-disk (index, suffix, value) of an xattr, or why ext4 (without ea_inode) cannot store it."""
    split = split_xattr_name(name, "ext4")
    if isinstance(split, str):
        return split
    index, suffix = split
    if name in XATTR_ACLS:  # ext4 keeps ACLs in its own compact form
        converted = acl_to_disk(value)
        if isinstance(converted, str):
            return converted
        value = converted
    if len(suffix) > 255:
        return "name too long for ext4"
    limit = BLKSZ - fmt.XATTR_HEADER.size - fmt.xattr_entry_len(len(suffix)) - 4
    if len(value) > limit:
        return f"value of {len(value)} bytes exceeds what one ext4 xattr block holds ({limit})"
    return (index, suffix, value)


def xattr_hash(suffix: bytes, value: bytes) -> int:
    """ext4_xattr_hash_entry (names as unsigned chars, the value as padded le32 words)."""
    h = 0
    for c in suffix:
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    padded = value + bytes(-len(value) % 4)
    for (word,) in struct.iter_unpack("<I", padded):
        h = ((h << 16) ^ (h >> 16) ^ word) & 0xFFFFFFFF
    return h


def xattr_block_hash(hashes: Iterable[int]) -> int:
    """ext4_xattr_rehash: the block's h_hash from its entries' hashes."""
    h = 0
    for e in hashes:
        if not e:
            return 0
        h = ((h << 16) ^ (h >> 16) ^ e) & 0xFFFFFFFF
    return h


def pack_xattrs(keys: list[XattrKey], space: int, base: int) -> tuple[bytes, bytes]:
    """(entries incl. the 4-byte terminator, values) for ``keys`` in an area of ``space`` bytes whose
    values are addressed from ``base`` (ibody: the first entry; block: the block start). The values
    fill the area from its end down; the caller lays out ``entries + zeros + values``."""
    entries = bytearray()
    values = bytearray()
    for index, suffix, value in keys:
        vlen = fmt.xattr_value_len(len(value))
        if value:
            values[:0] = value + bytes(vlen - len(value))
            offs = base + space - len(values)
        else:
            offs = 0
        entries += fmt.XATTR_ENTRY.pack(len(suffix), index, offs, 0, len(value), xattr_hash(suffix, value))
        entries += suffix + bytes(fmt.xattr_entry_len(len(suffix)) - fmt.XATTR_ENTRY.size - len(suffix))
    entries += bytes(4)
    assert len(entries) + len(values) <= space
    return bytes(entries), bytes(values)


def split_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Extents no longer than an initialized extent may be (32 768 blocks)."""
    out: list[Extent] = []
    for lblk, pblk, n in extents:
        while n > fmt.EXTENT_MAX_LEN:
            out.append((lblk, pblk, fmt.EXTENT_MAX_LEN))
            lblk, pblk, n = lblk + fmt.EXTENT_MAX_LEN, pblk + fmt.EXTENT_MAX_LEN, n - fmt.EXTENT_MAX_LEN
        if n:
            out.append((lblk, pblk, n))
    return out


def tree_blocks(n: int) -> int:
    """Extent tree blocks (leaves and index nodes) needed for ``n`` extents at minimal depth."""
    total, level = 0, n
    while level > fmt.EXTENTS_IN_INODE:
        level = -(-level // fmt.EXTENTS_IN_BLOCK)
        total += level
    return total


def _leaf(extents: list[Extent], limit: int) -> bytes:
    out = bytearray(fmt.EXTENT_HEADER.pack(fmt.EXTENT_MAGIC, len(extents), limit, 0, 0))
    for lblk, pblk, n in extents:
        out += fmt.EXTENT.pack(lblk, n, pblk >> 32, pblk & 0xFFFFFFFF)
    return bytes(out)


def _index(entries: list[tuple[int, int]], limit: int, depth: int) -> bytes:
    out = bytearray(fmt.EXTENT_HEADER.pack(fmt.EXTENT_MAGIC, len(entries), limit, depth, 0))
    for lblk, pblk in entries:
        out += fmt.EXTENT_IDX.pack(lblk, pblk & 0xFFFFFFFF, pblk >> 32, 0)
    return bytes(out)


def build_extent_tree(extents: list[Extent], blocks: list[int]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The inode's i_block (60 bytes) and the tree blocks [(block, bytes)] for ``extents`` (already
    split), using ``blocks`` (``tree_blocks(len(extents))`` of them) for the nodes."""
    if len(extents) <= fmt.EXTENTS_IN_INODE:
        return _leaf(extents, fmt.EXTENTS_IN_INODE).ljust(fmt.IBLOCK_SIZE, b"\0"), []
    out: list[tuple[int, bytes]] = []
    free = iter(blocks)
    per = fmt.EXTENTS_IN_BLOCK
    level: list[tuple[int, int]] = []
    for i in range(0, len(extents), per):
        chunk = extents[i:i + per]
        blk = next(free)
        out.append((blk, _leaf(chunk, per).ljust(BLKSZ, b"\0")))
        level.append((chunk[0][0], blk))
    depth = 1
    while len(level) > fmt.EXTENTS_IN_INODE:
        upper: list[tuple[int, int]] = []
        for i in range(0, len(level), per):
            chunk_i = level[i:i + per]
            blk = next(free)
            out.append((blk, _index(chunk_i, per, depth).ljust(BLKSZ, b"\0")))
            upper.append((chunk_i[0][0], blk))
        level = upper
        depth += 1
    return _index(level, fmt.EXTENTS_IN_INODE, depth).ljust(fmt.IBLOCK_SIZE, b"\0"), out


# -- htree hashing (fs/ext4/hash.c: half_md4 with the superblock's seed) ------------------------------


_BE_WORDS = [struct.Struct(f">{n}I") for n in range(9)]  # 0..8 big-endian words


def _hashbuf(data: bytes, pos: int) -> tuple[int, ...]:
    """str2hashbuf_unsigned of ``data[pos:]`` (8 words): its first 32 bytes as big-endian words, a
    partial word shifted in after the length-derived pad, then the pad."""
    left = len(data) - pos
    pad = left | (left << 8)
    pad = (pad | (pad << 16)) & 0xFFFFFFFF
    if left >= 32:
        return _BE_WORDS[8].unpack_from(data, pos)
    full = left >> 2
    end = pos + (full << 2)
    tail = ((pad << ((left & 3) << 3)) | int.from_bytes(data[end:pos + left], "big")) & 0xFFFFFFFF
    return (*_BE_WORDS[full].unpack_from(data, pos), tail) + (pad,) * (7 - full)


def dx_hash(name: bytes, seed: tuple[int, int, int, int]) -> int:
    """The major hash of ``name`` (half_md4, unsigned chars), its low bit cleared as ext4 does.
    half_md4_transform is inlined and unrolled: it runs once per 32 bytes of every name of an indexed
    directory."""
    buf0, buf1, buf2, buf3 = seed if any(seed) else (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
    pos = 0
    while True:
        k0, k1, k2, k3, k4, k5, k6, k7 = _hashbuf(name, pos)
        a, b, c, d = buf0, buf1, buf2, buf3
        # round F
        a = (a + (d ^ (b & (c ^ d))) + k0) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + (c ^ (a & (b ^ c))) + k1) & 0xFFFFFFFF
        d = ((d << 7) | (d >> 25)) & 0xFFFFFFFF
        c = (c + (b ^ (d & (a ^ b))) + k2) & 0xFFFFFFFF
        c = ((c << 11) | (c >> 21)) & 0xFFFFFFFF
        b = (b + (a ^ (c & (d ^ a))) + k3) & 0xFFFFFFFF
        b = ((b << 19) | (b >> 13)) & 0xFFFFFFFF
        a = (a + (d ^ (b & (c ^ d))) + k4) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + (c ^ (a & (b ^ c))) + k5) & 0xFFFFFFFF
        d = ((d << 7) | (d >> 25)) & 0xFFFFFFFF
        c = (c + (b ^ (d & (a ^ b))) + k6) & 0xFFFFFFFF
        c = ((c << 11) | (c >> 21)) & 0xFFFFFFFF
        b = (b + (a ^ (c & (d ^ a))) + k7) & 0xFFFFFFFF
        b = ((b << 19) | (b >> 13)) & 0xFFFFFFFF
        # round G
        a = (a + ((b & c) + ((b ^ c) & d)) + k1 + 0x5A827999) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + ((a & b) + ((a ^ b) & c)) + k3 + 0x5A827999) & 0xFFFFFFFF
        d = ((d << 5) | (d >> 27)) & 0xFFFFFFFF
        c = (c + ((d & a) + ((d ^ a) & b)) + k5 + 0x5A827999) & 0xFFFFFFFF
        c = ((c << 9) | (c >> 23)) & 0xFFFFFFFF
        b = (b + ((c & d) + ((c ^ d) & a)) + k7 + 0x5A827999) & 0xFFFFFFFF
        b = ((b << 13) | (b >> 19)) & 0xFFFFFFFF
        a = (a + ((b & c) + ((b ^ c) & d)) + k0 + 0x5A827999) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + ((a & b) + ((a ^ b) & c)) + k2 + 0x5A827999) & 0xFFFFFFFF
        d = ((d << 5) | (d >> 27)) & 0xFFFFFFFF
        c = (c + ((d & a) + ((d ^ a) & b)) + k4 + 0x5A827999) & 0xFFFFFFFF
        c = ((c << 9) | (c >> 23)) & 0xFFFFFFFF
        b = (b + ((c & d) + ((c ^ d) & a)) + k6 + 0x5A827999) & 0xFFFFFFFF
        b = ((b << 13) | (b >> 19)) & 0xFFFFFFFF
        # round H
        a = (a + (b ^ c ^ d) + k3 + 0x6ED9EBA1) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + (a ^ b ^ c) + k7 + 0x6ED9EBA1) & 0xFFFFFFFF
        d = ((d << 9) | (d >> 23)) & 0xFFFFFFFF
        c = (c + (d ^ a ^ b) + k2 + 0x6ED9EBA1) & 0xFFFFFFFF
        c = ((c << 11) | (c >> 21)) & 0xFFFFFFFF
        b = (b + (c ^ d ^ a) + k6 + 0x6ED9EBA1) & 0xFFFFFFFF
        b = ((b << 15) | (b >> 17)) & 0xFFFFFFFF
        a = (a + (b ^ c ^ d) + k1 + 0x6ED9EBA1) & 0xFFFFFFFF
        a = ((a << 3) | (a >> 29)) & 0xFFFFFFFF
        d = (d + (a ^ b ^ c) + k5 + 0x6ED9EBA1) & 0xFFFFFFFF
        d = ((d << 9) | (d >> 23)) & 0xFFFFFFFF
        c = (c + (d ^ a ^ b) + k0 + 0x6ED9EBA1) & 0xFFFFFFFF
        c = ((c << 11) | (c >> 21)) & 0xFFFFFFFF
        b = (b + (c ^ d ^ a) + k4 + 0x6ED9EBA1) & 0xFFFFFFFF
        b = ((b << 15) | (b >> 17)) & 0xFFFFFFFF
        buf0 = (buf0 + a) & 0xFFFFFFFF
        buf1 = (buf1 + b) & 0xFFFFFFFF
        buf2 = (buf2 + c) & 0xFFFFFFFF
        buf3 = (buf3 + d) & 0xFFFFFFFF
        pos += 32
        if pos >= len(name):
            break
    major = buf1 & ~1
    if major == (0x7FFFFFFF << 1):  # EXT4_HTREE_EOF_32BIT
        major = (0x7FFFFFFF - 1) << 1
    return major


Hasher = Callable[[bytes], int]


def pure_hasher(seed: tuple[int, int, int, int]) -> Hasher:
    return lambda name: dx_hash(name, seed)


_HASH_HALF_MD4_UNSIGNED = 4  # e2fsprogs' EXT2_HASH_HALF_MD4_UNSIGNED (s_flags unsigned: version + 3)
_libext2fs: ctypes.CDLL | None | bool = False  # False: not looked for yet


def native_hasher(seed: tuple[int, int, int, int]) -> Hasher | None:
    """dx_hash by e2fsprogs' own ``ext2fs_dirhash`` (libext2fs, there wherever e2fsck is): the same
    function e2fsck checks the index with, ~20x faster than half_md4 in Python (one ctypes call a
    name; the htree of a 20k-name directory hashed in ~0.05 s instead of ~0.5 s). None without it."""
    global _libext2fs
    if _libext2fs is False:
        try:
            lib = ctypes.CDLL("libext2fs.so.2")
            fn = lib.ext2fs_dirhash
        except (OSError, AttributeError):
            _libext2fs = None
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32),
                           ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)]
            fn.restype = ctypes.c_long  # errcode_t
            _libext2fs = lib
    if not isinstance(_libext2fs, ctypes.CDLL):
        return None
    fn = _libext2fs.ext2fs_dirhash
    words = (ctypes.c_uint32 * 4)(*seed)
    major, minor = ctypes.c_uint32(), ctypes.c_uint32()
    pmajor, pminor = ctypes.byref(major), ctypes.byref(minor)

    def native(name: bytes) -> int:
        if fn(_HASH_HALF_MD4_UNSIGNED, name, len(name), words, pmajor, pminor):
            return dx_hash(name, seed)  # an error code: never for half_md4, but the pure path knows
        h = major.value & ~1
        return (0x7FFFFFFF - 1) << 1 if h == 0x7FFFFFFF << 1 else h  # EOF avoided as the kernel does

    return native


def hasher(seed: tuple[int, int, int, int]) -> Hasher:
    """The fastest dx_hash at hand for ``seed``; both give the same values (tests compare them)."""
    return native_hasher(seed) or pure_hasher(seed)


# -- I/O -----------------------------------------------------------------------------------------------



def _wipe(fd: int, offset: int, length: int) -> None:
    """Make a byte range read as zeros: punch it (frees the disk space), else write zeros."""
    if punch(fd, offset, length):
        return
    zeros = bytes(min(length, 1 << 20))
    while length:
        n = min(length, len(zeros))
        pwrite_all(fd, zeros[:n], offset)
        offset, length = offset + n, length - n


_INODE_RUN_MAX = fmt.EXTENTS_IN_INODE * fmt.EXTENT_MAX_LEN  # blocks of one run the inode's extents map
_LINEAR_MAX_BLOCKS = 8  # directories up to this size stay linear (see the module docstring)


class _Out:
    """Buffered writes at given offsets: consecutive ones coalesce into one pwrite."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pos, self.buf = fd, 0, bytearray()

    def at(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        if pos != self.pos + len(self.buf):
            self.flush()
            self.pos = pos
        if not self.buf and len(data) >= _DIRECT:
            pwrite_all(self.fd, data, pos)
            self.pos = pos + len(data)
            return
        self.buf += data
        if len(self.buf) >= _FLUSH:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            pwrite_all(self.fd, self.buf, self.pos)
            self.pos += len(self.buf)
            self.buf.clear()




_OVERHEAD: dict[int, int] = {}
_LEAF1 = struct.Struct("<HHHHI" "IHHI")  # an extent header and its one extent: a usual file's i_block
_NS = 1_000_000_000


def _encode_time(ns: int) -> tuple[int, int]:
    """fmt.encode_time, with the common case (1970 .. 2038: epoch bits 0) inline."""
    secs, nsec = divmod(ns, _NS)
    if 0 <= secs < 0x80000000:
        return secs, nsec << 2
    return fmt.encode_time(ns)


def _overhead(group: int) -> int:
    ov = _OVERHEAD.get(group)
    if ov is None:
        ov = _OVERHEAD[group] = fmt.group_overhead(group)
    return ov


def _set_bits(bm: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of a little-endian bitmap."""
    while lo < hi and lo & 7:
        bm[lo >> 3] |= 1 << (lo & 7)
        lo += 1
    end = hi & ~7
    if lo < end:
        bm[lo >> 3:end >> 3] = b"\xff" * ((end - lo) >> 3)
        lo = end
    while lo < hi:
        bm[lo >> 3] |= 1 << (lo & 7)
        lo += 1


class Ext4Sink(TreeImageSink):
    """Writes the merged image as an ext4 filesystem image at ``path`` (created or truncated).

    ``uuid`` (16 bytes) is the filesystem UUID (the journal's too; the htree hash seed derives from
    it) and ``build_time_ns`` stands for inodes without a time and for every superblock time, so the
    same calls give the same bytes. ``size`` (bytes, a multiple of 4096) fixes the filesystem size;
    None sizes it to the content plus headroom (module doc). ``inodes``: at least this many.
    After an exception only ``close()`` is meaningful (the caller discards ``path``)."""

    def __init__(self, path: str | os.PathLike[str], *, uuid: bytes, build_time_ns: int, size: int | None = None,
                 inodes: int | None = None, journal: bool = True, label: bytes = b"",
                 report: Skips | None = None) -> None:
        if len(uuid) != 16:
            raise ValueError("ext4 uuid must be 16 bytes")
        if len(label) > 16:
            raise ValueError("ext4 label is at most 16 bytes")
        if size is not None and (size <= 0 or size & _MASK):
            raise Ext4SizeError(f"size {size} is not a positive multiple of {BLKSZ}")
        if size is not None and size >> _BITS >= _MAX_BLOCKS:
            raise Ext4SizeError(f"size {size} exceeds ext4's 2^32 blocks without the 64bit feature")
        if inodes is not None and inodes <= 0:
            raise ValueError("inodes must be positive")
        self.uuid, self.build_time_ns, self.size, self.inodes = bytes(uuid), build_time_ns, size, inodes
        self.journal, self.label, self.report = journal, bytes(label), report
        self.skipped: list[str] = []  # "path: xattr NAME: why" for xattrs ext4 cannot hold
        self.blocks_count = 0  # after finish: the filesystem's size in blocks
        self._fd = -1
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._out = _Out(self._fd)
        self._frontier = 2  # the next never-used block (group 0: superblock, descriptor block)
        self._hole_start: list[int] = []  # freed runs (zeroed), sorted by start, merged
        self._hole_len: list[int] = []
        # Per regular file (the index is node.data): first block and block count when the file is
        # one run; files in several runs (holes reused, group starts skipped, sparse) in _extents.
        self._start = array("I")
        self._nblk = array("I")
        self._released = bytearray()
        self._extents: dict[int, list[Extent]] = {}
        self._finished = False

    # -- block allocation ----------------------------------------------------------------------

    def _fresh(self, n: int) -> list[tuple[int, int]]:
        """``n`` never-used blocks from the frontier, as runs around the groups' fixed blocks."""
        f = self._frontier
        off = f & (_BPG - 1)
        if n and off + n <= _BPG and off >= _overhead(f >> _BPG_BITS) and f + n <= _MAX_BLOCKS:
            self._frontier = f + n  # the usual file: inside the group the frontier is in
            return [(f, n)]
        runs: list[tuple[int, int]] = []
        while n:
            group, off = divmod(f, _BPG)
            ov = _overhead(group)
            if off < ov:
                f += ov - off
                continue
            take = min(n, _BPG - off)
            if runs and runs[-1][0] + runs[-1][1] == f:
                runs[-1] = (runs[-1][0], runs[-1][1] + take)
            else:
                runs.append((f, take))
            f += take
            n -= take
        if f > _MAX_BLOCKS:
            raise Ext4SizeError("content exceeds ext4's 2^32 blocks without the 64bit feature")
        self._frontier = f
        return runs

    def _alloc(self, n: int) -> list[tuple[int, int]]:
        """``n`` blocks whose every byte will be written: a freed hole that holds them, else fresh."""
        starts, lens = self._hole_start, self._hole_len
        if not starts:
            return self._fresh(n)
        for i in range(min(len(starts), _HOLE_SCAN)):
            if lens[i] >= n:
                p = starts[i]
                if lens[i] == n:
                    del starts[i], lens[i]
                else:
                    starts[i] += n
                    lens[i] -= n
                return [(p, n)]
        return self._fresh(n)

    def _free(self, p: int, n: int) -> None:
        """Zero blocks [p, p+n) and put them on the free list."""
        self._out.flush()
        _wipe(self._fd, p << _BITS, n << _BITS)
        starts, lens = self._hole_start, self._hole_len
        i = bisect.bisect_left(starts, p)
        if i and starts[i - 1] + lens[i - 1] == p:
            i -= 1
            lens[i] += n
        else:
            starts.insert(i, p)
            lens.insert(i, n)
        if i + 1 < len(starts) and starts[i] + lens[i] == starts[i + 1]:
            lens[i] += lens[i + 1]
            del starts[i + 1], lens[i + 1]

    def _file_extents(self, index: int) -> list[Extent]:
        ex = self._extents.get(index)
        if ex is None:
            n = self._nblk[index]
            ex = [(0, self._start[index], n)] if n else []
        return split_extents(ex)

    # -- the Sink protocol -----------------------------------------------------------------------

    def release(self, node: Node) -> None:
        index = node.data
        if not isinstance(index, int) or self._released[index]:
            return
        self._released[index] = 1
        for _, p, n in self._file_extents(index):
            self._free(p, n)

    def file(self, parts: Parts, parent: Node, node: Node, data: FileData) -> None:
        if node.size > fmt.MAX_FILE_SIZE:  # a sparse file may claim any size; its blocks could not be mapped
            raise Ext4Error(f"{show(parts)}: a {node.size}-byte file exceeds ext4's largest file "
                            f"({fmt.MAX_FILE_SIZE} bytes)")
        if data.sparse is not None and node.size:
            self._sparse(parts, node, data)
            return
        size = data.size
        if size != node.size:
            raise Ext4Error(f"{show(parts)}: {size} bytes stored for a {node.size}-byte file")
        nblk = (size + _MASK) >> _BITS
        runs = self._alloc(nblk) if nblk else []
        out = self._out
        buf = out.buf
        ri, got = 0, 0
        pos, left = (runs[0][0] << _BITS, runs[0][1] << _BITS) if runs else (0, 0)
        for piece in data.chunks:
            n = len(piece)
            got += n
            if got > size:
                raise Ext4Error(f"{show(parts)}: more than {size} bytes of data")
            if n <= left and n < _DIRECT and pos == out.pos + len(buf):
                # The usual piece: it fits the run and follows what is buffered (_Out.at, inline).
                buf += piece
                pos, left = pos + n, left - n
                if len(buf) >= _FLUSH:
                    out.flush()
                if left or ri + 1 >= len(runs):
                    continue
                ri += 1
                pos, left = runs[ri][0] << _BITS, runs[ri][1] << _BITS
                continue
            while piece:
                take = min(len(piece), left)
                out.at(pos, piece[:take] if take < len(piece) else piece)
                piece, pos, left = piece[take:], pos + take, left - take
                if not left and ri + 1 < len(runs):
                    ri += 1
                    pos, left = runs[ri][0] << _BITS, runs[ri][1] << _BITS
        if got != size:
            raise Ext4Error(f"{show(parts)}: {got} bytes of data for a {size}-byte file")
        if size & _MASK:  # the tail block in full: a reused hole must hold no stale byte
            if pos == out.pos + len(buf):
                buf += _ZEROS[:BLKSZ - (size & _MASK)]
            else:
                out.at(pos, _ZEROS[:BLKSZ - (size & _MASK)])
        index = len(self._start)
        self._released.append(0)
        self._nblk.append(nblk)
        if len(runs) <= 1:
            self._start.append(runs[0][0] if runs else 0)
        else:
            self._start.append(0)
            lblk, ex = 0, []
            for p, n in runs:
                ex.append((lblk, p, n))
                lblk += n
            self._extents[index] = ex
        node.data = index

    def _sparse(self, parts: Parts, node: Node, data: FileData) -> None:
        """Only the blocks a data region touches are allocated (fresh: their unwritten bytes must
        read as zeros); the rest of the file is holes."""
        regions = data.sparse or []
        spans: list[list[int]] = []
        for off, length in sorted(r for r in regions if r[1]):
            lo, hi = off >> _BITS, ((off + length - 1) >> _BITS) + 1
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        extents: list[Extent] = []
        for lo, hi in spans:
            for p, n in self._fresh(hi - lo):
                extents.append((lo, p, n))
                lo += n
        starts = [e[0] for e in extents]
        out = self._out
        for off, piece in data.placed():
            while piece:  # a region may span extents
                blk = off >> _BITS
                i = bisect.bisect_right(starts, blk) - 1
                lblk, pblk, n = extents[i]
                take = min(len(piece), ((lblk + n) << _BITS) - off)
                out.at(((pblk + blk - lblk) << _BITS) + (off & _MASK), piece[:take])
                piece, off = piece[take:], off + take
        index = len(self._start)
        self._start.append(0)
        self._nblk.append(sum(e[2] for e in extents))
        self._released.append(0)
        self._extents[index] = extents
        node.data = index

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def finish(self, root: Node) -> None:
        if self._finished:
            raise RuntimeError("Ext4Sink.finish called twice")
        self._finished = True
        with raise_no_space(f"write ext4 image {fd_path(self._fd)}"):
            _Image(self, root).write()
            self._out.flush()


class _Image:
    """The finish pass: inode numbers, directory/symlink/xattr/extent blocks, the group layout,
    bitmaps, inode tables, journal, descriptors, superblocks."""

    def __init__(self, sink: Ext4Sink, root: Node) -> None:
        self.sink = sink
        self.root = root
        self.nodes: list[Node] = []  # position p: inode 2 (root) for p == 0, else FIRST_INO + p - 1
        self.pos_of: dict[Node, int] = {}
        self.nlink = array("I")
        self.parent = array("I")
        self.paths: dict[int, bytes] = {0: b"/"}  # directories' paths, for reports and errors
        self.iblock: dict[int, bytes] = {}  # precomputed i_block (trees, directories, slow symlinks)
        self.extra: dict[int, int] = {}  # blocks an inode owns beyond its data (tree, xattr block)
        self.dir_blocks: dict[int, int] = {}  # directory: its size in blocks
        self.indexed: set[int] = set()  # htree directories
        self.ibody: dict[int, bytes] = {}  # in-inode xattr area (96 bytes)
        self.xblock: dict[int, int] = {}  # xattr block of an inode
        self.gaps: list[tuple[int, int]] = []  # (start, count): blocks an inode table skipped (free)
        seed = hashlib.sha256(b"dirge ext4 hash seed\0" + sink.uuid).digest()[:16]
        self.hash_seed = seed
        self.seed_words = struct.unpack("<4I", seed)
        self.crtime = fmt.encode_time(sink.build_time_ns)  # every inode's creation time

    @staticmethod
    def ino(pos: int) -> int:
        return fmt.ROOT_INO if pos == 0 else fmt.FIRST_INO + pos - 1

    def write(self) -> None:
        self._walk()
        self._xattrs()
        self._data_blocks()
        self._layout_and_write()

    # -- numbering -------------------------------------------------------------------------------

    def _walk(self) -> None:
        inodes = Inodes(self.root, name_len=fmt.NAME_LEN, released=self.sink._released, error=Ext4Error,
                        link_max=fmt.LINK_MAX)
        self.inodes = inodes
        self.nodes, self.pos_of, self.nlink, self.parent, self.paths = (
            inodes.nodes, inodes.index, inodes.nlink, inodes.parent, inodes.paths)
        for p in inodes.names:
            if self.nlink[p] > fmt.LINK_MAX:
                self.nlink[p] = 1  # dir_nlink: 1 means "many"
        if fmt.FIRST_INO + len(self.nodes) - 2 >= 1 << 32:
            raise Ext4Error("too many inodes for ext4")

    def _path(self, p: int) -> bytes:
        return self.inodes.path(p)

    # -- xattrs ----------------------------------------------------------------------------------

    def _skip(self, p: int, name: str, why: str) -> None:
        path = self._path(p)
        self.sink.skipped.append(f"{text(path)}: xattr {name}: {why}")
        if self.sink.report is not None:
            self.sink.report.skip(path, f"xattr {name} not stored: {why}")

    def _xattrs(self) -> None:
        """In-inode while they fit (sorted as the kernel sorts block entries), the rest in a block;
        identical blocks are shared (refcount)."""
        space_in = fmt.IBODY_XATTR_SPACE - fmt.XATTR_IBODY_HEADER.size
        space_blk = BLKSZ - fmt.XATTR_HEADER.size
        shared: dict[bytes, list[int]] = {}  # block body → inode positions using it
        for p, node in enumerate(self.nodes):
            if not node.xattrs:
                continue
            keys: list[tuple[XattrKey, str]] = []
            for name, value in node.xattrs.items():
                key = xattr_key(name, value)
                if isinstance(key, str):
                    self._skip(p, name, key)
                else:
                    keys.append((key, name))
            keys.sort(key=lambda k: (k[0][0], len(k[0][1]), k[0][1]))
            inner: list[XattrKey] = []
            outer: list[XattrKey] = []
            used_in = used_out = 4  # the terminator
            for key, name in keys:
                need = fmt.xattr_entry_len(len(key[1])) + fmt.xattr_value_len(len(key[2]))
                if used_in + need <= space_in:
                    inner.append(key)
                    used_in += need
                elif used_out + need <= space_blk:
                    outer.append(key)
                    used_out += need
                else:
                    self._skip(p, name, "no room left in the inode and its xattr block")
            if inner:
                entries, values = pack_xattrs(inner, space_in, 0)
                self.ibody[p] = (fmt.XATTR_IBODY_HEADER.pack(fmt.XATTR_MAGIC) + entries
                                 + bytes(space_in - len(entries) - len(values)) + values)
            if outer:
                entries, values = pack_xattrs(outer, space_blk, fmt.XATTR_HEADER.size)
                body = entries + bytes(space_blk - len(entries) - len(values)) + values
                shared.setdefault(body, []).append(p)
        out = self.sink._out
        for body, users in shared.items():
            h = xattr_block_hash(fmt.XATTR_ENTRY.unpack_from(body, off)[5] for off in _entry_offsets(body))
            for i in range(0, len(users), fmt.XATTR_REFCOUNT_MAX):
                group = users[i:i + fmt.XATTR_REFCOUNT_MAX]
                ((blk, _),) = self.sink._alloc(1)
                out.at(blk << _BITS, fmt.XATTR_HEADER.pack(fmt.XATTR_MAGIC, len(group), 1, h, 0) + body)
                for p in group:
                    self.xblock[p] = blk
                    self.extra[p] = self.extra.get(p, 0) + 1

    # -- directory, symlink and extent-tree blocks ------------------------------------------------

    def _tree(self, p: int, extents: list[Extent]) -> None:
        """Store the i_block of ``extents`` for ``p``, writing tree blocks when more than 4."""
        n = tree_blocks(len(extents))
        blocks: list[int] = []
        for start, count in (self.sink._alloc(n) if n else []):
            blocks.extend(range(start, start + count))
        iblock, nodes = build_extent_tree(extents, blocks)
        for blk, data in nodes:
            self.sink._out.at(blk << _BITS, data)
        self.iblock[p] = iblock
        if n:
            self.extra[p] = self.extra.get(p, 0) + n

    def _data_blocks(self) -> None:
        sink = self.sink
        out = sink._out
        for p, node in enumerate(self.nodes):
            kind = node.kind
            if kind == tree.DIR:
                blocks = self._dir_blocks(p)
                runs = sink._alloc(len(blocks))
                extents: list[Extent] = []
                i = 0
                for start, count in runs:
                    extents.append((i, start, count))
                    out.at(start << _BITS, b"".join(blocks[i:i + count]))
                    i += count
                self.dir_blocks[p] = len(blocks)
                self._tree(p, split_extents(extents))
            elif kind == tree.LNK:
                target = node.target
                if not target or len(target) >= BLKSZ:
                    raise Ext4Error(f"{text(self._path(p))}: symlink target of {len(target)} bytes")
                if len(target) > fmt.FAST_SYMLINK_MAX:
                    ((blk, _),) = sink._alloc(1)
                    out.at(blk << _BITS, target + bytes(BLKSZ - len(target)))
                    self._tree(p, [(0, blk, 1)])
            elif kind == tree.REG and isinstance(node.data, int):
                # One run of at most 4 full-length extents fits the inode: only others need a look.
                if node.data in sink._extents or sink._nblk[node.data] > _INODE_RUN_MAX:
                    extents = sink._file_extents(node.data)
                    if len(extents) > fmt.EXTENTS_IN_INODE:
                        self._tree(p, extents)
            elif kind == tree.REG and node.size:
                raise Ext4Error(f"{text(self._path(p))}: a {node.size}-byte file without data")

    def _entries(self, p: int) -> list[tuple[bytes, int, int]]:
        children = self.nodes[p].children
        assert children is not None
        pos_of, nodes = self.pos_of, self.nodes
        first = fmt.FIRST_INO - 1  # a child is never the root: its inode is FIRST_INO + c - 1
        out = []
        for name in self.inodes.names[p]:  # sorted by the numbering walk
            c = pos_of[children[name]]
            out.append((name, first + c, _FTYPES[nodes[c].kind]))
        return out

    def _dir_blocks(self, p: int) -> list[bytes]:
        """Linear blocks (what _linear_blocks makes of ".", ".." and the entries, packed straight
        from the sorted names) while they take at most _LINEAR_MAX_BLOCKS, else an htree."""
        me, up = self.ino(p), self.ino(self.parent[p])
        names = self.inodes.names[p]
        dirent = fmt.DIRENT.size
        # Entries take at least header + name each: beyond the linear limit even packed tight.
        if 24 + dirent * len(names) + sum(map(len, names)) <= _LINEAR_MAX_BLOCKS * BLKSZ:
            children = self.nodes[p].children
            assert children is not None
            pos_of, nodes, first, ftypes = self.pos_of, self.nodes, fmt.FIRST_INO - 1, _FTYPES
            pack = fmt.DIRENT.pack_into
            blocks: list[bytes] = []
            cur = bytearray(BLKSZ)
            pack(cur, 0, me, 12, 1, fmt.FT_DIR)
            cur[dirent:dirent + 1] = b"."
            pack(cur, 12, up, 12, 2, fmt.FT_DIR)
            cur[12 + dirent:12 + dirent + 2] = b".."
            used, last = 24, 12
            for name in names:
                n = len(name)
                need = (dirent + n + 3) & ~3  # fmt.dirent_len
                if used + need > BLKSZ:
                    blocks.append(_close_block(cur, used, last))
                    if len(blocks) == _LINEAR_MAX_BLOCKS:
                        break  # a block more than linear directories take
                    cur = bytearray(BLKSZ)
                    used = 0
                c = pos_of[children[name]]  # never the root: its inode is FIRST_INO + c - 1
                last = used
                pack(cur, used, first + c, need, n, ftypes[nodes[c].kind])
                cur[used + dirent:used + dirent + n] = name
                used += need
            else:
                blocks.append(_close_block(cur, used, last))
                return blocks
        self.indexed.add(p)
        return _htree_blocks(me, up, self._entries(p), self.seed_words)

    # -- layout --------------------------------------------------------------------------------

    def _layout_and_write(self) -> None:
        sink = self.sink
        out = sink._out
        last_ino = max(fmt.FIRST_INO - 1, fmt.FIRST_INO + len(self.nodes) - 2)
        base_frontier = sink._frontier
        holes = sum(sink._hole_len)
        want_inodes = sink.inodes
        if want_inodes is not None and want_inodes < last_ino:
            raise Ext4SizeError(f"{want_inodes} inodes requested, the tree needs {last_ino}")
        fixed = sink.size is not None
        total = sink.size >> _BITS if sink.size is not None else base_frontier + _MIN_FREE
        for _ in range(64):
            groups = -(-total // _BPG)
            if want_inodes is not None:
                inodes = want_inodes
            else:
                inodes = max(last_ino + max(last_ino // 10, 1024), total // 4)
            ipg = -(-inodes // groups)
            ipg = (ipg + fmt.INODES_PER_BLOCK - 1) & ~(fmt.INODES_PER_BLOCK - 1)
            if ipg > _BPG:
                if fixed:
                    raise Ext4SizeError(f"{inodes} inodes do not fit a {total}-block filesystem "
                                        f"(at most {_BPG} per 128 MiB group)")
                total = -(-inodes // _BPG) * _BPG
                continue
            itb = ipg // fmt.INODES_PER_BLOCK
            jblocks = fmt.default_journal_blocks(total) if sink.journal else 0
            # Simulate the placement from the frontier: bitmaps, inode tables, journal (+ its tree).
            sink._frontier = base_frontier
            self.gaps = []
            bbitmaps = [r for r in _blocks_of(sink._fresh(groups))]
            ibitmaps = [r for r in _blocks_of(sink._fresh(groups))]
            tables = [self._contiguous(itb) for _ in range(groups)]
            jruns = split_extents(_as_extents(sink._fresh(jblocks))) if jblocks else []
            jtree = tree_blocks(len(jruns))
            jtree_runs = sink._fresh(jtree) if jtree else []
            end = sink._frontier
            if fixed:
                if end > total:
                    raise Ext4SizeError(f"size {sink.size} too small: the content needs at least {end << _BITS} "
                                        f"bytes ({end} blocks of {BLKSZ}) before any free space")
                break
            used = end - holes - sum(n for _, n in self.gaps)
            want = end + max(used // 10, _MIN_FREE)
            want = (want + 255) & ~255
            rem = want % _BPG
            if rem and rem <= _overhead(want // _BPG) + 16:
                want += 32  # a last group must hold more than its fixed blocks
            if want <= total:  # the layout was made for ``total``: it holds
                break
            total = max(total, want)
        else:
            raise Ext4Error("layout did not converge")
        sink.blocks_count = total
        self.groups, self.ipg, self.itb = groups, ipg, itb
        self.tables = tables
        self.total = total
        self.last_ino = last_ino

        # Journal inode first (its i_block goes into the superblock too).
        jblock = bytes(fmt.IBLOCK_SIZE)
        if jblocks:
            jtree_blocks = [b for b in _blocks_of(jtree_runs)]
            jblock, jnodes = build_extent_tree(jruns, jtree_blocks)
            for blk, data in jnodes:
                out.at(blk << _BITS, data)
            jsb = fmt.JOURNAL_SUPERBLOCK.pack(
                fmt.JBD2_MAGIC, fmt.JBD2_SUPERBLOCK_V2, 0, BLKSZ, jblocks, 1, 1, 0, 0, 0, 0, 0, sink.uuid, 1,
                0, 0, 0, 0, 0, 0, 0, bytes(768))
            out.at(jruns[0][1] << _BITS, jsb)
        self.jblocks, self.jtree, self.jblock = jblocks, jtree, jblock

        free_blocks, block_bitmaps = self._block_bitmaps(end)
        for g in range(groups):
            out.at(bbitmaps[g] << _BITS, block_bitmaps[g])
        block_bitmaps.clear()
        free_inodes, dirs = self._inode_bitmaps(ibitmaps)
        self._inode_tables()
        descs = [fmt.GROUP_DESC.pack(bbitmaps[g], ibitmaps[g], tables[g], free_blocks[g], free_inodes[g], dirs[g],
                                     0x4, 0, 0, 0, 0, 0) for g in range(groups)]  # 0x4: inode table zeroed
        for m in range(0, groups, fmt.DESCS_PER_BLOCK):
            blob = b"".join(descs[m:m + fmt.DESCS_PER_BLOCK])
            blob += bytes(BLKSZ - len(blob))
            for g in (m, m + 1, m + fmt.DESCS_PER_BLOCK - 1):
                if g < groups:
                    out.at((g * _BPG + int(fmt.group_has_super(g))) << _BITS, blob)
        self._superblocks(sum(free_blocks), sum(free_inodes))
        out.flush()
        os.ftruncate(sink._fd, total << _BITS)

    def _contiguous(self, n: int) -> int:
        """``n`` fresh blocks in one run (an inode table), past any group's fixed blocks."""
        sink = self.sink
        f = sink._frontier
        while True:
            group, off = divmod(f, _BPG)
            if off < _overhead(group):
                f = group * _BPG + _overhead(group)
            boundary = (f // _BPG + 1) * _BPG
            while boundary < f + n and not _overhead(boundary // _BPG):
                boundary += _BPG
            if boundary >= f + n:
                sink._frontier = f + n
                return f
            # The run would cross fixed blocks: start after them. The blocks skipped here belong
            # to nothing, so they must be free space in the bitmaps (not part of the used [0, end)).
            self.gaps.append((f, boundary - f))
            f = boundary

    def _block_bitmaps(self, end: int) -> tuple[list[int], list[bytes]]:
        """Used: [0, end) less the free holes and the gaps inode tables skipped, and every group's
        fixed blocks."""
        sink, total, groups = self.sink, self.total, self.groups
        used: list[tuple[int, int]] = []
        lo = 0
        for s, n in sorted([*zip(sink._hole_start, sink._hole_len), *self.gaps]):
            if s > lo:
                used.append((lo, s))
            lo = s + n
        if end > lo:
            used.append((lo, end))
        for g in range(groups):
            start = g * _BPG
            ov = _overhead(g)
            if start >= end and ov:
                used.append((start, min(start + ov, total)))
        used.sort()
        maps = [bytearray(BLKSZ) for _ in range(groups)]
        for lo, hi in used:
            while lo < hi:
                g = lo // _BPG
                top = min(hi, (g + 1) * _BPG)
                _set_bits(maps[g], lo - g * _BPG, top - g * _BPG)
                lo = top
        free = []
        for g in range(groups):
            size = min(_BPG, total - g * _BPG)
            free.append(size - int.from_bytes(maps[g], "little").bit_count())
            if size < _BPG:
                _set_bits(maps[g], size, _BPG)  # padding past the end counts as used
        return free, [bytes(m) for m in maps]

    def _inode_bitmaps(self, where: list[int]) -> tuple[list[int], list[int]]:
        ipg, out = self.ipg, self.sink._out
        free, dirs = [], [0] * self.groups
        for p, node in enumerate(self.nodes):
            if node.kind == tree.DIR:
                dirs[(self.ino(p) - 1) // ipg] += 1
        for g in range(self.groups):
            bm = bytearray(BLKSZ)
            lo, hi = g * ipg + 1, min((g + 1) * ipg, self.last_ino)
            n = max(0, hi - lo + 1)
            _set_bits(bm, 0, n)
            _set_bits(bm, ipg, BLKSZ * 8)
            free.append(ipg - n)
            out.at(where[g] << _BITS, bm)
        return free, dirs

    # -- inodes ----------------------------------------------------------------------------------

    def _inode_tables(self) -> None:
        """Each group's table packed in one buffer (through its last used inode; the rest stays
        never-written zeros) and written at once: one ``pack_into`` per inode, no per-inode bytes."""
        out, ipg, nodes = self.sink._out, self.ipg, self.nodes
        size = fmt.INODE_SIZE
        build = self.sink.build_time_ns
        buf = bytearray()
        group = -1

        def start(g: int) -> bytearray:
            if buf:
                out.at(self.tables[group] << _BITS, buf)
            used = min((g + 1) * ipg, self.last_ino) - g * ipg
            return bytearray(used * size)

        # Inode numbers rise with the position (root 2, journal 8, then 11, 12, ...): groups in order.
        buf, group = start(0), 0
        if self.jblocks:
            j = Node(tree.REG, 0o600, 0, 0, build)
            self._inode(buf, (fmt.JOURNAL_INO - 1) * size, j, 1, self.jblocks << _BITS, self.jblock,
                        self.jblocks + self.jtree, fmt.EXTENTS_FL, b"", 0)
        # The usual inode, a regular file in one extent with nothing precomputed, is packed right
        # here (no call, no lookups beyond one set); the others by _node_inode.
        other = {*self.iblock, *self.extra, *self.ibody, *self.xblock}
        sink = self.sink
        starts, counts, several = sink._start, sink._nblk, sink._extents
        links, crtime, pack, leaf = self.nlink, self.crtime, fmt.INODE.pack_into, _LEAF1.pack_into
        reg, sectors_shift, iblock_at, isize = tree.REG, _BITS - 9, fmt.IBLOCK_OFFSET, fmt.EXTRA_ISIZE
        for p in range(len(nodes)):
            g, i = divmod(self.ino(p) - 1, ipg)
            if g != group:
                buf, group = start(g), g
            at = i * size
            node = nodes[p]
            index = node.data
            if node.kind != reg or p in other or not isinstance(index, int) or index in several:
                self._node_inode(buf, at, p)
                continue
            n = counts[index]
            uid, gid = node.uid, node.gid
            if n > fmt.EXTENT_MAX_LEN or not (0 <= uid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF):
                self._node_inode(buf, at, p)
                continue
            mtime = node.mtime_ns
            if mtime is None:
                mtime = build
            m, m_extra = _encode_time(mtime)
            atime = node.atime_ns
            a, a_extra = (m, m_extra) if atime is None or atime == mtime else _encode_time(atime)
            file_size = node.size
            sectors = n << sectors_shift
            pack(buf, at, reg | (node.mode & 0o7777), uid & 0xFFFF, file_size & 0xFFFFFFFF, a, m, m, 0, gid & 0xFFFF,
                 links[p], sectors & 0xFFFFFFFF, fmt.EXTENTS_FL, 0, b"", 0, 0, file_size >> 32, 0,
                 (sectors >> 32) & 0xFFFF, 0, uid >> 16, gid >> 16, 0, 0,
                 isize, 0, m_extra, m_extra, a_extra, crtime[0], crtime[1], 0, 0)
            if n:
                first = starts[index]
                leaf(buf, at + iblock_at, fmt.EXTENT_MAGIC, 1, fmt.EXTENTS_IN_INODE, 0, 0, 0, n, first >> 32,
                     first & 0xFFFFFFFF)
            else:
                fmt.EXTENT_HEADER.pack_into(buf, at + iblock_at, fmt.EXTENT_MAGIC, 0, fmt.EXTENTS_IN_INODE, 0, 0)
        if buf:
            out.at(self.tables[group] << _BITS, buf)

    def _node_inode(self, buf: bytearray, at: int, p: int) -> None:
        node = self.nodes[p]
        kind = node.kind
        flags = 0
        blocks = self.extra.get(p, 0)
        iblock = self.iblock.get(p)
        leaf: tuple[int, int] | None = None  # (start, count): i_block is a leaf of at most one extent
        if kind == tree.REG:
            size = node.size
            index = node.data
            sink = self.sink
            if isinstance(index, int):
                nblk = sink._nblk[index]
                blocks += nblk
                if iblock is None:
                    if index not in sink._extents and nblk <= fmt.EXTENT_MAX_LEN:
                        leaf = (sink._start[index], nblk)
                    else:
                        iblock = _leaf(sink._file_extents(index), fmt.EXTENTS_IN_INODE)
            elif iblock is None:
                leaf = (0, 0)
            flags = fmt.EXTENTS_FL
        elif kind == tree.DIR:
            size = self.dir_blocks[p] << _BITS
            blocks += self.dir_blocks[p]
            flags = fmt.EXTENTS_FL | (fmt.INDEX_FL if p in self.indexed else 0)
        elif kind == tree.LNK:
            size = len(node.target)
            if iblock is None:
                iblock = node.target
            else:
                blocks += 1
                flags = fmt.EXTENTS_FL
        elif kind in (tree.CHR, tree.BLK):
            size = 0
            major, minor = os.major(node.rdev), os.minor(node.rdev)
            if fmt.old_valid_dev(major, minor):
                iblock = struct.pack("<I", fmt.old_encode_dev(major, minor))
            else:
                iblock = struct.pack("<II", 0, fmt.new_encode_dev(major, minor) & 0xFFFFFFFF)
        elif kind in (tree.FIFO, tree.SOCK):
            size = 0
        else:
            raise Ext4Error(f"{text(self._path(p))}: unknown file type {kind:o}")
        if not (0 <= node.uid <= 0xFFFFFFFF and 0 <= node.gid <= 0xFFFFFFFF):
            raise Ext4Error(f"{text(self._path(p))}: owner {node.uid}:{node.gid} out of ext4's 32-bit range")
        self._inode(buf, at, node, self.nlink[p], size, iblock or b"", blocks, flags, self.ibody.get(p, b""),
                    self.xblock.get(p, 0))
        if leaf is not None:  # the usual file: one extent (or none), packed in place
            start, n = leaf
            if n:
                _LEAF1.pack_into(buf, at + fmt.IBLOCK_OFFSET, fmt.EXTENT_MAGIC, 1, fmt.EXTENTS_IN_INODE, 0, 0,
                                 0, n, start >> 32, start & 0xFFFFFFFF)
            else:
                fmt.EXTENT_HEADER.pack_into(buf, at + fmt.IBLOCK_OFFSET, fmt.EXTENT_MAGIC, 0,
                                            fmt.EXTENTS_IN_INODE, 0, 0)

    def _inode(self, buf: bytearray, at: int, node: Node, links: int, size: int, iblock: bytes, blocks: int,
               flags: int, ibody: bytes, xblock: int) -> None:
        """Pack an inode at ``buf[at:]`` (zeros there); ``iblock`` up to 60 bytes (zero padded)."""
        mtime = node.mtime_ns
        if mtime is None:
            mtime = self.sink.build_time_ns
        m, m_extra = _encode_time(mtime)
        atime = node.atime_ns
        a, a_extra = (m, m_extra) if atime is None or atime == mtime else _encode_time(atime)
        cr, cr_extra = self.crtime
        sectors = blocks << (_BITS - 9)
        uid, gid = node.uid, node.gid
        fmt.INODE.pack_into(
            buf, at, node.kind | (node.mode & 0o7777), uid & 0xFFFF, size & 0xFFFFFFFF, a, m, m, 0, gid & 0xFFFF,
            links, sectors & 0xFFFFFFFF, flags, 0, iblock, 0, xblock, size >> 32, 0,
            (sectors >> 32) & 0xFFFF, 0, uid >> 16, gid >> 16, 0, 0,
            fmt.EXTRA_ISIZE, 0, m_extra, m_extra, a_extra, cr, cr_extra, 0, 0)
        if ibody:
            buf[at + fmt.INODE.size:at + fmt.INODE_SIZE] = ibody

    # -- superblocks -------------------------------------------------------------------------------

    def _superblocks(self, free_blocks: int, free_inodes: int) -> None:
        sink = self.sink
        secs = fmt.encode_time(sink.build_time_ns)[0]
        compat = fmt.COMPAT_EXT_ATTR | fmt.COMPAT_DIR_INDEX | (fmt.COMPAT_HAS_JOURNAL if self.jblocks else 0)
        incompat = fmt.INCOMPAT_FILETYPE | fmt.INCOMPAT_META_BG | fmt.INCOMPAT_EXTENTS | fmt.INCOMPAT_FLEX_BG
        ro = (fmt.RO_COMPAT_SPARSE_SUPER | fmt.RO_COMPAT_LARGE_FILE | fmt.RO_COMPAT_HUGE_FILE
              | fmt.RO_COMPAT_DIR_NLINK | fmt.RO_COMPAT_EXTRA_ISIZE)
        jnl = (self.jblock + struct.pack("<II", (self.jblocks << _BITS) >> 32, (self.jblocks << _BITS) & 0xFFFFFFFF)
               if self.jblocks else bytes(68))
        values: dict[str, object] = dict.fromkeys(fmt.SUPER_FIELDS, 0)
        values.update(
            inodes_count=self.ipg * self.groups, blocks_count_lo=self.total, free_blocks_count_lo=free_blocks,
            free_inodes_count=free_inodes, log_block_size=_BITS - 10, log_cluster_size=_BITS - 10,
            blocks_per_group=_BPG, clusters_per_group=_BPG, inodes_per_group=self.ipg, wtime=secs,
            max_mnt_count=-1, magic=fmt.SUPER_MAGIC, state=fmt.STATE_VALID, errors=fmt.ERRORS_CONTINUE,
            lastcheck=secs, creator_os=fmt.OS_LINUX, rev_level=fmt.REV_DYNAMIC, first_ino=fmt.FIRST_INO,
            inode_size=fmt.INODE_SIZE, feature_compat=compat, feature_incompat=incompat, feature_ro_compat=ro,
            uuid=sink.uuid, volume_name=sink.label, last_mounted=b"", journal_uuid=bytes(16),
            journal_inum=fmt.JOURNAL_INO if self.jblocks else 0, hash_seed=self.hash_seed,
            def_hash_version=fmt.HASH_HALF_MD4, jnl_backup_type=fmt.JNL_BACKUP_BLOCKS if self.jblocks else 0,
            default_mount_opts=fmt.DEFM_XATTR_USER | fmt.DEFM_ACL, mkfs_time=secs, jnl_blocks=jnl,
            min_extra_isize=fmt.EXTRA_ISIZE, want_extra_isize=fmt.EXTRA_ISIZE, flags=fmt.FLAGS_UNSIGNED_HASH,
            log_groups_per_flex=4)
        out = sink._out
        for g in range(self.groups):
            if fmt.group_has_super(g):
                values["block_group_nr"] = g
                sb = fmt.SUPER_BLOCK.pack(*(values[k] for k in fmt.SUPER_FIELDS))
                if g == 0:
                    out.at(0, bytes(fmt.SUPER_OFFSET) + sb + bytes(BLKSZ - fmt.SUPER_OFFSET - len(sb)))
                else:
                    out.at(g * _BPG << _BITS, sb + bytes(BLKSZ - len(sb)))


def _blocks_of(runs: list[tuple[int, int]]) -> list[int]:
    return [b for start, n in runs for b in range(start, start + n)]


def _as_extents(runs: list[tuple[int, int]]) -> list[Extent]:
    out: list[Extent] = []
    lblk = 0
    for p, n in runs:
        out.append((lblk, p, n))
        lblk += n
    return out


def _entry_offsets(body: bytes) -> list[int]:
    """Offsets of the xattr entries in a block body (which starts after the 32-byte header)."""
    offs, at = [], 0
    while body[at:at + 4] != b"\0\0\0\0":
        offs.append(at)
        at += fmt.xattr_entry_len(body[at])
    return offs


def _linear_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Directory blocks holding ``entries`` in order; each block's last entry reaches its end."""
    blocks: list[bytes] = []
    cur = bytearray(BLKSZ)
    used = last = 0
    pack = fmt.DIRENT.pack_into
    for name, ino, ftype in entries:
        n = len(name)
        need = (fmt.DIRENT.size + n + 3) & ~3  # fmt.dirent_len
        if used + need > BLKSZ:
            blocks.append(_close_block(cur, used, last))
            cur = bytearray(BLKSZ)
            used = 0
        last = used
        pack(cur, used, ino, need, n, ftype)
        cur[used + fmt.DIRENT.size:used + fmt.DIRENT.size + n] = name  # the padding is zeros already
        used += need
    blocks.append(_close_block(cur, used, last))
    return blocks


def _close_block(cur: bytearray, used: int, last: int) -> bytes:
    """The block ``cur`` (zeros past ``used``) with its last entry, at ``last``, reaching the end."""
    if not used:  # an empty leaf: one unused entry spanning the block
        return fmt.DIRENT.pack(0, BLKSZ, 0, 0) + bytes(BLKSZ - fmt.DIRENT.size)
    struct.pack_into("<H", cur, last + 4, BLKSZ - last)
    return bytes(cur)


def _htree_blocks(me: int, up: int, entries: list[tuple[bytes, int, int]],
                  seed: tuple[int, int, int, int]) -> list[bytes]:
    """An indexed directory: block 0 the dx_root ("." and ".." then the index), then (two-level
    trees) index nodes, then the leaves. Leaves hold entries in hash order; a leaf starts only
    where the hash changes, so every entry of one hash is in one leaf and no collision bit is needed."""
    hash_of = hasher(seed)
    hashed = sorted((hash_of(name), name, ino, ft) for name, ino, ft in entries)
    leaves: list[list[tuple[bytes, int, int]]] = [[]]
    leaf_hash: list[int] = [0]
    used = 0
    i = 0
    while i < len(hashed):
        h = hashed[i][0]
        j = i
        need = 0
        while j < len(hashed) and hashed[j][0] == h:  # a run of equal hashes stays together
            need += fmt.dirent_len(len(hashed[j][1]))
            j += 1
        if used + need > BLKSZ and leaves[-1]:
            leaves.append([])
            leaf_hash.append(h)
            used = 0
        if need > BLKSZ:
            raise Ext4Error("too many names with one directory hash")
        leaves[-1].extend((name, ino, ft) for _, name, ino, ft in hashed[i:j])
        used += need
        i = j
    nleaves = len(leaves)
    if nleaves <= fmt.DX_ROOT_LIMIT:
        levels, nodes = 0, 0
    elif nleaves <= fmt.DX_ROOT_LIMIT * fmt.DX_NODE_LIMIT:
        levels, nodes = 1, -(-nleaves // fmt.DX_NODE_LIMIT)
    else:
        raise Ext4Error(f"directory of {len(entries)} names needs more than two htree levels (large_dir)")
    first_leaf = 1 + nodes
    index = [(leaf_hash[k], first_leaf + k) for k in range(nleaves)]

    def dx_block(head: bytes, limit: int, items: list[tuple[int, int]]) -> bytes:
        raw = bytearray(head)
        raw += fmt.DX_COUNTLIMIT.pack(limit, len(items)) + struct.pack("<I", items[0][1])
        for h, blk in items[1:]:
            raw += fmt.DX_ENTRY.pack(h, blk)
        return bytes(raw) + bytes(BLKSZ - len(raw))

    root_head = (fmt.DIRENT.pack(me, 12, 1, fmt.FT_DIR) + b".\0\0\0"
                 + fmt.DIRENT.pack(up, BLKSZ - 12, 2, fmt.FT_DIR) + b"..\0\0"
                 + fmt.DX_ROOT_INFO.pack(0, fmt.HASH_HALF_MD4, fmt.DX_ROOT_INFO.size, levels, 0))
    out: list[bytes] = []
    if levels == 0:
        out.append(dx_block(root_head, fmt.DX_ROOT_LIMIT, index))
    else:
        node_items = [index[k:k + fmt.DX_NODE_LIMIT] for k in range(0, nleaves, fmt.DX_NODE_LIMIT)]
        out.append(dx_block(root_head, fmt.DX_ROOT_LIMIT, [(items[0][0], 1 + k) for k, items in enumerate(node_items)]))
        fake = fmt.DIRENT.pack(0, BLKSZ, 0, 0)
        for items in node_items:
            out.append(dx_block(fake, fmt.DX_NODE_LIMIT, items))
    for leaf in leaves:
        out.extend(_linear_blocks(leaf))
    return out


__all__ = ["Ext4Error", "Ext4SizeError", "Ext4Sink", "acl_to_disk", "dx_hash", "xattr_key"]
