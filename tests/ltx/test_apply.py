"""apply_ltx on raw images: gaps, sequence checks, and nothing written on failure."""

from __future__ import annotations

import io

import pytest

import ltx
from ltx import Encoder, Header, LTXError


def _file(header: Header, pages: dict[int, bytes], post: int | None) -> bytes:
    out = io.BytesIO()
    encoder = Encoder(out, header)
    for pgno in sorted(pages):
        encoder.write_page(pgno, pages[pgno])
    encoder.finish(post)
    return out.getvalue()


def _snapshot(pages: list[bytes]) -> bytes:
    header = Header(page_size=512, commit=len(pages), min_txid=1, max_txid=1)
    return _file(header, dict(enumerate(pages, start=1)), None)


def test_growth_that_skips_pages_counts_the_zero_filled_gap() -> None:
    """A file growing the database past pages it leaves out gives zero pages there."""
    base = [bytes([i]) * 512 for i in (1, 2, 3)]
    db = io.BytesIO()
    ltx.apply_ltx(db, io.BytesIO(_snapshot(base)))
    pre = ltx.checksum_file(io.BytesIO(db.getvalue()), 512)
    page5 = b"\x05" * 512
    expected_image = b"".join(base) + b"\x00" * 512 + page5
    post = ltx.checksum_file(io.BytesIO(expected_image), 512)
    header = Header(page_size=512, commit=5, min_txid=2, max_txid=2, pre_apply_checksum=pre)
    ltx.apply_ltx(db, io.BytesIO(_file(header, {5: page5}, post)))
    assert db.getvalue() == expected_image


def test_file_out_of_sequence_leaves_database_untouched() -> None:
    db = io.BytesIO()
    ltx.apply_ltx(db, io.BytesIO(_snapshot([b"\x01" * 512])))
    before = db.getvalue()
    header = Header(
        page_size=512, commit=1, min_txid=2, max_txid=2, pre_apply_checksum=ltx.CHECKSUM_FLAG | 7
    )
    with pytest.raises(ltx.PositionError):
        ltx.apply_ltx(db, io.BytesIO(_file(header, {1: b"\x02" * 512}, ltx.CHECKSUM_FLAG | 9)))
    assert db.getvalue() == before


def test_wrong_post_apply_checksum_is_caught_before_writing() -> None:
    db = io.BytesIO()
    ltx.apply_ltx(db, io.BytesIO(_snapshot([b"\x01" * 512])))
    before = db.getvalue()
    pre = ltx.checksum_file(io.BytesIO(before), 512)
    header = Header(page_size=512, commit=1, min_txid=2, max_txid=2, pre_apply_checksum=pre)
    bad = _file(header, {1: b"\x02" * 512}, ltx.CHECKSUM_FLAG | 9)
    with pytest.raises(ltx.ChecksumError):
        ltx.apply_ltx(db, io.BytesIO(bad))
    assert db.getvalue() == before


def test_page_size_mismatch_is_rejected() -> None:
    image = bytearray(b"SQLite format 3\x00" + b"\x00" * 496)
    image[16:18] = (1024).to_bytes(2, "big")
    db = io.BytesIO(bytes(image) + b"\x00" * 512)
    pre = ltx.checksum_file(io.BytesIO(db.getvalue()), 512)
    header = Header(page_size=512, commit=2, min_txid=2, max_txid=2, pre_apply_checksum=pre)
    with pytest.raises(LTXError) as err:
        ltx.apply_ltx(db, io.BytesIO(_file(header, {2: b"\x02" * 512}, ltx.CHECKSUM_FLAG | 1)))
    assert err.value.field == "page_size"
