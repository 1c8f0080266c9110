"""Encode then decode: whatever the encoder accepts, the decoder gives back unchanged.

Also the database checksum's algebra and every way the encoder can be misused.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltx
import ltx.decoder
import ltx.encoder

U32 = 2**32 - 1
U64 = 2**64 - 1
I64_MAX = 2**63 - 1
PAGE_SIZES = [512 << i for i in range(8)]  # 512 .. 65536
LZ4_MAGIC = b"\x04\x22\x4d\x18"

# (version, extra header flags) for each way we write files.
WRITERS = {
    "v3": (ltx.Version.V3, 0),
    "v1": (ltx.Version.V1, 0),
    "v1-lz4": (ltx.Version.V1, ltx.FLAG_COMPRESS_LZ4),
}

ROUNDTRIP_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies ---------------------------------------------------------------------------

# Mostly small pages (fast), sometimes any valid size up to 64 KiB.
page_sizes = st.one_of(
    st.sampled_from([512, 512, 1024]),
    st.sampled_from(PAGE_SIZES),
)


@st.composite
def page_contents(draw: st.DrawFn, page_size: int) -> bytes:
    """Compressible and incompressible pages, and pages that start like other generations'
    page frames (so a v1 file's body looks like v2 or v3 to the detector)."""
    kind = draw(st.sampled_from(["zeros", "fill", "random", "text", "lookalike"]))
    rng = random.Random(draw(st.integers(0, U32)))
    if kind == "zeros":
        return bytes(page_size)
    if kind == "fill":
        return bytes([rng.randrange(256)]) * page_size
    if kind == "random":
        return rng.randbytes(page_size)
    if kind == "text":
        words = [b"ltx", b"page", b"sqlite", b"commit", b" ", b"\n"]
        out = bytearray()
        while len(out) < page_size:
            out += rng.choice(words)
        return bytes(out[:page_size])
    prefix = draw(st.sampled_from([b"\x00\x01", b"\x00\x00" + LZ4_MAGIC, LZ4_MAGIC, bytes(6)]))
    return prefix + rng.randbytes(page_size - len(prefix))


@dataclass(frozen=True)
class Case:
    """One file to write: header, pages, and what to pass to finish()."""

    version: ltx.Version
    header: ltx.Header
    pages: list[tuple[int, bytes]]
    post_apply: int | None

    def expected_post_apply(self) -> int:
        h = self.header
        if h.no_checksum:
            return 0
        if h.commit == 0:
            return ltx.EMPTY_DB_CHECKSUM
        if h.is_snapshot:
            return ltx.database_checksum(self.pages)
        assert self.post_apply is not None
        return self.post_apply


@st.composite
def cases(draw: st.DrawFn, writer: str) -> Case:
    version, extra_flags = WRITERS[writer]
    page_size = draw(page_sizes)
    lock = ltx.lock_pgno(page_size)
    snapshot = draw(st.booleans())
    no_checksum = draw(st.booleans())
    flags = extra_flags | (ltx.FLAG_NO_CHECKSUM if no_checksum else 0)

    if snapshot:
        min_txid = 1
        commit = draw(st.integers(0, 5))
        pgnos = list(range(1, commit + 1))
    else:
        min_txid = draw(st.integers(2, U64))
        commit = draw(
            st.one_of(
                st.integers(0, 12),
                st.integers(0, U32),
                st.sampled_from([lock - 1, lock, lock + 1]),
            )
        )
        if commit == 0:
            pgnos = []
        else:
            chosen = draw(
                st.sets(
                    st.one_of(st.integers(1, commit), st.sampled_from([1, commit])),
                    max_size=min(commit, 5),
                )
            )
            pgnos = sorted(chosen - {lock})
    max_txid = draw(st.integers(min_txid, U64))

    wal_offset = draw(st.one_of(st.just(0), st.integers(1, I64_MAX)))
    if wal_offset:
        wal_size = draw(st.integers(0, I64_MAX))
        salt1, salt2 = draw(st.integers(0, U32)), draw(st.integers(0, U32))
    else:
        wal_size = salt1 = salt2 = 0

    if snapshot or no_checksum:
        pre_apply = 0
    else:
        pre_apply = ltx.CHECKSUM_FLAG | draw(st.integers(0, I64_MAX))

    header = ltx.Header(
        page_size=page_size,
        commit=commit,
        min_txid=min_txid,
        max_txid=max_txid,
        flags=flags,
        timestamp=draw(st.integers(-(2**63), I64_MAX)),
        pre_apply_checksum=pre_apply,
        wal_offset=wal_offset,
        wal_size=wal_size,
        wal_salt1=salt1,
        wal_salt2=salt2,
        node_id=draw(st.integers(0, U64)),
    )
    pages = [(pgno, draw(page_contents(page_size))) for pgno in pgnos]

    post_apply: int | None
    if no_checksum:
        post_apply = draw(st.sampled_from([None, 0]))
    elif commit == 0:
        post_apply = draw(st.sampled_from([None, ltx.EMPTY_DB_CHECKSUM]))
    elif snapshot:
        post_apply = draw(st.sampled_from([None, ltx.database_checksum(pages)]))
    else:
        post_apply = ltx.CHECKSUM_FLAG | draw(st.integers(0, I64_MAX))
    return Case(version, header, pages, post_apply)


def encode(case: Case) -> tuple[bytes, ltx.Trailer]:
    buf = io.BytesIO()
    enc = ltx.Encoder(buf, case.header, version=case.version)
    for pgno, data in case.pages:
        enc.write_page(pgno, data)
    assert enc.page_count == len(case.pages)
    trailer = enc.finish(case.post_apply)
    return buf.getvalue(), trailer


def assert_decodes_to(data: bytes, case: Case, trailer: ltx.Trailer) -> None:
    dec = ltx.open_decoder(io.BytesIO(data), path="rt.ltx")
    assert dec.version is case.version
    assert dec.header == case.header
    assert list(dec.pages()) == case.pages
    assert dec.trailer == trailer
    assert dec.page_count == len(case.pages)
    assert trailer.post_apply_checksum == case.expected_post_apply()
    assert data[-ltx.TRAILER_SIZE :] == trailer.to_bytes()
    assert data[: ltx.HEADER_SIZE] == case.header.to_bytes()


# -- round trips --------------------------------------------------------------------------


@ROUNDTRIP_SETTINGS
@given(case=cases("v3"))
def test_v3_encode_then_decode_gives_back_header_pages_and_trailer(case: Case) -> None:
    data, trailer = encode(case)
    assert_decodes_to(data, case, trailer)


@ROUNDTRIP_SETTINGS
@given(case=cases("v1"))
def test_v1_encode_then_decode_gives_back_header_pages_and_trailer(case: Case) -> None:
    data, trailer = encode(case)
    # An uncompressed v1 file's size is fixed by its page count (spec section 16).
    page_size = case.header.page_size
    assert len(data) == ltx.HEADER_SIZE + len(case.pages) * (4 + page_size) + 4 + 16
    assert_decodes_to(data, case, trailer)


@ROUNDTRIP_SETTINGS
@given(case=cases("v1-lz4"))
def test_v1_lz4_encode_then_decode_gives_back_header_pages_and_trailer(case: Case) -> None:
    data, trailer = encode(case)
    assert data[ltx.HEADER_SIZE : ltx.HEADER_SIZE + 7] == LZ4_MAGIC + b"\x64\x40\xa7"
    assert_decodes_to(data, case, trailer)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases("v3"))
