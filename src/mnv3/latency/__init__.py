"""Latency on real runtimes: runtimes behind one interface, the measurement protocol, and the
per-block lookup tables with the calibrated predictor built on them (mnv3.latency.lut)."""

from mnv3.latency.protocol import (
    MIN_RUNS,
    DriftGuard,
    Timing,
    measure,
    measure_all,
    measure_ratio,
    measure_relative,
    measure_side_by_side,
    summarize,
)
from mnv3.latency.runtimes import (
    RUNTIMES,
    Environment,
    LatencyError,
    Runtime,
    RuntimeUnavailable,
    check_threads,
    get_runtime,
)

__all__ = [
    "MIN_RUNS",
    "RUNTIMES",
    "DriftGuard",
    "Environment",
    "LatencyError",
    "Runtime",
    "RuntimeUnavailable",
    "Timing",
    "check_threads",
    "get_runtime",
    "measure",
    "measure_all",
    "measure_ratio",
    "measure_relative",
    "measure_side_by_side",
    "summarize",
]
