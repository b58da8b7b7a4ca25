"""The erofs on-disk format, mirrored from the kernel's ``fs/erofs/erofs_fs.h`` (little endian).

Only what an uncompressed image needs: superblock, extended inode, xattrs (inline and shared),
directory entries, chunk block maps. Each layout's size is asserted against the header's
``BUILD_BUG_ON`` checks, so a typo in a format string fails at import, not in the kernel.
"""

from __future__ import annotations

import struct

SUPER_OFFSET = 1024  # to leave room for x86 boot sectors
SUPER_MAGIC = 0xE0F5E1E2

BLKSZBITS = 12
BLKSZ = 1 << BLKSZBITS  # the only block size we write: the page size on every platform we target

FEATURE_COMPAT_SB_CHKSUM = 0x00000001
FEATURE_COMPAT_MTIME = 0x00000002
FEATURE_COMPAT_XATTR_FILTER = 0x00000004

FEATURE_INCOMPAT_ZERO_PADDING = 0x00000001
FEATURE_INCOMPAT_BIG_PCLUSTER = 0x00000002
FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004
FEATURE_INCOMPAT_DEVICE_TABLE = 0x00000008
FEATURE_INCOMPAT_ZTAILPACKING = 0x00000010
FEATURE_INCOMPAT_FRAGMENTS = 0x00000020
FEATURE_INCOMPAT_XATTR_PREFIXES = 0x00000040

# struct erofs_super_block (128 bytes): magic, checksum, feature_compat, blkszbits, sb_extslots,
# root_nid, inos, build_time, build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid[16],
# volume_name[16], feature_incompat, u1 (compression algs / lz4 distance), extra_devices,
# devt_slotoff, dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid,
# xattr_filter_reserved, reserved2[23].
SUPER_BLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
assert SUPER_BLOCK.size == 128

# i_format: bit 0 the inode version (layout), bits 1-3 the data layout.
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
I_VERSION_BIT = 0
I_DATALAYOUT_BIT = 1

INODE_FLAT_PLAIN = 0
INODE_COMPRESSED_FULL = 1
INODE_FLAT_INLINE = 2
INODE_COMPRESSED_COMPACT = 3
INODE_CHUNK_BASED = 4


def i_format(datalayout: int, version: int = INODE_LAYOUT_EXTENDED) -> int:
    return (version << I_VERSION_BIT) | (datalayout << I_DATALAYOUT_BIT)


# struct erofs_inode_extended (64 bytes): i_format, i_xattr_icount, i_mode, i_reserved (i_nb),
# i_size, i_u (raw_blkaddr | rdev | chunk info), i_ino, i_uid, i_gid, i_mtime, i_mtime_nsec,
# i_nlink, i_reserved2[16]. ``i_u`` is packed as a u32 here; chunk info is (format | reserved << 16).
INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
assert INODE_EXTENDED.size == 64
INODE_COMPACT_SIZE = 32
# nid = (inode position - meta_blkaddr * BLKSZ) / 32: every inode starts on a 32-byte slot.
ISLOTBITS = 5
ISLOTSIZE = 1 << ISLOTBITS

# struct erofs_inode_chunk_info packed in i_u: chunk blkbits, and INDEXES for 8-byte indexes
# instead of a 4-byte block address array.
CHUNK_FORMAT_BLKBITS_MASK = 0x001F
CHUNK_FORMAT_INDEXES = 0x0020

NULL_ADDR = 0xFFFFFFFF  # EROFS_NULL_ADDR (-1): a hole chunk, or no data blocks at all
BLOCK_MAP_ENTRY = struct.Struct("<I")
assert BLOCK_MAP_ENTRY.size == 4
# struct erofs_inode_chunk_index: advise, device_id, blkaddr.
CHUNK_INDEX = struct.Struct("<HHI")
assert CHUNK_INDEX.size == 8

# struct erofs_xattr_ibody_header: h_name_filter (bit set = name absent; only with XATTR_FILTER),
# h_shared_count, h_reserved2[7]; followed by h_shared_xattrs[h_shared_count] (u32 ids), then
# the inline entries. i_xattr_icount = 1 + (ibody size - 12) / 4.
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
assert XATTR_IBODY_HEADER.size == 12
XATTR_SHARED_ID = struct.Struct("<I")
assert XATTR_SHARED_ID.size == 4
# struct erofs_xattr_entry: e_name_len, e_name_index, e_value_size; name suffix and value follow,
# the whole entry padded to 4 bytes (EROFS_XATTR_ALIGN).
XATTR_ENTRY = struct.Struct("<BBH")
assert XATTR_ENTRY.size == 4
XATTR_ALIGN = 4

XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_LONG_PREFIX = 0x80

# What each index stands for, as the kernel prefixes names with it (xattr.c); the ACL indexes
# name a whole xattr: their suffix is empty.
XATTR_PREFIXES: dict[int, str] = {
    XATTR_INDEX_USER: "user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: "system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: "system.posix_acl_default",
    XATTR_INDEX_TRUSTED: "trusted.",
    XATTR_INDEX_LUSTRE: "lustre.",
    XATTR_INDEX_SECURITY: "security.",
}
XATTR_NAME_MAX = 255  # e_name_len is a u8
XATTR_VALUE_MAX = 0xFFFF  # e_value_size is a u16
XATTR_SHARED_MAX = 0xFF  # h_shared_count is a u8
XATTR_ICOUNT_MAX = 0xFFFF  # i_xattr_icount is a u16


def xattr_ibody_size(icount: int) -> int:
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)


def xattr_entry_size(name_len: int, value_len: int) -> int:
    return (XATTR_ENTRY.size + name_len + value_len + XATTR_ALIGN - 1) & ~(XATTR_ALIGN - 1)


# struct erofs_dirent: nid, nameoff, file_type, reserved. A directory block is an array of these
# followed by the names (not NUL-terminated; the last one ends at a NUL or the block/dir end);
# nameoff of the first entry / 12 is the entry count. Names sort by bytes across blocks: lookup
# binary-searches the blocks by their first name, then the entries of one block.
DIRENT = struct.Struct("<QHBx")
assert DIRENT.size == 12
NAME_LEN = 255

FT_UNKNOWN = 0
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``: what ``i_u.rdev`` holds (decoded with ``new_decode_dev``)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
