"""Benchmarks for ltx-sidecar: `python -m bench --mode quick|full` (or `make bench`).

Each benchmark module registers functions with @benchmark; see bench/registry.py.
The runner writes bench/REPORT.md (committed) and bench/out/results.json.
"""

from bench.registry import Context, Mode, Result, Target, benchmark

__all__ = ["Context", "Mode", "Result", "Target", "benchmark"]
