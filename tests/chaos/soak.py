"""Random nemeses for as long as asked, with every invariant checked after each round.

    python -m tests.chaos.soak --duration 30m [--lease static|redis|both] [--seed N]
                               [--dir PATH] [--only KIND ...]

Each round: the writers commit, a random nemesis (or two at once, static lease only)
breaks something while they go on, it is healed, the writers pause, and every invariant
is checked. With ``--lease both`` (the default) the time is split in two: first the
static-lease cluster (tests/chaos/nemesis.py), then the Redis-lease one with synchronous
writes (tests/chaos/redis_lease.py); each is started once and stopped when its half is
over. The summary lists faults injected by kind, writes acknowledged, invariants checked
and every problem of both; the exit status is 1 when anything was lost or broken.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.invariants import Verdict, check_cluster
from tests.chaos.nemesis import NEMESES, ChaosCluster, Fault, Nemesis
from tests.chaos.redis_lease import (
    REDIS_NEMESES,
    RedisChaosCluster,
    RedisNemesis,
    check_redis_cluster,
    known_bug,
    mark,
)

UNITS = {"s": 1, "m": 60, "h": 3600}
LEASES = ("static", "redis")
KINDS: dict[str, list[str]] = {
    "static": [n.kind for n in NEMESES],
    "redis": [n.kind for n in REDIS_NEMESES],
}
PROGRESS_TIMEOUT = 120.0  # seconds the writers may take for a round's commits


def parse_duration(text: str) -> float:
    """'30m', '90s', '2h' or a number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90s, 30m, 2h")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def leases_to_run(lease: str, only: Sequence[str]) -> list[str]:
    """The clusters to soak, in order: those of `lease` with a kind in `only` (if given)."""
    wanted = list(LEASES) if lease == "both" else [lease]
    if only:
        wanted = [name for name in wanted if any(k in KINDS[name] for k in only)]
    return wanted


def plan(seconds: float, leases: Sequence[str]) -> list[tuple[str, float]]:
    """Each lease with the time (seconds from the start) its phase ends at: equal shares."""
    share = seconds / max(len(leases), 1)
    return [(lease, share * (i + 1)) for i, lease in enumerate(leases)]


@dataclass
class Summary:
    faults: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)
    checked: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    known: Counter[str] = field(default_factory=Counter)
    rounds: Counter[str] = field(default_factory=Counter)  # lease -> rounds
    acked: Counter[str] = field(default_factory=Counter)  # lease -> writes acknowledged
    reads: int = 0
    sync_ok: int = 0  # Redis-lease writes answered Ltx-Sync: ok
    unacked: int = 0  # Redis-lease posts that got no 201
    direct: int = 0  # rows committed into killed primaries' databases
    seconds: float = 0.0

    def render(self) -> str:
        per_lease = ", ".join(f"{lease} {n}" for lease, n in self.rounds.items())
        lines = [
            f"soak: {self.rounds.total()} rounds ({per_lease or 'none'}) "
            f"in {self.seconds / 60:.1f} min",
            "faults injected:",
        ]
        lines += [f"  {kind:<20} {n}" for kind, n in sorted(self.faults.items())]
        lines += [f"  {kind:<20} skipped: {why}" for kind, why in sorted(self.skipped.items())]
        by_lease = ", ".join(f"{lease} {n}" for lease, n in self.acked.items())
        lines.append(f"writes acknowledged: {self.acked.total()} ({by_lease or 'none'})")
        if "redis" in self.acked:
            lines.append(f"  redis: {self.sync_ok} answered Ltx-Sync: ok, {self.unacked} "
                         f"posts not acknowledged, {self.direct} rows written into killed "
                         "primaries")  # fmt: skip
        lines.append(f"reads recorded: {self.reads}")
        lines.append("invariants checked:")
        lines += [f"  {name:<20} {n}" for name, n in sorted(self.checked.items())]
        if self.known:
            lines.append("known issues seen (already reported, not failures):")
            lines += [f"  {n} x {entry[:160]}" for entry, n in self.known.most_common(5)]
        lost = [p for p in self.problems if "acknowledged writes" in p or "sync acks kept" in p]
        lines.append(f"acknowledged writes lost: {'none' if not lost else len(lost)}")
        lines.append(f"problems: {'none' if not self.problems else len(self.problems)}")
        lines += [f"  {p[:300]}" for p in self.problems[:30]]
        return "\n".join(lines)


