# Settings are dataclass fields made by setting()/section(), wrappers of dataclasses.field.
# ruff: noqa: RUF009
"""The daemon's configuration: one TOML file, environment overrides, one frozen Config.

Each setting is declared once, as a field of a frozen section dataclass made
with :func:`setting`: its kind (how it is parsed, checked and rendered), its
default, a one-line doc, and whether it is secret. Its TOML key is the field
name in kebab-case inside its section's table, and its environment variable is
``LTX_SIDECAR_<SECTION>_<KEY>`` (``LTX_SIDECAR_CHECKPOINT_PASSIVE_FRAMES``;
top-level keys have no section: ``LTX_SIDECAR_DATA_DIR``). The environment wins
over the file, because what differs per machine (node id, data directory) is
easiest to set there. A new section is a new dataclass and one field of
Config; loading, validation, environment names and rendering follow.

Unknown keys, unknown ``LTX_SIDECAR_*`` variables (a typo must not silently do
nothing) and bad values are rejected with :class:`ConfigError`, naming the key
and the reason: ``checkpoint.passive-frames: must be a positive integer, got -3``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from ltx import SQLITE_MAGIC

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
C = TypeVar("C", bound="DataclassInstance")

ENV_PREFIX = "LTX_SIDECAR_"
# LTX_SIDECAR_* variables that are not settings (the config file's own location).
ENV_NOT_SETTINGS = frozenset({"LTX_SIDECAR_CONFIG"})

_SPEC = "sidecar.config.spec"
_SECTION = "sidecar.config.section"


class ConfigError(ValueError):
    """A configuration the daemon must not start with; ``key`` names what is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class DatabaseNameError(ValueError):
    """A database name that is unsafe as a directory name under ``<data-dir>/dbs``."""


def validate_db_name(name: str) -> str:
    """Return ``name`` if it is safe as one directory name, else raise DatabaseNameError.

    Names come from file names here and from the network in replication, so
    they must never escape ``dbs/``: not empty, no path separator or NUL, no
    leading dot (hides files and excludes ``.`` and ``..``), at most 255 bytes.
    """
    if not name:
        raise DatabaseNameError("database name is empty")
    if "/" in name or "\\" in name or "\x00" in name:
        raise DatabaseNameError(f"database name {name!r} contains a path separator or NUL")
    if name.startswith("."):
        raise DatabaseNameError(f"database name {name!r} starts with a dot")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise DatabaseNameError(f"database name {name[:32]!r}... is longer than 255 bytes")
    return name


