"""The proxy's rules as ASGI and WSGI middleware, for apps that run without the proxy.

The rules themselves (what a read is, the ``__txid`` cookie, where a replica sends a
write) are the ones in sidecar/proxy.py; this module only adapts them to ASGI and WSGI.
The node's state comes from the local sidecar API: ``GET /status`` (cached briefly) and
``GET /txid/wait`` (a long-poll woken by the apply itself). Those calls are blocking
(standard library only); the ASGI middleware runs them in a worker thread.

Differences from the proxy, by design: no health endpoint (the API has ``/health``) and
no synchronous mode (use the proxy for that).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import aiohttp
from yarl import URL

from sidecar.client import default_token
from sidecar.cluster import NodeInfo
from sidecar.config import ProxyConfig
from sidecar.proxy import (
    CHUNK,
    FLY_REPLAY_HEADER,
    FLY_REPLAY_SRC_HEADER,
    FORWARDED_BY_HEADER,
    Forward,
    Refuse,
    Replay,
    Route,
    choose_db,
    classify,
    forward_signature,
    forwarded_by,
    forwarded_headers,
    replica_write_action,
    requested_txid,
    strip_hop_by_hop,
    txid_cookie,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo

DEFAULT_API_URL = "http://127.0.0.1:20202"

# -- the node's state, from the local sidecar API --------------------------------------------


class SidecarUnavailable(RuntimeError):
    """The local sidecar API did not answer; requests that need it get a 503."""


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What the middleware needs from ``GET /status``."""

    role: str
    primary: NodeInfo | None
    txids: dict[str, int]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeStatus:
        p = data.get("primary")
        primary = (
            NodeInfo(p["node_id"], p.get("api_url", ""), p.get("proxy_url", "")) if p else None
        )
        txids = {d["name"]: int(d["txid"], 16) for d in data.get("databases", [])}
        return cls(str(data.get("role", "starting")), primary, txids)


