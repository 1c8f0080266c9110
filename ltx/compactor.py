"""Merge a contiguous run of LTX files into one (spec section 10).

A streaming k-way merge: each input is decoded page by page in ascending
pgno, and for each pgno the latest input that has it wins. At most one page
per input is in memory. Every input is verified in full on the way.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence

from ltx.decoder import Decoder
from ltx.encoder import Encoder, Writable
from ltx.errors import LTXError
from ltx.header import FLAG_NO_CHECKSUM, Header, Trailer, Version


def is_contiguous(prev: Header, cur: Header) -> bool:
    """cur may overlap prev but must start no later than the TXID after prev and end past it."""
    return cur.min_txid <= prev.max_txid + 1 and cur.max_txid > prev.max_txid


def compacted_header(headers: Sequence[Header], flags: int = 0) -> Header:
    """The output header the reference compactor writes for these inputs."""
    first, last = headers[0], headers[-1]
    return Header(
        flags=flags,
        page_size=first.page_size,
        commit=last.commit,
        min_txid=first.min_txid,
        max_txid=last.max_txid,
        timestamp=last.timestamp,
        pre_apply_checksum=first.pre_apply_checksum,
    )


def check_inputs(
    inputs: Sequence[Decoder], flags: int, *, allow_non_contiguous: bool = False
) -> None:
    if not inputs:
        raise LTXError("at least one input file is required", field="inputs")
    first = inputs[0].header
    for prev_dec, dec in itertools.pairwise(inputs):
        prev, cur = prev_dec.header, dec.header
        if cur.page_size != first.page_size:
            raise LTXError(
                f"page size {cur.page_size} differs from the first input's {first.page_size}",
                path=dec.path,
                field="page_size",
            )
        if not allow_non_contiguous and not is_contiguous(prev, cur):
            raise LTXError(
                f"TXIDs {cur.min_txid}-{cur.max_txid} do not follow "
                f"{prev.min_txid}-{prev.max_txid}",
                path=dec.path,
                field="min_txid",
            )
    no_checksum = bool(flags & FLAG_NO_CHECKSUM)
    for dec in inputs:
        if dec.header.no_checksum != no_checksum and not (no_checksum and dec.header.is_snapshot):
            want = "without" if no_checksum else "with"
            raise LTXError(
                f"cannot compact into a file {want} database checksums: input flags "
                f"0x{dec.header.flags:08x}",
                path=dec.path,
                field="flags",
            )


def _merged_pages(inputs: Sequence[Decoder]) -> Iterator[tuple[int, bytes]]:
    """(pgno, data) ascending, the latest input winning for each pgno."""
    iters = [d.pages() for d in inputs]
    heap: list[tuple[int, int, bytes]] = []
    for i, it in enumerate(iters):
        for pgno, data in it:
            heap.append((pgno, -i, data))
            break
    heapq.heapify(heap)
    while heap:
        pgno, neg_i, data = heapq.heappop(heap)
        advance = [-neg_i]
        while heap and heap[0][0] == pgno:
            advance.append(-heapq.heappop(heap)[1])
        yield pgno, data
        for i in advance:
            for nxt_pgno, nxt_data in iters[i]:
                heapq.heappush(heap, (nxt_pgno, -i, nxt_data))
                break


def compact(
    inputs: Sequence[Decoder],
    out: Writable,
    *,
    flags: int = 0,
    version: Version = Version.V3,
    allow_non_contiguous: bool = False,
) -> tuple[Header, Trailer]:
    """Write the compaction of inputs (in the order given) to out."""
    check_inputs(inputs, flags, allow_non_contiguous=allow_non_contiguous)
    header = compacted_header([d.header for d in inputs], flags)
    encoder = Encoder(out, header, version=version)
    for pgno, data in _merged_pages(inputs):
        if pgno <= header.commit:
            encoder.write_page(pgno, data)
    last = inputs[-1].trailer
    if last is None or any(d.trailer is None for d in inputs):
        raise LTXError("an input was not read to its end", field="inputs")
    post = None if header.no_checksum else last.post_apply_checksum
    return header, encoder.finish(post)
