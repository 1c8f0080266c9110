"""The Redis lease (sidecar/lease/redis.py) against real redis-server processes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from sidecar.cluster import NodeInfo
from sidecar.lease import Candidate, LeaseError, Term, safety_margin
from sidecar.lease.redis import (
    RedisLease,
    decode_positions,
    decode_value,
    encode_positions,
    encode_value,
)
from tests.faultproxy import FaultProxy
from tests.helpers import RedisServer, free_port

WAIT = 15.0  # generous: the machine may be loaded

A = NodeInfo("node-a", "http://10.0.0.1:20202", "http://10.0.0.1:8080")
B = NodeInfo("node-b", "http://10.0.0.2:20202")
C = NodeInfo("node-c", "http://10.0.0.3:20202")

MakeLease = Callable[..., RedisLease]


class OwnRedis:
    """A redis-server of this test alone, so it can be stopped and restarted empty."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on PATH"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + WAIT
        try:
            while True:
                assert self.process.poll() is None, "redis-server exited at start"
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "redis-server did not answer PING"
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=WAIT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def key() -> str:
    return f"test-lease/{uuid.uuid4().hex}"


@pytest.fixture
async def make(redis_server: RedisServer, key: str) -> AsyncIterator[MakeLease]:
    """make(ttl=..., url=...) -> a RedisLease on this test's key, closed at teardown."""
    made: list[RedisLease] = []

    def factory(ttl: float = 5.0, url: str | None = None) -> RedisLease:
        lease = RedisLease(url or redis_server.url, key, ttl=ttl, renew_interval=ttl / 3)
        made.append(lease)
        return lease

    yield factory
    for lease in made:
        await lease.close()


async def eventually_acquire(lease: RedisLease, me: NodeInfo) -> Term:
    deadline = time.monotonic() + WAIT
    while True:
        term = await lease.acquire(me)
        if term is not None:
            return term
        assert time.monotonic() < deadline, f"{me.node_id} never acquired the lease"
        await asyncio.sleep(0.05)


async def raises_lease_error_within(seconds: float, call: Callable[[], object]) -> LeaseError:
    """Await call() and return the LeaseError it must raise within `seconds`."""
    start = time.monotonic()
    with pytest.raises(LeaseError) as info:
        result = call()
        assert asyncio.iscoroutine(result)
        await result
    assert time.monotonic() - start < seconds, "the LeaseError took too long"
    return info.value


# -- values ----------------------------------------------------------------------------------


def test_lease_value_round_trips_and_is_stable() -> None:
    value = encode_value(A, 42)
    assert value == encode_value(A, 42)
    assert decode_value(value) == (A, 42)
    assert decode_value(value.encode()) == (A, 42)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        ("garbage", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"api_url":"x","epoch":1}', "node_id"),
        ('{"node_id":"a","api_url":1,"epoch":1}', "api_url"),
        ('{"node_id":"a","api_url":"x","epoch":"1"}', "epoch"),
        ('{"node_id":"a","api_url":"x","epoch":true}', "epoch"),
        ('{"node_id":"a","api_url":"x","epoch":0}', "epoch"),
    ],
)
def test_bad_lease_values_say_what_is_wrong(raw: bytes | str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_value(raw)


def test_positions_round_trip_in_litefs_form() -> None:
    positions = {"app.db": (5, 0xFFFF_FFFF_FFFF_FFFF), "b.db": (0, 0)}
    raw = encode_positions(positions, {"node_id": "a"})
    assert '"app.db":"0000000000000005/ffffffffffffffff"' in raw
    assert decode_positions(raw) == positions
    with pytest.raises(ValueError, match="not TXID/CHECKSUM"):
        decode_positions('{"positions":{"x":"12/34"}}')


# -- acquire, renew, release, expiry ---------------------------------------------------------


async def test_only_one_of_many_competing_leases_wins(make: MakeLease) -> None:
    nodes = [NodeInfo(f"node-{i}", f"http://10.0.0.{i}:20202") for i in range(6)]
    leases = [make() for _ in nodes]
    terms = await asyncio.gather(
        *(lease.acquire(n) for lease, n in zip(leases, nodes, strict=True))
    )
    winners = [t for t in terms if t is not None]
    assert len(winners) == 1
    current = await leases[0].current()
    assert current is not None
    assert (current.holder, current.epoch) == (winners[0].holder, winners[0].epoch)


async def test_epochs_strictly_increase_across_terms(make: MakeLease) -> None:
    a, b = make(), make()
    epochs = []
    for lease, node in [(a, A), (b, B), (a, A), (b, B)]:
        term = await lease.acquire(node)
        assert term is not None
        epochs.append(term.epoch)
        await lease.release(term)
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)


