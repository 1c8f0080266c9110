"""The proxy in front of the app (issue 6): overhead, read-your-writes wait, synchronous mode.

Nodes are ltx-sidecar processes on 127.0.0.1 (static lease) with the proxy enabled in
front of the example app (examples/app.py), which this module starts beside each node
as its own process. Clients are aiohttp sessions in this process (uvloop when present).

* proxy_overhead: N concurrent clients GET / for a few seconds straight to the app, then
  through the proxy, interleaved over several rounds so the machine's noise hits both;
  the same against a minimal aiohttp app, which shows the proxy's own cost undiluted.
* read_your_writes: POST through a replica's proxy (forwarded to the primary), then GET
  through the same replica with the ``__txid`` cookie: the GET's time, and stale reads.
* sync_mode: writes through the primary's proxy with two replicas, alternating the
  per-request ``Ltx-Sync-Replicas`` header between 0, 1 and 2 so each mode sees the same
  conditions; the added latency is the difference of the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from bench.registry import Context, Result, Target, benchmark
from bench.tailer_overhead import percentile
from tests.e2e.cluster import TestNode, wait_until
from tests.helpers import free_port

T = TypeVar("T")

DB = "app.db"
APP = Path(__file__).resolve().parents[1] / "examples" / "app.py"
CONCURRENCY = 16
ROUND_SECONDS = {"quick": 1.0, "full": 5.0}
ROUNDS = {"quick": 2, "full": 5}  # each round: one direct run and one proxied run
PAIRS = {"quick": 150, "full": 1000}
SYNC_WRITES = {"quick": 300, "full": 1800}  # split evenly between 0, 1 and 2 replicas

THROUGHPUT_TARGET = Target(70, ">=")
STALE_TARGET = Target(0, "<=")

# A minimal app: what the proxy costs when the app costs next to nothing.
HELLO_APP = """\
import sys
from aiohttp import web

async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello\\n")

app = web.Application()
app.router.add_get("/", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- processes -------------------------------------------------------------------------------


@dataclass
class AppProcess:
    """The example app (or the minimal one) on a free port, as its own process."""

    argv: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_status: int = 200) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _status(self.url) == ready_status, 30, f"the app on {self.url}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def example_app(node: TestNode, port: int) -> AppProcess:
    argv = [sys.executable, str(APP), "serve", "--db", str(node.db(DB)),
            "--host", "127.0.0.1", "--port", str(port), "--node-id", node.name]  # fmt: skip
    return AppProcess(argv, port, node.root / "app.log")


def migrate(node: TestNode) -> None:
    node.db_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(APP), "migrate", "--db", str(node.db(DB))],
        check=True,
        capture_output=True,
    )


def proxy_toml(proxy_port: int, app_port: int, sync_replicas: int = 0) -> str:
    return (
        '[log]\nlevel = "WARNING"\n'
        f'[proxy]\nenabled = true\nhost = "127.0.0.1"\nport = {proxy_port}\n'
        f'target = "http://127.0.0.1:{app_port}"\ndb = "{DB}"\nfly-replay = "never"\n'
        f"[sync]\nreplicas = {sync_replicas}\n"
    )


@dataclass
class ProxiedNode:
    """A sidecar with its proxy in front of an app."""

    node: TestNode
    proxy_port: int
    app: AppProcess

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"


def proxied_node(
    name: str, root: Path, *, primary_url: str = "", sync_replicas: int = 0
) -> ProxiedNode:
    proxy_port, app_port = free_port(), free_port()
    node = TestNode(
        name,
        root / name,
        primary_url=primary_url,
        extra=proxy_toml(proxy_port, app_port, sync_replicas),
    )
    return ProxiedNode(node, proxy_port, example_app(node, app_port))


def start_primary(p: ProxiedNode) -> None:
    p.node.write_config()
    migrate(p.node)
    p.node.start()
    wait_until(lambda: p.node.txid(DB) > 0, 60, "the primary's first TXID", p.node)


def wait_converged(primary: TestNode, replicas: Sequence[TestNode]) -> None:
    wait_until(
        lambda: primary.txid(DB) > 0 and all(r.txid(DB) == primary.txid(DB) for r in replicas),
        60,
        "replicas at the primary's TXID",
        primary,
        *replicas,
    )


@contextlib.contextmanager
def stopping(nodes: Sequence[ProxiedNode | TestNode]) -> Iterator[None]:
    try:
        yield
    finally:
        for item in reversed(nodes):
            if isinstance(item, ProxiedNode):
                item.app.stop()
                item.node.stop()
            else:
                item.stop()


# -- statistics ------------------------------------------------------------------------------


