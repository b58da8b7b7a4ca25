"""The ext4 on-disk format, mirrored from e2fsprogs' ``lib/ext2fs/ext2_fs.h`` / ``ext3_extents.h``, the
kernel's ``fs/ext4/ext4.h``, ``fs/ext4/xattr.h``, ``fs/ext4/acl.h`` and ``include/linux/jbd2.h``.

Little endian everywhere except the jbd2 journal superblock (big endian). Only what ``Ext4Sink``
writes is here: superblock, 32-byte group descriptor, 256-byte inode, extent tree nodes, directory
entries, htree root/node, xattr headers and entries (in-inode and block), ext4's compact ACLs, and the
journal superblock. Each layout's size is asserted, so a typo in a format string fails at import.
"""

from __future__ import annotations

import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS  # the only block size written: the page size on every target
BLOCKS_PER_GROUP = BLOCK_SIZE * 8  # one block bitmap block per group
SUPER_OFFSET = 1024
SUPER_MAGIC = 0xEF53
INODE_SIZE = 256
EXTRA_ISIZE = 32  # i_extra_isize: through i_projid (ns times, crtime)
INODES_PER_BLOCK = BLOCK_SIZE // INODE_SIZE
DESC_SIZE = 32  # no 64bit feature: 32-bit block numbers (16 TiB at 4 KiB blocks)
DESCS_PER_BLOCK = BLOCK_SIZE // DESC_SIZE  # also the meta_bg group size

# Reserved inode numbers.
ROOT_INO = 2
RESIZE_INO = 7
JOURNAL_INO = 8
FIRST_INO = 11  # the first inode for ordinary files

# s_feature_compat
COMPAT_DIR_PREALLOC = 0x0001
COMPAT_HAS_JOURNAL = 0x0004
COMPAT_EXT_ATTR = 0x0008
COMPAT_RESIZE_INODE = 0x0010
COMPAT_DIR_INDEX = 0x0020
COMPAT_SPARSE_SUPER2 = 0x0200
# s_feature_incompat
INCOMPAT_FILETYPE = 0x0002
INCOMPAT_RECOVER = 0x0004
INCOMPAT_META_BG = 0x0010
INCOMPAT_EXTENTS = 0x0040
INCOMPAT_64BIT = 0x0080
INCOMPAT_FLEX_BG = 0x0200
# s_feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x0001
RO_COMPAT_LARGE_FILE = 0x0002
RO_COMPAT_HUGE_FILE = 0x0008
RO_COMPAT_DIR_NLINK = 0x0020
RO_COMPAT_EXTRA_ISIZE = 0x0040
RO_COMPAT_METADATA_CSUM = 0x0400

# s_flags
FLAGS_SIGNED_HASH = 0x0001
FLAGS_UNSIGNED_HASH = 0x0002
# s_default_mount_opts
DEFM_XATTR_USER = 0x0004
DEFM_ACL = 0x0008
# s_def_hash_version / dx_root_info.hash_version
HASH_LEGACY, HASH_HALF_MD4, HASH_TEA = 0, 1, 2
STATE_VALID = 1
ERRORS_CONTINUE = 1
OS_LINUX = 0
REV_DYNAMIC = 1
JNL_BACKUP_BLOCKS = 1  # s_jnl_backup_type: s_jnl_blocks holds a copy of the journal inode's i_block

