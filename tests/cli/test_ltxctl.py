"""ltxctl's file commands against the reference `ltx` CLI outputs in shared/ltx-fixtures.

Most tests run sidecar.cli.main() in-process and read stdout/stderr with capsys;
one runs the installed console script as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ltx
from sidecar import __version__
from sidecar.cli import (
    format_timestamp_nano,
    format_timestamp_seconds,
    hexdump,
    main,
    tabwriter_format,
)
from sidecar.fileutil import current_umask

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "ltx-fixtures"
GENERATED = FIXTURES / "generated"
DB_IMAGES = GENERATED / "db"
UPSTREAM = FIXTURES / "upstream" / "litefs-open-and-write-snapshot"
UPSTREAM_DB = UPSTREAM / "database"
UPSTREAM_DB_CHECKSUM = "fe3831a381c602b9"

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"LTX fixtures not found at {FIXTURES}: shared/ must sit beside the repository",
)

# The format generation each fixture folder holds (the folder names it; the file does not).
FOLDER_VERSION = {
    "v1-uncompressed": 1,
    "v1-lz4": 1,
    "v1-nochecksum": 1,
    "v2": 2,
    "v3-frame": 3,
    "v3-block": 3,
}
# Fixture chains of TXIDs 1, 2 and 3: (folder, file name prefix).
CHAINS = [
    ("v1-uncompressed", ""),
    ("v1-lz4", ""),
    ("v1-nochecksum", "nochecksum-"),
    ("v2", ""),
    ("v2", "nochecksum-"),
    ("v3-frame", ""),
    ("v3-frame", "nochecksum-"),
    ("v3-block", ""),
    ("v3-block", "nochecksum-"),
]
DELETION_FOLDERS = ["v1-uncompressed", "v3-block"]


def _folders() -> list[str]:
    return (
        sorted(p.name for p in GENERATED.iterdir() if p.name in FOLDER_VERSION)
        if FIXTURES.is_dir()
        else []
    )


def _expected_dumps(folder: str | None = None) -> list[Path]:
    if not FIXTURES.is_dir():
        return []
    pattern = f"{folder}/expected-cli/*.dump.txt" if folder else "*/expected-cli/*.dump.txt"
    return sorted(GENERATED.glob(pattern))


def _all_ltx_files() -> list[Path]:
    return sorted(FIXTURES.glob("*/*/*.ltx")) if FIXTURES.is_dir() else []


def _manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
    return data


def _txid_file(folder: str, txid: int, prefix: str = "") -> Path:
    return GENERATED / folder / f"{prefix}{txid:016x}-{txid:016x}.ltx"


def _db_image(txid: int) -> bytes:
    return (DB_IMAGES / f"db-after-txid-{txid}.bin").read_bytes()


def _rel(path: Path) -> str:
    return str(path.relative_to(FIXTURES))


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def _split_expected(path: Path) -> tuple[str, int]:
    """An expected-cli file: the tool's output and the exit status from the `exit=N` line."""
    text = path.read_text()
    body, sep, status = text.rpartition("exit=")
    assert sep and status.endswith("\n"), f"{path} does not end with an exit= line"
    return body, int(status)


_HEXDUMP_ROW = re.compile(r"^[0-9a-f]{8}  ")


def _without_hexdumps(text: str) -> str:
    """Remove page hexdumps (rows, *** lines and the blank line that ends each dump).

    Pre-v0.5.2 CLIs print `Frame #i: pgno=N` lines only; this turns the newer
    format into that one and leaves the old one unchanged.
    """
    out: list[str] = []
    in_dump = False
    for line in text.split("\n"):
        if _HEXDUMP_ROW.match(line) or (line == "***" and in_dump):
            in_dump = True
            continue
        if in_dump and line == "":
            in_dump = False
            continue
        in_dump = False
        out.append(line)
    return "\n".join(out)


