"""The replication wire format: frames between nodes, and the /stream request body.

A pure codec in the manner of h11: no sockets, no asyncio, no files. Bytes go in,
small frozen dataclasses come out, and :func:`encode` turns them back into bytes.
docs/protocol.md describes every byte; this module is the executable form of it.

Three HTTP bodies are sequences of frames, each decoded by a :class:`FrameDecoder`
told which body it reads (``expect``):

* ``"stream"``: the response of ``POST /stream``, primary to replica: HELLO first,
  then LTX fragments, READY, HEARTBEAT, RESYNC, HANDOFF, and END last.
* ``"positions"``: the request body of ``POST /pos``, replica to primary: POSITIONS
  reports of what the replica has applied.
* ``"resync"``: the request body of ``POST /resync``, replica to primary: one
  RESYNC_BEGIN, then PAGE_HASHES covering pages 1..page_count.

The request body of ``POST /stream`` is a small JSON document instead
(:func:`parse_stream_request`, :func:`encode_stream_request`).

Every frame is ``header (20 bytes) || payload (<= MAX_PAYLOAD) || xxh3_64 (8 bytes)``.
The header carries the type, flags, payload length, the lease epoch of the term
that sent it, and a 32-bit check of itself, so a damaged length is caught before
the decoder waits for (or allocates) a payload that will never come. Anything
wrong raises :class:`FrameError`, naming the frame, its stream offset and the field.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, TypeAlias
from urllib.parse import urlsplit

import xxhash

from ltx.checksum import CHECKSUM_FLAG
from ltx.errors import LTXError
from ltx.header import is_valid_page_size, parse_txid
from sidecar.config import NODE_ID, DatabaseNameError, validate_db_name

__all__ = [
    "CHECKSUM_SIZE",
    "CONTENT_TYPE_FRAMES",
    "DEFAULT_FRAGMENT_SIZE",
    "FLAG_MAY_SKIP",
    "FRAME_OVERHEAD",
    "HASHES_PER_FRAME",
    "HEADER_SIZE",
    "LOCK_PAGE_HASH",
    "MAX_PAGE_HASHES",
    "MAX_PAYLOAD",
    "MAX_REQUEST_BODY",
    "MAX_URL_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "DatabasePosition",
    "End",
    "Expect",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "Handoff",
    "Heartbeat",
    "Hello",
    "LtxFragment",
    "PageHashes",
    "Positions",
    "Ready",
    "Resync",
    "ResyncBegin",
    "ResyncReason",
    "ResyncRequest",
    "StaleEpochError",
    "StreamRequest",
    "UnknownFrame",
    "decode_resync_request",
    "encode",
    "encode_stream_request",
    "ltx_fragments",
    "page_hash",
    "parse_stream_request",
    "resync_request_frames",
    "split_positions",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

HEADER_SIZE = 20
CHECKSUM_SIZE = 8
FRAME_OVERHEAD = HEADER_SIZE + CHECKSUM_SIZE
MAX_PAYLOAD = 1 << 20  # 1 MiB: a length field above this is an error before any allocation

FLAG_MAY_SKIP = 0x01  # a receiver that does not know the type skips the frame

MAX_URL_BYTES = 1024
MAX_REQUEST_BODY = 4 << 20  # the JSON body of POST /stream
DEFAULT_FRAGMENT_SIZE = 256 << 10  # LTX bytes per LTX frame made by ltx_fragments()
HASHES_PER_FRAME = 65536  # page hashes per PAGE_HASHES frame made by resync_request_frames()
MAX_PAGE_HASHES = (MAX_PAYLOAD - 4) // 8
LOCK_PAGE_HASH = 0  # the lock page (SQLite never writes it) is sent as hash 0 and ignored

CONTENT_TYPE_FRAMES = "application/vnd.ltx-sidecar.frames"

_U64_LIMIT = 1 << 64
_U32_LIMIT = 1 << 32
_PREFIX = struct.Struct(">BBHIQ")  # type, flags, reserved, length, epoch: 16 bytes
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_LTX_HEAD = struct.Struct(">IB")  # index, flags
_POS_HEAD = struct.Struct(">QQ")  # txid, checksum
_RESYNC_HEAD = struct.Struct(">QQB")  # txid, checksum, reason
_BEGIN_HEAD = struct.Struct(">IIQQ")  # page_size, page_count, txid, checksum

_LTX_LAST = 0x01

assert NODE_ID.pattern is not None
_NODE_ID = NODE_ID.pattern  # the same rule as the node-id setting: [A-Za-z0-9][A-Za-z0-9._-]{0,254}
_URL = re.compile(r"https?://[!-~]+")  # printable ASCII, no spaces


# -- errors ------------------------------------------------------------------------------


class FrameError(ValueError):
    """Bytes or a body from another node that this module rejects.

    ``field`` names what is wrong (``epoch``, ``databases[2].txid``); ``where`` names
    the frame (its number, type and byte offset in the body) when a decoder knows it.
    After a FrameError the connection is useless: drop it, reconnect and re-request
    from the last applied position.
    """

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None):
        self.message = message
        self.field = field
        self.where = where
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.field}: {self.message}" if self.field else self.message
        return f"{self.where}: {text}" if self.where else text

    def _located(self, where: str) -> Self:
        if self.where is None:
            self.where = where
            self.args = (self._render(),)
        return self

    def _nested(self, prefix: str) -> Self:
        self.field = f"{prefix}.{self.field}" if self.field else prefix
        self.args = (self._render(),)
        return self


class StaleEpochError(FrameError):
    """A frame from a lease term older than one this node has already seen (issue 5)."""


# -- field checks ------------------------------------------------------------------------


def _uint(value: object, bits: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise FrameError(f"must be an integer in 0..2**{bits}-1, got {value!r}", field=field)
    return value


def _is_u64(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < _U64_LIMIT


def _name_bytes(name: object, field: str = "name") -> bytes:
    """A database name checked with sidecar.config.validate_db_name, as UTF-8."""
    if not isinstance(name, str):
        raise FrameError(f"must be a string, got {type(name).__name__}", field=field)
    try:
        validate_db_name(name)
        return name.encode("utf-8")
    except DatabaseNameError as exc:
        raise FrameError(str(exc), field=field) from None
    except UnicodeEncodeError:
        raise FrameError(f"database name {name!r} is not valid Unicode", field=field) from None


def _node_id_bytes(node_id: object, field: str = "node_id") -> bytes:
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise FrameError(
            f"must be a node id (1-255 of letters, digits, '.', '_', '-', starting with "
            f"a letter or digit), got {node_id!r}",
            field=field,
        )
    return node_id.encode("ascii")


def _url_bytes(url: object, field: str = "advertise_url") -> bytes:
    if isinstance(url, str) and len(url) <= MAX_URL_BYTES and _URL.fullmatch(url):
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        if host:
            return url.encode("ascii")
    text = repr(url) if not isinstance(url, str) else repr(url[:64])
    raise FrameError(
        f"must be an http:// or https:// URL with a host, printable ASCII without spaces, "
        f"at most {MAX_URL_BYTES} bytes, got {text}",
        field=field,
    )


def _to_bytes(value: object, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise FrameError(f"must be bytes, got {type(value).__name__}", field=field)


# -- reading payloads --------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from one payload; every failure is a FrameError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, field: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise FrameError(
                f"payload ends {end - len(self.data)} bytes short of this field", field=field
            )
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def unpack(self, st: struct.Struct, field: str) -> tuple[Any, ...]:
        return st.unpack(self.take(st.size, field))

    def u8(self, field: str) -> int:
        return int(self.unpack(_U8, field)[0])

    def u16(self, field: str) -> int:
        return int(self.unpack(_U16, field)[0])

    def u32(self, field: str) -> int:
        return int(self.unpack(_U32, field)[0])

    def name(self, field: str = "name") -> str:
        raw = self.take(self.u8(field), field)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"database name {raw!r} is not valid UTF-8", field=field) from None
        _name_bytes(text, field)
        return text

    def node_id(self, field: str = "node_id") -> str:
        raw = self.take(self.u8(field), field)
        text = raw.decode("latin-1")  # any byte maps; the pattern then allows only ASCII
        _node_id_bytes(text, field)
        return text

    def positions(self) -> tuple[DatabasePosition, ...]:
        count = self.u32("count")
        if count * _MIN_ENTRY > self.remaining:
            raise FrameError(
                f"{count} positions cannot fit in the {self.remaining} bytes left", field="count"
            )
        out = []
        for i in range(count):
            txid, checksum = self.unpack(_POS_HEAD, f"positions[{i}]")
            out.append(DatabasePosition(self.name(f"positions[{i}].name"), txid, checksum))
        return tuple(out)

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise FrameError(
                f"{len(self.data) - self.pos} bytes after the last field", field="payload"
            )


def _name_field(raw: bytes) -> bytes:
    return _U8.pack(len(raw)) + raw


# -- frames ------------------------------------------------------------------------------


class FrameType(enum.IntEnum):
    """The type byte of a frame. 0 is never valid; 11..255 are free for later versions."""

    HELLO = 1
    LTX = 2
    READY = 3
    HEARTBEAT = 4
    RESYNC = 5
    END = 6
    HANDOFF = 7
    POSITIONS = 8
    RESYNC_BEGIN = 9
    PAGE_HASHES = 10


class ResyncReason(enum.IntEnum):
    """Why the primary asks a replica for a page-hash resync (logged by the replica)."""

    DIVERGED = 1  # same TXID with another checksum, or the next file does not follow
    TOO_OLD = 2  # the primary's log no longer holds the files after the replica's TXID
    AHEAD = 3  # the replica's TXID is beyond the primary's (it wrote as an old primary)


@dataclass(frozen=True, slots=True)
class DatabasePosition:
    """One database's position: name, TXID and post-apply database checksum."""

    name: str
    txid: int
    checksum: int

    def __post_init__(self) -> None:
        _name_bytes(self.name)
        _uint(self.txid, 64, "txid")
        _uint(self.checksum, 64, "checksum")

    def _encode(self) -> bytes:
        return _POS_HEAD.pack(self.txid, self.checksum) + _name_field(self.name.encode("utf-8"))

    def __str__(self) -> str:
        return f"{self.name}@{self.txid:016x}/{self.checksum:016x}"


