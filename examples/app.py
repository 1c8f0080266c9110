"""A small message board on SQLite, to run behind ltx-sidecar's proxy.

It is an ordinary app: it opens its database with Python's own sqlite3 module, in WAL
mode, and knows nothing about replication. On a replica the sidecar keeps the database
read-only (writes fail with "database is locked"), and the proxy sends writes to the
primary, so the app only has to report a failed write clearly.

    python examples/app.py migrate --db app.db      # create the schema (on the primary)
    python examples/app.py serve --db app.db --port 8081

GET / lists the messages (HTML, or JSON with ``Accept: application/json`` or
``?format=json``) with this node's id, the TXID the client's ``__txid`` cookie asks
for, and the node's role and TXID when ``--status-url`` points at the sidecar's API.
POST /messages (form or JSON field ``text``) inserts one. Settings come from arguments
or the environment: APP_DB, APP_HOST, APP_PORT, APP_NODE_ID, APP_STATUS_URL; the
sidecar's token for /status is read from LTX_SIDECAR_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import os
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import ClientError, ClientSession, ClientTimeout, web

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    node TEXT NOT NULL,
    created REAL NOT NULL
)
"""
MAX_TEXT = 1000  # characters in one message
LIST_LIMIT = 50  # newest messages shown
BUSY_TIMEOUT_MS = 2000


class NotWritable(Exception):
    """This node cannot write: a replica, or the database is busy for too long."""


class NoDatabase(Exception):
    """The database does not exist yet (the sidecar has not created or received it)."""


@dataclass(frozen=True)
class Settings:
    db: Path
    node_id: str
    status_url: str
    token: str


# -- SQLite (blocking; called in a worker thread) ------------------------------------------


def connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to `path`; never creates the file unless `create` (a replica must not)."""
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(
            f"file:{quote(str(path))}?mode={mode}", uri=True, isolation_level=None
        )
    except sqlite3.OperationalError as exc:
        raise NoDatabase(f"{path}: {exc}") from None
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def migrate(path: Path) -> None:
    """Create the database in WAL mode with its schema; running it again changes nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path, create=True)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise NotWritable(f"{path}: cannot switch to WAL mode (journal_mode is {mode})")
        conn.execute(SCHEMA)
    finally:
        conn.close()


