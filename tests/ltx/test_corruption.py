"""Damaged, truncated, extended and hostile LTX files: the decoder says so with an LTXError.

Only ltx.LTXError (or a subclass) may come out of a decode, whatever the bytes, and the
message starts with the file name. Corruption is caught, with one exception that is
allowed: flipping a bit *inside compressed page data* can give another valid LZ4
encoding of the same page (LZ4 output is not unique, and both the file checksum and the
LZ4 content checksum cover the decompressed bytes). Such a flip must then decode to
exactly the original header, pages and trailer.

The stricter-than-reference checks are tested on hand-built files whose file checksum is
right, so the check under test is the one that fails.
"""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import lz4.block
import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltx
from tests.helpers import LTX_FIXTURES, ltx_manifest, needs_ltx_fixtures

PATH = "x.ltx"
SMALL_FILE = 700  # files up to this size get every position and every length
SAMPLE = 300  # positions / lengths sampled in bigger files
FLAG = ltx.CHECKSUM_FLAG
MAX_PEAK_BYTES = 4 << 20

Decoded = tuple[ltx.Version, ltx.Header, list[ltx.Page], ltx.Trailer]


def decode(data: bytes) -> Decoded:
    """Fully decode with generation detection; every error must name the file."""
    try:
        dec = ltx.open_decoder(io.BytesIO(data), path=PATH)
        pages = list(dec.pages())
    except ltx.LTXError as exc:
        assert str(exc).startswith(PATH + ": "), f"error does not name the file: {exc}"
        raise
    assert dec.trailer is not None
    return dec.version, dec.header, pages, dec.trailer


def assert_ltx_error(data: bytes) -> ltx.LTXError:
    with pytest.raises(ltx.LTXError) as err:
        decode(data)
    return err.value


# -- the files under test -----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    version: ltx.Version
    # Byte ranges of compressed page data, where a flip may re-encode the same page.
    compressed: tuple[range, ...] = ()


def _compressed_ranges(
    data: bytes, version: ltx.Version, frames: list[tuple[int, int]]
) -> tuple[range, ...]:
    """Where compressed page bytes lie, from (offset, size) of each page frame."""
    header = ltx.Header.from_bytes(data)
    if version is ltx.Version.V1:
        if header.flags & ltx.FLAG_COMPRESS_LZ4:
            return (range(ltx.HEADER_SIZE, len(data) - ltx.TRAILER_SIZE),)
        return ()
    ranges = []
    for offset, size in frames:
        if version is ltx.Version.V2:
            start = offset + 4
        elif data[offset + 4 : offset + 6] == b"\x00\x01":
            start = offset + 10  # after the page header and the size prefix
        else:
            start = offset + 6
        ranges.append(range(start, offset + size))
    return tuple(ranges)


def _v3_block_frames(data: bytes) -> list[tuple[int, int]]:
    """Walk the block-encoded page frames our encoder writes (spec 6.2), by hand."""
    frames: list[tuple[int, int]] = []
    offset = ltx.HEADER_SIZE
    while True:
        pgno, flags = struct.unpack_from(">IH", data, offset)
        if pgno == 0:
            return frames
        assert flags == 1
        size = 10 + struct.unpack_from(">I", data, offset + 6)[0]
        frames.append((offset, size))
        offset += size


def _fixture_version(path: str) -> ltx.Version:
    folder = path.split("/")[1]
    if path.startswith("upstream/") or folder.startswith("v1-"):
        return ltx.Version.V1
    return ltx.Version.V2 if folder == "v2" else ltx.Version.V3


def _fixture_samples() -> list[Sample]:
    samples = []
    for entry in ltx_manifest()["ltx_files"]:
        data = (LTX_FIXTURES / entry["path"]).read_bytes()
        version = _fixture_version(entry["path"])
        frames = [
            (p["frame_offset"], p["frame_size"]) for p in entry["pages"] if "frame_offset" in p
        ]
        samples.append(
            Sample(entry["path"], data, version, _compressed_ranges(data, version, frames))
        )
    return samples


def _encode(
    version: ltx.Version, header: ltx.Header, pages: list[ltx.Page], post: int | None = None
) -> bytes:
    buf = io.BytesIO()
    enc = ltx.Encoder(buf, header, version=version)
    for pgno, data in pages:
        enc.write_page(pgno, data)
    enc.finish(post)
    return buf.getvalue()