# struct ext4_super_block (1024 bytes). Fields in order; comments give the offset of each run.
SUPER_FIELDS = (
    # 0x000
    "inodes_count", "blocks_count_lo", "r_blocks_count_lo", "free_blocks_count_lo", "free_inodes_count",
    "first_data_block", "log_block_size", "log_cluster_size", "blocks_per_group", "clusters_per_group",
    "inodes_per_group", "mtime", "wtime",
    # 0x034
    "mnt_count", "max_mnt_count", "magic", "state", "errors", "minor_rev_level",
    # 0x040
    "lastcheck", "checkinterval", "creator_os", "rev_level", "def_resuid", "def_resgid",
    # 0x054 (EXT4_DYNAMIC_REV)
    "first_ino", "inode_size", "block_group_nr", "feature_compat", "feature_incompat", "feature_ro_compat",
    "uuid", "volume_name", "last_mounted", "algorithm_usage_bitmap",
    # 0x0CC
    "prealloc_blocks", "prealloc_dir_blocks", "reserved_gdt_blocks",
    # 0x0D0
    "journal_uuid", "journal_inum", "journal_dev", "last_orphan", "hash_seed", "def_hash_version",
    "jnl_backup_type", "desc_size",
    # 0x100
    "default_mount_opts", "first_meta_bg", "mkfs_time", "jnl_blocks",
    # 0x150
    "blocks_count_hi", "r_blocks_count_hi", "free_blocks_count_hi", "min_extra_isize", "want_extra_isize",
    "flags", "raid_stride", "mmp_update_interval", "mmp_block", "raid_stripe_width", "log_groups_per_flex",
    "checksum_type", "encryption_level", "kbytes_written",
    # 0x180 .. end: snapshot, error, quota, encryption fields (left zero), then the checksum
    "checksum",
)
SUPER_BLOCK = struct.Struct(
    "<13I"  # inodes_count .. wtime
    "HhHHHH"  # mnt_count, max_mnt_count (signed), magic, state, errors, minor_rev_level
    "IIIIHH"  # lastcheck .. def_resgid
    "IHHIII16s16s64sI"  # first_ino .. algorithm_usage_bitmap
    "BBH"  # prealloc_blocks, prealloc_dir_blocks, reserved_gdt_blocks
    "16sIII16sBBH"  # journal_uuid .. desc_size (hash_seed as 16 raw bytes: 4 le32 words)
    "III68s"  # default_mount_opts, first_meta_bg, mkfs_time, jnl_blocks[17] (raw)
    "IIIHHIHHQIBBB1xQ"  # blocks_count_hi .. kbytes_written
    "636x"  # s_snapshot_inum .. s_reserved
    "I"  # s_checksum
)
assert SUPER_BLOCK.size == 1024
assert len(SUPER_FIELDS) == len(SUPER_BLOCK.unpack(bytes(1024)))

# struct ext4_group_desc, 32-byte form: block_bitmap_lo, inode_bitmap_lo, inode_table_lo,
# free_blocks_count_lo, free_inodes_count_lo, used_dirs_count_lo, flags, exclude_bitmap_lo,
# block_bitmap_csum_lo, inode_bitmap_csum_lo, itable_unused_lo, checksum.
GROUP_DESC = struct.Struct("<IIIHHHHIHHHH")
assert GROUP_DESC.size == DESC_SIZE

# struct ext4_inode, 256 bytes with i_extra_isize = 32:
#   i_mode, i_uid, i_size_lo, i_atime, i_ctime, i_mtime, i_dtime, i_gid, i_links_count, i_blocks_lo,
#   i_flags, osd1 (l_i_version), i_block[15] (60 raw bytes), i_generation, i_file_acl_lo, i_size_high,
#   i_obso_faddr, osd2 (l_i_blocks_high, l_i_file_acl_high, l_i_uid_high, l_i_gid_high,
#   l_i_checksum_lo, l_i_reserved), i_extra_isize, i_checksum_hi, i_ctime_extra, i_mtime_extra,
#   i_atime_extra, i_crtime, i_crtime_extra, i_version_hi, i_projid; then in-inode xattr space.
INODE = struct.Struct("<HHIIIIIHHIII60sIIII" "HHHHHH" "HHIIIIIII")
INODE_BASE = 128  # EXT4_GOOD_OLD_INODE_SIZE
assert INODE.size == INODE_BASE + EXTRA_ISIZE
IBLOCK_OFFSET = 40
IBLOCK_SIZE = 60

# i_flags
SECRM_FL = 0x00000001
INDEX_FL = 0x00001000  # htree directory
HUGE_FILE_FL = 0x00040000  # i_blocks in fs blocks (not written: 512-byte units reach 2^48 * 512)
EXTENTS_FL = 0x00080000

# Directory entry file types (ext4_dir_entry_2.file_type).
FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
NAME_LEN = 255
LINK_MAX = 65000  # EXT4_LINK_MAX: a directory with more subdirectories has links_count 1 (dir_nlink)