def test_v3_page_index_gives_random_access_to_every_page(case: Case) -> None:
    data, _ = encode(case)
    f = io.BytesIO(data)
    index = ltx.read_page_index(f)
    assert list(index) == [pgno for pgno, _ in case.pages]
    offset = ltx.HEADER_SIZE
    for pgno, page in case.pages:
        entry = index[pgno]
        assert entry.offset == offset
        offset += entry.size
        assert ltx.read_page(f, case.header, entry) == page
    # Then the 6-byte end marker, the index and its u64 size, the trailer.
    assert data[offset : offset + 6] == bytes(6)


@settings(max_examples=40, deadline=None)
@given(case=cases("v3"), writer=st.sampled_from(["v1", "v3"]))
def test_decoder_given_the_version_reads_the_same_as_detection(case: Case, writer: str) -> None:
    case = Case(WRITERS[writer][0], case.header, case.pages, case.post_apply)
    data, trailer = encode(case)
    dec = ltx.Decoder(io.BytesIO(data), version=case.version)
    assert dec.header == case.header
    assert list(dec.pages()) == case.pages
    assert dec.trailer == trailer


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("prefix", [b"\x00\x01", b"\x00\x00" + LZ4_MAGIC, LZ4_MAGIC])
def test_detection_is_not_fooled_by_page_data_that_looks_like_another_generation(
    writer: str, prefix: bytes
) -> None:
    version, flags = WRITERS[writer]
    page = prefix + bytes(range(256)) * 2
    page = page[:512]
    header = ltx.Header(page_size=512, commit=2, min_txid=1, max_txid=1, flags=flags)
    case = Case(version, header, [(1, page), (2, page)], None)
    data, trailer = encode(case)
    assert_decodes_to(data, case, trailer)


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("no_checksum", [False, True])
def test_empty_files_round_trip(writer: str, no_checksum: bool) -> None:
    version, flags = WRITERS[writer]
    flags |= ltx.FLAG_NO_CHECKSUM if no_checksum else 0
    pre = 0 if no_checksum else ltx.CHECKSUM_FLAG | 7
    for header in (
        ltx.Header(
            page_size=4096, commit=0, min_txid=5, max_txid=5, flags=flags, pre_apply_checksum=pre
        ),
        ltx.Header(page_size=4096, commit=0, min_txid=1, max_txid=9, flags=flags),
    ):
        case = Case(version, header, [], None)
        data, trailer = encode(case)
        if not flags & ltx.FLAG_COMPRESS_LZ4:
            assert len(data) == {ltx.Version.V1: 120, ltx.Version.V3: 131}[version]
        assert_decodes_to(data, case, trailer)


