"""The measurement protocol: warm-up, at least 50 individually timed runs, median with p10/p90; functions
compared with each other timed round-robin in short bursts and compared by their per-round ratios; and
a reference re-measured during long jobs so that measurements taken while the machine drifted
(another process, a frequency change) are repeated."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mnv3.latency.runtimes import LatencyError

MIN_RUNS = 50
DRIFT_TOLERANCE = 0.03
# Whole networks compared round-robin: each burst lasts at least this long. A network's first calls
# after other networks ran find its weights out of the caches; in bursts of 3 calls of a 0.6 ms
# network those calls set the median (measured on a 2-core Xeon, ONNX Runtime, four CIFAR-size
# MobileNetV3-Smalls side by side: +19% to +35% against each timed alone; bursts of 10 ms: within 2%).
BURST_MS = 10.0
MAX_BURST = 200


@dataclass(frozen=True)
class Timing:
    """Statistics of one measured function, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    repeats: int = 0          # how often drift of the reference made us measure it again

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "runs": self.runs, "repeats": self.repeats}


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median and 10th/90th percentiles (linear interpolation between order statistics)."""
    if len(samples_ms) < 2:
        raise LatencyError("at least two timed runs are needed for percentiles")
    ordered = sorted(samples_ms)

    def pct(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return Timing(statistics.median(ordered), pct(0.10), pct(0.90), len(ordered))


def measure(fn: Callable[[], object], runs: int = MIN_RUNS, warmup: int = 10,
            clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `runs` calls of `fn` one by one after `warmup` untimed calls."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < MIN_RUNS:
        raise LatencyError(f"runs: the protocol times at least {MIN_RUNS} runs, got {runs!r}")
    for _ in range(max(0, warmup)):
        fn()
    samples = []
    for _ in range(runs):
        start = clock()
        fn()
        samples.append((clock() - start) * 1e3)
    return summarize(samples)


@dataclass(frozen=True)
class Interleaved:
    """What `interleave` timed: per function, its per-round ratios to the reference and every call's
    time; and every call's time of the reference (milliseconds)."""

    ratios: list[list[float]]
    samples_ms: list[list[float]]
    reference_ms: list[float]


def interleave(fns: Sequence[Callable[[], object]], reference: Callable[[], object], rounds: int,
               burst: int = 3, clock: Callable[[], float] = time.perf_counter, minimum: int = MIN_RUNS,
               on_round: Callable[[int], None] | None = None, warmup: int = 3,
               burst_ms: float = 0.0, reference_burst_ms: float | None = None) -> Interleaved:
    """Time each function in alternation with `reference`. Every round times each function in turn,
    a burst of `burst` calls followed by a burst of the reference, and records the ratio of the two
    bursts' medians: the samples of every function are spread over the whole call, a machine whose
    speed drifts slows both sides of each pair alike, and a slow minute weighs on all functions
    equally instead of on the one measured during it. `minimum` is the number of timed runs each
    function must get; `warmup` untimed calls of each function (each followed by one of the
    reference) come first. With `burst_ms`, a function's bursts (and the reference's) are as many
    calls as last that long, at least `burst` and at most `MAX_BURST`, from its warm time (the
    fastest of three calls in a row after the warm-up): a burst of a short function then outlasts
    its first cold calls (`BURST_MS`). `reference_burst_ms` sets the reference's bursts alone (by
    default `burst_ms`): a lookup table's short reference part, timed in bursts of 3 calls right
    after a block that has swept the caches, reads slow, so large blocks read fast against it."""
    reference_burst_ms = burst_ms if reference_burst_ms is None else reference_burst_ms
    for name, value in (("burst_ms", burst_ms), ("reference_burst_ms", reference_burst_ms)):
        if not math.isfinite(value) or value < 0:
            raise LatencyError(f"{name}: expected a finite number of milliseconds >= 0, got {value!r}")
    if rounds * burst < minimum:
        raise LatencyError(f"rounds x burst: the protocol times at least {minimum} runs, got {rounds * burst}")

    def timed(f: Callable[[], object], out: list[float]) -> float:
        start = clock()
        f()
        out.append((clock() - start) * 1e3)
        return out[-1]

    for fn in fns:
        for _ in range(max(0, warmup)):
            fn()
            reference()

    def length(f: Callable[[], object], ms: float) -> int:
        """Calls in a burst of `f` lasting `ms`, from its warm time: the fastest of three calls in a
        row (the first may be cold, and one call may meet another job)."""
        if ms <= 0:
            return burst
        warm = min(timed(f, []) for _ in range(3))
        return max(burst, min(MAX_BURST, math.ceil(ms / max(warm, 1e-6))))

    bursts, ref_burst = [length(fn, burst_ms) for fn in fns], length(reference, reference_burst_ms)
    ratios: list[list[float]] = [[] for _ in fns]
    samples: list[list[float]] = [[] for _ in fns]
    ref_samples: list[float] = []
    for r in range(rounds):
        for fn, out, mine, n in zip(fns, ratios, samples, bursts):
            a = statistics.median(timed(fn, mine) for _ in range(n))
            b = statistics.median(timed(reference, ref_samples) for _ in range(ref_burst))
            out.append(a / b)
        if on_round:
            on_round(r)
    return Interleaved(ratios, samples, ref_samples)


