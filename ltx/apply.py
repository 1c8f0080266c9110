"""Apply LTX files to a raw database image (what `ltx apply` does).

The replica applies through SQLite (sidecar/apply.py); this is the plain file
form used by ltxctl and tests. Nothing is written until the LTX file has been
fully verified and the resulting database checksum predicted, so a bad file or
a file that does not follow from the database leaves it untouched.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from ltx.checksum import CHECKSUM_FLAG, EMPTY_DB_CHECKSUM, checksum_file, lock_pgno, page_checksum
from ltx.decoder import Decoder, open_decoder
from ltx.errors import ChecksumError, LTXError, PositionError
from ltx.header import Header, Trailer

_U16 = struct.Struct(">H")


SQLITE_MAGIC = b"SQLite format 3\x00"


def header_page_size(head: bytes) -> int:
    """The page size field of a SQLite header (u16 at offset 16, 1 means 65536), unchecked."""
    value = _U16.unpack_from(head, 16)[0]
    return 65536 if value == 1 else value


def database_page_size(head: bytes) -> int | None:
    """Page size from a SQLite header; None if the bytes are not a SQLite header."""
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return None
    return header_page_size(head)


def apply_ltx(
    db: BinaryIO, ltx_file: BinaryIO, *, path: str | None = None
) -> tuple[Header, Trailer]:
    """Apply one LTX file (seekable) to a database image opened r+b.

    Checks, before writing: the file verifies; the page sizes agree; for an
    incremental file with checksums, the database's checksum equals the
    pre-apply checksum and the predicted result equals the post-apply
    checksum. A deletion file (commit 0) truncates the image to zero bytes;
    the caller removes the file.
    """
    start = ltx_file.tell()
    version = open_decoder(ltx_file, path=path).version
    ltx_file.seek(start)
    probe = Decoder(ltx_file, version=version, path=path)
    header = probe.header
    page_size = header.page_size
    changed: dict[int, int] = {}
    for pgno, data in probe.pages():
        changed[pgno] = page_checksum(pgno, data)
    trailer = probe.trailer
    assert trailer is not None

    db_size = db.seek(0, os.SEEK_END)
    if db_size and not header.is_snapshot:
        db.seek(0)
        existing = database_page_size(db.read(100))
        if existing is not None and existing != page_size:
            raise LTXError(
                f"database page size {existing} differs from the file's {page_size}",
                path=path,
                field="page_size",
            )
    if not header.no_checksum and not header.is_snapshot:
        old_pages = db_size // page_size
        db.seek(0)
        current = checksum_file(db, page_size, old_pages)
        if current != header.pre_apply_checksum:
            raise PositionError(
                f"database checksum {current:016x} is not the file's pre-apply checksum "
                f"{header.pre_apply_checksum:016x}",
                path=path,
                field="pre_apply_checksum",
            )
        predicted = _predict(db, page_size, old_pages, current, changed, header.commit)
        if predicted != trailer.post_apply_checksum:
            raise ChecksumError(
                f"applying would give checksum {predicted:016x}, the file says "
                f"{trailer.post_apply_checksum:016x}",
                path=path,
                field="post_apply_checksum",
            )

    ltx_file.seek(start)
    for pgno, data in Decoder(ltx_file, version=version, path=path).pages():
        db.seek((pgno - 1) * page_size)
        db.write(data)
    db.truncate(header.commit * page_size)
    db.flush()
    return header, trailer


def _predict(
    db: BinaryIO,
    page_size: int,
    old_pages: int,
    current: int,
    changed: dict[int, int],
    commit: int,
) -> int:
    """The database checksum after replacing `changed` pages and truncating to commit."""
    if commit == 0:
        return EMPTY_DB_CHECKSUM
    lock = lock_pgno(page_size)
    acc = current
    for pgno in range(1, old_pages + 1):
        if pgno == lock or (pgno not in changed and pgno <= commit):
            continue
        db.seek((pgno - 1) * page_size)
        acc ^= page_checksum(pgno, db.read(page_size))
    for value in changed.values():
        acc ^= value
    # Growth past pages the file leaves out: the gap reads back as zero pages.
    zeros = b"\x00" * page_size
    for pgno in range(old_pages + 1, commit + 1):
        if pgno not in changed and pgno != lock:
            acc ^= page_checksum(pgno, zeros)
    return CHECKSUM_FLAG | acc