def test_snapshot_skips_the_lock_page_across_a_1_gib_database() -> None:
    """A real snapshot that crosses the lock page: 262154 pages of 4 KiB, written and read
    back as a stream (v3 compresses each page to a few dozen bytes). The post-apply
    checksum is the section 7 lock-page vector."""
    page = b"x" * 4096
    lock = ltx.lock_pgno(4096)
    commit = lock + 10
    buf = io.BytesIO()
    enc = ltx.Encoder(buf, ltx.Header(page_size=4096, commit=commit, min_txid=1, max_txid=1))
    for pgno in range(1, commit + 1):
        if pgno != lock:
            enc.write_page(pgno, page)
    trailer = enc.finish()
    assert trailer.post_apply_checksum == 0xC19B668C376662C7
    buf.seek(0)
    dec = ltx.open_decoder(buf)
    expected = 1
    for pgno, _ in dec.pages():
        assert pgno == expected
        expected += 2 if expected + 1 == lock else 1
    assert dec.page_count == commit - 1
    assert dec.trailer == trailer


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_snapshot_whose_commit_is_the_lock_page_ends_just_before_it(
    writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the lock page moved to page 4 (so the test stays small), a snapshot of 4 pages
    holds pages 1-3, and one of 6 pages holds 1, 2, 3, 5, 6; the checksum leaves page 4 out."""
    monkeypatch.setattr(ltx.encoder, "lock_pgno", lambda page_size: 4)
    monkeypatch.setattr(ltx.decoder, "lock_pgno", lambda page_size: 4)
    version, flags = WRITERS[writer]
    for commit, pgnos in ((4, [1, 2, 3]), (6, [1, 2, 3, 5, 6])):
        pages = [(p, bytes([p]) * 512) for p in pgnos]
        header = ltx.Header(page_size=512, commit=commit, min_txid=1, max_txid=1, flags=flags)
        data, trailer = encode(Case(version, header, pages, None))
        want = ltx.CHECKSUM_FLAG
        for pgno, page in pages:
            want ^= ltx.page_checksum(pgno, page)
        assert trailer.post_apply_checksum == ltx.CHECKSUM_FLAG | want
        dec = ltx.Decoder(io.BytesIO(data), version=version)
        assert list(dec.pages()) == pages
        with pytest.raises(ltx.PageError) as err:
            enc = ltx.Encoder(io.BytesIO(), header, version=version)
            for pgno in (1, 2, 3, 4):
                enc.write_page(pgno, bytes(512))
        assert err.value.field == "pgno"


# -- database checksum algebra ------------------------------------------------------------


@st.composite
def databases(draw: st.DrawFn) -> tuple[int, list[tuple[int, bytes]]]:
    page_size = draw(st.sampled_from([512, 1024, 4096]))
    count = draw(st.integers(0, 8))
    return page_size, [(p, draw(page_contents(page_size))) for p in range(1, count + 1)]


@settings(max_examples=60, deadline=None)
@given(db=databases(), rnd=st.randoms(use_true_random=False))
def test_database_checksum_is_order_independent_and_equals_checksum_file(
    db: tuple[int, list[tuple[int, bytes]]], rnd: random.Random
) -> None:
    page_size, pages = db
    shuffled = list(pages)
    rnd.shuffle(shuffled)
    checksum = ltx.database_checksum(pages)
    assert ltx.database_checksum(shuffled) == checksum
    assert ltx.database_checksum(iter(shuffled)) == checksum
    image = b"".join(data for _, data in pages)
    assert ltx.checksum_file(io.BytesIO(image), page_size) == checksum
    assert ltx.checksum_file(io.BytesIO(image), page_size, page_count=len(pages)) == checksum
    # A trailing partial page is ignored, as is anything past page_count.
    assert ltx.checksum_file(io.BytesIO(image + b"\x01" * (page_size - 1)), page_size) == checksum
    assert checksum & ltx.CHECKSUM_FLAG


@settings(max_examples=60, deadline=None)
@given(db=databases(), change=st.integers(0, 7), fill=st.integers(0, 255))
def test_database_checksum_updates_incrementally_by_xor(
    db: tuple[int, list[tuple[int, bytes]]], change: int, fill: int
) -> None:
    page_size, pages = db
    if not pages:
        return
    pgno, old = pages[change % len(pages)]
    new = bytes([fill]) * page_size
    updated = [(p, new if p == pgno else d) for p, d in pages]
    before = ltx.database_checksum(pages)
    rolled = before ^ ltx.page_checksum(pgno, old) ^ ltx.page_checksum(pgno, new)
    assert ltx.database_checksum(updated) == ltx.CHECKSUM_FLAG | rolled


def test_checksum_file_across_its_read_chunks_equals_database_checksum() -> None:
    # 4 MiB chunks hold 8192 pages of 512 bytes: cross a chunk boundary, end mid-chunk.
    rng = random.Random(1)
    pages = [(p, rng.randbytes(512)) for p in range(1, 8192 + 300)]
    image = b"".join(d for _, d in pages)
    assert ltx.checksum_file(io.BytesIO(image), 512) == ltx.database_checksum(pages)
    assert ltx.checksum_file(io.BytesIO(image), 512, page_count=8193) == ltx.database_checksum(
        pages[:8193]
    )


# -- encoder misuse -----------------------------------------------------------------------

INCREMENTAL = ltx.Header(
    page_size=512, commit=10, min_txid=5, max_txid=5, pre_apply_checksum=ltx.CHECKSUM_FLAG | 1
)
SNAPSHOT = ltx.Header(page_size=512, commit=3, min_txid=1, max_txid=4)
PAGE = b"\xab" * 512


def _encoder(writer: str, header: ltx.Header) -> ltx.Encoder:
    version, flags = WRITERS[writer]
    return ltx.Encoder(io.BytesIO(), header.with_(flags=header.flags | flags), version=version)


with_every_writer = pytest.mark.parametrize("writer", sorted(WRITERS))


@with_every_writer
def test_encoder_refuses_pages_out_of_order(writer: str) -> None:
    enc = _encoder(writer, INCREMENTAL)
    enc.write_page(3, PAGE)
    for pgno in (2, 3):
        with pytest.raises(ltx.PageError, match="out of order") as err:
            enc.write_page(pgno, PAGE)
        assert err.value.field == "pgno"


@with_every_writer
@pytest.mark.parametrize("pgno", [0, 11, 2**32])
def test_encoder_refuses_a_page_outside_1_to_commit(writer: str, pgno: int) -> None:
    enc = _encoder(writer, INCREMENTAL)
    with pytest.raises(ltx.PageError) as err:
        enc.write_page(pgno, PAGE)
    assert err.value.field == "pgno"


@with_every_writer
@pytest.mark.parametrize("size", [0, 511, 513, 1024])
def test_encoder_refuses_a_page_of_the_wrong_size(writer: str, size: int) -> None:
    enc = _encoder(writer, INCREMENTAL)
    with pytest.raises(ltx.PageError) as err:
        enc.write_page(1, b"\x00" * size)
    assert err.value.field == "page_data"


@with_every_writer
def test_encoder_refuses_the_lock_page(writer: str) -> None:
    lock = ltx.lock_pgno(65536)
    enc = _encoder(writer, INCREMENTAL.with_(page_size=65536, commit=lock + 5))
    enc.write_page(lock - 1, bytes(65536))
    with pytest.raises(ltx.PageError, match="lock page") as err:
        enc.write_page(lock, bytes(65536))
    assert err.value.field == "pgno"
    enc.write_page(lock + 1, bytes(65536))


@with_every_writer
def test_encoder_refuses_a_snapshot_with_a_gap(writer: str) -> None:
    enc = _encoder(writer, SNAPSHOT)
    enc.write_page(1, PAGE)
    with pytest.raises(ltx.PageError) as err:
        enc.write_page(3, PAGE)
    assert err.value.field == "pgno"
    with pytest.raises(ltx.PageError):
        _encoder(writer, SNAPSHOT).write_page(2, PAGE)


@with_every_writer
def test_encoder_refuses_to_finish_an_incomplete_snapshot(writer: str) -> None:
    enc = _encoder(writer, SNAPSHOT)
    enc.write_page(1, PAGE)
    enc.write_page(2, PAGE)
    with pytest.raises(ltx.PageError) as err:
        enc.finish()
    assert err.value.field == "commit"
    with pytest.raises(ltx.PageError):
        _encoder(writer, SNAPSHOT).finish()


@with_every_writer
def test_encoder_needs_the_post_apply_checksum_of_an_incremental_file(writer: str) -> None:
    enc = _encoder(writer, INCREMENTAL)
    enc.write_page(1, PAGE)
    with pytest.raises(ltx.TrailerError) as err:
        enc.finish()
    assert err.value.field == "post_apply_checksum"


@with_every_writer
def test_encoder_refuses_a_post_apply_checksum_on_a_no_checksum_file(writer: str) -> None:
    header = INCREMENTAL.with_(flags=ltx.FLAG_NO_CHECKSUM, pre_apply_checksum=0)
    enc = _encoder(writer, header)
    enc.write_page(1, PAGE)
    with pytest.raises(ltx.TrailerError) as err:
        enc.finish(ltx.CHECKSUM_FLAG | 1)
    assert err.value.field == "post_apply_checksum"


@with_every_writer
def test_encoder_refuses_a_snapshot_post_apply_checksum_that_disagrees_with_its_pages(
    writer: str,
) -> None:
    enc = _encoder(writer, SNAPSHOT)
    for pgno in (1, 2, 3):
        enc.write_page(pgno, PAGE)
    with pytest.raises(ltx.TrailerError) as err:
        enc.finish(ltx.CHECKSUM_FLAG | 1)
    assert err.value.field == "post_apply_checksum"


@with_every_writer
def test_encoder_refuses_a_deletion_post_apply_checksum_other_than_the_empty_one(
    writer: str,
) -> None:
    enc = _encoder(writer, INCREMENTAL.with_(commit=0))
    with pytest.raises(ltx.TrailerError):
        enc.finish(ltx.CHECKSUM_FLAG | 1)


@with_every_writer
def test_encoder_refuses_to_write_after_finish(writer: str) -> None:
    enc = _encoder(writer, INCREMENTAL)
    enc.write_page(1, PAGE)
    enc.finish(ltx.CHECKSUM_FLAG | 2)
    with pytest.raises(ltx.LTXError):
        enc.write_page(2, PAGE)
    with pytest.raises(ltx.LTXError):
        enc.finish(ltx.CHECKSUM_FLAG | 2)


@pytest.mark.parametrize(
    ("changes", "version", "field"),
    [
        ({"page_size": 1000}, ltx.Version.V3, "page_size"),
        ({"page_size": 256}, ltx.Version.V3, "page_size"),
        ({"page_size": 131072}, ltx.Version.V1, "page_size"),
        ({"min_txid": 0, "max_txid": 0}, ltx.Version.V3, "min_txid"),
        ({"max_txid": 4}, ltx.Version.V3, "max_txid"),
        ({"flags": ltx.FLAG_COMPRESS_LZ4}, ltx.Version.V3, "flags"),
        ({"flags": 0x4}, ltx.Version.V1, "flags"),
        ({"pre_apply_checksum": 0}, ltx.Version.V3, "pre_apply_checksum"),
        ({"pre_apply_checksum": 1}, ltx.Version.V3, "pre_apply_checksum"),
        ({"wal_offset": -1}, ltx.Version.V3, "wal_offset"),
        ({"wal_offset": 32, "wal_size": -1}, ltx.Version.V3, "wal_size"),
        ({"wal_size": 1608}, ltx.Version.V3, "wal_size"),
        ({"wal_salt1": 1}, ltx.Version.V3, "wal_salt"),
        ({"wal_salt2": 1}, ltx.Version.V1, "wal_salt"),
    ],
)
def test_encoder_refuses_an_invalid_header(
    changes: dict[str, int], version: ltx.Version, field: str
) -> None:
    with pytest.raises(ltx.HeaderError) as err:
        ltx.Encoder(io.BytesIO(), INCREMENTAL.with_(**changes), version=version)
    assert err.value.field == field
    assert field in str(err.value)


def test_encoder_refuses_pre_apply_checksum_on_snapshots_and_no_checksum_files() -> None:
    with pytest.raises(ltx.HeaderError, match="pre_apply_checksum"):
        ltx.Encoder(io.BytesIO(), SNAPSHOT.with_(pre_apply_checksum=ltx.CHECKSUM_FLAG | 1))
    with pytest.raises(ltx.HeaderError, match="pre_apply_checksum"):
        ltx.Encoder(io.BytesIO(), INCREMENTAL.with_(flags=ltx.FLAG_NO_CHECKSUM))


def test_encoder_does_not_write_format_v2() -> None:
    with pytest.raises(ltx.LTXError):
        ltx.Encoder(io.BytesIO(), SNAPSHOT, version=ltx.Version.V2)


def test_header_field_out_of_range_is_a_header_error() -> None:
    with pytest.raises(ltx.HeaderError):
        INCREMENTAL.with_(commit=2**32).to_bytes()
    with pytest.raises(ltx.HeaderError):
        INCREMENTAL.with_(node_id=-1).to_bytes()


@with_every_writer
@pytest.mark.parametrize("post", [0, 0x1234])
def test_encoder_refuses_an_invalid_post_apply_checksum_before_writing_the_end(
    writer: str, post: int
) -> None:
    version, flags = WRITERS[writer]
    out = io.BytesIO()
    enc = ltx.Encoder(out, INCREMENTAL.with_(flags=flags), version=version)
    enc.write_page(1, PAGE)
    written = out.getvalue()
    with pytest.raises(ltx.TrailerError) as err:
        enc.finish(post)
    assert err.value.field == "post_apply_checksum"
    assert out.getvalue() == written  # no end marker, index or trailer half-written
    trailer = enc.finish(ltx.CHECKSUM_FLAG | post)  # the caller can still finish properly
    dec = ltx.Decoder(io.BytesIO(out.getvalue()), version=version)
    assert list(dec.pages()) == [(1, PAGE)]
    assert dec.trailer == trailer
