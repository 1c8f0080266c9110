"""The benchmark registry: what a benchmark is, what it returns, and where it lives.

A benchmark is a function taking a Context and returning a list of Result. It
registers itself with the @benchmark decorator in a module listed in MODULES;
the runner (bench/__main__.py) imports those modules, runs what registered, and
writes the report. A benchmark measures and describes; it never decides the
exit status (a missed target is reported, not raised).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Mode = Literal["quick", "full"]
Direction = Literal[">=", "<="]

# Modules that register benchmarks, in the order they run. Add new ones here
# (tailer overhead, replication lag, proxy, ...).
MODULES: tuple[str, ...] = (
    "bench.ltx_throughput",
    "bench.tailer_overhead",
    "bench.replication",
    "bench.failover",
    "bench.proxy",
)


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for a figure: value >= threshold (throughput) or <= threshold (latency)."""

    threshold: float
    direction: Direction = ">="

    def met_by(self, value: float) -> bool:
        return value >= self.threshold if self.direction == ">=" else value <= self.threshold

    def describe(self, unit: str) -> str:
        return f"{self.direction} {_number(self.threshold)} {unit}".rstrip()


@dataclass(frozen=True, slots=True)
class Result:
    """One measured figure. Without a target it is reported for information only."""

    name: str
    value: float
    unit: str
    target: Target | None = None
    notes: str = ""

    @property
    def met(self) -> bool | None:
        """True or False against the target; None when there is no target."""
        return None if self.target is None else self.target.met_by(self.value)

    def figure(self) -> str:
        return f"{_number(self.value)} {self.unit}".rstrip()


@dataclass(frozen=True, slots=True)
class Context:
    """What the runner gives each benchmark."""

    mode: Mode
    tmp_dir: Path  # a fresh, empty directory, deleted after the benchmark
    out_dir: Path  # bench/out by default: for artefacts worth keeping after the run

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


BenchmarkFn = Callable[[Context], list[Result]]


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    fn: BenchmarkFn
    description: str = ""


_registry: dict[str, Benchmark] = {}


def benchmark(name: str, *, description: str = "") -> Callable[[BenchmarkFn], BenchmarkFn]:
    """Register fn under name (the name --only selects)."""

    def register(fn: BenchmarkFn) -> BenchmarkFn:
        if name in _registry and _registry[name].fn is not fn:
            raise ValueError(f"benchmark {name!r} is registered twice")
        _registry[name] = Benchmark(name, fn, description or (fn.__doc__ or "").strip())
        return fn

    return register


def load(modules: tuple[str, ...] = MODULES) -> dict[str, Benchmark]:
    """Import the benchmark modules and return the registry, in registration order."""
    for module in modules:
        importlib.import_module(module)
    return dict(_registry)


@dataclass(slots=True)
class Outcome:
    """What running one benchmark produced: its results, or the error that stopped it."""

    benchmark: str
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def _number(value: float) -> str:
    """A figure with sensible precision: 1234, 123.4, 1.23, 0.0123."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return f"{value:g}"
    magnitude = abs(value)
    if magnitude >= 1000 or float(value).is_integer():
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"