def wait_for_acks(acked: Callable[[], int], count: int, timeout: float = PROGRESS_TIMEOUT) -> bool:
    """True once `count` more writes than now are acknowledged; False after `timeout`."""
    target = acked() + count
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if acked() >= target:
            return True
        time.sleep(0.05)
    return False


def describe(faults: Sequence[Fault]) -> str:
    return ", ".join(f"{f.kind}({f.target} {f.detail})".replace(" )", ")") for f in faults)


def record(
    summary: Summary, lease: str, faults: Sequence[Fault], verdict: Verdict, bug: str | None
) -> None:
    """Add one round's verdict; problems a reported bug explains count as known, not failed."""
    summary.rounds[lease] += 1
    number = summary.rounds.total()
    label = describe(faults)
    summary.checked.update(verdict.checked)
    summary.known.update(verdict.known)
    if bug is not None:
        summary.known[f"{label}: known bug: {bug}"] += 1
        status = "known bug"
    else:
        summary.problems.extend(f"round {number} {lease} [{label}]: {p}" for p in verdict.problems)
        status = "ok" if verdict.ok else "PROBLEMS"
    print(f"round {number} ({lease}): {label}: {status}", flush=True)


# -- static lease --------------------------------------------------------------------------


def static_round(
    cluster: ChaosCluster, nemeses: list[Nemesis], rng: random.Random, summary: Summary
) -> None:
    offsets = {n.name: len(n.logs()) for n in cluster.nodes}
    acked = cluster.workload.acked
    cluster.workload.resume_writers()
    wait_for_acks(acked, rng.randint(10, 200))
    chosen = rng.sample(nemeses, k=1 if len(nemeses) < 2 or rng.random() < 0.7 else 2)
    faults: list[Fault] = []
    for nemesis in chosen:
        faults.append(nemesis.inject(cluster, rng))
        summary.faults[nemesis.kind] += 1
    if not wait_for_acks(acked, rng.randint(10, 200)):
        summary.problems.append(f"writers: no progress during {describe(faults)}")
    time.sleep(max(f.hold for f in faults) + rng.uniform(0, 3))
    for fault in reversed(faults):
        fault.heal()
    wait_for_acks(acked, 10)
    cluster.workload.pause_writers()
    verdict = check_cluster(
        cluster.primary,
        cluster.replicas,
        cluster.workload.ledgers,
        cluster.workload.reads,
        cluster.workload.errors,
        log_offsets=offsets,
        expected_errors="|".join(f.expected_errors for f in faults if f.expected_errors),
    )
    record(summary, "static", faults, verdict, None)


def static_phase(
    root: Path, deadline: float, seed: int, only: Sequence[str], summary: Summary
) -> None:
    cluster = ChaosCluster(root, seed=seed)
    rng = random.Random(seed)
    try:
        cluster.start()
        nemeses = []
        for nemesis in NEMESES:
            if only and nemesis.kind not in only:
                continue
            reason = nemesis.unavailable(cluster)
            if reason is None:
                nemeses.append(nemesis)
            else:
                summary.skipped[nemesis.kind] = reason
        rounds = 0
        while nemeses and (rounds == 0 or time.monotonic() < deadline):
            static_round(cluster, nemeses, rng, summary)
            rounds += 1
    except Exception as exc:  # the harness itself broke: report it, stop this phase
        traceback.print_exc()
        summary.problems.append(f"static cluster: {type(exc).__name__}: {exc}")
    finally:
        if hasattr(cluster, "workload"):
            summary.acked["static"] = cluster.workload.acked()
            summary.reads += len(cluster.workload.reads)
        cluster.stop()


