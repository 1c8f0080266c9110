"""CRC-64/GO-ISO and the LTX page and database checksums.

The database checksum is the XOR of every page's checksum, so it can be kept
incrementally (remove a page's old checksum, add its new one) and it is the
same whatever order pages are visited in. The lock page never counts.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Container, Iterable, Mapping
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


class PageChecksums:
    """The per-page checksums of a database, kept so a change costs only its own pages.

    Both sides of replication need the database checksum after every transaction without
    re-reading the database: the primary advances it through the pages of each WAL
    transaction, a replica predicts it from an LTX file before applying the file. Index
    pgno, 1-based; the lock page is held as 0 and never counts; a page grown into without
    being written reads back as zeros (SQLite and ``apply_ltx`` agree).
    """

    __slots__ = ("_acc", "_lock", "_sums", "page_size")

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._lock = lock_pgno(page_size)
        self._sums = array("Q", [0])
        self._acc = 0  # XOR of the page checksums, bit 63 not forced

    @classmethod
    def of_pages(
        cls, page_size: int, pages: Iterable[tuple[int, bytes | bytearray | memoryview]]
    ) -> PageChecksums:
        """From (pgno, data) pairs in ascending order; pages not given count as absent (0)."""
        sums = cls(page_size)
        for pgno, data in pages:
            sums.set(pgno, page_checksum(pgno, data))
        return sums

    def copy(self) -> PageChecksums:
        other = PageChecksums(self.page_size)
        other._sums = array("Q", self._sums)
        other._acc = self._acc
        return other

    @property
    def pages(self) -> int:
        """The database size in pages (its commit size)."""
        return len(self._sums) - 1

    def __getitem__(self, pgno: int) -> int:
        return self._sums[pgno] if pgno <= self.pages else 0

    def checksum(self) -> int:
        """The LTX database checksum (EMPTY_DB_CHECKSUM for no pages)."""
        return CHECKSUM_FLAG | self._acc if self.pages else EMPTY_DB_CHECKSUM

    def set(self, pgno: int, value: int) -> None:
        """Set one page's checksum, growing the database to pgno if needed."""
        if pgno > self.pages:
            self._sums.frombytes(bytes(8 * (pgno - self.pages)))
        if pgno == self._lock:
            value = 0
        self._acc ^= self._sums[pgno] ^ value
        self._sums[pgno] = value

    def growth_gap(self, changed: Container[int], commit: int) -> list[int]:
        """Pages a growth to `commit` reaches without `changed` writing them."""
        lock = self._lock
        return [p for p in range(self.pages + 1, commit + 1) if p not in changed and p != lock]

    def after(self, changed: Mapping[int, int], commit: int) -> int:
        """The checksum once `changed` (pgno -> checksum) is written and the size is commit."""
        if commit == 0:
            return EMPTY_DB_CHECKSUM
        acc = self._acc
        old = self.pages
        sums = self._sums
        lock = self._lock
        for pgno in range(commit + 1, old + 1):
            acc ^= sums[pgno]
        for pgno, value in changed.items():
            if pgno != lock:
                acc ^= (sums[pgno] if pgno <= old else 0) ^ value
        zeros = bytes(self.page_size)
        for pgno in self.growth_gap(changed, commit):
            acc ^= page_checksum(pgno, zeros)
        return CHECKSUM_FLAG | acc

    def update(self, changed: Mapping[int, int], commit: int) -> None:
        """Write `changed` (pgno -> checksum) and size the database to commit pages."""
        gap = self.growth_gap(changed, commit)
        old = self.pages
        if commit < old:
            for pgno in range(commit + 1, old + 1):
                self._acc ^= self._sums[pgno]
            del self._sums[commit + 1 :]
        for pgno, value in changed.items():
            self.set(pgno, value)
        zeros = bytes(self.page_size)
        for pgno in gap:
            self.set(pgno, page_checksum(pgno, zeros))
        if commit > self.pages:  # only the lock page was left to reach
            self._sums.frombytes(bytes(8 * (commit - self.pages)))
