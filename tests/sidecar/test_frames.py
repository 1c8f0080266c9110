"""The replication wire format (sidecar/frames.py, docs/protocol.md): bytes in, frames out.

Frames are built here a second time, from the layout in docs/protocol.md (raw_frame),
so the codec is checked against the document and not only against itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import frames as fr
from sidecar.frames import (
    MAX_PAYLOAD,
    DatabasePosition,
    End,
    Frame,
    FrameDecoder,
    FrameError,
    Handoff,
    Heartbeat,
    Hello,
    LtxFragment,
    PageHashes,
    Positions,
    Ready,
    Resync,
    ResyncBegin,
    ResyncReason,
    StaleEpochError,
    StreamRequest,
    UnknownFrame,
    decode_resync_request,
    encode,
    encode_stream_request,
    ltx_fragments,
    page_hash,
    parse_stream_request,
    resync_request_frames,
    split_positions,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
U64 = (1 << 64) - 1
FLAG = 1 << 63
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_frame(
    ftype: int,
    payload: bytes,
    *,
    epoch: int = 1,
    flags: int = 0,
    reserved: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built straight from docs/protocol.md, independently of fr.encode."""
    size = len(payload) if length is None else length
    prefix = struct.pack(">BBHIQ", ftype, flags, reserved, size, epoch)
    head = prefix + struct.pack(">I", xxhash.xxh3_64_intdigest(prefix) & 0xFFFFFFFF)
    return head + payload + struct.pack(">Q", xxhash.xxh3_64_intdigest(head + payload))


def decode_all(data: bytes, expect: fr.Expect | None = None, **kw: int) -> list[Frame]:
    decoder = FrameDecoder(expect, **kw)
    out = decoder.feed(data)
    decoder.close()
    return out


def decode_error(data: bytes, expect: fr.Expect | None = None, **kw: int) -> FrameError:
    with pytest.raises(FrameError) as exc:
        decode_all(data, expect, **kw)
    return exc.value


def stream(*frames: Frame) -> bytes:
    return b"".join(encode(f) for f in frames)


# -- strategies --------------------------------------------------------------------------

epochs = st.integers(0, U64)
u64s = st.integers(0, U64)
names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/\\\x00"),
    min_size=1,
    max_size=24,
).filter(lambda s: not s.startswith("."))
long_names = st.integers(1, 255).map(lambda n: "n" * n)
db_names = st.one_of(names, long_names)
node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)
urls = st.builds(
    lambda scheme, host, port: f"{scheme}://{host}:{port}/",
    st.sampled_from(["http", "https"]),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True),
    st.integers(1, 65535),
)
positions = st.builds(DatabasePosition, db_names, u64s, u64s)
position_lists = st.lists(positions, max_size=5, unique_by=lambda p: p.name).map(tuple)
checksums = st.integers(FLAG, U64)


def frame_strategy(epoch: st.SearchStrategy[int] = epochs) -> st.SearchStrategy[Frame]:
    unknown_types = st.integers(11, 255)
    return st.one_of(
        st.builds(Hello, epoch, node_ids, urls, st.integers(1, 0xFFFF)),
        st.builds(
            LtxFragment,
            epoch,
            db_names,
            st.integers(0, (1 << 32) - 1),
            st.booleans(),
            st.binary(min_size=1, max_size=300),
        ),
        st.builds(Ready, epoch),
        st.builds(Heartbeat, epoch, u64s, position_lists),
        st.builds(Resync, epoch, db_names, st.sampled_from(ResyncReason), u64s, u64s),
        st.builds(End, epoch),
        st.builds(Handoff, epoch, node_ids, position_lists),
        st.builds(Positions, epoch, node_ids, position_lists),
        st.builds(
            ResyncBegin,
            epoch,
            node_ids,
            db_names,
            st.sampled_from([512, 1024, 4096, 65536]),
            st.integers(0, (1 << 32) - 1),
            u64s,
            checksums,
        ),
        st.builds(
            PageHashes,
            epoch,
            st.integers(1, 1 << 31),
            st.lists(u64s, min_size=1, max_size=40).map(tuple),
        ),
        st.builds(UnknownFrame, epoch, unknown_types, st.just(1), st.binary(max_size=64)),
    )


