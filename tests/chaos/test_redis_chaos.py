"""Short chaos runs with the Redis lease and synchronous mode: one nemesis each.

The cluster (tests/chaos/redis_lease.py: three candidates, a restartable redis-server
behind a fault proxy per node, ``sync.replicas = 1``) lives for the module; each test
lets the writer post through the proxies, injects its fault while it keeps going, heals
it, pauses the writer and checks: convergence (equal pages, integrity_check), no write
answered ``Ltx-Sync: ok`` lost, every row a deposed primary committed that the new
primary lacks in that node's quarantine, and clean logs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.quarantine import Lost, QuarantinedFile, check_quarantined, check_sync_acks
from tests.chaos.redis_lease import (
    REDIS_NEMESES,
    RedisChaosCluster,
    by_kind,
    check_redis_cluster,
    known_bug,
    mark,
)
from tests.e2e.cluster import wait_until

pytestmark = pytest.mark.timeout(240)

PROGRESS = 10  # acknowledged writes before, during and after each fault


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisChaosCluster]:
    c = RedisChaosCluster(tmp_path_factory.mktemp("redis-chaos"), seed=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def writes_go_on(cluster: RedisChaosCluster, what: str) -> None:
    target = cluster.writer.acked() + PROGRESS
    wait_until(lambda: cluster.writer.acked() >= target, 60, what, *cluster.nodes)


@pytest.mark.parametrize("kind", [n.kind for n in REDIS_NEMESES])
def test_invariants_hold_through(cluster: RedisChaosCluster, kind: str) -> None:
    since = mark(cluster)
    cluster.writer.resume()
    writes_go_on(cluster, "writes before the fault")
    fault = by_kind(kind).inject(cluster, random.Random(len(kind)))
    writes_go_on(cluster, f"writes during {kind}")
    time.sleep(fault.hold)
    fault.heal()
    writes_go_on(cluster, f"writes after {kind}")
    cluster.writer.pause()
    verdict = check_redis_cluster(cluster, since, expected_errors=fault.expected_errors)
    bug = known_bug(kind, verdict.problems)
    if bug is not None:
        pytest.xfail(f"known bug: {bug}:\n" + "\n".join(verdict.problems[:5]))
    assert verdict.ok, f"{kind} ({fault.target}):\n" + "\n".join(verdict.problems)


def test_the_sync_writes_were_really_held_for_a_replica(cluster: RedisChaosCluster) -> None:
    """The recorded answers are real: most writes came back with Ltx-Sync: ok."""
    writes = cluster.writer.writes
    ok = [w for w in writes if w.sync == "ok"]
    assert len(ok) > len(writes) // 2, f"{len(ok)} of {len(writes)} answered Ltx-Sync: ok"


def test_the_killed_primary_committed_rows_nobody_else_had(cluster: RedisChaosCluster) -> None:
    """kill-primary-redis really left the deposed primary with rows to quarantine."""
    assert cluster.direct, "no rows were committed into a killed primary's database"


# -- the pure checks -----------------------------------------------------------------------


def qfile(lo: int, hi: int, pages: bytes) -> QuarantinedFile:
    return QuarantinedFile(Path(f"{lo:016x}-{hi:016x}.ltx"), lo, hi, pages)


def test_a_lost_write_with_its_txid_in_a_quarantined_file_that_holds_it_passes() -> None:
    files = {"node1": [qfile(5, 7, b"..tok-a..")]}
    assert check_quarantined([Lost("tok-a", "node1", 6)], files) == []


def test_a_lost_write_outside_every_quarantined_range_is_reported() -> None:
    files = {"node1": [qfile(5, 7, b"tok-a")]}
    problems = check_quarantined([Lost("tok-a", "node1", 9)], files)
    assert len(problems) == 1 and "no quarantined file covers it" in problems[0]


def test_a_covering_file_without_the_row_is_reported() -> None:
    files = {"node1": [qfile(5, 7, b"other rows")]}
    problems = check_quarantined([Lost("tok-a", "node1", 6)], files)
    assert len(problems) == 1 and "does not hold" in problems[0]


def test_a_row_of_unknown_txid_must_be_in_the_nodes_own_quarantine() -> None:
    files = {"node1": [qfile(5, 7, b"direct-x")], "node2": []}
    assert check_quarantined([Lost("direct-x", "node1", None)], files) == []
    assert check_quarantined([Lost("direct-x", "node2", None)], files) != []


def test_a_lost_sync_ack_is_reported() -> None:
    assert check_sync_acks([("tok-a", "node1", 3)], {"tok-a"}) == []
    assert check_sync_acks([("tok-a", "node1", 3)], set()) != []
