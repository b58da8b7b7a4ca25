#!/usr/bin/env python3
"""The stream floor of bench/limit.py: the least work any consumer of gzip layers must do, done as fast as
Python with dirge's own libraries can do it, writing nothing.

Usage: python bench/floor.py BLOB... (layer blobs, in order)

Prints one JSON line: the seconds measured in-process, each blob's digest and diff ID ("sha256:..."),
and the compressed and decompressed byte counts. Kept to the standard library and isal, so the
process's start-up (which bench/limit.py times with it, as it times dirge's) stays small.

How: two threads in a pipeline. This thread reads each blob and gunzips it with ISA-L
(igzip_lib, the library dirge uses; it releases the GIL and checks gzip's CRC and length, as dirge's
reader does); a second thread hashes every compressed chunk (the blob digest) and every decompressed
chunk (the diff ID) with hashlib (also GIL-free for large buffers). Inflate is the longest of the
four streams, so it alone holds the critical path and both hashes ride beside it on the other core.
Layers go through in order, back to back (the reader starts layer 2 while the hasher finishes layer 1).
One thread per layer would leave the first layer, ~85% of the bytes, on one core.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
import time

from isal import igzip_lib

CHUNK = 1 << 20  # compressed bytes per read: ~2.5 MiB decompressed, few queue hand-offs, still cache-sized
DEPTH = 32  # chunks in flight: bounds memory (~100 MiB at worst) if the hasher falls behind


def floor(blobs: list[str]) -> dict[str, object]:
    t0 = time.perf_counter()
    q: queue.Queue[tuple[int, int, bytes] | None] = queue.Queue(DEPTH)
    hashes = [(hashlib.sha256(), hashlib.sha256()) for _ in blobs]
    sizes = [[0, 0] for _ in blobs]

    def hasher() -> None:
        while (item := q.get()) is not None:
            layer, kind, data = item  # kind 0: compressed, 1: decompressed
            hashes[layer][kind].update(data)
            sizes[layer][kind] += len(data)

    thread = threading.Thread(target=hasher, name="hash")
    thread.start()
    try:
        for i, path in enumerate(blobs):
            dec = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
            fed = False  # has dec seen any input (an unfinished member at the end is a truncated blob)
            with open(path, "rb", buffering=0) as f:
                while raw := f.read(CHUNK):
                    q.put((i, 0, raw))
                    while raw:
                        fed = True
                        out = dec.decompress(raw)
                        if out:
                            q.put((i, 1, out))
                        if dec.eof:  # a multi-member gzip: what is left starts the next member
                            raw = dec.unused_data
                            dec = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
                            fed = False
                        else:
                            raw = b""
            if fed and not dec.eof:
                raise EOFError(f"{path}: the gzip stream ends inside a member")
    finally:
        q.put(None)
        thread.join()
    return {"seconds": time.perf_counter() - t0,
            "digests": [["sha256:" + c.hexdigest(), "sha256:" + u.hexdigest()] for c, u in hashes],
            "bytes": sizes}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(floor(sys.argv[1:])), flush=True)
