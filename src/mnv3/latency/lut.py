"""Per-block latency lookup tables for a search space, and the predictor built on them.

Every part a network of the space can contain (stem, each block configuration at its input size,
head with pooling and classifier) is measured alone on the runtime; a network's prediction is the
sum of its parts, passed through a linear calibration fitted on end-to-end measurements of random
networks from the same space (the sum misses what joins the parts: memory traffic between them,
per-inference overhead, which every part measured alone pays once).

Every measurement is relative, because the speed of a VM or a phone drifts by tens of percent from
one minute to the next: entries are timed in alternation with one reference part and stored in the
units of that part's own entry (taken when the table was started); end-to-end networks alternate
with a reference network that is itself timed against the reference part. Table, calibration and
validation so share one machine speed, however far apart they ran. And since the relative speed of
different kinds of layers moves too, nothing is timed in one go: entries in three passes over the
space, networks round-robin (`build_table`, `_measure_networks`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mnv3.arch import ArchSpec
from mnv3.latency.protocol import (
    BURST_MS,
    MIN_RUNS,
    DriftGuard,
    Timing,
    interleaved_ratios,
    measure,
    measure_all,
    measure_relative,
    pool,
)
from mnv3.latency.runtimes import Environment, LatencyError, LiteRtRuntime, OnnxRuntime, Runtime, export_onnx
from mnv3.latency.table import DEFAULT_URL, LatencyTable
from mnv3.latency.tflite_writer import block_tflite, head_tflite, stem_tflite
from mnv3.nn.layers import ConvBNAct, InvertedResidual, activation
from mnv3.space import BlockEntry, SearchSpace

NUM_CLASSES = 1000


class Head(nn.Module):
    """Last 1x1 conv, global pool, pre-logits and classifier: the network after its last block."""

    def __init__(self, spec: ArchSpec, cin: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        h = spec.head
        self.last_conv = ConvBNAct(cin, h.last_conv, 1, act=h.activation, eps=spec.bn_eps)
        self.pre = nn.Sequential(nn.Linear(h.last_conv, h.pre_logits), activation(h.activation)) \
            if h.pre_logits else nn.Identity()
        self.classifier = nn.Linear(h.pre_logits or h.last_conv, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pre(self.last_conv(x).mean((2, 3))))


@dataclass(frozen=True)
class Part:
    """One measurable piece of a network: its table key, a module and its input shape."""

    key: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    tflite: Callable[[], bytes]         # the same part written directly as a TFLite graph


def _size_after(size: int, stride: int) -> int:
    return -(-size // stride)


def network_parts(spec: ArchSpec, batch: int = 1, num_classes: int = NUM_CLASSES) -> list[Part]:
    """The parts of `spec` in order: stem, blocks, head (with a `num_classes` classifier; the
    search's tables use ImageNet's 1000, NetAdapt the model's own)."""
    same = spec.padding == "same"
    stem = spec.stem
    res = spec.resolution
    parts = [Part(f"stem:r{res}:o{stem.out}:k{stem.kernel}:st{stem.stride}:{stem.activation}:{spec.padding}",
                  lambda: ConvBNAct(spec.in_channels, stem.out, stem.kernel, stem.stride, act=stem.activation,
                                    same=same, eps=spec.bn_eps),
                  (batch, spec.in_channels, res, res), lambda: stem_tflite(spec))]
    size = _size_after(res, stem.stride)
    for cin, block in zip(spec.block_inputs(), spec.blocks):
        entry = BlockEntry(size, cin, block)
        parts.append(Part(entry.key() + f":{spec.padding}:{spec.se_gate}",
                          lambda cin=cin, block=block: InvertedResidual(cin, block, same=same, se_gate=spec.se_gate,
                                                                        eps=spec.bn_eps),
                          (batch, cin, size, size),
                          lambda cin=cin, size=size, block=block: block_tflite(cin, size, block, spec.se_gate)))
        size = _size_after(size, block.stride)
    cin, h = spec.blocks[-1].out, spec.head
    parts.append(Part(f"head:s{size}:i{cin}:l{h.last_conv}:p{h.pre_logits}:{h.activation}:n{num_classes}",
                      lambda: Head(spec, cin, num_classes), (batch, cin, size, size),
                      lambda: head_tflite(spec, cin, size, num_classes)))
    return parts


def space_parts(space: SearchSpace, batch: int = 1) -> list[Part]:
    """Every distinct part any network of the space contains."""
    seed = space.seed
    parts = {p.key: p for p in network_parts(seed, batch)[:1]}            # the stem is fixed
    for entry in space.block_entries():
        part = Part(entry.key() + f":{seed.padding}:{seed.se_gate}",
                    lambda e=entry: InvertedResidual(e.cin, e.block, same=seed.padding == "same",
                                                     se_gate=seed.se_gate, eps=seed.bn_eps),
                    (batch, entry.cin, entry.input_size, entry.input_size),
                    lambda e=entry: block_tflite(e.cin, e.input_size, e.block, seed.se_gate))
        parts.setdefault(part.key, part)
    for width in space.last_widths():      # one head per width of the last stage
        last = dataclasses.replace(seed.blocks[-1], out=width)
        probe = seed.replace(blocks=seed.blocks[:-1] + (last,), head=space.head_for(width))
        head = network_parts(probe, batch, space.num_classes)[-1]
        parts.setdefault(head.key, head)
    return list(parts.values())


# How entries are timed, part of a table's key so that tables of two protocols never mix their
# entries. "p2" (2026-12): the reference part in bursts of BURST_MS. Before, it ran in bursts of 3
# calls right after each burst of the entry; after a large block had swept the caches its first
# calls were cold, so large blocks read up to 20% fast against it, by how much varying from one
# measurement to the next (a 7x7 block at 112x112 on LiteRT read 17.0, 17.2 and 21.4 ms in three
# measurements; with 10 ms reference bursts its ratio to the reference read 39.0 and 39.3, where
# bursts of 3 read 36.2 and 34.0 and the two timed one after the other 37.3 and 38.6). Such
# entries carried whole networks' predictions past 10%.
TABLE_PROTOCOL = "p2"


def _environment_key(runtime: Runtime, threads: int, batch: int, space: SearchSpace) -> str:
    return f"{runtime.environment(threads, batch, space.seed.resolution).key()}|{TABLE_PROTOCOL}"


def _parse_table_key(key: str) -> tuple[Environment | None, bool]:
    """The environment a table's key names, and whether its entries were timed with this protocol."""
    current = key.endswith("|" + TABLE_PROTOCOL)
    return Environment.from_key(key[:-len(TABLE_PROTOCOL) - 1] if current else key), current


class _Parallel(nn.Module):
    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m, x in zip(self.parts, xs))


