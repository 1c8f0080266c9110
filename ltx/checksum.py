"""CRC-64/GO-ISO and the LTX page and database checksums.

The database checksum is the XOR of every page's checksum, so it can be kept
incrementally (remove a page's old checksum, add its new one) and it is the
same whatever order pages are visited in. The lock page never counts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import BinaryIO

import fastcrc

CHECKSUM_FLAG = 1 << 63
EMPTY_DB_CHECKSUM = CHECKSUM_FLAG

_go_iso = fastcrc.crc64.go_iso
_U32 = struct.Struct(">I")


def crc64(data: bytes | bytearray | memoryview, crc: int | None = None) -> int:
    """CRC-64/GO-ISO of data, continuing from a previous crc64() value when given."""
    return int(_go_iso(data, crc)) if crc is not None else int(_go_iso(data))


def lock_pgno(page_size: int) -> int:
    """The page holding SQLite's PENDING_BYTE; SQLite never writes it."""
    return 0x40000000 // page_size + 1


def page_checksum(pgno: int, data: bytes | bytearray | memoryview) -> int:
    """Checksum of one page: FLAG | crc64(u32be(pgno) || data)."""
    return CHECKSUM_FLAG | _go_iso(data, _go_iso(_U32.pack(pgno)))


def database_checksum(pages: Iterable[tuple[int, bytes | bytearray | memoryview]]) -> int:
    """Checksum of a database given as (pgno, data) pairs; the lock page is skipped."""
    acc = 0
    lock: int | None = None
    for pgno, data in pages:
        if lock is None:
            lock = lock_pgno(len(data))
        if pgno != lock:
            acc ^= page_checksum(pgno, data)
    return CHECKSUM_FLAG | acc


def checksum_file(f: BinaryIO, page_size: int, page_count: int | None = None) -> int:
    """Database checksum of a raw database image read from f.

    Reads in large chunks so the cost is the CRC itself, not Python calls.
    With page_count given, only pages 1..page_count are included (the commit
    size); otherwise every whole page in the file. A trailing partial page is
    ignored, as SQLite would never have written one.
    """
    lock = lock_pgno(page_size)
    pages_per_chunk = max(1, (4 << 20) // page_size)
    acc = 0
    pgno = 1
    remaining = page_count if page_count is not None else -1
    go_iso = _go_iso
    pack = _U32.pack
    while remaining != 0:
        want = pages_per_chunk if remaining < 0 else min(pages_per_chunk, remaining)
        chunk = f.read(want * page_size)
        whole = len(chunk) // page_size
        if whole == 0:
            break
        view = memoryview(chunk)
        for i in range(whole):
            if pgno != lock:
                acc ^= go_iso(view[i * page_size : (i + 1) * page_size], go_iso(pack(pgno)))
            pgno += 1
        if remaining > 0:
            remaining -= whole
        if whole < want:
            break
    return CHECKSUM_FLAG | acc