@st.composite
def valid_streams(draw: st.DrawFn) -> list[Frame]:
    """A /stream body the grammar accepts: HELLO, a mix of frames, maybe END."""
    epoch = draw(epochs)
    out: list[Frame] = [Hello(epoch, draw(node_ids), draw(urls))]
    ready = False
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["ltx", "ready", "heartbeat", "resync", "handoff", "skip"]))
        if kind == "ltx":
            data = draw(st.binary(min_size=1, max_size=400))
            size = draw(st.integers(1, 150))
            out += ltx_fragments(epoch, draw(db_names), [data], fragment_size=size)
        elif kind == "ready" and not ready:
            ready = True
            out.append(Ready(epoch))
        elif kind == "heartbeat":
            out.append(Heartbeat(epoch, draw(u64s), draw(position_lists)))
        elif kind == "resync":
            out.append(Resync(epoch, draw(db_names), ResyncReason.TOO_OLD, draw(u64s), FLAG))
        elif kind == "handoff":
            out.append(Handoff(epoch, draw(node_ids), draw(position_lists)))
        elif kind == "skip":
            out.append(UnknownFrame(epoch, draw(st.integers(11, 255)), 1, draw(st.binary())))
    if draw(st.booleans()):
        out.append(End(epoch))
    return out


def one_of_each(epoch: int = 9) -> list[Frame]:
    """A small /stream body with every stream frame type, for exhaustive damage tests."""
    return [
        Hello(epoch, "primary-a", "http://primary-a.vm.app.internal:20202"),
        LtxFragment(epoch, "app.db", 0, False, b"LTX1" + bytes(range(20))),
        Heartbeat(epoch, 1_700_000_000_000, (DatabasePosition("app.db", 3, FLAG | 5),)),
        LtxFragment(epoch, "app.db", 1, True, b"tail"),
        Ready(epoch),
        Resync(epoch, "other.db", ResyncReason.AHEAD, 9, FLAG | 1),
        UnknownFrame(epoch, 200, 1, b"future"),
        Handoff(epoch, "replica-b", (DatabasePosition("app.db", 3, FLAG | 5),)),
        End(epoch),
    ]


# -- round trips -------------------------------------------------------------------------


@FAST
@given(frame_strategy())
def test_every_frame_type_round_trips(frame: Frame) -> None:
    data = encode(frame)
    assert decode_all(data) == [frame]
    assert len(data) == fr.FRAME_OVERHEAD + struct.unpack(">I", data[4:8])[0]


