"""A small client for the local sidecar's execute API, for jobs that are not HTTP requests.

``SidecarClient().execute("app.db", "INSERT ...", [1, 2])`` runs the SQL on the primary
(wherever this node is) and returns once this node has applied the write, so the job's
next read sees it. Only the standard library is used, so any script can import it.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.auth import read_token_file

DEFAULT_URL = "http://127.0.0.1:20202"
Params = list[Any] | dict[str, Any] | None


class SidecarError(RuntimeError):
    """The sidecar refused or failed a request; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"sidecar: {status}: {message}" if status else f"sidecar: {message}")


@dataclass(frozen=True, slots=True)
class ExecuteResult:
    txid: int
    rows_affected: int
    rows: list[list[Any]] | None
    caught_up: bool  # this node has applied txid (false only if waiting timed out)


def default_token() -> str | None:
    """$LTX_SIDECAR_TOKEN, else ``<data-dir>/token`` ($LTX_SIDECAR_DATA_DIR or ./ltx-data)."""
    token = os.environ.get("LTX_SIDECAR_TOKEN")
    if token:
        return token
    data_dir = Path(os.environ.get("LTX_SIDECAR_DATA_DIR", "./ltx-data")).expanduser()
    return read_token_file(data_dir / "token")


def parse_result(answer: dict[str, Any]) -> ExecuteResult:
    return ExecuteResult(
        txid=int(answer["txid"], 16),
        rows_affected=int(answer["rows_affected"]),
        rows=answer.get("rows"),
        caught_up=bool(answer.get("caught_up", True)),
    )


class SidecarClient:
    """Blocking client of ``POST /db/{name}/execute``; ``aexecute`` runs it off the loop."""

    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60.0
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token if token is not None else default_token()
        self.timeout = timeout

    def execute(
        self, db: str, sql: str, params: Params = None, *, wait: bool = True
    ) -> ExecuteResult:
        """Run one statement on the primary; wait (default) until this node has it."""
        return self._post(db, {"sql": sql, "params": params, "wait": wait})

    def execute_many(
        self, db: str, statements: list[tuple[str, Params]], *, wait: bool = True
    ) -> ExecuteResult:
        """Run statements in one transaction on the primary; rows are the last one's."""
        body = {"statements": [[sql, params] for sql, params in statements], "wait": wait}
        return self._post(db, body)

    async def aexecute(
        self, db: str, sql: str, params: Params = None, *, wait: bool = True
    ) -> ExecuteResult:
        return await asyncio.to_thread(self.execute, db, sql, params, wait=wait)

    def _post(self, db: str, body: dict[str, Any]) -> ExecuteResult:
        if not self.token:
            raise SidecarError(
                0, "no token: pass token=, set LTX_SIDECAR_TOKEN or LTX_SIDECAR_DATA_DIR"
            )
        url = f"{self.url}/db/{urllib.parse.quote(db, safe='')}/execute"
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SidecarError(exc.code, _error_message(exc.read(), exc.reason)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise SidecarError(0, f"cannot reach {url}: {exc}") from None
        return parse_result(answer)


def _error_message(body: bytes, reason: str) -> str:
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip() or reason
    return str(message)
