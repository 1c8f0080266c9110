"""Logging for the daemon: the standard logging module, one line per event, text or JSON.

``setup_logging("json", "INFO")`` makes every record one JSON object on one line of
stderr: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``,
then every field passed with ``extra={...}`` (``log.info("role change", extra={"role":
"primary", "epoch": 4})``), and ``exception`` with the traceback when there is one.
Text lines read ``2026-11-22T10:00:00.123Z INFO ltx_sidecar.node: message key=value``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from extra={...}.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

_HANDLER_NAME = "ltx-sidecar"


def record_time(record: logging.LogRecord) -> str:
    """The record's time in UTC, ISO 8601 with milliseconds and a Z."""
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields given with extra={...}, in the order given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}


class JSONFormatter(logging.Formatter):
    """One JSON object per record; values JSON cannot hold are written as str()."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": record_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            event.setdefault(key, value)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        extras = "".join(f" {k}={v!r}" for k, v in record_extras(record).items())
        line = f"{record_time(record)} {record.levelname} {record.name}: {record.getMessage()}"
        text = line + extras
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def make_formatter(format: str) -> logging.Formatter:
    if format == "json":
        return JSONFormatter()
    if format == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {format!r}")


def setup_logging(format: str, level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) as text or JSON.

    Replaces a handler an earlier call installed (not other handlers), so it can be
    called again once the configuration is loaded. Returns the handler.
    """
    formatter = make_formatter(format)
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per file event
    return handler


__all__ = ["FORMATS", "JSONFormatter", "TextFormatter", "setup_logging"]
