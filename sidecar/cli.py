"""ltxctl: inspect, verify, apply and create LTX files from the command line.

The file commands behave like the reference ``ltx`` tool of superfly/ltx
(``cmd/ltx`` on main; docs/ltx-format.md section 12): the same output formats,
errors printed on stdout as one line, exit status 1 on failure. ``dump``
prints the detected format generation as its ``Version`` line, and reads every
generation (v1, v2, v3) where each reference release reads only its own.

Each subcommand is one :class:`Command` in :data:`COMMANDS`, registered with
the :func:`command` decorator: a function that adds its arguments to an
argparse parser and a function that runs it. Commands that talk to the
daemon's HTTP API are added the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO, cast

import ltx
from ltx.header import is_valid_page_size
from sidecar import __version__
from sidecar.config import Config, ConfigError, DatabaseNameError, load_config, validate_db_name
from sidecar.dbcopy import CopyError, validate_sqlite_file
from sidecar.fileutil import atomic_write, fsync_dir, remove_files

PROG = "ltxctl"

# -- errors ------------------------------------------------------------------------


class CommandError(Exception):
    """A failure reported as one line on stdout, with exit status 1 (as the reference does)."""


class DaemonCommandError(CommandError):
    """A failure of a command that talks to the daemon: one line on stderr, exit status 1.

    These commands print data on stdout (often for a pipe or --json), so their errors
    go to stderr, unlike the file commands, which follow the reference tool.
    """


class UsageError(Exception):
    """Bad command-line arguments: one line on stderr, exit status 1."""


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling sys.exit, so main() can return."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def describe(exc: BaseException, *, filename: bool = True) -> str:
    """One line for an error: the LTX library's message, or an OS error without the errno.

    With filename=False an OSError omits the file name, for messages that
    already start with ``<path>: ``.
    """
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename
        if filename and name is not None:
            return f"{os.fsdecode(name)}: {exc.strerror}"
        return exc.strerror
    return str(exc)


# -- the command registry -------------------------------------------------------------

RunFunction = Callable[[argparse.Namespace], int]
ArgumentsFunction = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    summary: str  # one line for the command list
    description: str  # the paragraph shown by `ltxctl <command> -h`
    add_arguments: ArgumentsFunction
    run: RunFunction


COMMANDS: dict[str, Command] = {}


def command(
    name: str, summary: str, description: str, add_arguments: ArgumentsFunction
) -> Callable[[RunFunction], RunFunction]:
    """Register the decorated function as the subcommand ``name``."""

    def register(run: RunFunction) -> RunFunction:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = Command(name, summary, description, add_arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name,
            help=cmd.summary,
            description=cmd.description,
            prog=f"{PROG} {cmd.name}",
            allow_abbrev=False,
        )
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def usage() -> str:
    width = max(len(name) for name in COMMANDS) + 4
    lines = "".join(f"\t{c.name:<{width}} {c.summary}\n" for _, c in sorted(COMMANDS.items()))
    return (
        f"{PROG} is a command-line tool for LTX files and the ltx-sidecar daemon.\n"
        f"\nUsage:\n\n\t{PROG} <command> [arguments]\n\nThe commands are:\n\n{lines}\n"
        f"Run '{PROG} <command> -h' for a command's arguments.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ltxctl with argv (default sys.argv[1:]); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (ltxctl dump FILE | head): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a real file (tests)
            pass
        finally:
            os.close(devnull)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: list[str]) -> int:
    if not args or args[0] == "help" or args[0].startswith("-"):
        sys.stdout.write(usage())
        return 1
    name = args[0]
    if name not in COMMANDS:
        print(f"{PROG} {name}: unknown command")
        return 1
    try:
        ns, extra = build_parser().parse_known_args(args)
        if extra:  # name the subcommand, as its own parser would
            raise UsageError(f"{PROG} {name}: unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 1
    except _ParserExit as exc:  # -h/--help
        return exc.status
    run: RunFunction = ns.run
    try:
        return run(ns)
    except DaemonCommandError as exc:
        print(exc, file=sys.stderr)
    except CommandError as exc:
        print(exc)
    except BrokenPipeError:
        raise
    except (ltx.LTXError, OSError, http.client.HTTPException) as exc:
        # The daemon commands keep stdout for their data; the file commands print
        # errors on stdout as the reference tool does.
        stream = sys.stderr if name in DAEMON_COMMANDS else sys.stdout
        print(f"{PROG} {name}: {describe(exc) or type(exc).__name__}", file=stream)
    return 1


@contextmanager
def _open_input(path: str) -> Iterator[BinaryIO]:
    """Open a file for reading, turning a failure into a CommandError naming it."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; the with is the caller's)
    except OSError as exc:
        raise CommandError(f"{path}: {describe(exc, filename=False)}") from None
    with f:
        yield f


