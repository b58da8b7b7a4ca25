"""What the per-entry fast paths must keep: ``FileData.placed`` (sparse data at its offsets, for every
sink), and the tar header's number and checksum reading (the octal fast path and the adler32 byte sum
give what the field-by-field reading gives, errors included)."""

from __future__ import annotations

import random

import pytest

from dirge.apply.tar import TarFormatError, _checksum_ok, _parse_number
from dirge.apply.tree import FileData
from dirge.errors import ImageError


def test_placed_puts_the_stored_bytes_at_the_map_offsets_across_chunks() -> None:
    data = FileData(10, [b"abc", b"defg", b"hij"], [(0, 2), (100, 5), (4096, 3)])
    placed = [(off, bytes(piece)) for off, piece in data.placed()]
    assert placed == [(0, b"ab"), (100, b"c"), (101, b"defg"), (4096, b"hij")]


@pytest.mark.parametrize("chunks", [[b"abc"], [b"abcdef", b"x"]])
def test_placed_refuses_data_that_does_not_fill_the_map(chunks: list[bytes]) -> None:
    with pytest.raises(ImageError):
        list(FileData(sum(map(len, chunks)), chunks, [(0, 2), (10, 4)]).placed())


@pytest.mark.parametrize("field, value", [
    (b"0000644\0", 0o644), (b"0000644 ", 0o644), (b" 644 \0\0\0", 0o644), (b"\0" * 8, 0), (b" " * 8, 0),
    (b"0" * 11 + b"\0", 0), (b"\x80" + bytes(6) + b"\x01", 1), (b"\xff" * 8, -1), (b"17777777777\0", 0o17777777777),
])
def test_numbers(field: bytes, value: int) -> None:
    assert _parse_number(field) == value


@pytest.mark.parametrize("field", [b"0000009\0", b"-000001\0", b"+000001\0", b"0o00001\0", b"1_000\0\0\0", b"12 34\0\0\0"])
def test_numbers_refused(field: bytes) -> None:
    with pytest.raises(TarFormatError):
        _parse_number(field)


def test_checksum_matches_the_byte_sum_signed_and_unsigned() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        block = bytearray(rnd.randbytes(512) if rnd.random() < 0.5 else bytes(rnd.choice((0, 48, 255)) for _ in range(512)))
        block[148:156] = b" " * 8
        unsigned = sum(block)
        signed = sum(b - 256 if b > 127 else b for b in block)
        for total, ok in ((unsigned, True), (signed, True), (unsigned + 1, unsigned + 1 == signed)):
            if not 0 <= total < 8 ** 7:
                continue
            block[148:156] = b"%07o\0" % total
            assert _checksum_ok(bytes(block)) is ok