def _encoder_samples() -> list[Sample]:
    rng = random.Random(7)
    text = (b"SQLite format 3\x00" + b"ltx corruption test " * 40)[:512]
    snapshot_pages = [(1, text), (2, rng.randbytes(512)), (3, bytes(512))]
    incremental_pages = [(2, b"\x5a" * 512), (7, rng.randbytes(512))]
    pre = FLAG | 0x1234
    writers = {
        "v3": (ltx.Version.V3, 0),
        "v1": (ltx.Version.V1, 0),
        "v1-lz4": (ltx.Version.V1, ltx.FLAG_COMPRESS_LZ4),
    }
    samples = []
    for name, (version, flags) in writers.items():
        files = {
            "snapshot": _encode(
                version,
                ltx.Header(512, 3, 1, 1, flags=flags, timestamp=1, node_id=9),
                snapshot_pages,
            ),
            "incremental": _encode(
                version,
                ltx.Header(512, 8, 2, 3, flags=flags, pre_apply_checksum=pre, wal_offset=32),
                incremental_pages,
                FLAG | 0x5678,
            ),
            "nochecksum": _encode(
                version,
                ltx.Header(512, 8, 4, 4, flags=flags | ltx.FLAG_NO_CHECKSUM),
                incremental_pages,
            ),
            "deletion": _encode(
                version, ltx.Header(512, 0, 5, 5, flags=flags, pre_apply_checksum=pre), []
            ),
        }
        for kind, data in files.items():
            frames = _v3_block_frames(data) if version is ltx.Version.V3 else []
            ranges = _compressed_ranges(data, version, frames)
            samples.append(Sample(f"ours-{name}-{kind}", data, version, ranges))
    return samples


FIXTURE_SAMPLES = _fixture_samples() if (LTX_FIXTURES / "manifest.json").is_file() else []
ENCODER_SAMPLES = _encoder_samples()

with_every_sample = pytest.mark.parametrize(
    "sample",
    [pytest.param(s, marks=needs_ltx_fixtures, id=s.name) for s in FIXTURE_SAMPLES]
    + [pytest.param(s, id=s.name) for s in ENCODER_SAMPLES],
)


def _positions(sample: Sample, salt: str) -> list[int]:
    """Every position of a small file; a fixed sample (plus the edges) of a bigger one."""
    n = len(sample.data)
    if n <= SMALL_FILE:
        return list(range(n))
    rng = random.Random(zlib.crc32(f"{salt}:{sample.name}".encode()))
    edges = {0, 4, 99, 100, 101, 104, 106, n - 25, n - 24, n - 17, n - 16, n - 9, n - 8, n - 1}
    return sorted(set(rng.sample(range(n), SAMPLE)) | edges)


# -- (a) bit flips, (b) truncation, (c) appended bytes ------------------------------------


@with_every_sample
def test_every_single_bit_flip_is_rejected_or_decodes_to_the_same_file(sample: Sample) -> None:
    original = decode(sample.data)
    assert original[0] is sample.version
    undetected = []
    for pos in _positions(sample, "flip"):
        for bit in range(8):
            damaged = bytearray(sample.data)
            damaged[pos] ^= 1 << bit
            try:
                result = decode(bytes(damaged))
            except ltx.LTXError:
                continue
            undetected.append((pos, bit))
            assert any(pos in r for r in sample.compressed), (
                f"flip of bit {bit} at offset {pos} (outside compressed page data) was not detected"
            )
            assert result == original, f"flip of bit {bit} at offset {pos} changed the file"
    if not sample.compressed:
        assert undetected == []


@with_every_sample
def test_every_truncation_is_rejected(sample: Sample) -> None:
    for length in _positions(sample, "truncate"):
        assert_ltx_error(sample.data[:length])


@with_every_sample
@pytest.mark.parametrize("extra", [1, 7, 100])
def test_bytes_after_the_trailer_are_rejected(sample: Sample, extra: int) -> None:
    tail = random.Random(extra).randbytes(extra)
    assert_ltx_error(sample.data + tail)
    # Told the generation, the decoder names the cause precisely.
    with pytest.raises(ltx.TrailerError) as err:
        ltx.Decoder(io.BytesIO(sample.data + tail), version=sample.version, path=PATH).verify()
    assert err.value.field == "trailer"
    assert str(err.value).startswith(f"{PATH}: trailer: unexpected data after the trailer")


@with_every_sample
def test_a_zeroed_file_checksum_or_post_apply_checksum_is_rejected(sample: Sample) -> None:
    for offset in (len(sample.data) - 8, len(sample.data) - 16):
        damaged = bytearray(sample.data)
        if damaged[offset : offset + 8] == bytes(8):
            continue  # the post-apply checksum of a no-checksum file is already zero
        damaged[offset : offset + 8] = bytes(8)
        err = assert_ltx_error(bytes(damaged))
        assert isinstance(err, ltx.TrailerError | ltx.ChecksumError)


# -- (d) hostile headers: fail fast, allocate little -------------------------------------


@contextmanager
def allocation_limit(limit: int = MAX_PEAK_BYTES) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"decoding allocated {peak} bytes at its peak"