# -- formatting shared with the reference tool -------------------------------------------


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) in the proleptic Gregorian calendar, days counted from 1970-01-01.

    Howard Hinnant's algorithm; exact for any integer, as Go's time package is
    across the whole int64 millisecond range (Python's datetime stops at year 9999).
    """
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


def _format_utc_seconds(seconds: int) -> str:
    days, rem = divmod(seconds, 86400)
    year, month, day = _civil_from_days(days)
    # Go's "2006" layout: at least four digits, a minus sign before negative years.
    y = f"-{-year:04d}" if year < 0 else f"{year:04d}"
    return f"{y}-{month:02d}-{day:02d}T{rem // 3600:02d}:{rem // 60 % 60:02d}:{rem % 60:02d}"


def format_timestamp_nano(ms: int) -> str:
    """time.UnixMilli(ms).UTC().Format(time.RFC3339Nano): trailing fraction zeros dropped."""
    seconds, millis = divmod(ms, 1000)
    fraction = f".{millis:03d}".rstrip("0") if millis else ""
    return f"{_format_utc_seconds(seconds)}{fraction}Z"


def format_timestamp_seconds(ms: int) -> str:
    """time.UnixMilli(ms).UTC().Format(time.RFC3339): whole seconds, fraction dropped."""
    return f"{_format_utc_seconds(ms // 1000)}Z"


_PRINTABLE = bytes(b if 32 <= b <= 126 else ord(".") for b in range(256))


def _hexdump_row(offset: int, row: bytes) -> str:
    hex_bytes = row.hex(" ")
    left, right = hex_bytes[:23], hex_bytes[24:]
    text = row.translate(_PRINTABLE).decode("ascii")
    return f"{offset:08x}  {left:<23}  {right:<23}  |{text}|\n"


def hexdump(data: bytes) -> str:
    """The reference's page hexdump (ltx internal/hexdump.go).

    16 bytes a row: an 8-digit hex offset, two groups of 8 hex bytes and the
    bytes as ASCII between bars. Rows equal to the row before, other than the
    first and last rows, are left out, each run replaced by one ``***`` line.
    """
    out: list[str] = []
    rows = (len(data) + 15) // 16
    last = rows - 1
    prev: bytes | None = None
    skipping = False
    for i in range(rows):
        row = data[i * 16 : i * 16 + 16]
        if 0 < i < last and row == prev:
            if not skipping:
                out.append("***\n")
                skipping = True
            continue
        skipping = False
        prev = row
        out.append(_hexdump_row(i * 16, row))
    return "".join(out)


def tabwriter_format(text: str, *, minwidth: int = 0, padding: int = 2, padchar: str = " ") -> str:
    """Align tab-separated text as Go's text/tabwriter does with flags 0.

    A cell is text ended by a tab; the last piece of a line is not a cell and
    is never padded. Cells in the same column of adjacent lines form a column
    block whose width is its widest cell plus padding; a line without a cell
    in that column ends the block. (tabwidth only matters when padding with
    tabs, which padchar ' ' never does.)
    """
    lines = [line.split("\t") for line in text.split("\n")]
    widths: list[int] = []
    out: list[str] = []

    def write_lines(line0: int, line1: int) -> None:
        for i in range(line0, line1):
            cells = lines[i]
            for j, cell in enumerate(cells):
                out.append(cell)
                if j < len(widths):
                    out.append(padchar * (widths[j] - len(cell)))
            if i + 1 < len(lines):
                out.append("\n")

    def format_block(line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(line0, this)
            line0 = this
            width = minwidth
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            format_block(line0, this)
            widths.pop()
            line0 = this
        write_lines(line0, line1)

    format_block(0, len(lines))
    return "".join(out)


# -- dump -----------------------------------------------------------------------------

# The header's fields without the magic check, for printing a header that fails to decode.
_RAW_HEADER = struct.Struct(">4sIIIQQqQqqIIQ")
_RAW_TRAILER = struct.Struct(">QQ")

# Fields of errors raised after the page frames, in what the reference does in Close().
_TRAILER_FIELDS = frozenset(
    {"page_index", "index_size", "trailer", "post_apply_checksum", "file_checksum"}
)


def _raw_header(head: bytes) -> ltx.Header:
    if len(head) < ltx.HEADER_SIZE:
        return ltx.Header(page_size=0, commit=0, min_txid=0, max_txid=0)
    f = _RAW_HEADER.unpack_from(head)
    return ltx.Header(
        flags=f[1],
        page_size=f[2],
        commit=f[3],
        min_txid=f[4],
        max_txid=f[5],
        timestamp=f[6],
        pre_apply_checksum=f[7],
        wal_offset=f[8],
        wal_size=f[9],
        wal_salt1=f[10],
        wal_salt2=f[11],
        node_id=f[12],
    )


def _format_dump_header(version: int, h: ltx.Header) -> str:
    return (
        "# HEADER\n"
        f"Version:   {version}\n"
        f"Flags:     0x{h.flags:08x}\n"
        f"Page size: {h.page_size}\n"
        f"Commit:    {h.commit}\n"
        f"Min TXID:  {h.min_txid:016x} ({h.min_txid})\n"
        f"Max TXID:  {h.max_txid:016x} ({h.max_txid})\n"
        f"Timestamp: {format_timestamp_nano(h.timestamp)} ({h.timestamp})\n"
        f"Pre-apply: {h.pre_apply_checksum:016x}\n"
        f"WAL offset: {h.wal_offset}\n"
        f"WAL size:   {h.wal_size}\n"
        f"WAL salt:   {h.wal_salt1:08x} {h.wal_salt2:08x}\n"
        "\n"
    )


def _dump_decoder(f: BinaryIO, head: bytes, size: int) -> ltx.Decoder | ltx.LTXError:
    """A decoder positioned after the header, or the error that stops the header decoding."""
    try:
        ltx.Header.from_bytes(head)  # a short file or a wrong magic
        return ltx.open_decoder(f)
    except ltx.HeaderError as exc:
        return exc
    except ltx.LTXError:
        # Every candidate generation failed past the header: dump the likeliest
        # one, so the failure shows up where it happens.
        f.seek(0)
        try:
            return ltx.Decoder(f, version=ltx.detect_versions(head, size)[0])
        except ltx.LTXError as exc:
            return exc


def _add_dump_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="the LTX file")


@command(
    "dump",
    "writes out the header, page data and trailer of an LTX file",
    "Print the header, every page (with a hexdump) and the trailer of one LTX file, "
    "verifying it as it goes. The Version line is the detected format generation.",
    _add_dump_arguments,
)
def cmd_dump(args: argparse.Namespace) -> int:
    out = sys.stdout
    with _open_input(args.file) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(ltx.HEADER_SIZE + 16)
        f.seek(0)
        dec = _dump_decoder(f, head, size)
        if isinstance(dec, ltx.LTXError):
            short = len(head) < ltx.HEADER_SIZE
            version = 0 if short else int(ltx.detect_versions(head, size)[0])
            out.write(_format_dump_header(version, _raw_header(head)))
            raise CommandError(str(dec))
        out.write(_format_dump_header(int(dec.version), dec.header))

        out.write("# PAGE DATA\n")
        close_error: ltx.LTXError | None = None
        try:
            for i, (pgno, data) in enumerate(dec.pages()):
                out.write(f"Frame #{i}: pgno={pgno}\n{hexdump(data)}\n")
        except ltx.LTXError as exc:
            if exc.field not in _TRAILER_FIELDS:
                raise CommandError(f"decode page frame {dec.page_count}: {exc}") from None
            close_error = exc
        out.write("\n")

        trailer = dec.trailer
        if trailer is None:  # what the reference shows: the file's last 16 bytes
            tail = b""
            if size >= ltx.HEADER_SIZE + ltx.TRAILER_SIZE:
                f.seek(size - ltx.TRAILER_SIZE)
                tail = f.read(ltx.TRAILER_SIZE)
            trailer = ltx.Trailer.from_bytes(tail.rjust(ltx.TRAILER_SIZE, b"\0"))
        out.write(
            "# TRAILER\n"
            f"Post-apply:    {trailer.post_apply_checksum:016x}\n"
            f"File Checksum: {trailer.file_checksum:016x}\n"
            "\n"
        )
        if close_error is not None:
            raise CommandError(str(close_error))
    return 0


# -- list and verify -------------------------------------------------------------------

LIST_COLUMNS = (
    "min_txid",
    "max_txid",
    "commit",
    "pages",
    "preapply",
    "postapply",
    "timestamp",
    "wal_offset",
    "wal_size",
    "wal_salt",
)


def _verify_file(path: str) -> ltx.Decoder:
    """Open and fully decode one LTX file; return its finished decoder."""
    with open(path, "rb") as f:
        dec = ltx.open_decoder(f)
        dec.verify()
        return dec


def _list_row(path: str) -> str:
    dec = _verify_file(path)
    h = dec.header
    assert dec.trailer is not None
    timestamp = format_timestamp_seconds(h.timestamp) if h.timestamp else ""
    return (
        f"{h.min_txid:016x}\t{h.max_txid:016x}\t{h.commit}\t{dec.page_count}\t"
        f"{h.pre_apply_checksum:016x}\t{dec.trailer.post_apply_checksum:016x}\t{timestamp}\t"
        f"{h.wal_offset}\t{h.wal_size}\t{h.wal_salt1:08x} {h.wal_salt2:08x}\n"
    )


def _add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tsv", "-tsv", action="store_true", help="tab-separated values instead of aligned"
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="LTX files")


@command(
    "list",
    "lists header & trailer fields for LTX files in a table",
    "Verify each LTX file in full and print one table row of its header and trailer "
    "fields. A file that fails is reported on stderr as '<path>: <error>'; the "
    "command still succeeds.",
    _add_list_arguments,
)
def cmd_list(args: argparse.Namespace) -> int:
    header = "\t".join(LIST_COLUMNS) + "\n"
    rows = [header]
    if args.tsv:
        sys.stdout.write(header)
    for path in args.files:
        try:
            row = _list_row(path)
        except (ltx.LTXError, OSError) as exc:
            sys.stderr.write(f"{path}: {describe(exc, filename=False)}\n")
            continue
        if args.tsv:
            sys.stdout.write(row)
        else:
            rows.append(row)
    if not args.tsv:
        sys.stdout.write(tabwriter_format("".join(rows)))
    return 0


def _add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="LTX files")


@command(
    "verify",
    "reads & verifies checksums of a set of LTX files",
    "Decode each LTX file in full, checking its structure and checksums. Prints 'ok' "
    "when all pass; otherwise '<path>: <error>' for each failure and a count.",
    _add_verify_arguments,
)
def cmd_verify(args: argparse.Namespace) -> int:
    ok = invalid = 0
    for path in args.files:
        try:
            _verify_file(path)
        except (ltx.LTXError, OSError) as exc:
            invalid += 1
            print(f"{path}: {describe(exc, filename=False)}")
            continue
        ok += 1
    if invalid:
        raise CommandError(f"{ok} ok, {invalid} invalid")
    print("ok")
    return 0


# -- checksum -------------------------------------------------------------------------


def _add_checksum_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", metavar="DBFILE", help="SQLite database file")


@command(
    "checksum",
    "computes the LTX checksum of a database file",
    "Print the LTX database checksum of a SQLite database file: every whole page, "
    "the lock page excluded, with the page size from the database header.",
    _add_checksum_arguments,
)
def cmd_checksum(args: argparse.Namespace) -> int:
    path = args.db
    with _open_input(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(100)
        if size == 0:
            raise CommandError(f"{path}: empty file, not a database")
        if len(head) < 100:
            raise CommandError(
                f"{path}: file is {len(head)} bytes, shorter than the 100-byte database header"
            )
        page_size = ltx.header_page_size(head)
        if not is_valid_page_size(page_size):
            raise CommandError(f"{path}: invalid page size {page_size} in the database header")
        if size % page_size:
            raise CommandError(
                f"{path}: file size {size} is not a multiple of the page size {page_size}"
            )
        f.seek(0)
        print(f"{ltx.checksum_file(f, page_size):016x}")
    return 0


# -- apply ----------------------------------------------------------------------------

DB_SIBLING_SUFFIXES = ("-wal", "-shm", "-journal")


def _open_db(path: str) -> tuple[BinaryIO, bool]:
    """Open a database image read-write, creating it (0666 less the umask) if missing."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_RDWR)
        created = False
    return os.fdopen(fd, "r+b"), created


def _add_apply_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", "-db", required=True, metavar="DBFILE", help="database file")
    p.add_argument("files", nargs="+", metavar="LTX", help="LTX files, applied in order")


@command(
    "apply",
    "applies a set of LTX files to a database",
    "Apply LTX files in order to a database file, creating it if missing. Each file "
    "is verified, and must follow from the database's checksum, before any page is "
    "written; a deletion file removes the database and its -wal, -shm and -journal files.",
    _add_apply_arguments,
)
def cmd_apply(args: argparse.Namespace) -> int:
    db_path: str = args.db
    try:
        db, created = _open_db(db_path)
    except OSError as exc:
        raise CommandError(f"{db_path}: {describe(exc, filename=False)}") from None
    db_file: BinaryIO | None = db
    applied = 0
    try:
        for path in args.files:
            if db_file is None:  # a deletion came before: start a new database
                db_file, _ = _open_db(db_path)
            try:
                with open(path, "rb") as ltx_file:
                    header, _ = ltx.apply_ltx(db_file, ltx_file)
            except (ltx.LTXError, OSError) as exc:
                raise CommandError(f"{path}: {describe(exc, filename=False)}") from None
            applied += 1
            if header.commit == 0:
                db_file.close()
                db_file = None
                remove_files([db_path, *(db_path + s for s in DB_SIBLING_SUFFIXES)])
    finally:
        if db_file is not None:
            db_file.flush()
            os.fsync(db_file.fileno())
            db_file.close()
            if created and applied == 0:
                # Nothing was applied to a database this command created: leave no file.
                remove_files([db_path])
            elif created:
                fsync_dir(Path(db_path).parent)
    return 0


# -- encode-db ------------------------------------------------------------------------

ENCODE_FORMATS: dict[str, tuple[ltx.Version, int]] = {
    "v3": (ltx.Version.V3, 0),
    "v1": (ltx.Version.V1, 0),
    "v1-lz4": (ltx.Version.V1, ltx.FLAG_COMPRESS_LZ4),
}


def _read_database_geometry(f: BinaryIO, size: int) -> tuple[int, int]:
    """(page size, page count) of a SQLite database file.

    The header's page count (offset 28) is used only when it agrees with the
    file size, which therefore decides: SQLite leaves the count stale in files
    written by versions before 3.7.0, and a header of zero means "unknown". A
    trailing partial page is ignored.
    """
    head = f.read(100)
    if not head:
        raise CommandError("read database header: empty database")
    page_size = ltx.database_page_size(head)
    if page_size is None:
        raise CommandError("read database header: invalid database header")
    if not is_valid_page_size(page_size):
        raise CommandError(f"read database header: invalid page size {page_size}")
    page_count = size // page_size
    if page_count == 0:
        raise CommandError(f"database is {size} bytes, smaller than one {page_size}-byte page")
    return page_size, page_count


def _add_encode_db_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LTX file to write")
    p.add_argument(
        "--format",
        choices=list(ENCODE_FORMATS),
        default="v3",
        help="v3 (block-compressed pages, the default), v1 (what LiteFS reads) "
        "or v1-lz4 (v1 with an LZ4-compressed body)",
    )
    p.add_argument("db", metavar="DBFILE", help="SQLite database file")


@command(
    "encode-db",
    "encodes an SQLite database into an LTX file",
    "Write a snapshot LTX file (TXID 1) of a SQLite database file. The output is "
    "written to a temporary file in the same directory, fsynced and renamed into place.",
    _add_encode_db_arguments,
)
def cmd_encode_db(args: argparse.Namespace) -> int:
    out_path: str = args.output
    version, flags = ENCODE_FORMATS[args.format]
    with _open_input(args.db) as db:
        st = os.fstat(db.fileno())
        try:
            if os.path.samestat(st, os.stat(out_path)):
                raise CommandError("input and output files are the same")
        except FileNotFoundError:
            pass
        page_size, page_count = _read_database_geometry(db, st.st_size)
        header = ltx.Header(
            page_size=page_size,
            commit=page_count,
            min_txid=1,
            max_txid=1,
            flags=flags,
            timestamp=time.time_ns() // 1_000_000,
        )
        lock = ltx.lock_pgno(page_size)
        db.seek(0)
        with atomic_write(out_path) as out:
            enc = ltx.Encoder(out, header, version=version)
            for pgno in range(1, page_count + 1):
                data = db.read(page_size)
                if len(data) != page_size:
                    raise CommandError(f"read page {pgno}: database file ended (did it shrink?)")
                if pgno != lock:
                    enc.write_page(pgno, data)
            enc.finish()
    return 0


# -- talking to the daemon (status, promote, export, import) ---------------------------
#
# These commands use the sidecar's HTTP API (sidecar/api.py) with the cluster token.
# Where to reach it and the token come from the command line, the environment, the
# configuration file and the data directory, in that order.

DEFAULT_DATA_DIR = Path("./ltx-data")
STATUS_TIMEOUT = 10.0
TRANSFER_TIMEOUT = 300.0  # seconds without progress before export or import gives up
TRANSFER_CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 8 << 20  # smaller transfers finish before a bar would help
DEFAULT_WATCH_SECONDS = 2.0


DAEMON_COMMANDS = frozenset({"status", "promote", "export", "import"})


class SidecarUnreachable(DaemonCommandError):
    """The sidecar did not answer at all (not running, wrong URL)."""


@dataclass(frozen=True)
class Target:
    """Where the sidecar is and what proves we may act on it."""

    url: str
    data_dir: Path
    cfg: Config | None
    token: str | None
    token_error: str | None = None  # why the token file could not be read


def _add_target_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", help="the sidecar API (default: from the configuration, http://127.0.0.1:20202)"
    )
    p.add_argument(
        "--token", help="the cluster token (default: $LTX_SIDECAR_TOKEN, then <data-dir>/token)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        default=os.environ.get("LTX_SIDECAR_CONFIG"),
        help="the sidecar's TOML configuration (default: $LTX_SIDECAR_CONFIG)",
    )
    where.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="the sidecar's data directory (./ltx-data)"
    )


