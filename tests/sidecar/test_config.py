"""Configuration: TOML plus environment, validated into one frozen Config."""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from sidecar.config import (
    SCHEMA,
    ConfigError,
    DatabaseNameError,
    Duration,
    Int,
    PathList,
    Schema,
    Str,
    load_config,
    looks_like_sqlite,
    render_config,
    section,
    setting,
    validate_db_name,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ltx-sidecar.toml"
    path.write_text(text)
    return path


def error(tmp_path: Path, text: str = "", env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), env or {})
    return exc.value


# -- defaults and parsing --------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, {})
    assert cfg.data_dir == Path("ltx-data")
    assert cfg.node_id == socket.gethostname()
    assert cfg.databases.paths == () and cfg.databases.dirs == ()
    assert cfg.databases.watch_debounce == timedelta(milliseconds=1)
    assert cfg.databases.poll_interval == timedelta(milliseconds=250)
    assert cfg.checkpoint.passive_frames == 1000
    assert cfg.checkpoint.truncate_frames == 100_000
    assert cfg.checkpoint.interval == timedelta(minutes=1)
    assert cfg.checkpoint.seal_timeout == timedelta(milliseconds=100)
    assert cfg.retention.max_age == timedelta(minutes=10)
    assert cfg.retention.keep_count == 100


def test_node_id_defaults_to_the_fly_machine_id() -> None:
    assert load_config(None, {"FLY_MACHINE_ID": "148e21ea7c4e89"}).node_id == "148e21ea7c4e89"


