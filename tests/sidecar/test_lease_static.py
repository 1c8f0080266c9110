"""The static lease, open_lease and the candidate rule (sidecar/lease)."""

from __future__ import annotations

import math

import pytest

from sidecar.cluster import NodeInfo
from sidecar.config import Config, load_config
from sidecar.lease import (
    Candidate,
    LeaseError,
    Term,
    candidate_should_wait,
    default_renew_interval,
    open_lease,
    safety_margin,
)
from sidecar.lease.redis import RedisLease
from sidecar.lease.static import StaticLease, node_id_from_url

ME = NodeInfo("node-a", "http://10.0.0.1:20202", "http://10.0.0.1:8080")


def config(**lease: str) -> Config:
    env = {f"LTX_SIDECAR_LEASE_{k.upper()}": v for k, v in lease.items()}
    return load_config(None, {"LTX_SIDECAR_NODE_ID": ME.node_id, **env})


# -- static lease ----------------------------------------------------------------------------


async def test_static_primary_holds_epoch_1_forever() -> None:
    lease = open_lease(config(type="static"), ME)
    assert isinstance(lease, StaticLease)
    term = await lease.acquire(ME)
    assert term == Term(ME, 1, math.inf)
    assert await lease.renew(term) == term
    assert await lease.current() == term
    await lease.release(term)
    assert await lease.current() == term  # the configured primary stays the primary
    await lease.close()


async def test_static_replica_sees_the_configured_primary_and_never_acquires() -> None:
    lease = open_lease(config(type="static", primary_url="http://primary.internal:20202/"), ME)
    expected = NodeInfo(node_id="primary.internal:20202", api_url="http://primary.internal:20202")
    assert await lease.current() == Term(expected, 1, math.inf)
    assert await lease.acquire(ME) is None
    assert await lease.renew(Term(ME, 1, math.inf)) is None


async def test_static_lease_cannot_be_handed_off() -> None:
    lease = open_lease(config(type="static"), ME)
    term = await lease.acquire(ME)
    assert term is not None
    with pytest.raises(LeaseError, match="static lease cannot be handed off"):
        await lease.handoff(term, NodeInfo("node-b", "http://b:20202"))


async def test_static_lease_keeps_published_positions_in_memory() -> None:
    lease = open_lease(config(type="static"), ME)
    await lease.publish(ME, {"app.db": (5, 0xAB)}, primary=True)
    await lease.publish(NodeInfo("node-b", "http://b"), {"app.db": (4, 1)}, primary=False)
    assert await lease.positions() == (
        {"app.db": (5, 0xAB)},
        {"node-b": Candidate("http://b", {"app.db": (4, 1)})},
    )


def test_node_id_from_url_is_host_and_port() -> None:
    assert node_id_from_url("http://p:1234") == "p:1234"
    assert node_id_from_url("http://p") == "p:80"
    assert node_id_from_url("https://p/x") == "p:443"
    assert node_id_from_url("http://[::1]:9") == "::1:9"


# -- open_lease ------------------------------------------------------------------------------


async def test_open_lease_makes_a_redis_lease_with_the_configured_timing() -> None:
    lease = open_lease(config(type="redis", redis_url="redis://127.0.0.1:1/0", ttl="6s"), ME)
    assert isinstance(lease, RedisLease)
    assert (lease.ttl, lease.renew_interval) == (6.0, 2.0)
    await lease.close()


def test_open_lease_rejects_a_renew_interval_that_outlives_the_term() -> None:
    cfg = config(type="redis", redis_url="redis://127.0.0.1:1/0", ttl="5s", renew_interval="5s")
    with pytest.raises(LeaseError, match=r"renew-interval 5s is too long for lease\.ttl 5s"):
        open_lease(cfg, ME)


def test_open_lease_needs_a_redis_url() -> None:
    with pytest.raises(LeaseError, match="redis-url is empty"):
        open_lease(config(type="redis"), ME)


def test_open_lease_rejects_a_malformed_redis_url() -> None:
    with pytest.raises(LeaseError, match="not a valid Redis URL"):
        open_lease(config(type="redis", redis_url="redis://host:notaport/0"), ME)


def test_timing_defaults() -> None:
    assert safety_margin(5.0) == 0.5
    assert safety_margin(30.0) == 3.0
    assert safety_margin(0.6) == 0.3  # never more than half the TTL
    assert default_renew_interval(6.0, 0.0) == 2.0
    assert default_renew_interval(6.0, 1.5) == 1.5


# -- candidate_should_wait -------------------------------------------------------------------


def test_a_caught_up_candidate_never_waits() -> None:
    published = {"a.db": (10, 1), "b.db": (7, 2)}
    mine = {"a.db": (10, 1), "b.db": (7, 2)}
    assert not candidate_should_wait(mine, published, {"other": {"a.db": (11, 0), "b.db": (8, 0)}})


def test_a_behind_candidate_waits_for_a_more_current_live_one() -> None:
    published = {"a.db": (10, 1)}
    assert candidate_should_wait({"a.db": (8, 0)}, published, {"other": {"a.db": (10, 1)}})
    assert candidate_should_wait({"a.db": (8, 0)}, published, {"other": {"a.db": (9, 0)}})


def test_a_behind_candidate_takes_the_lease_when_nobody_is_better() -> None:
    published = {"a.db": (10, 1)}
    assert not candidate_should_wait({"a.db": (8, 0)}, published, {})
    assert not candidate_should_wait({"a.db": (8, 0)}, published, {"other": {"a.db": (8, 0)}})
    assert not candidate_should_wait({"a.db": (8, 0)}, published, {"other": {"a.db": (3, 0)}})


def test_candidates_ahead_on_different_databases_do_not_wait_for_each_other() -> None:
    published = {"a.db": (10, 1), "b.db": (10, 1)}
    x = {"a.db": (10, 1), "b.db": (5, 0)}
    y = {"a.db": (5, 0), "b.db": (10, 1)}
    assert not candidate_should_wait(x, published, {"y": y})
    assert not candidate_should_wait(y, published, {"x": x})


def test_a_missing_database_counts_as_txid_zero() -> None:
    published = {"a.db": (10, 1), "new.db": (1, 1)}
    mine = {"a.db": (10, 1)}
    assert candidate_should_wait(mine, published, {"other": {"a.db": (10, 1), "new.db": (1, 1)}})
    assert not candidate_should_wait(mine, {}, {"other": {"a.db": (99, 1)}})


def test_a_candidate_that_answered_is_judged_on_what_it_has_now() -> None:
    """Not behind the (stale) published positions, yet another candidate has more: the
    write a synchronous primary acknowledged after it last published."""
    published = {"a.db": (10, 1)}
    mine = {"a.db": (10, 1)}
    assert not candidate_should_wait(mine, published, {"other": {"a.db": (11, 1)}})
    assert candidate_should_wait(mine, published, {}, {"other": {"a.db": (11, 1)}})
    assert candidate_should_wait(mine, published, {}, {"other": {**mine, "new.db": (1, 1)}})
    assert not candidate_should_wait(mine, published, {}, {"other": {"a.db": (10, 1)}})
    ahead_elsewhere = {"a.db": (9, 1), "new.db": (1, 1)}
    assert not candidate_should_wait(mine, published, {}, {"other": ahead_elsewhere})


def test_our_own_entry_among_the_others_changes_nothing() -> None:
    published = {"a.db": (10, 1)}
    mine = {"a.db": (8, 0)}
    assert not candidate_should_wait(mine, published, {"me": mine})