def local_api_url(cfg: Config) -> str:
    """The URL of this machine's sidecar API: its listening address, wildcards as loopback."""
    host = cfg.api.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.api.port}"


def _target(args: argparse.Namespace, prog: str) -> Target:
    cfg: Config | None = None
    if args.data_dir is None or args.url is None:
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise DaemonCommandError(f"{prog}: invalid configuration: {exc}") from None
    data_dir: Path = args.data_dir or (cfg.data_dir if cfg else DEFAULT_DATA_DIR)
    url = (args.url or (local_api_url(cfg) if cfg else "http://127.0.0.1:20202")).rstrip("/")
    token = args.token or os.environ.get("LTX_SIDECAR_TOKEN") or (cfg.token if cfg else "")
    token_error = None
    if not token:
        from sidecar.auth import read_token_file  # imports aiohttp: only when needed

        try:
            token = read_token_file(data_dir / "token") or ""
        except OSError as exc:
            token_error = f"{data_dir / 'token'}: {describe(exc, filename=False)}"
    return Target(url, data_dir, cfg, token or None, token_error)


def _require_token(target: Target, prog: str) -> str:
    if target.token:
        return target.token
    why = f" ({target.token_error})" if target.token_error else ""
    raise DaemonCommandError(
        f"{prog}: no token{why}: give --token, set $LTX_SIDECAR_TOKEN, or run where "
        f"{target.data_dir / 'token'} is readable"
    )


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def api_request(
    target: Target,
    prog: str,
    method: str,
    path: str,
    *,
    body: BinaryIO | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = STATUS_TIMEOUT,
) -> http.client.HTTPResponse:
    """Send one request to the sidecar; a failure becomes one DaemonCommandError line."""
    all_headers = dict(headers or {})
    if target.token:
        all_headers["Authorization"] = f"Bearer {target.token}"
    request = urllib.request.Request(
        target.url + path, data=body, headers=all_headers, method=method
    )
    try:
        response: http.client.HTTPResponse = _OPENER.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            first = exc.read(4096).decode("utf-8", "replace").strip().splitlines()
        if exc.code == 401:
            raise DaemonCommandError(
                f"{prog}: the sidecar at {target.url} refused the token (401): give the "
                "cluster's token with --token, $LTX_SIDECAR_TOKEN or <data-dir>/token"
            ) from None
        detail = f": {first[0]}" if first else ""
        raise DaemonCommandError(f"{prog}: the sidecar answered {exc.code}{detail}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = describe(reason) if isinstance(reason, BaseException) else str(reason)
        raise SidecarUnreachable(
            f"{prog}: the sidecar at {target.url} does not answer ({text})"
        ) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise SidecarUnreachable(
            f"{prog}: the sidecar at {target.url} does not answer ({describe(exc) or exc!r})"
        ) from None
    return response


def api_json(target: Target, prog: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
    with api_request(target, prog, method, path, **kw) as response:
        raw = response.read()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise DaemonCommandError(f"{prog}: the sidecar's answer is not JSON") from None
    if not isinstance(doc, dict):
        raise DaemonCommandError(f"{prog}: the sidecar's answer is not a JSON object")
    return doc


# -- progress bar ------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr for large transfers, only on a terminal."""

    WIDTH = 30

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.label = label
        self.total = total
        self.done = 0
        self._shown = 0.0
        big = total is None or total >= PROGRESS_MIN_BYTES
        self.enabled = big and self.stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._shown >= 0.1:
            self._shown = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        done = format_bytes(self.done)
        if not self.total:
            return f"{self.label} {done}"
        part = min(1.0, self.done / self.total)
        bar = "#" * int(part * self.WIDTH)
        return (
            f"{self.label} [{bar:<{self.WIDTH}}] {part * 100:3.0f}% "
            f"{done} of {format_bytes(self.total)}"
        )

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()


class _ProgressReader:
    """A file for http.client to send, counting what it reads."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f = f
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._progress.update(len(data))
        return data


def format_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours}h{minutes}m"
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


# -- status --------------------------------------------------------------------------------


def _cell(value: object, fmt: Callable[[Any], str] | None = None) -> str:
    if value is None or value == "":
        return "-"
    if fmt is not None and isinstance(value, int | float) and not isinstance(value, bool):
        return fmt(value)
    return str(value)


def _table(rows: list[list[str]]) -> str:
    return tabwriter_format("\n".join("\t".join(r) for r in rows)) + "\n"


def _lag(db: dict[str, Any], role: str) -> str:
    if role == "primary":
        return "-"
    txids, seconds = db.get("lag_txids", 0), db.get("lag_seconds", 0.0)
    if not txids and not seconds:
        return "current"
    return f"{txids} txids, {format_duration(float(seconds or 0))}"


def format_status(doc: dict[str, Any], now: float | None = None) -> str:
    """GET /status as the readable table of ``ltxctl status``."""
    now = time.time() if now is None else now
    role = str(doc.get("role", "?"))
    primary = doc.get("primary") or None
    state = f"{role} (epoch {doc.get('epoch', 0)}, {'ready' if doc.get('ready') else 'not ready'})"
    who = f"{primary['node_id']} at {primary['api_url']}" if primary else "unknown"
    out = _table(
        [
            ["Node", f"{doc.get('node_id', '?')} at {doc.get('api_url', '?')}"],
            ["Role", state],
            ["Primary", who],
            ["Uptime", format_duration(float(doc.get("uptime_seconds", 0)))],
        ]
    )
    dbs = doc.get("databases") or []
    rows = [["DATABASE", "TXID", "CHECKSUM", "SIZE", "WAL", "LAG"]]
    for db in dbs:
        name = str(db.get("name", "?")) + (" (deleted)" if db.get("deleted") else "")
        rows.append(
            [
                name,
                str(db.get("txid", "-")),
                str(db.get("checksum", "-")),
                _cell(db.get("size"), format_bytes),
                _cell(db.get("wal_size"), format_bytes),
                _lag(db, role),
            ]
        )
    out += "\n" + (_table(rows) if dbs else "No databases.\n")
    errors = [db for db in dbs if db.get("error") or db.get("problem")]
    for db in errors:
        out += f"  {db.get('name')}: {db.get('error') or db.get('problem')}\n"
    replicas = doc.get("replicas") or []
    if role == "primary":
        out += "\n" + (_format_replicas(replicas, now) if replicas else "No replicas.\n")
    return out


def _format_replicas(replicas: list[dict[str, Any]], now: float) -> str:
    rows = [["REPLICA", "CONNECTED", "LAST REPORT", "DATABASE", "TXID", "LAG"]]
    for replica in replicas:
        last = replica.get("last_report")
        seen = f"{format_duration(max(0.0, now - float(last)))} ago" if last else "never"
        head = [str(replica.get("node_id", "?")), "yes" if replica.get("connected") else "no"]
        dbs = replica.get("databases") or {}
        if not dbs:
            rows.append([*head, seen, "-", "-", "-"])
        for name, pos in sorted(dbs.items()):
            lag = pos.get("lag_txids", 0)
            rows.append([*head, seen, name, str(pos.get("txid", "-")), f"{lag} txids"])
            head = ["", ""]
            seen = ""
    return _table(rows)


def read_local_state(data_dir: Path, cfg: Config | None) -> dict[str, Any]:
    """What the data directory and the replica files say when the sidecar does not answer.

    ``<data-dir>/dbs/<name>/state.json`` (written by the primary every second),
    ``<db>-pos`` beside each configured replica database and the ``.primary`` file.
    """
    databases: list[dict[str, Any]] = []
    dbs_dir = data_dir / "dbs"
    if dbs_dir.is_dir():
        for state_file in sorted(dbs_dir.glob("*/state.json")):
            try:
                doc = json.loads(state_file.read_text())
            except (OSError, ValueError) as exc:
                doc = {"error": f"{state_file}: {describe(exc)}"}
            if isinstance(doc, dict):
                doc.setdefault("name", state_file.parent.name)
                databases.append({**doc, "source": str(state_file)})
    places: set[Path] = set()
    pos_files: set[Path] = set()
    if cfg is not None:
        for path in cfg.databases.paths:
            places.add(path.parent)
            pos_files.add(Path(f"{path}-pos"))
        for directory in cfg.databases.dirs:
            places.add(directory)
            pos_files.update(directory.glob("*-pos"))
    for pos_file in sorted(p for p in pos_files if p.is_file()):
        entry: dict[str, Any] = {"name": pos_file.name[: -len("-pos")], "source": str(pos_file)}
        try:
            pos = ltx.Pos.parse(pos_file.read_text())
        except (OSError, ltx.LTXError) as exc:
            entry["error"] = describe(exc)
        else:
            entry.update(
                role="replica", txid=f"{pos.txid:016x}", checksum=f"{pos.post_apply_checksum:016x}"
            )
        databases.append(entry)
    primary = None
    for place in sorted(places):
        with contextlib.suppress(OSError):
            primary = (place / ".primary").read_text().strip() or None
            break
    return {"running": False, "data_dir": str(data_dir), "primary": primary, "databases": databases}


def format_local_state(doc: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    out = f"From {doc['data_dir']}:\n"
    if doc.get("primary"):
        out += f"Primary (from .primary): {doc['primary']}\n"
    dbs = doc.get("databases") or []
    if not dbs:
        return out + "No database state found.\n"
    rows = [["DATABASE", "ROLE", "TXID", "CHECKSUM", "SIZE", "WAL", "WRITTEN", "SOURCE"]]
    for db in dbs:
        updated = db.get("updated")
        age = f"{format_duration(max(0.0, now - float(updated)))} ago" if updated else "-"
        rows.append(
            [
                str(db.get("name", "?")),
                _cell(db.get("role")),
                _cell(db.get("txid")),
                _cell(db.get("checksum")),
                _cell(db.get("size"), format_bytes),
                _cell(db.get("wal_size"), format_bytes),
                age,
                str(db.get("source", "-")),
            ]
        )
    out += _table(rows)
    for db in dbs:
        if db.get("error"):
            out += f"  {db.get('name')}: {db['error']}\n"
    return out


def _add_status_arguments(p: argparse.ArgumentParser) -> None:
    _add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until interrupted",
    )


def _status_once(args: argparse.Namespace, target: Target) -> int:
    prog = f"{PROG} status"
    try:
        doc = api_json(target, prog, "GET", "/status")
    except SidecarUnreachable as exc:
        print(f"{exc}; showing what {target.data_dir} holds", file=sys.stderr)
        local = read_local_state(target.data_dir, target.cfg)
        print(json.dumps(local, indent=2) if args.json else format_local_state(local), end="")
        if args.json:
            print()
        return 1
    print(json.dumps(doc, indent=2) if args.json else format_status(doc), end="")
    if args.json:
        print()
    return 0


@command(
    "status",
    "shows the sidecar's role, databases and replicas",
    "Show this node's id, role, epoch and primary, every database's TXID, checksum, "
    "size and lag, and on the primary every replica's position. When the sidecar does "
    "not answer, show what its data directory holds (exit status 1).",
    _add_status_arguments,
)
def cmd_status(args: argparse.Namespace) -> int:
    target = _target(args, f"{PROG} status")
    if args.watch is None:
        return _status_once(args, target)
    if args.watch <= 0:
        raise UsageError(f"{PROG} status: --watch needs a positive number of seconds")
    clear = sys.stdout.isatty()
    try:
        while True:
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            _status_once(args, target)
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


# -- promote, export, import ---------------------------------------------------------------


def _add_promote_arguments(p: argparse.ArgumentParser) -> None:
    _add_target_arguments(p)
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the handoff (60)"
    )


@command(
    "promote",
    "makes this node the primary (planned handoff)",
    "Ask the sidecar to take over the primary role from the current primary, which "
    "hands off once this node has caught up.",
    _add_promote_arguments,
)
def cmd_promote(args: argparse.Namespace) -> int:
    prog = f"{PROG} promote"
    target = _target(args, prog)
    _require_token(target, prog)
    result = api_json(target, prog, "POST", "/promote", timeout=args.timeout)
    node, epoch = result.get("node_id"), result.get("epoch")
    if node is not None and epoch is not None:
        print(f"{node} is the primary (epoch {epoch})")
    else:
        print(json.dumps(result))
    return 0


def _db_path_part(name: str, prog: str) -> str:
    try:
        return urllib.parse.quote(validate_db_name(name), safe="")
    except DatabaseNameError as exc:
        raise DaemonCommandError(f"{prog}: {exc}") from None


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    _add_target_arguments(p)
    p.add_argument("--db", required=True, metavar="NAME", help="the database to export")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")


@command(
    "export",
    "writes a consistent copy of a database to a file",
    "Download a consistent copy of a replicated database from the sidecar (any node). "
    "The file appears only when complete.",
    _add_export_arguments,
)
def cmd_export(args: argparse.Namespace) -> int:
    prog = f"{PROG} export"
    target = _target(args, prog)
    _require_token(target, prog)
    path = f"/db/{_db_path_part(args.db, prog)}/export"
    out = Path(args.output)
    with api_request(target, prog, "GET", path, timeout=TRANSFER_TIMEOUT) as response:
        length = response.getheader("Content-Length")
        progress = Progress(f"export {args.db}", int(length) if length else None)
        try:
            with atomic_write(out) as f:
                while chunk := response.read(TRANSFER_CHUNK):
                    f.write(chunk)
                    progress.update(len(chunk))
                if length is not None and progress.done != int(length):
                    raise DaemonCommandError(
                        f"{prog}: the transfer ended after {progress.done} of {length} bytes"
                    )
        except (TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            raise DaemonCommandError(f"{prog}: the transfer failed: {describe(exc)}") from None
        finally:
            progress.close()
    print(f"exported {args.db} to {out} ({format_bytes(progress.done)})")
    return 0


def _add_import_arguments(p: argparse.ArgumentParser) -> None:
    _add_target_arguments(p)
    p.add_argument("--db", required=True, metavar="NAME", help="the database to replace")
    p.add_argument("file", metavar="FILE", help="a SQLite database file")


@command(
    "import",
    "replaces a database cluster-wide with a SQLite file",
    "Upload a SQLite database file that replaces the database's content on the primary, "
    "in one transaction that every replica then applies. The file is checked first "
    "(header, page size, PRAGMA integrity_check): a file that is not a sound SQLite "
    "database is refused before anything is sent.",
    _add_import_arguments,
)
def cmd_import(args: argparse.Namespace) -> int:
    prog = f"{PROG} import"
    target = _target(args, prog)
    _require_token(target, prog)
    path = f"/db/{_db_path_part(args.db, prog)}/import"
    src = Path(args.file)
    try:
        validate_sqlite_file(src)
    except CopyError as exc:
        raise DaemonCommandError(f"{prog}: {src}: refused: {exc}") from None
    with _open_input(str(src)) as f:
        size = os.fstat(f.fileno()).st_size
        progress = Progress(f"import {args.db}", size)
        headers = {"Content-Type": "application/vnd.sqlite3", "Content-Length": str(size)}
        body = cast(BinaryIO, _ProgressReader(f, progress))
        try:
            result = api_json(
                target, prog, "POST", path, body=body, headers=headers, timeout=TRANSFER_TIMEOUT
            )
        finally:
            progress.close()
    detail = ", ".join(f"{k} {v}" for k, v in result.items() if k != "db")
    print(f"imported {src} into {args.db}" + (f" ({detail})" if detail else ""))
    return 0


# -- version --------------------------------------------------------------------------


def _add_no_arguments(p: argparse.ArgumentParser) -> None:
    pass


@command("version", "prints the version", "Print the ltxctl version.", _add_no_arguments)
def cmd_version(args: argparse.Namespace) -> int:
    print(f"{PROG} {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
