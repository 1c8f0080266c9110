"""Machine description and the three renderings of a run: console, REPORT.md, results.json."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.registry import Mode, Outcome, Result

BUSY_WARNING = 0.10  # share of the machine used by others (or stolen) that makes figures suspect

HEADINGS = ("Benchmark", "Measure", "Figure", "Target", "Met?", "Notes")


@dataclass(frozen=True, slots=True)
class Run:
    mode: Mode
    started: datetime  # UTC
    seconds: float
    machine: dict[str, str]
    outcomes: list[Outcome]
    conditions: dict[str, str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)  # title -> PNG path, relative to the report

    @property
    def missed(self) -> list[tuple[str, Result]]:
        return [(o.benchmark, r) for o in self.outcomes for r in o.results if r.met is False]

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, Python and the libraries the figures depend on."""
    info = {
        "CPU": _cpu_model(),
        "Cores": str(os.cpu_count() or "?"),
        "Memory": _memory(),
        "OS": f"{platform.system()} {platform.release()} {platform.machine()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite (stdlib sqlite3)": sqlite3.sqlite_version,
    }
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if usable is not None and str(usable) != info["Cores"]:
        info["Cores"] += f" ({usable} usable by this process)"
    for package in ("lz4", "fastcrc"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    try:
        load = os.getloadavg()
        info["Load average at start (1/5/15 min)"] = " ".join(f"{x:.2f}" for x in load)
    except OSError:
        pass
    return info


@dataclass(frozen=True, slots=True)
class CpuSample:
    """System-wide CPU ticks (/proc/stat) and the CPU time of this process and the
    children it has waited for (a benchmark's writers and daemons are its own load)."""

    ticks: tuple[int, ...]  # user nice system idle iowait irq softirq steal
    own_seconds: float
    wall: float


def cpu_sample() -> CpuSample | None:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu" or len(first) < 9:
        return None
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return CpuSample(tuple(int(x) for x in first[1:9]), own, time.perf_counter())


def conditions(before: CpuSample | None, after: CpuSample | None) -> dict[str, str]:
    """What else the machine was doing during the run: figures on a shared VM move with it."""
    if before is None or after is None:
        return {}
    delta = [b - a for a, b in zip(before.ticks, after.ticks, strict=True)]
    total = sum(delta)
    if total <= 0:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    idle, iowait, steal = delta[3], delta[4], delta[7]
    busy_seconds = (total - idle - iowait - steal) / hz
    others = max(0.0, busy_seconds - (after.own_seconds - before.own_seconds))
    capacity = (after.wall - before.wall) * (os.cpu_count() or 1)
    share = others / capacity if capacity > 0 else 0.0
    result = {
        "CPU steal during the run": f"{steal / total:.1%}",
        "CPU used by other processes during the run": (
            f"{share:.0%} of the machine" if capacity > 0 else "unknown"
        ),
    }
    if share >= BUSY_WARNING or steal / total >= BUSY_WARNING:
        result["Warning"] = (
            f"other processes used {share:.0%} of the machine and steal was {steal / total:.1%} "
            "during the run, so throughput figures are probably lower than on an idle machine; "
            "run again when it is quiet"
        )
    return result


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _memory() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
            return f"{kib / (1 << 20):.1f} GiB"
    return "unknown"


def _rows(run: Run) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for outcome in run.outcomes:
        if outcome.error is not None:
            rows.append(
                (outcome.benchmark, "(did not finish)", "ERROR", "", "ERROR", outcome.error)
            )
            continue
        for r in outcome.results:
            target = r.target.describe(r.unit) if r.target is not None else ""
            met = {True: "yes", False: "MISSED", None: "info"}[r.met]
            rows.append((outcome.benchmark, r.name, r.figure(), target, met, r.notes))
    return rows


def _summary(run: Run) -> list[str]:
    targets = [r for o in run.outcomes for r in o.results if r.target is not None]
    lines = [f"{len(targets) - len(run.missed)} of {len(targets)} targets met."]
    for name, r in run.missed:
        assert r.target is not None
        lines.append(f"MISSED: {name} / {r.name}: {r.figure()}, target {r.target.describe(r.unit)}")
    for o in run.errors:
        lines.append(f"ERROR: {o.benchmark} did not finish: {o.error}")
    if "Warning" in run.conditions:
        lines.append(f"WARNING: {run.conditions['Warning']}.")
    return lines


def console(run: Run) -> str:
    rows = [HEADINGS[:5], *(row[:5] for row in _rows(run))]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [(row[0], row[1], row[5]) for row in _rows(run) if row[5]]
    if notes:
        lines += ["", "Notes:"]
        lines += [f"  {bench} / {measure}: {note}" for bench, measure, note in notes]
    lines += ["", f"Mode {run.mode}, {run.seconds:.1f} s."]
    lines += [
        f"{key}: {value}"
        for key, value in (run.machine | run.conditions).items()
        if key != "Warning"  # printed with the summary
    ]
    lines += ["", *_summary(run)]
    return "\n".join(lines)


def markdown(run: Run) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Benchmark report",
        "",
        "Generated by `make bench` (`python -m bench`); do not edit by hand. "
        "Targets are goals, not tests: a missed target is reported here and the run still "
        "succeeds. MB/s means 10^6 bytes of page data per second; MiB is 2^20 bytes.",
        "",
        f"- Mode: {run.mode}",
        f"- Date: {run.started.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        f"- Duration: {run.seconds:.1f} s",
    ]
    lines += [
        f"- {key}: {value}"
        for key, value in (run.machine | run.conditions).items()
        if key != "Warning"  # printed with the summary
    ]
    lines += [
        "",
        "| " + " | ".join(HEADINGS) + " |",
        "|" + "|".join("---" for _ in HEADINGS) + "|",
    ]
    for row in _rows(run):
        shown = list(row)
        if shown[4] in ("MISSED", "ERROR"):
            shown[4] = f"**{shown[4]}**"
        lines.append("| " + " | ".join(cell(c) for c in shown) + " |")
    lines += ["", *(f"{line}  " for line in _summary(run))]
    if run.plots:
        lines += ["", "## Plots", ""]
        for title, path in run.plots.items():
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


def as_json(run: Run) -> dict[str, Any]:
    return {
        "mode": run.mode,
        "started_utc": run.started.isoformat(timespec="seconds"),
        "seconds": round(run.seconds, 3),
        "machine": run.machine,
        "conditions": run.conditions,
        "benchmarks": [
            {
                "name": o.benchmark,
                "seconds": round(o.seconds, 3),
                "error": o.error,
                "results": [
                    {
                        "name": r.name,
                        "value": r.value,
                        "unit": r.unit,
                        "target": None
                        if r.target is None
                        else {"threshold": r.target.threshold, "direction": r.target.direction},
                        "met": r.met,
                        "notes": r.notes,
                    }
                    for r in o.results
                ],
            }
            for o in run.outcomes
        ],
        "missed": [f"{name} / {r.name}" for name, r in run.missed],
        "plots": run.plots,
    }


def write(run: Run, out_dir: Path, report_path: Path | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(as_json(run), indent=2) + "\n")
    if report_path is not None:
        report_path.write_text(markdown(run))