@FAST
@given(valid_streams(), st.data())
def test_decoder_gives_the_same_frames_whatever_the_chunking(
    frames: list[Frame], data: st.DataObject
) -> None:
    body = stream(*frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
    decoder = FrameDecoder("stream")
    out: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        out += decoder.feed(body[start:end])
    decoder.close()
    assert out == frames
    assert decoder.ended == isinstance(frames[-1], End)
    assert decoder.hello == frames[0]


def test_byte_at_a_time_gives_the_same_frames() -> None:
    frames = one_of_each()
    body = stream(*frames)
    decoder = FrameDecoder("stream")
    out = [f for i in range(len(body)) for f in decoder.feed(body[i : i + 1])]
    decoder.close()
    assert out == frames


def test_encoding_matches_the_documented_layout() -> None:
    """Payload layouts of docs/protocol.md, written out by hand."""
    epoch = 0x0102030405060708
    name = b"app.db"
    pos = struct.pack(">QQ", 42, FLAG | 7) + bytes([len(name)]) + name
    node = b"node-1"
    url = b"http://node-1:20202"
    cases: list[tuple[Frame, int, bytes]] = [
        (
            Hello(epoch, "node-1", url.decode()),
            1,
            struct.pack(">HB", 1, len(node)) + node + struct.pack(">H", len(url)) + url,
        ),
        (
            LtxFragment(epoch, "app.db", 5, True, b"DATA"),
            2,
            struct.pack(">IBB", 5, 1, len(name)) + name + b"DATA",
        ),
        (Ready(epoch), 3, b""),
        (
            Heartbeat(epoch, 1234, (DatabasePosition("app.db", 42, FLAG | 7),)),
            4,
            struct.pack(">QI", 1234, 1) + pos,
        ),
        (
            Resync(epoch, "app.db", ResyncReason.TOO_OLD, 42, FLAG | 7),
            5,
            struct.pack(">QQBB", 42, FLAG | 7, 2, len(name)) + name,
        ),
        (End(epoch), 6, b""),
        (
            Handoff(epoch, "node-1", (DatabasePosition("app.db", 42, FLAG | 7),)),
            7,
            bytes([len(node)]) + node + struct.pack(">I", 1) + pos,
        ),
        (
            Positions(epoch, "node-1", (DatabasePosition("app.db", 42, FLAG | 7),)),
            8,
            bytes([len(node)]) + node + struct.pack(">I", 1) + pos,
        ),
        (
            ResyncBegin(epoch, "node-1", "app.db", 4096, 3, 42, FLAG | 7),
            9,
            struct.pack(">IIQQB", 4096, 3, 42, FLAG | 7, len(name))
            + name
            + bytes([len(node)])
            + node,
        ),
        (PageHashes(epoch, 7, (1, 2)), 10, struct.pack(">IQQ", 7, 1, 2)),
        (UnknownFrame(epoch, 77, 1, b"xyz"), 77, b"xyz"),
    ]
    for frame, ftype, payload in cases:
        flags = 1 if ftype == 77 else 0
        assert encode(frame) == raw_frame(ftype, payload, epoch=epoch, flags=flags), frame


def test_documented_heartbeat_example_is_what_encode_produces() -> None:
    text = PROTOCOL_MD.read_text()
    match = re.search(r"<!-- heartbeat-example -->\s*```text\n(.*?)```", text, re.S)
    assert match, "docs/protocol.md lost its heartbeat example"
    documented = bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", match.group(1))))
    frame = Heartbeat(
        7, 1_700_000_000_000, (DatabasePosition("app.db", 42, 0x8000_0000_C0FF_EE00),)
    )
    assert documented == encode(frame)


# -- damage ------------------------------------------------------------------------------


def test_every_single_bit_flip_is_a_frame_error() -> None:
    frames = one_of_each()
    body = stream(*frames)
    bounds = [0]
    for f in frames:
        bounds.append(bounds[-1] + len(encode(f)))
    for bit in range(len(body) * 8):
        damaged = bytearray(body)
        damaged[bit // 8] ^= 1 << (bit % 8)
        decoder = FrameDecoder("stream")
        out: list[Frame] = []
        with pytest.raises(FrameError):
            out += decoder.feed(bytes(damaged))
            decoder.close()
        # Nothing from the damaged frame onwards came out, and nothing else either.
        damaged_frame = next(i for i in range(len(frames)) if bounds[i + 1] > bit // 8)
        assert out == frames[: len(out)]
        assert len(out) <= damaged_frame


@FAST
@given(valid_streams(), st.data())
def test_a_random_bit_flip_never_yields_a_different_frame(
    frames: list[Frame], data: st.DataObject
) -> None:
    body = stream(*frames)
    bit = data.draw(st.integers(0, len(body) * 8 - 1))
    damaged = bytearray(body)
    damaged[bit // 8] ^= 1 << (bit % 8)
    decoder = FrameDecoder()
    out: list[Frame] = []
    with pytest.raises(FrameError):
        out += decoder.feed(bytes(damaged))
        decoder.close()
    assert out == frames[: len(out)]


def test_every_truncation_waits_for_more_and_close_reports_it() -> None:
    frames = one_of_each()
    body = stream(*frames)
    ends = [0]
    for f in frames:
        ends.append(ends[-1] + len(encode(f)))
    for cut in range(len(body)):
        decoder = FrameDecoder()
        out = decoder.feed(body[:cut])  # no error: the rest may still come
        whole = max(i for i, end in enumerate(ends) if end <= cut)
        assert out == frames[:whole]
        assert decoder.buffered == cut - ends[whole]
        if cut == ends[whole]:
            decoder.close()
        else:
            with pytest.raises(FrameError, match="truncated"):
                decoder.close()


def test_a_stream_cut_inside_an_ltx_file_is_an_error_at_close() -> None:
    frames = one_of_each()[:3]  # HELLO, first fragment of app.db, HEARTBEAT
    decoder = FrameDecoder("stream")
    assert decoder.feed(stream(*frames)) == frames
    with pytest.raises(FrameError, match=r"LTX file of 'app.db' is unfinished \(fragment 1"):
        decoder.close()


@pytest.mark.parametrize("length", [(1 << 32) - 1, MAX_PAYLOAD + 1])
def test_a_huge_length_is_an_error_at_once_without_allocating(length: int) -> None:
    header = raw_frame(fr.FrameType.LTX, b"", length=length)[: fr.HEADER_SIZE]
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="length") as exc:
            decoder.feed(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert exc.value.field == "length"


def test_a_payload_of_exactly_max_payload_is_accepted() -> None:
    frame = UnknownFrame(1, 99, 1, bytes(MAX_PAYLOAD))
    assert decode_all(encode(frame)) == [frame]
    name = "n" * 255
    room = MAX_PAYLOAD - 6 - 255
    frag = LtxFragment(1, name, 0, True, bytes(room))
    assert len(encode(frag)) == MAX_PAYLOAD + fr.FRAME_OVERHEAD
    with pytest.raises(FrameError, match="data"):
        LtxFragment(1, name, 0, True, bytes(room + 1))


def test_a_damaged_header_is_caught_before_the_payload_arrives() -> None:
    body = bytearray(encode(LtxFragment(1, "a", 0, True, bytes(5000))))
    body[5] ^= 0x10  # the length field
    with pytest.raises(FrameError, match="header check"):
        FrameDecoder().feed(bytes(body[: fr.HEADER_SIZE]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([None, "stream", "positions", "resync"]))
def test_random_bytes_only_ever_raise_frame_error(data: bytes, expect: fr.Expect | None) -> None:
    with contextlib.suppress(FrameError):
        decode_all(data, expect)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 12), st.binary(max_size=120), st.integers(0, 1))
def test_random_payloads_in_valid_envelopes_are_rejected_or_canonical(
    ftype: int, payload: bytes, flags: int
) -> None:
    """Past the checksums, payload parsers see anything: only FrameError, and what they
    accept re-encodes to the very same bytes (one frame, one encoding)."""
    data = raw_frame(ftype, payload, flags=flags)
    try:
        frames = decode_all(data)
    except FrameError:
        return
    assert [encode(f) for f in frames] == [data]


def test_reserved_bits_and_flags_are_rejected() -> None:
    assert "reserved" in str(decode_error(raw_frame(3, b"", reserved=1)))
    err = decode_error(raw_frame(3, b"", flags=fr.FLAG_MAY_SKIP))
    assert err.field == "flags"  # a known type has fixed flags
    assert decode_error(raw_frame(3, b"", flags=0x02)).field == "flags"


def test_unknown_types_are_skippable_only_with_the_may_skip_flag() -> None:
    assert decode_error(raw_frame(99, b"x")).field == "type"
    assert decode_error(raw_frame(0, b"")).field == "type"
    assert decode_error(raw_frame(99, b"x", flags=0x03)).field == "type"
    assert decode_all(raw_frame(99, b"x", flags=1)) == [UnknownFrame(1, 99, 1, b"x")]
    hello = Hello(1, "p", "http://p:1")
    body = stream(hello, UnknownFrame(1, 50, 1, b"new"), End(1))
    assert decode_all(body, "stream")[1] == UnknownFrame(1, 50, 1, b"new")


def test_trailing_bytes_in_a_payload_are_rejected() -> None:
    payload = encode(Ready(1))[fr.HEADER_SIZE : -fr.CHECKSUM_SIZE] + b"\x00"
    assert decode_error(raw_frame(3, payload)).field == "payload"
    hb = encode(Heartbeat(1, 5, ()))[fr.HEADER_SIZE : -fr.CHECKSUM_SIZE]
    assert decode_error(raw_frame(4, hb + b"junk")).field == "payload"


def test_errors_name_the_frame_its_offset_and_the_field() -> None:
    body = stream(Hello(1, "p", "http://p:1")) + raw_frame(4, b"\x00" * 7)
    err = decode_error(body, "stream")
    assert str(err).startswith("frame 1 (HEARTBEAT) at byte ")
    assert err.field == "timestamp_ms"


def test_the_decoder_stays_failed_and_refuses_feed_after_close() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as first:
        decoder.feed(b"\xff" * 40)
    with pytest.raises(FrameError) as again:
        decoder.feed(encode(Ready(1)))
    assert again.value is first.value
    closed = FrameDecoder()
    closed.close()
    with pytest.raises(FrameError, match="after close"):
        closed.feed(encode(Ready(1)))


# -- database names, node ids, urls ------------------------------------------------------

BAD_NAMES = ["", ".hidden", "..", "a/b", "/abs", "a\\b", "a\x00b", "x" * 256, "é" * 128, "\udcff"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_database_names_are_rejected_when_building_frames(name: str) -> None:
    for build in (
        lambda: LtxFragment(1, name, 0, True, b"x"),
        lambda: DatabasePosition(name, 1, 1),
        lambda: Resync(1, name, ResyncReason.DIVERGED, 1, 1),
        lambda: ResyncBegin(1, "n", name, 4096, 1, 1, FLAG),
    ):
        with pytest.raises(FrameError) as exc:
            build()
        assert exc.value.field == "name"


@pytest.mark.parametrize(
    "raw", [b"", b".x", b"a/b", b"a\\b", b"a\x00", b"\xff\xfe", b"\xc0\xaf", b"\xed\xb2\x80"]
)
def test_invalid_database_names_are_rejected_on_the_wire(raw: bytes) -> None:
    payload = struct.pack(">IBB", 0, 1, len(raw)) + raw + b"data"
    err = decode_error(raw_frame(fr.FrameType.LTX, payload))
    assert err.field == "name"
    entry = struct.pack(">QQB", 1, 1, len(raw)) + raw
    err = decode_error(raw_frame(fr.FrameType.HEARTBEAT, struct.pack(">QI", 0, 1) + entry))
    assert err.field == "positions[0].name"


def test_a_255_byte_name_is_the_longest() -> None:
    for name in ("n" * 255, "é" * 127 + "n"):
        assert decode_all(encode(LtxFragment(1, name, 0, True, b"x")))[0].name == name  # type: ignore[union-attr]


@pytest.mark.parametrize("node_id", ["", "-x", "a b", "a/b", "é", "x" * 256, "a\n"])
def test_invalid_node_ids_are_rejected(node_id: str) -> None:
    with pytest.raises(FrameError, match="node id"):
        Hello(1, node_id, "http://p:1")
    with pytest.raises(FrameError, match="node id"):
        Handoff(1, node_id)


@pytest.mark.parametrize(
    "url",
    ["", "p:1", "ftp://p/", "http://", "http://:80/", "http://a b/", "http://é/", "http://[x"],
)
def test_invalid_advertise_urls_are_rejected(url: str) -> None:
    with pytest.raises(FrameError) as exc:
        Hello(1, "p", url)
    assert exc.value.field == "advertise_url"
    with pytest.raises(FrameError):
        Hello(1, "p", "http://p/" + "x" * fr.MAX_URL_BYTES)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: Ready(-1), "epoch"),
        (lambda: Ready(1 << 64), "epoch"),
        (lambda: Ready(True), "epoch"),
        (lambda: Heartbeat(1, -5), "timestamp_ms"),
        (lambda: LtxFragment(1, "a", 1 << 32, True, b"x"), "index"),
        (lambda: LtxFragment(1, "a", 0, 1, b"x"), "last"),  # type: ignore[arg-type]
        (lambda: LtxFragment(1, "a", 0, True, b""), "data"),
        (lambda: LtxFragment(1, "a", 0, True, "text"), "data"),  # type: ignore[arg-type]
        (lambda: Resync(1, "a", 9, 1, 1), "reason"),  # type: ignore[arg-type]
        (lambda: Hello(1, "p", "http://p:1", 0), "version"),
        (lambda: ResyncBegin(1, "n", "a", 1000, 1, 1, FLAG), "page_size"),
        (lambda: ResyncBegin(1, "n", "a", 4096, 1, 1, 5), "checksum"),
        (lambda: PageHashes(1, 0, (1,)), "first_pgno"),
        (lambda: PageHashes(1, 1, ()), "hashes"),
        (lambda: PageHashes(1, 1, (1, -1)), "hashes[1]"),
        (lambda: PageHashes(1, (1 << 32) - 1, (1, 2)), "hashes"),
        (lambda: Heartbeat(1, 1, (DatabasePosition("a", 1, 1),) * 2), "positions[1].name"),
        (lambda: UnknownFrame(1, 3, 1, b""), "type"),
        (lambda: UnknownFrame(1, 99, 0, b""), "flags"),
    ],
)
def test_frames_validate_their_fields(build: Callable[[], object], field: str) -> None:
    with pytest.raises(FrameError) as exc:
        build()
    assert exc.value.field == field


# -- the grammar of each body ------------------------------------------------------------

HELLO = Hello(5, "primary", "http://primary:20202")


def test_the_first_frame_of_a_stream_must_be_hello_and_only_the_first() -> None:
    assert "first frame must be HELLO" in str(decode_error(encode(Ready(5)), "stream"))
    assert "second HELLO" in str(decode_error(stream(HELLO, HELLO), "stream"))
    assert "first frame must be HELLO" in str(
        decode_error(encode(UnknownFrame(5, 99, 1, b"")), "stream")
    )


def test_every_frame_of_a_body_carries_the_same_epoch() -> None:
    err = decode_error(stream(HELLO, Ready(6)), "stream")
    assert err.field == "epoch"
    err = decode_error(stream(Positions(1, "r"), Positions(2, "r")), "positions")
    assert err.field == "epoch"


def test_frames_of_an_older_term_raise_stale_epoch_before_their_payload() -> None:
    decoder = FrameDecoder("stream", min_epoch=6)
    with pytest.raises(StaleEpochError):
        decoder.feed(encode(HELLO)[: fr.HEADER_SIZE])
    assert decode_all(encode(HELLO), "stream", min_epoch=5) == [HELLO]


def test_unsupported_protocol_version_in_hello() -> None:
    err = decode_error(encode(Hello(5, "p", "http://p:1", version=2)), "stream")
    assert err.field == "version"


def test_ready_once_and_nothing_after_end() -> None:
    assert "second READY" in str(decode_error(stream(HELLO, Ready(5), Ready(5)), "stream"))
    assert "after END" in str(decode_error(stream(HELLO, End(5)) + b"\x00", "stream"))
    assert "after END" in str(decode_error(stream(HELLO, End(5), Ready(5)), "stream"))


def test_ltx_fragments_of_one_database_are_in_order_and_others_may_interleave() -> None:
    a0 = LtxFragment(5, "a", 0, False, b"a0")
    a1 = LtxFragment(5, "a", 1, True, b"a1")
    b0 = LtxFragment(5, "b", 0, True, b"b0")
    ok: list[Frame] = [HELLO, a0, b0, Heartbeat(5, 1), a1, End(5)]
    assert decode_all(stream(*ok), "stream") == ok
    assert decode_error(stream(HELLO, a1), "stream").field == "index"
    assert decode_error(stream(HELLO, a0, a0), "stream").field == "index"
    skipped = LtxFragment(5, "a", 2, True, b"a2")
    assert decode_error(stream(HELLO, a0, skipped), "stream").field == "index"
    assert "unfinished" in str(decode_error(stream(HELLO, a0, End(5)), "stream"))


def test_each_body_allows_only_its_own_frames() -> None:
    pos = Positions(5, "replica")
    assert "not allowed in a stream body" in str(decode_error(stream(HELLO, pos), "stream"))
    assert "not allowed in a positions body" in str(decode_error(encode(HELLO), "positions"))
    assert "not allowed in a resync body" in str(decode_error(encode(pos), "resync"))


def test_positions_body_streams_reports_from_one_node() -> None:
    reports = [
        Positions(5, "replica-1", (DatabasePosition("a", n, FLAG | n),)) for n in range(1, 4)
    ]
    assert decode_all(stream(*reports), "positions") == reports
    assert decode_all(b"", "positions") == []
    other = Positions(5, "replica-2")
    assert decode_error(stream(reports[0], other), "positions").field == "node_id"


# -- helpers for senders -----------------------------------------------------------------


@FAST
@given(
    st.binary(min_size=1, max_size=3000),
    st.lists(st.integers(1, 700), min_size=1, max_size=10),
    st.integers(1, 800),
)
def test_ltx_fragments_reassemble_the_file(data: bytes, cuts: list[int], size: int) -> None:
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(data[pos : pos + c])
        pos += c
    chunks.append(data[pos:])
    fragments = list(ltx_fragments(3, "app.db", chunks, fragment_size=size))
    assert b"".join(f.data for f in fragments) == data
    assert [f.index for f in fragments] == list(range(len(fragments)))
    assert [f.last for f in fragments] == [False] * (len(fragments) - 1) + [True]
    assert all(len(f.data) == size for f in fragments[:-1])
    assert decode_all(stream(Hello(3, "p", "http://p:1"), *fragments), "stream")[1:] == fragments


def test_ltx_fragments_refuses_an_empty_file_and_bad_sizes() -> None:
    with pytest.raises(FrameError, match="empty"):
        list(ltx_fragments(1, "a", [b"", b""]))
    with pytest.raises(FrameError):
        list(ltx_fragments(1, "a", [b"x"], fragment_size=MAX_PAYLOAD))
    with pytest.raises(FrameError):
        list(ltx_fragments(1, "../a", [b"x"]))


def test_ltx_fragments_streams_a_big_file_in_bounded_memory() -> None:
    chunk = bytes(1 << 20)

    def big_file() -> Iterable[bytes]:
        for _ in range(64):  # 64 MiB, never held at once
            yield chunk

    tracemalloc.start()
    try:
        total = 0
        for frag in ltx_fragments(1, "big.db", big_file()):
            total += len(encode(frag))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 64 << 20
    assert peak < 8 << 20


def test_split_positions_fits_every_group_in_one_frame() -> None:
    many = [DatabasePosition(f"{i:05d}" + "n" * 250, i, FLAG | i) for i in range(9000)]
    with pytest.raises(FrameError, match="split"):
        encode(Heartbeat(1, 1, tuple(many)))
    groups = list(split_positions(many))
    assert len(groups) == 3
    assert [p for g in groups for p in g] == many
    for group in groups:
        assert len(encode(Positions(1, "r" * 255, group))) <= MAX_PAYLOAD + fr.FRAME_OVERHEAD
        assert decode_all(encode(Heartbeat(1, 1, group)))[0] == Heartbeat(1, 1, group)


# -- POST /resync ------------------------------------------------------------------------


@FAST
@given(
    st.lists(u64s, max_size=300),
    st.integers(1, 100),
    epochs,
    st.data(),
)
def test_resync_request_round_trips_whatever_the_chunking(
    hashes: list[int], per_frame: int, epoch: int, data: st.DataObject
) -> None:
    begin = ResyncBegin(epoch, "replica-1", "app.db", 4096, len(hashes), 17, FLAG | 99)
    body = stream(*resync_request_frames(begin, hashes, per_frame=per_frame))
    request = decode_resync_request(body)
    assert request.begin == begin and list(request.hashes) == hashes
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    decoder = FrameDecoder("resync")
    got: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(body)], strict=True):
        for frame in decoder.feed(body[start:end]):
            if isinstance(frame, PageHashes):
                got += frame.hashes
    decoder.close()
    assert got == hashes


