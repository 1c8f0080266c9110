"""The node's HTTP API for operators: status, metrics, health, promote, export, import.

``make_api_app`` builds the aiohttp application that the node serves on ``api.port``;
the replication handlers (/stream, /pos, /resync) are added to the same app by the node.
What changes state or reads a database's content needs the cluster token (sidecar.auth):
the :func:`token_middleware` lets only the read-only views in :data:`PUBLIC_ROUTES`
through without it, so a route added later is protected by default.

The API knows nothing about roles: what an action does is the node's business, given
as :class:`Actions` callbacks. :func:`local_export` and :func:`local_import` are the
local halves of export and import (sidecar.dbcopy in a thread) for the node to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

from sidecar import __version__
from sidecar.auth import has_token, unauthorized
from sidecar.cluster import ClusterState
from sidecar.config import Config, DatabaseNameError, validate_db_name
from sidecar.dbcopy import CopyError, export_copy, import_into, validate_sqlite_file
from sidecar.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sidecar.metrics import render_metrics

log = logging.getLogger("ltx_sidecar.api")

SQLITE_CONTENT_TYPE = "application/vnd.sqlite3"
CHUNK_SIZE = 1 << 20
TMP_DIR = "tmp"  # <data-dir>/tmp: uploads and export copies, same filesystem as the data

# (method, path) pairs answered without the token: read-only views of the node's state.
PUBLIC_ROUTES = frozenset(
    (method, path)
    for path in ("/status", "/metrics", "/health", "/txid/wait")
    for method in ("GET", "HEAD")
)

ExportResult = Path | AsyncIterator[bytes]


class ActionError(Exception):
    """An action that cannot be done: answered with `status` and `message` as one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Actions:
    """What the node does when an operator asks; the API only checks and carries.

    * ``promote()``: a planned handoff of the primary role to this node; returns a JSON
      object (for example the new primary and epoch).
    * ``export(name)``: a consistent copy of the database, either a Path to a temporary
      file (the API streams it and then deletes it) or an async iterator of its bytes.
    * ``import_db(name, path)``: replace the database cluster-wide with the (validated)
      SQLite file at `path`, forwarding to the primary when needed; `path` is removed by
      the API afterwards. Returns a JSON object.
    * ``db_path(name)``: the database file of a replicated database, None if unknown.

    Raise :class:`ActionError` for an answer other than 200 (409 not a candidate, 503
    no primary, ...); a :class:`sidecar.dbcopy.CopyError` is answered 400.
    """

    promote: Callable[[], Awaitable[dict[str, Any]]]
    export: Callable[[str], Awaitable[ExportResult]]
    import_db: Callable[[str, Path], Awaitable[dict[str, Any]]]
    db_path: Callable[[str], Path | None]


STATE_KEY = web.AppKey("state", ClusterState)
TOKEN_KEY = web.AppKey("token", str)
CONFIG_KEY = web.AppKey("config", Config)
ACTIONS_KEY = web.AppKey("actions", Actions)


# -- the token ---------------------------------------------------------------------------


def is_public(request: web.Request) -> bool:
    return (request.method, request.path) in PUBLIC_ROUTES


@web.middleware
async def token_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """401 with an empty body, before anything else happens, unless the token is right."""
    if not is_public(request) and not has_token(request, request.app[TOKEN_KEY]):
        return unauthorized()
    return await handler(request)


def text_error(status: int, message: str) -> web.Response:
    """An error answer: one line of plain text."""
    return web.Response(status=status, text=message.replace("\n", " ") + "\n")


def db_name(request: web.Request) -> str:
    """The validated {name} of the URL; raises a 400 answer for an unsafe name."""
    try:
        return validate_db_name(request.match_info["name"])
    except DatabaseNameError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None


# -- read-only views ---------------------------------------------------------------------


def config_summary(cfg: Config) -> dict[str, Any]:
    """The settings an operator looks at first; never a secret."""
    return {
        "data_dir": str(cfg.data_dir),
        "advertise_url": cfg.advertise(),
        "api": {"host": cfg.api.host, "port": cfg.api.port},
        "candidate": cfg.candidate,
        "lease": {
            "type": cfg.lease.type,
            "primary_url": cfg.lease.primary_url,
            "key": cfg.lease.key if cfg.lease.type == "redis" else "",
            "ttl_seconds": cfg.lease.ttl.total_seconds(),
        },
        "proxy": {
            "enabled": cfg.proxy.enabled,
            "port": cfg.proxy.port,
            "max_lag_seconds": cfg.proxy.max_lag.total_seconds(),
        },
        "sync": {
            "replicas": cfg.sync.replicas,
            "timeout_seconds": cfg.sync.timeout.total_seconds(),
        },
        "databases": {
            "paths": [str(p) for p in cfg.databases.paths],
            "dirs": [str(d) for d in cfg.databases.dirs],
        },
    }


def status_document(cfg: Config, state: ClusterState) -> dict[str, Any]:
    """The JSON of GET /status (docs/operations.md describes every field)."""
    return {**state.as_dict(), "version": __version__, "config": config_summary(cfg)}


def health_problem(cfg: Config, state: ClusterState) -> str | None:
    """Why this node should not get traffic now, or None when it is healthy."""
    return state.health_problem(cfg.proxy.max_lag.total_seconds())


async def handle_status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[CONFIG_KEY], request.app[STATE_KEY]))