EMPTY_DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def looks_like_sqlite(path: Path) -> bool:
    """Whether a file in a watched directory counts as a SQLite database.

    Yes when its first 16 bytes are the SQLite magic, or when it is empty and
    named ``*.db``, ``*.sqlite`` or ``*.sqlite3`` (an app that just created it).
    The bytes are read through the process's held descriptor for the file
    (sidecar.fileutil.held_fd), since closing any descriptor on a database drops the
    POSIX locks SQLite holds on it (DESIGN.md).
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size == 0:
            return path.name.endswith(EMPTY_DB_SUFFIXES)
    except OSError:
        return False
    return has_sqlite_magic(path)


def has_sqlite_magic(path: Path) -> bool:
    """Whether the file starts with the SQLite magic (False if it cannot be read)."""
    from sidecar.fileutil import read_head  # fileutil imports nothing of ours; no cycle

    try:
        return read_head(path, 16) == SQLITE_MAGIC
    except OSError:
        return False


# -- kinds of values -------------------------------------------------------------------


class _Bad(ValueError):
    """A value a kind rejects; the loader adds the key."""


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _toml_str(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class Kind(Generic[T]):
    """How one type of setting is parsed from TOML and from the environment, and rendered."""

    what = "a value"

    def from_toml(self, value: object) -> T:
        raise NotImplementedError

    def from_env(self, text: str) -> T:
        return self.from_toml(text)

    def to_toml(self, value: T) -> str:
        raise NotImplementedError

    def bad(self, value: object) -> _Bad:
        return _Bad(f"must be {self.what}, got {_show(value)}")


class Str(Kind[str]):
    empty_ok = False  # OptionalStr: "" means "not set"

    def __init__(self, pattern: str | None = None, what: str = "a non-empty string") -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.what = what

    def from_toml(self, value: object) -> str:
        if not isinstance(value, str) or (not value and not self.empty_ok):
            raise self.bad(value)
        if value and self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.bad(value)
        return value

    def to_toml(self, value: str) -> str:
        return _toml_str(value)


class Int(Kind[int]):
    def __init__(self, minimum: int) -> None:
        self.minimum = minimum
        names = {0: "a non-negative integer", 1: "a positive integer"}
        self.what = names.get(minimum, f"an integer >= {minimum}")

    def from_toml(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < self.minimum:
            raise self.bad(value)
        return value

    def from_env(self, text: str) -> int:
        try:
            return self.from_toml(int(text.strip()))
        except ValueError:
            raise self.bad(text) from None

    def to_toml(self, value: int) -> str:
        return str(value)


class Float(Kind[float]):
    def __init__(self, minimum: float = -math.inf) -> None:
        self.minimum = minimum
        self.what = "a number" if minimum == -math.inf else f"a number >= {minimum:g}"

    def from_toml(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(value)
        if not math.isfinite(value) or value < self.minimum:
            raise self.bad(value)
        return float(value)

    def from_env(self, text: str) -> float:
        try:
            return self.from_toml(float(text.strip()))
        except ValueError:
            raise self.bad(text) from None

    def to_toml(self, value: float) -> str:
        return repr(float(value))


class Bool(Kind[bool]):
    what = "true or false"
    _WORDS: ClassVar[dict[str, bool]] = {"1": True, "true": True, "yes": True, "on": True}
    _WORDS |= {"0": False, "false": False, "no": False, "off": False}

    def from_toml(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.bad(value)
        return value

    def from_env(self, text: str) -> bool:
        try:
            return self._WORDS[text.strip().lower()]
        except KeyError:
            raise self.bad(text) from None

    def to_toml(self, value: bool) -> str:
        return "true" if value else "false"


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m|h)?\s*")
_UNIT_US = {"us": 1, "ms": 1000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000}
_US = timedelta(microseconds=1)


class Duration(Kind[timedelta]):
    """A number of seconds, or a string such as "500ms", "5s", "10m", "1h" (also "us").

    Parsed exactly (decimal arithmetic) to whole microseconds, timedelta's
    resolution, so rendering and parsing again gives the same value.
    """

    def __init__(self, positive: bool) -> None:
        self.positive = positive
        kind = "a positive" if positive else "a non-negative"
        self.what = f'{kind} duration such as "500ms", "5s", "10m" or a number of seconds'

    def from_toml(self, value: object) -> timedelta:
        if isinstance(value, bool):
            raise self.bad(value)
        if isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match is None:
                raise self.bad(value)
            us = Decimal(match.group(1)) * _UNIT_US[match.group(2) or "s"]
        elif isinstance(value, int | float) and math.isfinite(value):
            us = Decimal(repr(value)) * _UNIT_US["s"]
        else:
            raise self.bad(value)
        micros = int(us.to_integral_value())
        if micros < 0 or (self.positive and micros == 0):
            raise self.bad(value)  # negative, zero, or below a microsecond
        try:
            return timedelta(microseconds=micros)
        except OverflowError:
            raise self.bad(value) from None

    def to_toml(self, value: timedelta) -> str:
        us = value // _US
        if us == 0:
            return '"0s"'
        for unit, size in (("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000)):
            if us % size == 0:
                return f'"{us // size}{unit}"'
        return f'"{us // 1000}ms"' if us % 1000 == 0 else f'"{us}us"'


class PathKind(Kind[Path]):
    what = "a non-empty path"

    def from_toml(self, value: object) -> Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise self.bad(value)
        return Path(value).expanduser()

    def to_toml(self, value: Path) -> str:
        return _toml_str(str(value))


class PathList(Kind[tuple[Path, ...]]):
    """A TOML array of paths; in the environment, separated by commas or os.pathsep."""

    what = "a list of non-empty paths"
    _item = PathKind()

    def from_toml(self, value: object) -> tuple[Path, ...]:
        if not isinstance(value, list | tuple):
            raise self.bad(value)
        try:
            return tuple(self._item.from_toml(v) for v in value)
        except _Bad:
            raise self.bad(value) from None

    def from_env(self, text: str) -> tuple[Path, ...]:
        items = re.split(f"[,{re.escape(os.pathsep)}]", text)
        return self.from_toml([item.strip() for item in items if item.strip()])

    def to_toml(self, value: tuple[Path, ...]) -> str:
        return "[" + ", ".join(self._item.to_toml(p) for p in value) + "]"


class Choice(Kind[str]):
    """One of a fixed set of words."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.what = "one of " + ", ".join(_toml_str(c) for c in choices)

    def from_toml(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise self.bad(value)
        return value

    def to_toml(self, value: str) -> str:
        return _toml_str(value)


class OptionalStr(Str):
    """A string that may be empty (empty means "not set"); a pattern applies otherwise."""

    empty_ok = True

    def __init__(self, pattern: str | None = None, what: str = "a string") -> None:
        super().__init__(pattern, what)


class StrList(Kind[tuple[str, ...]]):
    """A TOML array of strings; in the environment, separated by commas."""

    what = "a list of strings"

    def from_toml(self, value: object) -> tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.bad(value)
        return tuple(value)

    def from_env(self, text: str) -> tuple[str, ...]:
        return tuple(item.strip() for item in text.split(",") if item.strip())

    def to_toml(self, value: tuple[str, ...]) -> str:
        return "[" + ", ".join(_toml_str(v) for v in value) + "]"


# -- declaring settings ------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kind: Kind[Any]
    default: object  # as written in TOML; unused when default_from is set
    doc: str
    secret: bool = False
    default_from: Callable[[Mapping[str, str]], object] | None = None


def setting(
    kind: Kind[T],
    default: object,
    doc: str,
    *,
    secret: bool = False,
    default_from: Callable[[Mapping[str, str]], object] | None = None,
) -> T:
    """A dataclass field for one setting (typed as its value, as dataclasses.field is)."""
    spec = Spec(kind, default, doc, secret, default_from)
    if default_from is not None:
        return field(
            default_factory=lambda: kind.from_toml(default_from(os.environ)),
            metadata={_SPEC: spec},
        )
    return field(default=kind.from_toml(default), metadata={_SPEC: spec})


def section(cls: type[C], doc: str) -> C:
    """A dataclass field holding one TOML table of settings."""
    return field(default_factory=cls, metadata={_SECTION: (cls, doc)})


@dataclass(frozen=True)
class Key:
    """One setting as the schema sees it."""

    section: str  # the table's name, "" at the top level
    attr: str
    spec: Spec

    @property
    def name(self) -> str:
        return self.attr.replace("_", "-")

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dotted.replace(".", "_").replace("-", "_").upper()


class Schema(Generic[C]):
    """Load, check and render one root settings dataclass and its sections."""

    def __init__(self, root: type[C]) -> None:
        self.root = root
        self.sections: dict[str, tuple[str, type[Any], str]] = {}  # name -> (attr, cls, doc)
        self.keys: list[Key] = []
        for f in dataclasses.fields(root):
            if _SECTION in f.metadata:
                cls, doc = f.metadata[_SECTION]
                self.sections[f.name.replace("_", "-")] = (f.name, cls, doc)
                self.keys += [
                    Key(f.name.replace("_", "-"), sf.name, sf.metadata[_SPEC])
                    for sf in dataclasses.fields(cls)
                ]
            else:
                self.keys.append(Key("", f.name, f.metadata[_SPEC]))
        self._by_dotted = {k.dotted: k for k in self.keys}
        self._by_env = {k.env: k for k in self.keys}

    def _unknown(self, key: str, choices: list[str], what: str) -> ConfigError:
        leaf = key.rpartition(".")[2]
        moved = [f"[{k.section}] {k.name}" for k in self.keys if k.name == leaf and k.dotted != key]
        close = moved or difflib.get_close_matches(key, choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return ConfigError(key, f"unknown {what}{hint}")

    def load(self, raw: Mapping[str, object], env: Mapping[str, str]) -> C:
        """A root instance from parsed TOML and the environment (which wins)."""
        values: dict[str, dict[str, object]] = {name: {} for name in ["", *self.sections]}
        for name, value in raw.items():
            if name in self.sections:
                if not isinstance(value, dict):
                    raise ConfigError(name, f"must be a table, got {_show(value)}")
                items = [(f"{name}.{k}", v) for k, v in value.items()]
            elif isinstance(value, dict) and name not in self._by_dotted:
                raise self._unknown(name, list(self.sections), "section")
            else:
                items = [(name, value)]
            for dotted, v in items:
                key = self._by_dotted.get(dotted)
                if key is None:
                    raise self._unknown(dotted, [*self._by_dotted, *self.sections], "key")
                try:
                    values[key.section][key.attr] = key.spec.kind.from_toml(v)
                except _Bad as exc:
                    raise ConfigError(dotted, str(exc)) from None
        for var, text in env.items():
            if not var.startswith(ENV_PREFIX) or var in ENV_NOT_SETTINGS:
                continue
            key = self._by_env.get(var)
            if key is None:
                raise self._unknown(var, list(self._by_env), "environment variable")
            try:
                values[key.section][key.attr] = key.spec.kind.from_env(text)
            except _Bad as exc:
                raise ConfigError(f"{var} ({key.dotted})", str(exc)) from None
        for key in self.keys:
            default_from = key.spec.default_from
            if default_from is not None and key.attr not in values[key.section]:
                try:
                    values[key.section][key.attr] = key.spec.kind.from_toml(default_from(env))
                except _Bad as exc:
                    raise ConfigError(key.dotted, f"default {exc}; set {key.env}") from None
        top: dict[str, object] = dict(values[""])
        for name, (attr, cls, _) in self.sections.items():
            top[attr] = cls(**values[name])
        return cast(C, cast(Any, self.root)(**top))

    def render(self, obj: C, *, mask_secrets: bool = True, comments: bool = True) -> str:
        """obj as TOML that loads back to an equal object (unless secrets are masked)."""

        def lines(owner: object, section_name: str) -> list[str]:
            out: list[str] = []
            for key in self.keys:
                if key.section != section_name:
                    continue
                value = getattr(owner, key.attr)
                if key.spec.secret and mask_secrets and value:
                    text = '"***"'
                else:
                    text = key.spec.kind.to_toml(value)
                if comments:
                    out += [f"# {key.spec.doc}", f"#   env {key.env}"]
                out.append(f"{key.name} = {text}")
            return out

        parts = ["\n".join(lines(obj, ""))]
        for name, (attr, _, doc) in self.sections.items():
            head = [f"# {doc}"] if comments else []
            parts.append("\n".join([*head, f"[{name}]", *lines(getattr(obj, attr), name)]))
        return "\n\n".join(p for p in parts if p) + "\n"


# -- the configuration ---------------------------------------------------------------------


def _default_node_id(env: Mapping[str, str]) -> str:
    return env.get("FLY_MACHINE_ID") or socket.gethostname()


NODE_ID = Str(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", "a node id (letters, digits, '.', '_', '-')")


@dataclass(frozen=True)
class DatabasesConfig:
    paths: tuple[Path, ...] = setting(
        PathList(), [], "database files to replicate; each one's name under dbs/ is its base name"
    )
    dirs: tuple[Path, ...] = setting(
        PathList(),
        [],
        "directories whose SQLite databases are replicated, including ones created later "
        "(a file starting with the SQLite magic, or empty and named *.db, *.sqlite, *.sqlite3)",
    )
    watch_debounce: timedelta = setting(
        Duration(positive=False),
        "1ms",
        "without inotify (not Linux): how long watchfiles gathers file events before the "
        "WAL is read (its default adds >1s)",
    )
    poll_interval: timedelta = setting(
        Duration(positive=True), "250ms", "a safety-net poll for missed file events"
    )

    def __post_init__(self) -> None:
        seen: dict[str, Path] = {}
        for path in self.paths:
            try:
                name = validate_db_name(path.name)
            except DatabaseNameError as exc:
                raise ConfigError("databases.paths", f"{path}: {exc}") from None
            if name in seen:
                raise ConfigError(
                    "databases.paths",
                    f"two databases named {name!r} ({seen[name]} and {path}): names must differ",
                )
            seen[name] = path


@dataclass(frozen=True)
class CheckpointConfig:
    passive_frames: int = setting(
        Int(1),
        1000,
        "PASSIVE checkpoint after this many frames; keep it under the app's wal_autocheckpoint unless that is 0",
    )
    truncate_frames: int = setting(
        Int(1),
        100_000,
        "past this many WAL frames: TRUNCATE once writers pause, PASSIVE never put off meanwhile",
    )
    interval: timedelta = setting(
        Duration(positive=True), "1m", "run a PASSIVE checkpoint this often if anything was shipped"
    )
    seal_timeout: timedelta = setting(
        Duration(positive=True),
        "100ms",
        "the longest the write lock is held to seal the WAL, and the busy timeout to take it",
    )

    def __post_init__(self) -> None:
        if self.truncate_frames < self.passive_frames:
            raise ConfigError(
                "checkpoint.truncate-frames",
                f"must be at least checkpoint.passive-frames ({self.passive_frames}), "
                f"got {self.truncate_frames}",
            )


@dataclass(frozen=True)
class RetentionConfig:
    max_age: timedelta = setting(
        Duration(positive=False), "10m", "keep LTX files at least this long (by file mtime)"
    )
    keep_count: int = setting(
        Int(0), 100, "and always keep at least this many of the newest LTX files"
    )


def _on_fly(env: Mapping[str, str]) -> bool:
    return bool(env.get("FLY_MACHINE_ID") and env.get("FLY_APP_NAME"))


def _default_api_host(env: Mapping[str, str]) -> str:
    # Fly machines reach each other over the IPv6 private network; elsewhere stay local
    # until told otherwise.
    return "::" if _on_fly(env) else "127.0.0.1"


def _default_candidate(env: Mapping[str, str]) -> bool:
    primary, region = env.get("PRIMARY_REGION"), env.get("FLY_REGION")
    return primary == region if primary and region else True


def _default_lease_key(env: Mapping[str, str]) -> str:
    return f"ltx-sidecar/{env.get('FLY_APP_NAME') or 'cluster'}"


def _default_fly_app(env: Mapping[str, str]) -> str:
    return env.get("FLY_APP_NAME", "")


HOST = Str(r"[A-Za-z0-9.:\-\[\]]+", "a host name or address")
URL = OptionalStr(r"https?://[^\s/]+(/\S*)?", "an http:// or https:// URL")


@dataclass(frozen=True)
class ApiConfig:
    host: str = setting(
        HOST,
        None,
        "address the node API (replication, status, metrics) listens on "
        '(default "127.0.0.1"; "::" on Fly.io)',
        default_from=_default_api_host,
    )
    port: int = setting(Int(1), 20202, "port of the node API")


@dataclass(frozen=True)
class LeaseConfig:
    type: str = setting(
        Choice("static", "redis"),
        "static",
        'who is primary: "static" (a fixed primary) or "redis" (elected with a Redis lease)',
    )
    primary_url: str = setting(
        URL,
        "",
        "static lease: the primary's API URL, set on replicas; empty on the primary itself",
    )
    redis_url: str = setting(
        OptionalStr(r"rediss?://\S+", "a redis:// or rediss:// URL"),
        "",
        "redis lease: the Redis server, e.g. redis://host:6379/0",
        secret=True,
    )
    key: str = setting(
        Str(),
        None,
        "redis lease: the key holding the lease, one per cluster "
        '(default "ltx-sidecar/$FLY_APP_NAME")',
        default_from=_default_lease_key,
    )
    ttl: timedelta = setting(
        Duration(positive=True), "5s", "redis lease: how long a lease lasts without renewal"
    )
    renew_interval: timedelta = setting(
        Duration(positive=False), "0s", "redis lease: how often the primary renews (0: TTL/3)"
    )


@dataclass(frozen=True)
class ReplicationConfig:
    heartbeat_interval: timedelta = setting(
        Duration(positive=True), "1s", "how often the primary sends a heartbeat on each stream"
    )
    stream_timeout: timedelta = setting(
        Duration(positive=True), "5s", "a stream silent for this long is dead; reconnect"
    )
    reconnect_min: timedelta = setting(
        Duration(positive=True), "100ms", "first delay before reconnecting to the primary"
    )
    reconnect_max: timedelta = setting(
        Duration(positive=True), "5s", "longest delay between reconnection attempts"
    )
    fsync: bool = setting(
        Bool(),
        False,
        "replicas fsync their LTX log and commits (off: a power loss may cost a resync, "
        "never a wrong copy; the primary syncs its log in batches, before checkpoints)",
    )
    lock_local_writes: bool = setting(
        Bool(),
        True,
        "replicas hold the write lock between applies, so app writes fail at once",
    )


@dataclass(frozen=True)
class ProxyConfig:
    enabled: bool = setting(Bool(), False, "run the HTTP proxy in front of the app")
    host: str = setting(HOST, "0.0.0.0", "address the proxy listens on")
    port: int = setting(Int(1), 8080, "public port of the proxy")
    target: str = setting(URL, "", "the app's URL, e.g. http://127.0.0.1:8081")
    db: str = setting(
        OptionalStr(),
        "",
        "the database whose TXID the __txid cookie carries (default: the only one)",
    )
    write_paths: tuple[str, ...] = setting(
        StrList(), [], "path globs (* wildcard) whose GET and HEAD requests are writes too"
    )
    passthrough_paths: tuple[str, ...] = setting(
        StrList(), [], "path globs sent straight to the app, no routing and no cookie"
    )
    txid_header: str = setting(
        Str(r"[A-Za-z0-9-]+", "an HTTP header name"),
        "Ltx-Txid",
        "request header API clients may send instead of the __txid cookie",
    )
    read_timeout: timedelta = setting(
        Duration(positive=True),
        "5s",
        "how long a read waits for this node to reach the client's TXID (then 504)",
    )
    primary_timeout: timedelta = setting(
        Duration(positive=False),
        "5s",
        "how long a write waits to learn who the primary is (then 503)",
    )
    cookie_max_age: timedelta = setting(
        Duration(positive=True), "5m", "lifetime of the __txid cookie"
    )
    max_lag: timedelta = setting(
        Duration(positive=False),
        "10s",
        "the health check fails past this replication lag (0: never)",
    )
    fly_replay: str = setting(
        Choice("auto", "always", "never"),
        "auto",
        'answer writes on replicas with fly-replay ("auto": when running on Fly.io)',
    )
    max_replay_body: int = setting(
        Int(0), 1 << 20, "larger write bodies are forwarded to the primary, not replayed"
    )


@dataclass(frozen=True)
class SyncConfig:
    replicas: int = setting(
        Int(0), 0, "hold each write's response until this many replicas applied it (0: async)"
    )
    timeout: timedelta = setting(
        Duration(positive=True), "5s", "synchronous mode: answer anyway after this long"
    )
    max_lag: timedelta = setting(
        Duration(positive=False),
        "0s",
        "writes wait while the slowest required replica is this far behind (0: never)",
    )


@dataclass(frozen=True)
class ExecConfig:
    command: str = setting(
        OptionalStr(),
        "",
        "the app to start once the databases are ready (shell words; or ltx-sidecar -- CMD)",
    )
    migrate: str = setting(
        OptionalStr(), "", "run on the primary only, before the app starts (e.g. migrations)"
    )


@dataclass(frozen=True)
class LogConfig:
    format: str = setting(Choice("text", "json"), "text", 'log lines as "text" or "json"')
    level: str = setting(
        Choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", "the lowest level logged"
    )


@dataclass(frozen=True)
class Config:
    """Everything the daemon reads at start; build it with load_config."""

    data_dir: Path = setting(
        PathKind(), "./ltx-data", "the sidecar's own state: dbs/<name>/ltx/<min>-<max>.ltx"
    )
    node_id: str = setting(
        NODE_ID,
        None,
        "this node's id (default: $FLY_MACHINE_ID, else the hostname)",
        default_from=_default_node_id,
    )
    advertise_url: str = setting(
        URL,
        "",
        "the URL other nodes reach this node's API at (default: "
        "http://$FLY_MACHINE_ID.vm.$FLY_APP_NAME.internal:PORT on Fly.io, else from api.host)",
    )
    token: str = setting(
        OptionalStr(),
        "",
        "shared secret every node-to-node and mutating request carries "
        "(default: read from, or created in, <data-dir>/token)",
        secret=True,
    )
    candidate: bool = setting(
        Bool(),
        None,
        "whether this node may become primary (default: FLY_REGION == PRIMARY_REGION on "
        "Fly.io, else true)",
        default_from=_default_candidate,
    )
    fly_app: str = setting(
        OptionalStr(),
        None,
        "the Fly.io app name (default $FLY_APP_NAME)",
        default_from=_default_fly_app,
    )
    api: ApiConfig = section(ApiConfig, "the node API: replication, status, metrics, health")
    lease: LeaseConfig = section(LeaseConfig, "who is primary")
    replication: ReplicationConfig = section(ReplicationConfig, "streaming to replicas")
    proxy: ProxyConfig = section(ProxyConfig, "the HTTP proxy in front of the app")
    sync: SyncConfig = section(SyncConfig, "synchronous and time-bounded replication")
    exec: ExecConfig = section(ExecConfig, "supervising the app")
    log: LogConfig = section(LogConfig, "logging")
    databases: DatabasesConfig = section(DatabasesConfig, "which databases to replicate")
    checkpoint: CheckpointConfig = section(
        CheckpointConfig, "WAL checkpoints (the primary owns them)"
    )
    retention: RetentionConfig = section(RetentionConfig, "how long LTX files are kept")

    def database_name(self, path: Path) -> str:
        """The name a database file has under dbs/: its validated base name."""
        return validate_db_name(Path(path).name)

    def advertise(self) -> str:
        """This node's API URL as other nodes should use it."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        if self.fly_app and os.environ.get("FLY_MACHINE_ID") == self.node_id:
            return f"http://{self.node_id}.vm.{self.fly_app}.internal:{self.api.port}"
        host = self.api.host
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.api.port}"

    def token_path(self) -> Path:
        return self.data_dir / "token"

    def ltx_dir(self, name: str) -> Path:
        """``<data-dir>/dbs/<name>/ltx``, where one database's LTX log lives."""
        return self.data_dir / "dbs" / validate_db_name(name) / "ltx"


SCHEMA = Schema(Config)


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The configuration from a TOML file (or none: defaults) and the environment.

    ``env`` defaults to os.environ; its ``LTX_SIDECAR_*`` variables override the file.
    """
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), f"invalid TOML: {exc}") from None
    return SCHEMA.load(raw, os.environ if env is None else env)


def render_config(cfg: Config, mask_secrets: bool = True, comments: bool = True) -> str:
    """The effective configuration as TOML, secrets shown as "***" unless told otherwise."""
    return SCHEMA.render(cfg, mask_secrets=mask_secrets, comments=comments)


__all__ = [
    "ENV_NOT_SETTINGS",
    "ENV_PREFIX",
    "SCHEMA",
    "Bool",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DatabaseNameError",
    "DatabasesConfig",
    "Duration",
    "Float",
    "Int",
    "Key",
    "Kind",
    "PathKind",
    "PathList",
    "RetentionConfig",
    "Schema",
    "Spec",
    "Str",
    "load_config",
    "looks_like_sqlite",
    "render_config",
    "section",
    "setting",
    "validate_db_name",
]
