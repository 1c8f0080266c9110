"""Streaming LTX decoder for every generation (v1 plain and LZ4 body, v2, v3).

Pages are yielded one at a time and never held together; the file checksum,
page order, bounds and the page index are checked as the bytes go by, so a
consumer that reaches the end of pages() has a fully verified file. The
reader is stricter than the reference: it rejects out-of-order pages, pages
past the commit, the lock page, short decompressions, incomplete snapshots and
an index that disagrees with the frames.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import lz4.block
import lz4.frame

from ltx._reader import Readable, Reader, SeekableReadable
from ltx.checksum import CHECKSUM_FLAG, crc64, lock_pgno, page_checksum
from ltx.errors import (
    ChecksumError,
    HeaderError,
    LTXError,
    PageError,
    PageIndexError,
    TrailerError,
    TruncatedError,
)
from ltx.header import (
    FLAG_COMPRESS_LZ4,
    HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    Trailer,
    Version,
    is_valid_page_size,
)

LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
PAGE_FLAG_SIZE = 0x0001  # v3: a u32 size and an LZ4 block follow the page header

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_V3_PAGE_HEADER = struct.Struct(">IH")

Page = tuple[int, bytes]


def lz4_block_bound(size: int) -> int:
    """LZ4_compressBound: the largest block LZ4 can produce for size input bytes."""
    return size + size // 255 + 16


def end_marker_size(version: Version) -> int:
    return 6 if version is Version.V3 else 4


@dataclass(frozen=True, slots=True)
class IndexEntry:
    pgno: int
    offset: int  # absolute offset of the page header in the file
    size: int  # page header + size prefix + payload


def detect_versions(head: bytes, file_size: int | None = None) -> list[Version]:
    """Candidate generations for a file starting with head, most likely first.

    The format does not record its version (spec section 16). The bytes after
    the header tell the generations apart except for rare v1 pages whose data
    starts like a v3 page header; with the file size known, a v1 layout is
    added as a second candidate when the size fits one.
    """
    if len(head) < HEADER_SIZE + 4:
        return [Version.V3]
    flags = _U32.unpack_from(head, 4)[0]
    if flags & FLAG_COMPRESS_LZ4:
        return [Version.V1]
    body = head[HEADER_SIZE:]
    page_size = _U32.unpack_from(head, 8)[0]
    candidates: list[Version] = []
    if body[4:8] == LZ4_FRAME_MAGIC:
        candidates.append(Version.V2)
    elif body[4:6] == b"\x00\x01" or (body[4:6] == b"\x00\x00" and body[6:10] == LZ4_FRAME_MAGIC):
        candidates.append(Version.V3)
    elif body[:6] == b"\x00" * 6 and len(body) >= 15:
        # No pages: v3 ends with 6 zero bytes, a 0 terminator and index size 1;
        # v2 with 4 zero bytes, the terminator and index size 1.
        if body[6:15] == b"\x00" * 8 + b"\x01":
            candidates.append(Version.V3)
        elif body[4:13] == b"\x00" * 8 + b"\x01":
            candidates.append(Version.V2)
    v1_fits = file_size is None or (
        is_valid_page_size(page_size)
        and file_size >= HEADER_SIZE + 4 + TRAILER_SIZE
        and (file_size - HEADER_SIZE - 4 - TRAILER_SIZE) % (4 + page_size) == 0
    )
    if not candidates or v1_fits:
        candidates.append(Version.V1)
    return candidates


class Decoder:
    """Decode one LTX file from a binary stream.

    The header is read at construction. Iterate pages() to get (pgno, data)
    pairs; when it finishes, the end of the file has been read and verified
    and trailer is set. With version=None the generation is detected from the
    bytes after the header (see detect_versions); pass it when known.
    """

    def __init__(
        self,
        f: Readable,
        *,
        version: Version | None = None,
        path: str | None = None,
        file_size: int | None = None,
    ) -> None:
        self.path = path
        self._r = Reader(f, path)
        head = self._r.peek(HEADER_SIZE + 16)
        self.header = Header.from_bytes(head, path=path)
        self.version = version if version is not None else detect_versions(head, file_size)[0]
        self.header.validate(self.version, path=path)
        self._r.read_exact(HEADER_SIZE, "header")
        self._crc = crc64(head[:HEADER_SIZE])
        self.trailer: Trailer | None = None
        self.page_count = 0
        self._started = False

    # -- errors -----------------------------------------------------------------

    def _page_error(self, field: str, message: str) -> PageError:
        return PageError(message, path=self.path, field=field)

    # -- pages --------------------------------------------------------------------

    def pages(self) -> Iterator[Page]:
        if self._started:
            raise LTXError("pages() can only be iterated once", path=self.path)
        self._started = True
        try:
            yield from self._pages()
        except LTXError as exc:
            raise exc.with_path(self.path) from None

    def _pages(self) -> Iterator[Page]:
        header = self.header
        page_size = header.page_size
        commit = header.commit
        lock = lock_pgno(page_size)
        snapshot = header.is_snapshot
        track_snapshot = snapshot and not header.no_checksum
        version = self.version
        r = self._r
        body: Reader | _Lz4Body = r
        if version is Version.V1 and header.flags & FLAG_COMPRESS_LZ4:
            body = _Lz4Body(r, self.path)
        index = bytearray()  # expected index entries, as varints: ~9 bytes a page
        add = _append_uvarint
        db_checksum = 0
        prev = 0
        crc = self._crc
        go = crc64

        while True:
            offset = r.tell()
            if version is Version.V3:
                hdr = r.read_exact(6, "page_header")
                pgno, flags = _V3_PAGE_HEADER.unpack(hdr)
            else:
                hdr = body.read_exact(4, "page_header")
                pgno = _U32.unpack(hdr)[0]
                flags = 0
            if pgno == 0:
                if flags != 0:
                    raise self._page_error("page_header", f"end marker has flags 0x{flags:04x}")
                crc = go(hdr, crc)
                break
            self._check_pgno(pgno, prev, commit, lock, snapshot)
            if version is Version.V1:
                data = body.read_exact(page_size, "page_data")
                crc = go(data, go(hdr, crc))
            elif version is Version.V3 and flags == PAGE_FLAG_SIZE:
                size_bytes = r.read_exact(4, "page_size_prefix")
                size = _U32.unpack(size_bytes)[0]
                if size == 0 or size > lz4_block_bound(page_size):
                    raise self._page_error(
                        "compressed_size",
                        f"page {pgno}: compressed size {size} is impossible for "
                        f"{page_size}-byte pages",
                    )
                data = self._uncompress_block(r.read_exact(size, "page_data"), pgno)
                crc = go(data, go(size_bytes, go(hdr, crc)))
            elif flags == 0:
                data = _read_lz4_frame(r, page_size, pgno, self.path)
                crc = go(data, go(hdr, crc))
            else:
                raise self._page_error("page_flags", f"page {pgno}: invalid flags 0x{flags:04x}")
            if version is not Version.V1:
                add(index, pgno)
                add(index, offset)
                add(index, r.tell() - offset)
            if track_snapshot and pgno != lock:
                db_checksum ^= page_checksum(pgno, data)
            prev = pgno
            self.page_count += 1
            yield pgno, data

        if snapshot and commit > 0:
            last = commit - 1 if commit == lock else commit
            if prev != last:
                raise self._page_error(
                    "commit",
                    f"snapshot ends at page {prev} but the database has {commit} pages",
                )
        if isinstance(body, _Lz4Body):
            body.finish()
        if version is not Version.V1:
            crc = self._read_index(bytes(index), crc)
        trailer_bytes = r.read_exact(TRAILER_SIZE, "trailer")
        trailer = Trailer.from_bytes(trailer_bytes)
        crc = go(trailer_bytes[:8], crc)
        trailer.validate(header, path=self.path)
        if not r.at_eof():
            raise TrailerError(
                f"unexpected data after the trailer at offset {r.tell()}",
                path=self.path,
                field="trailer",
            )
        expected = CHECKSUM_FLAG | crc
        if trailer.file_checksum != expected:
            raise ChecksumError(
                f"file checksum mismatch: file says {trailer.file_checksum:016x}, "
                f"content gives {expected:016x}",
                path=self.path,
                field="file_checksum",
            )
        if track_snapshot and trailer.post_apply_checksum != CHECKSUM_FLAG | db_checksum:
            raise ChecksumError(
                f"snapshot post-apply checksum mismatch: trailer says "
                f"{trailer.post_apply_checksum:016x}, pages give {CHECKSUM_FLAG | db_checksum:016x}",
                path=self.path,
                field="post_apply_checksum",
            )
        self.trailer = trailer

    def _check_pgno(self, pgno: int, prev: int, commit: int, lock: int, snapshot: bool) -> None:
        if pgno > commit:
            raise self._page_error("pgno", f"page {pgno} is past the commit size {commit}")
        if pgno <= prev:
            raise self._page_error("pgno", f"page {pgno} follows page {prev}: out of order")
        if pgno == lock:
            raise self._page_error("pgno", f"page {pgno} is the lock page")
        if snapshot:
            expected = prev + 1 if prev + 1 != lock else prev + 2
            if pgno != expected:
                raise self._page_error(
                    "pgno", f"snapshot skips from page {prev} to {pgno}: pages missing"
                )

    def _uncompress_block(self, block: bytes, pgno: int) -> bytes:
        page_size = self.header.page_size
        try:
            data = lz4.block.decompress(block, uncompressed_size=page_size)
        except Exception as exc:  # lz4 raises its own LZ4BlockError
            raise self._page_error("page_data", f"page {pgno}: corrupt LZ4 block: {exc}") from None
        if len(data) != page_size:
            raise self._page_error(
                "page_data",
                f"page {pgno}: LZ4 block decompresses to {len(data)} bytes, want {page_size}",
            )
        return bytes(data)

    def _read_index(self, entries: bytes, crc: int) -> int:
        """Read the page index, check it against the frames seen, and hash its bytes.

        The fast path compares the bytes with the index a writer must have
        produced for these frames; only on a mismatch is the index parsed
        entry by entry, to name the entry that is wrong (and to accept the
        non-minimal varints Go's reader would accept).
        """
        r = self._r
        expected = finish_index(entries)
        if r.peek(len(expected)) == expected:
            r.read_exact(len(expected), "page_index")
            return crc64(expected, crc)
        frames = parse_index_entries(entries, self.path)
        raw = bytearray()
        for i, frame in enumerate(frames):
            entry = IndexEntry(*(_read_uvarint(r, "page_index", raw) for _ in range(3)))
            if entry.pgno == 0:
                raise PageIndexError(
                    f"index ends after {i} entries but the file has {len(frames)} pages",
                    path=self.path,
                    field="page_index",
                )
            if entry != frame:
                raise PageIndexError(
                    f"index entry {i} is (pgno {entry.pgno}, offset {entry.offset}, size "
                    f"{entry.size}) but the frame is (pgno {frame.pgno}, offset {frame.offset}, "
                    f"size {frame.size})",
                    path=self.path,
                    field="page_index",
                )
        if _read_uvarint(r, "page_index", raw) != 0:
            raise PageIndexError(
                f"index has more entries than the {len(frames)} pages in the file",
                path=self.path,
                field="page_index",
            )
        size_bytes = r.read_exact(8, "index_size")
        stated = _U64.unpack(size_bytes)[0]
        if stated != len(raw):
            raise PageIndexError(
                f"index size field says {stated} bytes but the index is {len(raw)} bytes",
                path=self.path,
                field="index_size",
            )
        return crc64(bytes(raw) + size_bytes, crc)

    def verify(self) -> Trailer:
        """Decode the whole file, discarding pages; return the verified trailer."""
        for _ in self.pages():
            pass
        assert self.trailer is not None
        return self.trailer


def _read_uvarint(r: Reader, field: str, sink: bytearray | None = None) -> int:
    """Go's binary.Uvarint, bounded to 10 bytes so garbage cannot loop."""
    result = 0
    shift = 0
    for i in range(10):
        raw = r.read_exact(1, field)
        if sink is not None:
            sink += raw
        byte = raw[0]
        if byte < 0x80:
            if i == 9 and byte > 1:
                raise PageIndexError("varint overflows 64 bits", path=r.path, field=field)
            return result | byte << shift
        result |= (byte & 0x7F) << shift
        shift += 7
    raise PageIndexError("varint longer than 10 bytes", path=r.path, field=field)


def encode_uvarint(value: int) -> bytes:
    out = bytearray()
    _append_uvarint(out, value)
    return bytes(out)


def _append_uvarint(out: bytearray, value: int) -> None:
    if value < 0x80:
        out.append(value)
        return
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def append_index_entry(out: bytearray, pgno: int, offset: int, size: int) -> None:
    """Add one page's entry (three varints) to an index being built."""
    _append_uvarint(out, pgno)
    _append_uvarint(out, offset)
    _append_uvarint(out, size)


def finish_index(entries: bytes) -> bytes:
    """The page index as written after the end marker: entries, a 0, and the u64 size."""
    return entries + b"\x00" + _U64.pack(len(entries) + 1)


def parse_index_entries(entries: bytes, path: str | None = None) -> list[IndexEntry]:
    """Entries built with append_index_entry, back as IndexEntry values (error reports)."""
    r = Reader(_BytesSource(entries), path)
    out: list[IndexEntry] = []
    while not r.at_eof():
        out.append(IndexEntry(*(_read_uvarint(r, "page_index") for _ in range(3))))
    return out


def _read_lz4_frame(r: Reader, page_size: int, pgno: int, path: str | None) -> bytes:
    """Decompress exactly one LZ4 frame holding one page; leave the bytes after it unread."""
    d = lz4.frame.LZ4FrameDecompressor()
    parts: list[bytes] = []
    total = 0
    feed_limit = page_size + 64
    try:
        while True:
            if d.needs_input:
                chunk = r.read_some(feed_limit)
                if not chunk:
                    raise TruncatedError(
                        f"page {pgno}: file ends inside its LZ4 frame", path=path, field="page_data"
                    )
            else:
                chunk = b""
            out = d.decompress(chunk, max_length=page_size + 1 - total)
            total += len(out)
            if total > page_size:
                raise PageError(
                    f"page {pgno}: LZ4 frame holds more than {page_size} bytes",
                    path=path,
                    field="page_data",
                )
            parts.append(out)
            if d.eof:
                break
    except LTXError:
        raise
    except Exception as exc:  # lz4 raises RuntimeError for corrupt frames
        raise PageError(
            f"page {pgno}: corrupt LZ4 frame: {exc}", path=path, field="page_data"
        ) from None
    unused = d.unused_data
    if unused:
        r.unread(len(unused))
    if total != page_size:
        raise PageError(
            f"page {pgno}: LZ4 frame holds {total} bytes, want {page_size}",
            path=path,
            field="page_data",
        )
    return b"".join(parts)


class _Lz4Body:
    """The decompressed page block of a v1 file with the CompressLZ4 flag."""

    _OUT_LIMIT = 256 * 1024

    def __init__(self, r: Reader, path: str | None) -> None:
        self._r = r
        self._path = path
        self._d = lz4.frame.LZ4FrameDecompressor()
        self._buf = b""
        self._pos = 0
        if r.peek(4) != LZ4_FRAME_MAGIC:
            raise PageError(
                "CompressLZ4 flag is set but no LZ4 frame follows the header",
                path=path,
                field="page_block",
            )

    def _more(self) -> bytes:
        d = self._d
        if d.eof:
            return b""
        try:
            while True:
                if d.needs_input:
                    chunk = self._r.read_some(_Lz4Body._OUT_LIMIT)
                    if not chunk:
                        raise TruncatedError(
                            "file ends inside the LZ4 page block",
                            path=self._path,
                            field="page_block",
                        )
                else:
                    chunk = b""
                out = d.decompress(chunk, max_length=_Lz4Body._OUT_LIMIT)
                if out or d.eof:
                    return bytes(out)
        except LTXError:
            raise
        except Exception as exc:
            raise PageError(
                f"corrupt LZ4 page block: {exc}", path=self._path, field="page_block"
            ) from None

    def read_exact(self, n: int, field: str) -> bytes:
        while len(self._buf) - self._pos < n:
            more = self._more()
            if not more:
                raise TruncatedError(
                    "LZ4 page block ends before the end marker", path=self._path, field=field
                )
            self._buf = self._buf[self._pos :] + more
            self._pos = 0
        pos = self._pos
        self._pos = pos + n
        return self._buf[pos : pos + n]

    def finish(self) -> None:
        """After the end marker the LZ4 frame must end; then the trailer follows raw."""
        if len(self._buf) > self._pos or self._more():
            raise PageError(
                "data after the end marker inside the LZ4 page block",
                path=self._path,
                field="page_block",
            )
        if not self._d.eof:
            raise PageError("LZ4 page block does not end", path=self._path, field="page_block")
        unused = self._d.unused_data
        if unused:
            self._r.unread(len(unused))


def open_decoder(f: SeekableReadable, *, path: str | None = None) -> Decoder:
    """A decoder for a seekable file, resolving the rare ambiguous generation.

    When the bytes fit more than one generation, each candidate is verified in
    full and the first that checks out wins; if none does, the first
    candidate's error is raised.
    """
    start = f.tell()
    size = f.seek(0, os.SEEK_END) - start
    f.seek(start)
    head = f.read(HEADER_SIZE + 16)
    f.seek(start)
    candidates = detect_versions(head, size)
    if len(candidates) > 1:
        first_error: LTXError | None = None
        for version in candidates:
            try:
                Decoder(f, version=version, path=path).verify()
            except LTXError as exc:
                first_error = first_error or exc
                continue
            finally:
                f.seek(start)
            return Decoder(f, version=version, path=path)
        assert first_error is not None
        raise first_error
    return Decoder(f, version=candidates[0], path=path)


def read_page_index(f: BinaryIO, *, path: str | None = None) -> dict[int, IndexEntry]:
    """The page index of a seekable v2/v3 file, for random access to single pages.

    Only the index is checked here (bounds and order); the file checksum needs
    a full decode.
    """
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size < HEADER_SIZE + 4 + 1 + 8 + TRAILER_SIZE:
        raise TruncatedError(f"file is {size} bytes, too short for an LTX file", path=path)
    f.seek(size - TRAILER_SIZE - 8)
    index_size = _U64.unpack(f.read(8))[0]
    if index_size < 1 or index_size > size - HEADER_SIZE - 4 - 8 - TRAILER_SIZE:
        raise PageIndexError(
            f"index size {index_size} does not fit in a {size}-byte file",
            path=path,
            field="index_size",
        )
    start = size - TRAILER_SIZE - 8 - index_size
    f.seek(start)
    r = Reader(_BytesSource(f.read(index_size)), path)
    entries: dict[int, IndexEntry] = {}
    prev = 0
    while True:
        pgno = _read_uvarint(r, "page_index")
        if pgno == 0:
            break
        entry = IndexEntry(pgno, _read_uvarint(r, "page_index"), _read_uvarint(r, "page_index"))
        if pgno <= prev or entry.offset < HEADER_SIZE or entry.offset + entry.size > start:
            raise PageIndexError(
                f"index entry for page {pgno} is out of order or out of bounds",
                path=path,
                field="page_index",
            )
        entries[pgno] = entry
        prev = pgno
    if not r.at_eof():
        raise PageIndexError("bytes after the index terminator", path=path, field="page_index")
    return entries


def read_page(
    f: BinaryIO,
    header: Header,
    entry: IndexEntry,
    *,
    version: Version = Version.V3,
    path: str | None = None,
) -> bytes:
    """One page's data through its index entry (v2 or v3)."""
    f.seek(entry.offset)
    frame = f.read(entry.size)
    if len(frame) != entry.size:
        raise TruncatedError(f"page {entry.pgno}: frame runs past the end of the file", path=path)
    r = Reader(_BytesSource(frame), path)
    if version is Version.V3:
        pgno, flags = _V3_PAGE_HEADER.unpack(r.read_exact(6, "page_header"))
    else:
        pgno, flags = _U32.unpack(r.read_exact(4, "page_header"))[0], 0
    if pgno != entry.pgno:
        raise PageIndexError(
            f"index says page {entry.pgno} but the frame holds page {pgno}",
            path=path,
            field="page_index",
        )
    page_size = header.page_size
    if version is Version.V3 and flags == PAGE_FLAG_SIZE:
        size = _U32.unpack(r.read_exact(4, "page_size_prefix"))[0]
        if size != entry.size - 10:
            raise PageIndexError(
                f"page {pgno}: compressed size {size} disagrees with the index",
                path=path,
                field="compressed_size",
            )
        block = r.read_exact(size, "page_data")
        try:
            data = lz4.block.decompress(block, uncompressed_size=page_size)
        except Exception as exc:
            raise PageError(f"page {pgno}: corrupt LZ4 block: {exc}", path=path) from None
        if len(data) != page_size:
            raise PageError(
                f"page {pgno}: block holds {len(data)} bytes, want {page_size}", path=path
            )
        return bytes(data)
    if flags != 0:
        raise PageError(f"page {pgno}: invalid flags 0x{flags:04x}", path=path, field="page_flags")
    data = _read_lz4_frame(r, page_size, pgno, path)
    if not r.at_eof():
        raise PageIndexError(f"page {pgno}: frame is shorter than the index says", path=path)
    return data


class _BytesSource:
    """A minimal read()-only stream over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data) - self._pos
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


__all__ = [
    "LZ4_FRAME_MAGIC",
    "PAGE_FLAG_SIZE",
    "Decoder",
    "HeaderError",
    "IndexEntry",
    "Page",
    "detect_versions",
    "encode_uvarint",
    "end_marker_size",
    "lz4_block_bound",
    "open_decoder",
    "read_page",
    "read_page_index",
]