def test_resync_request_corruption_and_truncation_are_frame_errors() -> None:
    begin = ResyncBegin(2, "replica-1", "app.db", 1024, 10, 3, FLAG)
    body = stream(*resync_request_frames(begin, range(100, 110), per_frame=4))
    for bit in range(len(body) * 8):
        damaged = bytearray(body)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError):
            decode_resync_request(bytes(damaged))
    frames: list[Frame] = [*resync_request_frames(begin, range(100, 110), per_frame=4)]
    frame_ends = {len(stream(*frames[:n])) for n in range(len(frames))}
    for cut in range(len(body)):
        with pytest.raises(FrameError, match="truncated" if cut not in frame_ends else "ended"):
            decode_resync_request(body[:cut])


def test_resync_request_grammar() -> None:
    begin = ResyncBegin(2, "r", "app.db", 4096, 4, 3, FLAG)
    h = [PageHashes(2, 1, (1, 2)), PageHashes(2, 3, (3, 4))]
    assert decode_all(stream(begin, *h), "resync") == [begin, *h]
    assert "first frame must be RESYNC_BEGIN" in str(decode_error(encode(h[0]), "resync"))
    assert "second RESYNC_BEGIN" in str(decode_error(stream(begin, begin), "resync"))
    assert decode_error(stream(begin, h[1]), "resync").field == "first_pgno"
    assert decode_error(stream(begin, h[0], h[0]), "resync").field == "first_pgno"
    past = PageHashes(2, 3, (3, 4, 5))
    assert decode_error(stream(begin, h[0], past), "resync").field == "hashes"
    assert "pages 3..4" in str(decode_error(stream(begin, h[0]), "resync"))
    assert "before RESYNC_BEGIN" in str(decode_error(b"", "resync"))
    empty = ResyncBegin(2, "r", "app.db", 4096, 0, 0, FLAG)
    assert decode_resync_request(encode(empty)).hashes == ()


