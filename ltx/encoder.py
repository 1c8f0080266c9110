"""Streaming LTX encoder: v3 with block-compressed pages by default, v1 on request.

Pages are written as they come; only the page index (a few bytes per page)
is kept until the end, because the format puts it after the pages.
"""

from __future__ import annotations

import struct
from typing import Protocol

import lz4.block
import lz4.frame

from ltx.checksum import CHECKSUM_FLAG, EMPTY_DB_CHECKSUM, crc64, lock_pgno, page_checksum
from ltx.decoder import PAGE_FLAG_SIZE, append_index_entry, finish_index
from ltx.errors import LTXError, PageError, TrailerError
from ltx.header import FLAG_COMPRESS_LZ4, Header, Trailer, Version

_V3_BLOCK_HEADER = struct.Struct(">IHI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class Encoder:
    """Write one LTX file to f.

    Call write_page() for each page in ascending order, then finish(). For a
    snapshot with checksums the post-apply checksum is computed from the pages;
    for an incremental file the caller supplies it (only it knows the rest of
    the database). v1 files get an LZ4-compressed body when the header has
    FLAG_COMPRESS_LZ4.
    """

    def __init__(self, f: Writable, header: Header, *, version: Version = Version.V3) -> None:
        if version is Version.V2:
            raise LTXError("writing format v2 is not supported; write v3 or v1", field="version")
        header.validate(version)
        self._f = f
        self.header = header
        self.version = version
        self._lock = lock_pgno(header.page_size)
        self._prev = 0
        self._index = bytearray()  # page index entries as varints, written at the end
        self._snapshot_checksum = 0
        self._track_snapshot = header.is_snapshot and not header.no_checksum
        self._finished = False
        self._count = 0
        raw = header.to_bytes()
        self._crc = crc64(raw)
        self._offset = 0
        self._lz4: lz4.frame.LZ4FrameCompressor | None = None
        self._write(raw)
        if version is Version.V1 and header.flags & FLAG_COMPRESS_LZ4:
            self._lz4 = lz4.frame.LZ4FrameCompressor(
                block_size=lz4.frame.BLOCKSIZE_MAX64KB,
                block_linked=False,
                content_checksum=True,
                auto_flush=False,
            )
            self._write(self._lz4.begin())

    @property
    def page_count(self) -> int:
        return self._count

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._offset += len(data)

    def _write_body(self, data: bytes) -> None:
        if self._lz4 is not None:
            out = self._lz4.compress(data)
            if out:
                self._write(out)
        else:
            self._write(data)

    def write_page(self, pgno: int, data: bytes | bytearray | memoryview) -> None:
        header = self.header
        if self._finished:
            raise LTXError("encoder already finished", field="page")
        if len(data) != header.page_size:
            raise PageError(
                f"page {pgno} is {len(data)} bytes, want {header.page_size}", field="page_data"
            )
        if pgno < 1 or pgno > header.commit:
            raise PageError(f"page {pgno} is outside 1..{header.commit}", field="pgno")
        if pgno <= self._prev:
            raise PageError(f"page {pgno} follows page {self._prev}: out of order", field="pgno")
        if pgno == self._lock:
            raise PageError(f"page {pgno} is the lock page and cannot be encoded", field="pgno")
        if header.is_snapshot:
            expected = self._prev + 1 if self._prev + 1 != self._lock else self._prev + 2
            if pgno != expected:
                raise PageError(
                    f"snapshot must hold every page: got {pgno} after {self._prev}", field="pgno"
                )
        data = bytes(data)
        if self.version is Version.V3:
            block = lz4.block.compress(data, store_size=False)
            frame_header = _V3_BLOCK_HEADER.pack(pgno, PAGE_FLAG_SIZE, len(block))
            offset = self._offset
            self._write(frame_header + block)
            append_index_entry(self._index, pgno, offset, len(frame_header) + len(block))
            self._crc = crc64(data, crc64(frame_header, self._crc))
        else:
            frame_header = _U32.pack(pgno)
            self._write_body(frame_header + data)
            self._crc = crc64(data, crc64(frame_header, self._crc))
        if self._track_snapshot:
            self._snapshot_checksum ^= page_checksum(pgno, data)
        self._prev = pgno
        self._count += 1

    def finish(self, post_apply_checksum: int | None = None) -> Trailer:
        """Write the end marker, index and trailer; return the trailer written."""
        header = self.header
        if self._finished:
            raise LTXError("encoder already finished", field="trailer")
        if header.is_snapshot and header.commit > 0:
            last = header.commit - 1 if header.commit == self._lock else header.commit
            if self._prev != last:
                raise PageError(
                    f"snapshot ends at page {self._prev} but commit is {header.commit}",
                    field="commit",
                )
        post = self._post_apply(post_apply_checksum)
        # Check the post-apply value before writing anything, so a refused value does
        # not leave a half-written end (the file checksum is not known yet: use the flag).
        Trailer(post, CHECKSUM_FLAG).validate(header)
        if self.version is Version.V3:
            tail = b"\x00" * 6 + finish_index(bytes(self._index))
            self._write(tail)
        else:
            tail = b"\x00" * 4
            self._write_body(tail)
            if self._lz4 is not None:
                self._write(self._lz4.flush())
        post_bytes = _U64.pack(post)
        self._crc = crc64(post_bytes, crc64(tail, self._crc))
        trailer = Trailer(post, CHECKSUM_FLAG | self._crc)
        trailer.validate(header)
        self._write(trailer.to_bytes())
        self._finished = True
        return trailer

    def _post_apply(self, given: int | None) -> int:
        header = self.header
        if header.no_checksum:
            if given not in (None, 0):
                raise TrailerError(
                    "a no-checksum file cannot carry a post-apply checksum",
                    field="post_apply_checksum",
                )
            return 0
        if header.commit == 0:
            computed = EMPTY_DB_CHECKSUM
        elif self._track_snapshot:
            computed = CHECKSUM_FLAG | self._snapshot_checksum
        elif given is None:
            raise TrailerError(
                "an incremental file needs the post-apply checksum of the whole database",
                field="post_apply_checksum",
            )
        else:
            return given
        if given is not None and given != computed:
            raise TrailerError(
                f"post-apply checksum {given:016x} disagrees with the pages ({computed:016x})",
                field="post_apply_checksum",
            )
        return computed