_MIN_ENTRY = _POS_HEAD.size + 1  # txid, checksum, name length (names are checked later)


def _check_positions(owner: object, positions: object) -> tuple[DatabasePosition, ...]:
    if not isinstance(positions, Iterable):
        raise FrameError("must be a sequence of DatabasePosition", field="positions")
    items = tuple(positions)
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, DatabasePosition):
            raise FrameError(
                f"must be a DatabasePosition, got {type(item).__name__}", field=f"positions[{i}]"
            )
        if item.name in seen:
            raise FrameError(f"duplicate database {item.name!r}", field=f"positions[{i}].name")
        seen.add(item.name)
    object.__setattr__(owner, "positions", items)
    return items


def _encode_positions(positions: tuple[DatabasePosition, ...]) -> bytes:
    return _U32.pack(len(positions)) + b"".join(p._encode() for p in positions)


class _FrameBase:
    """What every frame class provides; the frames themselves are frozen dataclasses."""

    __slots__ = ()
    TYPE: ClassVar[int]
    FLAGS: ClassVar[int] = 0
    epoch: int

    def _payload(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Hello(_FrameBase):
    """First frame of a /stream response: who the primary is and which protocol it speaks."""

    TYPE: ClassVar[int] = FrameType.HELLO
    epoch: int
    node_id: str
    advertise_url: str
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _node_id_bytes(self.node_id)
        _url_bytes(self.advertise_url)
        if _uint(self.version, 16, "version") == 0:
            raise FrameError("protocol version 0 is not valid", field="version")

    def _payload(self) -> bytes:
        url = self.advertise_url.encode("ascii")
        return (
            _U16.pack(self.version)
            + _name_field(self.node_id.encode("ascii"))
            + _U16.pack(len(url))
            + url
        )

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        version = r.u16("version")
        node_id = r.node_id()
        url = r.take(r.u16("advertise_url"), "advertise_url").decode("latin-1")
        return cls(epoch, node_id, url, version)


@dataclass(frozen=True, slots=True)
class LtxFragment(_FrameBase):
    """A piece of one LTX file of database ``name``: fragment ``index`` (0 first), ``last``.

    A file travels as fragments 0, 1, ... with ``last`` set on the final one; a
    small file is a single fragment with index 0 and last set. Fragments of
    different databases may interleave; those of one database never do.
    """

    TYPE: ClassVar[int] = FrameType.LTX
    epoch: int
    name: str
    index: int
    last: bool
    data: bytes

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        name = _name_bytes(self.name)
        _uint(self.index, 32, "index")
        if not isinstance(self.last, bool):
            raise FrameError(f"must be a bool, got {self.last!r}", field="last")
        data = _to_bytes(self.data, "data")
        object.__setattr__(self, "data", data)
        room = MAX_PAYLOAD - _LTX_HEAD.size - 1 - len(name)
        if not 1 <= len(data) <= room:
            raise FrameError(
                f"fragment is {len(data)} bytes; must be 1..{room} for this name", field="data"
            )

    def _payload(self) -> bytes:
        flags = _LTX_LAST if self.last else 0
        return b"".join(
            (
                _LTX_HEAD.pack(self.index, flags),
                _name_field(self.name.encode("utf-8")),
                self.data,
            )
        )

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        index, flags = r.unpack(_LTX_HEAD, "index")
        if flags & ~_LTX_LAST:
            raise FrameError(f"unknown fragment flags 0x{flags:02x}", field="fragment_flags")
        name = r.name()
        return cls(epoch, name, index, bool(flags & _LTX_LAST), r.rest())


@dataclass(frozen=True, slots=True)
class _MarkFrame(_FrameBase):
    """A frame that is only its type and epoch (no payload)."""

    epoch: int

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        return cls(epoch)


@dataclass(frozen=True, slots=True)
class Ready(_MarkFrame):
    """Sent once, after the primary's first pass over every database."""

    TYPE: ClassVar[int] = FrameType.READY


@dataclass(frozen=True, slots=True)
class Heartbeat(_FrameBase):
    """About every second: the primary's clock and its current position per database."""

    TYPE: ClassVar[int] = FrameType.HEARTBEAT
    epoch: int
    timestamp_ms: int
    positions: tuple[DatabasePosition, ...] = ()

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _uint(self.timestamp_ms, 64, "timestamp_ms")
        _check_positions(self, self.positions)

    def _payload(self) -> bytes:
        return _U64.pack(self.timestamp_ms) + _encode_positions(self.positions)

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        timestamp = r.unpack(_U64, "timestamp_ms")[0]
        return cls(epoch, timestamp, r.positions())


@dataclass(frozen=True, slots=True)
class Resync(_FrameBase):
    """The primary asks the replica to resync ``name`` by page hashes (POST /resync)."""

    TYPE: ClassVar[int] = FrameType.RESYNC
    epoch: int
    name: str
    reason: ResyncReason
    txid: int  # the primary's position for the database when it decided
    checksum: int

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _name_bytes(self.name)
        try:
            object.__setattr__(self, "reason", ResyncReason(self.reason))
        except ValueError:
            raise FrameError(f"unknown resync reason {self.reason!r}", field="reason") from None
        _uint(self.txid, 64, "txid")
        _uint(self.checksum, 64, "checksum")

    def _payload(self) -> bytes:
        return _RESYNC_HEAD.pack(self.txid, self.checksum, self.reason) + _name_field(
            self.name.encode("utf-8")
        )

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        txid, checksum, reason = r.unpack(_RESYNC_HEAD, "txid")
        return cls(epoch, r.name(), reason, txid, checksum)


@dataclass(frozen=True, slots=True)
class End(_MarkFrame):
    """A clean end of the stream; nothing may follow it."""

    TYPE: ClassVar[int] = FrameType.END


@dataclass(frozen=True, slots=True)
class Handoff(_FrameBase):
    """Planned handoff: writes are paused at ``positions``; ``target`` takes the lease."""

    TYPE: ClassVar[int] = FrameType.HANDOFF
    epoch: int
    target: str
    positions: tuple[DatabasePosition, ...] = ()

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _node_id_bytes(self.target, "target")
        _check_positions(self, self.positions)

    def _payload(self) -> bytes:
        return _name_field(self.target.encode("ascii")) + _encode_positions(self.positions)

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        target = r.node_id("target")
        return cls(epoch, target, r.positions())


@dataclass(frozen=True, slots=True)
class Positions(_FrameBase):
    """Replica to primary (POST /pos): what replica ``node_id`` has applied."""

    TYPE: ClassVar[int] = FrameType.POSITIONS
    epoch: int  # the epoch of the primary whose stream the replica applies
    node_id: str
    positions: tuple[DatabasePosition, ...] = ()

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _node_id_bytes(self.node_id)
        _check_positions(self, self.positions)

    def _payload(self) -> bytes:
        return _name_field(self.node_id.encode("ascii")) + _encode_positions(self.positions)

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        node_id = r.node_id()
        return cls(epoch, node_id, r.positions())


@dataclass(frozen=True, slots=True)
class ResyncBegin(_FrameBase):
    """First frame of a POST /resync body: the replica's copy of database ``name``.

    ``checksum`` is the LTX database checksum of the pages exactly as hashed for
    this request (not the recorded position, which a file edited behind the
    sidecar's back no longer matches); the primary's answer carries it as its
    pre-apply checksum. ``txid`` is the replica's recorded TXID, for the logs.
    """

    TYPE: ClassVar[int] = FrameType.RESYNC_BEGIN
    epoch: int
    node_id: str
    name: str
    page_size: int
    page_count: int
    txid: int
    checksum: int

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        _node_id_bytes(self.node_id)
        _name_bytes(self.name)
        if not isinstance(self.page_size, int) or not is_valid_page_size(self.page_size):
            raise FrameError(
                f"must be a power of two in 512..65536, got {self.page_size!r}", field="page_size"
            )
        _uint(self.page_count, 32, "page_count")
        _uint(self.txid, 64, "txid")
        if not _uint(self.checksum, 64, "checksum") & CHECKSUM_FLAG:
            raise FrameError(
                f"database checksum {self.checksum:016x} lacks the flag bit 1<<63",
                field="checksum",
            )

    def _payload(self) -> bytes:
        return b"".join(
            (
                _BEGIN_HEAD.pack(self.page_size, self.page_count, self.txid, self.checksum),
                _name_field(self.name.encode("utf-8")),
                _name_field(self.node_id.encode("ascii")),
            )
        )

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        page_size, page_count, txid, checksum = r.unpack(_BEGIN_HEAD, "page_size")
        name = r.name()
        node_id = r.node_id()
        return cls(epoch, node_id, name, page_size, page_count, txid, checksum)


@dataclass(frozen=True, slots=True)
class PageHashes(_FrameBase):
    """xxh3_64 hashes (:func:`page_hash`) of pages first_pgno, first_pgno + 1, ..."""

    TYPE: ClassVar[int] = FrameType.PAGE_HASHES
    epoch: int
    first_pgno: int
    hashes: tuple[int, ...]

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        if _uint(self.first_pgno, 32, "first_pgno") == 0:
            raise FrameError("page numbers start at 1", field="first_pgno")
        hashes = tuple(self.hashes)
        object.__setattr__(self, "hashes", hashes)
        if not 1 <= len(hashes) <= MAX_PAGE_HASHES:
            raise FrameError(
                f"{len(hashes)} hashes; a frame holds 1..{MAX_PAGE_HASHES}", field="hashes"
            )
        if self.first_pgno + len(hashes) - 1 >= _U32_LIMIT:
            raise FrameError("page numbers run past 2**32-1", field="hashes")
        try:  # in C: a frame holds up to 131,071 of them
            struct.pack(f">{len(hashes)}Q", *hashes)
        except struct.error:
            bad = next(i for i, h in enumerate(hashes) if not _is_u64(h))
            raise FrameError(
                f"must be an integer in 0..2**64-1, got {hashes[bad]!r}", field=f"hashes[{bad}]"
            ) from None

    @property
    def last_pgno(self) -> int:
        return self.first_pgno + len(self.hashes) - 1

    def _payload(self) -> bytes:
        return _U32.pack(self.first_pgno) + struct.pack(f">{len(self.hashes)}Q", *self.hashes)

    @classmethod
    def _parse(cls, epoch: int, r: _Reader) -> Self:
        first = r.u32("first_pgno")
        raw = r.rest()
        if len(raw) % 8:
            raise FrameError(f"{len(raw)} bytes of hashes is not a multiple of 8", field="hashes")
        return cls(epoch, first, struct.unpack(f">{len(raw) // 8}Q", raw))


@dataclass(frozen=True, slots=True)
class UnknownFrame(_FrameBase):
    """A frame of a type this version does not know, sent with FLAG_MAY_SKIP: ignore it."""

    epoch: int
    type: int
    flags: int
    payload: bytes

    def __post_init__(self) -> None:
        _uint(self.epoch, 64, "epoch")
        if _uint(self.type, 8, "type") in _KNOWN or self.type == 0:
            raise FrameError(f"type {self.type} is not an unknown type", field="type")
        if _uint(self.flags, 8, "flags") != FLAG_MAY_SKIP:
            raise FrameError(
                f"flags 0x{self.flags:02x}: an unknown type must carry exactly the may-skip flag",
                field="flags",
            )
        payload = _to_bytes(self.payload, "payload")
        object.__setattr__(self, "payload", payload)
        if len(payload) > MAX_PAYLOAD:
            raise FrameError(f"payload is {len(payload)} bytes", field="payload")

    def _payload(self) -> bytes:
        return self.payload


Frame: TypeAlias = (
    Hello
    | LtxFragment
    | Ready
    | Heartbeat
    | Resync
    | End
    | Handoff
    | Positions
    | ResyncBegin
    | PageHashes
    | UnknownFrame
)

_CLASSES: dict[int, type[Frame]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        LtxFragment,
        Ready,
        Heartbeat,
        Resync,
        End,
        Handoff,
        Positions,
        ResyncBegin,
        PageHashes,
    )
}
_KNOWN = frozenset(_CLASSES)