def list_messages(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """The number of messages and the newest LIST_LIMIT of them."""
    conn = connect(path)
    try:
        count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        rows = conn.execute(
            "SELECT id, text, node, created FROM messages ORDER BY id DESC LIMIT ?",
            (LIST_LIMIT,),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            raise NoDatabase(
                f"{path}: no messages table yet (run migrate on the primary)"
            ) from None
        raise
    finally:
        conn.close()
    return int(count), [{"id": r[0], "text": r[1], "node": r[2], "created": r[3]} for r in rows]


def insert_message(path: Path, text: str, node_id: str) -> int:
    conn = connect(path)
    try:
        cur = conn.execute(
            "INSERT INTO messages (text, node, created) VALUES (?, ?, ?)",
            (text, node_id, time.time()),
        )
        return int(cur.lastrowid or 0)
    except sqlite3.OperationalError as exc:
        message = str(exc)
        if "locked" in message or "readonly" in message or "read-only" in message:
            raise NotWritable(
                f"this node cannot write ({message}): it is probably a replica; "
                "send writes through the sidecar's proxy, which routes them to the primary"
            ) from None
        if "no such table" in message:
            raise NoDatabase(
                f"{path}: no messages table yet (run migrate on the primary)"
            ) from None
        raise
    finally:
        conn.close()


# -- HTTP ------------------------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", ClientSession)


def wants_json(request: web.Request) -> bool:
    return request.query.get("format") == "json" or "application/json" in request.headers.get(
        "Accept", ""
    )


def error(request: web.Request, status: int, message: str) -> web.Response:
    if wants_json(request):
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=message + "\n")


async def sidecar_status(app: web.Application) -> dict[str, Any] | None:
    """This node's role and TXID from the sidecar's /status, or None if unreachable."""
    settings = app[SETTINGS]
    if not settings.status_url:
        return None
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    try:
        async with app[CLIENT].get(settings.status_url, headers=headers) as resp:
            if resp.status != 200:
                return {"error": f"status {resp.status}"}
            body = await resp.json()
    except (ClientError, TimeoutError, ValueError) as exc:
        return {"error": str(exc) or type(exc).__name__}
    if not isinstance(body, dict):
        return {"error": "not a JSON object"}
    dbs = body.get("databases") or []
    mine = next((d for d in dbs if isinstance(d, dict) and d.get("name") == settings.db.name), {})
    return {
        "role": body.get("role"),
        "txid": mine.get("txid"),
        "lag_seconds": mine.get("lag_seconds"),
    }


async def index(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    try:
        count, messages = await asyncio.to_thread(list_messages, settings.db)
    except NoDatabase as exc:
        return error(request, 503, f"database not ready: {exc}")
    view = {
        "node": settings.node_id,
        "cookie_txid": request.cookies.get("__txid"),
        "sidecar": await sidecar_status(request.app),
        "count": count,
        "messages": messages,
    }
    if wants_json(request):
        return web.json_response(view)
    return web.Response(text=render_html(view), content_type="text/html")


async def post_message(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            return error(request, 400, "the body is not valid JSON")
        text = body.get("text") if isinstance(body, dict) else None
    else:
        text = (await request.post()).get("text")
    if not isinstance(text, str) or not text.strip():
        return error(request, 400, 'a message needs a non-empty "text" field')
    if len(text) > MAX_TEXT:
        return error(request, 400, f"a message is at most {MAX_TEXT} characters")
    try:
        rowid = await asyncio.to_thread(insert_message, settings.db, text.strip(), settings.node_id)
    except NotWritable as exc:
        return error(request, 503, str(exc))
    except NoDatabase as exc:
        return error(request, 503, f"database not ready: {exc}")
    if request.content_type == "application/json" or wants_json(request):
        return web.json_response(
            {"id": rowid, "text": text.strip(), "node": settings.node_id}, status=201
        )
    raise web.HTTPSeeOther("/")


def render_html(view: dict[str, Any]) -> str:
    e = html.escape
    sidecar = view.get("sidecar") or {}
    if "error" in sidecar:
        where = f"sidecar status unavailable: {e(str(sidecar['error']))}"
    elif sidecar:
        where = f"role {e(str(sidecar.get('role')))}, TXID {e(str(sidecar.get('txid')))}"
    else:
        where = "no sidecar status URL configured"
    rows = "\n".join(
        f"<li>#{m['id']} {e(m['text'])} <small>(written on {e(m['node'])})</small></li>"
        for m in view["messages"]
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>messages on {e(view["node"])}</title></head>
<body>
<h1>Messages ({view["count"]})</h1>
<p>Served by node <b>{e(view["node"])}</b>: {where}.
Your __txid cookie: {e(str(view["cookie_txid"] or "none"))}.</p>
<form method="post" action="/messages">
<input name="text" maxlength="{MAX_TEXT}" required autofocus> <button>Post</button>
</form>
<ul>
{rows}
</ul>
</body></html>
"""


async def _open_client(app: web.Application) -> AsyncIterator[None]:
    app[CLIENT] = ClientSession(timeout=ClientTimeout(total=1.0))
    yield
    await app[CLIENT].close()


def make_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_open_client)
    app.router.add_get("/", index)
    app.router.add_post("/messages", post_message)
    return app


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("migrate", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--db", type=Path, default=env.get("APP_DB"), required="APP_DB" not in env)
    serve = sub.choices["serve"]
    serve.add_argument("--host", default=env.get("APP_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env.get("APP_PORT", "8081")))
    serve.add_argument(
        "--node-id",
        default=env.get("APP_NODE_ID")
        or env.get("LTX_SIDECAR_NODE_ID")
        or env.get("FLY_MACHINE_ID")
        or socket.gethostname(),
    )
    serve.add_argument(
        "--status-url",
        default=env.get("APP_STATUS_URL", ""),
        help="the sidecar's /status URL, e.g. http://127.0.0.1:20202/status",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    db: Path = args.db
    if args.command == "migrate":
        try:
            migrate(db)
        except (sqlite3.Error, NoDatabase, NotWritable, OSError) as exc:
            print(f"app.py migrate: {exc}", file=sys.stderr)
            return 1
        print(f"app.py migrate: {db} is ready", file=sys.stderr)
        return 0
    settings = Settings(
        db=db,
        node_id=args.node_id,
        status_url=args.status_url,
        token=os.environ.get("LTX_SIDECAR_TOKEN", ""),
    )
    print(
        f"app.py: node {settings.node_id} serving {db} on {args.host}:{args.port}", file=sys.stderr
    )
    web.run_app(make_app(settings), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