def _lz4_frame_header(flg: int, bd: int, content_size: int | None = None) -> bytes:
    import xxhash

    descriptor = bytes([flg, bd])
    if content_size is not None:
        descriptor += struct.pack("<Q", content_size)
    hc = (xxhash.xxh32(descriptor).intdigest() >> 8) & 0xFF
    return b"\x04\x22\x4d\x18" + descriptor + bytes([hc])


INCREMENTAL = ltx.Header(512, 3, 2, 2, pre_apply_checksum=FLAG | 5)


def _hostile_block_size() -> bytes:
    data = INCREMENTAL.to_bytes() + struct.pack(">IHI", 1, 1, 0xFFFFFFFF)
    return data + bytes(200 - len(data))


def _hostile_page_size() -> bytes:
    raw = bytearray(INCREMENTAL.to_bytes())
    struct.pack_into(">I", raw, 8, 2**31)
    return bytes(raw) + struct.pack(">I", 1) + bytes(100)


def _hostile_commit_v3() -> bytes:
    header = ltx.Header(512, 2**32 - 1, 1, 1)
    return header.to_bytes() + struct.pack(">IHI", 1, 1, 20) + bytes(40)


def _hostile_commit_v1() -> bytes:
    header = ltx.Header(512, 2**32 - 1, 1, 1)
    return header.to_bytes() + struct.pack(">I", 1) + bytes(512) + bytes(4) + bytes(16)


def _hostile_commit_incremental() -> bytes:
    header = INCREMENTAL.with_(commit=2**32 - 1)
    return header.to_bytes() + struct.pack(">I", 2**32 - 1) + bytes(60)


def _hostile_index_size() -> bytes:
    data = bytearray(_encode(ltx.Version.V3, ltx.Header(512, 1, 1, 1), [(1, bytes(512))]))
    struct.pack_into(">Q", data, len(data) - 24, 2**63)
    return bytes(data)


def _hostile_lz4_body_block() -> bytes:
    # v1 with CompressLZ4: a frame of 4 MiB blocks whose first block claims 2 GiB.
    header = ltx.Header(512, 3, 1, 1, flags=ltx.FLAG_COMPRESS_LZ4)
    frame = _lz4_frame_header(0x64, 0x70) + struct.pack("<I", 0x7FFFFFFF) + bytes(100)
    return header.to_bytes() + frame + bytes(16)


def _hostile_lz4_body_content_size() -> bytes:
    # Content size 2**62 and an "uncompressed" 4 MiB block with 100 bytes behind it.
    header = ltx.Header(512, 3, 1, 1, flags=ltx.FLAG_COMPRESS_LZ4)
    frame = _lz4_frame_header(0x6C, 0x70, 2**62) + struct.pack("<I", 0x80000000 | 4 << 20)
    return header.to_bytes() + frame + bytes(100) + bytes(16)


def _hostile_lz4_page_frame() -> bytes:
    # v3 legacy frame encoding: one page's frame claims 4 MiB blocks and a 2**62 content size.
    frame = _lz4_frame_header(0x6C, 0x70, 2**62) + struct.pack("<I", 4 << 20) + bytes(64)
    return INCREMENTAL.to_bytes() + struct.pack(">IH", 1, 0) + frame + bytes(40)


def _hostile_lz4_page_zeros() -> bytes:
    # A well-formed v3 frame that decompresses to 4 MiB of zeros for a 512-byte page.
    frame = bytes(lz4.frame.compress(bytes(4 << 20), block_size=lz4.frame.BLOCKSIZE_MAX4MB))
    return INCREMENTAL.to_bytes() + struct.pack(">IH", 1, 0) + frame + bytes(40)


def _hostile_lz4_body_zeros() -> bytes:
    # A v1 LZ4 body (page 1, then zeros) that expands to 16 MiB from a few KiB: the zero
    # page number after page 1 ends the pages, and the rest must not all be inflated.
    header = ltx.Header(512, 3, 2, 2, flags=ltx.FLAG_COMPRESS_LZ4, pre_apply_checksum=FLAG | 1)
    body = bytes(lz4.frame.compress(struct.pack(">I", 1) + bytes(16 << 20)))
    return header.to_bytes() + body + bytes(16)


def _hostile_varint() -> bytes:
    # A one-page v3 file whose index is 64 bytes of 0xff: a varint that never ends.
    data = _encode(ltx.Version.V3, ltx.Header(512, 1, 1, 1), [(1, bytes(512))])
    index_at = len(data) - ltx.TRAILER_SIZE - 8 - 4  # 3 entry bytes and the terminator
    return data[:index_at] + b"\xff" * 64 + data[len(data) - ltx.TRAILER_SIZE - 8 :]


