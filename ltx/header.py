"""The LTX header and trailer, positions, TXIDs and file names.

All integers are big-endian. The format version is not stored in the file:
callers say which generation they write, and decoders detect it (see decoder).
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, replace

from ltx.checksum import CHECKSUM_FLAG, EMPTY_DB_CHECKSUM
from ltx.errors import HeaderError, LTXError, TrailerError

MAGIC = b"LTX1"
HEADER_SIZE = 100
TRAILER_SIZE = 16

FLAG_COMPRESS_LZ4 = 0x1  # v1 only: the whole page block is one LZ4 frame
FLAG_NO_CHECKSUM = 0x2  # database checksums are not tracked

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
MAX_TXID = (1 << 64) - 1

_HEADER = struct.Struct(">4sIIIQQqQqqIIQ20x")
_TRAILER = struct.Struct(">QQ")


class Version(enum.IntEnum):
    """On-disk generations, named after the reference library's ltx.Version."""

    V1 = 1  # 4-byte page header + raw page (optionally one LZ4 frame around the body)
    V2 = 2  # 4-byte page header + one LZ4 frame per page, page index
    V3 = 3  # 6-byte page header + LZ4 frame (flags 0) or size-prefixed LZ4 block (flags 1)


ALLOWED_FLAGS = {
    Version.V1: FLAG_COMPRESS_LZ4 | FLAG_NO_CHECKSUM,
    Version.V2: FLAG_NO_CHECKSUM,
    Version.V3: FLAG_NO_CHECKSUM,
}


def is_valid_page_size(page_size: int) -> bool:
    return MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE and page_size & (page_size - 1) == 0


def _is_valid_checksum(value: int) -> bool:
    return value & CHECKSUM_FLAG != 0


