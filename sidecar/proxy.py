"""The HTTP proxy in front of the app: writes reach the primary, readers see their writes.

The rules (LiteFS's, docs/proxy.md) are pure functions at the top of this module, so the
proxy and the ASGI/WSGI middleware (sidecar/middleware.py) share one definition of what
a read is, what the ``__txid`` cookie holds and where a replica sends a write. The
aiohttp application below applies them to live requests, streaming bodies both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.cluster import ClusterState, NodeInfo
from sidecar.config import Config, ProxyConfig

log = logging.getLogger("ltx_sidecar.proxy")

TXID_COOKIE = "__txid"
HEALTH_PATHS = frozenset({"/litefs/health", "/ltx/health"})
SYNC_RESPONSE_HEADER = "Ltx-Sync"  # "ok" or "timeout" on writes held for sync mode
SYNC_REQUEST_HEADER = "Ltx-Sync-Replicas"  # per-request override of sync.replicas
FORWARDED_BY_HEADER = "Ltx-Forwarded-By"  # "<node id> <hmac>" on replica -> primary hops
FLY_REPLAY_HEADER = "fly-replay"
FLY_REPLAY_SRC_HEADER = "fly-replay-src"
CHUNK = 64 * 1024

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# -- the rules (pure) ------------------------------------------------------------------


class Route(enum.Enum):
    PASSTHROUGH = "passthrough"  # straight to the app: no waiting, no cookie
    HEALTH = "health"
    READ = "read"
    WRITE = "write"


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def glob_match(pattern: str, path: str) -> bool:
    """LiteFS globs: ``*`` is the only wildcard (it crosses ``/``), anchored to the path."""
    return _glob(pattern).fullmatch(path) is not None


def classify(method: str, path: str, proxy: ProxyConfig) -> Route:
    """What a request is, in LiteFS's order: passthrough, health, read, else write."""
    if any(glob_match(p, path) for p in proxy.passthrough_paths):
        return Route.PASSTHROUGH
    reading = method.upper() in ("GET", "HEAD")
    if reading and path in HEALTH_PATHS:
        return Route.HEALTH
    if reading and not any(glob_match(p, path) for p in proxy.write_paths):
        return Route.READ
    return Route.WRITE


_HEX16 = re.compile(r"[0-9a-fA-F]{16}")


def parse_txid(text: str | None) -> int | None:
    """A TXID as 16 hex digits (the cookie's form), else None."""
    if text is None:
        return None
    text = text.strip()
    return int(text, 16) if _HEX16.fullmatch(text) else None


def cookie_value(cookie_header: str | None, name: str = TXID_COOKIE) -> str | None:
    """One cookie's value from a Cookie header; tolerant of other malformed cookies."""
    for part in (cookie_header or "").split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"')
    return None


def requested_txid(cookie_header: str | None, header_value: str | None) -> int | None:
    """The TXID a reader asks for: the txid header's or the ``__txid`` cookie's, the higher."""
    found = [t for t in (parse_txid(header_value), parse_txid(cookie_value(cookie_header))) if t]
    return max(found) if found else None


def txid_cookie(txid: int, max_age: timedelta) -> str:
    """The Set-Cookie value after a write: 16 lowercase hex, Path=/, HttpOnly."""
    seconds = max(1, math.ceil(max_age.total_seconds()))
    return f"{TXID_COOKIE}={txid:016x}; Path=/; Max-Age={seconds}; HttpOnly"


def choose_db(configured: str, names: Iterable[str]) -> str | None:
    """The database the cookie tracks: the configured one, else the only one, else None."""
    if configured:
        return configured
    known = list(names)
    return known[0] if len(known) == 1 else None


def health_verdict(problem: str | None) -> tuple[int, str]:
    """The health check's status and body for ClusterState.health_problem's answer."""
    return (200, "OK\n") if problem is None else (503, f"{problem}\n")