async def test_a_term_expires_before_the_lease_does_in_redis(
    make: MakeLease, redis_server: RedisServer, key: str
) -> None:
    lease = make(ttl=5.0)
    before = time.monotonic()
    term = await lease.acquire(A)
    assert term is not None
    assert term.expires <= time.monotonic() + 5.0 - safety_margin(5.0)
    assert term.expires >= before + 5.0 - safety_margin(5.0)
    with redis_server.client() as client:
        assert 0 < client.pttl(key) <= 5000


async def test_renew_keeps_the_lease_past_its_ttl(make: MakeLease) -> None:
    a, b = make(ttl=3.0), make(ttl=3.0)
    term = await a.acquire(A)
    assert term is not None
    for _ in range(2):  # 3.6 s in all, longer than the TTL
        await asyncio.sleep(1.8)
        renewed = await a.renew(term)
        assert renewed is not None
        assert renewed.epoch == term.epoch and renewed.expires > term.expires
        term = renewed
        assert await b.acquire(B) is None


async def test_after_expiry_another_node_gets_in_and_the_old_renew_fails(make: MakeLease) -> None:
    a, b = make(ttl=1.0), make(ttl=1.0)
    old = await a.acquire(A)
    assert old is not None
    assert await b.acquire(B) is None
    new = await eventually_acquire(b, B)
    assert new.epoch > old.epoch
    assert await a.renew(old) is None


async def test_release_lets_another_node_in_at_once(make: MakeLease) -> None:
    a, b = make(ttl=30.0), make(ttl=30.0)
    term = await a.acquire(A)
    assert term is not None
    await a.release(term)
    assert await a.current() is None
    assert await b.acquire(B) is not None


async def test_release_never_deletes_another_nodes_lease(make: MakeLease) -> None:
    a, b = make(ttl=1.0), make(ttl=30.0)
    old = await a.acquire(A)
    assert old is not None
    new = await eventually_acquire(b, B)
    await a.release(old)
    current = await a.current()
    assert current is not None and current.holder == B and current.epoch == new.epoch


# -- handoff ---------------------------------------------------------------------------------


async def test_handoff_moves_the_lease_under_a_higher_epoch(make: MakeLease) -> None:
    a, b = make(), make()
    old = await a.acquire(A)
    assert old is not None
    handed = await a.handoff(old, B)
    assert handed is not None
    assert handed.holder == B and handed.epoch > old.epoch
    assert await a.renew(old) is None
    # The new holder finds its term in Redis and renews it as its own.
    seen = await b.current()
    assert seen is not None and (seen.holder, seen.epoch) == (B, handed.epoch)
    assert await b.renew(seen) is not None
    await a.release(old)  # a late release of the old term changes nothing
    assert await b.renew(seen) is not None
    assert await a.handoff(old, C) is None


# -- bad values, bad URLs --------------------------------------------------------------------


async def test_a_garbage_lease_value_is_a_clear_error_and_nobody_takes_over(
    make: MakeLease, redis_server: RedisServer, key: str
) -> None:
    with redis_server.client() as client:
        client.set(key, "definitely not a lease", px=30_000)
    lease = make()
    with pytest.raises(LeaseError, match=r"holds a value that is not a lease \(not JSON") as info:
        await lease.current()
    assert "\n" not in str(info.value)
    assert "unknown node" in str(info.value)
    assert await lease.acquire(A) is None
    with redis_server.client() as client:
        assert client.get(key) == b"definitely not a lease"


async def test_a_garbage_epoch_counter_is_a_clear_error(
    make: MakeLease, redis_server: RedisServer, key: str
) -> None:
    with redis_server.client() as client:
        client.set(f"{key}:epoch", "seven")
    with pytest.raises(LeaseError, match=r"epoch counter .* is not a number"):
        await make().acquire(A)
    assert await make().current() is None


async def test_a_redis_url_nobody_listens_on_is_a_clear_error(make: MakeLease) -> None:
    lease = make(url=f"redis://127.0.0.1:{free_port()}/0")
    error = await raises_lease_error_within(WAIT, lambda: lease.acquire(A))
    assert "cannot reach Redis 127.0.0.1:" in str(error)


async def test_a_redis_database_that_does_not_exist_is_a_clear_error(
    make: MakeLease, redis_server: RedisServer
) -> None:
    lease = make(url=f"redis://127.0.0.1:{redis_server.port}/99")
    with pytest.raises(LeaseError, match=r"/99"):
        await lease.current()


# -- positions -------------------------------------------------------------------------------


async def test_only_the_holder_publishes_the_primary_position(make: MakeLease) -> None:
    a, b = make(), make()
    term = await a.acquire(A)
    assert term is not None
    await a.publish(A, {"app.db": (7, 0xAB)}, primary=True)
    await b.publish(B, {"app.db": (99, 1)}, primary=True)  # not the holder: ignored
    assert (await b.positions())[0] == {"app.db": (7, 0xAB)}
    await a.handoff(term, B)
    await a.publish(A, {"app.db": (8, 1)}, primary=True)  # deposed: ignored
    assert (await b.positions())[0] == {"app.db": (7, 0xAB)}


