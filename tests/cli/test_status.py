"""ltxctl status, promote, export and import against a real node API on 127.0.0.1.

ltxctl is synchronous: it runs in a worker thread (asyncio.to_thread) while the test's
event loop serves the API it talks to.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import Progress, format_status, main
from sidecar.tailer import TailerState
from tests.helpers import free_port
from tests.sidecar.test_api import TOKEN, TestNode, make_db, rows_of, start_test_node


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LTX_SIDECAR_TOKEN", "LTX_SIDECAR_CONFIG", "LTX_SIDECAR_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[TestNode]:
    started = await start_test_node(tmp_path)
    yield started
    await started.runner.cleanup()


async def ltxctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def empty_data_dir(tmp_path: Path) -> str:
    path = tmp_path / "empty-data"
    path.mkdir(exist_ok=True)
    return str(path)


# -- status ------------------------------------------------------------------------------


async def test_status_table_shows_node_databases_and_replicas(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = await ltxctl(
        capsys, "status", "--url", node.url, "--data-dir", empty_data_dir(tmp_path)
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["Node", "node-a", "at", node.url]
    assert lines[1].split()[:4] == ["Role", "primary", "(epoch", "3,"]
    assert lines[2].split() == ["Primary", "node-a", "at", node.url]
    header = next(line for line in lines if line.startswith("DATABASE"))
    assert header.split() == ["DATABASE", "TXID", "CHECKSUM", "SIZE", "WAL", "LAG"]
    row = next(line for line in lines if line.startswith("app.db"))
    assert row.split()[:3] == ["app.db", "0000000000000005", "8000000000000abc"]
    replica = next(line for line in lines if line.startswith("node-b"))
    assert replica.split()[:2] == ["node-b", "yes"]
    assert "app.db" in replica and "0000000000000004" in replica and "1 txids" in replica


async def test_status_json_is_the_status_document(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = await ltxctl(
        capsys, "status", "--json", "--url", node.url, "--data-dir", empty_data_dir(tmp_path)
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["node_id"] == "node-a" and doc["role"] == "primary" and doc["epoch"] == 3
    assert [db["txid"] for db in doc["databases"]] == ["0000000000000005"]
    assert doc["replicas"][0]["databases"]["app.db"]["lag_txids"] == 1


def write_primary_state(data_dir: Path, name: str, txid: int) -> None:
    """state.json as sidecar/primary.py writes it."""
    state = TailerState(name=name, path=f"/data/{name}", txid=txid, checksum=0x8000000000000042)
    state.page_size, state.pages, state.wal_size = 4096, 3, 8272
    doc: dict[str, Any] = {**state.as_dict(), "role": "primary", "updated": time.time() - 5}
    path = data_dir / "dbs" / name / "state.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))


async def test_status_without_a_sidecar_shows_the_data_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    write_primary_state(data_dir, "app.db", 0x2A)
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = await ltxctl(capsys, "status", "--url", dead, "--data-dir", str(data_dir))
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith(f"ltxctl status: the sidecar at {dead} does not answer (")
    row = next(line for line in out.splitlines() if line.startswith("app.db"))
    assert row.split()[:6] == [
        "app.db",
        "primary",
        "000000000000002a",
        "8000000000000042",
        "12.0",
        "KiB",
    ]


async def test_status_json_without_a_sidecar_reads_pos_files_from_the_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir, db_dir = tmp_path / "data", tmp_path / "dbs"
    db_dir.mkdir()
    Path(f"{db_dir / 'app.db'}-pos").write_text("0000000000000007/8000000000000099\n")
    (db_dir / ".primary").write_text("node-a\n")
    port = free_port()
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'data-dir = "{data_dir}"\n[api]\nport = {port}\n'
        f'[databases]\npaths = ["{db_dir / "app.db"}"]\n'
    )
    code, out, err = await ltxctl(capsys, "status", "--json", "--config", str(config))
    assert code == 1 and f"127.0.0.1:{port} does not answer" in err
    doc = json.loads(out)
    assert doc["running"] is False and doc["primary"] == "node-a"
    assert doc["databases"] == [
        {
            "name": "app.db",
            "source": f"{db_dir / 'app.db'}-pos",
            "role": "replica",
            "txid": "0000000000000007",
            "checksum": "8000000000000099",
        }
    ]


async def test_status_watch_refreshes_until_interrupted(
    node: TestNode,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the user presses Ctrl-C during the second wait
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("sidecar.cli.time.sleep", sleep)
    code, out, _ = await ltxctl(
        capsys, "status", "--watch", "0.5", "--url", node.url, "--data-dir", str(tmp_path)
    )
    assert code == 0 and sleeps == [0.5, 0.5]
    assert sum(line.startswith("Node ") for line in out.splitlines()) == 2


def test_a_replica_row_shows_its_lag() -> None:
    doc = {
        "node_id": "node-b",
        "api_url": "http://b:20202",
        "role": "replica",
        "epoch": 2,
        "ready": True,
        "primary": {"node_id": "node-a", "api_url": "http://a:20202", "epoch": 2},
        "uptime_seconds": 3725,
        "databases": [
            {"name": "app.db", "txid": "00000000000000a0", "checksum": "8000000000000001"},
        ],
        "replicas": [],
    }
    doc["databases"][0].update(lag_txids=3, lag_seconds=1.25)  # type: ignore[index]
    text = format_status(doc)
    assert "Uptime   1h2m5s" in text
    assert "Primary  node-a at http://a:20202" in text
    assert "3 txids, 1.2s" in text
    assert "REPLICA" not in text  # only the primary lists replicas


# -- promote and the token ----------------------------------------------------------------


async def test_promote_with_the_token(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = await ltxctl(
        capsys, "promote", "--url", node.url, "--token", TOKEN, "--data-dir", str(tmp_path)
    )
    assert (code, out, err) == (0, "node-a is the primary (epoch 4)\n", "")
    assert node.promotions == [4]


async def test_the_token_is_read_from_the_data_directory(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "with-token"
    data_dir.mkdir()
    (data_dir / "token").write_text(TOKEN + "\n")
    code, _, err = await ltxctl(capsys, "promote", "--url", node.url, "--data-dir", str(data_dir))
    assert (code, err) == (0, "")


async def test_no_token_is_one_clear_line(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = await ltxctl(
        capsys, "promote", "--url", node.url, "--data-dir", empty_data_dir(tmp_path)
    )
    assert code == 1 and out == ""
    assert err.startswith("ltxctl promote: no token: give --token") and err.count("\n") == 1
    assert node.promotions == []


async def test_a_wrong_token_is_one_clear_line(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = await ltxctl(
        capsys, "promote", "--url", node.url, "--token", "nope", "--data-dir", str(tmp_path)
    )
    assert code == 1
    assert err == (
        f"ltxctl promote: the sidecar at {node.url} refused the token (401): give the "
        "cluster's token with --token, $LTX_SIDECAR_TOKEN or <data-dir>/token\n"
    )


async def test_a_dead_sidecar_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = await ltxctl(
        capsys, "promote", "--url", dead, "--token", TOKEN, "--data-dir", str(tmp_path)
    )
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"ltxctl promote: the sidecar at {dead} does not answer")


# -- export and import ------------------------------------------------------------------


async def test_import_then_export_with_ltxctl(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = tmp_path / "new.db"
    rows = [f"from ltxctl {i}" for i in range(300)]
    make_db(src, rows, wal=False)
    common = ["--url", node.url, "--token", TOKEN, "--data-dir", str(tmp_path)]

    code, out, err = await ltxctl(capsys, "import", "--db", "app.db", str(src), *common)
    assert (code, err) == (0, ""), out
    assert out.startswith(f"imported {src} into app.db (page_size 4096, ")
    assert rows_of(node.db) == rows

    exported = tmp_path / "out" / "copy.db"
    exported.parent.mkdir()
    code, out, err = await ltxctl(capsys, "export", "--db", "app.db", "-o", str(exported), *common)
    assert (code, err) == (0, "")
    assert out.startswith(f"exported app.db to {exported} (")
    assert rows_of(exported) == rows
    assert [p.name for p in exported.parent.iterdir()] == ["copy.db"]


async def test_import_refuses_a_file_that_is_not_sqlite_before_uploading(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("definitely not a database\n" * 100)
    code, out, err = await ltxctl(
        capsys, "import", "--db", "app.db", str(bad), "--url", node.url, "--token", TOKEN
    )
    assert code == 1 and out == ""
    assert (
        err
        == f"ltxctl import: {bad}: refused: not a SQLite database (no 'SQLite format 3' header)\n"
    )
    assert node.imports == [] and rows_of(node.db) == ["one", "two"]


async def test_export_of_an_unknown_database_leaves_no_file(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "x.db"
    code, _, err = await ltxctl(
        capsys, "export", "--db", "nope.db", "-o", str(out_file), "--url", node.url,
        "--token", TOKEN, "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 1
    assert err == "ltxctl export: the sidecar answered 404: no database named 'nope.db' here\n"
    assert not out_file.exists()


async def test_a_bad_database_name_is_refused_locally(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = await ltxctl(
        capsys, "export", "--db", "../etc", "-o", str(tmp_path / "x"), "--url", "http://x:1",
        "--token", "t",
    )  # fmt: skip
    assert code == 1 and "contains a path separator" in err


def test_the_progress_bar_shows_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress("import app.db", 64 << 20, stream)
        progress.update(16 << 20)
        progress.close()
    assert pipe.getvalue() == ""
    assert tty.getvalue().endswith(
        "\rimport app.db [#######                       ]  25% 16.0 MiB of 64.0 MiB\n"
    )
    small = Progress("x", 1000, Terminal())
    assert not small.enabled  # small transfers finish before a bar would help


async def test_export_into_a_missing_directory_is_one_line_on_stderr(
    node: TestNode, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "missing" / "x.db"
    code, out, err = await ltxctl(
        capsys, "export", "--db", "app.db", "-o", str(out_file), "--url", node.url,
        "--token", TOKEN, "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("ltxctl export: ") and "No such file or directory" in err