class LocalSidecar:
    """Blocking calls to the local sidecar API, with /status cached for cache_seconds."""

    def __init__(self, api_url: str = DEFAULT_API_URL, cache_seconds: float = 0.5) -> None:
        self.api_url = api_url.rstrip("/")
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, NodeStatus] | None = None

    def _get(self, path: str, timeout: float) -> dict[str, Any]:
        url = self.api_url + path
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace").strip()
            raise SidecarUnavailable(f"{url}: {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SidecarUnavailable(f"{url}: {exc}") from None

    def status(self, fresh: bool = False) -> NodeStatus:
        with self._lock:
            cached = self._cached
        if cached is not None and not fresh and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        status = NodeStatus.from_json(self._get("/status", timeout=5.0))
        with self._lock:
            self._cached = (time.monotonic(), status)
        return status

    def wait_txid(self, db: str, txid: int, timeout: float) -> bool:
        """Block until this node has applied txid of db (True) or timeout passes (False)."""
        query = urllib.parse.urlencode({"db": db, "txid": f"{txid:016x}", "timeout": timeout})
        return bool(self._get(f"/txid/wait?{query}", timeout=timeout + 5.0)["reached"])

    def committed_txid(self, db: str) -> int:
        """The TXID covering every commit made so far (on the primary: after a WAL read)."""
        query = urllib.parse.urlencode({"db": db})
        return int(self._get(f"/txid/wait?{query}", timeout=10.0)["txid"], 16)


# -- the shared decisions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteHere:
    """This node is the primary: run the app, then set the cookie for db (if known)."""

    db: str | None


def read_wait(txid: int | None, status: NodeStatus, proxy: ProxyConfig) -> str | None:
    """The database a read must wait on before the app runs, or None if it need not."""
    if txid is None:
        return None
    db = choose_db(proxy.db, status.txids)
    if db is None or status.txids.get(db, 0) >= txid:
        return None
    return db


def write_plan(
    status: NodeStatus,
    proxy: ProxyConfig,
    *,
    on_fly: bool,
    body_length: int | None,
    replayed: bool,
    forwarded: bool,
) -> WriteHere | Replay | Forward | Refuse:
    if status.role == "primary":
        return WriteHere(choose_db(proxy.db, status.txids))
    return replica_write_action(
        status.primary,
        proxy,
        on_fly=on_fly,
        body_length=body_length,
        replayed=replayed,
        forwarded=forwarded,
    )


class _Rules:
    """The settings and sidecar handle both middlewares share."""

    def __init__(
        self,
        api_url: str,
        proxy: ProxyConfig | None,
        token: str | None,
        cache_seconds: float,
        on_fly: bool | None,
    ) -> None:
        self.proxy = proxy or ProxyConfig()
        self.sidecar = LocalSidecar(api_url, cache_seconds)
        self.token = token if token is not None else default_token()
        self.on_fly = bool(os.environ.get("FLY_MACHINE_ID")) if on_fly is None else on_fly
        self.read_timeout = self.proxy.read_timeout.total_seconds()

    def signature(self, node_id: str = "middleware") -> list[tuple[str, str]]:
        return [(FORWARDED_BY_HEADER, forward_signature(self.token, node_id))] if self.token else []

    def was_forwarded(self, headers: dict[str, str]) -> bool:
        return (
            bool(self.token)
            and forwarded_by(headers.get("ltx-forwarded-by"), self.token or "") is not None
        )

    def plan(
        self, headers: dict[str, str], body_length: int | None
    ) -> WriteHere | Replay | Forward | Refuse:
        return write_plan(
            self.sidecar.status(),
            self.proxy,
            on_fly=self.on_fly,
            body_length=body_length,
            replayed=FLY_REPLAY_SRC_HEADER in headers,
            forwarded=self.was_forwarded(headers),
        )

    def read_txid(self, headers: dict[str, str]) -> int | None:
        return requested_txid(headers.get("cookie"), headers.get(self.proxy.txid_header.lower()))

    def read_ok(self, headers: dict[str, str]) -> bool:
        """Whether a read may run now (after waiting for its TXID); False: answer 504."""
        txid = self.read_txid(headers)
        if txid is None:
            return True
        db = read_wait(txid, self.sidecar.status(), self.proxy)
        return db is None or self.sidecar.wait_txid(db, txid, self.read_timeout)

    def cookie_headers(self, db: str | None) -> list[tuple[str, str]]:
        if db is None:
            return []
        txid = self.sidecar.committed_txid(db)
        return [
            ("Set-Cookie", txid_cookie(txid, self.proxy.cookie_max_age)),
            (self.proxy.txid_header, f"{txid:016x}"),
        ]


def _timeout_body(seconds: float) -> bytes:
    return (
        f"timed out after {seconds:g}s waiting for this node to reach the client's TXID\n".encode()
    )


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in headers:
        out.setdefault(key.lower(), value)
    return out


def _body_length(headers: dict[str, str]) -> int | None:
    """The body's length: Content-Length, 0 without a body, None if chunked (unknown)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None
    text = headers.get("content-length", "0").strip()
    return int(text) if text.isdigit() else None


# -- ASGI --------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class LtxASGIMiddleware:
    """ASGI middleware (Starlette, FastAPI): ``app = LtxASGIMiddleware(app, api_url=...)``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_url: str = DEFAULT_API_URL,
        proxy: ProxyConfig | None = None,
        token: str | None = None,
        cache_seconds: float = 0.5,
        on_fly: bool | None = None,
    ) -> None:
        self.app = app
        self.rules = _Rules(api_url, proxy, token, cache_seconds, on_fly)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        lower = _lower(headers)
        route = classify(scope.get("method", "GET"), scope["path"], self.rules.proxy)
        try:
            if scope["type"] == "websocket" or route is Route.READ:
                if not await asyncio.to_thread(self.rules.read_ok, lower):
                    await self._refuse(scope, send, 504, _timeout_body(self.rules.read_timeout))
                    return
                await self.app(scope, receive, send)
                return
            if route is not Route.WRITE:
                await self.app(scope, receive, send)
                return
            plan = await asyncio.to_thread(self.rules.plan, lower, _body_length(lower))
        except SidecarUnavailable as exc:
            await self._refuse(scope, send, 503, f"sidecar API unavailable: {exc}\n".encode())
            return
        if isinstance(plan, WriteHere):
            await self.app(scope, receive, self._with_cookie(send, plan.db))
        elif isinstance(plan, Replay):
            await _send_response(send, 200, [(FLY_REPLAY_HEADER, plan.header)], b"")
        elif isinstance(plan, Refuse):
            await _send_response(send, plan.status, _TEXT, plan.reason.encode())
        else:
            await self._forward(scope, receive, send, headers, lower, plan.base_url)

    def _with_cookie(self, send: Send, db: str | None) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = await asyncio.to_thread(self.rules.cookie_headers, db)
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra),
                ]
            await send(message)

        return sending

    async def _refuse(self, scope: Scope, send: Send, status: int, body: bytes) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": body.decode()[:120]})
        else:
            await _send_response(send, status, _TEXT, body)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: list[tuple[str, str]],
        lower: dict[str, str],
        base_url: str,
    ) -> None:
        client = scope.get("client")
        outgoing = forwarded_headers(
            headers, client[0] if client else None, scope.get("scheme", "http")
        )
        outgoing += self.rules.signature()
        path = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode()
        query = scope.get("query_string", b"")
        target = (
            base_url.rstrip("/")
            + path.decode("latin-1")
            + (f"?{query.decode('latin-1')}" if query else "")
        )
        has_body = _body_length(lower) != 0
        try:
            async with (
                aiohttp.ClientSession(
                    auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
                ) as session,
                session.request(
                    scope["method"],
                    URL(target, encoded=True),
                    headers=outgoing,
                    data=_asgi_body(receive) if has_body else None,
                    allow_redirects=False,
                ) as upstream,
            ):
                out = [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in strip_hop_by_hop(upstream.headers.items())
                ]
                await send(
                    {"type": "http.response.start", "status": upstream.status, "headers": out}
                )
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, OSError) as exc:
            body = f"proxy error: {base_url}: {exc or type(exc).__name__}\n".encode()
            await _send_response(send, 502, _TEXT, body)