HOSTILE: dict[str, tuple[Callable[[], bytes], type[ltx.LTXError], str | None]] = {
    "v3-block-size-0xffffffff": (_hostile_block_size, ltx.PageError, "compressed_size"),
    "page-size-2**31": (_hostile_page_size, ltx.HeaderError, "page_size"),
    "commit-2**32-1-v3-snapshot": (_hostile_commit_v3, ltx.LTXError, None),
    "commit-2**32-1-v1-snapshot": (_hostile_commit_v1, ltx.PageError, "commit"),
    "commit-2**32-1-incremental": (_hostile_commit_incremental, ltx.LTXError, None),
    "index-size-2**63": (_hostile_index_size, ltx.PageIndexError, "index_size"),
    "v1-lz4-body-2gib-block": (_hostile_lz4_body_block, ltx.PageError, "page_block"),
    "v1-lz4-body-huge-content-size": (_hostile_lz4_body_content_size, ltx.LTXError, None),
    "v1-lz4-body-16mib-of-zeros": (_hostile_lz4_body_zeros, ltx.PageError, "page_block"),
    "v3-page-frame-4mib-blocks": (_hostile_lz4_page_frame, ltx.TruncatedError, "page_data"),
    "v3-page-frame-4mib-of-zeros": (_hostile_lz4_page_zeros, ltx.PageError, "page_data"),
    "index-varint-overflow": (_hostile_varint, ltx.PageIndexError, "page_index"),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_fails_fast_without_allocating_much(name: str) -> None:
    build, error, field_name = HOSTILE[name]
    data = build()
    with allocation_limit(), pytest.raises(error) as err:
        decode(data)
    if field_name is not None:
        assert err.value.field == field_name
        assert f": {field_name}: " in str(err.value)


@pytest.mark.timeout(10)
def test_read_page_index_refuses_an_index_size_bigger_than_the_file() -> None:
    data = _hostile_index_size()
    with allocation_limit(), pytest.raises(ltx.PageIndexError) as err:
        ltx.read_page_index(io.BytesIO(data), path=PATH)
    assert err.value.field == "index_size"
    assert str(err.value).startswith(f"{PATH}: index_size: ")


@pytest.mark.timeout(10)
def test_read_page_refuses_an_index_entry_that_runs_past_the_file() -> None:
    data = _encode(ltx.Version.V3, ltx.Header(512, 1, 1, 1), [(1, bytes(512))])
    header = ltx.Header.from_bytes(data)
    entry = ltx.IndexEntry(1, ltx.HEADER_SIZE, 2**40)
    with allocation_limit(), pytest.raises(ltx.LTXError):
        ltx.read_page(io.BytesIO(data), header, entry, path=PATH)


# -- arbitrary bytes ----------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _decode_anything(data: bytes) -> None:
    """Only LTXError may escape, from a full decode and from the random-access path."""
    with suppress(ltx.LTXError):
        decode(data)
    f = io.BytesIO(data)
    try:
        index = ltx.read_page_index(f, path=PATH)
        header = ltx.Header.from_bytes(data, path=PATH)
        for version in (ltx.Version.V2, ltx.Version.V3):
            for entry in index.values():
                with suppress(ltx.LTXError):
                    ltx.read_page(f, header, entry, version=version, path=PATH)
    except ltx.LTXError:
        pass


valid_headers = st.builds(
    lambda ps, commit, min_txid, span, flags, pre: ltx.Header(
        page_size=ps,
        commit=commit,
        min_txid=min_txid,
        max_txid=min_txid + span,
        flags=flags,
        pre_apply_checksum=0 if (min_txid == 1 or flags & ltx.FLAG_NO_CHECKSUM) else pre,
    ).to_bytes(),
    st.sampled_from([512, 1024, 4096]),
    st.integers(0, 8),
    st.integers(1, 4),
    st.integers(0, 3),
    st.sampled_from([0, 1, 2, 3]),
    st.integers(FLAG, 2**64 - 1),
)


@FUZZ_SETTINGS
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_ltx_errors(data: bytes) -> None:
    _decode_anything(data)


@FUZZ_SETTINGS
@given(head=valid_headers, body=st.binary(max_size=3000))
def test_a_valid_header_followed_by_arbitrary_bytes_raises_only_ltx_errors(
    head: bytes, body: bytes
) -> None:
    _decode_anything(head + body)


@FUZZ_SETTINGS
@given(
    sample=st.sampled_from(ENCODER_SAMPLES),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "insert", "delete"]), st.integers(0), st.binary(max_size=8)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_a_damaged_valid_file_raises_only_ltx_errors(
    sample: Sample, edits: list[tuple[str, int, bytes]]
) -> None:
    data = bytearray(sample.data)
    for op, where, blob in edits:
        at = where % (len(data) + 1)
        if op == "set":
            data[at : at + len(blob)] = blob
        elif op == "insert":
            data[at:at] = blob
        else:
            del data[at : at + max(1, len(blob))]
    _decode_anything(bytes(data))