def _pages_from_dump(text: str, page_size: int) -> dict[int, bytes]:
    """Rebuild each frame's page from a dump's hexdump, expanding `***` runs."""
    pages: dict[int, bytes] = {}
    pgno: int | None = None
    rows: list[bytes] = []
    pending_repeat = False

    def finish() -> None:
        if pgno is not None:
            pages[pgno] = b"".join(rows)

    for line in text.split("\n"):
        frame = re.match(r"^Frame #\d+: pgno=(\d+)$", line)
        if frame:
            finish()
            pgno, rows, pending_repeat = int(frame.group(1)), [], False
        elif line == "***":
            pending_repeat = True
        elif _HEXDUMP_ROW.match(line):
            offset = int(line[:8], 16)
            row = bytes.fromhex(line[10:59].replace("  ", " "))
            if pending_repeat:
                rows.extend([rows[-1]] * (offset // 16 - len(rows)))
                pending_repeat = False
            assert offset == 16 * len(rows), f"row at {offset:#x} out of place"
            rows.append(row)
        elif line == "" and pgno is not None and rows:
            finish()
            pgno, rows = None, []
    finish()
    for data in pages.values():
        assert len(data) == page_size
    return pages


# -- dump --------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("expected", _expected_dumps("v3-block"), ids=lambda p: p.name)
def test_dump_equals_reference_v3_block_byte_for_byte(
    capsys: pytest.CaptureFixture[str], expected: Path
) -> None:
    ltx_file = expected.parent.parent / expected.name.removesuffix(".dump.txt")
    want, status = _split_expected(expected)
    result = run(capsys, "dump", ltx_file)
    assert result.out == want
    assert result.code == status == 0


@needs_fixtures
@pytest.mark.parametrize("expected", _expected_dumps(), ids=_rel)
def test_dump_equals_reference_outside_hexdumps_in_every_folder(
    capsys: pytest.CaptureFixture[str], expected: Path
) -> None:
    ltx_file = expected.parent.parent / expected.name.removesuffix(".dump.txt")
    want, status = _split_expected(expected)
    result = run(capsys, "dump", ltx_file)
    assert _without_hexdumps(result.out) == _without_hexdumps(want)
    assert result.code == status


@needs_fixtures
@pytest.mark.parametrize("ltx_file", _all_ltx_files(), ids=_rel)
def test_dump_of_every_fixture_shows_its_manifest_header_and_pages(
    capsys: pytest.CaptureFixture[str], ltx_file: Path
) -> None:
    entry = next(e for e in _manifest()["ltx_files"] if e["path"] == _rel(ltx_file))
    h = entry["header"]
    result = run(capsys, "dump", ltx_file)
    assert result.code == 0, result.out
    folder = ltx_file.parent.name
    version = FOLDER_VERSION.get(folder, 1)  # upstream/: a LiteFS v1 file
    assert f"Version:   {version}\n" in result.out
    assert f"Page size: {h['page_size']}\nCommit:    {h['commit']}\n" in result.out
    assert f"Timestamp: {format_timestamp_nano(h['timestamp_ms'])} ({h['timestamp_ms']})\n" in (
        result.out
    )
    assert f"Post-apply:    {entry['post_apply_checksum']}\n" in result.out
    assert f"File Checksum: {entry['file_checksum']}\n" in result.out
    pages = _pages_from_dump(result.out, h["page_size"])
    assert list(pages) == [p["pgno"] for p in entry["pages"]]
    for page in entry["pages"]:
        assert hashlib.sha256(pages[page["pgno"]]).hexdigest() == page["sha256"]


def _header_block(version: int, **fields: Any) -> str:
    h = {
        "flags": 0,
        "page_size": 0,
        "commit": 0,
        "min_txid": 0,
        "max_txid": 0,
        "timestamp": 0,
        "pre": 0,
        "wal_offset": 0,
        "wal_size": 0,
        "salt1": 0,
        "salt2": 0,
        **fields,
    }
    return (
        "# HEADER\n"
        f"Version:   {version}\n"
        f"Flags:     0x{h['flags']:08x}\n"
        f"Page size: {h['page_size']}\n"
        f"Commit:    {h['commit']}\n"
        f"Min TXID:  {h['min_txid']:016x} ({h['min_txid']})\n"
        f"Max TXID:  {h['max_txid']:016x} ({h['max_txid']})\n"
        f"Timestamp: {format_timestamp_nano(h['timestamp'])} ({h['timestamp']})\n"
        f"Pre-apply: {h['pre']:016x}\n"
        f"WAL offset: {h['wal_offset']}\n"
        f"WAL size:   {h['wal_size']}\n"
        f"WAL salt:   {h['salt1']:08x} {h['salt2']:08x}\n"
        "\n"
    )


@needs_fixtures
def test_dump_of_bad_magic_prints_the_header_block_then_the_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = bytearray(_txid_file("v3-block", 2).read_bytes())
    data[0:4] = b"XTL1"
    bad = tmp_path / "bad.ltx"
    bad.write_bytes(data)
    result = run(capsys, "dump", bad)
    want = _header_block(
        3,
        page_size=512,
        commit=4,
        min_txid=2,
        max_txid=2,
        timestamp=1700000001000,
        pre=0x84AE6EA08DE48234,
        wal_offset=32,
        wal_size=1608,
        salt1=0x11223344,
        salt2=0x55667788,
    )
    assert result.code == 1
    assert result.out.startswith(want)
    error = result.out[len(want) :]
    assert error.count("\n") == 1 and "magic" in error
    assert "# PAGE DATA" not in result.out


@needs_fixtures
def test_dump_of_invalid_header_field_prints_the_header_block_then_the_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = bytearray(_txid_file("v3-block", 3).read_bytes())
    data[8:12] = (1000).to_bytes(4, "big")  # not a power of two
    bad = tmp_path / "bad.ltx"
    bad.write_bytes(data)
    result = run(capsys, "dump", bad)
    assert result.code == 1
    assert "Page size: 1000\n" in result.out
    assert result.out.endswith("\n\npage_size: invalid page size 1000\n")


@pytest.mark.parametrize("size", [0, 1, 99])
def test_dump_of_file_shorter_than_a_header_prints_a_zero_header_then_the_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, size: int
) -> None:
    short = tmp_path / "short.ltx"
    short.write_bytes(b"LTX1".ljust(size, b"\0")[:size])
    result = run(capsys, "dump", short)
    assert result.code == 1
    want = _header_block(0)
    assert result.out.startswith(want)
    assert result.out[len(want) :] == (
        f"header: file is {size} bytes, shorter than the 100-byte header\n"
    )


@needs_fixtures
def test_dump_of_corrupt_page_stops_at_that_frame(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = _txid_file("v3-block", 1)
    data = bytearray(src.read_bytes())
    with src.open("rb") as f:
        index = ltx.read_page_index(f)
    frame = index[2]
    # Claim a compressed size past the end of the page frames: the block cannot decode.
    data[frame.offset + 6 : frame.offset + 10] = (0xFFFF).to_bytes(4, "big")
    bad = tmp_path / "bad.ltx"
    bad.write_bytes(data)
    result = run(capsys, "dump", bad)
    assert result.code == 1
    assert "Frame #0: pgno=1\n" in result.out
    assert "Frame #1" not in result.out
    assert "# TRAILER" not in result.out
    last = result.out.rstrip("\n").split("\n")[-1]
    assert last.startswith("decode page frame 1: ")


@needs_fixtures
def test_dump_of_bad_file_checksum_prints_the_trailer_then_the_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = bytearray(_txid_file("v2", 3).read_bytes())
    data[-1] ^= 0x01
    bad = tmp_path / "bad.ltx"
    bad.write_bytes(data)
    result = run(capsys, "dump", bad)
    assert result.code == 1
    stored = int.from_bytes(data[-8:], "big")
    assert f"# TRAILER\nPost-apply:    f3da94677ee1946f\nFile Checksum: {stored:016x}\n\n" in (
        result.out
    )
    lines = result.out.split("\n")
    assert lines[-3:-2] == [""] and lines[-1] == ""
    assert "file checksum mismatch" in lines[-2]


def test_dump_of_missing_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.ltx"
    result = run(capsys, "dump", missing)
    assert result.code == 1
    assert result.out == f"{missing}: No such file or directory\n"


def test_dump_wants_exactly_one_file(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["a.ltx", "b.ltx"]):
        result = run(capsys, "dump", *args)
        assert result.code == 1
        assert result.out == ""
        assert result.err.count("\n") == 1 and result.err.startswith("ltxctl dump: ")


# -- hexdump and timestamps ---------------------------------------------------------------


def _row(offset: int, byte: int) -> str:
    h = " ".join([f"{byte:02x}"] * 8)
    text = chr(byte) if 32 <= byte <= 126 else "."
    return f"{offset:08x}  {h}  {h}  |{text * 16}|\n"


def test_hexdump_row_layout_and_ascii_column() -> None:
    data = bytes(range(0x18, 0x28)) + bytes([0x7D, 0x7E, 0x7F, 0x80, 0xFF, 0x20] + [0] * 10)
    assert hexdump(data) == (
        "00000000  18 19 1a 1b 1c 1d 1e 1f  20 21 22 23 24 25 26 27  |........ !\"#$%&'|\n"
        "00000010  7d 7e 7f 80 ff 20 00 00  00 00 00 00 00 00 00 00  |}~... ..........|\n"
    )


def test_hexdump_collapses_repeated_rows_but_keeps_first_and_last() -> None:
    data = bytes(16 * 4) + b"A" * 16 + bytes(16) + b"B" * 48
    assert hexdump(data) == (
        _row(0x00, 0)
        + "***\n"
        + _row(0x40, 0x41)
        + _row(0x50, 0)
        + _row(0x60, 0x42)
        + "***\n"
        + _row(0x80, 0x42)
    )


def test_hexdump_prints_both_rows_of_two_identical_rows() -> None:
    assert hexdump(b"x" * 32) == _row(0, 0x78) + _row(0x10, 0x78)
    assert hexdump(b"x" * 48) == _row(0, 0x78) + "***\n" + _row(0x20, 0x78)


def test_hexdump_of_constant_page_is_three_lines() -> None:
    assert hexdump(bytes(4096)) == _row(0, 0) + "***\n" + _row(0xFF0, 0)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1700000000000, "2023-11-14T22:13:20Z"),
        (1700000000001, "2023-11-14T22:13:20.001Z"),
        (1700000000120, "2023-11-14T22:13:20.12Z"),
        (1700000000500, "2023-11-14T22:13:20.5Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (951782400000, "2000-02-29T00:00:00Z"),
        (253402300799999, "9999-12-31T23:59:59.999Z"),
        (253402300800000, "10000-01-01T00:00:00Z"),
        (-62135596800000, "0001-01-01T00:00:00Z"),
        (-62135596800001, "0000-12-31T23:59:59.999Z"),
        (-62198755200000, "-0001-01-01T00:00:00Z"),
        (2**63 - 1, "292278994-08-17T07:12:55.807Z"),
        (-(2**63), "-292275055-05-16T16:47:04.192Z"),
    ],
)
def test_timestamps_print_as_go_rfc3339nano(ms: int, text: str) -> None:
    assert format_timestamp_nano(ms) == text


