"""The /metrics renderer, checked with a strict parser of the text format 0.0.4."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import pytest

from sidecar import __version__
from sidecar.cluster import ClusterState, NodeInfo, Primary
from sidecar.metrics import format_value, render_metrics

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(,|$)')
_VALUE = re.compile(r"^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN)$")
_SUFFIXES = {"summary": ("_sum", "_count", ""), "histogram": ("_sum", "_count", "_bucket")}


@dataclass
class ParsedFamily:
    type: str
    help: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def parse_exposition(text: str) -> dict[str, ParsedFamily]:
    """Parse Prometheus text format 0.0.4 strictly; fail the test on anything off."""
    assert text.endswith("\n"), "the body must end with a newline"
    families: dict[str, ParsedFamily] = {}
    current: str | None = None
    helps: dict[str, str] = {}
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, text_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name), where
            assert name not in helps, f"HELP twice for {name}"
            helps[name] = text_
        elif line.startswith("# TYPE "):
            name, _, type_ = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name), where
            assert type_ in ("counter", "gauge", "summary", "histogram", "untyped"), where
            assert name not in families, f"family {name} declared twice"
            assert helps.get(name) is not None, f"TYPE before HELP for {name}"
            families[name] = ParsedFamily(type_, helps[name])
            current = name
        else:
            assert not line.startswith("#") and line, where
            match = _SAMPLE.match(line)
            assert match, where
            name, label_text, value = match.groups()
            assert current is not None, f"sample before any TYPE: {where}"
            family = families[current]
            allowed = tuple(current + s for s in _SUFFIXES.get(family.type, ("",)))
            assert name in allowed, f"{name} outside its family {current}: {where}"
            labels: list[tuple[str, str]] = []
            rest = label_text or ""
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"bad labels: {where}"
                labels.append((lm.group(1), lm.group(2)))
                rest = rest[lm.end() :]
            assert _VALUE.match(value), f"bad value: {where}"
            key = (name, tuple(labels))
            assert key not in family.samples, f"duplicate sample: {where}"
            family.samples[key] = float(value)
    return families


def sample(families: dict[str, ParsedFamily], name: str, **labels: str) -> float:
    for family in families.values():
        for (sample_name, sample_labels), value in family.samples.items():
            if sample_name == name and dict(sample_labels) == labels:
                return value
    raise AssertionError(f"no sample {name}{labels}")


def primary_state() -> ClusterState:
    me = NodeInfo("node-a", "http://127.0.0.1:20202")
    state = ClusterState(me)
    state.set_role("primary", Primary(me, 7))
    state.set_position("app.db", 42, 0x8123456789ABCDEF)
    state.database("app.db").extra.update(
        size=8192,
        wal_size=4120,
        ltx_files_written=40,
        ltx_bytes_written=123456,
        ltx_files_sent=80,
        ltx_bytes_sent=246912,
        snapshots=2,
        rescans=1,
        checkpoint_seconds_sum=0.25,
        checkpoint_count=5,
        last_checkpoint_seconds=0.01,
        error=None,
    )
    state.set_position('we"ird\\name', 3, 0x8000000000000001)
    state.replica_connected("node-b")
    state.replica_reported("node-b", {"app.db": (40, 0x8000000000000002)})
    state.replica_reported("node-c", {"app.db": (42, 0x8123456789ABCDEF)})  # not connected
    state.count("resyncs", 3)
    state.count("lease-events")
    return state


def test_primary_metrics_parse_and_carry_the_state() -> None:
    state = primary_state()
    families = parse_exposition(render_metrics(state, now=state.started + 12.5))

    assert sample(families, "ltx_sidecar_info", node_id="node-a", version=__version__) == 1
    assert sample(families, "ltx_sidecar_role", role="primary") == 1
    for other in ("starting", "candidate", "replica"):
        assert sample(families, "ltx_sidecar_role", role=other) == 0
    assert sample(families, "ltx_sidecar_epoch") == 7
    assert sample(families, "ltx_sidecar_uptime_seconds") == 12.5
    assert sample(families, "ltx_sidecar_connected_replicas") == 1
    assert sample(families, "ltx_sidecar_db_txid", db="app.db") == 42
    assert sample(families, "ltx_sidecar_db_lag_txids", db="app.db") == 0
    assert sample(families, "ltx_sidecar_db_size_bytes", db="app.db") == 8192
    assert sample(families, "ltx_sidecar_ltx_bytes_sent_total", db="app.db") == 246912
    assert sample(families, "ltx_sidecar_db_snapshots_total", db="app.db") == 2
    assert sample(families, "ltx_sidecar_db_checkpoint_duration_seconds_count", db="app.db") == 5
    assert sample(families, "ltx_sidecar_db_checkpoint_duration_seconds_sum", db="app.db") == 0.25
    assert sample(families, "ltx_sidecar_db_error", db="app.db") == 0
    assert families["ltx_sidecar_ltx_files_written_total"].type == "counter"
    assert families["ltx_sidecar_db_checkpoint_duration_seconds"].type == "summary"
    # A label value with a quote and a backslash is escaped, and parses back.
    assert sample(families, "ltx_sidecar_db_txid", db='we\\"ird\\\\name') == 3
    assert sample(families, "ltx_sidecar_replica_connected", replica="node-b") == 1
    assert sample(families, "ltx_sidecar_replica_connected", replica="node-c") == 0
    assert sample(families, "ltx_sidecar_replica_lag_txids", replica="node-b", db="app.db") == 2
    assert sample(families, "ltx_sidecar_replica_txid", replica="node-c", db="app.db") == 42
    assert sample(families, "ltx_sidecar_resyncs_total") == 3
    assert sample(families, "ltx_sidecar_lease_events_total") == 1
    # Values the node did not give are not made up.
    assert "ltx_sidecar_db_apply_duration_seconds" not in families


def test_replica_lag_is_exported_in_seconds_and_txids() -> None:
    me = NodeInfo("node-b", "http://127.0.0.1:20203")
    state = ClusterState(me)
    state.set_role("replica", Primary(NodeInfo("node-a", "http://127.0.0.1:20202"), 2))
    state.set_position("app.db", 10, 1)
    state.set_primary_position("app.db", 15, 2)
    state.database("app.db").behind_since = time.monotonic() - 30
    state.database("app.db").extra.update(apply_seconds_sum=1.5, apply_count=10, problem="x")
    families = parse_exposition(render_metrics(state))

    assert sample(families, "ltx_sidecar_role", role="replica") == 1
    assert sample(families, "ltx_sidecar_db_lag_txids", db="app.db") == 5
    assert 30 <= sample(families, "ltx_sidecar_db_lag_seconds", db="app.db") < 3600
    assert sample(families, "ltx_sidecar_db_primary_txid", db="app.db") == 15
    assert sample(families, "ltx_sidecar_db_apply_duration_seconds_count", db="app.db") == 10
    assert sample(families, "ltx_sidecar_db_error", db="app.db") == 1
    assert "ltx_sidecar_replica_connected" not in families


def test_a_new_node_renders_without_databases() -> None:
    state = ClusterState(NodeInfo("solo", "http://127.0.0.1:1"))
    families = parse_exposition(render_metrics(state))
    assert sample(families, "ltx_sidecar_role", role="starting") == 1
    assert sample(families, "ltx_sidecar_primary_known") == 0
    assert not any(name.startswith("ltx_sidecar_db_") for name in families)


def test_an_unknown_role_still_gets_its_sample() -> None:
    state = ClusterState(NodeInfo("n", "http://127.0.0.1:1"))
    state.role = "demoting"
    families = parse_exposition(render_metrics(state))
    assert sample(families, "ltx_sidecar_role", role="demoting") == 1


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (True, "1"), (0.5, "0.5"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (1e-7, "1e-07")],
)
def test_values_are_written_as_prometheus_reads_them(value: float, text: str) -> None:
    assert format_value(value) == text
    assert format_value(math.nan) == "NaN"
