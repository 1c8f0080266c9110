"""GET /metrics: the cluster state in the Prometheus text exposition format, version 0.0.4.

A pure renderer: ClusterState in, text out. The state is already a snapshot that the
node keeps current, so a metrics library's registry and instruments would only copy it;
the format is small enough to write here exactly (and the tests parse it strictly).

Per-database values the node may put in ``DatabaseView.extra`` (each one optional; a
missing or non-numeric value is simply not exported):

* ``size``, ``wal_size``: ``ltx_sidecar_db_size_bytes``, ``ltx_sidecar_db_wal_bytes``
* ``ltx_files_written``, ``ltx_bytes_written``, ``ltx_files_sent``, ``ltx_bytes_sent``:
  ``ltx_sidecar_<key>_total`` counters
* ``snapshots``, ``rescans``, ``resyncs``: ``ltx_sidecar_db_<key>_total`` counters
* ``apply_seconds_sum`` with ``apply_count`` (and the same for ``checkpoint``): the
  summary ``ltx_sidecar_db_apply_duration_seconds`` (``_sum`` and ``_count``)
* ``last_apply_seconds``, ``last_checkpoint_seconds``:
  ``ltx_sidecar_db_last_<kind>_duration_seconds`` gauges
* ``error`` or ``problem`` (any true value): ``ltx_sidecar_db_error`` is 1

Node counters in ``ClusterState.counters`` (``state.count("resyncs")``) become counters
named ``ltx_sidecar_<name>_total``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from sidecar import __version__
from sidecar.cluster import ClusterState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "ltx_sidecar_"
ROLES = ("starting", "candidate", "replica", "primary")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")

Labels = tuple[tuple[str, str], ...]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers plainly, +Inf, -Inf, NaN."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def metric_name(name: str) -> str:
    """`name` made a valid metric name (letters, digits, underscores; no leading digit)."""
    name = _NAME_BAD.sub("_", name)
    return f"_{name}" if name[:1].isdigit() else name


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    return None


@dataclass
class Family:
    """One metric family: its TYPE and HELP lines and all its samples, kept together."""

    name: str
    type: str  # "gauge", "counter" or "summary"
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels = (), suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            label_part = f"{{{text}}}" if text else ""
            lines.append(f"{self.name}{suffix}{label_part} {format_value(value)}")
        return "\n".join(lines) + "\n"


class Exposition:
    """Families in the order first asked for; a name is declared once."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def family(self, name: str, type_: str, help_: str) -> Family:
        full = PREFIX + name
        existing = self.families.get(full)
        if existing is None:
            existing = self.families[full] = Family(full, type_, help_)
        return existing

    def render(self) -> str:
        return "".join(f.render() for f in self.families.values() if f.samples)


# (extra key, metric name without prefix, type, help) of the simple per-database values.
_DB_EXTRA: tuple[tuple[str, str, str, str], ...] = (
    ("size", "db_size_bytes", "gauge", "Size of the database file (page size x pages)."),
    ("wal_size", "db_wal_bytes", "gauge", "Size of the database's WAL file."),
    ("ltx_files_written", "ltx_files_written_total", "counter", "LTX files written."),
    ("ltx_bytes_written", "ltx_bytes_written_total", "counter", "Bytes of LTX files written."),
    ("ltx_files_sent", "ltx_files_sent_total", "counter", "LTX files sent to replicas."),
    ("ltx_bytes_sent", "ltx_bytes_sent_total", "counter", "Bytes of LTX files sent."),
    ("snapshots", "db_snapshots_total", "counter", "Snapshots made of the database."),
    ("rescans", "db_rescans_total", "counter", "Rescans of the database (unexpected WAL)."),
    ("resyncs", "db_resyncs_total", "counter", "Resyncs of this replica's database."),
)
_DURATIONS = ("apply", "checkpoint")