Expect: TypeAlias = Literal["stream", "positions", "resync"]

_ALLOWED: dict[str, frozenset[int]] = {
    "stream": frozenset(
        {
            FrameType.HELLO,
            FrameType.LTX,
            FrameType.READY,
            FrameType.HEARTBEAT,
            FrameType.RESYNC,
            FrameType.END,
            FrameType.HANDOFF,
        }
    ),
    "positions": frozenset({FrameType.POSITIONS}),
    "resync": frozenset({FrameType.RESYNC_BEGIN, FrameType.PAGE_HASHES}),
}


def _type_name(ftype: int) -> str:
    return FrameType(ftype).name if ftype in _KNOWN else f"type {ftype}"


# -- encoding ----------------------------------------------------------------------------


def encode(frame: Frame) -> bytes:
    """The bytes of one frame: header, payload, xxh3_64 checksum.

    Frames validate their fields when constructed; a payload that would exceed
    MAX_PAYLOAD (too many positions for one frame, say) raises FrameError here.
    """
    if isinstance(frame, UnknownFrame):
        ftype, flags = frame.type, frame.flags
    else:
        ftype, flags = frame.TYPE, frame.FLAGS
    payload = frame._payload()
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(
            f"{_type_name(ftype)} payload is {len(payload)} bytes, over the {MAX_PAYLOAD}-byte "
            "limit (split it: see split_positions)",
            field="payload",
        )
    prefix = _PREFIX.pack(ftype, flags, 0, len(payload), frame.epoch)
    head = prefix + _U32.pack(xxhash.xxh3_64_intdigest(prefix) & 0xFFFFFFFF)
    digest = xxhash.xxh3_64(head)
    digest.update(payload)
    return b"".join((head, payload, _U64.pack(digest.intdigest())))


