"""Random nemeses for as long as asked, with every invariant checked after each round.

    python -m tests.chaos.soak --duration 30m [--seed N] [--dir PATH] [--only KIND ...]

Each round: the writers commit, a random nemesis (or two at once) breaks something
while they go on, it is healed, the writers pause, and check_cluster runs. The summary
lists faults injected by kind, writes acknowledged, invariants checked and every
problem; the exit status is 1 when anything was lost or broken, else 0.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.invariants import check_cluster
from tests.chaos.nemesis import NEMESES, ChaosCluster, Fault, Nemesis, by_kind

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'30m', '90s', '2h' or a number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90s, 30m, 2h")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


@dataclass
class Summary:
    faults: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, str] = field(default_factory=dict)
    checked: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    known: Counter[str] = field(default_factory=Counter)
    rounds: int = 0
    acked: int = 0
    reads: int = 0
    seconds: float = 0.0

    def render(self) -> str:
        lines = [f"soak: {self.rounds} rounds in {self.seconds / 60:.1f} min", "faults injected:"]
        lines += [f"  {kind:<18} {n}" for kind, n in sorted(self.faults.items())]
        lines += [f"  {kind:<18} skipped: {why}" for kind, why in sorted(self.skipped.items())]
        lines.append(f"writes acknowledged: {self.acked}")
        lines.append(f"reads recorded: {self.reads}")
        lines.append("invariants checked:")
        lines += [f"  {name:<20} {n}" for name, n in sorted(self.checked.items())]
        if self.known:
            lines.append("known issues seen (already reported, not failures):")
            lines += [f"  {n} x {entry[:160]}" for entry, n in self.known.most_common(5)]
        lost = [p for p in self.problems if p.startswith("acknowledged writes")]
        lines.append(f"acknowledged writes lost: {'none' if not lost else len(lost)}")
        lines.append(f"problems: {'none' if not self.problems else len(self.problems)}")
        lines += [f"  {p[:300]}" for p in self.problems[:30]]
        return "\n".join(lines)


def wait_for_commits(cluster: ChaosCluster, count: int, timeout: float = 120) -> bool:
    target = cluster.workload.acked() + count
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.workload.acked() >= target:
            return True
        time.sleep(0.05)
    return False


def one_round(
    cluster: ChaosCluster, nemeses: list[Nemesis], rng: random.Random, summary: Summary
) -> None:
    offsets = {n.name: len(n.logs()) for n in cluster.nodes}
    cluster.workload.resume_writers()
    wait_for_commits(cluster, rng.randint(10, 200))
    chosen = rng.sample(nemeses, k=1 if len(nemeses) < 2 or rng.random() < 0.7 else 2)
    faults: list[Fault] = []
    for nemesis in chosen:
        faults.append(nemesis.inject(cluster, rng))
        summary.faults[nemesis.kind] += 1
    if not wait_for_commits(cluster, rng.randint(10, 200)):
        summary.problems.append(f"writers: no progress during {[f.kind for f in faults]}")
    time.sleep(max(f.hold for f in faults) + rng.uniform(0, 3))
    for fault in reversed(faults):
        fault.heal()
    wait_for_commits(cluster, 10)
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
    label = ", ".join(f"{f.kind}({f.target} {f.detail})".replace(" )", ")") for f in faults)
    summary.checked.update(verdict.checked)
    summary.problems.extend(f"round {summary.rounds + 1} [{label}]: {p}" for p in verdict.problems)
    summary.known.update(verdict.known)
    summary.rounds += 1
    print(f"round {summary.rounds}: {label}: {'ok' if verdict.ok else 'PROBLEMS'}", flush=True)


def soak(root: Path, seconds: float, seed: int, only: list[str]) -> Summary:
    summary = Summary()
    cluster = ChaosCluster(root, seed=seed)
    rng = random.Random(seed)
    started = time.monotonic()
    try:
        cluster.start()
        nemeses = []
        for nemesis in [by_kind(k) for k in only] if only else NEMESES:
            reason = nemesis.unavailable(cluster)
            if reason is None:
                nemeses.append(nemesis)
            else:
                summary.skipped[nemesis.kind] = reason
        while time.monotonic() - started < seconds and nemeses:
            one_round(cluster, nemeses, rng, summary)
    finally:
        summary.acked = cluster.workload.acked() if hasattr(cluster, "workload") else 0
        summary.reads = len(cluster.workload.reads) if hasattr(cluster, "workload") else 0
        cluster.stop()
        summary.seconds = time.monotonic() - started
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak", description=__doc__)
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the nodes' files here")
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="KIND", choices=[n.kind for n in NEMESES]
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: seed {seed}, {args.duration:.0f} s", flush=True)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="soak-", dir=args.dir))
    else:
        root = Path(tempfile.mkdtemp(prefix="ltx-soak-"))
    print(f"soak: nodes' files in {root}", flush=True)
    summary = soak(root, args.duration, seed, args.only)
    print(summary.render())
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
