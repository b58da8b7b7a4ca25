"""A streaming tar reader: what GNU tar reads, with GNU tar's result (tests/test_tar_dialects.py): v7,
ustar, star (sparse too), PAX (xattrs, sparse 0.0/0.1/1.0, global and Solaris ``X`` headers), GNU (long names, sparse,
dump directories, volume labels), base-256 numbers, signed checksums, POSIX ACLs (star's
``SCHILY.acl.*`` text and Solaris ``A`` headers, as ``system.posix_acl_*`` xattrs). GNU multi-volume
members and unknown entry types are refused (GNU tar extracts the latter as regular files, with a warning).

Entry types that carry no data (directories, links, devices, FIFOs) take no data blocks whatever their
size field says, as GNU tar, libarchive and Python's ``tarfile`` read them. The one exception the pax
standard makes: a hardlink in a pax archive may carry the file's data (``pax -o linkdata``); GNU tar
never reads it, so it is skipped only where the next block is not a header.

Written here rather than taken from ``tarfile`` so that every header is bounded (a hostile PAX or
long-name header cannot make us buffer gigabytes), names stay raw bytes, and file data can be copied
from the decompressed stream straight into a file descriptor.
"""

from __future__ import annotations

import base64
import bisect
import re
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ImageError, LimitExceeded
from .root import clean_path

if TYPE_CHECKING:
    from .layer import Limits

BLOCK = 512
# Defaults of the parser's limits (``Limits.max_header_bytes`` etc., settable with ``--limit``):
# the extended headers of one member together (PAX, GNU long names, a Solaris ACL; Go's archive/tar
# bounds each at 1 MiB too), the regions of one sparse map, and global PAX records, which are merged
# into every later entry (so each entry costs them all).
MAX_HEADER_BYTES = 1 << 20
MAX_SPARSE_REGIONS = 1 << 16
MAX_GLOBAL_RECORDS = 64

REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_CONT = b"7"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
_GNU_DUMPDIR, _GNU_VOLHDR, _GNU_MULTIVOL = b"D", b"V", b"M"
_SOLARIS_PAX = b"X"  # Solaris tar's extended header: read like ``x``, as GNU tar does
_SOLARIS_ACL = b"A"  # Solaris tar's ACL of the next member (libarchive reads it; GNU tar does not know it)
_KNOWN = (REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO, _GNU_VOLHDR)
_NO_DATA = (LINK, SYMLINK, CHR, BLK, DIR, FIFO)
_PLAIN = (REG, b"\0", _CONT, DIR, SYMLINK, LINK)  # types the common path of TarReader._next takes whole


@dataclass(slots=True)
class Entry:
    """One member of the archive, after PAX/GNU headers were folded in."""

    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int  # bytes stored in the archive for this member
    mtime_ns: int
    atime_ns: int | None = None
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    # For sparse files: the data regions (offset, length) and the logical size.
    sparse: list[tuple[int, int]] | None = None
    realsize: int | None = None
    # Filled in by ``tokens`` on the parsing thread: the cleaned path, and small files' data.
    parts: tuple[bytes, ...] = ()
    inline: list[memoryview] | None = None
    # What of the member could not be kept (an ACL naming a user without a numeric id, say): GNU tar
    # warns and goes on; the applier lists these in ``Report.skipped``.
    notes: list[str] | None = None

    def __len__(self) -> int:  # what an entry weighs in the producer's batches
        return BLOCK + (self.size if self.inline is not None else 0)

    @property
    def file_size(self) -> int:
        return self.realsize if self.realsize is not None else self.size


class TarFormatError(ImageError):
    pass


# The header fields the common path reads, in one unpack: name, mode, uid, gid, size, mtime, chksum,
# typeflag, linkname, magic + version, (uname, gname skipped), devmajor, devminor, prefix (+ 12 unused).
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s64x8s8s155s12x")
_ZERO_BLOCK = bytes(BLOCK)


