"""Log lines: one per event, text or JSON, with the fields given in extra={...}."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.logsetup import setup_logging


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


pytestmark = pytest.mark.usefixtures("restore_root_logger")


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_lines_carry_time_level_logger_message_and_extra_fields() -> None:
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out)
    log = logging.getLogger("ltx_sidecar.node")
    log.info("role change to %s", "primary", extra={"epoch": 4, "reason": "lease won"})
    log.debug("not shown at INFO")
    log.warning("odd value", extra={"path": Path("/x/y")})

    events = json_lines(out)
    assert len(events) == 2
    first = events[0]
    assert first["level"] == "INFO" and first["logger"] == "ltx_sidecar.node"
    assert first["message"] == "role change to primary"
    assert first["epoch"] == 4 and first["reason"] == "lease won"
    assert isinstance(first["time"], str) and first["time"].endswith("Z")
    assert events[1]["path"] == "/x/y"  # values JSON cannot hold are written as text


def test_an_exception_stays_on_one_json_line() -> None:
    out = io.StringIO()
    setup_logging("json", "DEBUG", stream=out)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("x").exception("sync failed")
    (event,) = json_lines(out)
    assert event["message"] == "sync failed"
    assert "RuntimeError: boom" in str(event["exception"])


def test_text_lines_show_extra_fields_as_key_value() -> None:
    out = io.StringIO()
    setup_logging("text", "info", stream=out)
    logging.getLogger("ltx_sidecar.primary").info("snapshot", extra={"db": "app.db", "txid": 7})
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" INFO ltx_sidecar.primary: snapshot db='app.db' txid=7")


def test_setting_up_again_replaces_the_handler_instead_of_doubling_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("text", "INFO", stream=first)
    setup_logging("json", "WARNING", stream=second)
    logging.getLogger("y").warning("once")
    logging.getLogger("y").info("filtered")
    assert first.getvalue() == ""
    assert [e["message"] for e in json_lines(second)] == ["once"]


@pytest.mark.parametrize(("fmt", "level"), [("xml", "INFO"), ("json", "LOUD")])
def test_bad_settings_are_refused(fmt: str, level: str) -> None:
    with pytest.raises(ValueError):
        setup_logging(fmt, level, stream=io.StringIO())