# struct ext4_dir_entry_2: inode, rec_len, name_len, file_type; then the name, padded to 4 bytes.
DIRENT = struct.Struct("<IHBB")
assert DIRENT.size == 8


def dirent_len(name_len: int) -> int:
    """EXT4_DIR_REC_LEN: header + name rounded up to 4 bytes."""
    return (DIRENT.size + name_len + 3) & ~3


# htree: struct dx_root_info (after the "." and ".." entries of block 0): reserved_zero, hash_version,
# info_length (8), indirect_levels, unused_flags. dx_countlimit: limit, count (in place of the first
# dx_entry's hash). dx_entry: hash, block (logical block in the directory).
DX_ROOT_INFO = struct.Struct("<IBBBB")
DX_COUNTLIMIT = struct.Struct("<HH")
DX_ENTRY = struct.Struct("<II")
assert DX_ROOT_INFO.size == 8 and DX_COUNTLIMIT.size == 4 and DX_ENTRY.size == 8
DX_ROOT_ENTRIES_AT = 12 + 12 + DX_ROOT_INFO.size  # ".", ".." (rec_len 12 each) then the info
DX_ROOT_LIMIT = (BLOCK_SIZE - DX_ROOT_ENTRIES_AT) // DX_ENTRY.size
DX_NODE_LIMIT = (BLOCK_SIZE - 8) // DX_ENTRY.size  # a node starts with a fake empty dirent (8 bytes)
DX_MAX_LEVELS = 2  # indirect_levels 0 or 1 without the large_dir feature

# Extent tree: struct ext4_extent_header (magic, entries, max, depth, generation), struct ext4_extent
# (ee_block, ee_len, ee_start_hi, ee_start_lo), struct ext4_extent_idx (ei_block, ei_leaf_lo,
# ei_leaf_hi, ei_unused).
EXTENT_MAGIC = 0xF30A
EXTENT_HEADER = struct.Struct("<HHHHI")
EXTENT = struct.Struct("<IHHI")
EXTENT_IDX = struct.Struct("<IIHH")
assert EXTENT_HEADER.size == EXTENT.size == EXTENT_IDX.size == 12
EXTENTS_IN_INODE = (IBLOCK_SIZE - EXTENT_HEADER.size) // EXTENT.size  # 4
EXTENTS_IN_BLOCK = (BLOCK_SIZE - EXTENT_HEADER.size) // EXTENT.size  # 340
EXTENT_MAX_LEN = 32768  # an initialized extent; longer lengths mean "unwritten"
MAX_FILE_SIZE = ((1 << 32) - 1) << BLOCK_BITS  # s_maxbytes of extent files (ext4_max_size): ee_block is 32 bits
FAST_SYMLINK_MAX = IBLOCK_SIZE - 1  # a target shorter than i_block (59 bytes) is stored in it

# Extended attributes (fs/ext4/xattr.h).
XATTR_MAGIC = 0xEA020000
# struct ext4_xattr_header (block): h_magic, h_refcount, h_blocks, h_hash, h_checksum, h_reserved[3].
XATTR_HEADER = struct.Struct("<IIIII12x")
assert XATTR_HEADER.size == 32
# struct ext4_xattr_ibody_header: h_magic (the entries follow at once).
XATTR_IBODY_HEADER = struct.Struct("<I")
# struct ext4_xattr_entry: e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash.
XATTR_ENTRY = struct.Struct("<BBHIII")
assert XATTR_ENTRY.size == 16
XATTR_PAD = 4
XATTR_REFCOUNT_MAX = 1024  # EXT4_XATTR_REFCOUNT_MAX: inodes sharing one xattr block
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6
IBODY_XATTR_SPACE = INODE_SIZE - INODE_BASE - EXTRA_ISIZE  # 96 bytes: magic, entries, values


def xattr_entry_len(name_len: int) -> int:
    """EXT4_XATTR_LEN: entry header + name rounded up to 4 bytes."""
    return (XATTR_ENTRY.size + name_len + XATTR_PAD - 1) & ~(XATTR_PAD - 1)