@dataclass(frozen=True, slots=True)
class Header:
    """The 100-byte LTX header. Reserved bytes are written as zeros."""

    page_size: int
    commit: int
    min_txid: int
    max_txid: int
    flags: int = 0
    timestamp: int = 0  # milliseconds since the Unix epoch
    pre_apply_checksum: int = 0
    wal_offset: int = 0
    wal_size: int = 0
    wal_salt1: int = 0
    wal_salt2: int = 0
    node_id: int = 0

    @property
    def is_snapshot(self) -> bool:
        return self.min_txid == 1

    @property
    def no_checksum(self) -> bool:
        return bool(self.flags & FLAG_NO_CHECKSUM)

    @property
    def pre_apply_pos(self) -> Pos:
        return Pos(self.min_txid - 1, self.pre_apply_checksum)

    def to_bytes(self) -> bytes:
        try:
            return _HEADER.pack(
                MAGIC,
                self.flags,
                self.page_size,
                self.commit,
                self.min_txid,
                self.max_txid,
                self.timestamp,
                self.pre_apply_checksum,
                self.wal_offset,
                self.wal_size,
                self.wal_salt1,
                self.wal_salt2,
                self.node_id,
            )
        except struct.error as exc:
            raise HeaderError(f"field out of range: {exc}") from None

    @classmethod
    def from_bytes(cls, data: bytes, *, path: str | None = None) -> Header:
        """Parse (not validate) a header; the magic is the one check made here."""
        if len(data) < HEADER_SIZE:
            raise HeaderError(
                f"file is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header",
                path=path,
                field="header",
            )
        fields = _HEADER.unpack_from(data)
        if fields[0] != MAGIC:
            raise HeaderError(
                f"invalid magic {fields[0]!r}, expected {MAGIC!r}: not an LTX file",
                path=path,
                field="magic",
            )
        return cls(
            flags=fields[1],
            page_size=fields[2],
            commit=fields[3],
            min_txid=fields[4],
            max_txid=fields[5],
            timestamp=fields[6],
            pre_apply_checksum=fields[7],
            wal_offset=fields[8],
            wal_size=fields[9],
            wal_salt1=fields[10],
            wal_salt2=fields[11],
            node_id=fields[12],
        )

    def validate(self, version: Version = Version.V3, *, path: str | None = None) -> None:
        """Check every rule the reference applies, raising HeaderError naming the field."""

        def fail(field: str, message: str) -> HeaderError:
            return HeaderError(message, path=path, field=field)

        if self.flags & ~ALLOWED_FLAGS[version]:
            raise fail("flags", f"invalid flags 0x{self.flags:08x} for format v{int(version)}")
        if not is_valid_page_size(self.page_size):
            raise fail("page_size", f"invalid page size {self.page_size}")
        if self.min_txid < 1:
            raise fail("min_txid", "minimum TXID must be at least 1")
        if self.max_txid < self.min_txid:
            raise fail(
                "max_txid",
                f"maximum TXID {self.max_txid} is less than minimum TXID {self.min_txid}",
            )
        if self.wal_offset < 0:
            raise fail("wal_offset", f"WAL offset {self.wal_offset} is negative")
        if self.wal_size < 0:
            raise fail("wal_size", f"WAL size {self.wal_size} is negative")
        if self.wal_offset == 0 and self.wal_size != 0:
            raise fail("wal_size", "WAL size is set but WAL offset is zero")
        if (self.wal_salt1 or self.wal_salt2) and self.wal_offset == 0:
            raise fail("wal_salt", "WAL salts are set but WAL offset is zero")
        if self.is_snapshot or self.no_checksum:
            if self.pre_apply_checksum != 0:
                what = "snapshot" if self.is_snapshot else "no-checksum file"
                raise fail("pre_apply_checksum", f"pre-apply checksum must be zero for a {what}")
        elif not _is_valid_checksum(self.pre_apply_checksum):
            raise fail(
                "pre_apply_checksum",
                f"invalid pre-apply checksum {self.pre_apply_checksum:016x}: flag bit not set",
            )

    def with_(self, **changes: int) -> Header:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Trailer:
    post_apply_checksum: int
    file_checksum: int

    def to_bytes(self) -> bytes:
        return _TRAILER.pack(self.post_apply_checksum, self.file_checksum)

    @classmethod
    def from_bytes(cls, data: bytes) -> Trailer:
        post, file_checksum = _TRAILER.unpack_from(data)
        return cls(post, file_checksum)

    def validate(self, header: Header, *, path: str | None = None) -> None:
        if header.no_checksum:
            if self.post_apply_checksum != 0:
                raise TrailerError(
                    "post-apply checksum must be zero for a no-checksum file",
                    path=path,
                    field="post_apply_checksum",
                )
        elif not _is_valid_checksum(self.post_apply_checksum):
            raise TrailerError(
                f"invalid post-apply checksum {self.post_apply_checksum:016x}: flag bit not set",
                path=path,
                field="post_apply_checksum",
            )
        elif header.commit == 0 and self.post_apply_checksum != EMPTY_DB_CHECKSUM:
            raise TrailerError(
                f"post-apply checksum of a deletion file must be {EMPTY_DB_CHECKSUM:016x}, "
                f"got {self.post_apply_checksum:016x}",
                path=path,
                field="post_apply_checksum",
            )
        if not _is_valid_checksum(self.file_checksum):
            raise TrailerError(
                f"invalid file checksum {self.file_checksum:016x}: flag bit not set",
                path=path,
                field="file_checksum",
            )


def format_txid(txid: int) -> str:
    return f"{txid:016x}"


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_txid(text: str) -> int:
    if len(text) != 16:
        raise LTXError(f"invalid TXID {text!r}: want 16 hex digits", field="txid")
    # Only hex digits, as Go's ParseUint(s, 16, 64): int() also takes a sign, a 0x
    # prefix, underscores, surrounding whitespace and non-ASCII digits.
    if not _HEX_DIGITS.issuperset(text):
        raise LTXError(f"invalid TXID {text!r}: not hexadecimal", field="txid")
    return int(text, 16)


def format_checksum(value: int) -> str:
    return f"{value:016x}"


parse_checksum = parse_txid


@dataclass(frozen=True, slots=True, order=True)
class Pos:
    """A database position: the TXID and the database checksum after it."""

    txid: int
    post_apply_checksum: int

    def __str__(self) -> str:
        return f"{self.txid:016x}/{self.post_apply_checksum:016x}"

    @classmethod
    def parse(cls, text: str) -> Pos:
        text = text.strip()
        if len(text) != 33 or text[16] != "/":
            raise LTXError(f"invalid position {text!r}: want <txid16>/<checksum16>", field="pos")
        return cls(parse_txid(text[:16]), parse_txid(text[17:]))


_FILENAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")


def format_filename(min_txid: int, max_txid: int) -> str:
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int]:
    """(min_txid, max_txid) from a file name such as 0000000000000001-0000000000000003.ltx."""
    match = _FILENAME.fullmatch(name)  # match() would let "$" accept a trailing newline
    if match is None:
        raise LTXError(f"invalid LTX file name {name!r}", field="filename")
    return int(match.group(1), 16), int(match.group(2), 16)