async def test_candidate_positions_vanish_when_the_candidate_stops(make: MakeLease) -> None:
    a, b = make(ttl=1.0), make(ttl=30.0)
    await a.publish(A, {"app.db": (3, 1)}, primary=False)
    await b.publish(B, {"app.db": (4, 2)}, primary=False)
    published, candidates = await b.positions()
    assert published == {}
    assert candidates == {
        "node-a": Candidate(A.api_url, {"app.db": (3, 1)}),
        "node-b": Candidate(B.api_url, {"app.db": (4, 2)}),
    }
    deadline = time.monotonic() + WAIT
    while "node-a" in (await b.positions())[1]:  # 3 TTLs without a refresh
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert (await b.positions())[1] == {"node-b": Candidate(B.api_url, {"app.db": (4, 2)})}


async def test_garbage_candidate_positions_are_skipped(
    make: MakeLease, redis_server: RedisServer, key: str
) -> None:
    lease = make()
    await lease.publish(B, {"app.db": (4, 2)}, primary=False)
    with redis_server.client() as client:
        client.sadd(f"{key}:candidates", "node-x")
        client.set(f"{key}:candidate:node-x", "junk", px=30_000)
        client.set(f"{key}:positions", "junk")
    with pytest.raises(LeaseError, match="does not hold positions"):
        await lease.positions()
    with redis_server.client() as client:
        client.delete(f"{key}:positions")
    assert await lease.positions() == ({}, {"node-b": Candidate(B.api_url, {"app.db": (4, 2)})})


# -- Redis down, restarted, cut off ----------------------------------------------------------


async def test_renew_raises_lease_error_when_redis_is_stopped(own_redis: OwnRedis) -> None:
    lease = RedisLease(own_redis.url, "k", ttl=2.0, renew_interval=0.5)
    try:
        term = await lease.acquire(A)
        assert term is not None
        own_redis.stop()
        error = await raises_lease_error_within(WAIT, lambda: lease.renew(term))
        assert f"127.0.0.1:{own_redis.port}" in str(error)
    finally:
        await lease.close()


async def test_after_redis_restarts_empty_epochs_still_go_up(own_redis: OwnRedis) -> None:
    lease = RedisLease(own_redis.url, "k", ttl=30.0, renew_interval=1.0)
    newcomer = RedisLease(own_redis.url, "k", ttl=30.0, renew_interval=1.0)
    try:
        before = 0
        for _ in range(3):
            term = await lease.acquire(A)
            assert term is not None and not lease.acquired_after_reset
            before = term.epoch
            await lease.release(term)
        own_redis.stop()
        with pytest.raises(LeaseError):
            await lease.current()
        own_redis.start()
        # Pooled connections died with the old server: the next call still works.
        after = await lease.acquire(A)
        assert after is not None and after.epoch > before
        assert lease.acquired_after_reset  # a previous holder may not know yet
        await lease.release(after)
        # A node that never saw an epoch is seeded by what it learned elsewhere.
        own_redis.stop()
        own_redis.start()
        newcomer.observe_epoch(after.epoch + 10)
        term = await newcomer.acquire(B)
        assert term is not None and term.epoch == after.epoch + 11
    finally:
        await lease.close()
        await newcomer.close()


async def test_a_cut_between_lease_and_redis_is_a_lease_error_within_the_ttl(
    redis_server: RedisServer, key: str
) -> None:
    ttl = 2.0
    with FaultProxy(redis_server.port) as proxy:
        lease = RedisLease(proxy.url("redis", "/0"), key, ttl=ttl, renew_interval=ttl / 3)
        try:
            term = await lease.acquire(A)
            assert term is not None
            proxy.cut()
            await raises_lease_error_within(ttl + 2.0, lambda: lease.renew(term))
            proxy.heal()
            renewed = await lease.renew(term)
            assert renewed is not None or await lease.current() is None
        finally:
            await lease.close()


async def test_a_black_hole_between_lease_and_redis_is_a_lease_error_within_the_ttl(
    redis_server: RedisServer, key: str
) -> None:
    ttl = 2.0
    with FaultProxy(redis_server.port) as proxy:
        lease = RedisLease(proxy.url("redis", "/0"), key, ttl=ttl, renew_interval=ttl / 3)
        try:
            term = await lease.acquire(A)
            assert term is not None
            proxy.drop()
            error = await raises_lease_error_within(ttl + 2.0, lambda: lease.renew(term))
            assert "did not answer" in str(error)
            proxy.heal()
            await lease.current()  # answers again on a fresh connection
        finally:
            await lease.close()