def test_resync_request_frames_checks_the_hash_count() -> None:
    begin = ResyncBegin(1, "r", "a", 4096, 3, 1, FLAG)
    with pytest.raises(FrameError, match="more hashes"):
        list(resync_request_frames(begin, range(4)))
    with pytest.raises(FrameError, match="2 hashes for page_count 3"):
        list(resync_request_frames(begin, range(2)))


def test_page_hash_is_xxh3_64_of_the_page() -> None:
    page = bytes(range(256)) * 16
    assert page_hash(page) == xxhash.xxh3_64_intdigest(page)
    assert page_hash(memoryview(page)) == page_hash(page)
    assert fr.LOCK_PAGE_HASH == 0


# -- POST /stream request body -----------------------------------------------------------

GOOD = {
    "version": 1,
    "node_id": "replica-1",
    "databases": [
        {"name": "app.db", "txid": "000000000000002a", "checksum": "80000000c0ffee00"},
        {"name": "other.db", "txid": "0000000000000001", "checksum": "8000000000000001"},
    ],
}


def body_with(**changes: object) -> bytes:
    doc = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        target = doc
        *parents, key = path.split("__")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return json.dumps(doc).encode()


def test_stream_request_parses_and_round_trips() -> None:
    req = parse_stream_request(json.dumps(GOOD).encode())
    assert req == StreamRequest(
        "replica-1",
        (
            DatabasePosition("app.db", 42, 0x8000_0000_C0FF_EE00),
            DatabasePosition("other.db", 1, FLAG | 1),
        ),
        1,
    )
    assert parse_stream_request(encode_stream_request(req)) == req
    assert json.loads(encode_stream_request(req)) == GOOD
    assert req.position("app.db") == req.databases[0] and req.position("x") is None
    extra = body_with(future_key=[1, 2], databases__0__also_new=True)
    assert parse_stream_request(extra) == req  # unknown keys are ignored
    assert parse_stream_request(body_with(databases=[])).databases == ()
    assert parse_stream_request(body_with(databases__0__txid="000000000000002A")) == req


