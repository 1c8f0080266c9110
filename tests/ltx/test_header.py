"""TXIDs, checksums, positions and file names as text (spec section 1.3), and the header
and trailer as bytes (sections 2 and 4.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ltx
from ltx.header import format_checksum, parse_checksum

U64 = 2**64 - 1


@settings(max_examples=100, deadline=None)
@given(txid=st.integers(0, U64))
def test_txid_text_round_trips_as_16_lowercase_hex_digits(txid: int) -> None:
    text = ltx.format_txid(txid)
    assert len(text) == 16
    assert text == text.lower()
    assert ltx.parse_txid(text) == txid
    assert ltx.parse_txid(text.upper()) == txid  # Go's ParseUint takes uppercase too
    assert parse_checksum(format_checksum(txid)) == txid


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "000000000000001",  # 15 digits
        "00000000000000001",  # 17 digits
        "000000000000000g",
        "-000000000000001",  # int() would take a sign
        "+000000000000001",
        "0x00000000000001",  # int(_, 16) would take a 0x prefix
        "0000_0000_000001",  # int() would take underscores
        " 000000000000001",  # int() would take surrounding whitespace
        "000000000000001\n",
        "00000000000000\u0661\u0662",  # int() would take Arabic-Indic digits
    ],
)
def test_parse_txid_takes_exactly_16_hex_digits(text: str) -> None:
    with pytest.raises(ltx.LTXError) as err:
        ltx.parse_txid(text)
    assert err.value.field == "txid"
    with pytest.raises(ltx.LTXError):
        parse_checksum(text)


@settings(max_examples=100, deadline=None)
@given(txid=st.integers(0, U64), checksum=st.integers(0, U64))
def test_position_text_round_trips(txid: int, checksum: int) -> None:
    pos = ltx.Pos(txid, checksum)
    text = str(pos)
    assert len(text) == 33 and text[16] == "/"
    assert ltx.Pos.parse(text) == pos
    assert ltx.Pos.parse(text + "\n") == pos  # the LiteFS -pos file ends with a newline


@pytest.mark.parametrize(
    "text",
    [
        "0000000000000001-0000000000000002",
        "0000000000000001/000000000000002",
        "-000000000000001/0000000000000002",
        "0000000000000001/-000000000000002",
        "0x00000000000001/0000000000000002",
    ],
)
def test_parse_position_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ltx.LTXError):
        ltx.Pos.parse(text)


@settings(max_examples=100, deadline=None)
@given(min_txid=st.integers(0, U64), max_txid=st.integers(0, U64))
def test_file_name_round_trips(min_txid: int, max_txid: int) -> None:
    name = ltx.format_filename(min_txid, max_txid)
    assert name == f"{min_txid:016x}-{max_txid:016x}.ltx"
    assert ltx.parse_filename(name) == (min_txid, max_txid)


@pytest.mark.parametrize(
    "name",
    [
        "000000000000000A-000000000000000b.ltx",  # the regex is lowercase only
        "0000000000000001-0000000000000002.LTX",
        "0000000000000001-0000000000000002.ltx.tmp",
        "x0000000000000001-0000000000000002.ltx",
        "0000000000000001-0000000000000002.ltx\n",  # Python's $ matches before a final \n
        "000000000000001-0000000000000002.ltx",
    ],
)
def test_parse_filename_rejects_other_names(name: str) -> None:
    with pytest.raises(ltx.LTXError) as err:
        ltx.parse_filename(name)
    assert err.value.field == "filename"


def test_header_bytes_follow_the_spec_layout() -> None:
    header = ltx.Header(
        page_size=4096,
        commit=10,
        min_txid=2,
        max_txid=3,
        flags=ltx.FLAG_NO_CHECKSUM,
        timestamp=-1,
        pre_apply_checksum=0,
        wal_offset=32,
        wal_size=4120,
        wal_salt1=0x11223344,
        wal_salt2=0x55667788,
        node_id=0x0123456789ABCDEF,
    )
    raw = header.to_bytes()
    assert len(raw) == ltx.HEADER_SIZE == 100
    assert raw[0:4] == b"LTX1"
    assert raw[4:8] == b"\x00\x00\x00\x02"
    assert raw[8:12] == (4096).to_bytes(4, "big")
    assert raw[12:16] == (10).to_bytes(4, "big")
    assert raw[16:24] == (2).to_bytes(8, "big")
    assert raw[24:32] == (3).to_bytes(8, "big")
    assert raw[32:40] == b"\xff" * 8  # signed milliseconds
    assert raw[40:48] == bytes(8)
    assert raw[48:56] == (32).to_bytes(8, "big")
    assert raw[56:64] == (4120).to_bytes(8, "big")
    assert raw[64:72] == bytes.fromhex("1122334455667788")
    assert raw[72:80] == bytes.fromhex("0123456789abcdef")
    assert raw[80:100] == bytes(20)
    assert ltx.Header.from_bytes(raw) == header


def test_reserved_header_bytes_are_not_checked_on_read() -> None:
    raw = ltx.Header(page_size=512, commit=1, min_txid=1, max_txid=1).to_bytes()
    assert ltx.Header.from_bytes(raw[:80] + b"\xaa" * 20) == ltx.Header.from_bytes(raw)


def test_header_from_bytes_checks_the_magic_and_the_length() -> None:
    raw = ltx.Header(page_size=512, commit=1, min_txid=1, max_txid=1).to_bytes()
    with pytest.raises(ltx.HeaderError) as err:
        ltx.Header.from_bytes(b"LTX4" + raw[4:], path="x.ltx")
    assert str(err.value).startswith("x.ltx: magic: ")
    with pytest.raises(ltx.HeaderError) as err:
        ltx.Header.from_bytes(raw[:99], path="x.ltx")
    assert str(err.value).startswith("x.ltx: header: ")


def test_trailer_bytes_are_post_apply_then_file_checksum() -> None:
    trailer = ltx.Trailer(0x8000000000000001, 0x8000000000000002)
    raw = trailer.to_bytes()
    assert raw == bytes.fromhex("8000000000000001" + "8000000000000002")
    assert ltx.Trailer.from_bytes(raw) == trailer


@pytest.mark.parametrize(
    ("version", "allowed"),
    [
        (ltx.Version.V1, {0, 1, 2, 3}),
        (ltx.Version.V2, {0, 2}),
        (ltx.Version.V3, {0, 2}),
    ],
)
def test_header_flags_allowed_per_generation(version: ltx.Version, allowed: set[int]) -> None:
    for flags in range(16):
        header = ltx.Header(page_size=512, commit=1, min_txid=1, max_txid=1, flags=flags)
        if flags in allowed:
            header.validate(version)
        else:
            with pytest.raises(ltx.HeaderError, match="flags"):
                header.validate(version)


def test_header_validation_allows_what_the_reference_allows() -> None:
    base = ltx.Header(page_size=512, commit=0, min_txid=1, max_txid=1)
    base.validate()  # commit 0, timestamp 0: fine
    base.with_(timestamp=-5).validate()  # timestamps are not validated
    base.with_(wal_offset=32).validate()  # WAL size 0 with an offset: allowed since v0.3.15
    base.with_(wal_offset=32, wal_salt1=1).validate()
    for size in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        base.with_(page_size=size).validate()