def split_positions(
    positions: Iterable[DatabasePosition], *, reserve: int = 260
) -> Iterator[tuple[DatabasePosition, ...]]:
    """Group positions so that each group fits one frame beside ``reserve`` other bytes.

    A HEARTBEAT, HANDOFF or POSITIONS frame holds about 3,800 positions at worst
    (255-byte names); a node with more databases sends several frames, each with
    a part of the list (the default reserve covers any node id and the count).
    """
    group: list[DatabasePosition] = []
    size = reserve + 4
    for pos in positions:
        entry = _POS_HEAD.size + 1 + len(pos.name.encode("utf-8"))
        if group and size + entry > MAX_PAYLOAD:
            yield tuple(group)
            group, size = [], reserve + 4
        group.append(pos)
        size += entry
    if group:
        yield tuple(group)


def ltx_fragments(
    epoch: int, name: str, chunks: Iterable[bytes], *, fragment_size: int = DEFAULT_FRAGMENT_SIZE
) -> Iterator[LtxFragment]:
    """LTX frames for one file read as ``chunks`` (any sizes), holding at most one fragment.

    The file is re-cut into fragments of ``fragment_size`` bytes (the last may be
    shorter); one fragment of look-ahead is kept so the last one is flagged, so
    memory stays bounded whatever the file's size.
    """
    room = MAX_PAYLOAD - _LTX_HEAD.size - 1 - len(_name_bytes(name))
    if not 1 <= fragment_size <= room:
        raise FrameError(f"must be 1..{room}, got {fragment_size}", field="fragment_size")
    buf = bytearray()
    index = 0
    for chunk in chunks:
        buf += chunk
        pos = 0
        while len(buf) - pos > fragment_size:  # strictly more: the file's last bytes wait
            yield LtxFragment(epoch, name, index, False, bytes(buf[pos : pos + fragment_size]))
            pos += fragment_size
            index += 1
        del buf[:pos]  # once per chunk: a big chunk is not moved once per fragment
    if not buf:
        raise FrameError("an LTX file cannot be empty", field="data")
    yield LtxFragment(epoch, name, index, True, bytes(buf))