def xattr_value_len(size: int) -> int:
    return (size + XATTR_PAD - 1) & ~(XATTR_PAD - 1)


# POSIX ACLs: the xattr form (include/uapi/linux/posix_acl_xattr.h: version 2, entries tag/perm/id)
# and ext4's on-disk form (fs/ext4/acl.h: version 1; USER/GROUP entries with an id, the others without).
POSIX_ACL_XATTR_VERSION = 2
POSIX_ACL_XATTR_HEADER = struct.Struct("<I")
POSIX_ACL_XATTR_ENTRY = struct.Struct("<HHI")
EXT4_ACL_VERSION = 1
EXT4_ACL_HEADER = struct.Struct("<I")
EXT4_ACL_ENTRY = struct.Struct("<HHI")
EXT4_ACL_ENTRY_SHORT = struct.Struct("<HH")
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# jbd2 (include/linux/jbd2.h), big endian. journal_superblock_t: the header (h_magic, h_blocktype,
# h_sequence), s_blocksize, s_maxlen, s_first, s_sequence, s_start, s_errno, s_feature_compat,
# s_feature_incompat, s_feature_ro_compat, s_uuid[16], s_nr_users, s_dynsuper, s_max_transaction,
# s_max_trans_data, s_checksum_type (+3 pad), s_num_fc_blks, s_head, s_padding[40] (u32), s_checksum,
# s_users[16 * 48].
JBD2_MAGIC = 0xC03B3998
JBD2_SUPERBLOCK_V2 = 4
JOURNAL_SUPERBLOCK = struct.Struct(">III" "IIIIII" "III" "16s" "IIII" "B3x" "II" "160x" "I" "768s")
assert JOURNAL_SUPERBLOCK.size == 1024


def default_journal_blocks(blocks: int) -> int:
    """mke2fs' journal size for a filesystem of ``blocks`` 4 KiB blocks (ext2fs_default_journal_size);
    0: too small for a journal."""
    if blocks < 2048:
        return 0
    for limit, size in ((32768, 1024), (256 * 1024, 4096), (512 * 1024, 8192), (4096 * 1024, 16384),
                        (8192 * 1024, 32768), (16384 * 1024, 65536), (32768 * 1024, 131072)):
        if blocks < limit:
            return size
    return 262144


def group_has_super(group: int) -> bool:
    """sparse_super: backups in groups 0, 1 and powers of 3, 5 and 7."""
    if group <= 1:
        return True
    if not group & 1:
        return False
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


def group_has_desc(group: int) -> bool:
    """meta_bg (s_first_meta_bg 0): each meta group's descriptor block is in its first, second and
    last group."""
    return group % DESCS_PER_BLOCK in (0, 1, DESCS_PER_BLOCK - 1)


def group_overhead(group: int) -> int:
    """Blocks at the start of ``group`` for the superblock copy and descriptor block (meta_bg):
    independent of the filesystem's size, which lets file data stream to its final place."""
    return int(group_has_super(group)) + int(group_has_desc(group))


def encode_time(ns: int) -> tuple[int, int]:
    """(i_xtime, i_xtime_extra) of a time in ns: 32-bit seconds, then 2 epoch bits and 30 bits of
    nanoseconds (ext4_encode_extra_time); clamped to ext4's range (1901 .. 2446) as the kernel does."""
    secs, nsec = divmod(ns, 1_000_000_000)
    if secs < -(1 << 31):
        secs, nsec = -(1 << 31), 0
    elif secs > (1 << 34) - (1 << 31) - 1:
        secs, nsec = (1 << 34) - (1 << 31) - 1, 999_999_999
    low = secs & 0xFFFFFFFF
    signed = low - (1 << 32) if low & 0x80000000 else low
    epoch = ((secs - signed) >> 32) & 3
    return low, epoch | (nsec << 2)


def old_valid_dev(major: int, minor: int) -> bool:
    return major < 256 and minor < 256


def old_encode_dev(major: int, minor: int) -> int:
    return (major << 8) | minor


def new_encode_dev(major: int, minor: int) -> int:
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