# -- stricter than the reference: hand-built files with a correct file checksum -----------


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@dataclass
class Frame:
    """One page frame as it goes on disk, and the logical bytes the file checksum covers."""

    pgno: int
    data: bytes
    encoding: str = "block"  # v3: "block" or "frame"; v2: "frame"; v1: "raw"
    payload: bytes | None = None  # compressed bytes, when not simply data compressed
    flags: int | None = None  # v3 page-header flags, when not the encoding's own


@dataclass
class Built:
    data: bytes
    index: list[tuple[int, int, int]] = field(default_factory=list)


def build(
    version: ltx.Version,
    header: ltx.Header,
    frames: list[Frame],
    *,
    index: list[tuple[int, int, int]] | None = None,
    index_bytes: bytes | None = None,
    index_size: int | None = None,
    post: int | None = None,
    end_marker: bytes | None = None,
) -> Built:
    """A test-only writer of raw frames (spec sections 4, 5, 6) with a correct file checksum."""
    out = bytearray(header.to_bytes())
    crc = ltx.crc64(bytes(out))
    actual = []
    for fr in frames:
        offset = len(out)
        if version is ltx.Version.V1:
            hdr = struct.pack(">I", fr.pgno)
            out += hdr + fr.data
            crc = ltx.crc64(fr.data, ltx.crc64(hdr, crc))
            continue
        if fr.encoding == "block":
            payload = (
                fr.payload
                if fr.payload is not None
                else lz4.block.compress(fr.data, store_size=False)
            )
            flags = 1 if fr.flags is None else fr.flags
            hdr = struct.pack(">IH", fr.pgno, flags)
            prefix = struct.pack(">I", len(payload))
            out += hdr + prefix + payload
            crc = ltx.crc64(fr.data, ltx.crc64(prefix, ltx.crc64(hdr, crc)))
        else:
            payload = (
                fr.payload
                if fr.payload is not None
                else lz4.frame.compress(
                    fr.data, block_size=lz4.frame.BLOCKSIZE_MAX64KB, content_checksum=True
                )
            )
            if version is ltx.Version.V3:
                hdr = struct.pack(">IH", fr.pgno, 0 if fr.flags is None else fr.flags)
            else:
                hdr = struct.pack(">I", fr.pgno)
            out += hdr + payload
            crc = ltx.crc64(fr.data, ltx.crc64(hdr, crc))
        actual.append((fr.pgno, offset, len(out) - offset))
    if end_marker is None:
        end_marker = bytes(6 if version is ltx.Version.V3 else 4)
    out += end_marker
    crc = ltx.crc64(end_marker, crc)
    if version is not ltx.Version.V1:
        if index_bytes is None:
            entries = actual if index is None else index
            index_bytes = b"".join(_uvarint(v) for e in entries for v in e) + b"\x00"
        size = struct.pack(">Q", len(index_bytes) if index_size is None else index_size)
        out += index_bytes + size
        crc = ltx.crc64(index_bytes + size, crc)
    if post is None:
        if header.no_checksum:
            post = 0
        elif header.commit == 0:
            post = ltx.EMPTY_DB_CHECKSUM
        elif header.is_snapshot:
            post = ltx.database_checksum((fr.pgno, fr.data) for fr in frames)
        else:
            post = FLAG | 0xC0FFEE
    post_bytes = struct.pack(">Q", post)
    out += post_bytes + struct.pack(">Q", FLAG | ltx.crc64(post_bytes, crc))
    return Built(bytes(out), actual)


