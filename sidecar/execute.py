"""``POST /db/{name}/execute``: writes from code that is not an HTTP request.

A background job on any node sends SQL here; the primary runs it in one transaction and
answers with the TXID that covers it, and a replica forwards it to the primary, then
waits until it has applied that TXID itself, so the job reads its own write.

Request (JSON): ``{"sql": str, "params": list | dict | null}`` or
``{"statements": [[sql, params], ...]}``, optional ``"wait": bool`` (default true).
Answer: ``{"txid": "<16 hex>", "rows_affected": n, "rows": [...], "caught_up": bool}``;
``rows`` holds the last statement's rows (lists; blobs as ``{"base64": ...}``).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import sqlean
from aiohttp import web

from sidecar.auth import bearer, require_token
from sidecar.cluster import ClusterState
from sidecar.proxy import FORWARDED_BY_HEADER, forward_signature, forwarded_by

Params = list[Any] | dict[str, Any] | None

PRIMARY_TIMEOUT = 5.0  # seconds a request waits to learn who the primary is
CATCH_UP_TIMEOUT = 10.0  # seconds a replica waits to apply the primary's answer
BUSY_TIMEOUT_MS = 5000


class RequestError(ValueError):
    """A request body that breaks the rules above; the message says which field."""


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: Params


@dataclass(frozen=True, slots=True)
class Outcome:
    rows_affected: int
    rows: list[list[Any]] | None


def parse_request(body: object) -> tuple[list[Statement], bool]:
    """The statements and the wait flag of an execute request, or RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    wait = body.get("wait", True)
    if not isinstance(wait, bool):
        raise RequestError("wait must be true or false")
    if "statements" in body:
        items = body["statements"]
        if not isinstance(items, list) or not items:
            raise RequestError("statements must be a non-empty list of [sql, params]")
        return [_statement(item, f"statements[{i}]") for i, item in enumerate(items)], wait
    if "sql" in body:
        return [_statement([body["sql"], body.get("params")], "sql")], wait
    raise RequestError('the body needs "sql" or "statements"')


def _statement(item: object, where: str) -> Statement:
    if not isinstance(item, list) or not 1 <= len(item) <= 2:
        raise RequestError(f"{where}: must be [sql] or [sql, params]")
    sql = item[0]
    params = item[1] if len(item) == 2 else None
    if not isinstance(sql, str) or not sql.strip():
        raise RequestError(f"{where}: sql must be a non-empty string")
    if params is not None and not isinstance(params, list | dict):
        raise RequestError(f"{where}: params must be a list, an object or null")
    return Statement(sql, params)


def _jsonable(value: object) -> object:
    if isinstance(value, bytes | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    return value


class NotPrimaryError(Exception):
    """The node stopped being the primary before the write could commit."""


def run_statements(
    path: Path, statements: list[Statement], *, still_primary: Callable[[], bool] | None = None
) -> Outcome:
    """Run statements in one BEGIN IMMEDIATE transaction; any error rolls all of them back.

    Uses sqlean, the process's one SQLite library (DESIGN.md choice 3: a second library
    would drop the locks that pin the WAL when its descriptors close). `still_primary`
    is asked once the write lock is held: a node that handed over meanwhile must not
    commit (its replica role would undo the write).
    """
    conn = sqlean.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            if still_primary is not None and not still_primary():
                raise NotPrimaryError
            rows: list[list[Any]] | None = None
            for stmt in statements:
                cursor = conn.execute(stmt.sql, stmt.params if stmt.params is not None else ())
                fetched = cursor.fetchall() if cursor.description is not None else None
                rows = (
                    [[_jsonable(v) for v in row] for row in fetched]
                    if fetched is not None
                    else None
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Outcome(conn.total_changes - before, rows)
    finally:
        conn.close()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def handle_execute(request: web.Request) -> web.StreamResponse:
    """``POST /db/{name}/execute`` (token required); see the module docstring."""
    require_token(request, request.app["token"])
    state: ClusterState = request.app["state"]
    name = request.match_info["name"]
    try:
        statements, wait = parse_request(await request.json())
    except json.JSONDecodeError as exc:
        return _error(400, f"the body is not JSON: {exc}")
    except RequestError as exc:
        return _error(400, str(exc))
    for _ in range(2):  # a handoff may move the lease while we wait: then route again
        if not state.is_primary and not state.pausing_writes:
            await state.wait_for_primary(PRIMARY_TIMEOUT)
        if not state.is_primary and not state.pausing_writes:
            break
        async with state.primary_write(PRIMARY_TIMEOUT) as here:
            if here:
                return await _execute_here(request, state, name, statements)
        await state.wait_for(lambda: state.primary is not None, PRIMARY_TIMEOUT)
    if state.is_primary:
        return _error(503, "the primary is changing: retry")
    if forwarded_by(request.headers.get(FORWARDED_BY_HEADER), request.app["token"]):
        return _error(503, "this node is not the primary (the primary changed), retry")
    if state.primary is None:
        return _error(503, "no primary is known: cannot run this write, retry shortly")
    return await _forward(request, state, name, statements, wait)


async def _execute_here(
    request: web.Request, state: ClusterState, name: str, statements: list[Statement]
) -> web.Response:
    db_path: Callable[[str], Path | None] = request.app["db_path"]
    path = db_path(name)
    if path is None:
        return _error(404, f"no database named {name!r} on this node")
    try:
        outcome = await asyncio.to_thread(
            run_statements, path, statements, still_primary=lambda: state.is_primary
        )
    except NotPrimaryError:
        return _error(503, "this node stopped being the primary: nothing was committed, retry")
    except sqlean.Error as exc:
        return _error(400, f"SQLite: {exc} (nothing was committed)")
    txid = await state.committed_txid(name)
    return web.json_response(
        {
            "txid": f"{txid:016x}",
            "rows_affected": outcome.rows_affected,
            "rows": outcome.rows,
            "caught_up": True,
        }
    )


async def _forward(
    request: web.Request,
    state: ClusterState,
    name: str,
    statements: list[Statement],
    wait: bool,
) -> web.Response:
    assert state.primary is not None
    token: str = request.app["token"]
    url = f"{state.primary.node.api_url.rstrip('/')}/db/{name}/execute"
    body = {"statements": [[s.sql, s.params] for s in statements], "wait": False}
    headers = {**bearer(token), FORWARDED_BY_HEADER: forward_signature(token, state.me.node_id)}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(url, json=body, headers=headers) as response,
        ):
            text = await response.text()
            if response.status != 200:
                return web.Response(
                    status=response.status, text=text, content_type="application/json"
                )
            answer: dict[str, Any] = json.loads(text)
    except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as exc:
        return _error(502, f"cannot reach the primary at {url}: {exc or type(exc).__name__}")
    txid = int(answer["txid"], 16)
    if wait:
        answer["caught_up"] = await state.wait_for_txid(name, txid, CATCH_UP_TIMEOUT)
    else:
        answer["caught_up"] = state.txid(name) >= txid
    return web.json_response(answer)