# -- decoding ----------------------------------------------------------------------------


class _Rules:
    """Which frames may follow which in one body (see docs/protocol.md, "Grammar")."""

    def __init__(self, expect: Expect | None, min_epoch: int) -> None:
        self.expect = expect
        self.min_epoch = min_epoch
        self.epoch: int | None = None
        self.count = 0
        self.hello: Hello | None = None
        self.ready = False
        self.ended = False
        self.open_files: dict[str, int] = {}  # name -> next fragment index
        self.node_id: str | None = None
        self.begin: ResyncBegin | None = None
        self.next_pgno = 1

    def header(self, ftype: int, epoch: int) -> None:
        """Checks that need only the header, made before the payload is awaited."""
        if epoch < self.min_epoch:
            raise StaleEpochError(
                f"epoch {epoch} is older than epoch {self.min_epoch}, already seen",
                field="epoch",
            )
        if self.epoch is not None and epoch != self.epoch:
            raise FrameError(
                f"epoch {epoch} differs from epoch {self.epoch} of the body's first frame",
                field="epoch",
            )
        expect = self.expect
        if expect is None:
            return
        if ftype in _KNOWN and ftype not in _ALLOWED[expect]:
            raise FrameError(f"{_type_name(ftype)} frame is not allowed in a {expect} body")
        first = {"stream": FrameType.HELLO, "resync": FrameType.RESYNC_BEGIN}.get(expect)
        if first is not None:
            if self.count == 0 and ftype != first:
                raise FrameError(f"the first frame must be {first.name}, got {_type_name(ftype)}")
            if self.count > 0 and ftype == first:
                raise FrameError(f"a second {first.name} frame")

    def frame(self, frame: Frame) -> None:
        self.epoch = frame.epoch
        self.count += 1
        if isinstance(frame, Hello) and self.expect is not None:
            if frame.version not in SUPPORTED_VERSIONS:
                raise FrameError(
                    f"protocol version {frame.version} is not supported "
                    f"(supported: {sorted(SUPPORTED_VERSIONS)})",
                    field="version",
                )
            self.hello = frame
        elif isinstance(frame, LtxFragment) and self.expect is not None:
            expected = self.open_files.get(frame.name, 0)
            if frame.index != expected:
                raise FrameError(
                    f"LTX fragment {frame.index} of {frame.name!r} where fragment {expected} "
                    "was due",
                    field="index",
                )
            if frame.last:
                self.open_files.pop(frame.name, None)
            else:
                self.open_files[frame.name] = expected + 1
        elif isinstance(frame, Ready) and self.expect is not None:
            if self.ready:
                raise FrameError("a second READY frame")
            self.ready = True
        elif isinstance(frame, End) and self.expect is not None:
            self._no_open_files("END")
            self.ended = True
        elif isinstance(frame, Positions) and self.expect is not None:
            if self.node_id is not None and frame.node_id != self.node_id:
                raise FrameError(
                    f"node id {frame.node_id!r} differs from {self.node_id!r} earlier in the body",
                    field="node_id",
                )
            self.node_id = frame.node_id
        elif isinstance(frame, ResyncBegin):
            self.begin = frame
        elif isinstance(frame, PageHashes) and self.expect is not None:
            assert self.begin is not None  # header() made RESYNC_BEGIN come first
            if frame.first_pgno != self.next_pgno:
                raise FrameError(
                    f"hashes start at page {frame.first_pgno}; page {self.next_pgno} was due",
                    field="first_pgno",
                )
            if frame.last_pgno > self.begin.page_count:
                raise FrameError(
                    f"hashes run to page {frame.last_pgno}, past page_count "
                    f"{self.begin.page_count}",
                    field="hashes",
                )
            self.next_pgno = frame.last_pgno + 1

    def _no_open_files(self, what: str) -> None:
        if self.open_files:
            name, index = next(iter(self.open_files.items()))
            raise FrameError(
                f"{what} while the LTX file of {name!r} is unfinished (fragment {index} was due)"
            )

    def close(self) -> None:
        if self.expect == "stream":
            self._no_open_files("the stream ended")
        elif self.expect == "resync":
            if self.begin is None:
                raise FrameError("the body ended before RESYNC_BEGIN")
            if self.next_pgno <= self.begin.page_count:
                raise FrameError(
                    f"the body ended without hashes for pages {self.next_pgno}.."
                    f"{self.begin.page_count}"
                )