def page(n: int, size: int = 512) -> bytes:
    """A compressible page that differs from page to page."""
    unit = bytes([n % 256]) * 8 + b"page %d " % n
    return (unit * (size // len(unit) + 1))[:size]


def _pages(*pgnos: int, size: int = 512) -> list[ltx.Page]:
    return [(p, page(p, size)) for p in pgnos]


INC = ltx.Header(512, 5, 7, 7, pre_apply_checksum=FLAG | 99)
SNAP = ltx.Header(512, 3, 1, 7)


def strict_error(
    data: bytes,
    error: type[ltx.LTXError],
    field_name: str,
    words: str,
    version: ltx.Version,
    *,
    detected: bool = True,
) -> None:
    """Detected and given the generation, the file fails with error on field_name."""
    openers: list[Callable[[], ltx.Decoder]] = [
        lambda: ltx.Decoder(io.BytesIO(data), version=version, path=PATH)
    ]
    if detected:
        openers.append(lambda: ltx.open_decoder(io.BytesIO(data), path=PATH))
    for dec in openers:
        with pytest.raises(error) as err:
            dec().verify()
        assert err.value.field == field_name
        text = str(err.value)
        assert text.startswith(f"{PATH}: {field_name}: "), text
        assert words in text, text


@pytest.mark.parametrize(
    ("version", "encoding"),
    [
        (ltx.Version.V1, "raw"),
        (ltx.Version.V2, "frame"),
        (ltx.Version.V3, "frame"),
        (ltx.Version.V3, "block"),
    ],
)
def test_hand_built_files_decode_when_nothing_is_wrong(version: ltx.Version, encoding: str) -> None:
    for header, pages in ((INC, _pages(2, 5)), (SNAP, _pages(1, 2, 3))):
        built = build(version, header, [Frame(p, d, encoding) for p, d in pages])
        dec = ltx.open_decoder(io.BytesIO(built.data))
        assert dec.version is version
        assert list(dec.pages()) == pages
        if version is not ltx.Version.V1:
            index = ltx.read_page_index(io.BytesIO(built.data))
            assert [(e.pgno, e.offset, e.size) for e in index.values()] == built.index


def test_hand_built_v3_block_file_is_byte_identical_to_the_encoder_output() -> None:
    for header, pages, post in (
        (INC, _pages(2, 5), FLAG | 0xC0FFEE),
        (SNAP, _pages(1, 2, 3), None),
    ):
        built = build(ltx.Version.V3, header, [Frame(p, d) for p, d in pages])
        assert built.data == _encode(ltx.Version.V3, header, pages, post)
        built = build(ltx.Version.V1, header, [Frame(p, d, "raw") for p, d in pages])
        assert built.data == _encode(ltx.Version.V1, header, pages, post)


V1_V3 = pytest.mark.parametrize("version", [ltx.Version.V1, ltx.Version.V3])


def _frames(version: ltx.Version, pages: list[ltx.Page]) -> list[Frame]:
    return [Frame(p, d, "raw" if version is ltx.Version.V1 else "block") for p, d in pages]


@V1_V3
def test_pages_out_of_order_are_rejected(version: ltx.Version) -> None:
    built = build(version, INC, _frames(version, _pages(3, 2)))
    strict_error(built.data, ltx.PageError, "pgno", "out of order", version)


@V1_V3
def test_a_repeated_page_is_rejected(version: ltx.Version) -> None:
    built = build(version, INC, _frames(version, _pages(2, 2)))
    strict_error(built.data, ltx.PageError, "pgno", "out of order", version)


@V1_V3
def test_a_page_past_the_commit_is_rejected(version: ltx.Version) -> None:
    built = build(version, INC, _frames(version, _pages(2, 6)))
    strict_error(built.data, ltx.PageError, "pgno", "past the commit size 5", version)


@V1_V3
def test_the_lock_page_is_rejected(version: ltx.Version) -> None:
    lock = ltx.lock_pgno(512)
    header = INC.with_(commit=lock + 1)
    built = build(version, header, _frames(version, _pages(lock - 1, lock)))
    strict_error(built.data, ltx.PageError, "pgno", "lock page", version)


@V1_V3
def test_a_snapshot_missing_a_middle_page_is_rejected(version: ltx.Version) -> None:
    built = build(version, SNAP, _frames(version, _pages(1, 3)))
    strict_error(built.data, ltx.PageError, "pgno", "pages missing", version)


@V1_V3
def test_a_snapshot_missing_its_first_page_is_rejected(version: ltx.Version) -> None:
    built = build(version, SNAP, _frames(version, _pages(2, 3)))
    strict_error(built.data, ltx.PageError, "pgno", "pages missing", version)


@V1_V3
def test_a_snapshot_missing_its_last_pages_is_rejected(version: ltx.Version) -> None:
    built = build(version, SNAP, _frames(version, _pages(1, 2)))
    strict_error(built.data, ltx.PageError, "commit", "snapshot ends at page 2", version)
    built = build(version, SNAP, [])
    strict_error(built.data, ltx.PageError, "commit", "snapshot ends at page 0", version)


@V1_V3
def test_trailing_bytes_are_rejected(version: ltx.Version) -> None:
    built = build(version, INC, _frames(version, _pages(2)))
    strict_error(built.data + b"\x00", ltx.TrailerError, "trailer", "after the trailer", version)


@V1_V3
def test_a_snapshot_whose_post_apply_checksum_disagrees_with_its_pages_is_rejected(
    version: ltx.Version,
) -> None:
    built = build(version, SNAP, _frames(version, _pages(1, 2, 3)), post=FLAG | 1)
    strict_error(built.data, ltx.ChecksumError, "post_apply_checksum", "mismatch", version)


@V1_V3
def test_a_wrong_file_checksum_is_rejected(version: ltx.Version) -> None:
    data = bytearray(build(version, INC, _frames(version, _pages(2))).data)
    data[-1] ^= 0x01
    strict_error(bytes(data), ltx.ChecksumError, "file_checksum", "mismatch", version)


@V1_V3
@pytest.mark.parametrize(
    ("header", "post", "field_name"),
    [
        (INC, 0x1234, "post_apply_checksum"),  # flag bit missing
        (INC, 0, "post_apply_checksum"),
        (
            INC.with_(flags=ltx.FLAG_NO_CHECKSUM, pre_apply_checksum=0),
            FLAG | 1,
            "post_apply_checksum",
        ),
        (INC.with_(commit=0), FLAG | 1, "post_apply_checksum"),  # deletion: must be the flag
    ],
)
def test_an_invalid_post_apply_checksum_is_rejected(
    version: ltx.Version, header: ltx.Header, post: int, field_name: str
) -> None:
    pages = _pages(2) if header.commit else []
    built = build(version, header, _frames(version, pages), post=post)
    strict_error(built.data, ltx.TrailerError, field_name, "post-apply checksum", version)


@V1_V3
def test_a_file_checksum_without_the_flag_bit_is_rejected(version: ltx.Version) -> None:
    data = bytearray(build(version, INC, _frames(version, _pages(2))).data)
    data[-8] &= 0x7F
    strict_error(bytes(data), ltx.TrailerError, "file_checksum", "flag bit", version)


def test_a_v3_block_that_decompresses_to_fewer_than_page_size_bytes_is_rejected() -> None:
    short = b"s" * 256
    frame = Frame(2, short, payload=lz4.block.compress(short, store_size=False))
    built = build(ltx.Version.V3, INC, [frame])
    strict_error(
        built.data,
        ltx.PageError,
        "page_data",
        "decompresses to 256 bytes, want 512",
        ltx.Version.V3,
    )


def test_a_v3_block_that_decompresses_to_more_than_page_size_bytes_is_rejected() -> None:
    long = b"l" * 1024
    frame = Frame(2, long[:512], payload=lz4.block.compress(long, store_size=False))
    built = build(ltx.Version.V3, INC, [frame])
    strict_error(built.data, ltx.PageError, "page_data", "page 2", ltx.Version.V3)


def test_a_v3_block_of_size_zero_is_rejected() -> None:
    frame = Frame(2, page(2), payload=b"")
    built = build(ltx.Version.V3, INC, [frame])
    strict_error(built.data, ltx.PageError, "compressed_size", "size 0", ltx.Version.V3)


@pytest.mark.parametrize("version", [ltx.Version.V2, ltx.Version.V3])
@pytest.mark.parametrize(("length", "words"), [(256, "holds 256 bytes"), (1024, "more than 512")])
def test_an_lz4_page_frame_of_the_wrong_length_is_rejected(
    version: ltx.Version, length: int, words: str
) -> None:
    content = b"f" * length
    frame = Frame(2, content[:512], "frame", payload=lz4.frame.compress(content))
    built = build(version, INC, [frame])
    strict_error(built.data, ltx.PageError, "page_data", words, version)


def test_a_v3_page_header_with_unknown_flags_is_rejected() -> None:
    built = build(ltx.Version.V3, INC, [Frame(2, page(2), "frame", flags=0x0002)])
    # Detection reads page flags other than 0 and 1 as a v1 file (spec section 16), so
    # only a decoder told the generation can name the flags.
    strict_error(
        built.data,
        ltx.PageError,
        "page_flags",
        "invalid flags 0x0002",
        ltx.Version.V3,
        detected=False,
    )
    assert_ltx_error(built.data)


def test_a_v3_end_marker_with_flags_is_rejected() -> None:
    marker = b"\x00\x00\x00\x00\x00\x01"
    built = build(ltx.Version.V3, INC, [Frame(2, page(2))], end_marker=marker)
    strict_error(built.data, ltx.PageError, "page_header", "end marker", ltx.Version.V3)


@pytest.mark.parametrize("version", [ltx.Version.V2, ltx.Version.V3])
@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda e: [(e[0][0], e[0][1] + 1, e[0][2]), e[1]], "index entry 0 is (pgno 2, offset 101"),
        (lambda e: [e[0], (e[1][0], e[1][1], e[1][2] - 1)], "index entry 1 is"),
        (lambda e: [(3, e[0][1], e[0][2]), e[1]], "index entry 0 is (pgno 3"),
        (lambda e: [e[0]], "index ends after 1 entries but the file has 2 pages"),
        (lambda e: [*e, (5, 1000, 10)], "more entries than the 2 pages"),
    ],
    ids=["offset", "size", "pgno", "missing-entry", "extra-entry"],
)
def test_an_index_that_disagrees_with_the_frames_is_rejected(
    version: ltx.Version,
    change: Callable[[list[tuple[int, int, int]]], list[tuple[int, int, int]]],
    words: str,
) -> None:
    encoding = "block" if version is ltx.Version.V3 else "frame"
    frames = [Frame(p, d, encoding) for p, d in _pages(2, 4)]
    index = change(build(version, INC, frames).index)
    built = build(version, INC, frames, index=index)
    strict_error(built.data, ltx.PageIndexError, "page_index", words, version)


