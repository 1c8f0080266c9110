"""The compactor: reference fixtures, and compaction equals sequential application."""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ltx
from ltx import Decoder, Encoder, Header, LTXError, Version

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "ltx-fixtures"
GENERATIONS = ["v1-uncompressed", "v1-lz4", "v2", "v3-frame", "v3-block"]

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures missing: {FIXTURES}")


def _manifest() -> dict[str, dict[str, object]]:
    entries = json.loads((FIXTURES / "manifest.json").read_text())["ltx_files"]
    return {e["path"]: e for e in entries}


def _decoders(folder: str, txids: range) -> list[Decoder]:
    paths = [FIXTURES / "generated" / folder / ltx.format_filename(t, t) for t in txids]
    return [ltx.open_decoder(p.open("rb"), path=str(p)) for p in paths]


@pytest.mark.parametrize("folder", GENERATIONS)
@pytest.mark.parametrize("first", [1, 2])
def test_compaction_matches_reference_compactor(folder: str, first: int) -> None:
    out = io.BytesIO()
    header, trailer = ltx.compact(_decoders(folder, range(first, 4)), out)
    expected = _manifest()[f"generated/{folder}/compacted-{first:016x}-{3:016x}.ltx"]
    out.seek(0)
    decoded = ltx.open_decoder(out)
    pages = [(pgno, hashlib.sha256(data).hexdigest()) for pgno, data in decoded.pages()]
    assert pages == [(p["pgno"], p["sha256"]) for p in expected["pages"]]  # type: ignore[attr-defined]
    want = expected["header"]
    assert isinstance(want, dict)
    assert header.commit == want["commit"]
    assert (header.min_txid, header.max_txid) == (want["min_txid"], want["max_txid"])
    assert header.timestamp == want["timestamp_ms"]
    assert header.pre_apply_checksum == int(want["pre_apply_checksum"], 16)
    assert (header.node_id, header.wal_offset, header.wal_size) == (0, 0, 0)
    assert trailer.post_apply_checksum == int(str(expected["post_apply_checksum"]), 16)
    assert decoded.trailer == trailer


def test_compaction_rejects_a_gap_in_txids() -> None:
    decoders = _decoders("v3-block", range(1, 4))
    with pytest.raises(LTXError, match="do not follow") as err:
        ltx.compact([decoders[0], decoders[2]], io.BytesIO())
    assert err.value.field == "min_txid"


def test_compaction_allows_a_gap_when_asked() -> None:
    decoders = _decoders("v3-block", range(2, 4))
    ltx.compact([decoders[1]], io.BytesIO(), allow_non_contiguous=True)


def test_compaction_rejects_mixing_checksummed_and_nochecksum_inputs() -> None:
    tracked = _decoders("v3-block", range(1, 2))
    path = FIXTURES / "generated" / "v3-block" / "nochecksum-0000000000000002-0000000000000002.ltx"
    untracked = ltx.open_decoder(path.open("rb"), path=str(path))
    with pytest.raises(LTXError) as err:
        ltx.compact([tracked[0], untracked], io.BytesIO())
    assert err.value.field == "flags"


def test_compaction_of_nochecksum_inputs_into_nochecksum_output() -> None:
    folder = FIXTURES / "generated" / "v3-block"
    paths = [folder / f"nochecksum-{ltx.format_filename(t, t)}" for t in (1, 2, 3)]
    decoders = [ltx.open_decoder(p.open("rb"), path=str(p)) for p in paths]
    out = io.BytesIO()
    header, trailer = ltx.compact(decoders, out, flags=ltx.FLAG_NO_CHECKSUM)
    assert header.no_checksum and trailer.post_apply_checksum == 0
    out.seek(0)
    assert [p for p, _ in ltx.open_decoder(out).pages()] == [1, 2, 3]


def test_compaction_of_a_corrupt_input_raises_ltx_error() -> None:
    path = FIXTURES / "generated" / "v3-block" / "0000000000000002-0000000000000002.ltx"
    data = bytearray(path.read_bytes())
    data[120] ^= 0xFF
    first = _decoders("v3-block", range(1, 2))[0]
    corrupt = Decoder(io.BytesIO(bytes(data)), version=Version.V3, path="corrupt.ltx")
    with pytest.raises(LTXError) as err:
        ltx.compact([first, corrupt], io.BytesIO())
    assert "corrupt.ltx" in str(err.value)


# -- property: compacting a chain equals applying it file by file -------------------------


class Model:
    """A database image and the LTX chain that produced it."""

    def __init__(self, rng: random.Random, page_size: int, pages: int) -> None:
        self.rng = rng
        self.page_size = page_size
        self.pages = {p: self._page() for p in range(1, pages + 1)}
        self.files: list[bytes] = [self._encode(1, self.pages, pre=0)]

    def _page(self) -> bytes:
        fill = bytes([self.rng.randrange(256)]) * self.rng.randrange(self.page_size)
        return (fill + self.rng.randbytes(self.page_size))[: self.page_size]

    def checksum(self) -> int:
        return ltx.database_checksum(sorted(self.pages.items()))

    def _encode(self, txid: int, pages: dict[int, bytes], pre: int) -> bytes:
        out = io.BytesIO()
        header = Header(
            page_size=self.page_size,
            commit=len(self.pages),
            min_txid=txid,
            max_txid=txid,
            timestamp=txid * 1000,
            pre_apply_checksum=pre,
        )
        encoder = Encoder(out, header)
        for pgno in sorted(pages):
            encoder.write_page(pgno, pages[pgno])
        encoder.finish(self.checksum())
        return out.getvalue()

    def transaction(self) -> None:
        pre = self.checksum()
        old = len(self.pages)
        commit = max(1, old + self.rng.randint(-3, 3))
        for pgno in range(commit + 1, old + 1):
            del self.pages[pgno]
        changed = {p: self._page() for p in range(old + 1, commit + 1)}
        for pgno in self.rng.sample(range(1, min(old, commit) + 1), k=min(3, old, commit)):
            changed[pgno] = self._page()
        self.pages.update(changed)
        self.files.append(self._encode(len(self.files) + 1, changed, pre))

    def image(self) -> bytes:
        return b"".join(self.pages[p] for p in sorted(self.pages))


def _apply(db: io.BytesIO, data: bytes) -> None:
    ltx.apply_ltx(db, io.BytesIO(data))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    page_size=st.sampled_from([512, 1024, 4096]),
    transactions=st.integers(1, 8),
    split=st.integers(0, 8),
)
def test_compacted_chain_applies_to_the_same_database(
    seed: int, page_size: int, transactions: int, split: int
) -> None:
    model = Model(random.Random(seed), page_size, pages=1 + seed % 6)
    for _ in range(transactions):
        model.transaction()
    split = min(split, len(model.files) - 1)

    expected = io.BytesIO()
    for data in model.files:
        _apply(expected, data)
    assert expected.getvalue() == model.image()

    # Apply the head file by file, then the rest of the chain as one compacted file.
    db = io.BytesIO()
    for data in model.files[:split]:
        _apply(db, data)
    tail = [ltx.open_decoder(io.BytesIO(d)) for d in model.files[split:]]
    out = io.BytesIO()
    header, trailer = ltx.compact(tail, out)
    assert header.is_snapshot == (split == 0)
    assert trailer.post_apply_checksum == model.checksum()
    _apply(db, out.getvalue())
    assert db.getvalue() == model.image()