class ByteStream:
    """Sequential reads over an iterator of byte chunks, without copying where it can be avoided."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")
        self._pos = 0
        self.offset = 0  # bytes consumed so far

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf = memoryview(chunk)
                self._pos = 0
                return True
        return False

    def read_up_to(self, n: int) -> memoryview:
        """At most ``n`` bytes (fewer at a chunk boundary); empty only at end of stream."""
        if self._pos >= len(self._buf) and not self._fill():
            return memoryview(b"")
        end = min(self._pos + n, len(self._buf))
        out = self._buf[self._pos:end]
        self._pos = end
        self.offset += len(out)
        return out

    def read_block(self) -> bytes | None:
        """The next 512-byte header; None at the end of the stream (a partial block is truncation)."""
        pos = self._pos
        end = pos + BLOCK
        if end <= len(self._buf):  # the common case: the block lies in the current chunk
            self._pos = end
            self.offset += BLOCK
            return self._buf[pos:end].tobytes()
        first = self.read_up_to(BLOCK)
        if not first:
            return None
        if len(first) == BLOCK:
            return first.tobytes()
        return first.tobytes() + self.read_exact(BLOCK - len(first))

    def read_exact(self, n: int) -> bytes:
        first = self.read_up_to(n)
        if len(first) == n:
            return first.tobytes()
        parts = [first.tobytes()]
        got = len(first)
        while got < n:
            piece = self.read_up_to(n - got)
            if not piece:
                raise TarFormatError(f"tar stream truncated at byte {self.offset} (wanted {n - got} more bytes)")
            parts.append(piece.tobytes())
            got += len(piece)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put back ``data``, just read (a one-block look-ahead: rare, so the copy does not matter)."""
        self._buf = memoryview(data + self._buf[self._pos:].tobytes())
        self._pos = 0
        self.offset -= len(data)

    def skip(self, n: int) -> None:
        if self._pos + n <= len(self._buf):  # within the current chunk (padding, most often)
            self._pos += n
            self.offset += n
            return
        while n > 0:
            piece = self.read_up_to(n)
            if not piece:
                raise TarFormatError(f"tar stream truncated at byte {self.offset}")
            n -= len(piece)


_OCTAL = re.compile(rb"[0-7]*")
_PAD = b"\0 "


def _parse_number(field_: bytes) -> int:
    # The common case first: octal digits padded with NULs or spaces at the end. isdigit() admits only
    # ASCII digits (no sign, "0o" or "_"), and int(, 8) refuses 8 and 9, which the slow path then reports.
    text = field_.rstrip(_PAD)
    if text.isdigit():
        try:
            return int(text, 8)
        except ValueError:
            pass
    elif not text:
        return 0  # all NULs or spaces (an unused field)
    if field_[0] & 0x80:  # GNU base-256
        value = field_[0] & 0x7F
        negative = bool(field_[0] & 0x40)
        for b in field_[1:]:
            value = (value << 8) | b
        if negative:
            value -= 1 << (8 * len(field_) - 1)
        return value
    # octal digits, padded with spaces and NULs; only digits (Python's int() would also take a sign,
    # "0o" or "_": a "-1" owner then meant "leave the owner alone" to chown)
    text = field_.rstrip(b"\0 ")
    if not _OCTAL.fullmatch(text):
        text = field_.split(b"\0", 1)[0].strip(b" ")
        if not _OCTAL.fullmatch(text):
            raise TarFormatError(f"bad numeric field {field_!r} in tar header")
    return int(text or b"0", 8)


def _is_star(header: bytes) -> bool:
    """GNU tar's test for a star header: ustar magic, and atime and ctime fields (476, 488) in octal
    ended by a space where ustar's prefix would go on."""
    return (header[257:263] == b"ustar\0" and header[475] == 0 and 48 <= header[476] <= 55 and header[487] == 32
            and 48 <= header[488] <= 55 and header[499] == 32)


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _checksum_ok(header: bytes, field_: bytes | None = None) -> bool:
    if field_ is None:
        field_ = header[148:156]
    stored = _parse_number(field_)
    # The sum of the block's bytes: adler32's low half is 1 + the sum mod 65521, exact for 256 bytes (at
    # most 65,280), so two halves give it without a Python-level loop over 512 ints.
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    unsigned = total - sum(field_) + 8 * 32  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header if b > 127) + 256 * sum(1 for b in header[148:156] if b > 127)
    return stored == signed