def _node_metrics(out: Exposition, state: ClusterState, now: float) -> None:
    out.family("info", "gauge", "The node's id and version (always 1).").add(
        1, (("node_id", state.me.node_id), ("version", __version__))
    )
    role = out.family("role", "gauge", "1 for the node's current role, 0 for the others.")
    for name in (*ROLES, *(() if state.role in ROLES else (state.role,))):
        role.add(int(state.role == name), (("role", name),))
    out.family("epoch", "gauge", "Highest lease epoch seen.").add(state.epoch)
    out.family("primary_known", "gauge", "1 when the node knows the primary.").add(
        int(state.primary is not None)
    )
    out.family("ready", "gauge", "1 when the node is ready (replica: caught up once).").add(
        int(state.ready)
    )
    out.family("uptime_seconds", "gauge", "Seconds since the node started.").add(
        round(max(0.0, now - state.started), 3)
    )
    out.family("connected_replicas", "gauge", "Replicas with an open stream (primary).").add(
        sum(1 for r in state.replicas.values() if r.streams > 0)
    )


def _database_metrics(out: Exposition, state: ClusterState) -> None:
    mono = time.monotonic()
    for view in sorted(state, key=lambda v: v.name):
        db = (("db", view.name),)
        out.family("db_txid", "gauge", "TXID this node has applied.").add(view.txid, db)
        out.family("db_primary_txid", "gauge", "TXID the primary last reported.").add(
            view.primary_txid, db
        )
        out.family("db_lag_seconds", "gauge", "Seconds behind the primary (0: current).").add(
            round(view.lag_seconds(mono), 6), db
        )
        out.family("db_lag_txids", "gauge", "TXIDs behind the primary.").add(view.lag_txids(), db)
        out.family("db_deleted", "gauge", "1 when the database is deleted.").add(
            int(view.deleted), db
        )
        for key, name, type_, help_ in _DB_EXTRA:
            value = _number(view.extra.get(key))
            if value is not None:
                out.family(name, type_, help_).add(value, db)
        for kind in _DURATIONS:
            total = _number(view.extra.get(f"{kind}_seconds_sum"))
            count = _number(view.extra.get(f"{kind}_count"))
            if total is not None and count is not None:
                fam = out.family(f"db_{kind}_duration_seconds", "summary", f"Time of {kind}s.")
                fam.add(total, db, "_sum")
                fam.add(count, db, "_count")
            last = _number(view.extra.get(f"last_{kind}_seconds"))
            if last is not None:
                out.family(
                    f"db_last_{kind}_duration_seconds", "gauge", f"Duration of the last {kind}."
                ).add(last, db)
        failing = bool(view.extra.get("error") or view.extra.get("problem"))
        out.family("db_error", "gauge", "1 while the database cannot be followed.").add(
            int(failing), db
        )


def _replica_metrics(out: Exposition, state: ClusterState, now: float) -> None:
    for node_id, replica in sorted(state.replicas.items()):
        rid = (("replica", node_id),)
        out.family("replica_connected", "gauge", "1 while the replica has a stream open.").add(
            int(replica.streams > 0), rid
        )
        if replica.last_report is not None:
            out.family(
                "replica_report_age_seconds", "gauge", "Seconds since the replica's last report."
            ).add(round(max(0.0, now - replica.last_report), 3), rid)
        for name, (txid, _) in sorted(replica.positions.items()):
            labels = (*rid, ("db", name))
            out.family("replica_txid", "gauge", "TXID the replica reported.").add(txid, labels)
            view = state.databases.get(name)
            lag = max(0, view.txid - txid) if view else 0
            out.family("replica_lag_txids", "gauge", "TXIDs the replica is behind.").add(
                lag, labels
            )


def _counter_metrics(out: Exposition, state: ClusterState) -> None:
    for name, count in sorted(state.counters.items()):
        base = metric_name(name).removesuffix("_total")
        full = f"{base}_total"
        if PREFIX + full in out.families:  # never declare a family twice
            continue
        out.family(full, "counter", f"Count of {name} events.").add(count)


def render_metrics(state: ClusterState, now: float | None = None) -> str:
    """The whole /metrics body for `state` (now: time.time(), for tests)."""
    now = time.time() if now is None else now
    out = Exposition()
    _node_metrics(out, state, now)
    _database_metrics(out, state)
    _replica_metrics(out, state, now)
    _counter_metrics(out, state)
    return out.render()


__all__ = ["CONTENT_TYPE", "format_value", "render_metrics"]