class FrameDecoder:
    """An incremental decoder: feed it bytes as they arrive, get whole frames back.

    ``expect`` selects the body and its grammar ("stream", "positions", "resync");
    None decodes any well-formed frames in any order (tools, tests). ``min_epoch``
    makes frames of an older lease term raise StaleEpochError. Every frame of one
    body must carry the same epoch. Memory: one frame (at most MAX_PAYLOAD plus
    28 bytes) beyond what was fed. After a FrameError the decoder stays failed.
    """

    def __init__(self, expect: Expect | None = None, *, min_epoch: int = 0) -> None:
        if expect is not None and expect not in _ALLOWED:
            raise ValueError(f"expect must be one of {sorted(_ALLOWED)} or None, got {expect!r}")
        self._rules = _Rules(expect, _uint(min_epoch, 64, "min_epoch"))
        self._buf = bytearray()
        self._offset = 0  # body offset of _buf[0]
        self._header: tuple[int, int, int] | None = None  # type, length, epoch
        self._error: FrameError | None = None
        self._closed = False

    @property
    def hello(self) -> Hello | None:
        """The HELLO frame of a stream, once decoded."""
        return self._rules.hello

    @property
    def epoch(self) -> int | None:
        """The epoch every frame of this body carries, once the first frame arrived."""
        return self._rules.epoch

    @property
    def ended(self) -> bool:
        """Whether an END frame arrived (a stream without one ended uncleanly)."""
        return self._rules.ended

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes; return every frame they complete, in order. Raises FrameError."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise FrameError("feed() after close()")
        self._buf += data
        frames: list[Frame] = []
        pos = 0
        try:
            while True:
                frame, size = self._next(pos)
                if frame is None:
                    break
                frames.append(frame)
                pos += size
        except FrameError as exc:
            self._error = exc
            raise
        finally:
            if pos:
                del self._buf[:pos]
                self._offset += pos
        return frames

    def close(self) -> None:
        """The body ended: raise FrameError if it stopped inside a frame or a sequence."""
        if self._error is not None:
            raise self._error
        if self._closed:
            return
        self._closed = True
        try:
            if self._buf:
                raise FrameError(
                    f"the body ended {len(self._buf)} bytes into a frame (truncated)"
                )._located(f"at byte {self._offset}")
            self._rules.close()
        except FrameError as exc:
            self._error = exc
            raise

    def _next(self, pos: int) -> tuple[Frame | None, int]:
        buf = self._buf
        avail = len(buf) - pos
        offset = self._offset + pos
        rules = self._rules
        if rules.ended and avail:
            raise FrameError("data after END")._located(f"at byte {offset}")
        if avail < HEADER_SIZE:
            return None, 0
        if self._header is None:
            self._header = self._parse_header(pos, offset)
        ftype, length, epoch = self._header
        size = HEADER_SIZE + length + CHECKSUM_SIZE
        if avail < size:
            return None, 0
        self._header = None
        where = f"frame {rules.count} ({_type_name(ftype)}) at byte {offset}"
        with memoryview(buf) as view:
            body_end = pos + HEADER_SIZE + length
            actual = xxhash.xxh3_64_intdigest(view[pos:body_end])
            (stored,) = _U64.unpack_from(view, body_end)
            payload = bytes(view[pos + HEADER_SIZE : body_end])
        if actual != stored:
            raise FrameError(
                f"checksum {stored:016x} does not match xxh3_64 {actual:016x} of the frame",
                field="checksum",
            )._located(where)
        try:
            frame = self._parse_payload(ftype, epoch, payload)
            rules.frame(frame)
        except FrameError as exc:
            raise exc._located(where) from None
        return frame, size

    def _parse_header(self, pos: int, offset: int) -> tuple[int, int, int]:
        where = f"frame {self._rules.count} at byte {offset}"
        ftype, flags, reserved, length, epoch = _PREFIX.unpack_from(self._buf, pos)
        (check,) = _U32.unpack_from(self._buf, pos + _PREFIX.size)
        expected = xxhash.xxh3_64_intdigest(bytes(self._buf[pos : pos + _PREFIX.size]))
        try:
            if check != expected & 0xFFFFFFFF:
                raise FrameError(
                    f"header check {check:08x} does not match {expected & 0xFFFFFFFF:08x}: "
                    "damaged header or not a frame",
                    field="header_check",
                )
            if reserved:
                raise FrameError(f"reserved bytes are 0x{reserved:04x}, not 0", field="reserved")
            if length > MAX_PAYLOAD:
                raise FrameError(
                    f"payload length {length} is over the {MAX_PAYLOAD}-byte limit", field="length"
                )
            if ftype in _KNOWN:
                want = _CLASSES[ftype].FLAGS
                if flags != want:
                    raise FrameError(
                        f"flags 0x{flags:02x} on a {_type_name(ftype)} frame; must be 0x{want:02x}",
                        field="flags",
                    )
            elif flags != FLAG_MAY_SKIP:
                raise FrameError(
                    f"unknown frame type {ftype} with flags 0x{flags:02x}; only a frame with "
                    "exactly the may-skip flag (0x01) may have an unknown type",
                    field="type",
                )
            self._rules.header(ftype, epoch)
        except FrameError as exc:
            raise exc._located(where) from None
        return ftype, length, epoch

    @staticmethod
    def _parse_payload(ftype: int, epoch: int, payload: bytes) -> Frame:
        cls = _CLASSES.get(ftype)
        if cls is None:
            return UnknownFrame(epoch, ftype, FLAG_MAY_SKIP, payload)
        r = _Reader(payload)
        frame = cls._parse(epoch, r)
        r.end()
        return frame