# -- Redis lease ---------------------------------------------------------------------------


def redis_round(
    cluster: RedisChaosCluster, nemeses: list[RedisNemesis], rng: random.Random, summary: Summary
) -> None:
    """One nemesis at a time: each needs the single primary the last one left."""
    since = mark(cluster)
    acked = cluster.writer.acked
    cluster.writer.resume()
    wait_for_acks(acked, rng.randint(10, 100))
    nemesis = rng.choice(nemeses)
    fault = nemesis.inject(cluster, rng)
    summary.faults[nemesis.kind] += 1
    if not wait_for_acks(acked, rng.randint(10, 100)):
        summary.problems.append(f"redis writer: no progress during {describe([fault])}")
    time.sleep(fault.hold + rng.uniform(0, 3))
    fault.heal()
    wait_for_acks(acked, 10)
    cluster.writer.pause()
    verdict = check_redis_cluster(cluster, since, expected_errors=fault.expected_errors)
    record(summary, "redis", [fault], verdict, known_bug(nemesis.kind, verdict.problems))


def redis_phase(
    root: Path, deadline: float, seed: int, only: Sequence[str], summary: Summary
) -> None:
    nemeses = [n for n in REDIS_NEMESES if not only or n.kind in only]
    if shutil.which("redis-server") is None:
        for nemesis in nemeses:
            summary.skipped[nemesis.kind] = "redis-server is not on PATH (make redis)"
        return
    cluster = RedisChaosCluster(root, seed=seed)
    rng = random.Random(seed)
    try:
        cluster.start()
        rounds = 0
        while nemeses and (rounds == 0 or time.monotonic() < deadline):
            redis_round(cluster, nemeses, rng, summary)
            rounds += 1
    except Exception as exc:  # the harness itself broke: report it, stop this phase
        traceback.print_exc()
        summary.problems.append(f"redis cluster: {type(exc).__name__}: {exc}")
    finally:
        if hasattr(cluster, "writer"):
            summary.acked["redis"] = cluster.writer.acked()
            summary.sync_ok = sum(1 for w in cluster.writer.writes if w.sync == "ok")
            summary.unacked = cluster.writer.failures
        summary.direct = len(cluster.direct)
        cluster.stop()


PHASES: dict[str, Callable[[Path, float, int, Sequence[str], Summary], None]] = {
    "static": static_phase,
    "redis": redis_phase,
}


def soak(
    root: Path, seconds: float, seed: int, only: Sequence[str], leases: Sequence[str] = LEASES
) -> Summary:
    """Each lease's cluster in turn, for an equal share of `seconds` (at least one round)."""
    summary = Summary()
    started = time.monotonic()
    for lease, ends_at in plan(seconds, leases):
        print(f"soak: {lease} lease until {ends_at:.0f} s", flush=True)
        (root / lease).mkdir(parents=True, exist_ok=True)
        PHASES[lease](root / lease, started + ends_at, seed, only, summary)
    summary.seconds = time.monotonic() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--lease", choices=["static", "redis", "both"], default="both",
                        help="which cluster(s) to soak; both: half the time each (default)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the nodes' files here")
    parser.add_argument("--only", nargs="+", default=[], metavar="KIND",
                        choices=KINDS["static"] + KINDS["redis"],
                        help="only these nemeses: " + ", ".join(KINDS["static"] + KINDS["redis"]))  # fmt: skip
    args = parser.parse_args(argv)
    leases = leases_to_run(args.lease, args.only)
    if not leases:
        parser.error(f"none of the --only kinds runs with --lease {args.lease}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: seed {seed}, {args.duration:.0f} s, lease {' then '.join(leases)}", flush=True)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="soak-", dir=args.dir))
    else:
        root = Path(tempfile.mkdtemp(prefix="ltx-soak-"))
    print(f"soak: nodes' files in {root}", flush=True)
    summary = soak(root, args.duration, seed, args.only, leases)
    print(summary.render())
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
