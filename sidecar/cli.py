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
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

import ltx
from ltx.header import is_valid_page_size
from sidecar import __version__
from sidecar.fileutil import atomic_write, fsync_dir, remove_files

PROG = "ltxctl"

# -- errors ------------------------------------------------------------------------


class CommandError(Exception):
    """A failure reported as one line on stdout, with exit status 1 (as the reference does)."""


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
    except CommandError as exc:
        print(exc)
    except BrokenPipeError:
        raise
    except (ltx.LTXError, OSError) as exc:
        print(f"{PROG} {name}: {describe(exc)}")
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


# -- version --------------------------------------------------------------------------


def _add_no_arguments(p: argparse.ArgumentParser) -> None:
    pass


@command("version", "prints the version", "Print the ltxctl version.", _add_no_arguments)
def cmd_version(args: argparse.Namespace) -> int:
    print(f"{PROG} {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
