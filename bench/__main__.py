"""Run the benchmarks and write the report.

    python -m bench [--mode quick|full] [--out DIR] [--only NAME] [--list]

After the benchmarks it draws the plots (bench/plots.py) next to the report and links
them from it: replication lag over time under load (a short extra run, whenever the
replication benchmarks run) and the failover timeline (from the failover benchmark's
failover.json in the output directory). Without a report (--only) they go to --out.

Exit status: 0 when every benchmark and plot ran, whether or not it met its
targets (missed targets are printed as MISSED); 1 when a benchmark or a plot raised;
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from bench import plots, report
from bench.registry import Benchmark, Context, Mode, Outcome, load

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"
DEFAULT_REPORT = HERE / "REPORT.md"
LAG_PLOT_AFTER = ("replication_lag", "replication_fanout")  # benchmarks that imply the lag plot


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run the ltx-sidecar benchmarks and write the report."
    )
    parser.add_argument(
        "--mode",
        choices=("quick", "full"),
        default="quick",
        help="quick: short runs, under two minutes in all (for CI); full: the sizes the "
        "targets are stated at (1 GB bootstrap, 20 kills, ...) (default quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"directory for results.json (default {DEFAULT_OUT.relative_to(HERE.parent)})",
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        choices=names,
        help="run one benchmark; REPORT.md is then left alone unless --report is given "
        f"(one of: {', '.join(names)})",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        default=None,
        help=f"where to write the Markdown report (default {DEFAULT_REPORT.relative_to(HERE.parent)})",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def run_one(bench: Benchmark, mode: Mode, out_dir: Path) -> Outcome:
    outcome = Outcome(bench.name)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{bench.name}-") as tmp:
        try:
            outcome.results = bench.fn(Context(mode=mode, tmp_dir=Path(tmp), out_dir=out_dir))
        except Exception as exc:
            traceback.print_exc()
            outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def make_plots(
    mode: Mode, outcomes: list[Outcome], out_dir: Path, plot_dir: Path
) -> tuple[dict[str, Path], list[Outcome]]:
    """The plots this run has data for: {title: PNG}, and an Outcome per plot that failed."""
    ran = {o.benchmark for o in outcomes if o.error is None}
    wanted: list[tuple[str, str, Callable[[Path], Path]]] = []
    if ran & set(LAG_PLOT_AFTER):
        title = f"Replication lag under load (1,000 commits/s, 2 replicas, {mode} mode)"
        wanted.append(("lag_plot", title, lambda path: plots.lag_plot(mode, path)))
    if "failover" in ran and (out_dir / plots.FAILOVER_JSON).is_file():
        title = "Failover timeline (roles seen through each node's /status)"
        data = out_dir / plots.FAILOVER_JSON
        wanted.append(("failover_plot", title, lambda path: plots.failover_plot(data, path)))
    names = {"lag_plot": plots.LAG_PNG, "failover_plot": plots.FAILOVER_PNG}
    made: dict[str, Path] = {}
    failed: list[Outcome] = []
    plot_dir.mkdir(parents=True, exist_ok=True)
    for name, title, draw in wanted:
        print(f"== {name} ({mode}) ...", flush=True)
        start = time.perf_counter()
        try:
            made[title] = draw(plot_dir / names[name])
            print(f"   done in {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as exc:
            traceback.print_exc()
            failed.append(Outcome(name, seconds=time.perf_counter() - start,
                                  error=f"{type(exc).__name__}: {exc}"))  # fmt: skip
            print(f"   ERROR in {time.perf_counter() - start:.1f} s", flush=True)
    return made, failed


def main(argv: list[str] | None = None) -> int:
    registry = load()
    args = parse_args(argv, list(registry))
    if args.list:
        for bench in registry.values():
            print(f"{bench.name}: {bench.description.splitlines()[0] if bench.description else ''}")
        return 0
    mode = cast(Mode, args.mode)
    selected = [registry[args.only]] if args.only else list(registry.values())
    report_path: Path | None = args.report
    if report_path is None and not args.only:
        report_path = DEFAULT_REPORT

    machine = report.machine_info()  # before running: it records the load average at start
    started = datetime.now(UTC)
    cpu_before = report.cpu_sample()
    start = time.perf_counter()
    outcomes: list[Outcome] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for bench in selected:
        print(f"== {bench.name} ({mode}) ...", flush=True)
        outcome = run_one(bench, mode, args.out)
        status = "done" if outcome.error is None else "ERROR"
        print(f"   {status} in {outcome.seconds:.1f} s", flush=True)
        outcomes.append(outcome)
    plot_dir = report_path.parent if report_path is not None else args.out
    made, plot_errors = make_plots(mode, outcomes, args.out, plot_dir)
    outcomes += plot_errors
    run = report.Run(
        mode=mode,
        started=started,
        seconds=time.perf_counter() - start,
        machine=machine,
        outcomes=outcomes,
        conditions=report.conditions(cpu_before, report.cpu_sample()),
        plots={title: os.path.relpath(path, plot_dir) for title, path in made.items()},
    )
    report.write(run, args.out, report_path)
    print()
    print(report.console(run))
    print()
    print(f"Results: {args.out / 'results.json'}")
    for path in made.values():
        print(f"Plot:    {path}")
    print(f"Report:  {report_path if report_path is not None else '(not written with --only)'}")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
