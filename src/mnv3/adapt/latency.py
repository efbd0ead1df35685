"""Latency for NetAdapt: any network, not only a point of a search space.

`--latency predict` (the default) is NetAdapt's layer-wise lookup table: the latency of a proposal
is the measured latency of the network it came from plus the change in the sum of its parts' table
entries (stem, blocks, head, as `mnv3.latency.lut` cuts them). Pruned shapes are arbitrary, so no
table built beforehand holds them: every part a proposal needs and the table lacks is measured on
the spot and added to the table, where later steps, later runs and other workers find it. Entries
are timed in alternation with a reference part (the seed network's middle block) and stored in the
units of that part's first measurement, like the search's tables; the environment key names the
reference part, so tables of other references never mix units with these. Each step's chosen
network is then measured end to end (timed round-robin against the seed network itself, a reference
of its own size), and the next step's predictions start from that measurement: the table only has
to get differences right.

`--latency measure` times every candidate network end to end instead (slower, no table needed).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

from mnv3.arch import ArchSpec
from mnv3.latency.lut import TABLE_PROTOCOL, Part, _sessions, network_parts
from mnv3.latency.protocol import BURST_MS, MIN_RUNS, interleaved_ratios, measure, measure_relative
from mnv3.latency.runtimes import LatencyError, Runtime, latency_model
from mnv3.latency.table import LatencyTable

LATENCY_MODES = ("predict", "measure")


class AdaptLatency:
    """Predicted and measured latency of networks at the seed's resolution, in table units (ms)."""

    def __init__(self, runtime: Runtime, seed: ArchSpec, *, db: str, mode: str = "predict", threads: int = 1,
                 batch: int = 1, num_classes: int = 1000, runs: int = MIN_RUNS,
                 log: Callable[[str], None] = print) -> None:
        if mode not in LATENCY_MODES:
            raise LatencyError(f"--latency {mode!r}: choose one of {', '.join(LATENCY_MODES)}")
        self.runtime, self.mode, self.threads, self.batch, self.runs, self.log = runtime, mode, threads, batch, runs, log
        self.table = LatencyTable(db)
        self.num_classes = num_classes       # the model's own classifier is what runs when deployed
        parts = network_parts(seed, batch, num_classes)
        self.ref_part = parts[1 + len(seed.blocks) // 2]
        self.env = (f"{runtime.environment(threads, batch, seed.resolution).key()}|{TABLE_PROTOCOL}"
                    f"|adapt-ref={self.ref_part.key}")
        self.reference = _sessions(runtime, [self.ref_part], threads)[0]
        have = self.table.get(self.env, [self.ref_part.key])
        if self.ref_part.key not in have:
            # The first run to store it fixes the units; one that raced it adopts them.
            self.table.put(self.env, [(self.ref_part.key, measure(self.reference, runs))], replace=False)
            have = self.table.get(self.env, [self.ref_part.key])
        self.unit_ms = have[self.ref_part.key].median_ms
        self.entries = self.table.get(self.env)
        self.added = 0          # parts measured and added to the table by this process

    # -- parts -----------------------------------------------------------------------------------
    def _ensure(self, specs: list[ArchSpec]) -> None:
        """Measure the parts of `specs` the table lacks and add them (one export for all of them)."""
        missing: dict[str, Part] = {}
        for spec in specs:
            for part in network_parts(spec, self.batch, self.num_classes):
                if part.key not in self.entries:
                    missing.setdefault(part.key, part)
        if not missing:
            return
        new = self.table.get(self.env, list(missing))      # another worker may have measured them
        self.entries.update(new)
        todo = [p for k, p in missing.items() if k not in new]
        for start in range(0, len(todo), 48):
            group = todo[start:start + 48]
            sessions = _sessions(self.runtime, group, self.threads)
            timed = [(p.key, measure_relative(fn, self.reference, self.unit_ms, self.runs,
                                              reference_burst_ms=BURST_MS))
                     for p, fn in zip(group, sessions)]
            self.table.put(self.env, timed, replace=False)
            self.entries.update(self.table.get(self.env, [k for k, _ in timed]))
            self.added += len(timed)

    def sum_of_parts(self, spec: ArchSpec) -> float:
        self._ensure([spec])
        return sum(self.entries[p.key].median_ms for p in network_parts(spec, self.batch, self.num_classes))

    # -- networks --------------------------------------------------------------------------------
    def _session(self, spec: ArchSpec) -> Callable[[], object]:
        model = latency_model(spec, self.batch, self.num_classes)
        return self.runtime.session(model, threads=self.threads, batch=self.batch)

    def measure_seed(self, spec: ArchSpec) -> float:
        """The seed network end to end, timed against the reference part, in table units."""
        return measure_relative(self._session(spec), self.reference, self.unit_ms, 2 * self.runs,
                                reference_burst_ms=BURST_MS).median_ms

    def anchor(self, seed: ArchSpec, seed_ms: float) -> None:
        """Time every later network against the seed itself (a reference of its own size: per-round
        ratios between two networks that differ by a few layers spread far less than against one
        block), in the units of the seed's measurement."""
        self.seed_fn, self.seed_ms = self._session(seed), seed_ms

    def measure(self, spec: ArchSpec) -> float:
        """`spec` end to end, in table units: its median per-round ratio to the seed network (see
        `anchor`) times the seed's latency."""
        ratios = interleaved_ratios([self._session(spec)], self.seed_fn, -(-2 * self.runs // 3), 3,
                                    burst_ms=BURST_MS)[0]
        return statistics.median(ratios) * self.seed_ms

    def predictor(self, anchor: ArchSpec, anchor_ms: float) -> Callable[[list[ArchSpec]], list[float]]:
        """Latencies of networks derived from `anchor` (measured at `anchor_ms`): its measurement
        plus the change in the table's sum of parts; with --latency measure, each one end to end."""
        if self.mode == "measure":
            return lambda specs: [self.measure(s) for s in specs]
        base = self.sum_of_parts(anchor)

        def predict(specs: list[ArchSpec]) -> list[float]:
            self._ensure(specs)
            return [anchor_ms + sum(self.entries[p.key].median_ms for p in network_parts(s, self.batch, self.num_classes)) - base
                    for s in specs]
        return predict

    def describe(self) -> str:
        how = ("lookup table (parts measured on demand and added)" if self.mode == "predict"
               else "every candidate measured end to end")
        return f"{self.runtime.name}, {self.threads} thread(s), batch {self.batch}: {how}; table {self.table.url}"


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