@pytest.mark.parametrize("version", [ltx.Version.V2, ltx.Version.V3])
@pytest.mark.parametrize("delta", [-1, 1, 2**40])
def test_an_index_size_field_that_is_wrong_is_rejected(version: ltx.Version, delta: int) -> None:
    encoding = "block" if version is ltx.Version.V3 else "frame"
    frames = [Frame(p, d, encoding) for p, d in _pages(2, 4)]
    right = build(version, INC, frames)
    index_len = len(b"".join(_uvarint(v) for e in right.index for v in e)) + 1
    built = build(version, INC, frames, index_size=index_len + delta)
    strict_error(
        built.data,
        ltx.PageIndexError,
        "index_size",
        f"index size field says {index_len + delta} bytes but the index is {index_len} bytes",
        version,
    )


@pytest.mark.parametrize("version", [ltx.Version.V2, ltx.Version.V3])
def test_an_index_with_non_minimal_varints_is_accepted_as_go_accepts_it(
    version: ltx.Version,
) -> None:
    encoding = "block" if version is ltx.Version.V3 else "frame"
    frames = [Frame(p, d, encoding) for p, d in _pages(2, 4)]
    right = build(version, INC, frames)
    # Each small value v as the two-byte varint (v | 0x80, 0x00): same value, not minimal.
    padded = b"".join(
        bytes([v | 0x80, 0x00]) if v < 0x80 else _uvarint(v) for e in right.index for v in e
    )
    built = build(version, INC, frames, index_bytes=padded + b"\x00")
    dec = ltx.open_decoder(io.BytesIO(built.data), path=PATH)
    assert list(dec.pages()) == _pages(2, 4)
    index = ltx.read_page_index(io.BytesIO(built.data))
    assert [(e.pgno, e.offset, e.size) for e in index.values()] == right.index