# -- POST /resync ------------------------------------------------------------------------


def page_hash(data: bytes | bytearray | memoryview) -> int:
    """The hash of one page in a resync request: xxh3_64 (seed 0) of its bytes, as is.

    Page 1 is hashed like any page (the primary always sends it back anyway) and
    the lock page is sent as LOCK_PAGE_HASH without reading it.
    """
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """A whole POST /resync body held in memory (small databases, tools, tests)."""

    begin: ResyncBegin
    hashes: tuple[int, ...]


def resync_request_frames(
    begin: ResyncBegin, hashes: Iterable[int], *, per_frame: int = HASHES_PER_FRAME
) -> Iterator[ResyncBegin | PageHashes]:
    """The frames of a POST /resync body: ``begin``, then hashes of pages 1..page_count.

    ``hashes`` may be a generator over the database; at most ``per_frame`` of them
    are held at once. Raises FrameError if it yields more or fewer than page_count.
    """
    if not 1 <= per_frame <= MAX_PAGE_HASHES:
        raise FrameError(f"must be 1..{MAX_PAGE_HASHES}, got {per_frame}", field="per_frame")
    yield begin
    group: list[int] = []
    first = 1
    for h in hashes:
        group.append(h)
        if first + len(group) - 1 > begin.page_count:
            raise FrameError(f"more hashes than page_count {begin.page_count}", field="hashes")
        if len(group) == per_frame:
            yield PageHashes(begin.epoch, first, tuple(group))
            first += len(group)
            group = []
    if group:
        yield PageHashes(begin.epoch, first, tuple(group))
        first += len(group)
    if first - 1 != begin.page_count:
        raise FrameError(f"{first - 1} hashes for page_count {begin.page_count}", field="hashes")