def test_timestamps_agree_with_datetime_across_its_range() -> None:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    step = 80_000_000_000_123  # about 2.5 years and some milliseconds: every field varies
    for ms in range(-62135596800000, 253402300800000, step):
        w = epoch + dt.timedelta(milliseconds=ms)
        seconds = (
            f"{w.year:04d}-{w.month:02d}-{w.day:02d}T{w.hour:02d}:{w.minute:02d}:{w.second:02d}"
        )
        assert format_timestamp_seconds(ms) == seconds + "Z"
        frac = f".{w.microsecond // 1000:03d}".rstrip("0") if w.microsecond else ""
        assert format_timestamp_nano(ms) == seconds + frac + "Z"


def test_list_timestamps_drop_the_fraction() -> None:
    assert format_timestamp_seconds(1700000000999) == "2023-11-14T22:13:20Z"
    assert format_timestamp_seconds(-1) == "1969-12-31T23:59:59Z"


# -- tabwriter --------------------------------------------------------------------------


def test_tabwriter_column_blocks_follow_go() -> None:
    # Go's text/tabwriter "elastic" example, left-aligned with '.' padding and
    # padding 1: the b's and the d's are in different column blocks, because
    # the "aaa" line has no cell in column 1.
    text = "a\tb\tc\naa\tbb\tcc\naaa\t\naaaa\tdddd\teeee\n"
    assert tabwriter_format(text, padding=1, padchar=".") == (
        "a....b..c\naa...bb.cc\naaa..\naaaa.dddd.eeee\n"
    )