# -- 4. every error names the file --------------------------------------------------------


def _corruptions() -> dict[str, bytes]:
    good = build(ltx.Version.V3, INC, [Frame(2, page(2)), Frame(4, page(4))]).data
    bad_magic = b"LTX2" + good[4:]
    flipped = bytearray(good)
    flipped[120] ^= 0x40
    checksum = bytearray(good)
    checksum[-1] ^= 1
    return {
        "header": bad_magic,
        "short-header": good[:50],
        "truncated": good[:-3],
        "page": build(ltx.Version.V3, INC, [Frame(4, page(4)), Frame(2, page(2))]).data,
        "index": build(ltx.Version.V3, INC, [Frame(2, page(2))], index_size=9).data,
        "trailer": good + b"!",
        "checksum": bytes(checksum),
        "flip": bytes(flipped),
        "lz4-body": ltx.Header(512, 3, 1, 1, flags=1).to_bytes() + b"\x04\x22\x4d\x18" + bytes(30),
    }


CORRUPTIONS = _corruptions()


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_the_error_message_starts_with_the_file_name(name: str) -> None:
    for open_it in (ltx.open_decoder, lambda f, path: ltx.Decoder(f, path=path)):
        with pytest.raises(ltx.LTXError) as err:
            open_it(io.BytesIO(CORRUPTIONS[name]), path=PATH).verify()
        assert str(err.value).startswith(f"{PATH}: "), str(err.value)
        assert err.value.path == PATH


def test_apply_errors_name_the_file() -> None:
    db = io.BytesIO(b"\x00" * 1024)
    with pytest.raises(ltx.LTXError) as err:
        ltx.apply_ltx(db, io.BytesIO(CORRUPTIONS["checksum"]), path=PATH)
    assert str(err.value).startswith(f"{PATH}: ")
    good = build(ltx.Version.V3, INC, [Frame(2, page(2))]).data
    with pytest.raises(ltx.PositionError) as err:
        ltx.apply_ltx(db, io.BytesIO(good), path=PATH)
    assert str(err.value).startswith(f"{PATH}: pre_apply_checksum: ")
    assert db.getvalue() == b"\x00" * 1024


def test_errors_without_a_path_do_not_invent_one() -> None:
    with pytest.raises(ltx.LTXError) as err:
        ltx.open_decoder(io.BytesIO(CORRUPTIONS["page"])).verify()
    assert err.value.path is None
    assert str(err.value).startswith("pgno: ")


def test_a_v3_file_may_mix_frame_and_block_pages_as_v0_5_2_readers_accept() -> None:
    frames = [Frame(2, page(2), "frame"), Frame(3, page(3), "block"), Frame(5, page(5), "frame")]
    built = build(ltx.Version.V3, INC, frames)
    dec = ltx.open_decoder(io.BytesIO(built.data), path=PATH)
    assert dec.version is ltx.Version.V3
    assert list(dec.pages()) == _pages(2, 3, 5)
    f = io.BytesIO(built.data)
    for entry in ltx.read_page_index(f).values():
        assert ltx.read_page(f, dec.header, entry) == page(entry.pgno)
