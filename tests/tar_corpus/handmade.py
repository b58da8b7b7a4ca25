"""Hand-made archives in the dialects of writers we cannot run here (Solaris tar, star, old GNU tar,
AIX/old Solaris hardlink headers, ``pax -o linkdata``), byte for byte as those writers lay them out.
See README.md for where each layout comes from. Each value is a whole archive (end blocks included)."""

from __future__ import annotations

import struct


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """GNU's binary numbers: the high bit of the first byte set, two's complement big-endian after it."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([raw[0] | 0x80]) + raw[1:]


def header(name: bytes, type_: bytes = b"0", *, size: int | bytes = 0, mode: int = 0o644,
           uid: int | bytes = 0, gid: int | bytes = 0, mtime: int | bytes = 1_500_000_000, linkname: bytes = b"",
           magic: bytes = b"ustar\x0000", prefix: bytes = b"", tail: bytes = b"", signed: bool = False,
           fields: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte header; ``int`` numbers are written in octal, ``bytes`` as given (e.g. ``base256``);
    ``fields``: raw bytes at offsets (GNU sparse maps)."""
    def num(v: int | bytes, width: int) -> bytes:
        return v if isinstance(v, bytes) else octal(v, width)

    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = octal(mode, 8)
    h[108:116] = num(uid, 8)
    h[116:124] = num(gid, 8)
    h[124:136] = num(size, 12)
    h[136:148] = num(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = type_
    h[157:157 + len(linkname)] = linkname
    h[257:265] = magic
    h[345:345 + len(prefix)] = prefix
    h[512 - len(tail):] = tail
    for off, raw in (fields or {}).items():
        h[off:off + len(raw)] = raw
    total = sum(struct.unpack("512b", h)) if signed else sum(h)
    h[148:156] = b"%06o\0 " % (total % (1 << 18))
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", type_: bytes = b"0", **kwargs) -> bytes:
    kwargs.setdefault("size", len(data))
    return header(name, type_, **kwargs) + pad(data)


def pax(records: list[tuple[str, bytes | str]], type_: bytes = b"x", name: bytes = b"././@PaxHeader") -> bytes:
    body = b""
    for key, value in records:
        value = value.encode() if isinstance(value, str) else value
        rec = b" " + key.encode() + b"=" + value + b"\n"
        n = len(rec) + 1
        while len(b"%d" % n) + len(rec) != n:
            n += 1
        body += b"%d" % n + rec
    return member(name, body, type_)


END = bytes(1024)
GNU_MAGIC = b"ustar  \0"
V7_MAGIC = bytes(8)


# -- sizes on entries that carry no data --------------------------------------------------------------------------

def _nodata_sizes() -> bytes:
    """Old Solaris and AIX tars store the linked file's size in a hardlink header, some writers a size on
    directories, symlinks and devices: GNU tar, libarchive and tarfile read no data for any of them. After
    each one a directory and a file, which a reader that takes the size as data swallows."""
    out = member(b"target", b"the link target")
    for magic, tag in ((b"ustar\x0000", b"ustar"), (GNU_MAGIC, b"gnu"), (V7_MAGIC, b"v7")):
        for type_, extra in ((b"5", {}), (b"1", {"linkname": b"target"}), (b"2", {"linkname": b"target"}),
                             (b"3", {}), (b"4", {}), (b"6", {})):
            if magic == V7_MAGIC and type_ in b"346":
                continue  # v7 has no devices or FIFOs
            name = tag + b"-type" + type_ + (b"/" if type_ == b"5" else b"")
            out += header(name, type_, size=1536, magic=magic, **extra)
            out += member(tag + b"-after-" + type_ + b"/", type_=b"5", magic=magic)
            out += member(tag + b"-after-" + type_ + b"/file", b"still here", magic=magic)
    out += header(b"bsd-dir-by-slash/", b"0", size=700)  # a directory marked by its slash only
    out += member(b"after-bsd-dir", b"still here")
    return out + END


def _pax_size_on_nodata() -> bytes:
    """A pax ``size`` record on a symlink, a directory and a hardlink that has no data after it: GNU tar
    reads none (a pax hardlink's data is read only when no header follows: see ``pax_linkdata``)."""
    return (member(b"target", b"T")
            + pax([("size", "4096")]) + header(b"sym", b"2", linkname=b"target")
            + pax([("size", "4096")]) + header(b"dir/", b"5")
            + pax([("size", "4096"), ("mtime", "1600000000")]) + header(b"hard", b"1", linkname=b"target")
            + member(b"after/", type_=b"5") + member(b"after/file", b"still here") + END)


def pax_linkdata() -> bytes:
    """``pax -o linkdata`` (POSIX: "data blocks for files of typeflag 1 might be included"): the link
    carries the file's data again. GNU tar does not read it (it stops with "Skipping to next header");
    bsdtar and dirge do."""
    data = b"shared content\n" * 40
    return (member(b"target", data) + pax([("comment", "pax -o linkdata")])
            + header(b"hard", b"1", size=len(data), linkname=b"target") + pad(data)
            + member(b"after/", type_=b"5") + member(b"after/file", b"still here") + END)


# -- ACLs -------------------------------------------------------------------------------------------------------------

# Ids in none of the host's or the image's databases, so GNU tar writes and reads them as numbers.
U, G = 4242, 4343


def _star_acls_numeric() -> bytes:
    """star's ``SCHILY.acl.access``/``.default`` (comma-separated, star's form) and GNU tar's own
    (newline-separated), named entries by number: GNU tar ``--acls`` sets these."""
    return (pax([("SCHILY.acl.access", f"user::rw-,user:{U}:rwx,group::r--,group:{G}:r-x,mask::rwx,other::---")])
            + member(b"file", b"x", mode=0o640)
            + pax([("SCHILY.acl.access", "user::rw-,group::r--,other::---")]) + member(b"minimal", b"x", mode=0o777)
            + pax([("SCHILY.acl.access", f"user::rwx\nuser:{U}:rwx\ngroup::r-x\nmask::r--\nother::r-x\n"),
                   ("SCHILY.acl.default", f"user::rwx\nuser:{U}:r-x\ngroup::r--\nmask::r-x\nother::---\n")])
            + member(b"dir/", type_=b"5", mode=0o755)
            + pax([("SCHILY.acl.default", f"user::rwx,group::r-x,group:{G}:rwx,mask::rwx,other::r-x")])
            + member(b"dir/default-only/", type_=b"5", mode=0o750)
            + pax([("SCHILY.acl.access", f"user::r--,user:{U}:rwx,group::r-x,mask::r--,other::r-x")])
            + member(b"setuid", b"x", mode=0o4777)
            + END)


def star_acls_named() -> bytes:
    """star as it writes on a host that knows the names: ``user:lisa:rwx:1001``, the numeric id as a
    fourth field (bsdtar writes the same). GNU tar looks the names up on the extracting host; the ids
    are what the archive says, and what bsdtar and dirge use."""
    return (pax([("SCHILY.acl.access",
                  f"user::rw-,user:lisa:rwx:{U},group::r--,group:wheel:r-x:{G},mask::rwx,other::---")])
            + member(b"file", b"x", mode=0o640)
            + pax([("SCHILY.acl.access", f"user::rwx,user:lisa:rwx:{U},group::r-x,mask::r--,other::r-x"),
                   ("SCHILY.acl.default", f"user::rwx,user:lisa:r-x:{U},group::r--,mask::r-x,other::---")])
            + member(b"dir/", type_=b"5", mode=0o755)
            + END)


def _solaris_acl(name: bytes, text: bytes) -> bytes:
    """Solaris tar's ancillary ``A`` header before a member: the body is the ACL type ('1': POSIX draft)
    and entry count in octal, NUL, acltotext() with ids appended, NUL."""
    body = b"1" + b"%06o\0" % (text.count(b",") + 1) + text + b"\0"
    return member(name, body, type_=b"A", mode=0o640)


def solaris_acls() -> bytes:
    """Solaris tar ``-p``: ``A`` headers (Solaris' text: ``mask:rwx``, ``other:r--``, default entries as
    ``defaultuser::`` or ``default:user::``), one after an ``X`` header. GNU tar does not know ``A``
    (it extracts it as a file, then replaces it); bsdtar sets the ACLs, as dirge does."""
    u, g = str(U).encode(), str(G).encode()
    return (_solaris_acl(b"file", b"user::rw-,user:lisa:rwx:" + u + b",group::r--,group:staff:r-x:" + g
                         + b",mask:rwx,other:---")
            + member(b"file", b"x", mode=0o640)
            + _solaris_acl(b"dir", b"user::rwx,user:" + u + b":rwx,group::r-x,mask:r--,other:r-x,defaultuser::rwx,"
                           b"defaultuser:lisa:r-x:" + u + b",defaultgroup::r--,defaultmask:r-x,defaultother:---")
            + member(b"dir/", type_=b"5", mode=0o755)
            + pax([("path", "dir/" + "long" * 30)], b"X")
            + _solaris_acl(b"dir/long", b"user::rwx,user:" + u + b":r-x,group::r-x,mask:r-x,other:r-x")
            + member(b"dir/long", b"x", mode=0o755)
            + END)


# -- GNU sparse members as GNU tar reads them -------------------------------------------------------------------------

def _sparse_01(name: str, realsize: int, regions: list[int], data: bytes) -> bytes:
    return (pax([("GNU.sparse.major", "0"), ("GNU.sparse.minor", "1"), ("GNU.sparse.name", name),
                 ("GNU.sparse.size", str(realsize)), ("GNU.sparse.numblocks", str(len(regions) // 2)),
                 ("GNU.sparse.map", ",".join(map(str, regions)))])
            + member(b"GNUSparseFile.0/" + name.encode(), data))


def _sparse_00(name: str, realsize: int, regions: list[int], data: bytes) -> bytes:
    records: list[tuple[str, bytes | str]] = [("GNU.sparse.size", str(realsize)),
                                              ("GNU.sparse.numblocks", str(len(regions) // 2)), ("path", name)]
    for off, length in zip(regions[0::2], regions[1::2]):
        records += [("GNU.sparse.offset", str(off)), ("GNU.sparse.numbytes", str(length))]
    return pax(records) + member(b"GNUSparseFile.0/" + name.encode(), data)


def _sparse_10(name: str, realsize: int, regions: list[int], data: bytes) -> bytes:
    sparse_map = pad(("%d\n" % (len(regions) // 2) + "".join("%d\n" % n for n in regions)).encode())
    return (pax([("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"), ("GNU.sparse.name", name),
                 ("GNU.sparse.realsize", str(realsize))])
            + member(b"GNUSparseFile.0/" + name.encode(), sparse_map + data))


def _sparse_slots(pairs: list[tuple[int, int]]) -> bytes:
    return b"".join(octal(off, 12) + octal(length, 12) for off, length in pairs)


def _sparse_extensions(rest: list[tuple[int, int]], *, at_least_one: bool = False) -> bytes:
    """The extension blocks of an ``S`` header (old GNU and star alike): 21 regions each, a flag at
    504 when another follows; ``at_least_one``: one block even for no region (star's newer layout)."""
    out = b""
    while rest or at_least_one:
        at_least_one = False
        chunk, rest = rest[:21], rest[21:]
        block = bytearray(512)
        block[0:24 * len(chunk)] = _sparse_slots(chunk)
        block[504] = 1 if rest else 0
        out += bytes(block)
    return out


def _sparse_old(name: str, realsize: int, regions: list[int], data: bytes) -> bytes:
    """Old GNU 'S': four regions in the header, 21 in each extension block after it."""
    pairs = list(zip(regions[0::2], regions[1::2]))
    rest = pairs[4:]
    fields = {386: _sparse_slots(pairs[:4]), 482: b"\1" if rest else b"\0", 483: octal(realsize, 12)}
    out = header(name.encode(), b"S", size=len(data), magic=GNU_MAGIC, fields=fields)
    return out + _sparse_extensions(rest) + pad(data)


def _star_times() -> dict[int, bytes]:
    """star's header tail (GNU tar's ``struct star_header``): atime and ctime ended by a space, "tar\\0"."""
    return {476: b"%011o " % 1_400_000_000, 488: b"%011o " % 1_400_000_001, 508: b"tar\0"}


def _sparse_star(name: str, realsize: int, regions: list[int], data: bytes, *, in_header: bool = True) -> bytes:
    """star's ``S`` (GNU tar's ``struct star_in_header``): ustar magic, four regions at 356 with the
    extension flag at 355 and the realsize at 452; in star's newer layout (``in_header=False``) every
    region is in the extension blocks (21 each, flag at 504)."""
    pairs = list(zip(regions[0::2], regions[1::2]))
    head, rest = (pairs[:4], pairs[4:]) if in_header else ([], pairs)
    fields = {356: _sparse_slots(head), 355: b"\1" if rest else b"\0", 452: octal(realsize, 12), **_star_times()}
    out = header(name.encode(), b"S", size=len(data), fields=fields)
    return out + _sparse_extensions(rest, at_least_one=not in_header) + pad(data)


def _sparse_star_new(name: str, realsize: int, regions: list[int], data: bytes) -> bytes:
    return _sparse_star(name, realsize, regions, data, in_header=False)


SPARSE_WRITERS = {"0.0": _sparse_00, "0.1": _sparse_01, "1.0": _sparse_10, "old": _sparse_old, "star": _sparse_star,
                  "star-new": _sparse_star_new}


def _sparse_cases(write, name: str) -> bytes:
    """Maps GNU tar extracts though no GNU tar writes them. GNU tar replays a map: each region's data
    starts on a block of its own, is written at its offset (later regions over earlier ones), and a
    zero-length region truncates the file there; the size is where that ends, whatever the realsize
    field says; stored data past the map is skipped."""
    a, b, c = b"a" * 100, b"b" * 10, b"c" * 700
    return (write("realsize-larger", 10_000, [0, 100, 5000, 0], a)
            + write("no-end-marker", 10_000, [0, 100], a)
            # (GNU tar skips the rest, except after star's newer layout, where it loses its place)
            + (write("more-stored-than-mapped", 5000, [0, 100, 5000, 0], a + b"x" * 900) if name != "star-new" else b"")
            + write("truncated-in-the-middle", 5000, [0, 100, 50, 0, 1000, 10], pad(a) + b)
            + write("out-of-order", 5000, [1000, 10, 0, 100], pad(b) + a)
            + write("overlapping", 5000, [0, 700, 100, 100, 650, 0, 2000, 10], pad(c) + pad(a) + b)
            + write("many-regions", 40 * 4096, [n for i in range(40) for n in (i * 4096, 512)],
                    bytes(range(256)) * 80)
            + END)


def _sparse_realsize_smaller() -> bytes:
    """pax 0.1 and 1.0 with a realsize below the map's end: GNU tar writes the map (old GNU 'S' it refuses)."""
    return (_sparse_01("short-realsize-0.1", 50, [0, 100], b"a" * 100)
            + _sparse_10("short-realsize-1.0", 50, [0, 100], b"a" * 100) + END)


# Compared with GNU tar (tests/test_tar_dialects.py: every sink).
GNU_REFERENCE: dict[str, bytes] = {
    "nodata-sizes": _nodata_sizes(),
    "pax-size-on-nodata": _pax_size_on_nodata(),
    "star-acls-numeric": _star_acls_numeric(),
    **{f"gnu-sparse-{v}-replay": _sparse_cases(w, v) for v, w in SPARSE_WRITERS.items()},
    "gnu-sparse-realsize-smaller": _sparse_realsize_smaller(),
}
# Compared with bsdtar, which reads these as their writers meant (GNU tar does not).
BSDTAR_REFERENCE: dict[str, bytes] = {
    "star-acls-named": star_acls_named(),
    "solaris-acls": solaris_acls(),
}