@FAST
@given(node_ids, position_lists, st.integers(1, 0xFFFF))
def test_stream_request_round_trips(
    node_id: str, dbs: tuple[DatabasePosition, ...], v: int
) -> None:
    req = StreamRequest(node_id, dbs, v)
    assert parse_stream_request(encode_stream_request(req)) == req


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (body_with(version=KeyError), "version", "missing"),
        (body_with(node_id=KeyError), "node_id", "missing"),
        (body_with(databases=KeyError), "databases", "missing"),
        (body_with(databases__1__name=KeyError), "databases[1].name", "missing"),
        (body_with(databases__0__txid=KeyError), "databases[0].txid", "missing"),
        (body_with(databases__0__checksum=KeyError), "databases[0].checksum", "missing"),
        (body_with(version="1"), "version", "integer"),
        (body_with(version=True), "version", "integer"),
        (body_with(version=1.0), "version", "integer"),
        (body_with(version=0), "version", "1..65535"),
        (body_with(node_id=7), "node_id", "string"),
        (body_with(node_id="no spaces"), "node_id", "node id"),
        (body_with(databases={"app.db": {}}), "databases", "list"),
        (body_with(databases=["app.db"]), "databases[0]", "object"),
        (body_with(databases__0__name=5), "databases[0].name", "string"),
        (body_with(databases__0__name="../etc"), "databases[0].name", "separator"),
        (body_with(databases__0__name=".hidden"), "databases[0].name", "dot"),
        (body_with(databases__0__name=""), "databases[0].name", "empty"),
        (body_with(databases__0__name="x" * 256), "databases[0].name", "255"),
        (body_with(databases__1__name="app.db"), "databases[1].name", "duplicate"),
        (body_with(databases__0__txid=42), "databases[0].txid", "16 hex digits"),
        (body_with(databases__0__txid=4.2), "databases[0].txid", "16 hex digits"),
        (body_with(databases__0__txid="2a"), "databases[0].txid", "16 hex digits"),
        (body_with(databases__0__txid="-00000000000002a"), "databases[0].txid", "hex"),
        (body_with(databases__0__txid="0x0000000000002a"), "databases[0].txid", "hex"),
        (body_with(databases__1__checksum=None), "databases[1].checksum", "16 hex digits"),
        (b"[]", "body", "object"),
        (b"{", "body", "JSON"),
        (b"\xff{}", "body", "UTF-8"),
        (b'{"version": NaN}', "body", "NaN"),
        (b'{"version": 1, "version": 2}', "body", "duplicate key"),
        (b"[" * 100_000, "body", "JSON"),
        (b" " * (fr.MAX_REQUEST_BODY + 1), "body", "limit"),
    ],
)
def test_stream_request_errors_name_the_field(body: bytes, field: str, words: str) -> None:
    with pytest.raises(FrameError) as exc:
        parse_stream_request(body)
    assert exc.value.field == field
    assert words in str(exc.value)
    assert str(exc.value).startswith(field + ": ")
    assert isinstance(exc.value, ValueError)


def test_stream_request_validates_when_built() -> None:
    with pytest.raises(FrameError, match="duplicate"):
        StreamRequest("r", (DatabasePosition("a", 1, 1), DatabasePosition("a", 2, 2)))
    with pytest.raises(FrameError) as exc:
        StreamRequest("r", version=0)
    assert exc.value.field == "version"