def test_config_is_frozen() -> None:
    cfg = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node_id = "x"  # type: ignore[misc]


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        data-dir = "/var/lib/ltx"
        node-id = "node-a"

        [databases]
        paths = ["/data/app.db", "/data/users.sqlite"]
        dirs = ["/data/tenants"]
        watch-debounce = "2ms"
        poll-interval = 1.5

        [checkpoint]
        passive-frames = 500
        truncate-frames = 5000
        interval = "30s"
        seal-timeout = "50ms"

        [retention]
        max-age = "1h"
        keep-count = 0
        """,
    )
    cfg = load_config(path, {})
    assert cfg.data_dir == Path("/var/lib/ltx") and cfg.node_id == "node-a"
    assert cfg.databases.paths == (Path("/data/app.db"), Path("/data/users.sqlite"))
    assert cfg.databases.dirs == (Path("/data/tenants"),)
    assert cfg.databases.watch_debounce == timedelta(milliseconds=2)
    assert cfg.databases.poll_interval == timedelta(seconds=1.5)
    assert cfg.checkpoint.passive_frames == 500 and cfg.checkpoint.truncate_frames == 5000
    assert cfg.checkpoint.interval == timedelta(seconds=30)
    assert cfg.checkpoint.seal_timeout == timedelta(milliseconds=50)
    assert cfg.retention.max_age == timedelta(hours=1) and cfg.retention.keep_count == 0


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'data-dir = "/from/file"\nnode-id = "file"\n[checkpoint]\ninterval = "5m"\n'
    )
    env = {
        "LTX_SIDECAR_DATA_DIR": "/from/env",
        "LTX_SIDECAR_NODE_ID": "env-node",
        "LTX_SIDECAR_CHECKPOINT_INTERVAL": "10s",
        "LTX_SIDECAR_CHECKPOINT_PASSIVE_FRAMES": " 42 ",
        "FLY_MACHINE_ID": "ignored-when-set",
        "LTX_SIDECAR_CONFIG": str(path),  # the file's own location is not a setting
        "PATH": "/usr/bin",
    }
    cfg = load_config(path, env)
    assert cfg.data_dir == Path("/from/env") and cfg.node_id == "env-node"
    assert cfg.checkpoint.interval == timedelta(seconds=10)
    assert cfg.checkpoint.passive_frames == 42


def test_environment_lists_split_on_commas_and_pathsep() -> None:
    env = {"LTX_SIDECAR_DATABASES_PATHS": f"/a.db, /b.db{os.pathsep}/c.db,,"}
    cfg = load_config(None, env)
    assert cfg.databases.paths == (Path("/a.db"), Path("/b.db"), Path("/c.db"))
    assert load_config(None, {"LTX_SIDECAR_DATABASES_DIRS": ""}).databases.dirs == ()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0", timedelta(0)),
        ("1ms", timedelta(milliseconds=1)),
        ("500ms", timedelta(milliseconds=500)),
        ("5s", timedelta(seconds=5)),
        ("10m", timedelta(minutes=10)),
        ("1h", timedelta(hours=1)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("250us", timedelta(microseconds=250)),
        ("0.1", timedelta(milliseconds=100)),
        (" 2 m ", timedelta(minutes=2)),
    ],
)
def test_durations(text: str, want: timedelta) -> None:
    assert Duration(positive=False).from_toml(text) == want
    assert Duration(positive=False).from_env(text) == want


def test_durations_as_toml_numbers_are_seconds(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "[retention]\nmax-age = 90\n[checkpoint]\ninterval = 0.25\n"), {}
    )
    assert cfg.retention.max_age == timedelta(seconds=90)
    assert cfg.checkpoint.interval == timedelta(milliseconds=250)


# -- rejection -----------------------------------------------------------------------------


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path) -> None:
    exc = error(tmp_path, "[checkpoint]\npassive-frame = 10\n")
    assert exc.key == "checkpoint.passive-frame"
    assert "unknown key (did you mean checkpoint.passive-frames?)" in str(exc)


def test_unknown_section_and_misplaced_key_are_rejected(tmp_path: Path) -> None:
    assert str(error(tmp_path, "[backup]\nx = 1\n")).startswith("backup: unknown section")
    assert "(did you mean retention?)" in str(error(tmp_path, "[retension]\nmax-age = 1\n"))
    exc = error(tmp_path, 'paths = ["/a.db"]\n')
    assert str(exc) == "paths: unknown key (did you mean [databases] paths?)"
    assert str(error(tmp_path, "databases = 3\n")) == "databases: must be a table, got 3"


def test_unknown_environment_variable_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown environment variable") as exc:
        load_config(None, {"LTX_SIDECAR_DATADIR": "/x"})
    assert exc.value.key == "LTX_SIDECAR_DATADIR"
    assert "LTX_SIDECAR_DATA_DIR" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[checkpoint]\npassive-frames = -3\n",
            "checkpoint.passive-frames: must be a positive integer, got -3",
        ),
        (
            '[checkpoint]\npassive-frames = "10"\n',
            'checkpoint.passive-frames: must be a positive integer, got "10"',
        ),
        (
            "[checkpoint]\npassive-frames = true\n",
            "checkpoint.passive-frames: must be a positive integer, got true",
        ),
        (
            "[checkpoint]\npassive-frames = 1.5\n",
            "checkpoint.passive-frames: must be a positive integer, got 1.5",
        ),
        (
            "[retention]\nkeep-count = -1\n",
            "retention.keep-count: must be a non-negative integer, got -1",
        ),
        (
            '[retention]\nmax-age = "10 minutes"\n',
            "retention.max-age: must be a non-negative duration",
        ),
        ('[retention]\nmax-age = "-5s"\n', "retention.max-age: must be a non-negative duration"),
        (
            '[checkpoint]\nseal-timeout = "0ms"\n',
            "checkpoint.seal-timeout: must be a positive duration",
        ),
        (
            "[databases]\npoll-interval = 0\n",
            "databases.poll-interval: must be a positive duration",
        ),
        (
            '[databases]\npaths = "/a.db"\n',
            'databases.paths: must be a list of non-empty paths, got "/a.db"',
        ),
        (
            '[databases]\ndirs = ["/a", 3]\n',
            "databases.dirs: must be a list of non-empty paths, got a list",
        ),
        ('data-dir = ""\n', 'data-dir: must be a non-empty path, got ""'),
        ('node-id = "a b"\n', "node-id: must be a node id"),
        ('node-id = "x\\ny"\n', "node-id: must be a node id"),
        (
            "[checkpoint]\npassive-frames = 1000\ntruncate-frames = 10\n",
            "checkpoint.truncate-frames: must be at least checkpoint.passive-frames (1000), got 10",
        ),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    assert str(error(tmp_path, text)).startswith(message)


def test_bad_environment_value_names_the_variable_and_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"LTX_SIDECAR_CHECKPOINT_PASSIVE_FRAMES": "lots"})
    assert str(exc.value) == (
        "LTX_SIDECAR_CHECKPOINT_PASSIVE_FRAMES (checkpoint.passive-frames): "
        'must be a positive integer, got "lots"'
    )


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    assert "invalid TOML" in str(error(tmp_path, "data-dir = \n"))
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.toml", {})


def test_two_databases_with_the_same_name_are_rejected(tmp_path: Path) -> None:
    exc = error(tmp_path, '[databases]\npaths = ["/a/app.db", "/b/app.db"]\n')
    assert exc.key == "databases.paths" and "two databases named 'app.db'" in str(exc)
    assert "starts with a dot" in str(error(tmp_path, '[databases]\npaths = ["/a/.."]\n'))


# -- database names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "a/b", "", ".hidden", ".", "..", "a\\b", "a\x00b", "x" * 256]
)
def test_unsafe_database_names_are_rejected(name: str) -> None:
    with pytest.raises(DatabaseNameError):
        validate_db_name(name)


@pytest.mark.parametrize("name", ["app.db", "users.sqlite3", "a b", "x" * 255, "données.db"])
def test_safe_database_names_pass(name: str) -> None:
    assert validate_db_name(name) == name


def test_database_name_is_the_base_name_and_gives_the_ltx_dir() -> None:
    cfg = load_config(None, {"LTX_SIDECAR_DATA_DIR": "/var/lib/ltx"})
    assert cfg.database_name(Path("/data/app.db")) == "app.db"
    assert cfg.ltx_dir("app.db") == Path("/var/lib/ltx/dbs/app.db/ltx")
    with pytest.raises(DatabaseNameError):
        cfg.ltx_dir("..")


def test_what_counts_as_a_sqlite_database(tmp_path: Path) -> None:
    (tmp_path / "real.bin").write_bytes(b"SQLite format 3\x00" + bytes(100))
    (tmp_path / "new.db").write_bytes(b"")
    (tmp_path / "new.sqlite3").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "notes.db").write_bytes(b"not sqlite at all")
    (tmp_path / "dir.db").mkdir()
    found = sorted(p.name for p in tmp_path.iterdir() if looks_like_sqlite(p))
    assert found == ["new.db", "new.sqlite3", "real.bin"]
    assert not looks_like_sqlite(tmp_path / "missing.db")


# -- rendering -----------------------------------------------------------------------------


def test_render_round_trips(tmp_path: Path) -> None:
    env = {
        "LTX_SIDECAR_DATABASES_PATHS": '/data/a "quoted".db,/data/tab\there.db',
        "LTX_SIDECAR_DATABASES_DIRS": "/srv/tenants",
        "LTX_SIDECAR_DATABASES_WATCH_DEBOUNCE": "250us",
        "LTX_SIDECAR_CHECKPOINT_INTERVAL": "1.5s",
        "LTX_SIDECAR_RETENTION_MAX_AGE": "90m",
        "LTX_SIDECAR_NODE_ID": "node-1",
    }
    cfg = load_config(None, env)
    text = render_config(cfg)
    assert 'interval = "1500ms"' in text and 'max-age = "90m"' in text
    assert "#   env LTX_SIDECAR_CHECKPOINT_PASSIVE_FRAMES" in text
    assert load_config(write(tmp_path, text), {}) == cfg
    assert SCHEMA.load(tomllib.loads(render_config(cfg, comments=False)), {}) == cfg


def test_rendered_defaults_are_a_complete_example_config() -> None:
    text = render_config(load_config(None, {"LTX_SIDECAR_NODE_ID": "n"}))
    raw = tomllib.loads(text)
    for key in SCHEMA.keys:
        table = raw[key.section] if key.section else raw
        assert key.name in table, key.dotted


# -- the schema grows: a section with a secret -------------------------------------------


@dataclass(frozen=True)
class ApiSection:
    token: str = setting(Str(), "changeme", "bearer token for mutating endpoints", secret=True)
    port: int = setting(Int(1), 20202, "listen port")


@dataclass(frozen=True)
class Grown:
    hosts: tuple[Path, ...] = setting(PathList(), [], "some paths")
    api: ApiSection = section(ApiSection, "the HTTP API")  # noqa: RUF009


def test_a_new_section_gets_toml_env_and_masking_for_free() -> None:
    schema = Schema(Grown)
    assert [k.env for k in schema.keys] == [
        "LTX_SIDECAR_HOSTS",
        "LTX_SIDECAR_API_TOKEN",
        "LTX_SIDECAR_API_PORT",
    ]
    obj = schema.load({"api": {"port": 8080}}, {"LTX_SIDECAR_API_TOKEN": "s3cret"})
    assert obj == Grown(api=ApiSection(token="s3cret", port=8080))
    masked = schema.render(obj)
    assert 'token = "***"' in masked and "s3cret" not in masked
    assert schema.load(tomllib.loads(schema.render(obj, mask_secrets=False)), {}) == obj