def decode_resync_request(body: bytes, *, min_epoch: int = 0) -> ResyncRequest:
    """Decode a complete POST /resync body (servers decode incrementally instead)."""
    decoder = FrameDecoder("resync", min_epoch=min_epoch)
    begin: ResyncBegin | None = None
    hashes: list[int] = []
    for frame in decoder.feed(body):
        if isinstance(frame, ResyncBegin):
            begin = frame
        elif isinstance(frame, PageHashes):
            hashes.extend(frame.hashes)
    decoder.close()
    assert begin is not None  # close() raised otherwise
    return ResyncRequest(begin, tuple(hashes))


# -- POST /stream request body (JSON) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """The JSON body of POST /stream: who the replica is and where each database stands."""

    node_id: str
    databases: tuple[DatabasePosition, ...] = ()
    version: int = PROTOCOL_VERSION  # the highest protocol version the replica speaks

    def __post_init__(self) -> None:
        _node_id_bytes(self.node_id)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise FrameError(f"must be an integer, got {self.version!r}", field="version")
        if not 1 <= self.version <= 0xFFFF:
            raise FrameError(f"must be 1..65535, got {self.version}", field="version")
        databases = tuple(self.databases)
        object.__setattr__(self, "databases", databases)
        seen: set[str] = set()
        for i, db in enumerate(databases):
            if not isinstance(db, DatabasePosition):
                raise FrameError(
                    f"must be a DatabasePosition, got {type(db).__name__}",
                    field=f"databases[{i}]",
                )
            if db.name in seen:
                raise FrameError(f"duplicate database {db.name!r}", field=f"databases[{i}].name")
            seen.add(db.name)

    def position(self, name: str) -> DatabasePosition | None:
        return next((db for db in self.databases if db.name == name), None)


def encode_stream_request(request: StreamRequest) -> bytes:
    """Compact UTF-8 JSON; TXIDs and checksums as 16 lowercase hex digits."""
    doc = {
        "version": request.version,
        "node_id": request.node_id,
        "databases": [
            {"name": db.name, "txid": f"{db.txid:016x}", "checksum": f"{db.checksum:016x}"}
            for db in request.databases
        ],
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _object_without_duplicates(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FrameError(f"duplicate key {key!r} in a JSON object", field="body")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise FrameError(f"{name} is not valid JSON", field="body")


_MISSING = object()


def _get(obj: dict[str, Any], key: str, kind: type, what: str, field: str) -> Any:
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        raise FrameError("missing", field=field)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise FrameError(f"must be {what}, got {json.dumps(value)[:64]}", field=field)
    return value


def _hex64(obj: dict[str, Any], key: str, field: str) -> int:
    text = _get(obj, key, str, "a string of 16 hex digits", field)
    try:
        return parse_txid(text)
    except LTXError:
        raise FrameError(
            f"must be a string of 16 hex digits, got {json.dumps(text)[:64]}", field=field
        ) from None


def parse_stream_request(body: bytes | bytearray | str) -> StreamRequest:
    """Parse and validate the JSON body of POST /stream; FrameError names the field.

    Keys this version does not know are ignored (new optional keys need no new
    version); duplicate keys, NaN and Infinity are rejected.
    """
    if len(body) > MAX_REQUEST_BODY:
        raise FrameError(f"{len(body)} bytes, over the {MAX_REQUEST_BODY}-byte limit", field="body")
    try:
        text = body if isinstance(body, str) else bytes(body).decode("utf-8")
        doc = json.loads(
            text, object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
        )
    except FrameError:
        raise
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"not valid UTF-8 JSON: {exc}", field="body") from None
    if not isinstance(doc, dict):
        raise FrameError("must be a JSON object", field="body")
    version = _get(doc, "version", int, "an integer", "version")
    if not 1 <= version <= 0xFFFF:
        raise FrameError(f"must be 1..65535, got {version}", field="version")
    node_id = _get(doc, "node_id", str, "a string", "node_id")
    _node_id_bytes(node_id)
    entries = _get(doc, "databases", list, "a list", "databases")
    databases: list[DatabasePosition] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"databases[{i}]"
        if not isinstance(entry, dict):
            raise FrameError(f"must be an object, got {json.dumps(entry)[:64]}", field=at)
        name = _get(entry, "name", str, "a string", f"{at}.name")
        try:
            _name_bytes(name)
        except FrameError as exc:
            raise exc._nested(at) from None
        if name in seen:
            raise FrameError(f"duplicate database {name!r}", field=f"{at}.name")
        seen.add(name)
        txid = _hex64(entry, "txid", f"{at}.txid")
        checksum = _hex64(entry, "checksum", f"{at}.checksum")
        databases.append(DatabasePosition(name, txid, checksum))
    return StreamRequest(node_id, tuple(databases), version)
