"""What a deposed primary must keep: the transactions the new primary never received.

A node that loses the lease with transactions nobody else has copies its own LTX files
past the new primary's position to ``<data-dir>/quarantine/<db>/<time>-epoch<N>/``
(sidecar/replica.py ``_quarantine``) before its copy is resynced. The checks here are
pure (values in, a list of problems out, empty when all is well); read_quarantine is the
one function that touches files.

A lost write is found in quarantine when a file there holds its text in its pages and,
when the write's TXID is known (the proxy answered it), covers that TXID. Rows only
grow in this workload, so the page holding a row at the end of a file's TXID range was
written inside that range and the row's bytes are in the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ltx import LTXError, parse_filename
from ltx.decoder import open_decoder


@dataclass(frozen=True, slots=True)
class Lost:
    """A row a node committed that is not on the final primary."""

    token: str  # the row's unique text
    node: str  # the node that committed it
    txid: int | None  # its TXID on that node, when known
    detail: str = ""  # how it was answered, for the report


@dataclass(frozen=True, slots=True)
class QuarantinedFile:
    """One LTX file in a node's quarantine: its TXID range and its page bytes."""

    path: Path
    min_txid: int
    max_txid: int
    pages: bytes  # every page image, concatenated (small: a test database)

    def covers(self, txid: int) -> bool:
        return self.min_txid <= txid <= self.max_txid

    def holds(self, token: str) -> bool:
        return token.encode() in self.pages


def check_sync_acks(acked: Iterable[tuple[str, str, int]], present: set[str]) -> list[str]:
    """Writes answered ``Ltx-Sync: ok`` ((token, node, TXID)) must all be present."""
    missing = [f"{token} (TXID {txid:#x} on {node})" for token, node, txid in acked
               if token not in present]  # fmt: skip
    if not missing:
        return []
    return [f"{len(missing)} write(s) acknowledged with Ltx-Sync: ok lost: {missing[:10]}"]


def check_quarantined(
    lost: Sequence[Lost], files: Mapping[str, Sequence[QuarantinedFile]]
) -> list[str]:
    """Every lost row is in its node's quarantine, in a file covering its TXID if known."""
    problems = []
    for row in lost:
        mine = files.get(row.node, ())
        holding = [f for f in mine if f.holds(row.token)]
        if row.txid is not None:
            covering = [f for f in mine if f.covers(row.txid)]
            if not covering:
                problems.append(
                    f"{row.node}: TXID {row.txid:#x} ({row.token}{row.detail}) is not on the new primary "
                    f"and no quarantined file covers it "
                    f"(quarantined: {_ranges(mine) or 'nothing'})"
                )
            elif not any(f in holding for f in covering):
                problems.append(
                    f"{row.node}: the quarantined file covering TXID {row.txid:#x} "
                    f"({covering[0].path.name}) does not hold row {row.token}{row.detail}; "
                    f"files holding it: {[f.path.name for f in holding] or 'none'}"
                )
        elif not holding:
            problems.append(
                f"{row.node}: row {row.token}, committed while its sidecar was down, is not "
                f"on the new primary nor in its quarantine (quarantined: "
                f"{_ranges(mine) or 'nothing'})"
            )
    return problems


def _ranges(files: Sequence[QuarantinedFile]) -> str:
    """A short summary: how many files, and the TXIDs of the first and last."""
    if not files:
        return ""
    first, last = min(f.min_txid for f in files), max(f.max_txid for f in files)
    return f"{len(files)} file(s) within TXIDs {first:#x}-{last:#x}"


def read_quarantine(folder: Path) -> list[QuarantinedFile]:
    """Every LTX file under ``<data-dir>/quarantine/<db>/`` (all terms), decoded."""
    found = []
    for path in sorted(folder.glob("*/*.ltx")):
        try:
            min_txid, max_txid = parse_filename(path.name)
            with path.open("rb") as f:
                decoder = open_decoder(f, path=str(path))
                pages = b"".join(data for _, data in decoder.pages())
        except (OSError, LTXError) as exc:
            raise AssertionError(f"quarantined file {path} cannot be read: {exc}") from exc
        found.append(QuarantinedFile(path, min_txid, max_txid, pages))
    return found