_TEXT = [("Content-Type", "text/plain; charset=utf-8")]


async def _asgi_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_response(
    send: Send, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# -- WSGI --------------------------------------------------------------------------------------


Environ = WSGIEnvironment
WSGIApp = WSGIApplication


class LtxWSGIMiddleware:
    """WSGI middleware (Flask, Django): ``app.wsgi_app = LtxWSGIMiddleware(app.wsgi_app)``."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        api_url: str = DEFAULT_API_URL,
        proxy: ProxyConfig | None = None,
        token: str | None = None,
        cache_seconds: float = 0.5,
        on_fly: bool | None = None,
    ) -> None:
        self.app = app
        self.rules = _Rules(api_url, proxy, token, cache_seconds, on_fly)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        headers = _wsgi_headers(environ)
        lower = _lower(headers)
        route = classify(
            environ["REQUEST_METHOD"], environ.get("PATH_INFO", "") or "/", self.rules.proxy
        )
        try:
            if route is Route.READ:
                if not self.rules.read_ok(lower):
                    return _respond(
                        start_response, 504, _TEXT, _timeout_body(self.rules.read_timeout)
                    )
                return self.app(environ, start_response)
            if route is not Route.WRITE:
                return self.app(environ, start_response)
            plan = self.rules.plan(lower, _body_length(lower))
        except SidecarUnavailable as exc:
            return _respond(
                start_response, 503, _TEXT, f"sidecar API unavailable: {exc}\n".encode()
            )
        if isinstance(plan, WriteHere):
            return self.app(environ, self._with_cookie(start_response, plan.db))
        if isinstance(plan, Replay):
            return _respond(start_response, 200, [(FLY_REPLAY_HEADER, plan.header)], b"")
        if isinstance(plan, Refuse):
            return _respond(start_response, plan.status, _TEXT, plan.reason.encode())
        return self._forward(environ, start_response, headers, lower, plan.base_url)

    def _with_cookie(self, start_response: StartResponse, db: str | None) -> StartResponse:
        def starting(
            status: str,
            headers: list[tuple[str, str]],
            exc_info: OptExcInfo | None = None,
            /,
        ) -> Callable[[bytes], object]:
            return start_response(status, [*headers, *self.rules.cookie_headers(db)], exc_info)

        return starting

    def _forward(
        self,
        environ: Environ,
        start_response: StartResponse,
        headers: list[tuple[str, str]],
        lower: dict[str, str],
        base_url: str,
    ) -> Iterable[bytes]:
        base = urllib.parse.urlsplit(base_url)
        outgoing = forwarded_headers(
            headers, environ.get("REMOTE_ADDR"), environ.get("wsgi.url_scheme", "http")
        )
        outgoing += self.rules.signature()
        path = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not path:
            path = urllib.parse.quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
            if environ.get("QUERY_STRING"):
                path += "?" + environ["QUERY_STRING"]
        length = _body_length(lower)
        body: Iterable[bytes] | None = None
        if length is None and environ.get("wsgi.input_terminated"):
            body = _read_until_eof(environ["wsgi.input"])
        elif length:
            body = _read_exactly(environ["wsgi.input"], length)
        connection_class = (
            http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
        )
        conn = connection_class(base.hostname or "localhost", base.port, timeout=60)
        try:
            conn.putrequest(
                environ["REQUEST_METHOD"],
                base.path.rstrip("/") + path,
                skip_host=True,
                skip_accept_encoding=True,
            )
            for key, value in outgoing:
                conn.putheader(key, value)
            if body is not None and length is None:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for chunk in body or ():
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if length is None else chunk)
            if body is not None and length is None:
                conn.send(b"0\r\n\r\n")
            upstream = conn.getresponse()
        except OSError as exc:
            conn.close()
            return _respond(
                start_response, 502, _TEXT, f"proxy error: {base_url}: {exc}\n".encode()
            )
        start_response(
            f"{upstream.status} {upstream.reason}", strip_hop_by_hop(upstream.getheaders())
        )
        return _stream_and_close(upstream, conn)


def _wsgi_headers(environ: Environ) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), str(value)))
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers.append((key.replace("_", "-").title(), str(environ[key])))
    return headers


def _read_exactly(stream: BinaryIO, length: int) -> Iterator[bytes]:
    left = length
    while left > 0:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _read_until_eof(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _stream_and_close(
    upstream: http.client.HTTPResponse, conn: http.client.HTTPConnection
) -> Iterator[bytes]:
    try:
        while chunk := upstream.read(CHUNK):
            yield chunk
    finally:
        conn.close()


def _respond(
    start_response: StartResponse, status: int, headers: list[tuple[str, str]], body: bytes
) -> list[bytes]:
    reason = http.client.responses.get(status, "")
    start_response(f"{status} {reason}", [*headers, ("Content-Length", str(len(body)))])
    return [body]