def _parse_pax(data: bytes, into: dict[str, list[bytes]]) -> None:
    """``"%d %s=%s\\n"`` records; repeated keys keep their order (GNU sparse 0.0 needs it)."""
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad with NULs
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("malformed PAX record (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("malformed PAX record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise TarFormatError("malformed PAX record (bad length)")
        record = data[space + 1:end - 1]
        key, eq, value = record.partition(b"=")
        if not eq:
            raise TarFormatError("malformed PAX record (no '=')")
        into.setdefault(key.decode("utf-8", "surrogateescape"), []).append(value)
        pos = end


# uid_t's largest value, which is also (uid_t)-1: tar's "-1" owner, read here and mapped by the merge
# engine (layer.py), which GNU tar's chown leaves to the extracting user.
UNSET_ID = (1 << 32) - 1
_MAX_NS = (1 << 63) - 1


def _pax_int(values: list[bytes], key: str, maximum: int = 1 << 62) -> int:
    """A PAX integer record, non-negative and within ``maximum``."""
    try:
        value = int(values[-1])
    except ValueError:
        raise TarFormatError(f"bad PAX {key} value {values[-1][:40]!r}") from None
    if value < 0:
        raise TarFormatError(f"PAX {key} value {value} is negative")
    if value > maximum:
        raise TarFormatError(f"PAX {key} value {value} out of range")
    return value


def _ints(text: bytes, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(b",") if x.strip()]
    except ValueError:
        raise TarFormatError(f"malformed {what}") from None
    if any(v < 0 for v in values):
        raise TarFormatError(f"negative number in {what}")
    return values


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    try:
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        raise TarFormatError(f"bad PAX time {text[:40]!r}") from None
    if ns > _MAX_NS:
        raise TarFormatError(f"PAX time {text[:40]!r} out of range")
    return -ns if negative else ns


def _xattr_name(name: str) -> str:
    if not name or "\0" in name or len(name) > 255:
        raise TarFormatError(f"invalid xattr name {name[:40]!r}")
    return name


# -- POSIX ACLs --------------------------------------------------------------------------------------------
# Text (star's ``SCHILY.acl.access``/``.default``, Solaris ``A`` headers, GNU tar's and bsdtar's output)
# to the kernel's xattr form (include/uapi/linux/posix_acl_xattr.h: version 2, then (tag, perm, id)).

_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ACL_UNDEFINED_ID = UNSET_ID  # ACL_UNDEFINED_ID: the same (uid_t)-1
_ACL_TAGS = {"user": (_ACL_USER_OBJ, _ACL_USER), "u": (_ACL_USER_OBJ, _ACL_USER),
             "group": (_ACL_GROUP_OBJ, _ACL_GROUP), "g": (_ACL_GROUP_OBJ, _ACL_GROUP),
             "mask": (_ACL_MASK, None), "m": (_ACL_MASK, None), "other": (_ACL_OTHER, None), "o": (_ACL_OTHER, None)}
ACL_ACCESS, ACL_DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


class _AclUnusable(Exception):
    """An ACL GNU tar would warn about and leave out (the member itself is extracted)."""


_ACL_PERM_BITS = {"r": 4, "w": 2, "x": 1, "-": 0}


def _acl_perm(text: str) -> int:
    perm = 0
    for ch in text:
        bit = _ACL_PERM_BITS.get(ch)
        if bit is None:
            raise _AclUnusable(f"bad permissions {text[:20]!r}")
        perm |= bit
    return perm


def split_acl_text(text: str) -> tuple[list[str], list[str]]:
    """Entries of an ACL text, as (access, default): ``default:``/``d:`` prefixes (or Solaris'
    ``defaultuser:``) mark default entries; ``#`` starts a comment; entries end at ``,`` or a newline."""
    access: list[str] = []
    default: list[str] = []
    for raw in re.split(r"[,\n]", text):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        for prefix in ("default:", "d:", "default"):
            if item.startswith(prefix) and item[len(prefix):].split(":", 1)[0] in _ACL_TAGS:
                default.append(item[len(prefix):])
                break
        else:
            access.append(item)
    return access, default


def acl_entries(items: list[str]) -> list[tuple[int, int, int]]:
    """``(tag, perm, id)`` entries in the kernel's order; named entries keep only their numeric id: star
    and bsdtar append it as a fourth field (``user:lisa:rwx:1001``), a bare number is one too. A name
    without a number is refused, not looked up on the host (the image's users are not the host's)."""
    entries: list[tuple[int, int, int]] = []
    for item in items:
        fields = item.split(":")
        tags = _ACL_TAGS.get(fields[0])
        if tags is None or len(fields) not in (2, 3, 4):
            raise _AclUnusable(f"malformed entry {item[:40]!r}")
        if len(fields) == 2:  # Solaris: "mask:rwx", "other:r--"
            if tags[1] is not None:
                raise _AclUnusable(f"malformed entry {item[:40]!r}")
            qualifier, perm = "", fields[1]
        else:
            qualifier, perm = fields[1], fields[2]
        if not qualifier:
            entries.append((tags[0], _acl_perm(perm), _ACL_UNDEFINED_ID))
            continue
        if tags[1] is None:
            raise _AclUnusable(f"malformed entry {item[:40]!r}")
        number = fields[3] if len(fields) == 4 else qualifier
        if not (number.isascii() and number.isdigit()) or int(number) >= _ACL_UNDEFINED_ID:
            raise _AclUnusable(f"{fields[0]} {qualifier!r} has no numeric id")
        entries.append((tags[1], _acl_perm(perm), int(number)))
    entries.sort()
    counts = {tag: sum(1 for t, _, _ in entries if t == tag) for tag in (_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_OTHER, _ACL_MASK)}
    named = [(t, i) for t, _, i in entries if t in (_ACL_USER, _ACL_GROUP)]
    # What the kernel's posix_acl_valid() accepts.
    if (counts[_ACL_USER_OBJ] != 1 or counts[_ACL_GROUP_OBJ] != 1 or counts[_ACL_OTHER] != 1 or counts[_ACL_MASK] > 1
            or (named and not counts[_ACL_MASK]) or len(set(named)) != len(named)):
        raise _AclUnusable("not a valid ACL")
    return entries


def acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def acl_mode(entries: list[tuple[int, int, int]]) -> tuple[int, bool]:
    """The permission bits an access ACL gives the file, and whether it says more than they do (the
    kernel's posix_acl_equiv_mode(): with no named entry and no mask, it keeps no xattr)."""
    perms = {tag: perm for tag, perm, _ in entries}
    group = perms.get(_ACL_MASK, perms[_ACL_GROUP_OBJ])
    extended = any(tag in (_ACL_USER, _ACL_GROUP, _ACL_MASK) for tag, _, _ in entries)
    return (perms[_ACL_USER_OBJ] << 6) | (group << 3) | perms[_ACL_OTHER], extended


def _apply_acls(entry: Entry, access: list[str], default: list[str]) -> None:
    """An entry's ACLs as GNU tar ``--acls`` leaves them: the access ACL sets the permission bits (its
    mask the group bits) and becomes ``system.posix_acl_access`` only if it says more than the mode; a
    default ACL counts on directories only. An unusable ACL is left out with a note, as GNU tar warns."""
    for which, items in ((ACL_ACCESS, access), (ACL_DEFAULT, default)):
        if not items or (which == ACL_DEFAULT and entry.type != DIR):
            continue
        try:
            entries = acl_entries(items)
        except _AclUnusable as exc:
            entry.notes = (entry.notes or []) + [f"{which} left out: {exc}"]
            continue
        if which == ACL_DEFAULT:
            entry.xattrs[ACL_DEFAULT] = acl_xattr(entries)
            continue
        perms, extended = acl_mode(entries)
        entry.mode = (entry.mode & ~0o777) | perms
        if extended:
            entry.xattrs[ACL_ACCESS] = acl_xattr(entries)
        else:
            entry.xattrs.pop(ACL_ACCESS, None)


def _solaris_acl(data: bytes) -> tuple[list[str], list[str]] | str:
    """A Solaris ``A`` header's body: octal digits (the ACL type and entry count), NUL, the ACL text in
    Solaris' form, NUL. POSIX-draft ACLs only (type 01000000, as libarchive); NFSv4 ones have no
    ``system.posix_acl_*`` form. Returns (access, default) entries, or why not."""
    digits, _, rest = data.partition(b"\0")
    if not digits or not _OCTAL.fullmatch(digits) or len(digits) > 8:
        return "malformed Solaris ACL header"
    if int(digits, 8) & ~0o777777 != 0o1000000:
        return f"Solaris ACL of type {int(digits, 8) & ~0o777777:o} (not a POSIX ACL) left out"
    return split_acl_text(rest.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))


