"""An uncompressed erofs image written straight from the merge engine: a ``Sink`` (``apply/tree.py``).

Layout (4 KiB blocks; B = the data end after compaction)::

    block 0        superblock at byte 1024 (the rest zero)
    1 .. B-1       file data, whole blocks, appended in entry order as the layers stream by
    B .. M-1       data placed at finish: directory blocks, long symlinks
    M .. X-1       metadata (meta_blkaddr = M): extended inodes, each followed by its xattrs and its
                   inline tail (FLAT_INLINE) or chunk block map (CHUNK_BASED); root at nid 1
    X ..           shared xattrs (xattr_blkaddr = X)

File data is written once, sequentially, while the layer streams: the whole blocks go to the image,
the tail (``size % 4096``) to a spool temp file, to be packed after its inode at finish (erofs'
tail-packing). A tail that could not share one block with its inode and xattrs is padded to a block
in the data area instead (FLAT_PLAIN), decided in ``file()`` with every xattr counted inline (sharing
only shrinks an inode; tails over 4032 bytes never fit), so the data never moves for it.
Sparse entries become chunk-based files whose hole chunks map to ``EROFS_NULL_ADDR`` (chunk size
chosen per file to minimise data + map), or flat ones when holes would save nothing.

Dead data (a file a later layer removed or replaced) must not stay in the image: ``release`` punches
its blocks out at once (disk space), and ``finish`` keeps only what the final tree reaches, sliding
live data down over the dead extents, so the image holds no stale bytes and no gaps.

Per regular file the writer keeps ~17 bytes in arrays plus the int index it stores in
``node.data``; everything else is derived from the tree at finish.

An xattr erofs cannot name (``system.*`` other than the POSIX ACLs, ``lustre.*``, an empty suffix, a
value over 64 KiB) is skipped and recorded, as a filesystem refusing it is for the directory sink
(umoci's rule): ``skipped`` lists them, and ``report.skip`` is told if a report was given.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections.abc import Mapping
import tempfile
from array import array

from . import erofs_format as fmt
from ..apply import tree
from ..errors import SinkError
from ..apply.tree import FileData, Node, Parts
from ..fsutil import fd_path, raise_no_space
from .imagesink import Inodes, Skips, TreeImageSink, pwrite_all, punch, show, split_xattr_name, text

# The output's version: bump it whenever the same image would give different bytes (an artifact made by
# another version is not trusted as this image's erofs; oci/artifact.py's writer annotation).
WRITER_VERSION = "1"
BLKSZ = fmt.BLKSZ
_BITS = fmt.BLKSZBITS
_MASK = BLKSZ - 1
_INODE = fmt.INODE_EXTENDED.size
_SLOT = fmt.ISLOTSIZE
_FLUSH = 1 << 20  # buffered bytes before a write
_IOV = 512  # pieces gathered for one pwritev (Linux takes up to 1024)
_ZEROS = memoryview(bytes(BLKSZ))
_MOVE = 1 << 20  # compaction: bytes per read/write when the gap is small
_WINDOW = 4 << 20  # the metadata area is packed and written this many bytes at a time

_FTYPES = {tree.REG: fmt.FT_REG_FILE, tree.DIR: fmt.FT_DIR, tree.LNK: fmt.FT_SYMLINK, tree.CHR: fmt.FT_CHRDEV,
           tree.BLK: fmt.FT_BLKDEV, tree.FIFO: fmt.FT_FIFO, tree.SOCK: fmt.FT_SOCK}

XattrKey = tuple[int, bytes, bytes]  # (name index, name suffix, value)


class ErofsError(SinkError):
    """The tree holds something an erofs image cannot represent (or a caller broke the Sink contract)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"write erofs image: {what}")


