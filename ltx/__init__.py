"""ltx: the LTX file format used by LiteFS and Litestream.

A pure library: it takes bytes or binary streams and returns values. See
docs in the README and ../shared/docs/ltx-format.md for the format itself.
"""

from ltx.apply import SQLITE_MAGIC, apply_ltx, database_page_size, header_page_size
from ltx.checksum import (
    CHECKSUM_FLAG,
    EMPTY_DB_CHECKSUM,
    PageChecksums,
    checksum_file,
    crc64,
    database_checksum,
    lock_pgno,
    page_checksum,
)
from ltx.compactor import compact
from ltx.decoder import (
    Decoder,
    IndexEntry,
    Page,
    detect_versions,
    open_decoder,
    read_page,
    read_page_index,
)
from ltx.encoder import Encoder
from ltx.errors import (
    ChecksumError,
    HeaderError,
    LTXError,
    PageError,
    PageIndexError,
    PositionError,
    TrailerError,
    TruncatedError,
)
from ltx.header import (
    FLAG_COMPRESS_LZ4,
    FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    Pos,
    Trailer,
    Version,
    format_filename,
    format_txid,
    parse_filename,
    parse_txid,
)

__all__ = [
    "CHECKSUM_FLAG",
    "EMPTY_DB_CHECKSUM",
    "FLAG_COMPRESS_LZ4",
    "FLAG_NO_CHECKSUM",
    "HEADER_SIZE",
    "SQLITE_MAGIC",
    "TRAILER_SIZE",
    "ChecksumError",
    "Decoder",
    "Encoder",
    "Header",
    "HeaderError",
    "IndexEntry",
    "LTXError",
    "Page",
    "PageChecksums",
    "PageError",
    "PageIndexError",
    "Pos",
    "PositionError",
    "Trailer",
    "TrailerError",
    "TruncatedError",
    "Version",
    "apply_ltx",
    "checksum_file",
    "compact",
    "crc64",
    "database_checksum",
    "database_page_size",
    "detect_versions",
    "format_filename",
    "format_txid",
    "header_page_size",
    "lock_pgno",
    "open_decoder",
    "page_checksum",
    "parse_filename",
    "parse_txid",
    "read_page",
    "read_page_index",
]