def _read_special(stream: ByteStream, size: int, limit: int) -> bytes:
    if size > limit:
        raise LimitExceeded("max_header_bytes", size, limit)
    data = stream.read_exact(size)
    stream.skip(-size % BLOCK)
    return data


class TarReader:
    """Iterate entries; the caller reads each entry's data (or not) before asking for the next."""

    def __init__(self, stream: ByteStream, limits: "Limits | None" = None) -> None:
        self.stream = stream
        self.max_header_bytes = limits.max_header_bytes if limits else MAX_HEADER_BYTES
        self.max_sparse_regions = limits.max_sparse_regions if limits else MAX_SPARSE_REGIONS
        self.max_global_records = limits.max_global_records if limits else MAX_GLOBAL_RECORDS
        self._global: dict[str, list[bytes]] = {}
        # The current member's data: ``(skip, take)`` steps over the bytes stored for it (one step but
        # for sparse members), and how many of those bytes (padding included) are still unread.
        self._steps: list[tuple[int, int]] = []
        self._step = 0
        self._member_left = 0

    def __iter__(self) -> Iterator[Entry]:
        while True:
            entry = self.next()
            if entry is None:
                return
            yield entry

    def data(self, entry: Entry) -> Iterator[memoryview]:
        """The data of the current entry, in pieces (for sparse files: the pieces of ``entry.sparse``
        back to back). Read once, whole or not at all: what is left is skipped by the next ``next()``."""
        steps, stream = self._steps, self.stream
        while self._step < len(steps):
            skip, take = steps[self._step]
            self._step += 1
            if skip:
                stream.skip(skip)
                self._member_left -= skip
            while take > 0:
                piece = stream.read_up_to(take)
                if not piece:
                    raise TarFormatError(f"tar stream truncated inside {entry.name!r}")
                take -= len(piece)
                self._member_left -= len(piece)
                yield piece

    def small_data(self, entry: Entry) -> list[memoryview]:
        """``list(self.data(entry))`` with its padding skipped: one slice, no generator, where the member
        lies whole in the stream's current chunk (most small files)."""
        stream, size = self.stream, entry.size
        if self._step == 0 and len(self._steps) == 1 and self._steps[0][0] == 0:
            pos, left = stream._pos, self._member_left
            if pos + left <= len(stream._buf):
                self._step, self._member_left = 1, 0
                stream._pos = pos + left
                stream.offset += left
                return [stream._buf[pos:pos + size]]
        pieces = list(self.data(entry))
        self._skip_data()
        return pieces

    def next(self) -> Entry | None:
        while True:
            entry = self._next()
            if entry is None or entry.type != _GNU_VOLHDR:
                return entry
            self._skip_data()  # a volume label carries nothing for the filesystem

    def _next(self) -> Entry | None:
        stream = self.stream
        if self._member_left:
            self._skip_data()
        pax: dict[str, list[bytes]] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        solaris_acl: tuple[list[str], list[str]] | str | None = None
        special = 0  # bytes of PAX / long-name headers in front of this entry
        while True:
            header = stream.read_block()
            if header is None:
                return None  # a clean end without the two zero blocks, as Go's reader accepts
            if header == _ZERO_BLOCK:
                return None  # end of archive; the caller drains the rest for verification
            (f_name, f_mode, f_uid, f_gid, f_size, f_mtime, f_chksum, typeflag, f_linkname, magic, f_major, f_minor,
             f_prefix) = _HEADER.unpack(header)
            if not _checksum_ok(header, f_chksum):
                raise TarFormatError(f"bad tar header checksum at byte {stream.offset - BLOCK}")
            size = _parse_number(f_size)
            if size < 0:
                raise TarFormatError("negative size in tar header")
            if typeflag == _SOLARIS_PAX:
                typeflag = _PAX
            if typeflag in (_PAX, _GNU_LONGNAME, _GNU_LONGLINK, _SOLARIS_ACL):
                special += size
                if special > self.max_header_bytes:
                    raise LimitExceeded("max_header_bytes", special, self.max_header_bytes)
            if typeflag in (_PAX, _PAX_GLOBAL):
                if typeflag == _PAX_GLOBAL:  # like GNU tar: a global header replaces the previous one's records
                    self._global = target = {}
                else:
                    target = pax
                _parse_pax(_read_special(stream, size, self.max_header_bytes), target)
                if len(self._global) > self.max_global_records:
                    raise LimitExceeded("max_global_records", len(self._global), self.max_global_records)
                continue
            if typeflag == _GNU_LONGNAME:
                longname = _cstr(_read_special(stream, size, self.max_header_bytes))
                continue
            if typeflag == _GNU_LONGLINK:
                longlink = _cstr(_read_special(stream, size, self.max_header_bytes))
                continue
            if typeflag == _SOLARIS_ACL:
                solaris_acl = _solaris_acl(_read_special(stream, size, self.max_header_bytes))
                continue
            break

        if typeflag == _GNU_MULTIVOL:
            raise TarFormatError(f"{_cstr(header[0:100])!r} is continued from another volume: GNU multi-volume "
                                 "archives are not supported (a layer must be one whole tar)")
        name = f_name.split(b"\0", 1)[0]
        if magic[:6] == b"ustar\0":  # POSIX ustar: the prefix field extends the name
            prefix = f_prefix.split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        # mode, uid, gid and mtime at once where all four are plain octal (_parse_number's common case,
        # without four calls); anything else (base-256, spaces in front, bad digits) goes through it.
        t_mode, t_uid, t_gid, t_mtime = f_mode.rstrip(_PAD), f_uid.rstrip(_PAD), f_gid.rstrip(_PAD), f_mtime.rstrip(_PAD)
        try:
            if not (t_mode + t_uid + t_gid + t_mtime).isdigit():
                raise ValueError
            mode, uid, gid, mtime = int(t_mode, 8), int(t_uid, 8), int(t_gid, 8), int(t_mtime, 8)
        except ValueError:  # (an empty field too: int() refuses it, _parse_number reads it as 0)
            mode, uid, gid, mtime = (_parse_number(f_mode), _parse_number(f_uid), _parse_number(f_gid),
                                     _parse_number(f_mtime))
        entry = Entry(name, typeflag if typeflag not in (b"\0", _CONT) else REG, mode & 0o7777, uid, gid, size,
                      mtime * 1_000_000_000, None, f_linkname.split(b"\0", 1)[0])
        if typeflag in (CHR, BLK):
            entry.devmajor = _parse_number(f_major)
            entry.devminor = _parse_number(f_minor)
        if typeflag == _GNU_DUMPDIR:
            entry.type = DIR
        if magic == b"ustar  \0" and typeflag != _GNU_SPARSE:
            atime = _parse_number(header[345:357])
            if atime:
                entry.atime_ns = atime * 1_000_000_000
        if typeflag in _PLAIN and not pax and not self._global and longname is None and longlink is None \
                and solaris_acl is None:
            # The common member (a file, directory or link with no extended header): what the general
            # path below makes of it, without its steps.
            kind = entry.type
            if kind == REG and name.endswith(b"/"):
                entry.type = kind = DIR  # old (BSD) tars mark directories by a trailing slash only
            if kind in _NO_DATA:  # no data whatever the size says (and no pax header: no linkdata)
                entry.size = 0
                self._steps, self._step, self._member_left = [], 0, 0
            else:
                self._steps, self._step, self._member_left = ([(0, size)] if size else []), 0, size + (-size % BLOCK)
            return entry
        if longname is not None:
            entry.name = longname
        if longlink is not None:
            entry.linkname = longlink
        sparse_v1 = False
        if typeflag == _GNU_SPARSE:
            entry.type = REG
            entry.sparse = self._gnu_old_sparse(header)
        merged = {**self._global, **pax} if self._global else pax
        acl_access: list[str] | None = None
        acl_default: list[str] | None = None
        if merged:
            sparse_v1 = self._apply_pax(entry, merged)
            if "SCHILY.acl.access" in merged:
                acl_access = split_acl_text(merged["SCHILY.acl.access"][-1].decode("utf-8", "surrogateescape"))[0]
            if "SCHILY.acl.default" in merged:
                acl_default = split_acl_text(merged["SCHILY.acl.default"][-1].decode("utf-8", "surrogateescape"))[0]
        if entry.type == REG and entry.sparse is None and not sparse_v1 and entry.name.endswith(b"/"):
            entry.type = DIR  # old (BSD) tars mark directories by a trailing slash only; GNU tar agrees
        if entry.type not in _KNOWN:  # GNU tar would extract these as regular files, with a warning
            raise TarFormatError(f"unsupported tar entry type {entry.type!r} for {entry.name!r}")
        if isinstance(solaris_acl, str):
            entry.notes = [solaris_acl]
        elif solaris_acl is not None:
            acl_access, acl_default = solaris_acl
        if (acl_access or acl_default) and entry.type not in (SYMLINK, LINK):  # (a link has its target's)
            _apply_acls(entry, acl_access or [], acl_default or [])
        if entry.type != REG:  # a sparse map means nothing on other types (and its 1.0 form is not there)
            entry.sparse, entry.realsize, sparse_v1 = None, None, False
        stored = entry.size  # what the archive holds for this member
        if entry.type in _NO_DATA:
            entry.size = 0
            if typeflag != _GNU_DUMPDIR and not (entry.type == LINK and stored and merged and self._link_data_follows()):
                stored = 0  # GNU tar, libarchive and tarfile read no data for these, whatever the size says
        self._steps, self._step = [(0, entry.size)] if entry.size else [], 0
        self._member_left = stored + (-stored % BLOCK)
        if sparse_v1:
            entry.sparse = self._pax_sparse_v1_map(entry)
            stored = entry.size
        if entry.sparse is not None:
            self._plan_sparse(entry, stored)
        return entry

    def _link_data_follows(self) -> bool:
        """Whether a pax hardlink's size is data that follows (``pax -o linkdata``: the pax standard allows
        it) rather than a size field GNU tar ignores: data, unless the next block is a header or the end."""
        block = self.stream.read_up_to(BLOCK).tobytes()
        while block and len(block) < BLOCK:
            more = self.stream.read_up_to(BLOCK - len(block))
            if not more:
                break
            block += more.tobytes()
        self.stream.unread(block)
        if len(block) < BLOCK or block == bytes(BLOCK):
            return False
        try:
            return not _checksum_ok(block)
        except TarFormatError:
            return True

    def _skip_data(self) -> None:
        self.stream.skip(self._member_left)
        self._member_left = 0
        self._step = len(self._steps)

    def finish_entry(self) -> None:
        """Skip what the caller did not read of the current entry, and its padding."""
        self._skip_data()

    def _plan_sparse(self, entry: Entry, stored: int) -> None:
        """GNU tar's extraction of a sparse member, replayed on its map: each region's data starts at a
        block boundary of the stored data (GNU tar reads a region in whole blocks) and is written at the
        region's offset, later regions over earlier ones; a zero-length region truncates the file at its
        offset (how GNU tar's writers end a file in a hole: the logical size is where the replay ends,
        whatever a realsize field says). What survives becomes ``entry.sparse`` (disjoint, in stream
        order), ``entry.size`` its total and ``entry.realsize`` the file's size; stored bytes the map does
        not use are skipped, as GNU tar skips them."""
        regions = entry.sparse or []
        starts: list[int] = []
        pos = size = 0
        ordered = True
        for off, length in regions:
            if off < 0 or length < 0:
                raise TarFormatError(f"{entry.name!r}: negative sparse map entry")
            starts.append(pos)
            pos += -(-length // BLOCK) * BLOCK
            ordered = ordered and off >= size
            size = off if length == 0 else max(size, off + length)
        if pos > stored + (-stored % BLOCK):
            raise TarFormatError(f"{entry.name!r}: the sparse map needs {pos} bytes of data, {stored} are stored")
        if ordered:  # every writer's case: regions in order, none over another
            live = [[(off, off + length)] if length else [] for off, length in regions]
        else:
            live = _live_pieces(regions)
        entry.sparse, steps = [], []
        at = 0
        for (off, _), start, pieces in zip(regions, starts, live):
            for lo, hi in pieces:
                where = start + lo - off
                steps.append((where - at, hi - lo))
                entry.sparse.append((lo, hi - lo))
                at = where + hi - lo
        entry.size = sum(length for _, length in entry.sparse)
        entry.realsize = size
        self._steps, self._step = steps, 0
        if len(entry.sparse) > self.max_sparse_regions:  # (a region overwritten in part leaves two)
            raise LimitExceeded("max_sparse_regions", len(entry.sparse), self.max_sparse_regions)

    def _gnu_old_sparse(self, header: bytes) -> list[tuple[int, int]]:
        """An ``S`` header's map, read as GNU tar reads it: old GNU keeps 4 regions in the header (an
        extension flag at 482), star 4 at 356 (flag at 355; in star's newer layout all of them in the
        extension blocks); each extension block holds 21 and its own flag at 504. A slot whose size
        field is empty ends the map, extension blocks included."""
        regions: list[tuple[int, int]] = []

        def take(block: bytes, start: int, count: int) -> bool:
            for i in range(count):
                off = start + 24 * i
                if block[off + 12] == 0:
                    return False
                regions.append((_parse_number(block[off:off + 12]), _parse_number(block[off + 12:off + 24])))
            return True

        if not _is_star(header):
            extended = take(header, 386, 4) and header[482]
        elif header[345] == 0 and header[356 + 10] != 0:
            extended = take(header, 356, 4) and header[355]
        else:
            extended = 1
        while extended:
            block = self.stream.read_exact(BLOCK)
            extended = take(block, 0, 21) and block[504]
            if len(regions) > self.max_sparse_regions:
                raise LimitExceeded("max_sparse_regions", len(regions), self.max_sparse_regions)
        return regions

    def _apply_pax(self, entry: Entry, pax: dict[str, list[bytes]]) -> bool:
        sparse_v1 = False
        for key, values in pax.items():
            value = values[-1]
            if key == "path":
                entry.name = value
            elif key == "linkpath":
                entry.linkname = value
            elif key == "size":
                entry.size = _pax_int(values, key)
            elif key == "uid":
                entry.uid = _pax_int(values, key, UNSET_ID)
            elif key == "gid":
                entry.gid = _pax_int(values, key, UNSET_ID)
            elif key == "mtime":
                entry.mtime_ns = _pax_time_ns(value)
            elif key == "atime":
                entry.atime_ns = _pax_time_ns(value)
            elif key.startswith("SCHILY.xattr."):
                entry.xattrs[_xattr_name(key[len("SCHILY.xattr."):])] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                from urllib.parse import unquote_to_bytes

                name = _xattr_name(unquote_to_bytes(key[len("LIBARCHIVE.xattr."):]).decode("utf-8", "surrogateescape"))
                try:
                    entry.xattrs.setdefault(name, base64.b64decode(value + b"=" * (-len(value) % 4)))
                except ValueError:
                    raise TarFormatError(f"bad base64 in {key}") from None
        if "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or "GNU.sparse.offset" in pax:
            major = pax.get("GNU.sparse.major", [b"0"])[-1]
            if "GNU.sparse.name" in pax:
                entry.name = pax["GNU.sparse.name"][-1]
            size_key = "GNU.sparse.realsize" if "GNU.sparse.realsize" in pax else "GNU.sparse.size"
            if size_key in pax:
                entry.realsize = _pax_int(pax[size_key], size_key)
            if major == b"1":
                sparse_v1 = True
            elif "GNU.sparse.map" in pax:  # 0.1
                nums = _ints(pax["GNU.sparse.map"][-1], "GNU.sparse.map")
                if len(nums) % 2:
                    raise TarFormatError("malformed GNU.sparse.map")
                if len(nums) > 2 * self.max_sparse_regions:
                    raise LimitExceeded("max_sparse_regions", len(nums) // 2, self.max_sparse_regions)
                entry.sparse = list(zip(nums[0::2], nums[1::2]))
            else:  # 0.0: repeated offset/numbytes records
                offs, lens = pax.get("GNU.sparse.offset", []), pax.get("GNU.sparse.numbytes", [])
                if len(offs) != len(lens):
                    raise TarFormatError("malformed GNU sparse 0.0 map")
                if len(offs) > self.max_sparse_regions:
                    raise LimitExceeded("max_sparse_regions", len(offs), self.max_sparse_regions)
                entry.sparse = [(_ints(o, "GNU sparse offset")[0], _ints(n, "GNU sparse numbytes")[0])
                                for o, n in zip(offs, lens) if o.strip() and n.strip()]
        return sparse_v1

    def _pax_sparse_v1_map(self, entry: Entry) -> list[tuple[int, int]]:
        """PAX sparse 1.0: the map is decimal lines at the start of the data, padded to a block."""
        consumed = 0
        buf = b""

        def next_number() -> int:
            nonlocal buf, consumed
            while b"\n" not in buf:
                if consumed >= entry.size or len(buf) > 64:
                    raise TarFormatError(f"malformed sparse map in {entry.name!r}")
                block = self.stream.read_exact(BLOCK)
                consumed += BLOCK
                buf += block
            line, _, buf = buf.partition(b"\n")
            try:
                return int(line)
            except ValueError:
                raise TarFormatError(f"malformed sparse map in {entry.name!r}") from None

        count = next_number()
        if count < 0:
            raise TarFormatError(f"malformed sparse map in {entry.name!r}")
        if count > self.max_sparse_regions:
            raise LimitExceeded("max_sparse_regions", count, self.max_sparse_regions)
        regions = [(next_number(), next_number()) for _ in range(count)]
        entry.size -= consumed
        self._member_left -= consumed
        return regions


def _live_pieces(regions: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """For a sparse map out of order or overlapping (no writer makes one, GNU tar replays it): per region,
    the ``[lo, hi)`` parts of it that no later region overwrites and no later truncation cuts off. Walked
    backwards, with the union of later regions kept as sorted disjoint intervals."""
    covered: list[tuple[int, int]] = []
    cut = 1 << 63
    out: list[list[tuple[int, int]]] = [[] for _ in regions]
    for i in range(len(regions) - 1, -1, -1):
        off, length = regions[i]
        if not length:
            cut = min(cut, off)
            continue
        lo, hi = off, min(off + length, cut)
        k = max(bisect.bisect_right(covered, (lo, lo)) - 1, 0)
        while k < len(covered) and lo < hi and covered[k][0] < hi:
            a, b = covered[k]
            k += 1
            if b <= lo:
                continue
            if a > lo:
                out[i].append((lo, a))
            lo = b
        if lo < hi:
            out[i].append((lo, hi))
        # the region joins the union (merged with what it touches)
        a, b = off, off + length
        j = bisect.bisect_left(covered, (a, a))
        if j and covered[j - 1][1] >= a:
            j -= 1
        k = j
        while k < len(covered) and covered[k][0] <= b:
            a, b = min(a, covered[k][0]), max(b, covered[k][1])
            k += 1
        covered[j:k] = [(a, b)]
    return out


Token = Entry | memoryview
INLINE_BYTES = 64 << 10  # smaller files travel inside their Entry, not as separate tokens


def tokens(chunks: Iterator[bytes], limits: "Limits | None" = None) -> Iterator[Token]:
    """Flatten a tar stream to ``Entry, data, data, Entry, ...`` (run on the decompression thread, so
    header parsing overlaps with the filesystem work of the applier)."""
    reader = TarReader(ByteStream(chunks), limits)
    for entry in reader:
        entry.parts = clean_path(entry.name)
        if entry.size <= INLINE_BYTES:
            entry.inline = reader.small_data(entry) if entry.size else []
            yield entry
        else:
            yield entry
            yield from reader.data(entry)
            reader.finish_entry()


class EntryStream:
    """The applier's side of ``tokens``: iterate entries; ``data(entry)`` yields the current one's bytes."""

    def __init__(self, items: Iterator[Token]) -> None:
        self._items = items
        self._left = 0

    def __iter__(self) -> Iterator[Entry]:
        for item in self._items:  # data the applier did not read is skipped here
            if isinstance(item, Entry):
                self._left = 0 if item.inline is not None else item.size
                yield item

    def data(self, entry: Entry) -> Iterator[memoryview]:
        if entry.inline is not None:
            yield from entry.inline
            return
        while self._left > 0:
            piece = next(self._items)
            if isinstance(piece, Entry):
                raise TarFormatError(f"tar stream out of step inside {entry.name!r}")
            self._left -= len(piece)
            yield piece