@dataclass
class Load:
    """Requests answered and their latencies (ms) over some seconds."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies), q)

    def add(self, other: Load) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies


def _r(x: float, digits: int = 2) -> float:
    return round(x, digits)


# -- proxy_overhead ----------------------------------------------------------------------------


async def hammer(session: aiohttp.ClientSession, url: str, seconds: float, clients: int) -> Load:
    """`clients` loops of GET url for `seconds`: throughput and latency."""
    load = Load()
    end = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                load.requests += 1
                load.latencies.append((time.perf_counter() - start) * 1000)
            else:
                load.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    load.seconds = time.perf_counter() - started
    return load


async def side_by_side(direct: str, proxied: str, seconds: float, rounds: int) -> tuple[Load, Load]:
    """Interleaved runs (direct, proxied, proxied, direct, ...) so trends cancel out."""
    totals = {direct: Load(), proxied: Load()}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await hammer(session, direct, 0.5, CONCURRENCY)  # warm up both paths
        await hammer(session, proxied, 0.5, CONCURRENCY)
        for i in range(rounds):
            order = (direct, proxied) if i % 2 == 0 else (proxied, direct)
            for url in order:
                totals[url].add(await hammer(session, url, seconds, CONCURRENCY))
    return totals[direct], totals[proxied]


def overhead_results(
    label: str, direct: Load, proxied: Load, target: Target | None
) -> list[Result]:
    ratio = 100 * proxied.rate / direct.rate if direct.rate else 0.0
    return [
        Result(
            f"{label}: proxy throughput, % of direct",
            _r(ratio, 1),
            "%",
            target,
            f"{proxied.rate:,.0f} vs {direct.rate:,.0f} requests/s, {CONCURRENCY} concurrent "
            f"clients; errors {proxied.errors} / {direct.errors}",
        ),
        Result(f"{label}: direct, p50", _r(direct.p(50)), "ms",
               notes=f"p99 {direct.p(99):.2f} ms"),
        Result(f"{label}: through the proxy, p50", _r(proxied.p(50)), "ms",
               notes=f"p99 {proxied.p(99):.2f} ms"),
    ]  # fmt: skip


@benchmark("proxy_overhead", description="Requests/s and latency through the proxy vs direct")
def proxy_overhead(ctx: Context) -> list[Result]:
    """GET / straight to the app and through the proxy, interleaved, for two apps."""
    seconds, rounds = ROUND_SECONDS[ctx.mode], ROUNDS[ctx.mode]
    primary = proxied_node("primary", ctx.tmp_dir)
    hello_script = ctx.tmp_dir / "hello_app.py"
    hello_script.write_text(HELLO_APP)
    hello_port = free_port()
    hello = AppProcess([sys.executable, str(hello_script), str(hello_port)], hello_port,
                       ctx.tmp_dir / "hello.log")  # fmt: skip
    results: list[Result] = []
    with stopping([primary]):
        start_primary(primary)
        primary.app.start()
        direct, proxied = run_async(
            side_by_side(f"{primary.app.url}/", f"{primary.proxy_url}/", seconds, rounds)
        )
        results += overhead_results("example app", direct, proxied, THROUGHPUT_TARGET)
        primary.app.stop()
        # The minimal app behind the same proxy: the sidecar's target is the app's port.
        hello.port = primary.app.port
        hello.argv[-1] = str(hello.port)
        try:
            hello.start()
            direct, proxied = run_async(
                side_by_side(f"{hello.url}/", f"{primary.proxy_url}/", seconds, rounds)
            )
        finally:
            hello.stop()
        results += overhead_results("minimal app", direct, proxied, THROUGHPUT_TARGET)
    return results


# -- read_your_writes --------------------------------------------------------------------------


@dataclass
class ReadYourWrites:
    waits: list[float] = field(default_factory=list)  # ms, GET with the cookie
    plain: list[float] = field(default_factory=list)  # ms, GET without a cookie
    stale: int = 0
    failed_writes: int = 0
    no_cookie: int = 0


async def timed(work: Awaitable[T]) -> tuple[T, float]:
    """Await work (a coroutine not yet started); its value and milliseconds."""
    start = time.perf_counter()
    value = await work
    return value, (time.perf_counter() - start) * 1000


async def write_then_read(replica_proxy: str, pairs: int) -> ReadYourWrites:
    out = ReadYourWrites()
    jar = aiohttp.DummyCookieJar()  # the cookie is sent by hand, as a browser would
    async with aiohttp.ClientSession(cookie_jar=jar) as session:

        async def get(cookie: str | None) -> list[int]:
            headers = {"Accept": "application/json"}
            if cookie is not None:
                headers["Cookie"] = f"__txid={cookie}"
            async with session.get(f"{replica_proxy}/", headers=headers) as resp:
                doc = await resp.json()
                return [int(m["id"]) for m in doc.get("messages", [])]

        for i in range(pairs):
            async with session.post(
                f"{replica_proxy}/messages", json={"text": f"read your writes {i}"}
            ) as resp:
                if resp.status != 201:
                    out.failed_writes += 1
                    continue
                row = int((await resp.json())["id"])
                morsel = resp.cookies.get("__txid")
            if morsel is None:
                out.no_cookie += 1
                continue
            ids, ms = await timed(get(morsel.value))
            out.waits.append(ms)
            out.stale += row not in ids
            _, plain_ms = await timed(get(None))
            out.plain.append(plain_ms)
    return out


@benchmark("read_your_writes", description="Read-your-writes wait on a replica after a write")
def read_your_writes(ctx: Context) -> list[Result]:
    """POST through a replica's proxy, then GET there with the __txid cookie."""
    pairs = PAIRS[ctx.mode]
    primary = proxied_node("primary", ctx.tmp_dir)
    replica = proxied_node("replica", ctx.tmp_dir, primary_url=primary.node.url)
    with stopping([primary, replica]):
        start_primary(primary)
        primary.app.start()
        replica.node.start()
        wait_converged(primary.node, [replica.node])
        replica.app.start()
        run = run_async(write_then_read(replica.proxy_url, pairs))
    waits, plain = sorted(run.waits), sorted(run.plain)
    done = len(waits)
    return [
        Result("read with the cookie on the replica, p50", _r(percentile(waits, 50)), "ms",
               notes=f"{done} write-read pairs; the GET right after the write, through the "
               "replica's proxy; it waits until the replica has the write's TXID"),
        Result("read with the cookie on the replica, p99", _r(percentile(waits, 99)), "ms",
               notes=f"the same GET without the cookie: p50 {percentile(plain, 50):.2f} ms, "
               f"p99 {percentile(plain, 99):.2f} ms"),
        Result("stale reads", run.stale, "reads", STALE_TARGET,
               f"of {done}; writes that failed: {run.failed_writes}, answered without a "
               f"__txid cookie: {run.no_cookie}"),
    ]  # fmt: skip


