"""A streaming tar reader: what GNU tar reads, with GNU tar's result (tests/test_tar_dialects.py): v7,
ustar, star, PAX (xattrs, sparse 0.0/0.1/1.0, global and Solaris ``X`` headers), GNU (long names, sparse,
dump directories, volume labels), base-256 numbers, signed checksums. GNU multi-volume members and
unknown entry types are refused (GNU tar extracts the latter as regular files, with a warning).

Written here rather than taken from ``tarfile`` so that every header is bounded (a hostile PAX or
long-name header cannot make us buffer gigabytes), names stay raw bytes, and file data can be copied
from the decompressed stream straight into a file descriptor.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import ImageError
from .root import clean_path

BLOCK = 512
# Go's archive/tar uses the same bound for PAX and GNU long-name headers.
MAX_SPECIAL_SIZE = 1 << 20
MAX_SPARSE_ENTRIES = 1 << 16
# Global records are merged into every later entry: keep them few, or each entry costs them all.
MAX_GLOBAL_RECORDS = 64

REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
_CONT = b"7"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK, _GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
_GNU_DUMPDIR, _GNU_VOLHDR, _GNU_MULTIVOL = b"D", b"V", b"M"
_SOLARIS_PAX = b"X"  # Solaris tar's extended header: read like ``x``, as GNU tar does
_KNOWN = (REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO, _GNU_VOLHDR)


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

    def __len__(self) -> int:  # what an entry weighs in the producer's batches
        return BLOCK + (self.size if self.inline is not None else 0)

    @property
    def file_size(self) -> int:
        return self.realsize if self.realsize is not None else self.size


class TarFormatError(ImageError):
    pass


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

    def skip(self, n: int) -> None:
        while n > 0:
            piece = self.read_up_to(n)
            if not piece:
                raise TarFormatError(f"tar stream truncated at byte {self.offset}")
            n -= len(piece)


_OCTAL = re.compile(rb"[0-7]*")


def _parse_number(field_: bytes) -> int:
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


def _cstr(field_: bytes) -> bytes:
    return field_.split(b"\0", 1)[0]


def _checksum_ok(header: bytes) -> bool:
    stored = _parse_number(header[148:156])
    field_sum = sum(header[148:156])
    unsigned = sum(header) - field_sum + 8 * 32  # the checksum field counts as spaces
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


_MAX_ID = (1 << 32) - 1  # uid_t; 4294967295 (tar's -1) is read, and mapped by the merge engine (layer.py)
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


def _read_special(stream: ByteStream, size: int, kind: str) -> bytes:
    if size > MAX_SPECIAL_SIZE:
        raise TarFormatError(f"{kind} header of {size} bytes exceeds the {MAX_SPECIAL_SIZE} byte bound")
    data = stream.read_exact(size)
    stream.skip(-size % BLOCK)
    return data


class TarReader:
    """Iterate entries; the caller reads each entry's data (or not) before asking for the next."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self._global: dict[str, list[bytes]] = {}
        self._data_left = 0  # unread data bytes of the current entry
        self._padding = 0

    def __iter__(self) -> Iterator[Entry]:
        while True:
            entry = self.next()
            if entry is None:
                return
            yield entry

    def data(self, entry: Entry) -> Iterator[memoryview]:
        """The stored bytes of the current entry, in pieces (for sparse files: the data regions back to back)."""
        left = self._data_left
        while left > 0:
            piece = self.stream.read_up_to(left)
            if not piece:
                raise TarFormatError(f"tar stream truncated inside {entry.name!r}")
            left -= len(piece)
            self._data_left = left
            yield piece

    def next(self) -> Entry | None:
        while True:
            entry = self._next()
            if entry is None or entry.type != _GNU_VOLHDR:
                return entry
            self._skip_data()  # a volume label carries nothing for the filesystem

    def _next(self) -> Entry | None:
        stream = self.stream
        if self._data_left or self._padding:
            self._skip_data()
        pax: dict[str, list[bytes]] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        special = 0  # bytes of PAX / long-name headers in front of this entry
        while True:
            first = stream.read_up_to(BLOCK)
            if not first:
                return None  # a clean end without the two zero blocks, as Go's reader accepts
            header = first.tobytes()
            if len(header) < BLOCK:
                header += stream.read_exact(BLOCK - len(header))
            if header == b"\0" * BLOCK:
                return None  # end of archive; the caller drains the rest for verification
            if not _checksum_ok(header):
                raise TarFormatError(f"bad tar header checksum at byte {stream.offset - BLOCK}")
            typeflag = header[156:157]
            size = _parse_number(header[124:136])
            if size < 0:
                raise TarFormatError("negative size in tar header")
            if typeflag == _SOLARIS_PAX:
                typeflag = _PAX
            if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK) and size <= MAX_SPECIAL_SIZE:
                special += size
                if special > 4 * MAX_SPECIAL_SIZE:
                    raise TarFormatError(f"more than {4 * MAX_SPECIAL_SIZE} bytes of extended headers for one entry")
            if typeflag in (_PAX, _PAX_GLOBAL):
                if typeflag == _PAX_GLOBAL:  # like GNU tar: a global header replaces the previous one's records
                    self._global = target = {}
                else:
                    target = pax
                _parse_pax(_read_special(stream, size, "PAX"), target)
                if len(self._global) > MAX_GLOBAL_RECORDS:
                    raise TarFormatError(f"more than {MAX_GLOBAL_RECORDS} global PAX records")
                continue
            if typeflag == _GNU_LONGNAME:
                longname = _cstr(_read_special(stream, size, "GNU long name"))
                continue
            if typeflag == _GNU_LONGLINK:
                longlink = _cstr(_read_special(stream, size, "GNU long link"))
                continue
            break

        if typeflag == _GNU_MULTIVOL:
            raise TarFormatError(f"{_cstr(header[0:100])!r} is continued from another volume: GNU multi-volume "
                                 "archives are not supported (a layer must be one whole tar)")
        magic = header[257:265]
        name = _cstr(header[0:100])
        if magic[:6] == b"ustar\0":  # POSIX ustar: the prefix field extends the name
            prefix = _cstr(header[345:500])
            if prefix:
                name = prefix + b"/" + name
        entry = Entry(
            name=name,
            type=typeflag if typeflag not in (b"\0", _CONT) else REG,
            mode=_parse_number(header[100:108]) & 0o7777,
            uid=_parse_number(header[108:116]),
            gid=_parse_number(header[116:124]),
            size=size,
            mtime_ns=_parse_number(header[136:148]) * 1_000_000_000,
            linkname=_cstr(header[157:257]),
        )
        if typeflag in (CHR, BLK):
            entry.devmajor = _parse_number(header[329:337])
            entry.devminor = _parse_number(header[337:345])
        if typeflag == _GNU_DUMPDIR:
            entry.type = DIR
        if magic == b"ustar  \0" and typeflag != _GNU_SPARSE:
            atime = _parse_number(header[345:357])
            if atime:
                entry.atime_ns = atime * 1_000_000_000
        if longname is not None:
            entry.name = longname
        if longlink is not None:
            entry.linkname = longlink
        sparse_v1 = False
        if typeflag == _GNU_SPARSE:
            entry.type = REG
            entry.sparse = self._gnu_old_sparse(header)
            entry.realsize = _parse_number(header[483:495])
        merged = {**self._global, **pax} if self._global else pax
        if merged:
            sparse_v1 = self._apply_pax(entry, merged)
        if entry.type == REG and entry.sparse is None and not sparse_v1 and entry.name.endswith(b"/"):
            entry.type = DIR  # old (BSD) tars mark directories by a trailing slash only; GNU tar agrees
        if entry.type not in _KNOWN:  # GNU tar would extract these as regular files, with a warning
            raise TarFormatError(f"unsupported tar entry type {entry.type!r} for {entry.name!r}")
        self._data_left = entry.size
        self._padding = -entry.size % BLOCK
        if sparse_v1:
            entry.sparse = self._pax_sparse_v1_map(entry)
        return entry

    def _skip_data(self) -> None:
        self.stream.skip(self._data_left + self._padding)
        self._data_left = self._padding = 0

    def finish_entry(self) -> None:
        """Skip what the caller did not read of the current entry, and its padding."""
        self._skip_data()

    def _gnu_old_sparse(self, header: bytes) -> list[tuple[int, int]]:
        regions: list[tuple[int, int]] = []

        def take(block: bytes, start: int, count: int) -> None:
            for i in range(count):
                off = start + 24 * i
                if block[off] == 0:
                    return
                regions.append((_parse_number(block[off:off + 12]), _parse_number(block[off + 12:off + 24])))

        take(header, 386, 4)
        extended = header[482]
        while extended:
            block = self.stream.read_exact(BLOCK)
            take(block, 0, 21)
            extended = block[504]
            if len(regions) > MAX_SPARSE_ENTRIES:
                raise TarFormatError("too many sparse regions")
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
                entry.uid = _pax_int(values, key, _MAX_ID)
            elif key == "gid":
                entry.gid = _pax_int(values, key, _MAX_ID)
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
                if len(nums) % 2 or len(nums) > 2 * MAX_SPARSE_ENTRIES:
                    raise TarFormatError("malformed GNU.sparse.map")
                entry.sparse = list(zip(nums[0::2], nums[1::2]))
            else:  # 0.0: repeated offset/numbytes records
                offs, lens = pax.get("GNU.sparse.offset", []), pax.get("GNU.sparse.numbytes", [])
                if len(offs) != len(lens) or len(offs) > MAX_SPARSE_ENTRIES:
                    raise TarFormatError("malformed GNU sparse 0.0 map")
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
        if count < 0 or count > MAX_SPARSE_ENTRIES:
            raise TarFormatError(f"sparse map of {entry.name!r} has {count} regions")
        regions = [(next_number(), next_number()) for _ in range(count)]
        entry.size -= consumed
        self._data_left = entry.size
        return regions


