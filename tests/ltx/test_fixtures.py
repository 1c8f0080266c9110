"""The library against files written by the reference Go encoders (shared/ltx-fixtures).

Every fact checked here comes from manifest.json, the fixture README or section 7
of docs/ltx-format.md, never from our own encoder.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

import ltx
from tests.helpers import LTX_FIXTURES, ltx_manifest, needs_ltx_fixtures

pytestmark = needs_ltx_fixtures

MANIFEST = ltx_manifest()
ENTRIES: list[dict[str, Any]] = MANIFEST["ltx_files"]
GENERATED = LTX_FIXTURES / "generated"
PATH = "x.ltx"
DB_DIR = GENERATED / "db"
UPSTREAM_DB = LTX_FIXTURES / "upstream" / "litefs-open-and-write-snapshot" / "database"

# Database checksums of the generated images, from the fixture README.
DB_CHECKSUMS = {
    "db-after-txid-1.bin": 0x84AE6EA08DE48234,
    "db-after-txid-2.bin": 0xCF7A2B68D6626B83,
    "db-after-txid-3.bin": 0xF3DA94677EE1946F,
}


def _entry_id(entry: dict[str, Any]) -> str:
    return str(entry["path"])


def _expected_version(path: str) -> ltx.Version:
    """The generation is given by the folder (spec: LTX files do not record it)."""
    parts = path.split("/")
    if parts[0] == "upstream":
        return ltx.Version.V1
    folder = parts[1]
    if folder.startswith("v1-"):
        return ltx.Version.V1
    if folder == "v2":
        return ltx.Version.V2
    if folder.startswith("v3-"):
        return ltx.Version.V3
    raise AssertionError(f"fixture folder {folder!r} has no known generation")


def _hex(value: str) -> int:
    return int(value, 16)


def _decode(path: Path) -> tuple[ltx.Decoder, list[ltx.Page]]:
    with path.open("rb") as f:
        dec = ltx.open_decoder(f, path=path.name)
        pages = list(dec.pages())
    return dec, pages


with_every_fixture = pytest.mark.parametrize("entry", ENTRIES, ids=_entry_id)
with_indexed_fixtures = pytest.mark.parametrize(
    "entry",
    [e for e in ENTRIES if _expected_version(e["path"]) is not ltx.Version.V1],
    ids=_entry_id,
)
with_v3_fixtures = pytest.mark.parametrize(
    "entry",
    [e for e in ENTRIES if _expected_version(e["path"]) is ltx.Version.V3],
    ids=_entry_id,
)
with_tracked_snapshots = pytest.mark.parametrize(
    "entry",
    [
        e
        for e in ENTRIES
        if e["header"]["min_txid"] == 1 and not e["header"]["flags"] & ltx.FLAG_NO_CHECKSUM
    ],
    ids=_entry_id,
)


def test_manifest_lists_all_44_fixture_files() -> None:
    assert len(ENTRIES) == 44
    on_disk = {p.relative_to(LTX_FIXTURES).as_posix() for p in LTX_FIXTURES.rglob("*.ltx")}
    assert on_disk == {e["path"] for e in ENTRIES}


@with_every_fixture
def test_fixture_file_is_the_one_the_manifest_describes(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    assert len(data) == entry["size"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@with_every_fixture
def test_open_decoder_detects_the_generation_of_the_folder(entry: dict[str, Any]) -> None:
    dec, _ = _decode(LTX_FIXTURES / entry["path"])
    assert dec.version is _expected_version(entry["path"])


@with_every_fixture
def test_detection_works_on_an_in_memory_stream_too(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    dec = ltx.open_decoder(io.BytesIO(data))
    assert dec.version is _expected_version(entry["path"])
    dec.verify()


@with_every_fixture
def test_header_fields_equal_the_manifest(entry: dict[str, Any]) -> None:
    dec, _ = _decode(LTX_FIXTURES / entry["path"])
    want = entry["header"]
    h = dec.header
    assert h.flags == want["flags"]
    assert h.page_size == want["page_size"]
    assert h.commit == want["commit"]
    assert h.min_txid == want["min_txid"]
    assert h.max_txid == want["max_txid"]
    assert h.timestamp == want["timestamp_ms"]
    assert h.pre_apply_checksum == _hex(want["pre_apply_checksum"])
    assert h.wal_offset == want["wal_offset"]
    assert h.wal_size == want["wal_size"]
    assert h.wal_salt1 == _hex(want["wal_salt1"])
    assert h.wal_salt2 == _hex(want["wal_salt2"])
    assert h.node_id == _hex(want["node_id"])
    assert h.is_snapshot == (want["min_txid"] == 1)


@with_every_fixture
def test_header_reencodes_to_the_same_100_bytes(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    header = ltx.Header.from_bytes(data)
    assert header.to_bytes() == data[: ltx.HEADER_SIZE]


@with_every_fixture
def test_pages_equal_the_manifest(entry: dict[str, Any]) -> None:
    dec, pages = _decode(LTX_FIXTURES / entry["path"])
    assert [pgno for pgno, _ in pages] == [p["pgno"] for p in entry["pages"]]
    for (pgno, data), want in zip(pages, entry["pages"], strict=True):
        assert len(data) == entry["header"]["page_size"], f"page {pgno}"
        assert hashlib.sha256(data).hexdigest() == want["sha256"], f"page {pgno}"
    assert dec.page_count == len(entry["pages"])


@with_every_fixture
def test_trailer_checksums_equal_the_manifest(entry: dict[str, Any]) -> None:
    dec, _ = _decode(LTX_FIXTURES / entry["path"])
    assert dec.trailer is not None
    assert dec.trailer.post_apply_checksum == _hex(entry["post_apply_checksum"])
    assert dec.trailer.file_checksum == _hex(entry["file_checksum"])


@with_every_fixture
def test_verify_returns_the_trailer_stored_at_the_end(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    trailer = ltx.open_decoder(io.BytesIO(data)).verify()
    assert trailer.to_bytes() == data[-ltx.TRAILER_SIZE :]


@with_tracked_snapshots
def test_snapshot_post_apply_equals_checksum_of_its_pages(entry: dict[str, Any]) -> None:
    _, pages = _decode(LTX_FIXTURES / entry["path"])
    assert ltx.database_checksum(pages) == _hex(entry["post_apply_checksum"])


@with_indexed_fixtures
def test_page_index_gives_the_manifest_frame_offsets_and_sizes(entry: dict[str, Any]) -> None:
    with (LTX_FIXTURES / entry["path"]).open("rb") as f:
        index = ltx.read_page_index(f, path="x.ltx")
    assert list(index) == [p["pgno"] for p in entry["pages"]]
    for want in entry["pages"]:
        got = index[want["pgno"]]
        assert (got.pgno, got.offset, got.size) == (
            want["pgno"],
            want["frame_offset"],
            want["frame_size"],
        )


@with_v3_fixtures
def test_page_flags_in_the_frames_equal_the_manifest(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    for page in entry["pages"]:
        off = page["frame_offset"]
        assert int.from_bytes(data[off : off + 4], "big") == page["pgno"]
        assert int.from_bytes(data[off + 4 : off + 6], "big") == page["page_flags"]


@with_indexed_fixtures
def test_read_page_returns_the_streamed_page(entry: dict[str, Any]) -> None:
    path = LTX_FIXTURES / entry["path"]
    dec, pages = _decode(path)
    streamed = dict(pages)
    with path.open("rb") as f:
        index = ltx.read_page_index(f)
        for pgno, item in index.items():
            data = ltx.read_page(f, dec.header, item, version=dec.version, path=path.name)
            assert data == streamed[pgno], f"page {pgno}"


# -- applying chains to raw database images ---------------------------------------------


def _ltx(folder: str, name: str) -> Path:
    return GENERATED / folder / name


def _txid_file(txid: int, prefix: str = "") -> str:
    return prefix + ltx.format_filename(txid, txid)


def _apply(db: Path, ltx_path: Path) -> tuple[ltx.Header, ltx.Trailer]:
    with db.open("r+b") as dbf, ltx_path.open("rb") as f:
        return ltx.apply_ltx(dbf, f, path=ltx_path.name)


def _db_image(txid: int) -> bytes:
    return (DB_DIR / f"db-after-txid-{txid}.bin").read_bytes()


CHAIN_FOLDERS = ["v1-uncompressed", "v1-lz4", "v2", "v3-frame", "v3-block"]
NOCHECKSUM_FOLDERS = ["v1-nochecksum", "v2", "v3-frame", "v3-block"]


@pytest.mark.parametrize("folder", CHAIN_FOLDERS)
def test_applying_transactions_1_2_3_reproduces_each_database_image(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(b"")
    for txid in (1, 2, 3):
        header, trailer = _apply(db, _ltx(folder, _txid_file(txid)))
        assert db.read_bytes() == _db_image(txid), f"after TXID {txid}"
        assert trailer.post_apply_checksum == DB_CHECKSUMS[f"db-after-txid-{txid}.bin"]
        assert header.max_txid == txid
    deletion = _ltx(folder, _txid_file(4))
    if deletion.exists():
        header, trailer = _apply(db, deletion)
        assert header.commit == 0
        assert trailer.post_apply_checksum == ltx.EMPTY_DB_CHECKSUM
        assert db.stat().st_size == 0


@pytest.mark.parametrize("folder", NOCHECKSUM_FOLDERS)
def test_applying_the_nochecksum_chain_reproduces_each_database_image(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(b"")
    for txid in (1, 2, 3):
        header, trailer = _apply(db, _ltx(folder, _txid_file(txid, "nochecksum-")))
        assert header.flags == ltx.FLAG_NO_CHECKSUM
        assert trailer.post_apply_checksum == 0
        assert db.read_bytes() == _db_image(txid), f"after TXID {txid}"


@pytest.mark.parametrize("folder", CHAIN_FOLDERS)
def test_applying_compacted_1_3_to_an_empty_database_gives_image_3(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(b"")
    _apply(db, _ltx(folder, "compacted-0000000000000001-0000000000000003.ltx"))
    assert db.read_bytes() == _db_image(3)


@pytest.mark.parametrize("folder", CHAIN_FOLDERS)
def test_applying_compacted_1_3_over_a_larger_database_truncates_it(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(_db_image(2))  # 4 pages; the snapshot has 3
    _apply(db, _ltx(folder, "compacted-0000000000000001-0000000000000003.ltx"))
    assert db.read_bytes() == _db_image(3)


@pytest.mark.parametrize("folder", CHAIN_FOLDERS)
def test_applying_compacted_2_3_to_the_database_after_txid_1_gives_image_3(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(_db_image(1))
    header, _ = _apply(db, _ltx(folder, "compacted-0000000000000002-0000000000000003.ltx"))
    assert (header.min_txid, header.max_txid) == (2, 3)
    assert db.read_bytes() == _db_image(3)


@pytest.mark.parametrize("folder", ["v1-uncompressed", "v1-lz4", "v3-frame", "v3-block"])
def test_applying_the_litefs_snapshot_reproduces_the_litefs_database(
    folder: str, tmp_path: Path
) -> None:
    db = tmp_path / "database"
    db.write_bytes(b"")
    _apply(db, _ltx(folder, "litefs-db-snapshot-0000000000000001-000000000000000d.ltx"))
    assert db.read_bytes() == UPSTREAM_DB.read_bytes()


def test_applying_the_upstream_litefs_file_to_its_own_result_is_refused(tmp_path: Path) -> None:
    # The upstream incremental (TXID 13) leads *to* the database beside it, so the
    # database's checksum is its post-apply checksum, not its pre-apply checksum.
    db = tmp_path / "database"
    db.write_bytes(UPSTREAM_DB.read_bytes())
    upstream = LTX_FIXTURES / "upstream/litefs-open-and-write-snapshot"
    with pytest.raises(ltx.PositionError, match="pre_apply_checksum"):
        _apply(db, upstream / "000000000000000d-000000000000000d.ltx")
    assert db.read_bytes() == UPSTREAM_DB.read_bytes()


def test_upstream_litefs_pages_equal_the_database_pages() -> None:
    upstream = LTX_FIXTURES / "upstream/litefs-open-and-write-snapshot"
    _, pages = _decode(upstream / "000000000000000d-000000000000000d.ltx")
    image = UPSTREAM_DB.read_bytes()
    assert [pgno for pgno, _ in pages] == [1, 7, 8]
    for pgno, data in pages:
        assert image[(pgno - 1) * 4096 : pgno * 4096] == data


def test_applying_out_of_order_is_refused_and_leaves_the_database_alone(tmp_path: Path) -> None:
    db = tmp_path / "database"
    db.write_bytes(_db_image(1))
    with pytest.raises(ltx.PositionError) as err:
        _apply(db, _ltx("v3-block", _txid_file(3)))
    assert str(err.value).startswith(_txid_file(3) + ": ")
    assert db.read_bytes() == _db_image(1)


# -- database checksums -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DB_CHECKSUMS))
def test_checksum_file_of_each_database_image_equals_the_readme(name: str) -> None:
    image = DB_DIR / name
    assert (
        hashlib.sha256(image.read_bytes()).hexdigest()
        == (MANIFEST["database_images"][name]["sha256"])
    )
    with image.open("rb") as f:
        assert ltx.checksum_file(f, 512) == DB_CHECKSUMS[name]
    cli = (DB_DIR / "expected-cli" / f"{name}.checksum.txt").read_text().strip()
    assert DB_CHECKSUMS[name] == int(cli, 16)


def test_checksum_file_of_the_litefs_database_equals_the_manifest() -> None:
    images = MANIFEST["database_images"]
    want = _hex(images["../upstream/litefs-open-and-write-snapshot/database"]["ltx_db_checksum"])
    assert want == 0xFE3831A381C602B9
    with UPSTREAM_DB.open("rb") as f:
        assert ltx.checksum_file(f, 4096) == want
    with UPSTREAM_DB.open("rb") as f:
        assert ltx.checksum_file(f, 4096, page_count=10) == want
    image = UPSTREAM_DB.read_bytes()
    pages = ((i // 4096 + 1, image[i : i + 4096]) for i in range(0, len(image), 4096))
    assert ltx.database_checksum(pages) == want


def test_checksum_file_with_a_commit_size_ignores_pages_past_it() -> None:
    image = _db_image(2)  # 4 pages; the first 3 are not image 3, so compare by hand
    assert (
        ltx.checksum_file(io.BytesIO(image), 512, page_count=4)
        == DB_CHECKSUMS["db-after-txid-2.bin"]
    )
    first3 = ltx.database_checksum((i + 1, image[i * 512 : (i + 1) * 512]) for i in range(3))
    assert ltx.checksum_file(io.BytesIO(image), 512, page_count=3) == first3


# Section 7 test vectors: (page size, page contents in order, checksum).
SECTION_7_VECTORS = [
    (512, [b"\x01" * 512, b"\x02" * 512, b"\x03" * 512], 0xEFFFFFFFECD99000),
    (1024, [b"2" * 1024, b"3" * 1024], 0xE1899B6D587AAAAA),
    (512, [b"2" * 512, b"3" * 512], 0x8B87423EEEEEEEEE),
    (1024, [b"\x81" * 1024, b"\x82" * 1024, b"\x83" * 1024], 0x8A249272AD9F7DEA),
    (1024, [b"\x81" * 1024], 0xEB953FC47685D740),
    (512, [b"1" * 512], 0xEB1A999231044DDD),
]


@pytest.mark.parametrize(("page_size", "pages", "want"), SECTION_7_VECTORS)
def test_database_checksum_equals_the_spec_vector(
    page_size: int, pages: list[bytes], want: int
) -> None:
    assert ltx.database_checksum(enumerate(pages, start=1)) == want
    assert ltx.checksum_file(io.BytesIO(b"".join(pages)), page_size) == want


LOCK_VECTOR_PAGE_SIZE = 4096
LOCK_VECTOR_COMMIT = 262155  # lock page + 10


def _lock_vector_pages() -> Iterator[tuple[int, bytes]]:
    """Every page 'x'*4096 except the lock page (zeros); built lazily, never 1 GiB at once."""
    page = b"x" * LOCK_VECTOR_PAGE_SIZE
    zero = bytes(LOCK_VECTOR_PAGE_SIZE)
    lock = ltx.lock_pgno(LOCK_VECTOR_PAGE_SIZE)
    for pgno in range(1, LOCK_VECTOR_COMMIT + 1):
        yield pgno, zero if pgno == lock else page


class _LockVectorImage(io.RawIOBase):
    """A read-only 1 GiB database image of the lock-page vector, generated on demand."""

    def __init__(self) -> None:
        self._pos = 0
        self._size = LOCK_VECTOR_COMMIT * LOCK_VECTOR_PAGE_SIZE
        self._lock_start = (ltx.lock_pgno(LOCK_VECTOR_PAGE_SIZE) - 1) * LOCK_VECTOR_PAGE_SIZE

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1, /) -> bytes:
        end = self._size if n < 0 else min(self._size, self._pos + n)
        out = bytearray(b"x" * (end - self._pos))
        lo = max(self._pos, self._lock_start)
        hi = min(end, self._lock_start + LOCK_VECTOR_PAGE_SIZE)
        if lo < hi:
            out[lo - self._pos : hi - self._pos] = bytes(hi - lo)
        self._pos = end
        return bytes(out)


def test_lock_page_number_matches_the_spec() -> None:
    assert ltx.lock_pgno(512) == 2097153
    assert ltx.lock_pgno(4096) == 262145
    assert ltx.lock_pgno(65536) == 16385
    assert ltx.lock_pgno(4096) + 10 == LOCK_VECTOR_COMMIT


def test_database_checksum_skips_the_lock_page_spec_vector() -> None:
    assert ltx.database_checksum(_lock_vector_pages()) == 0xC19B668C376662C7


def test_the_lock_page_vector_differs_when_the_lock_page_is_included() -> None:
    lock = ltx.lock_pgno(LOCK_VECTOR_PAGE_SIZE)
    without = ltx.database_checksum(_lock_vector_pages())
    lock_page = ltx.page_checksum(lock, bytes(LOCK_VECTOR_PAGE_SIZE))
    assert ltx.CHECKSUM_FLAG | (without ^ lock_page) == 0xACACFFACD92FC33C


def test_checksum_file_skips_the_lock_page_spec_vector() -> None:
    image = cast(BinaryIO, _LockVectorImage())
    assert ltx.checksum_file(image, LOCK_VECTOR_PAGE_SIZE) == 0xC19B668C376662C7


def test_empty_database_checksum_is_the_flag_alone() -> None:
    assert ltx.EMPTY_DB_CHECKSUM == ltx.CHECKSUM_FLAG == 0x8000000000000000
    assert ltx.database_checksum([]) == ltx.EMPTY_DB_CHECKSUM
    assert ltx.checksum_file(io.BytesIO(b""), 4096) == ltx.EMPTY_DB_CHECKSUM


def test_crc64_go_iso_check_value() -> None:
    assert ltx.crc64(b"123456789") == 0xB90956C775A41001


def test_crc64_continues_from_a_previous_value() -> None:
    assert ltx.crc64(b"56789", ltx.crc64(b"1234")) == 0xB90956C775A41001
    assert ltx.crc64(b"") == 0


def test_page_checksum_is_crc_of_pgno_then_data_with_the_flag() -> None:
    data = b"1" * 512
    assert ltx.page_checksum(1, data) == ltx.CHECKSUM_FLAG | ltx.crc64(b"\x00\x00\x00\x01" + data)
    assert ltx.page_checksum(1, data) == 0xEB1A999231044DDD


@with_every_fixture
def test_decoding_as_another_generation_fails_with_an_ltx_error(entry: dict[str, Any]) -> None:
    data = (LTX_FIXTURES / entry["path"]).read_bytes()
    right = _expected_version(entry["path"])
    for version in ltx.Version:
        if version is right:
            continue
        with pytest.raises(ltx.LTXError):
            ltx.Decoder(io.BytesIO(data), version=version).verify()


def _incremental_after_txid_1(post: int, page_size: int = 512) -> bytes:
    """TXID 2 rewritten by our encoder with a chosen post-apply checksum."""
    _, pages = _decode(_ltx("v3-block", _txid_file(2)))
    header = ltx.Header(
        page_size=page_size,
        commit=4,
        min_txid=2,
        max_txid=2,
        pre_apply_checksum=DB_CHECKSUMS["db-after-txid-1.bin"],
    )
    buf = io.BytesIO()
    enc = ltx.Encoder(buf, header)
    for pgno, data in pages:
        enc.write_page(pgno, data * (page_size // 512))
    enc.finish(post)
    return buf.getvalue()


def test_our_rewrite_of_txid_2_applies_like_the_reference_file() -> None:
    db = io.BytesIO(_db_image(1))
    ltx.apply_ltx(db, io.BytesIO(_incremental_after_txid_1(DB_CHECKSUMS["db-after-txid-2.bin"])))
    assert db.getvalue() == _db_image(2)


def test_applying_a_file_whose_post_apply_checksum_is_wrong_is_refused_before_writing() -> None:
    db = io.BytesIO(_db_image(1))
    with pytest.raises(ltx.ChecksumError) as err:
        ltx.apply_ltx(db, io.BytesIO(_incremental_after_txid_1(ltx.CHECKSUM_FLAG | 1)), path=PATH)
    assert str(err.value).startswith(f"{PATH}: post_apply_checksum: ")
    assert db.getvalue() == _db_image(1)


def test_applying_a_file_with_another_page_size_is_refused_before_writing() -> None:
    db = io.BytesIO(_db_image(1))  # a SQLite header saying 512-byte pages
    data = _incremental_after_txid_1(ltx.CHECKSUM_FLAG | 1, page_size=1024)
    with pytest.raises(ltx.LTXError) as err:
        ltx.apply_ltx(db, io.BytesIO(data), path=PATH)
    assert err.value.field == "page_size"
    assert db.getvalue() == _db_image(1)