def test_tabwriter_pads_empty_cells_and_leaves_last_cell_alone() -> None:
    text = "x\t\tlast one\nlonger\tyy\tz\n"
    assert tabwriter_format(text) == "x           last one\nlonger  yy  z\n"


def test_tabwriter_line_without_tabs_ends_the_blocks() -> None:
    text = "a\tb\nheader line\nccc\td\n"
    assert tabwriter_format(text) == "a  b\nheader line\nccc  d\n"


# -- list ------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("folder", _folders())
def test_list_tsv_equals_reference(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    monkeypatch.chdir(GENERATED / folder)
    names = sorted(p.name for p in Path().glob("*.ltx"))  # the shell's glob order
    result = run(capsys, "list", "-tsv", *names)
    assert result.out == (GENERATED / folder / "expected-cli" / "list.tsv").read_text()
    assert (result.code, result.err) == (0, "")


@needs_fixtures
@pytest.mark.parametrize("folder", _folders())
def test_list_aligned_pads_each_column_to_its_widest_cell_plus_two(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    monkeypatch.chdir(GENERATED / folder)
    names = sorted(p.name for p in Path().glob("*.ltx"))
    tsv = (GENERATED / folder / "expected-cli" / "list.tsv").read_text()
    rows = [line.split("\t") for line in tsv.splitlines()]
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]) - 1)]
    want = "".join(
        "".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + r[-1] + "\n" for r in rows
    )
    result = run(capsys, "list", *names)
    assert result.out == want
    assert result.code == 0
    assert run(capsys, "list", "--tsv", *names).out == tsv


@needs_fixtures
def test_list_reports_bad_files_on_stderr_and_still_exits_zero(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = _txid_file("v3-block", 1)
    corrupt = tmp_path / "corrupt.ltx"
    data = bytearray(good.read_bytes())
    data[200] ^= 0x55
    corrupt.write_bytes(data)
    missing = tmp_path / "missing.ltx"
    result = run(capsys, "list", "--tsv", corrupt, good, missing)
    assert result.code == 0
    lines = result.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("min_txid\tmax_txid\t")
    assert lines[1].startswith("0000000000000001\t0000000000000001\t3\t3\t")
    err = result.err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"{corrupt}: ")
    assert err[1] == f"{missing}: No such file or directory"


def test_list_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "list", "--tsv")
    assert result.code == 1
    assert result.err.count("\n") == 1 and "FILE" in result.err