def _sessions(runtime: Runtime, parts: list[Part], threads: int,
              store: dict[str, bytes] | None = None) -> list[Callable[[], object]]:
    """Ready sessions for a chunk of parts. ONNX Runtime: one export for the whole chunk, cut into
    one model per part (tracing dominates the cost, so sharing it is what makes tables fast); the
    models are kept in `store` so that later passes over the same parts open them without exporting
    again. LiteRT: each part written directly as a TFLite graph (milliseconds instead of seconds of
    conversion)."""
    if isinstance(runtime, LiteRtRuntime):
        return [runtime.session_from_tflite(p.tflite(), threads) for p in parts]
    if isinstance(runtime, OnnxRuntime):
        store = {} if store is None else store
        new = [p for p in parts if p.key not in store]
        if new:
            store.update(_onnx_models(new))
        return [runtime.session_from_onnx(store[p.key], np.random.default_rng(0).standard_normal(
            p.input_shape).astype(np.float32), threads) for p in parts]
    return [runtime.session(p.make().eval(), threads=threads, input_shape=p.input_shape) for p in parts]


def _onnx_models(parts: list[Part]) -> dict[str, bytes]:
    """One ONNX model per part, cut out of a single export of all of them side by side."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnx.utils import Extractor

    modules = [p.make().eval() for p in parts]
    xs = tuple(torch.randn(*p.input_shape) for p in parts)
    with tempfile.TemporaryDirectory(prefix="mnv3-lut-") as tmp:
        path = Path(tmp) / "chunk.onnx"
        names_in = [f"in{i}" for i in range(len(parts))]
        names_out = [f"out{i}" for i in range(len(parts))]
        export_onnx(_Parallel(modules).eval(), xs, path, input_names=names_in, output_names=names_out)
        extractor = Extractor(onnx.load(str(path)))
    return {p.key: extractor.extract_model([i], [o]).SerializeToString()
            for p, i, o in zip(parts, names_in, names_out)}


PASSES = 3
CHECK_EVERY = 24          # entries between two checks of the drift guard's reference
# An entry at least this share of a typical network of the space (the median sum of parts of random
# networks) gets twice the passes. One such entry can be most of a network (on LiteRT a 7x7 block at
# 112x112 was 88% of one), so its error is the network's; and a large block's time moves by 5-8%
# from one session of it to the next (the same block in five fresh LiteRT sessions on a Xeon), so
# three passes, three sessions, leave a few percent of luck in it. With the old protocol's fix
# alone, that network was predicted 10.9% high and 39 of 40 stayed within ±10%.
HEAVY_SHARE = 0.2


def heavy_threshold(space: SearchSpace, entries: dict[str, Timing], batch: int = 1) -> float:
    """HEAVY_SHARE of a typical network's sum of parts (the median over 64 random networks), in ms."""
    rng = random.Random(0)
    sums = sorted(_sum_of_parts(space.sample(rng), entries, batch, space.num_classes) for _ in range(64))
    return HEAVY_SHARE * sums[len(sums) // 2]


def heavy_parts(space: SearchSpace, parts: list[Part], entries: dict[str, Timing], batch: int = 1) -> list[Part]:
    """The parts whose entry is at least `heavy_threshold`."""
    limit = heavy_threshold(space, entries, batch)
    return [p for p in parts if p.key in entries and entries[p.key].median_ms >= limit]


def build_table(space: SearchSpace, runtime: Runtime, table: LatencyTable, *, threads: int = 1,
                batch: int = 1, chunk: int = 48, runs: int = MIN_RUNS, passes: int = PASSES,
                calibration_networks: int = 12, progress: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Measure every missing part of the space (resuming from what the table holds), then fit the
    calibration on end-to-end measurements. Returns a summary.

    The `runs` of each entry are taken in `passes` passes over the whole space, each in its own
    random order, and pooled (`protocol.pool`). On a shared machine the relative speed of different
    kinds of layers moves from minute to minute (on this VM a 7x7 depthwise block at 112x112 against
    a 3x3 one at 14x14 by ±13% between one-minute windows), so an entry timed in one go carries the
    state of that minute; three passes minutes apart average it out, for the same number of runs.
    Then the heavy entries (`heavy_parts`) get as many passes again, with as many runs again. Every
    pass is committed as it goes: a resumed build continues with the entries that have fewer runs
    than their pass needs."""
    from tqdm import tqdm

    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= runs // 3:
        raise LatencyError(f"passes: {passes!r}; use 1 to {runs // 3} (each pass times at least 3 runs)")
    env = _environment_key(runtime, threads, batch, space)
    parts = space_parts(space, batch)
    ref_part = _reference_part(space, batch)
    have = table.get(env, [p.key for p in parts])
    per_pass = -(-runs // passes)

    def short(p: Part, n: int) -> bool:          # needs more runs to finish pass n (of 2 x passes for heavy ones)
        return ref_part.key != p.key and (p.key not in have or have[p.key].runs < min(n * per_pass, runs * (
            1 if n <= passes else 2)))

    left = {n: [p for p in parts if short(p, n)] for n in range(1, passes + 1)}
    # the heavy entries are known once every entry has its first pass; until then they count as not done
    heavy = heavy_parts(space, parts, have, batch) if not left[1] else None
    extra = [p for p in heavy if short(p, 2 * passes)] if heavy is not None else []
    measured = len(left[passes]) + (ref_part.key not in have) + len({p.key for p in extra} - {
        p.key for p in left[passes]})
    where = f"space {space.key()} on {env}"
    if not have:
        log(f"fresh table: {len(parts)} entries to measure in {passes} passes, the heaviest in {2 * passes} ({where})")
    elif measured or heavy is None:
        log(f"resuming: {len(parts) - measured} of {len(parts)} entries complete, {measured} to measure "
            f"({where})")
    else:
        log(f"complete: all {len(parts)} entries are in the table ({where})")
    work = sum(len(v) for v in left.values()) + sum(
        len([p for p in extra if short(p, n)]) for n in range(passes + 1, 2 * passes + 1))
    state: dict = {}

    def setup() -> None:
        """The reference part's session, the table's units and the drift guard, once there is work."""
        if state:
            return
        # Every entry is timed in alternation with one reference part and stored in the units of that
        # part's latency when the table was started (its own entry), so entries measured minutes or
        # sessions apart share one machine speed: on a drifting machine absolute medians of the same
        # part move by 25% or more, ratios by a few percent.
        state["reference"] = _sessions(runtime, [ref_part], threads)[0]
        if ref_part.key not in have:
            # The first machine to store it fixes the units; one that raced it adopts them.
            table.put(env, [(ref_part.key, measure(state["reference"], runs))], replace=False)
            have[ref_part.key] = table.get(env, [ref_part.key])[ref_part.key]
        state["unit_ms"] = have[ref_part.key].median_ms
        state["guard"] = DriftGuard(state["reference"], runs=runs)

    if work or ref_part.key not in have:
        setup()
    # The ETA is the average rate over the entries reported so far (smoothing=0), not tqdm's moving
    # average of the latest updates: measure_all reports a group of CHECK_EVERY entries at once, after
    # the group's drift check, and the first update, counted alone, carried the setup, the first
    # chunk's export and a whole group's time (a fresh 255-entry build showed 1/255 [00:04<18:08] and
    # took 7 s). So the bar starts after the setup above (the reference part's entry, the drift
    # guard's baseline), moves a whole group at a time (miniters=1: every group shows) and shows no
    # ETA before the first group. In the first pass the rate includes the chunks' exports, which the
    # later passes reuse: the ETA errs high there and settles as the passes go.
    bar = tqdm(total=work, unit="entry", desc="lut build", disable=not progress, file=sys.stderr,
               smoothing=0, miniters=1)

    def on_result(size: int) -> Callable[[int, Timing], None]:
        def reported(i: int, timing: Timing) -> None:       # a whole group, at its last entry
            if (i + 1) % CHECK_EVERY == 0 or i + 1 == size:
                bar.update(i % CHECK_EVERY + 1)
        return reported

    store: dict[str, bytes] = {}

    def run_pass(n: int, candidates: list[Part]) -> None:
        todo = [p for p in candidates if short(p, n)]    # again: the pass before may have been cut short
        random.Random(n).shuffle(todo)      # every kind of entry spread over the pass
        for start in range(0, len(todo), chunk):
            group = todo[start:start + chunk]
            sessions = _sessions(runtime, group, threads, store)
            # The reference is re-checked every 24 entries; a drifted group is measured once more,
            # then the baseline moves (on a noisy machine, repeating until quiet would never end).
            timings = measure_all(sessions, state["guard"], runs=runs, check_every=CHECK_EVERY, max_repeats=1,
                                  on_result=on_result(len(group)),
                                  timer=lambda fn: measure_relative(fn, state["reference"], state["unit_ms"],
                                                                    per_pass, minimum=per_pass,
                                                                    reference_burst_ms=BURST_MS))
            pooled = [(p.key, pool(have.get(p.key), t)) for p, t in zip(group, timings)]
            table.put(env, pooled)           # committed: resumable
            have.update(pooled)

    for n in range(1, passes + 1):
        run_pass(n, parts)
    if heavy is None:           # the first passes just finished: now the heavy entries are known
        heavy = heavy_parts(space, parts, have, batch)
        extra = [p for p in heavy if short(p, 2 * passes)]
        bar.total += len(extra) * passes
        bar.refresh()
        measured += len({p.key for p in extra} - {p.key for p in left[passes]})
    if extra:
        setup()
        for n in range(passes + 1, 2 * passes + 1):
            run_pass(n, extra)
    bar.close()
    calibration = table.calibration(env, space.key())
    if calibration is None or measured or calibration.get("burst_ms") != BURST_MS:    # or an older protocol's
        calibration = calibrate(space, runtime, table, threads=threads, batch=batch,
                                n=calibration_networks, runs=runs, progress=progress)
    return {"env": env, "entries": len(parts), "measured": measured, "passes": passes, "heavy": len(heavy),
            "calibration": calibration, "drifts": state["guard"].drifts if state else 0}


def _sum_of_parts(spec: ArchSpec, entries: dict[str, Timing], batch: int, num_classes: int = NUM_CLASSES) -> float:
    return sum(_split_sum(spec, entries, batch, num_classes, float("inf")))


def _entries_of(spec: ArchSpec, entries: dict[str, Timing], batch: int, num_classes: int
                ) -> list[tuple[Part, float]]:
    """The network's parts in order, each with its entry's median."""
    parts = network_parts(spec, batch, num_classes)
    missing = [p.key for p in parts if p.key not in entries]
    if missing:
        raise LatencyError(f"{len(missing)} part(s) of {spec.name} are not in the table, e.g. {missing[0]}; "
                           "build the table for the space this network comes from (mnv3 lut build)")
    return [(p, entries[p.key].median_ms) for p in parts]


def _split_sum(spec: ArchSpec, entries: dict[str, Timing], batch: int, num_classes: int,
               heavy_ms: float) -> tuple[float, float]:
    """The network's sum of parts as (the entries of heavy_ms or more, the others)."""
    ms = [m for _, m in _entries_of(spec, entries, batch, num_classes)]
    heavy = sum(m for m in ms if m >= heavy_ms)
    return heavy, sum(ms) - heavy


# The terms of the per-stage calibration model: the stem and head together ("ends"), and the blocks
# by the stride of their input from the image (2: the stem's output, 4, 8, and 16 with all beyond).
STAGE_TERMS = ("ends", "s2", "s4", "s8", "s16")


def _stage_sums(spec: ArchSpec, entries: dict[str, Timing], batch: int, num_classes: int) -> dict[str, float]:
    """The network's sum of parts split by `STAGE_TERMS`."""
    got = _entries_of(spec, entries, batch, num_classes)
    sums = dict.fromkeys(STAGE_TERMS, 0.0)
    for i, (part, ms) in enumerate(got):
        if i in (0, len(got) - 1):
            sums["ends"] += ms
            continue
        stride = spec.resolution / part.input_shape[-1]
        sums[f"s{2 ** min(4, max(1, round(math.log2(stride))))}"] += ms
    return sums


def _reference_network(space: SearchSpace) -> ArchSpec:
    """The fixed network of the space that end-to-end measurements are timed against."""
    return space.sample(random.Random(0))


def _reference_part(space: SearchSpace, batch: int) -> Part:
    """The part every table entry is timed against: the middle block of the reference network (a
    part of the space, mid-sized, so that neither call overhead nor one cache level dominates it)."""
    spec = _reference_network(space)
    return network_parts(spec, batch)[1 + len(spec.blocks) // 2]


# Networks measured side by side in one interleaved run (`_measure_networks`): all of them are open
# at once, so memory grows with the group.
NETWORK_GROUP = 48
# Sessions of the reference network that end-to-end measurements take turns with, one per round. Two
# sessions of one network run at speeds a few percent apart, for as long as they live (on ONNX
# Runtime, one of four sessions of a V3-Large-space network 2.5% slower than the others, in two
# measurements; on LiteRT, one block 5-8% apart between sessions). Every end-to-end latency is a
# ratio to the reference network, so one session's luck moved all of a validation run's networks
# alike against its calibration's: 40 networks on ONNX Runtime came out 3.4% above their
# predictions on average, two of them past +10%. Taking turns averages the luck of several sessions.
# Three sessions of each measured network as well, taken in turns the same way (in groups of 24 to
# bound memory), were tried and left out: the validation networks' scatter about their predictions
# did not shrink (standard deviation 3.5% on LiteRT, 3.6% on ONNX Runtime, against about 3% in the
# runs before), and what made networks miss was the whole run's shift against its calibration
# (-1.9% on LiteRT, +3.5% on ONNX Runtime).
REFERENCE_SESSIONS = 3


class _Rotation:
    """Several sessions of one network, called as one: `advance()` moves to the next (each round of
    an interleaved run, so that every session is timed in bursts as long as one session's)."""

    def __init__(self, sessions: list[Callable[[], object]]) -> None:
        self.sessions, self.turn = sessions, 0
        for session in sessions:        # each warmed, not only the one the run starts with
            for _ in range(3):
                session()

    def __call__(self) -> object:
        return self.sessions[self.turn]()

    def advance(self) -> None:
        self.turn = (self.turn + 1) % len(self.sessions)


def _measure_networks(specs: list[ArchSpec], runtime: Runtime, threads: int, batch: int, runs: int,
                      progress: bool, desc: str, space: SearchSpace, entries: dict[str, Timing],
                      reference_ms: float | None = None,
                      anchor: tuple[list[ArchSpec], list[float]] | None = None) -> tuple[list[float], float]:
    """End-to-end latency of each network in the table's units. All networks (in groups of
    `NETWORK_GROUP`) are opened first, then timed round-robin, each burst followed by one of the
    space's reference network (`interleaved_ratios`): every network's samples span the whole run, so
    no network carries the state of the one minute it happened to be timed in (on this VM a
    network's ratio to another moves by up to ±7% between one-minute windows). The reference
    network's latency in table units, `reference_ms` unless given, comes from the table's reference
    part timed in the same rounds.

    `anchor` (the calibration's networks and their latencies in table units, `_anchor`) are timed
    in every group too, and the group's reference latency is the median of what they give (each
    anchor's stored latency over its ratio to the reference network now), `reference_ms` unused:
    the reference network alone carries its sessions' luck and its own drift into every network of
    the run. Returns (latencies, reference_ms)."""
    from tqdm import tqdm

    if not specs and reference_ms is not None:
        return [], reference_ms         # nothing to time (and no anchor's time to spend on it)
    part = _reference_part(space, batch)
    if reference_ms is None and anchor is None and part.key not in entries:
        raise LatencyError(f"the table has no entry for its reference part {part.key}; "
                           "run mnv3 lut build for this space first")
    # Twice the protocol's runs: a whole network's ratio to the reference is the ground truth of the
    # calibration and the validation; the conversion (about 30 s a network with litert-torch, kept
    # in the cache afterwards) costs more than the extra runs anyway.
    rounds = -(-2 * runs // 3)
    reference = _Rotation([runtime.session(_reference_network(space), threads=threads, batch=batch)
                           for _ in range(REFERENCE_SESSIONS)])
    anchors, anchor_ms = anchor or ([], [])
    part_session = _sessions(runtime, [part], threads)[0] if reference_ms is None and not anchors else None
    step = max(NETWORK_GROUP - len(anchors), NETWORK_GROUP // 2)
    groups: list[tuple[list[float], float | None]] = []      # (ratios, the group's reference_ms)
    part_ratios: list[float] = []
    for start in range(0, len(specs), step):
        group = anchors + specs[start:start + step]
        sessions = [runtime.session(spec, threads=threads, batch=batch, num_classes=space.num_classes)
                    for spec in tqdm(group, desc=f"{desc}: open", unit="net", disable=not progress,
                                     file=sys.stderr)]
        fns = sessions + ([part_session] if part_session else [])
        with tqdm(total=rounds, desc=f"{desc}: time {len(group)} networks", unit="round",
                  disable=not progress, file=sys.stderr) as bar:
            got = interleaved_ratios(fns, reference, rounds, 3, burst_ms=BURST_MS,
                                     on_round=lambda r: (bar.update(), reference.advance()))
        ratios = [float(np.median(r)) for r in got[:len(group)]]
        scale = float(np.median([m / r for m, r in zip(anchor_ms, ratios)])) if anchors else None
        groups.append((ratios[len(anchors):], scale))
        part_ratios += got[len(group):][0] if part_session else []
        del sessions, fns
    if anchors:
        reference_ms = float(np.median([scale for _, scale in groups]))
    elif reference_ms is None:
        reference_ms = entries[part.key].median_ms / float(np.median(part_ratios))
    return [r * (scale or reference_ms) for ratios, scale in groups for r in ratios], reference_ms


def _anchor(space: SearchSpace, calibration: dict, entries: dict[str, Timing], batch: int
            ) -> tuple[list[ArchSpec], list[float]] | None:
    """The calibration's networks (drawn again from its seed) and their measured latencies, or None
    for a calibration that did not store them or whose networks the space no longer draws."""
    stored = calibration.get("networks") or []
    if "seed" not in calibration or len(stored) != calibration.get("n") or len(stored) < 3:
        return None
    rng = random.Random(calibration["seed"])
    specs = [space.sample(rng) for _ in stored]
    try:
        same = all(abs(_sum_of_parts(s, entries, batch, space.num_classes) - n["sum_ms"]) <= 1e-6 * n["sum_ms"]
                   for s, n in zip(specs, stored))
    except LatencyError:
        return None
    return (specs, [n["measured_ms"] for n in stored]) if same else None


def measure_in_table_units(specs: list[ArchSpec], space: SearchSpace, runtime: Runtime, table: LatencyTable, *,
                           threads: int = 1, batch: int = 1, runs: int = MIN_RUNS,
                           progress: bool = False, anchor: bool = True) -> list[float]:
    """End-to-end latencies of any networks at the space's resolution (a search's best networks,
    a reference such as MobileNetV3-Small 0.75) in the units of the space's table, so that they
    compare with its predictions however the machine's speed has moved since the table was built:
    timed round-robin against the space's reference network beside the calibration's networks (the
    anchor, `_measure_networks`), as validation is. `anchor=False` leaves those out (a calibration
    made minutes ago, in the same run: no drift to correct, and each anchored measurement costs
    their time too)."""
    env = _environment_key(runtime, threads, batch, space)
    entries = table.get(env)
    calibration = table.calibration(env, space.key()) or {}
    timed, _ = _measure_networks(specs, runtime, threads, batch, runs, progress, "measure", space, entries,
                                 calibration.get("reference_ms"),
                                 _anchor(space, calibration, entries, batch) if anchor else None)
    return timed


# Calibration models, simplest first: measured = a * sum_of_parts [+ c * number_of_parts] [+ b]; or
# with the heavy entries' sum and the rest's apart: a_h * heavy + a * rest + b; or one coefficient per
# stage (`STAGE_TERMS`) and b.
STAGE_MODEL = "per-stage sums+b"
CALIBRATION_MODELS = {"a*sum": ("sum",), "a*sum+b": ("sum", "one"), "a*sum+c*parts+b": ("sum", "parts", "one"),
                      "a_h*heavy+a*rest+b": ("heavy", "rest", "one"), STAGE_MODEL: (*STAGE_TERMS, "one")}


def fit_calibration(sums, counts, measured, heavy=None, stages=None) -> dict:
    """Fit each calibration model by least squares on relative error (weights 1/measured: the goal
    is a share of networks within ±10%, so a 10 ms network counts as much as a 100 ms one), score it
    by leave-one-out MAPE over the calibration networks, and keep the best (the simpler one on a
    tie). With few networks the richer models fit noise: on LiteRT, a three-term fit on 24 networks
    (b = -11.5 ms, c = +0.56 ms a part) put 82% of 40 other networks within ±10%, where a*sum,
    scored leave-one-out on those 40, put 92% there.

    `heavy` (each network's sum over its heavy entries, `heavy_threshold`) offers the fourth model,
    with one coefficient for the heavy entries and one for the rest: on LiteRT a network's measured
    time falls short of its sum of parts the more one 7x7 block at 112x112 dominates it (measured /
    sum against the largest entry's share: correlation -0.76, 64 networks on an AMX Xeon), and
    one slope cannot serve both the networks that are mostly one block and those that are not.
    There it scored 2.0% leave-one-out on 24 networks against a*sum+b's 2.7%; on ONNX Runtime it
    tied (2.4%), and the simpler model stays.

    `stages` (each network's `_stage_sums`) offers the fifth, one coefficient per stage: a block
    runs faster inside a network than alone by how much of its input and weights the previous block
    left in the caches, which depends on the feature map's size. On the 64 networks of the AMX Xeon
    (24 calibration + 40 validation), fitted on 24 random ones and tested on the other 40, 300
    times: all 40 within ±10% in 42% of the draws on LiteRT (a*sum+b 15%, heavy/rest 15%) and 71%
    on ONNX Runtime (a*sum+b 38%)."""
    sums, counts, measured = (np.asarray(v, dtype=float) for v in (sums, counts, measured))
    columns = {"sum": sums, "parts": counts, "one": np.ones_like(sums)}
    if heavy is not None:
        columns["heavy"] = np.asarray(heavy, dtype=float)
        columns["rest"] = sums - columns["heavy"]
    if stages is not None:
        columns.update({t: np.array([s[t] for s in stages], dtype=float) for t in STAGE_TERMS})
    weights = 1.0 / measured

    def solve(names, rows):
        x = np.stack([columns[c][rows] for c in names], axis=1) * weights[rows, None]
        return np.linalg.lstsq(x, measured[rows] * weights[rows], rcond=None)[0]

    def predict(names, coef, i):
        return sum(k * columns[c][i] for k, c in zip(coef, names))

    n, best = len(sums), None
    everyone = np.arange(n)
    for model, names in CALIBRATION_MODELS.items():
        if n < len(names) + 2 or any(c not in columns or (c != "one" and np.ptp(columns[c]) == 0) for c in names):
            continue        # too few networks to score it, no such sums given, or every network the same in a term
        loo = [abs(predict(names, solve(names, everyone[everyone != i]), i) / measured[i] - 1) for i in everyone]
        score = float(np.mean(loo))
        if best is None or score < best[0] - 1e-9:
            best = (score, model, names)
    score, model, names = best if best else (None, "a*sum", CALIBRATION_MODELS["a*sum"])
    coef = {c: float(k) for c, k in zip(names, solve(names, everyone))}
    return {"model": model, "a": coef.get("sum", coef.get("rest", 0.0)), "b": coef.get("one", 0.0),
            "c": coef.get("parts", 0.0), **({"a_heavy": coef["heavy"]} if "heavy" in coef else {}),
            "coef": coef, "loo_mape": score}


def calibration_formula(cal: dict) -> str:
    """The fitted model in words, e.g. "0.940 x sum + 1.880 ms"."""
    if cal.get("model") == STAGE_MODEL:
        names = {"ends": "stem and head", "s2": "blocks at 1/2", "s4": "at 1/4", "s8": "at 1/8", "s16": "beyond"}
        return " + ".join(f"{cal['coef'][t]:.3f} x {names[t]}" for t in STAGE_TERMS) + f" + {cal['coef']['one']:.3f} ms"
    if "a_heavy" in cal:
        return f"{cal['a_heavy']:.3f} x heavy entries + {cal['a']:.3f} x the rest + {cal['b']:.3f} ms"
    return f"{cal['a']:.3f} x sum + {cal.get('c', 0.0):.3f} x parts + {cal['b']:.3f} ms"


def calibrate(space: SearchSpace, runtime: Runtime, table: LatencyTable, *, threads: int = 1,
              batch: int = 1, n: int = 12, runs: int = MIN_RUNS, seed: int = 1234,
              progress: bool = True) -> dict:
    """Measure `n` random networks of the space end to end, fit measured = a * sum_of_parts
    [+ c * number_of_parts] [+ b] (`fit_calibration`), and store it with the measurements. Each part
    measured alone carries the runtime's per-call overhead once; a whole network pays it once in
    all, which the part count and the constant can absorb. The networks are timed against the
    space's reference network, and that network against the table's reference part, so they come
    out in the table's units; the reference network's latency in those units (`reference_ms`) is
    stored too. Validation (and a search's final measurement) times these networks again beside its
    own and expresses its measurements through them: the machine's drift between table, calibration
    and validation cancels."""
    env = _environment_key(runtime, threads, batch, space)
    entries = table.get(env)
    rng = random.Random(seed)
    specs = [space.sample(rng) for _ in range(n)]
    heavy_ms = heavy_threshold(space, entries, batch)
    split = [_split_sum(s, entries, batch, space.num_classes, heavy_ms) for s in specs]
    sums, heavy = [h + r for h, r in split], [h for h, _ in split]
    stages = [_stage_sums(s, entries, batch, space.num_classes) for s in specs]
    counts = [len(s.blocks) + 2 for s in specs]
    measured, reference_ms = _measure_networks(specs, runtime, threads, batch, runs, progress, "calibrate", space,
                                               entries)
    data = {**fit_calibration(sums, counts, measured, heavy, stages), "n": n, "seed": seed,
            "reference_ms": reference_ms,
            "heavy_ms": heavy_ms,       # the heavy entries' threshold, fixed with the fit
            "burst_ms": BURST_MS,    # the protocol it was timed with (before: bursts of 3 runs)
            "networks": [{"sum_ms": s, "heavy_sum_ms": h, "stage_ms": st, "parts": c, "measured_ms": m}
                         for s, h, st, c, m in zip(sums, heavy, stages, counts, measured)],
            "space": space.to_dict()}        # so that a request for another space can be told what differs
    table.set_calibration(env, space.key(), data)
    return data


_CHOICES = tuple(f.name for f in dataclasses.fields(SearchSpace) if f.name not in ("seed", "num_classes"))


def _space_differences(theirs: SearchSpace, ours: SearchSpace) -> list[str]:
    """How space `theirs` differs from `ours`, resolution aside, in the flags of `mnv3 lut space`."""
    def shape(spec: ArchSpec) -> dict:
        return {k: v for k, v in spec.to_dict().items() if k not in ("name", "resolution")}

    def values(name: str, space: SearchSpace) -> str:
        got = getattr(space, name)
        return " ".join(("on" if v else "off") if name == "se" else f"{v:g}" if isinstance(v, float) else str(v)
                        for v in got)

    diffs = []
    if shape(theirs.seed) != shape(ours.seed):
        diffs.append(f"seed {theirs.seed.name}, not {ours.seed.name}" if theirs.seed.name != ours.seed.name
                     else f"another seed network called {theirs.seed.name}")
    diffs += [f"--{c.replace('_', '-')} {values(c, theirs)}, not {values(c, ours)}" for c in _CHOICES
              if getattr(theirs, c) != getattr(ours, c)]
    if theirs.num_classes != ours.num_classes:
        diffs.append(f"--classes {theirs.num_classes}, not {ours.num_classes}")
    return diffs


class MissingTable(LatencyError):
    """The database holds no table (entries and calibration) for this space on this runtime and
    environment. The message lists the tables it does hold for the runtime, with the flags that
    differ; `describe(space_arg)` puts the caller's --space into the build command it suggests."""

    def __init__(self, url: str, wanted: Environment, space: SearchSpace, tables: list[dict]) -> None:
        self.url, self.wanted, self.space, self.tables = url, wanted, space, tables
        super().__init__(self.describe())

    def build_command(self, space_arg: str) -> str:
        w = self.wanted
        return (f"mnv3 lut build --runtime {w.runtime} --space {space_arg} --resolution {w.resolution}"
                + (f" --threads {w.threads}" if w.threads != 1 else "")
                + (f" --classes {self.space.num_classes}" if self.space.num_classes != 1000 else "")
                + (f" --db {self.url}" if self.url != DEFAULT_URL else ""))

    def describe(self, space_arg: str = "SPACE") -> str:
        w, build = self.wanted, self.build_command(space_arg)
        if not self.tables:
            return f"the table database {self.url} holds no lookup table yet; build one first: {build}"
        envs = [(*_parse_table_key(t["env"]), t) for t in self.tables]
        mine = [(e, current, t) for e, current, t in envs if e is not None and e.runtime == w.runtime]
        if not mine:
            others = sorted({e.runtime for e, _, _ in envs if e is not None})
            held = f" (it holds {', '.join(others)} tables)" if others else ""
            return f"the table database {self.url} has no {w.runtime} table{held}; build one first: {build}"
        mine.sort(key=lambda et: ((et[0].cpu, et[0].cores) != (w.cpu, w.cores),
                                  et[0].runtime_version != w.runtime_version, not et[1], et[0].key()))
        found = [text for e, current, t in mine for text in self._held(e, current, t)]
        shown = "; ".join(found[:4]) + (f"; and {len(found) - 4} more" if len(found) > 4 else "")
        return (f"the table database {self.url} has no {w.runtime} table for this space ({self.space.key()}) "
                f"at --resolution {w.resolution} with --threads {w.threads}, batch {w.batch}, on this "
                f"machine; it holds {'one for ' if len(found) == 1 else 'tables for: '}{shown}; "
                f"or build this one: {build}")

    def _held(self, env: Environment, current: bool, table: dict) -> list[str]:
        """One description per calibrated space of one environment's table, with what to pass."""
        w = self.wanted
        flags = [f"--resolution {env.resolution}"] if env.resolution != w.resolution else []
        flags += [f"--threads {env.threads}"] if env.threads != w.threads else []
        old = "timed with the older protocol (reference bursts of 3 calls, which read large blocks up to 20% fast)"
        notes = [] if current else [old + ", so build it anew"]
        notes += [f"batch {env.batch}"] if env.batch != w.batch else []
        notes += [env.dtype] if env.dtype != w.dtype else []
        if env.runtime_version != w.runtime_version:
            notes.append(f"{env.runtime} {env.runtime_version}, not the installed {w.runtime_version}")
        if (env.cpu, env.cores) != (w.cpu, w.cores):
            notes.append(f"measured on {env.cpu} with {env.cores} cores, and tables are per machine")
        where = f"at --resolution {env.resolution} with --threads {env.threads}" + "".join(f", {n}" for n in notes)
        texts = []
        for key, cal in table["calibrations"].items():
            what, theirs = "the same --space", None
            try:
                theirs = SearchSpace.from_dict(cal["space"])
            except (KeyError, TypeError, ValueError):        # a table calibrated before spaces were stored
                pass
            diffs = _space_differences(theirs, self.space) if theirs else None
            if diffs or (theirs is None and key != self.space.key()):
                more = f", {len(diffs) - 3} more" if diffs and len(diffs) > 3 else ""
                what = f"space {key}" + (f" ({', '.join(diffs[:3])}{more})" if diffs else "")
            passed = (["its --space"] if what != "the same --space" else []) + flags
            texts.append(f"{what} {where}" + (f" (pass {' and '.join(passed)})" if passed and not notes else ""))
        if not table["calibrations"]:
            n = table["entries"]
            texts.append(f"{n} {'entry' if n == 1 else 'entries'} not yet calibrated (a build that stopped or "
                         f"still runs) {where}")
        return texts


class Predictor:
    """Latency of any network of the space: calibrated sum of its table entries."""

    def __init__(self, space: SearchSpace, runtime: Runtime, table: LatencyTable, *, threads: int = 1,
                 batch: int = 1) -> None:
        self.env = _environment_key(runtime, threads, batch, space)
        self.entries = table.get(self.env)
        calibration = table.calibration(self.env, space.key())
        if calibration is None and not {p.key for p in space_parts(space, batch)} <= self.entries.keys():
            # No table for this space here: say which tables there are and what differs (--space,
            # --resolution, --threads, another machine), not just "build one".
            raise MissingTable(table.url, runtime.environment(threads, batch, space.seed.resolution), space,
                               table.tables())
        # Every part is in the table but the build stopped before calibrating: the plain sum.
        self.calibration = calibration or {"a": 1.0, "b": 0.0}
        self.batch, self.num_classes = batch, space.num_classes
        if calibration is not None and calibration.get("burst_ms") != BURST_MS:
            env = runtime.environment(threads, batch, space.seed.resolution)
            print(f"warning: this table's calibration was timed in bursts of 3 runs, which read sub-millisecond "
                  f"networks up to a third slow; run `{MissingTable(table.url, env, space, []).build_command('SPACE')}` "
                  "again to calibrate it anew (its entries are kept)", file=sys.stderr)

    def sum_of_parts(self, spec: ArchSpec) -> float:
        return _sum_of_parts(spec, self.entries, self.batch, self.num_classes)

    def predict(self, spec: ArchSpec) -> float:
        cal = self.calibration
        if cal.get("model") == STAGE_MODEL:
            sums = _stage_sums(spec, self.entries, self.batch, self.num_classes)
            return sum(k * sums.get(term, 1.0) for term, k in cal["coef"].items())     # "one": the constant
        if "a_heavy" in cal:
            heavy, rest = _split_sum(spec, self.entries, self.batch, self.num_classes, cal["heavy_ms"])
            return cal["a_heavy"] * heavy + cal["a"] * rest + cal["b"]
        return cal["a"] * self.sum_of_parts(spec) + cal.get("c", 0.0) * (len(spec.blocks) + 2) + cal["b"]


def validate(space: SearchSpace, runtime: Runtime, table: LatencyTable, *, n: int, threads: int = 1,
             batch: int = 1, runs: int = MIN_RUNS, seed: int = 7, passes: int = 1, progress: bool = True
             ) -> tuple[dict, list[tuple[str, float, float]]]:
    """Measure `n` random networks end to end (other samples than the calibration's) and compare with
    the prediction. Returns the statistics and (name, predicted, measured) per network.

    `passes` > 1 measures them all again that many times, one whole run after the other, and takes
    each network's median: on a shared host one network's reading can move by far more than its
    runs' spread between runs minutes apart (a LiteRT network of the V3-Large space read 128, 103
    and 112 ms in three runs on a 2-core Xeon), as the table's entries do, which is why they are
    timed in passes too. `stats["pass_sd"]` is the standard deviation of a network's reading about
    its median, over networks and passes: how far one run's readings can be trusted here."""
    if n < 1:
        raise LatencyError(f"--n: need at least one network to validate, got {n}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise LatencyError(f"--passes: need 1 or more whole runs, got {passes!r}")
    predictor = Predictor(space, runtime, table, threads=threads, batch=batch)
    if predictor.calibration.get("seed") == seed:
        raise LatencyError(f"--seed {seed} draws the calibration's own networks; validate on others "
                           "(any other seed)")
    rng = random.Random(seed)
    specs = [space.sample(rng) for _ in range(n)]
    predicted = np.array([predictor.predict(s) for s in specs])
    anchor = _anchor(space, predictor.calibration, predictor.entries, batch)
    readings = np.array([_measure_networks(specs, runtime, threads, batch, runs, progress,
                                           "validate" + (f" {k + 1}/{passes}" if passes > 1 else ""), space,
                                           predictor.entries, predictor.calibration.get("reference_ms"), anchor)[0]
                         for k in range(passes)])
    measured = np.median(readings, axis=0)
    err = (predicted - measured) / measured
    stats = {"n": n, "mape": float(np.mean(np.abs(err))), "rmse_ms": float(np.sqrt(np.mean((predicted - measured) ** 2))),
             "within_5": float(np.mean(np.abs(err) <= 0.05)), "within_10": float(np.mean(np.abs(err) <= 0.10)),
             "passes": passes, "pass_sd": float(np.std(readings / measured - 1)) if passes > 1 else None}
    names = [f"{s.name}#{i}" for i, s in enumerate(specs)]
    return stats, list(zip(names, predicted.tolist(), measured.tolist()))


def passes_note(stats: dict, sep: str = "") -> str:
    """What a validation of several passes adds to its line, after `sep` ("" for one pass)."""
    if stats.get("passes", 1) < 2:
        return ""
    return f"{sep}medians of {stats['passes']} runs, a reading moved sd {stats['pass_sd']:.1%} about its median"


def scatter_plot(points: list[tuple[str, float, float]], path, title: str) -> None:
    """Predicted against measured latency, with the ±10% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mnv3.files import atomic_write

    pred = [p for _, p, _ in points]
    meas = [m for _, _, m in points]
    lo, hi = min(pred + meas) * 0.9, max(pred + meas) * 1.1
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="exact")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="tab:green", alpha=0.15,
                    label="±10%")
    ax.scatter(meas, pred, s=14, color="tab:blue")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