def interleaved_ratios(fns: Sequence[Callable[[], object]], reference: Callable[[], object], rounds: int,
                       burst: int = 3, clock: Callable[[], float] = time.perf_counter,
                       minimum: int = MIN_RUNS, on_round: Callable[[int], None] | None = None,
                       burst_ms: float = 0.0) -> list[list[float]]:
    """Per-round ratios of each function's time to `reference`'s, timed as `interleave` does."""
    return interleave(fns, reference, rounds, burst, clock, minimum, on_round, burst_ms=burst_ms).ratios


def measure_side_by_side(fns: Sequence[Callable[[], object]], runs: int = MIN_RUNS, burst: int = 3,
                         warmup: int = 10, clock: Callable[[], float] = time.perf_counter,
                         on_round: Callable[[int], None] | None = None,
                         burst_ms: float = BURST_MS) -> list[tuple[Timing, float]]:
    """Several functions compared with the first, timed round-robin (`interleave`, the first as the
    reference): every round, a burst of each other function followed by a burst of the first. Each
    gets its Timing from its own calls (at least `runs`; the first from all of its calls, one burst
    after every other function's) and its ratio to the first: the median of the per-round ratios,
    which holds while another job loads the machine, where a ratio of medians taken one function
    after the other carries whatever load each one happened to meet. The first's ratio is 1.0.
    Bursts last at least `burst_ms` (`interleave`): `runs` is the least number of timed calls."""
    if len(fns) < 2:
        raise LatencyError("side by side: need at least two functions to compare")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < MIN_RUNS:
        raise LatencyError(f"runs: the protocol times at least {MIN_RUNS} runs, got {runs!r}")
    got = interleave(fns[1:], fns[0], -(-runs // burst), burst, clock, runs, on_round, warmup, burst_ms)
    return [(summarize(got.reference_ms), 1.0)] + [
        (summarize(samples), statistics.median(ratios)) for samples, ratios in zip(got.samples_ms, got.ratios)]


def _ratios(fn: Callable[[], object], reference: Callable[[], object], rounds: int, burst: int,
            clock: Callable[[], float], minimum: int = MIN_RUNS, reference_burst_ms: float = 0.0) -> list[float]:
    return interleave([fn], reference, rounds, burst, clock, minimum,
                      reference_burst_ms=reference_burst_ms).ratios[0]


def measure_ratio(fn: Callable[[], object], reference: Callable[[], object], rounds: int = 20,
                  burst: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """`fn`'s time as a multiple of `reference`'s, timed in short alternating bursts (median of
    `burst` calls each) and summarised by the median ratio over `rounds`. On a machine whose speed
    drifts from second to second, this repeats within a few percent where absolute medians move
    by 25% or more: the drift hits both sides of each pair alike."""
    return statistics.median(_ratios(fn, reference, rounds, burst, clock))


def measure_relative(fn: Callable[[], object], reference: Callable[[], object], reference_ms: float,
                     runs: int = MIN_RUNS, burst: int = 3,
                     clock: Callable[[], float] = time.perf_counter, minimum: int = MIN_RUNS,
                     reference_burst_ms: float = 0.0) -> Timing:
    """`fn` timed in alternation with `reference` (as `measure_ratio`) and expressed in the units of
    `reference_ms`, the reference's latency at some fixed moment: every result measured this way
    shares that moment's machine speed, however the machine drifts in between. The percentiles are
    those of the per-round ratios. `minimum` lowers the protocol's 50 runs for one of several
    passes whose results are pooled (`pool`). `reference_burst_ms` lengthens the reference's bursts
    (`interleave`)."""
    ratios = _ratios(fn, reference, -(-runs // burst), burst, clock, minimum, reference_burst_ms)
    t = summarize([r * reference_ms for r in ratios])
    return Timing(t.median_ms, t.p10_ms, t.p90_ms, len(ratios) * burst)


def pool(a: Timing | None, b: Timing) -> Timing:
    """Two measurements of one function taken at different times, as one: their statistics weighted
    by their runs (a median of medians would need the samples, which tables do not keep)."""
    if a is None:
        return b
    n = a.runs + b.runs

    def mix(x: float, y: float) -> float:
        return (x * a.runs + y * b.runs) / n

    return Timing(mix(a.median_ms, b.median_ms), mix(a.p10_ms, b.p10_ms), mix(a.p90_ms, b.p90_ms), n,
                  a.repeats + b.repeats)


@dataclass
class DriftGuard:
    """Re-measures a reference function; `drifted()` says whether its median moved by more than
    `tolerance` from the baseline taken when the guard was made."""

    reference: Callable[[], object]
    tolerance: float = DRIFT_TOLERANCE
    runs: int = MIN_RUNS
    baseline: float = field(init=False)
    checks: int = field(init=False, default=0)
    drifts: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.baseline = measure(self.reference, self.runs).median_ms

    def drifted(self) -> bool:
        self.checks += 1
        now = measure(self.reference, self.runs, warmup=2).median_ms
        moved = abs(now / self.baseline - 1.0) > self.tolerance
        self.drifts += moved
        return moved

    def rebase(self) -> None:
        self.baseline = measure(self.reference, self.runs, warmup=2).median_ms


def measure_all(fns: Sequence[Callable[[], object]], guard: DriftGuard | None = None, *,
                runs: int = MIN_RUNS, check_every: int = 1, max_repeats: int = 3,
                on_result: Callable[[int, Timing], None] | None = None,
                timer: Callable[[Callable[[], object]], Timing] | None = None) -> list[Timing]:
    """Measure each function (with `timer`; `measure` with `runs` by default); after every
    `check_every` of them, re-measure the reference and, if it drifted, measure that group again (at
    most `max_repeats` times, then take a new baseline and go on). `on_result(i, timing)` is called
    as each result becomes final."""
    timer = timer or (lambda fn: measure(fn, runs))
    results: list[Timing] = []
    for start in range(0, len(fns), check_every):
        group = fns[start:start + check_every]
        repeats = 0
        while True:
            timings = [timer(fn) for fn in group]
            if guard is None or not guard.drifted():
                break
            if repeats == max_repeats:
                guard.rebase()      # the machine settled somewhere else: accept and carry on
                break
            repeats += 1
        for offset, timing in enumerate(timings):
            timing = Timing(timing.median_ms, timing.p10_ms, timing.p90_ms, timing.runs, repeats)
            results.append(timing)
            if on_result:
                on_result(start + offset, timing)
    return results