@needs_fixtures
def test_list_leaves_timestamp_blank_when_zero(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = run(capsys, "list", "-tsv", UPSTREAM / "000000000000000d-000000000000000d.ltx")
    assert result.out.splitlines()[1].split("\t") == [
        "000000000000000d",
        "000000000000000d",
        "10",
        "3",
        "9c74a15b4e4f246c",
        UPSTREAM_DB_CHECKSUM,
        "",
        "0",
        "0",
        "00000000 00000000",
    ]


# -- verify ----------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("folder", _folders())
def test_verify_equals_reference(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    monkeypatch.chdir(GENERATED / folder)
    names = sorted(p.name for p in Path().glob("*.ltx"))
    want, status = _split_expected(GENERATED / folder / "expected-cli" / "verify.txt")
    result = run(capsys, "verify", *names)
    assert (result.out, result.code) == (want, status)


@needs_fixtures
def test_verify_reports_a_corrupted_copy_and_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = _txid_file("v1-lz4", 2)
    corrupt = tmp_path / good.name
    data = bytearray(good.read_bytes())
    data[-9] ^= 0x01  # the post-apply checksum: the file checksum no longer matches
    corrupt.write_bytes(data)
    missing = tmp_path / "missing.ltx"
    result = run(capsys, "verify", good, corrupt, missing)
    assert result.code == 1
    lines = result.out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{corrupt}: ") and "checksum" in lines[0]
    assert lines[1] == f"{missing}: No such file or directory"
    assert lines[2] == "1 ok, 2 invalid"
    assert result.err == ""


# -- checksum --------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("txid", [1, 2, 3])
def test_checksum_equals_reference(capsys: pytest.CaptureFixture[str], txid: int) -> None:
    name = f"db-after-txid-{txid}.bin"
    result = run(capsys, "checksum", DB_IMAGES / name)
    assert result.out == (DB_IMAGES / "expected-cli" / f"{name}.checksum.txt").read_text()
    assert result.code == 0


@needs_fixtures
def test_checksum_of_upstream_database(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "checksum", UPSTREAM_DB)
    assert (result.code, result.out) == (0, UPSTREAM_DB_CHECKSUM + "\n")


def test_checksum_rejects_files_that_are_not_databases(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    header = bytearray(100)
    header[16:18] = (512).to_bytes(2, "big")
    cases = {
        "empty": (b"", "empty file"),
        "short": (b"SQLite format 3\0" + bytes(20), "shorter than the 100-byte database header"),
        "partial": (bytes(header) + bytes(1000), "not a multiple of the page size 512"),
        "badsize": (bytes(512), "invalid page size 0"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = run(capsys, "checksum", path)
        assert result.code == 1, name
        assert result.out.count("\n") == 1 and result.out.startswith(f"{path}: "), name
        assert message in result.out, name
    result = run(capsys, "checksum", tmp_path / "missing")
    assert (result.code, result.out) == (1, f"{tmp_path / 'missing'}: No such file or directory\n")


def test_checksum_of_page_size_one_means_65536(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page = bytearray(65536)
    page[:16] = b"SQLite format 3\0"
    page[16:18] = (1).to_bytes(2, "big")
    db = tmp_path / "big-pages.db"
    db.write_bytes(bytes(page) + b"z" * 65536)
    result = run(capsys, "checksum", db)
    want = ltx.database_checksum([(1, bytes(page)), (2, b"z" * 65536)])
    assert (result.code, result.out) == (0, f"{want:016x}\n")


# -- apply -----------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize(("folder", "prefix"), CHAINS, ids=lambda v: v or "tracked")
def test_apply_chain_reproduces_each_database_image(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: str, prefix: str
) -> None:
    db = tmp_path / "sub" / "test.db"
    db.parent.mkdir()
    for txid in (1, 2, 3):
        result = run(capsys, "apply", "--db", db, _txid_file(folder, txid, prefix))
        assert (result.code, result.out, result.err) == (0, "", "")
        assert db.read_bytes() == _db_image(txid)
    # The same chain in one command, onto a fresh database.
    db2 = tmp_path / "in-one-go.db"
    files = [_txid_file(folder, txid, prefix) for txid in (1, 2, 3)]
    result = run(capsys, "apply", "-db", db2, *files)
    assert result.code == 0
    assert db2.read_bytes() == _db_image(3)
    assert stat.S_IMODE(db2.stat().st_mode) == 0o666 & ~current_umask()


@needs_fixtures
@pytest.mark.parametrize("folder", [f for f in FOLDER_VERSION if f != "v1-nochecksum"])
def test_apply_compacted_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: str
) -> None:
    db = tmp_path / "a.db"
    compacted = GENERATED / folder / "compacted-0000000000000001-0000000000000003.ltx"
    assert run(capsys, "apply", "--db", db, compacted).code == 0
    assert db.read_bytes() == _db_image(3)
    db2 = tmp_path / "b.db"
    tail = GENERATED / folder / "compacted-0000000000000002-0000000000000003.ltx"
    assert run(capsys, "apply", "--db", db2, _txid_file(folder, 1), tail).code == 0
    assert db2.read_bytes() == _db_image(3)


@needs_fixtures
def test_apply_snapshot_of_upstream_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "upstream.db"
    for folder in ("v1-uncompressed", "v1-lz4", "v3-frame", "v3-block"):
        snap = GENERATED / folder / "litefs-db-snapshot-0000000000000001-000000000000000d.ltx"
        # Over whatever the previous iteration left: a snapshot replaces the database.
        assert run(capsys, "apply", "--db", db, _txid_file("v3-block", 1), snap).code == 0
        assert db.read_bytes() == UPSTREAM_DB.read_bytes()


@needs_fixtures
@pytest.mark.parametrize("folder", DELETION_FOLDERS)
def test_apply_deletion_file_removes_database_and_siblings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, folder: str
) -> None:
    db = tmp_path / "gone.db"
    assert run(capsys, "apply", "--db", db, *(_txid_file(folder, t) for t in (1, 2, 3))).code == 0
    siblings = [Path(f"{db}{suffix}") for suffix in ("-wal", "-shm", "-journal")]
    for s in siblings:
        s.write_bytes(b"stale")
    result = run(capsys, "apply", "--db", db, _txid_file(folder, 4))
    assert (result.code, result.out) == (0, "")
    assert not db.exists()
    assert not any(s.exists() for s in siblings)
    # A whole history, deletion and then a new snapshot, in one command.
    result = run(capsys, "apply", "--db", db, *(_txid_file(folder, t) for t in (1, 2, 3, 4, 1)))
    assert result.code == 0
    assert db.read_bytes() == _db_image(1)


@needs_fixtures
def test_apply_in_wrong_order_fails_and_leaves_database_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "order.db"
    assert run(capsys, "apply", "--db", db, _txid_file("v3-block", 1)).code == 0
    third = _txid_file("v3-block", 3)
    result = run(capsys, "apply", "--db", db, third)
    assert result.code == 1
    assert result.out.count("\n") == 1
    assert result.out.startswith(f"{third}: ") and "pre-apply" in result.out
    assert db.read_bytes() == _db_image(1)
    # Within one command: the first file applies, the second fails, the first stays.
    db2 = tmp_path / "order2.db"
    result = run(
        capsys, "apply", "--db", db2, _txid_file("v2", 1), _txid_file("v2", 3), _txid_file("v2", 2)
    )
    assert result.code == 1
    assert result.out.startswith(f"{_txid_file('v2', 3)}: ")
    assert db2.read_bytes() == _db_image(1)


@needs_fixtures
def test_apply_of_corrupt_file_leaves_database_unchanged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "c.db"
    assert run(capsys, "apply", "--db", db, _txid_file("v1-uncompressed", 1)).code == 0
    data = bytearray(_txid_file("v1-uncompressed", 2).read_bytes())
    data[100 + 4 + 40] ^= 0xFF  # inside page 1's image
    corrupt = tmp_path / "corrupt.ltx"
    corrupt.write_bytes(data)
    result = run(capsys, "apply", "--db", db, corrupt)
    assert result.code == 1
    assert result.out.startswith(f"{corrupt}: ") and "checksum" in result.out
    assert db.read_bytes() == _db_image(1)


@needs_fixtures
def test_apply_of_missing_ltx_file_creates_no_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "never.db"
    missing = tmp_path / "missing.ltx"
    result = run(capsys, "apply", "--db", db, missing, _txid_file("v3-block", 1))
    assert (result.code, result.out) == (1, f"{missing}: No such file or directory\n")
    assert not db.exists()


def test_apply_needs_db_and_files(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["x.ltx"], ["--db", "x.db"]):
        result = run(capsys, "apply", *args)
        assert result.code == 1
        assert result.out == ""
        assert result.err.count("\n") == 1 and result.err.startswith("ltxctl apply: ")


# -- encode-db -------------------------------------------------------------------------


def _pages_of(image: bytes, page_size: int) -> list[tuple[int, bytes]]:
    lock = ltx.lock_pgno(page_size)
    return [
        (i // page_size + 1, image[i : i + page_size])
        for i in range(0, len(image), page_size)
        if i // page_size + 1 != lock
    ]


ENCODE_SOURCES = {
    "db-after-txid-3": (DB_IMAGES / "db-after-txid-3.bin", "f3da94677ee1946f", 512),
    "upstream": (UPSTREAM_DB, UPSTREAM_DB_CHECKSUM, 4096),
}


@needs_fixtures
@pytest.mark.parametrize("source", list(ENCODE_SOURCES))
@pytest.mark.parametrize(
    ("fmt", "version", "flags"), [("v3", 3, 0), ("v1", 1, 0), ("v1-lz4", 1, 1), (None, 3, 0)]
)
def test_encode_db_writes_a_snapshot_that_decodes_and_applies_to_the_image(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    source: str,
    fmt: str | None,
    version: int,
    flags: int,
) -> None:
    db, checksum, page_size = ENCODE_SOURCES[source]
    image = db.read_bytes()
    out = tmp_path / "snap.ltx"
    before = time.time_ns() // 1_000_000
    args: list[str | Path] = (
        ["encode-db", "-o", out, db]
        if fmt is None
        else ["encode-db", "--format", fmt, "--output", out, db]
    )
    result = run(capsys, *args)
    after = time.time_ns() // 1_000_000
    assert (result.code, result.out, result.err) == (0, "", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap.ltx"]  # no temporary left

    with out.open("rb") as f:
        dec = ltx.open_decoder(f)
        pages = list(dec.pages())
    h = dec.header
    assert int(dec.version) == version
    assert (h.flags, h.page_size, h.commit, h.min_txid, h.max_txid) == (
        flags,
        page_size,
        len(image) // page_size,
        1,
        1,
    )
    assert before <= h.timestamp <= after
    assert (h.pre_apply_checksum, h.wal_offset, h.wal_size, h.node_id) == (0, 0, 0, 0)
    assert pages == _pages_of(image, page_size)
    assert dec.trailer is not None
    assert f"{dec.trailer.post_apply_checksum:016x}" == checksum

    assert run(capsys, "verify", out).out == "ok\n"
    restored = tmp_path / "restored.db"
    assert run(capsys, "apply", "--db", restored, out).code == 0
    assert restored.read_bytes() == image


@needs_fixtures
@pytest.mark.parametrize("header_count", [0, 3, 99])
def test_encode_db_takes_page_count_from_file_size_when_header_disagrees(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, header_count: int
) -> None:
    image = bytearray(_db_image(2))  # 4 pages of 512 bytes; the header says 4
    image[28:32] = header_count.to_bytes(4, "big")
    db = tmp_path / "stale-header.db"
    db.write_bytes(image + b"partial page ignored")
    out = tmp_path / "out.ltx"
    assert run(capsys, "encode-db", "-o", out, db).code == 0
    with out.open("rb") as f:
        dec = ltx.open_decoder(f)
        pages = list(dec.pages())
    assert dec.header.commit == 4
    assert pages == _pages_of(bytes(image), 512)


@pytest.mark.slow
def test_encode_db_and_checksum_skip_the_lock_page(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    page_size = 65536
    lock = ltx.lock_pgno(page_size)  # 16385: the page at 1 GiB
    count = lock + 1
    first = bytearray(page_size)
    first[:16] = b"SQLite format 3\0"
    first[16:18] = (1).to_bytes(2, "big")
    first[28:32] = count.to_bytes(4, "big")
    db = tmp_path / "sparse.db"
    with db.open("wb") as f:  # sparse: only the first and last pages hold data
        f.write(first)
        f.seek((count - 1) * page_size)
        f.write(b"L" * page_size)
    want = ltx.page_checksum(1, first) ^ ltx.page_checksum(count, b"L" * page_size)
    for pgno in range(2, count):
        if pgno != lock:
            want ^= ltx.page_checksum(pgno, bytes(page_size))
    want |= ltx.CHECKSUM_FLAG

    result = run(capsys, "checksum", db)
    assert result.out == f"{want:016x}\n"
    out = tmp_path / "sparse.ltx"
    assert run(capsys, "encode-db", "-o", out, db).code == 0
    with out.open("rb") as f:
        dec = ltx.open_decoder(f)
        pgnos = [pgno for pgno, _ in dec.pages()]
    assert dec.header.commit == count
    assert lock not in pgnos and len(pgnos) == count - 1
    assert dec.trailer is not None and dec.trailer.post_apply_checksum == want


@needs_fixtures
def test_encode_db_replaces_existing_output_and_keeps_its_mode(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "snap.ltx"
    out.write_bytes(b"old contents")
    out.chmod(0o640)
    assert run(capsys, "encode-db", "-o", out, DB_IMAGES / "db-after-txid-1.bin").code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert run(capsys, "verify", out).code == 0
    fresh = tmp_path / "fresh.ltx"
    assert run(capsys, "encode-db", "-o", fresh, DB_IMAGES / "db-after-txid-1.bin").code == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~current_umask()


def test_encode_db_rejects_bad_input_and_leaves_output_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "out.ltx"
    out.write_bytes(b"keep me")
    not_db = tmp_path / "not.db"
    not_db.write_bytes(b"hello" * 200)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    tiny = tmp_path / "tiny.db"
    tiny.write_bytes(b"SQLite format 3\0" + (512).to_bytes(2, "big") + bytes(200))
    cases = [
        (not_db, "read database header: invalid database header"),
        (empty, "read database header: empty database"),
        (tiny, "database is 218 bytes, smaller than one 512-byte page"),
        (tmp_path / "missing.db", f"{tmp_path / 'missing.db'}: No such file or directory"),
    ]
    for db, message in cases:
        result = run(capsys, "encode-db", "-o", out, db)
        assert (result.code, result.out) == (1, message + "\n"), db
    result = run(capsys, "encode-db", "-o", out, out)
    assert (result.code, result.out) == (1, "input and output files are the same\n")
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.ltx", "not.db", "empty.db", "tiny.db"]
    )
    result = run(capsys, "encode-db", "-o", tmp_path / "no-such-dir" / "x.ltx", tiny)
    assert result.code == 1 and result.out.count("\n") == 1


def test_encode_db_needs_output_and_known_format(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["db"], ["-o", "x.ltx"], ["--format", "v2", "-o", "x.ltx", "db"]):
        result = run(capsys, "encode-db", *args)
        assert result.code == 1
        assert result.out == ""
        assert result.err.count("\n") == 1 and result.err.startswith("ltxctl encode-db: ")


# -- the command line itself -----------------------------------------------------------


def test_version_prints_name_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "version") == Result(0, f"ltxctl {__version__}\n", "")


@pytest.mark.parametrize("args", [[], ["help"], ["-h"], ["--help"], ["--version"]])
def test_no_command_prints_usage_and_exits_1(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    result = run(capsys, *args)
    assert result.code == 1
    assert "Usage:" in result.out
    for name in ("apply", "checksum", "dump", "encode-db", "list", "verify", "version"):
        assert f"\t{name} " in result.out


def test_unknown_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "frobnicate", "x") == Result(1, "ltxctl frobnicate: unknown command\n", "")


def test_command_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "apply", "-h")
    assert result.code == 0
    assert result.out.startswith("usage: ltxctl apply")


def test_unknown_option_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "verify", "--frob", "x.ltx")
    assert result.code == 1
    assert result.err.count("\n") == 1 and "--frob" in result.err


@needs_fixtures
def test_corrupted_files_give_one_line_errors_never_exceptions(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every truncation and many byte flips of one file per generation: clean errors only."""
    samples = [
        _txid_file("v1-uncompressed", 3),
        _txid_file("v1-lz4", 2),
        _txid_file("v2", 2),
        _txid_file("v3-frame", 3),
        _txid_file("v3-block", 2),
    ]
    for sample in samples:
        data = sample.read_bytes()
        variants: list[bytes] = [data[:n] for n in range(len(data))]
        for i in range(len(data)):
            flipped = bytearray(data)
            flipped[i] ^= 0xA5
            variants.append(bytes(flipped))
        variants.append(data + b"\0")
        paths = []
        folder = tmp_path / sample.parent.name
        folder.mkdir()
        for n, v in enumerate(variants):
            p = folder / f"{n:05d}.ltx"
            p.write_bytes(v)
            paths.append(p)
        result = run(capsys, "verify", *paths)
        assert result.code == 1
        lines = result.out.splitlines()
        failed = len(lines) - 1
        assert lines[-1] == f"{len(paths) - failed} ok, {failed} invalid"
        assert failed >= len(data) + 1  # every truncation and the extra byte at least
        listed = run(capsys, "list", "--tsv", *paths)
        assert listed.code == 0 and len(listed.err.splitlines()) == failed
        for p in paths[:: max(1, len(paths) // 60)]:
            dumped = run(capsys, "dump", p)
            assert dumped.code in (0, 1)
            assert "Traceback" not in dumped.out + dumped.err
            db = tmp_path / "fuzz.db"
            shutil.copyfile(DB_IMAGES / "db-after-txid-1.bin", db)
            applied = run(capsys, "apply", "--db", db, p)
            if applied.code:
                assert applied.out.startswith(f"{p}: ") and applied.out.count("\n") == 1


@needs_fixtures
def test_console_script_runs_as_a_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ltxctl"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sidecar.cli"]
    expected = (
        GENERATED / "v3-block" / "expected-cli" / "0000000000000002-0000000000000002.ltx.dump.txt"
    )
    want, status = _split_expected(expected)
    done = subprocess.run(
        [*command, "dump", str(_txid_file("v3-block", 2))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (status, want, "")

    db = tmp_path / "sub.db"
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    done = subprocess.run(
        [
            *command,
            "apply",
            "-db",
            str(db),
            str(_txid_file("v3-block", 1)),
            str(tmp_path / "nope.ltx"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    assert done.stdout == f"{tmp_path / 'nope.ltx'}: No such file or directory\n"
    assert done.stderr == ""
    assert db.read_bytes() == _db_image(1)