def xattr_key(name: str, value: bytes) -> XattrKey | str:
    """The on-disk (index, suffix, value) of an xattr, or why erofs cannot store it."""
    split = split_xattr_name(name, "erofs")
    if isinstance(split, str):
        return split
    index, suffix = split
    if len(suffix) > fmt.XATTR_NAME_MAX:
        return "name too long for erofs"
    if len(value) > fmt.XATTR_VALUE_MAX:
        return f"value of {len(value)} bytes exceeds erofs' {fmt.XATTR_VALUE_MAX}"
    return (index, suffix, value)


def _inline_bound(xattrs: Mapping[str, bytes]) -> int:
    """The xattr ibody size with every xattr inline: an upper bound (a shared one takes 4 bytes)."""
    size = 0
    for name, value in xattrs.items():
        key = xattr_key(name, value)
        if not isinstance(key, str):
            size += fmt.xattr_entry_size(len(key[1]), len(value))
    return fmt.XATTR_IBODY_HEADER.size + size if size else 0


def _xattr_entry(key: XattrKey) -> bytes:
    index, suffix, value = key
    raw = fmt.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % fmt.XATTR_ALIGN)


def _chunk_plan(size: int, regions: list[tuple[int, int]]) -> int | None:
    """Chunk bits (chunk = 4 KiB << bits) minimising stored data + block map for a sparse file;
    None when a flat layout is no bigger (the holes would save nothing)."""
    spans = sorted((off, off + length) for off, length in regions if length)
    best: int | None = None
    best_cost = (size + _MASK) & ~_MASK
    for bits in range(fmt.CHUNK_FORMAT_BLKBITS_MASK + 1):
        csize = BLKSZ << bits
        nchunks = -(-size // csize)
        stored, last = 0, -1
        for a, b in spans:
            first, end = max(a // csize, last + 1), (b - 1) // csize
            if end >= first:
                stored += (end - first + 1) * csize
                if end == nchunks - 1:  # the last chunk is stored only up to the file's end
                    stored -= csize - (((size - end * csize) + _MASK) & ~_MASK)
                last = end
        cost = stored + fmt.BLOCK_MAP_ENTRY.size * nchunks
        if cost < best_cost:
            best, best_cost = bits, cost
        if csize >= size:
            break
    return best


def _dir_blocks(names: list[bytes]) -> list[int]:
    """Where each directory block starts in ``names`` (mkfs.erofs' rule: a block takes entries
    while their dirents and names fit)."""
    starts, used = [0], 0
    for i, name in enumerate(names):
        need = fmt.DIRENT.size + len(name)
        if used + need > BLKSZ:
            starts.append(i)
            used = 0
        used += need
    return starts


def _dir_size(names: list[bytes], starts: list[int]) -> int:
    last = names[starts[-1]:]
    return (len(starts) - 1) * BLKSZ + fmt.DIRENT.size * len(last) + sum(map(len, last))


class _Out:
    """Sequential buffered writes from ``pos`` on."""

    def __init__(self, fd: int, pos: int) -> None:
        self.fd, self.pos, self.buf = fd, pos, bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data
        if len(self.buf) >= _FLUSH:
            self.flush()

    def zeros(self, n: int) -> None:
        if n:
            self.write(bytes(n))

    def flush(self) -> None:
        pwrite_all(self.fd, self.buf, self.pos)
        self.pos += len(self.buf)
        self.buf.clear()


class ErofsSink(TreeImageSink):
    """Writes the merged image as an uncompressed erofs image at ``path`` (created or truncated).

    ``uuid`` (16 bytes) and ``build_time_ns`` go into the superblock; the build time also stands
    for inodes that never had one (``mtime_ns`` None). The same calls give the same bytes. After
    an exception only ``close()`` is meaningful (the caller discards ``path``)."""

    def __init__(self, path: str | os.PathLike[str], *, uuid: bytes, build_time_ns: int, volume_name: bytes = b"",
                 report: Skips | None = None) -> None:
        if len(uuid) != 16:
            raise ValueError("erofs uuid must be 16 bytes")
        if len(volume_name) > 16:
            raise ValueError("erofs volume name is at most 16 bytes")
        self.uuid, self.build_time_ns, self.volume_name = bytes(uuid), build_time_ns, bytes(volume_name)
        self.report = report
        self.skipped: list[str] = []  # "path: xattr NAME: why" for xattrs erofs cannot hold
        self._fd = -1
        self._spool_fd = -1
        self._map: mmap.mmap | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        # The tails' spool: anonymous, next to the image (same filesystem, gone on any exit).
        self._spool_fd = _anonymous_file(os.path.dirname(os.path.abspath(path)))
        # Per regular file (the index is node.data): first block, blocks in the data area, tail
        # offset in the spool (-1: none), released. Parallel arrays: a few bytes per file.
        self._start = array("I")
        self._nblk = array("I")
        self._tail = array("q")
        self._released = bytearray()
        self._chunks: dict[int, tuple[int, array[int]]] = {}  # sparse files: chunk bits, block per chunk (-1 hole)
        self._end = 1  # next free block of the data area (block 0: superblock)
        # Data for the image from byte self._wpos on: the pieces themselves (views of the decompressed
        # chunks, no copy), written together by one pwritev. They keep their chunks alive until then;
        # the flush every _FLUSH bytes bounds that to about two chunks.
        self._dbuf: list[memoryview | bytes] = []
        self._dlen = 0
        self._wpos = BLKSZ
        # Tails not yet in the spool: copied (a tail is small, and a view would keep a whole 1 MiB chunk
        # alive until the spool buffer fills).
        self._sbuf = bytearray()
        self._spooled = 0  # spool size, buffer included
        self._finished = False

    # -- the Sink protocol -------------------------------------------------------------------

    def release(self, node: Node) -> None:
        index = node.data
        if not isinstance(index, int) or self._released[index]:
            return
        self._released[index] = 1
        if self._dbuf:  # its blocks may still be buffered
            self._flush_data()
        # Free the disk blocks now (best effort: finish leaves dead data out of the image anyway).
        punch(self._fd, self._start[index] << _BITS, self._nblk[index] << _BITS)

    def file(self, parts: Parts, parent: Node, node: Node, data: FileData) -> None:
        if data.sparse is not None and node.size:
            self._sparse(node, data)
            return
        size = data.size
        if size != node.size:
            raise ErofsError(f"{show(parts)}: {size} bytes stored for a {node.size}-byte file")
        tail = size & _MASK
        # A tail that may not fit in its inode's block (with its xattrs, all counted inline: sharing
        # only shrinks them) goes to the data area, padded (FLAT_PLAIN), where it stays: the node's
        # xattrs are final when file() is called.
        if tail and _INODE + (_inline_bound(node.xattrs) if node.xattrs else 0) + tail > BLKSZ:
            tail = 0
        full = size - tail  # bytes for the data area
        dbuf, sbuf = self._dbuf, self._sbuf
        left, got = full, 0
        for piece in data.chunks:
            n = len(piece)
            got += n
            if left >= n:
                left -= n
                dbuf.append(piece)
                self._dlen += n
            elif left:
                dbuf.append(piece[:left])
                self._dlen += left
                sbuf += piece[left:]
                left = 0
            else:
                sbuf += piece
            if self._dlen >= _FLUSH or len(dbuf) >= _IOV:
                self._flush_data()
        if got != size:
            raise ErofsError(f"{show(parts)}: {got} bytes of data for a {size}-byte file")
        if full & _MASK:
            pad = BLKSZ - (full & _MASK)
            dbuf.append(_ZEROS[:pad])
            self._dlen += pad
        index = len(self._start)
        nblk = (full + _MASK) >> _BITS
        self._start.append(self._end)
        self._nblk.append(nblk)
        self._released.append(0)
        self._end += nblk
        if tail:
            self._tail.append(self._spooled)
            self._spooled += tail
            if len(sbuf) >= _FLUSH:
                self._flush_spool()
        else:
            self._tail.append(-1)
        node.data = index

    def _sparse(self, node: Node, data: FileData) -> None:
        """A sparse entry: chunk-based with hole chunks unmapped, or flat; the data is pwritten to its
        place (never-written bytes of the data area are holes of the image file, read as zeros)."""
        size, regions = node.size, data.sparse or []
        self._flush_data()
        bits = _chunk_plan(size, regions)
        base = self._end << _BITS
        index = len(self._start)
        if bits is None:  # flat: every block stored, the tail padded
            nblk = (size + _MASK) >> _BITS

            def where(off: int) -> int:
                return base + off
        else:
            cbits = _BITS + bits
            nchunks = (size + (1 << cbits) - 1) >> cbits
            blocks = array("q", [-1]) * nchunks
            for off, length in regions:
                if length:
                    for c in range(off >> cbits, ((off + length - 1) >> cbits) + 1):
                        blocks[c] = 0
            nblk = 0
            for c in range(nchunks):
                if blocks[c] == 0:
                    blocks[c] = nblk
                    nblk += min(1 << bits, (size - (c << cbits) + _MASK) >> _BITS)
            self._chunks[index] = (bits, blocks)
            cmask = (1 << cbits) - 1

            def where(off: int) -> int:
                return base + (blocks[off >> cbits] << _BITS) + (off & cmask)

        for off, piece in data.placed():
            pwrite_all(self._fd, piece, where(off))  # a region's chunks get consecutive blocks
        self._start.append(self._end)
        self._nblk.append(nblk)
        self._tail.append(-1)
        self._released.append(0)
        self._end += nblk
        self._wpos = self._end << _BITS
        node.data = index

    def _flush_data(self) -> None:
        dbuf = self._dbuf
        if not dbuf:
            return
        pos, total = self._wpos, self._dlen
        written = os.pwritev(self._fd, dbuf, pos)
        if written != total:  # short (rare on a regular file): the rest piece by piece
            skip = written
            for piece in dbuf:
                if skip >= len(piece):
                    skip -= len(piece)
                    continue
                pwrite_all(self._fd, memoryview(piece)[skip:], pos + written)
                written += len(piece) - skip
                skip = 0
        self._wpos = pos + total
        dbuf.clear()
        self._dlen = 0

    def _flush_spool(self) -> None:
        if self._sbuf:
            pwrite_all(self._spool_fd, self._sbuf, self._spooled - len(self._sbuf))
            self._sbuf.clear()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        for name in ("_spool_fd", "_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    # -- finish: the metadata ------------------------------------------------------------------

    def finish(self, root: Node) -> None:
        if self._finished:
            raise RuntimeError("ErofsSink.finish called twice")
        self._finished = True
        with raise_no_space(f"write erofs image {fd_path(self._fd)}"):
            self._flush_data()
            self._flush_spool()
            os.ftruncate(self._fd, self._end << _BITS)  # trailing holes of sparse data read as zeros
            if self._spooled:
                self._map = mmap.mmap(self._spool_fd, self._spooled, prot=mmap.PROT_READ)
            _Image(self, root).write()

    def _compact(self, live: bytearray) -> None:
        """Slide the live extents down over the dead ones (in allocation order = position order)."""
        start, nblk = self._start, self._nblk
        shift, i, n = 0, 0, len(start)
        while i < n:
            if not live[i]:
                shift += nblk[i]
                i += 1
                continue
            j, blocks = i, 0
            while j < n and live[j]:  # a run of live extents moves in one go
                blocks += nblk[j]
                start[j] -= shift
                j += 1
            if shift and blocks:
                self._move(start[i] + shift, start[i], blocks)
            i = j
        self._end -= shift

    def _move(self, src: int, dst: int, blocks: int) -> None:
        fd, gap = self._fd, (src - dst) << _BITS
        src, dst, left = src << _BITS, dst << _BITS, blocks << _BITS
        while left:
            if gap >= _MOVE:  # ranges of one file must not overlap for copy_file_range
                n = os.copy_file_range(fd, fd, min(left, gap), src, dst)
                if n <= 0:
                    raise OSError(f"copy_file_range returned {n} while compacting the image")
            else:
                data = os.pread(fd, min(left, _MOVE), src)
                if not data:
                    raise OSError("short read while compacting the image")
                pwrite_all(fd, data, dst)
                n = len(data)
            src, dst, left = src + n, dst + n, left - n


def _anonymous_file(directory: str) -> int:
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".erofs-spool-")
        os.unlink(name)
        return fd


class _Image:
    """The finish pass: inode numbering, xattrs, layouts, placement, then the bytes."""

    def __init__(self, sink: ErofsSink, root: Node) -> None:
        self.sink = sink
        self.root = root
        self.nodes: list[Node] = []
        self.ino_of: dict[Node, int] = {}
        self.nlink = array("I")
        self.parent = array("q")
        self.names: dict[int, list[bytes]] = {}  # directories: names with "." and "..", sorted
        self.starts: dict[int, list[int]] = {}  # directories: where each block starts in names
        self.xattrs: dict[int, bytes] = {}  # the xattr ibody of inodes that have one
        self.layout = bytearray()
        self.iu = array("I")  # i_u: raw_blkaddr, rdev or chunk format
        self.isize = array("q")  # i_size
        self.item = array("I")  # bytes in the metadata area: inode, xattrs, inline tail or block map
        self.blocks: list[tuple[int, int, int]] = []  # placed at finish: (ino, first block, count)
        self.nid = array("q")  # slot of each inode in the metadata area (nid)
        self.paths: dict[int, bytes] = {0: b"/"}  # directories' paths, for skip reports and errors
        self.shared_blob = b""  # the shared xattr area
        self.meta_start = 0  # first block of the metadata area
        self.chunked = False

    def write(self) -> None:
        sink = self.sink
        live = self._walk()
        self._xattr_ibodies()
        sink._compact(live)
        self._layouts()
        meta, meta_blocks = self._place()
        xattr_blk = meta + meta_blocks
        fd = sink._fd
        out = _Out(fd, sink._end << _BITS)
        self._write_blocks(out)
        assert out.pos + len(out.buf) == meta << _BITS
        self._write_meta(out, meta_blocks)
        shared_end = self._write_shared(out)
        out.flush()
        total = xattr_blk + shared_end
        os.ftruncate(fd, total << _BITS)
        secs, nsec = divmod(sink.build_time_ns, 1_000_000_000)
        incompat = fmt.FEATURE_INCOMPAT_CHUNKED_FILE if self.chunked else 0
        sb = fmt.SUPER_BLOCK.pack(
            fmt.SUPER_MAGIC, 0, 0, fmt.BLKSZBITS, 0, self.nid[0], len(self.nodes), secs, nsec, total, meta,
            xattr_blk if self.shared_blob else 0, sink.uuid, sink.volume_name, incompat, 0, 0, 0, 0, 0, 0, 0, 0)
        pwrite_all(fd, bytes(fmt.SUPER_OFFSET) + sb + bytes(BLKSZ - fmt.SUPER_OFFSET - len(sb)), 0)

    def _walk(self) -> bytearray:
        """Number the inodes (parents first, names in byte order), count links, find live data."""
        inodes = Inodes(self.root, name_len=fmt.NAME_LEN, released=self.sink._released, error=ErofsError)
        self.inodes = inodes
        self.nodes, self.ino_of, self.nlink, self.parent, self.paths = (
            inodes.nodes, inodes.index, inodes.nlink, inodes.parent, inodes.paths)
        for names in inodes.names.values():  # erofs directories list "." and ".." among the names
            bisect.insort(names, b".")
            bisect.insort(names, b"..")
        self.names = inodes.names
        return inodes.live

    def _path(self, ino: int) -> bytes:
        return self.inodes.path(ino)

    def _xattr_ibodies(self) -> None:
        """Inline and shared xattrs: a (name, value) several inodes hold is stored once when that is
        smaller (h_shared_count caps an inode at 255 shared ones)."""
        keys: dict[int, list[XattrKey]] = {}
        uses: dict[XattrKey, int] = {}
        sink = self.sink
        for ino, node in enumerate(self.nodes):
            if not node.xattrs:
                continue
            mine: list[XattrKey] = []
            for name, value in node.xattrs.items():
                key = xattr_key(name, value)
                if isinstance(key, str):
                    path = self._path(ino)
                    sink.skipped.append(f"{path.decode('utf-8', 'replace')}: xattr {name}: {key}")
                    if sink.report is not None:
                        sink.report.skip(path, f"xattr {name} not stored: {key}")
                    continue
                mine.append(key)
                uses[key] = uses.get(key, 0) + 1
            if mine:
                mine.sort()
                keys[ino] = mine
        shared: dict[XattrKey, int] = {}
        blob = bytearray()
        for key in sorted(k for k, n in uses.items()
                          if n > 1 and fmt.xattr_entry_size(len(k[1]), len(k[2])) * (n - 1) > 4 * n):
            shared[key] = len(blob) // 4
            blob += _xattr_entry(key)
        self.shared_blob = bytes(blob)
        for ino, mine in keys.items():
            ids: list[int] = []
            inline = bytearray()
            for key in mine:
                sid = shared.get(key)
                if sid is not None and len(ids) < fmt.XATTR_SHARED_MAX:
                    ids.append(sid)
                else:
                    inline += _xattr_entry(key)
            body = fmt.XATTR_IBODY_HEADER.pack(0, len(ids)) + b"".join(
                fmt.XATTR_SHARED_ID.pack(i) for i in ids) + inline
            if 1 + (len(body) - fmt.XATTR_IBODY_HEADER.size) // 4 > fmt.XATTR_ICOUNT_MAX:
                raise ErofsError(f"{text(self._path(ino))}: xattrs too large for an erofs inode")
            self.xattrs[ino] = body

    def _layouts(self) -> None:
        sink = self.sink
        end = sink._end
        append_layout, iu, isize, item = self.layout.append, self.iu.append, self.isize.append, self.item.append
        for ino, node in enumerate(self.nodes):
            head = _INODE + len(self.xattrs.get(ino, b""))
            kind = node.kind
            if kind == tree.REG:
                index = node.data
                size = node.size
                isize(size)
                if not isinstance(index, int):
                    if size:
                        raise ErofsError(f"{text(self._path(ino))}: a {size}-byte file without data")
                    append_layout(fmt.INODE_FLAT_PLAIN)
                    iu(0)
                    item(head)
                    continue
                chunks = sink._chunks.get(index)
                if chunks is not None:
                    self.chunked = True
                    append_layout(fmt.INODE_CHUNK_BASED)
                    iu(chunks[0])  # block map (4-byte entries), chunk bits
                    item(head + fmt.BLOCK_MAP_ENTRY.size * len(chunks[1]))
                    continue
                nblk = sink._nblk[index]
                blk = sink._start[index] if nblk else (0 if not size else fmt.NULL_ADDR)
                if sink._tail[index] >= 0:
                    if head + (size & _MASK) > BLKSZ:  # only if its xattrs grew after file() (the contract)
                        raise ErofsError(f"{text(self._path(ino))}: xattrs changed after the file's data was written")
                    append_layout(fmt.INODE_FLAT_INLINE)
                    item(head + (size & _MASK))
                else:
                    append_layout(fmt.INODE_FLAT_PLAIN)
                    item(head)
                iu(blk)
            elif kind == tree.DIR or kind == tree.LNK:
                if kind == tree.DIR:
                    names = self.names[ino]
                    starts = self.starts[ino] = _dir_blocks(names)  # (kept: blocks and tail use it)
                    size = _dir_size(names, starts)
                else:
                    size = len(node.target)
                isize(size)
                tail = size & _MASK
                # The root sits at slot 1 of its block: its tail has one slot less.
                if tail and head + tail <= (BLKSZ - _SLOT if ino == 0 else BLKSZ):
                    append_layout(fmt.INODE_FLAT_INLINE)
                    nblk = size >> _BITS
                    item(head + tail)
                else:
                    append_layout(fmt.INODE_FLAT_PLAIN)
                    nblk = (size + _MASK) >> _BITS
                    item(head)
                if nblk:
                    self.blocks.append((ino, end, nblk))
                    iu(end)
                    end += nblk
                else:
                    iu(fmt.NULL_ADDR if size else 0)
            elif kind in (tree.CHR, tree.BLK, tree.FIFO, tree.SOCK):
                isize(0)
                append_layout(fmt.INODE_FLAT_PLAIN)
                rdev = node.rdev if kind in (tree.CHR, tree.BLK) else 0
                iu(fmt.encode_dev(os.major(rdev), os.minor(rdev)) & 0xFFFFFFFF)
                item(head)
            else:
                raise ErofsError(f"{text(self._path(ino))}: unknown file type {kind:o}")
        self.meta_start = end

    def _place(self) -> tuple[int, int]:
        """Best-fit placement of the metadata items on 32-byte slots; one that fits a block never
        crosses a block boundary (inline tails must not), bigger ones start a block. The root comes
        first, at nid 1 (root_nid is 16 bits; nid 0 would be inode number 0, which tools skip)."""
        nslots = BLKSZ // _SLOT
        buckets: list[list[int]] = [[] for _ in range(nslots + 1)]  # blocks by their free slots (at the end)
        nonempty = 0  # bit n set: buckets[n] has a block
        offsets, item = self.nid, self.item
        offsets.extend([0] * len(self.nodes))
        blocks = 0
        for ino in range(len(self.nodes)):
            need = (item[ino] + _SLOT - 1) // _SLOT
            if ino and need <= nslots:
                mask = nonempty >> need
                if mask:  # the fullest block that still takes it
                    have = need + (mask & -mask).bit_length() - 1
                    bucket = buckets[have]
                    blk = bucket.pop()
                    if not bucket:
                        nonempty &= ~(1 << have)
                    offsets[ino] = blk * nslots + nslots - have
                    free = have - need
                    if free:
                        buckets[free].append(blk)
                        nonempty |= 1 << free
                    continue
            first = 1 if ino == 0 else 0  # the root: slot 1 of block 0 (slot 0 stays unused)
            offsets[ino] = blocks * nslots + first
            span = -(-(first + need) // nslots)
            blocks += span
            free = span * nslots - first - need
            if free:
                buckets[free].append(blocks - 1)
                nonempty |= 1 << free
        return self.meta_start, blocks

    def _dirents(self, ino: int, lo: int, hi: int) -> bytes:
        names = self.names[ino][lo:hi]
        node = self.nodes[ino]
        children = node.children
        assert children is not None
        heads, nameoff = [], fmt.DIRENT.size * len(names)
        ino_of, nid, nodes = self.ino_of, self.nid, self.nodes
        for name in names:
            if name == b".":
                cino = ino
            elif name == b"..":
                cino = self.parent[ino]
            else:
                cino = ino_of[children[name]]
            heads.append(fmt.DIRENT.pack(nid[cino], nameoff, _FTYPES[nodes[cino].kind]))
            nameoff += len(name)
        return b"".join(heads) + b"".join(names)

    def _write_blocks(self, out: _Out) -> None:
        """Directory blocks and long symlinks, in the data area after the files."""
        for ino, _blk, nblk in self.blocks:
            node = self.nodes[ino]
            if node.kind == tree.DIR:
                names = self.names[ino]
                starts = self.starts[ino] + [len(names)]
                for b in range(nblk):
                    data = self._dirents(ino, starts[b], starts[b + 1])
                    out.write(data)
                    out.zeros(BLKSZ - len(data))
            else:
                data = node.target[:nblk << _BITS]
                out.write(data)
                out.zeros((nblk << _BITS) - len(data))

    def _write_meta(self, out: _Out, meta_blocks: int) -> None:
        """The metadata area, packed in place (``pack_into``) into a zeroed window that is written when
        the next item would not fit: one slice assignment per piece, gaps zero for free."""
        sink = self.sink
        out.flush()
        fd, base = sink._fd, out.pos
        end = base + (meta_blocks << _BITS)
        order = sorted(range(len(self.nodes)), key=self.nid.__getitem__)
        pack_into = fmt.INODE_EXTENDED.pack_into
        build = sink.build_time_ns
        nodes, xattrs, layout, iu, isize, nlink = self.nodes, self.xattrs, self.layout, self.iu, self.isize, self.nlink
        nid, item, tails, i_format = self.nid, self.item, sink._tail, fmt.i_format
        inline, chunk_based, reg, lnk = fmt.INODE_FLAT_INLINE, fmt.INODE_CHUNK_BASED, tree.REG, tree.LNK
        spool = sink._map
        win, wstart = bytearray(_WINDOW), base  # the window holds the image's bytes from wstart on
        for count, ino in enumerate(order):
            if spool is not None and count & 0xFFF == 0xFFF:
                spool.madvise(mmap.MADV_DONTNEED)  # tails read so far leave our RSS (they stay cached)
            pos = base + (nid[ino] << fmt.ISLOTBITS)
            o = pos - wstart
            if o + item[ino] > len(win):  # everything before this item (zeros included) goes out
                pwrite_all(fd, memoryview(win)[:o], wstart)
                win, wstart, o = bytearray(max(_WINDOW, item[ino])), pos, 0
            node = nodes[ino]
            body = xattrs.get(ino)
            mtime = node.mtime_ns if node.mtime_ns is not None else build
            uid, gid = node.uid, node.gid
            if not (0 <= uid <= 0xFFFFFFFF and 0 <= gid <= 0xFFFFFFFF):
                raise ErofsError(f"{text(self._path(ino))}: owner {uid}:{gid} out of erofs' 32-bit range")
            lay, kind = layout[ino], node.kind
            pack_into(win, o, i_format(lay), 1 + (len(body) - fmt.XATTR_IBODY_HEADER.size) // 4 if body else 0,
                      kind | (node.mode & 0o7777), 0, isize[ino], iu[ino], (ino + 1) & 0xFFFFFFFF, uid, gid,
                      mtime // 1_000_000_000, mtime % 1_000_000_000, nlink[ino])
            o += _INODE
            if body:
                win[o:o + len(body)] = body
                o += len(body)
            if lay == inline:
                size = isize[ino]
                if kind == reg:
                    assert spool is not None and isinstance(node.data, int)
                    at, n = tails[node.data], size & _MASK
                    win[o:o + n] = spool[at:at + n]
                elif kind == lnk:
                    target = node.target[size & ~_MASK:]
                    win[o:o + len(target)] = target
                else:
                    names = self.names[ino]
                    dirents = self._dirents(ino, self.starts[ino][-1], len(names))
                    win[o:o + len(dirents)] = dirents
            elif lay == chunk_based:
                assert isinstance(node.data, int)
                start = sink._start[node.data]
                blockmap = b"".join(fmt.BLOCK_MAP_ENTRY.pack(fmt.NULL_ADDR if b < 0 else start + b)
                                    for b in sink._chunks[node.data][1])
                win[o:o + len(blockmap)] = blockmap
        if end - wstart > len(win):  # (stale bytes of compacted data may lie there: written as zeros)
            win += bytes(end - wstart - len(win))
        pwrite_all(fd, memoryview(win)[:end - wstart], wstart)
        out.pos = end

    def _write_shared(self, out: _Out) -> int:
        blob = self.shared_blob
        if not blob:
            return 0
        out.write(blob)
        out.zeros(-len(blob) % BLKSZ)
        return (len(blob) + _MASK) >> _BITS