Token = Entry | memoryview
INLINE_BYTES = 64 << 10  # smaller files travel inside their Entry, not as separate tokens


def tokens(chunks: Iterator[bytes]) -> Iterator[Token]:
    """Flatten a tar stream to ``Entry, data, data, Entry, ...`` (run on the decompression thread, so
    header parsing overlaps with the filesystem work of the applier)."""
    reader = TarReader(ByteStream(chunks))
    for entry in reader:
        entry.parts = clean_path(entry.name)
        if entry.size <= INLINE_BYTES:
            entry.inline = list(reader.data(entry))
            yield entry
        else:
            yield entry
            yield from reader.data(entry)
        reader.finish_entry()


def sparse_pieces(entry: Entry, data: Iterable[bytes | memoryview]) -> Iterator[tuple[int, memoryview]]:
    """A sparse member's stored data placed at its logical offsets: ``(offset, piece)``, each piece
    inside one data region of ``entry.sparse``. The data must fill the map exactly."""
    pieces = iter(data)
    piece = memoryview(b"")
    for off, length in entry.sparse or ():
        while length:
            if not piece:
                chunk = next(pieces, None)
                if chunk is None:
                    raise TarFormatError(f"{entry.name!r}: sparse data ends before its map does")
                piece = memoryview(chunk).cast("B")
                continue
            take = min(length, len(piece))
            yield off, piece[:take]
            piece, off, length = piece[take:], off + take, length - take
    if piece or any(len(rest) for rest in pieces):
        raise TarFormatError(f"{entry.name!r}: sparse data goes on past its map")


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
