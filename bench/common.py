"""Shared by the bench scripts: where the shared data is, interleaved timing, CSV output."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = Path(__file__).resolve().parent / "results"


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 15, iters: int = 20,
                     warmup: int = 10) -> dict[str, dict[str, float]]:
    """Median / p10 / p90 milliseconds per call of each fn (and the per-round samples). Rounds
    alternate between the fns so that machine noise (other processes, frequency changes) hits all
    of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        # Rotate the order every round: what runs just before a function (and what it left in the
        # caches) must not favour one of them.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            samples[name].append((time.perf_counter() - start) / iters * 1e3)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10)
        out[name] = {"median_ms": statistics.median(values), "p10_ms": q[0], "p90_ms": q[-1],
                     "samples": values}
    return out


def paired_ratio(timings: dict[str, dict], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round: drifts that last longer than a
    round (another process, a frequency change) cancel out of each pair."""
    return statistics.median(x / y for x, y in zip(timings[a]["samples"], timings[b]["samples"]))


def write_csv(name: str, rows: list[dict]) -> Path:
    from mnv3.files import atomic_write_csv

    return atomic_write_csv(RESULTS / name, rows)


def cpu_flags() -> str:
    """The vector instruction sets that decide these timings (AVX2, FMA, AVX-512, VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return platform.processor()
    return " ".join(sorted(f for f in set(flags) if f.startswith(("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma"))))
