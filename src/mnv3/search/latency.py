"""Where the search gets a candidate's latency: the calibrated predictor of a lookup table for the
space and runtime (the default), or an end-to-end measurement of every candidate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mnv3.arch import ArchSpec
from mnv3.latency import LatencyError, get_runtime
from mnv3.latency.protocol import MIN_RUNS, measure
from mnv3.latency.runtimes import Runtime
from mnv3.space import SearchSpace


@dataclass
class PredictedLatency:
    """The table's calibrated predictor; networks outside the space (a reference such as
    MobileNetV3-Small 0.75) are measured end to end in the table's units instead."""

    space: SearchSpace
    runtime: Runtime
    db: str
    threads: int = 1
    name: str = "predicted"
    anchor: bool = True     # measurements timed beside the calibration's networks (False: calibrated just now)
    _predictor: object = field(default=None, repr=False)
    _measured: dict = field(default_factory=dict, repr=False)      # networks outside the space, by spec

    def __post_init__(self) -> None:
        from mnv3.latency.lut import Predictor
        from mnv3.latency.table import LatencyTable

        self.table = LatencyTable(self.db)
        self._predictor = Predictor(self.space, self.runtime, self.table, threads=self.threads)

    def covers(self, spec: ArchSpec) -> bool:
        from mnv3.latency.lut import network_parts

        return all(p.key in self._predictor.entries for p in network_parts(spec, num_classes=self.space.num_classes))

    def ms(self, spec: ArchSpec) -> float:
        if self.covers(spec):
            return float(self._predictor.predict(spec))
        self.prefetch([spec])
        return self._measured[spec.to_json(None)]

    def prefetch(self, specs: list[ArchSpec]) -> None:
        """Measure, in one run, those of `specs` outside the space that are not measured yet, so
        that `ms` of each is at hand (each run times the calibration's networks beside its own)."""
        todo = {spec.to_json(None): spec for spec in specs if not self.covers(spec)}
        todo = [spec for key, spec in todo.items() if key not in self._measured]
        if todo:
            self._measured.update((spec.to_json(None), ms) for spec, ms in zip(todo, self.measure(todo)))

    def measure(self, specs: list[ArchSpec], progress: bool = False) -> list[float]:
        """End-to-end latencies in the table's units (timed against the table's reference part)."""
        from mnv3.latency.lut import measure_in_table_units

        return measure_in_table_units(specs, self.space, self.runtime, self.table, threads=self.threads,
                                      progress=progress, anchor=self.anchor)

    def describe(self) -> dict:
        return {"latency": self.name, "runtime": self.runtime.name, "db": self.table.url,
                "threads": self.threads, "num_classes": self.space.num_classes,
                "calibration": {k: v for k, v in self._predictor.calibration.items()
                                if k in ("model", "a", "b", "c", "coef", "loo_mape", "n")}}


@dataclass
class MeasuredLatency:
    """Every candidate measured end to end with the protocol (median of at least 50 runs), with a
    `num_classes` classifier."""

    runtime: Runtime
    threads: int = 1
    runs: int = MIN_RUNS
    name: str = "measured"
    num_classes: int = 1000

    def ms(self, spec: ArchSpec) -> float:
        return measure(self.session(spec), runs=self.runs).median_ms

    def session(self, spec: ArchSpec):
        return self.runtime.session(spec, threads=self.threads, num_classes=self.num_classes)

    def prefetch(self, specs: list[ArchSpec]) -> None:
        """Nothing to do ahead: every network is timed when asked for."""

    def measure(self, specs: list[ArchSpec], progress: bool = False) -> list[float]:
        """Several networks timed round-robin in one run (ratios to the first hold under load)."""
        from mnv3.latency.protocol import measure_side_by_side

        if len(specs) == 1:
            return [self.ms(specs[0])]
        sessions = [self.session(s) for s in specs]
        return [t.median_ms for t, _ in measure_side_by_side(sessions, runs=self.runs)]

    def describe(self) -> dict:
        return {"latency": self.name, "runtime": self.runtime.name, "threads": self.threads,
                "num_classes": self.num_classes}


def open_latency(kind: str, space: SearchSpace, runtime: str, *, db: str, threads: int = 1,
                 build: bool = False, progress: bool = True, space_file: Path | None = None):
    """The search's latency source; `build` builds the table (and its calibration) when missing."""
    from mnv3.latency.lut import MissingTable

    rt = get_runtime(runtime)
    if kind == "measure":
        return MeasuredLatency(rt, threads, num_classes=space.num_classes)
    if kind != "predict":
        raise LatencyError(f"--latency: expected predict or measure, got {kind!r}")
    try:
        source = PredictedLatency(space, rt, db, threads)
    except MissingTable as missing:
        if not build:
            raise LatencyError(f"{missing.describe(str(space_file or 'SPACE.json'))}; or pass --build-table "
                               "(or --latency measure)") from None
        from mnv3.latency.lut import build_table
        from mnv3.latency.table import LatencyTable

        print(f"building the latency table for this space on {runtime} (once; later searches reuse it)",
              flush=True)
        build_table(space, rt, LatencyTable(db), threads=threads, progress=progress,
                    log=lambda s: print(s, flush=True))
        # calibrated minutes ago in this run: its networks need no timing again beside every measurement
        source = PredictedLatency(space, rt, db, threads, anchor=False)
    return source