# -- sync_mode -----------------------------------------------------------------------------------


@dataclass
class SyncRun:
    latencies: dict[int, list[float]] = field(default_factory=lambda: {0: [], 1: [], 2: []})
    timeouts: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0, 2: 0})
    failed: int = 0


async def sync_writes(primary_proxy: str, writes: int) -> SyncRun:
    out = SyncRun()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for i in range(writes):
            required = i % 3
            start = time.perf_counter()
            async with session.post(
                f"{primary_proxy}/messages",
                json={"text": f"sync {i}"},
                headers={"Ltx-Sync-Replicas": str(required)},
            ) as resp:
                await resp.read()
                ms = (time.perf_counter() - start) * 1000
                if resp.status != 201:
                    out.failed += 1
                    continue
                out.timeouts[required] += resp.headers.get("Ltx-Sync") == "timeout"
            out.latencies[required].append(ms)
    return out


@benchmark("sync_mode", description="Added write latency of synchronous replication")
def sync_mode(ctx: Context) -> list[Result]:
    """Writes through the primary's proxy with 0, 1 and 2 required replicas, interleaved."""
    primary = proxied_node("primary", ctx.tmp_dir, sync_replicas=1)
    replicas = [
        TestNode(f"replica{i}", ctx.tmp_dir / f"replica{i}", primary_url=primary.node.url,
                 extra='[log]\nlevel = "WARNING"\n')
        for i in (1, 2)
    ]  # fmt: skip
    with stopping([primary, *replicas]):
        start_primary(primary)
        primary.app.start()
        for r in replicas:
            r.start()
        wait_converged(primary.node, replicas)
        run = run_async(sync_writes(primary.proxy_url, SYNC_WRITES[ctx.mode]))
    lat = {k: sorted(v) for k, v in run.latencies.items()}
    base50, base99 = percentile(lat[0], 50), percentile(lat[0], 99)
    results = [
        Result("write latency, asynchronous (0 replicas), p50", _r(base50), "ms",
               notes=f"p99 {base99:.2f} ms; {len(lat[0])} writes (POST /messages through the "
               f"primary's proxy, 2 replicas on loopback); failed writes: {run.failed}"),
    ]  # fmt: skip
    for n in (1, 2):
        p50, p99 = percentile(lat[n], 50), percentile(lat[n], 99)
        results += [
            Result(f"added write latency, sync.replicas = {n}, p50", _r(p50 - base50), "ms",
                   notes=f"{p50:.2f} ms with, {base50:.2f} ms without; {len(lat[n])} writes, "
                   f"{run.timeouts[n]} answered at the timeout"),
            Result(f"added write latency, sync.replicas = {n}, p99", _r(p99 - base99), "ms",
                   notes=f"{p99:.2f} ms with, {base99:.2f} ms without"),
        ]  # fmt: skip
    return results