async def handle_metrics(request: web.Request) -> web.Response:
    body = render_metrics(request.app[STATE_KEY]).encode()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def handle_health(request: web.Request) -> web.Response:
    problem = health_problem(request.app[CONFIG_KEY], request.app[STATE_KEY])
    if problem is None:
        return web.Response(text="OK\n")
    return text_error(503, problem)


# -- actions -----------------------------------------------------------------------------


async def _act(action: Awaitable[dict[str, Any]]) -> web.Response:
    try:
        result = await action
    except ActionError as exc:
        return text_error(exc.status, exc.message)
    except CopyError as exc:
        return text_error(400, str(exc))
    return web.json_response(result)


async def handle_promote(request: web.Request) -> web.Response:
    return await _act(request.app[ACTIONS_KEY].promote())


def tmp_dir(cfg: Config) -> Path:
    path = cfg.data_dir / TMP_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_tmp_file(cfg: Config, name: str, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=tmp_dir(cfg), prefix=f"{name}.", suffix=suffix)
    os.close(fd)
    return Path(tmp)


async def _send_file(response: web.StreamResponse, f: BinaryIO) -> None:
    while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
        await response.write(chunk)


async def handle_export(request: web.Request) -> web.StreamResponse:
    name = db_name(request)
    actions = request.app[ACTIONS_KEY]
    if actions.db_path(name) is None:
        return text_error(404, f"no database named {name!r} here")
    try:
        result = await actions.export(name)
    except ActionError as exc:
        return text_error(exc.status, exc.message)
    except CopyError as exc:
        return text_error(400, str(exc))
    response = web.StreamResponse(
        headers={
            "Content-Type": SQLITE_CONTENT_TYPE,
            "Content-Disposition": f'attachment; filename="{name}"',
        }
    )
    if isinstance(result, Path):
        # Removed at once: the open file is all that is needed, and nothing is left
        # behind however the transfer ends.
        try:
            f = open(result, "rb")  # noqa: SIM115 (closed below)
        finally:
            with contextlib.suppress(FileNotFoundError):
                result.unlink()
        with f:
            response.content_length = os.fstat(f.fileno()).st_size
            await response.prepare(request)
            await _send_file(response, f)
    else:
        await response.prepare(request)
        async for chunk in result:
            await response.write(chunk)
    await response.write_eof()
    return response


async def receive_upload(request: web.Request, path: Path) -> int:
    """Write the request body to `path` as it arrives; return its size."""
    size = 0
    with open(path, "wb") as f:
        while chunk := await request.content.read(CHUNK_SIZE):
            await asyncio.to_thread(f.write, chunk)
            size += len(chunk)
    return size


async def handle_import(request: web.Request) -> web.Response:
    name = db_name(request)
    cfg, actions = request.app[CONFIG_KEY], request.app[ACTIONS_KEY]
    if actions.db_path(name) is None:
        return text_error(404, f"no database named {name!r} here")
    upload = _new_tmp_file(cfg, name, ".upload")
    try:
        size = await receive_upload(request, upload)
        try:
            await asyncio.to_thread(validate_sqlite_file, upload)
        except CopyError as exc:
            return text_error(400, f"not imported: {exc}")
        log.info("%s: importing a %d-byte database file", name, size)
        return await _act(actions.import_db(name, upload))
    finally:
        with contextlib.suppress(FileNotFoundError):
            upload.unlink()


# -- local halves of export and import, for the node ------------------------------------


async def local_export(cfg: Config, name: str, db_path: Path) -> Path:
    """A consistent copy of the local database in <data-dir>/tmp (the caller removes it)."""
    out = _new_tmp_file(cfg, name, ".export")
    try:
        await asyncio.to_thread(export_copy, db_path, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        raise
    return out


async def local_import(name: str, db_path: Path, src: Path) -> dict[str, Any]:
    """Replace the local database with `src` in one transaction (on the primary)."""
    info = await asyncio.to_thread(import_into, db_path, src)
    log.info("%s: imported %d pages of %d bytes", name, info["pages"], info["page_size"])
    return {"db": name, **info}


# -- the app -----------------------------------------------------------------------------


def make_api_app(
    cfg: Config, state: ClusterState, token: str, *, actions: Actions
) -> web.Application:
    """The node API application; the node adds its replication routes to it."""
    app = web.Application(middlewares=[token_middleware])
    app[STATE_KEY] = state
    app[TOKEN_KEY] = token
    app[CONFIG_KEY] = cfg
    app[ACTIONS_KEY] = actions
    with warnings.catch_warnings():  # plain keys too, for handlers written against them
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        app["state"] = state
        app["token"] = token
        app["db_path"] = actions.db_path
    app.router.add_get("/status", handle_status)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/promote", handle_promote)
    app.router.add_get("/db/{name}/export", handle_export)
    app.router.add_post("/db/{name}/import", handle_import)
    return app


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (port 0: any free port, see runner.addresses)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


__all__ = [
    "ACTIONS_KEY",
    "CONFIG_KEY",
    "PUBLIC_ROUTES",
    "STATE_KEY",
    "TOKEN_KEY",
    "ActionError",
    "Actions",
    "config_summary",
    "health_problem",
    "local_export",
    "local_import",
    "make_api_app",
    "start_site",
    "status_document",
    "token_middleware",
]