@dataclass(frozen=True, slots=True)
class Replay:
    """Answer with ``fly-replay: instance=<instance>`` so Fly's edge replays the request."""

    instance: str

    @property
    def header(self) -> str:
        return f"instance={self.instance}"


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to the primary's proxy (or app) at base_url and relay the answer."""

    base_url: str


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int
    reason: str


def replica_write_action(
    primary: NodeInfo | None,
    proxy: ProxyConfig,
    *,
    on_fly: bool,
    body_length: int | None,
    replayed: bool = False,
    forwarded: bool = False,
) -> Replay | Forward | Refuse:
    """Where a write that reached a replica goes.

    Fly replays it when told to ("always", or "auto" on Fly) and its body is known to
    fit Fly's replay limit; a request Fly already replayed here is forwarded instead (the
    primary moved). A request another node already forwarded is refused, never bounced
    again.
    """
    if primary is None:
        return Refuse(503, "no primary is known: cannot route this write, retry shortly\n")
    if forwarded:
        return Refuse(
            503,
            f"this node is not the primary (the primary is now {primary.node_id}); "
            "the write was forwarded here by another node, retry\n",
        )
    replay = proxy.fly_replay == "always" or (proxy.fly_replay == "auto" and on_fly)
    fits = body_length is not None and body_length <= proxy.max_replay_body
    if replay and fits and not replayed:
        return Replay(primary.node_id)
    if not primary.proxy_url:
        return Refuse(503, f"the primary {primary.node_id} has no proxy URL to forward to\n")
    return Forward(primary.proxy_url)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without the hop-by-hop ones, including those the Connection header names."""
    pairs = list(headers)
    named = {
        token.strip().lower()
        for key, value in pairs
        if key.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def forwarded_headers(
    headers: Iterable[tuple[str, str]], client: str | None, proto: str
) -> list[tuple[str, str]]:
    """Request headers for the next hop: hop-by-hop removed, X-Forwarded-* added."""
    pairs = list(headers)
    out = [(k, v) for k, v in strip_hop_by_hop(pairs) if k.lower() != "x-forwarded-for"]
    chain = [v for k, v in pairs if k.lower() == "x-forwarded-for"]
    if client:
        chain.append(client)
    if chain:
        out.append(("X-Forwarded-For", ", ".join(chain)))
    if not any(k.lower() == "x-forwarded-proto" for k, _ in out):
        out.append(("X-Forwarded-Proto", proto))
    return out


def forward_signature(token: str, node_id: str) -> str:
    """The Ltx-Forwarded-By value: proves a hop came from a node of this cluster."""
    mac = hmac.new(token.encode(), node_id.encode(), hashlib.sha256).hexdigest()
    return f"{node_id} {mac}"


def forwarded_by(value: str | None, token: str) -> str | None:
    """The node that forwarded a request, if the Ltx-Forwarded-By header is genuine."""
    if not value:
        return None
    node_id, _, _ = value.partition(" ")
    if node_id and hmac.compare_digest(forward_signature(token, node_id), value.strip()):
        return node_id
    return None


def slowest_required(lags: list[float], required: int) -> float:
    """The lag that holds writes back: the required-th best replica's, else the slowest's.

    Replicas that are not connected are not in ``lags``: a stopped replica does not hold
    every write back (synchronous mode's timeout covers it).
    """
    if not lags:
        return 0.0
    ordered = sorted(lags)
    if 0 < required <= len(ordered):
        return ordered[required - 1]
    return ordered[-1]


class CommitClock:
    """When this proxy first saw each primary TXID of one database, to age replica lag.

    A replica at TXID t lags by the time since the first TXID above t was seen. TXIDs are
    observed at each write the proxy handles, so commits made elsewhere count from the
    next write through the proxy (documented in docs/proxy.md).
    """

    def __init__(self) -> None:
        self._seen: deque[tuple[int, float]] = deque()

    def observe(self, txid: int, now: float) -> None:
        if not self._seen or txid > self._seen[-1][0]:
            self._seen.append((txid, now))

    def lag(self, replica_txid: int, now: float) -> float:
        for txid, seen in self._seen:
            if txid > replica_txid:
                return max(0.0, now - seen)
        return 0.0

    def forget_through(self, txid: int) -> None:
        while len(self._seen) > 1 and self._seen[0][0] <= txid:
            self._seen.popleft()


# -- the aiohttp proxy ---------------------------------------------------------------------


def _text(status: int, body: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=body, headers=headers)


def is_websocket(headers: Mapping[str, str]) -> bool:
    connection = headers.get("Connection", "").lower()
    return headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection


class _Proxy:
    """One proxy's request handling; see the module docstring and docs/proxy.md."""

    def __init__(
        self,
        cfg: Config,
        state: ClusterState,
        token: str,
        session: aiohttp.ClientSession | None,
    ) -> None:
        self.cfg = cfg
        self.proxy = cfg.proxy
        self.state = state
        self.token = token
        self._session = session
        self._own_session = session is None
        self.on_fly = bool(os.environ.get("FLY_MACHINE_ID"))
        self.clocks: dict[str, CommitClock] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def close(self, _app: web.Application | None = None) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    def db(self) -> str | None:
        return choose_db(self.proxy.db, self.state.databases)

    # -- entry point --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = classify(request.method, request.path, self.proxy)
        if route is Route.PASSTHROUGH:
            return await self.relay(request, self.proxy.target)
        if route is Route.HEALTH:
            return self.health()
        if route is Route.READ or is_websocket(request.headers):
            return await self.read(request)
        return await self.write(request)

    def health(self) -> web.Response:
        problem = self.state.health_problem(self.proxy.max_lag.total_seconds())
        status, body = health_verdict(problem)
        return _text(status, body)

    async def read(self, request: web.Request) -> web.StreamResponse:
        txid = requested_txid(
            request.headers.get("Cookie"), request.headers.get(self.proxy.txid_header)
        )
        db = self.db()
        if txid is not None and db is not None and self.state.txid(db) < txid:
            timeout = self.proxy.read_timeout.total_seconds()
            if not await self.state.wait_for_txid(db, txid, timeout):
                self.state.count("proxy_read_timeouts")
                return _text(
                    504,
                    f"timed out after {timeout:g}s waiting for this node to reach TXID "
                    f"{txid:016x} of {db} (it has {self.state.txid(db):016x})\n",
                )
        if is_websocket(request.headers):
            return await self.relay_websocket(request, self.proxy.target)
        return await self.relay(request, self.proxy.target)

    async def write(self, request: web.Request) -> web.StreamResponse:
        forwarder = forwarded_by(request.headers.get(FORWARDED_BY_HEADER), self.token)
        timeout = self.proxy.primary_timeout.total_seconds()
        if self.state.is_primary or self.state.pausing_writes:
            async with self.state.primary_write(timeout) as here:
                if here:
                    return await self.write_on_primary(request)
        if not self.state.is_primary:  # (or no longer: a handoff just moved the lease)
            await self.state.wait_for_primary(timeout)
        if self.state.is_primary:
            async with self.state.primary_write(timeout) as here:
                if here:
                    return await self.write_on_primary(request)
            return _text(503, "the primary is changing; retry\n")
        action = replica_write_action(
            self.state.primary.node if self.state.primary else None,
            self.proxy,
            on_fly=self.on_fly,
            body_length=request.content_length if request.body_exists else 0,
            replayed=FLY_REPLAY_SRC_HEADER in request.headers,
            forwarded=forwarder is not None,
        )
        if isinstance(action, Refuse):
            return _text(action.status, action.reason)
        if isinstance(action, Replay):
            return web.Response(status=200, headers={FLY_REPLAY_HEADER: action.header})
        signature = forward_signature(self.token, self.state.me.node_id)
        return await self.relay(request, action.base_url, [(FORWARDED_BY_HEADER, signature)])

    # -- the primary's side of a write ----------------------------------------------------

    async def write_on_primary(self, request: web.Request) -> web.StreamResponse:
        db = self.db()
        if db is not None:
            await self.backpressure(db)

        async def finish(headers: CIMultiDict[str]) -> None:
            if db is None:
                return
            txid = await self.state.write_txid(db)
            required = self.sync_replicas(request)
            if txid is None:  # the node stepped down meanwhile: in doubt, no promise
                self.state.count("writes_in_doubt")
                if required > 0:
                    headers[SYNC_RESPONSE_HEADER] = "timeout"
                    self.state.count("sync_timeouts")
                return
            self.clock(db).observe(txid, time.monotonic())
            headers.add("Set-Cookie", txid_cookie(txid, self.proxy.cookie_max_age))
            headers[self.proxy.txid_header] = f"{txid:016x}"
            if required > 0:
                timeout = self.cfg.sync.timeout.total_seconds()
                if await self.state.wait_replicated(db, txid, required, timeout):
                    headers[SYNC_RESPONSE_HEADER] = "ok"
                else:
                    headers[SYNC_RESPONSE_HEADER] = "timeout"
                    self.state.count("sync_timeouts")

        return await self.relay(request, self.proxy.target, on_headers=finish)

    def sync_replicas(self, request: web.Request) -> int:
        """How many replicas must have a write before it is answered (header wins)."""
        asked = request.headers.get(SYNC_REQUEST_HEADER, "").strip()
        if asked.isdigit():
            return int(asked)
        return self.cfg.sync.replicas

    def clock(self, db: str) -> CommitClock:
        clock = self.clocks.get(db)
        if clock is None:
            clock = self.clocks[db] = CommitClock()
        return clock

    def replica_lag(self, db: str) -> float:
        """The lag that holds writes back now (see slowest_required and CommitClock)."""
        now = time.monotonic()
        clock = self.clock(db)
        clock.observe(self.state.txid(db), now)
        txids = [
            r.positions.get(db, (0, 0))[0] for r in self.state.replicas.values() if r.streams > 0
        ]
        if txids:
            clock.forget_through(min(txids))
        return slowest_required([clock.lag(t, now) for t in txids], self.cfg.sync.replicas)

    async def backpressure(self, db: str) -> None:
        """Time-bounded async mode: hold a write while the required replica is too far behind."""
        limit = self.cfg.sync.max_lag.total_seconds()
        if limit <= 0 or self.replica_lag(db) <= limit:
            return
        self.state.count("backpressure_waits")
        timeout = self.cfg.sync.timeout.total_seconds()
        if not await self.state.wait_for(lambda: self.replica_lag(db) <= limit, timeout):
            self.state.count("backpressure_timeouts")

    # -- relaying -------------------------------------------------------------------------

    async def relay(
        self,
        request: web.Request,
        base_url: str,
        extra_headers: list[tuple[str, str]] | None = None,
        on_headers: Callable[[CIMultiDict[str]], Awaitable[None]] | None = None,
    ) -> web.StreamResponse:
        """Send the request to base_url and stream the answer back; 502 if it cannot."""
        if not base_url:
            return _text(502, "proxy error: no target configured (proxy.target)\n")
        url = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
        headers = self.outgoing_headers(request) + (extra_headers or [])
        body: AsyncIterator[bytes] | None = (
            request.content.iter_chunked(CHUNK) if request.body_exists else None
        )
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError) as exc:
            return _text(502, f"proxy error: {base_url}: {exc or type(exc).__name__}\n")
        async with upstream:
            out: CIMultiDict[str] = CIMultiDict(strip_hop_by_hop(upstream.headers.items()))
            if on_headers is not None:
                await on_headers(out)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(out)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientError as exc:
                # The answer broke off (the app or the primary died mid-answer). Its
                # status is sent: end the connection without the body's end, so the
                # client sees an incomplete answer, never a short one that looks whole.
                log.warning(
                    "proxy: the answer from %s to %s %s broke off: %s",
                    base_url,
                    request.method,
                    request.path,
                    exc or type(exc).__name__,
                )
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    def outgoing_headers(self, request: web.Request) -> list[tuple[str, str]]:
        incoming = [(k, v) for k, v in request.headers.items() if k.lower() != "ltx-forwarded-by"]
        return forwarded_headers(incoming, request.remote, request.scheme)

    async def relay_websocket(self, request: web.Request, base_url: str) -> web.StreamResponse:
        """A WebSocket to the app: connect upstream first, then accept and pump both ways."""
        url = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        skip = {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
        skip |= {"sec-websocket-protocol", "host"}
        headers = [(k, v) for k, v in self.outgoing_headers(request) if k.lower() not in skip]
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            upstream = await self.session.ws_connect(url, headers=headers, protocols=protocols)
        except (aiohttp.ClientError, OSError) as exc:
            return _text(502, f"proxy error: websocket to {base_url}: {exc}\n")
        async with upstream:
            chosen = (upstream.protocol,) if upstream.protocol else ()
            downstream = web.WebSocketResponse(protocols=chosen, autoping=True)
            await downstream.prepare(request)
            await _pump_websockets(downstream, upstream)
            return downstream


async def _pump_websockets(
    downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async def copy(
        source: AsyncIterator[aiohttp.WSMessage],
        send_str: Callable[[str], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
    ) -> None:
        async for msg in source:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await send_bytes(msg.data)

    tasks = [
        asyncio.ensure_future(copy(downstream, upstream.send_str, upstream.send_bytes)),
        asyncio.ensure_future(copy(upstream, downstream.send_str, downstream.send_bytes)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        await upstream.close()
        await downstream.close()


def make_proxy_app(
    cfg: Config,
    state: ClusterState,
    token: str,
    session: aiohttp.ClientSession | None = None,
) -> web.Application:
    """The proxy as an aiohttp application (one catch-all route)."""
    proxy = _Proxy(cfg, state, token, session)
    app = web.Application(handler_args={"max_field_size": 65536})
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.on_cleanup.append(proxy.close)
    return app


async def start_proxy(
    cfg: Config,
    state: ClusterState,
    token: str,
    session: aiohttp.ClientSession | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> web.AppRunner:
    """Serve the proxy on host:port (default proxy.host and proxy.port); cleanup() stops it."""
    runner = web.AppRunner(make_proxy_app(cfg, state, token, session), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.proxy.host, port or cfg.proxy.port)
    await site.start()
    return runner


# -- the node API's long-poll for middleware ----------------------------------------------

MAX_WAIT_SECONDS = 60.0


async def handle_wait_txid(request: web.Request) -> web.Response:
    """``GET /txid/wait?db=NAME&txid=HEX&timeout=SECONDS``: wait for this node to reach txid.

    Without ``txid`` it returns at once with the TXID covering every commit made before
    the call (on the primary: after reading the WAL to its end), which is what the
    middleware puts in the ``__txid`` cookie after a write. The answer is JSON:
    ``{"db", "txid" (this node's, 16 hex), "reached" (bool), "role"}``.
    """
    state: ClusterState = request.app["state"]
    query = request.query
    db = query.get("db") or choose_db("", state.databases)
    if db is None:
        return _json_error(400, f"db is required: this node has {len(state.databases)} databases")
    wanted = query.get("txid")
    txid = parse_txid(wanted)
    if wanted is not None and txid is None:
        return _json_error(400, f"txid must be 16 hex digits, got {wanted!r}")
    try:
        timeout = float(query.get("timeout", "5"))
    except ValueError:
        return _json_error(400, f"timeout must be a number of seconds, got {query['timeout']!r}")
    if not math.isfinite(timeout) or timeout < 0:
        return _json_error(400, f"timeout must be a number of seconds >= 0, got {timeout}")
    if txid is None:
        current = await state.committed_txid(db)
        reached = True
    else:
        reached = await state.wait_for_txid(db, txid, min(timeout, MAX_WAIT_SECONDS))
        current = state.txid(db)
    body = {"db": db, "txid": f"{current:016x}", "reached": reached, "role": state.role}
    return web.json_response(body)


def _json_error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status, text=json.dumps({"error": message}), content_type="application/json"
    )
