"""Short chaos runs: one nemesis each, on one cluster, invariants checked after each.

The cluster (a primary and two replicas behind fault proxies, static lease) lives for
the module; each test lets the writers commit, injects its fault while they keep going,
heals it, stops the writers and checks every invariant in tests/chaos/invariants.py
against everything recorded since the cluster started. ``make soak`` runs the same
nemeses at random for as long as asked.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from tests.chaos.invariants import check_cluster
from tests.chaos.nemesis import NEMESES, ChaosCluster, by_kind
from tests.e2e.cluster import wait_until

pytestmark = pytest.mark.timeout(180)

PROGRESS = 15  # acknowledged transactions before, during and after each fault


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosCluster]:
    c = ChaosCluster(tmp_path_factory.mktemp("chaos"), seed=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def commits_go_on(cluster: ChaosCluster, what: str) -> None:
    target = cluster.workload.acked() + PROGRESS
    wait_until(lambda: cluster.workload.acked() >= target, 60, what, *cluster.nodes)


def run_nemesis(cluster: ChaosCluster, kind: str, seed: int) -> None:
    nemesis = by_kind(kind)
    reason = nemesis.unavailable(cluster)
    if reason is not None:
        pytest.skip(reason)
    offsets = {n.name: len(n.logs()) for n in cluster.nodes}
    cluster.workload.resume_writers()
    commits_go_on(cluster, "commits before the fault")
    fault = nemesis.inject(cluster, random.Random(seed))
    commits_go_on(cluster, f"commits during {kind}")
    time.sleep(fault.hold)  # let it bite (a stream timeout, a failing apply)
    fault.heal()
    commits_go_on(cluster, f"commits after {kind}")
    cluster.workload.pause_writers()
    verdict = check_cluster(
        cluster.primary,
        cluster.replicas,
        cluster.workload.ledgers,
        cluster.workload.reads,
        cluster.workload.errors,
        log_offsets=offsets,
        expected_errors=fault.expected_errors,
    )
    assert verdict.ok, f"{kind} ({fault.target} {fault.detail}):\n" + "\n".join(verdict.problems)


@pytest.mark.parametrize("kind", [n.kind for n in NEMESES])
def test_invariants_hold_through(cluster: ChaosCluster, kind: str) -> None:
    run_nemesis(cluster, kind, seed=len(kind))


def test_reads_saw_every_replica_advance(cluster: ChaosCluster) -> None:
    """The recorded reads are real: each session saw its replica at a TXID > 0, moving."""
    for session in cluster.workload.sessions:
        txids = {r.txid_after for r in session.reads}
        assert len(txids) > 1, f"{session.name}: {len(session.reads)} reads, TXIDs {txids}"


def test_killed_writers_left_whole_transactions_or_none(cluster: ChaosCluster) -> None:
    """kill-app really interrupted a writer (checked for wholeness in every run)."""
    killed = [ledger for ledger in cluster.workload.ledgers if ledger.killed_in_flight]
    assert killed, "no writer was killed with a transaction in flight"
