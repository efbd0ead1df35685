"""The latency layer: protocol statistics, drift guard, runtimes behind one interface, `mnv3 bench`."""

from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import mnv3
from mnv3.cli import main
from mnv3.complexity import count
from mnv3.latency import (
    MIN_RUNS,
    RUNTIMES,
    DriftGuard,
    Environment,
    LatencyError,
    RuntimeUnavailable,
    Timing,
    check_threads,
    get_runtime,
    measure,
    measure_all,
    protocol,
    summarize,
)
from mnv3.latency.runtimes import export_onnx, latency_model
from mnv3.nn import build

RES = 32


def tiny(arch: str = "mobilenet_v3_small", resolution: int = RES):
    return mnv3.preset(arch, width=0.35, resolution=resolution)


# Numerical comparisons use 96 px: at 32 px the last feature maps are 1x1, latency_model's batch-norm
# statistics come from 2 values per channel, and the network amplifies float rounding (see report).
CMP_RES = 96


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Torch sessions set the process-wide thread count; give the rest of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# protocol: statistics


def test_summarize_1_to_101():
    t = summarize(list(range(101, 0, -1)))        # order does not matter
    assert (t.median_ms, t.p10_ms, t.p90_ms, t.runs, t.repeats) == (51, 11, 91, 101, 0)


def test_summarize_interpolates_and_even_median():
    t = summarize([4.0, 1.0, 3.0, 2.0])
    assert t.median_ms == pytest.approx(2.5)
    assert t.p10_ms == pytest.approx(1.3)         # pos 0.3 between 1 and 2
    assert t.p90_ms == pytest.approx(3.7)         # pos 2.7 between 3 and 4
    assert t.runs == 4
    assert t.as_dict() == {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                           "runs": 4, "repeats": 0}


def test_summarize_needs_two_samples():
    with pytest.raises(LatencyError):
        summarize([1.0])
    with pytest.raises(LatencyError):
        summarize([])


def test_measure_with_fake_clock():
    # run i (1-based) takes i milliseconds; the clock is read exactly twice per timed run.
    ticks = []
    t = 100.0
    for i in range(1, 51):
        ticks += [t, t + i / 1000]
        t += 1.0
    it = iter(ticks)
    calls = []
    timing = measure(lambda: calls.append(1), runs=50, warmup=7, clock=lambda: next(it))
    assert len(calls) == 7 + 50
    assert next(it, None) is None                 # every scripted tick consumed, no more
    assert timing.runs == 50 and timing.repeats == 0
    assert timing.median_ms == pytest.approx(25.5, abs=1e-6)
    assert timing.p10_ms == pytest.approx(5.9, abs=1e-6)      # pos 4.9 between 5 and 6
    assert timing.p90_ms == pytest.approx(45.1, abs=1e-6)     # pos 44.1 between 45 and 46


def test_measure_default_warmup_calls():
    calls = []
    measure(lambda: calls.append(1), runs=60, clock=iter(range(1000)).__next__)
    assert len(calls) == 10 + 60


@pytest.mark.parametrize("runs", [10, 49, 0, -5, 50.0, True, "50"])
def test_measure_refuses_fewer_than_50_runs(runs):
    calls = []
    with pytest.raises(LatencyError, match="50"):
        measure(lambda: calls.append(1), runs=runs)
    assert calls == []                            # refused before running anything
    assert MIN_RUNS == 50


# --------------------------------------------------------------------------------------------------
# protocol: drift guard, deterministic (fake clock injected into every measure() the module makes)


class FakeTime:
    """A clock that only moves when a fake workload 'runs'."""

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def work(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake(monkeypatch):
    ft = FakeTime()
    real = protocol.measure

    def measure_fake(fn, runs=MIN_RUNS, warmup=10):
        return real(fn, runs, warmup, clock=ft.clock)

    monkeypatch.setattr(protocol, "measure", measure_fake)
    return ft


def _guarded_reference(fake: FakeTime, cost_at_check):
    """A reference whose cost (seconds) is `cost_at_check(checks, rebased)`, read from the guard."""
    state = {"guard": None, "rebasing": False}

    def ref():
        g = state["guard"]
        fake.work(cost_at_check(0 if g is None else g.checks, state["rebasing"]))

    return ref, state


def test_drift_threshold_is_3_percent(fake):
    cost = [0.001]
    guard = DriftGuard(lambda: fake.work(cost[0]))
    assert guard.baseline == pytest.approx(1.0)
    assert guard.tolerance == pytest.approx(0.03)
    cost[0] = 0.00102                             # 2% slower: not drift
    assert guard.drifted() is False
    cost[0] = 0.00104                             # 4% slower: drift
    assert guard.drifted() is True
    cost[0] = 0.00096                             # 4% faster: moved too
    assert guard.drifted() is True
    assert (guard.checks, guard.drifts) == (3, 2)
    guard.rebase()
    assert guard.baseline == pytest.approx(0.96)
    assert guard.drifted() is False


def test_transient_drift_repeats_that_group_only(fake):
    # the reference is 2x slower at the first check only
    ref, state = _guarded_reference(fake, lambda checks, _: 0.002 if checks == 1 else 0.001)
    guard = DriftGuard(ref)
    state["guard"] = guard

    measured = {0: 0}

    def first():                                  # 5 ms before any check, 3 ms once re-measured
        measured[0] += 1
        fake.work(0.005 if guard.checks == 0 else 0.003)

    fns = [first, lambda: fake.work(0.002), lambda: fake.work(0.004)]
    seen = []
    timings = measure_all(fns, guard, on_result=lambda i, t: seen.append((i, t)))
    assert [t.repeats for t in timings] == [1, 0, 0]
    assert guard.drifts == 1
    assert guard.checks == 4                      # one per group, plus the one after the repeat
    assert measured[0] == 2 * (10 + 50)           # the first group really was measured twice
    # the repeated measurement is the one reported
    assert [t.median_ms for t in timings] == pytest.approx([3.0, 2.0, 4.0])
    assert all(t.runs == 50 for t in timings)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [t for _, t in seen] == timings
    assert guard.baseline == pytest.approx(1.0)   # transient: no new baseline


def test_persistent_drift_bounded_by_max_repeats_then_rebase(fake):
    # the reference becomes 2x slower for good after the guard was made
    ref, state = _guarded_reference(fake, lambda checks, _: 0.002 if checks >= 1 else 0.001)
    guard = DriftGuard(ref)
    state["guard"] = guard
    assert guard.baseline == pytest.approx(1.0)

    measured = {0: 0}

    def first():
        measured[0] += 1
        fake.work(0.001)

    timings = measure_all([first, lambda: fake.work(0.001)], guard, max_repeats=2)
    assert [t.repeats for t in timings] == [2, 0]
    assert measured[0] == 3 * (10 + 50)           # measured once plus max_repeats times, no more
    assert guard.drifts == 3                      # the third drift triggered the rebase
    assert guard.checks == 4
    assert guard.baseline == pytest.approx(2.0)   # rebased on the new speed: group 2 not repeated


def test_max_repeats_zero_accepts_and_rebases(fake):
    ref, state = _guarded_reference(fake, lambda checks, _: 0.003 if checks >= 1 else 0.001)
    guard = DriftGuard(ref)
    state["guard"] = guard
    timings = measure_all([lambda: fake.work(0.001)] * 3, guard, max_repeats=0)
    assert [t.repeats for t in timings] == [0, 0, 0]
    assert guard.drifts == 1
    assert guard.baseline == pytest.approx(3.0)


def test_stable_reference_never_repeats_and_groups(fake):
    guard = DriftGuard(lambda: fake.work(0.001))
    seen = []
    fns = [lambda k=k: fake.work(0.001 * (k + 1)) for k in range(5)]
    timings = measure_all(fns, guard, check_every=2, on_result=lambda i, t: seen.append(i))
    assert [t.repeats for t in timings] == [0] * 5
    assert [t.median_ms for t in timings] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
    assert guard.checks == 3                      # groups [0,1], [2,3], [4]
    assert guard.drifts == 0
    assert seen == [0, 1, 2, 3, 4]


def test_measure_all_without_guard_and_run_check(fake):
    timings = measure_all([lambda: fake.work(0.002)] * 2, None, runs=60)
    assert [(t.median_ms, t.runs, t.repeats) for t in timings] == [(pytest.approx(2.0), 60, 0)] * 2
    with pytest.raises(LatencyError, match="50"):
        measure_all([lambda: None], None, runs=10)
    with pytest.raises(LatencyError, match="50"):
        DriftGuard(lambda: None, runs=10)


# --------------------------------------------------------------------------------------------------
# protocol: drift guard on the real clock (generous: a 2x slowdown, tolerance 50%)


def test_real_clock_2x_slowdown_is_detected():
    delay = [0.002]
    guard = DriftGuard(lambda: time.sleep(delay[0]), tolerance=0.5)
    assert 1.5 < guard.baseline < 10              # milliseconds; sleep(2 ms) overshoots a little

    def work():
        pass

    def slow_down():                              # the reference gets 2x slower while we measure
        delay[0] = 0.004

    timings = measure_all([slow_down, work], guard, max_repeats=1)
    assert timings[0].repeats == 1
    assert guard.drifts >= 1
    assert guard.baseline > 3                     # rebased at the new, slower speed
    assert timings[1].repeats == 0                # stable again after the rebase


def test_real_clock_stable_reference():
    def busy(seconds=0.0005):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    guard = DriftGuard(busy, tolerance=0.5)
    timings = measure_all([busy, busy, busy], guard)
    assert [t.repeats for t in timings] == [0, 0, 0]
    assert guard.drifts == 0 and guard.checks == 3
    for t in timings:
        assert 0.4 < t.p10_ms <= t.median_ms <= t.p90_ms


# --------------------------------------------------------------------------------------------------
# runtimes


def test_unknown_runtime_lists_the_runtimes():
    with pytest.raises(LatencyError) as info:
        get_runtime("nope")
    assert not isinstance(info.value, RuntimeUnavailable)
    for name in ("torch", "torch-fused", "onnxruntime", "litert"):
        assert name in str(info.value)
    assert set(RUNTIMES) == {"torch", "torch-fused", "onnxruntime", "litert"}


@pytest.mark.parametrize("threads", [0, -1, (os.cpu_count() or 1) + 1, 1.5, True, "1", None])
def test_impossible_threads(threads):
    with pytest.raises(LatencyError, match="impossible"):
        check_threads(threads)


def test_possible_threads():
    assert check_threads(1) == 1
    cores = os.cpu_count() or 1
    assert check_threads(cores) == cores


@pytest.mark.parametrize("name, module, command", [
    ("onnxruntime", "onnxruntime", "pip install onnxruntime"),
    ("litert", "ai_edge_litert", "pip install ai-edge-litert"),
])
def test_missing_package_names_install_command(monkeypatch, name, module, command):
    monkeypatch.setitem(sys.modules, module, None)       # `import module` now raises ImportError
    with pytest.raises(RuntimeUnavailable, match=command) as info:
        get_runtime(name)
    assert isinstance(info.value, LatencyError)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["torch", "torch-fused", "onnxruntime"])
def test_session_runs(name):
    runtime = get_runtime(name)
    assert runtime.name == name
    run = runtime.session(tiny(), threads=1)
    assert callable(run)
    first, second = run(), run()
    out = first if isinstance(first, torch.Tensor) else np.asarray(first[0])
    again = second if isinstance(second, torch.Tensor) else np.asarray(second[0])
    assert tuple(out.shape) == (1, 1000)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))   # fixed input


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_session_refuses_impossible_threads(name):
    with pytest.raises(LatencyError, match="impossible"):
        get_runtime(name).session(tiny(), threads=(os.cpu_count() or 1) + 1)


def test_torch_session_batch_and_plain_module():
    out = get_runtime("torch").session(tiny(), batch=3)()
    assert out.shape == (3, 1000)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(LatencyError, match="resolution"):
        get_runtime("torch").session(conv)             # no spec, no resolution: cannot choose input
    out = get_runtime("torch").session(conv, resolution=8)()
    assert out.shape == (1, 4, 6, 6)


def test_torch_fused_matches_unfused():
    # folding batch norm must not change what the session computes
    torch.manual_seed(0)
    model = latency_model(tiny(resolution=CMP_RES))
    unfused = copy.deepcopy(model)
    run = get_runtime("torch-fused").session(model)
    cells = dict(zip(run.__code__.co_freevars, (c.cell_contents for c in run.__closure__)))
    fused, x = cells["model"], cells["x"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfused.modules())
    with torch.no_grad():
        want = unfused(x)
    got = run()
    assert (got - want).abs().max().item() <= 2e-4 * want.abs().max().item()


def test_session_honours_in_channels():
    spec = tiny().replace(in_channels=1)
    out = get_runtime("torch").session(spec)()
    assert out.shape == (1, 1000)


def test_environment_and_key():
    torch_rt, ort_rt, fused = get_runtime("torch"), get_runtime("onnxruntime"), get_runtime("torch-fused")
    env = torch_rt.environment(1, 1, RES)
    assert isinstance(env, Environment)
    assert env.cpu and isinstance(env.cpu, str)
    assert env.cores == (os.cpu_count() or 1)
    assert env.runtime == "torch"
    assert env.runtime_version == torch.__version__
    assert (env.threads, env.batch, env.resolution, env.dtype) == (1, 1, RES, "float32")
    d = env.as_dict()
    assert set(d) == {"cpu", "cores", "runtime", "runtime_version", "threads", "batch", "resolution",
                      "dtype"}
    assert d["runtime"] == "torch"

    import onnxruntime
    ort_env = ort_rt.environment(1, 1, RES)
    assert ort_env.runtime == "onnxruntime"
    assert ort_env.runtime_version == onnxruntime.__version__

    key = env.key()
    assert key == torch_rt.environment(1, 1, RES).key()            # stable
    others = [torch_rt.environment(2, 1, RES), torch_rt.environment(1, 2, RES),
              torch_rt.environment(1, 1, 64), ort_env, fused.environment(1, 1, RES)]
    keys = [e.key() for e in others]
    assert key not in keys
    assert len(set(keys)) == len(keys)
    # a key reads back as its environment (table listings in error messages), "torch-fused" included
    assert [Environment.from_key(k) for k in [key, *keys]] == [env, *others]
    assert Environment.from_key("a|b|c") is None and Environment.from_key("x|twoc|rt-1|t1|b1|r9|f") is None


def test_latency_model_keeps_activations_away_from_zero():
    spec = tiny()
    torch.manual_seed(0)
    x = torch.randn(1, 3, RES, RES, generator=torch.Generator().manual_seed(1))

    def bn_stds(model):
        stds = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: stds.append(o.std().item()))
                 for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            out = model(x)
        for h in hooks:
            h.remove()
        return out, stds

    model = latency_model(spec)
    assert not model.training
    out, stds = bn_stds(model)
    assert torch.isfinite(out).all()
    assert out.std().item() > 1e-2
    assert min(stds) > 0.1                                   # no layer shrinks towards denormals
    raw_out, raw_stds = bn_stds(build(spec).eval())
    assert min(raw_stds) < 1e-3                              # the untrained network does shrink
    assert out.std().item() > 1e3 * raw_out.std().item()
    passed = nn.Linear(2, 2).train()
    assert latency_model(passed) is passed and not passed.training   # a module is used as it is


def test_onnx_export_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = latency_model(tiny("mobilenet_v3_large", CMP_RES))
    x = torch.randn(1, 3, CMP_RES, CMP_RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(x).numpy()
    assert eager.std() > 1e-3                                # not a vanishing comparison
    path = export_onnx(model, x, tmp_path / "m.onnx")
    assert path.is_file()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert got.shape == eager.shape
    assert np.abs(got - eager).max() <= 1e-4 * np.abs(eager).max()


@pytest.mark.slow
def test_litert_session_runs():
    pytest.importorskip("litert_torch")
    runtime = get_runtime("litert")
    assert runtime.name == "litert"
    env = runtime.environment(1, 1, RES)
    assert env.runtime == "litert" and env.runtime_version != "unknown"
    run = runtime.session(tiny(), threads=1)
    assert callable(run)
    run()
    run()
    # The conversion of a spec is kept: asking again opens the same file instead of converting
    from mnv3.latency.runtimes import LiteRtRuntime

    path = LiteRtRuntime.converted(tiny())
    assert path.is_relative_to(os.environ["MNV3_CACHE"]) and path.stat().st_size > 0
    stamp = path.stat().st_mtime_ns
    start = time.perf_counter()
    assert LiteRtRuntime.converted(tiny()) == path and path.stat().st_mtime_ns == stamp
    assert time.perf_counter() - start < 1.0
    other = tiny().replace(resolution=RES * 2)
    assert LiteRtRuntime.converted(other) != path
    ten = LiteRtRuntime.converted(tiny(), num_classes=10)      # the classifier a search space deploys
    from ai_edge_litert.interpreter import Interpreter

    assert ten != path and list(Interpreter(model_path=str(ten)).get_output_details()[0]["shape"]) == [1, 10]


# --------------------------------------------------------------------------------------------------
# mnv3 bench


def bench(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_onnxruntime_json_and_csv(capsys, tmp_path):
    csv_path = tmp_path / "b.csv"
    code, out, err = bench(capsys, "mobilenet_v3_small", "mobilenet_v3_large", "--width", "0.35",
                           "--runtime", "onnxruntime", "--json", "--csv", csv_path, "--no-progress",
                           "--resolution", RES)
    assert code == 0, err
    assert "Traceback" not in err
    specs = [tiny("mobilenet_v3_small"), tiny("mobilenet_v3_large")]

    doc = json.loads(out)
    results = doc["results"]
    assert len(results) == 2
    for spec, r in zip(specs, results):
        assert set(r) == {"arch", "runtime", "median_ms", "p10_ms", "p90_ms", "ratio", "params", "macs"}
        assert r["arch"] == spec.name
        assert r["runtime"] == "onnxruntime"
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        cost = count(spec, 1000)
        assert (r["params"], r["macs"]) == (cost.params, cost.macs)
    assert results[0]["macs"] < results[1]["macs"]
    # Timed side by side: each network's ratio to the first is the median of per-round ratios, close
    # to the ratio of the medians (loosely: no speed claim, only that the two agree).
    assert results[0]["ratio"] == 1.0
    assert results[1]["ratio"] == pytest.approx(results[1]["median_ms"] / results[0]["median_ms"], rel=0.25)
    assert "ratio" in err       # the table's column (human output is on stderr with --json)
    env = doc["environment"]
    assert env["threads"] == 1 and env["resolution"] == RES and env["batch"] == 1
    assert env["cpu"] and env["cores"] == (os.cpu_count() or 1)

    import onnxruntime

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for col in ("arch", "runtime", "median_ms", "p10_ms", "p90_ms", "ratio", "params", "macs", "runs",
                "cpu", "cores", "runtime_version", "threads", "batch", "resolution", "dtype"):
        assert col in rows[0], col
    for spec, row, r in zip(specs, rows, results):
        assert row["arch"] == spec.name
        assert row["runtime"] == "onnxruntime"
        assert (row["threads"], row["batch"], row["resolution"], row["dtype"]) == ("1", "1", str(RES),
                                                                                  "float32")
        assert int(row["runs"]) >= 50
        assert float(row["median_ms"]) == pytest.approx(r["median_ms"])
        assert float(row["ratio"]) == pytest.approx(r["ratio"])
        assert row["runtime_version"] == onnxruntime.__version__


def _one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["mobilenet_v3_small", "--runtime", "nope"], "onnxruntime"),
    (["mobilenet_v3_small", "--runtime", "torch", "--threads", "999"], "impossible"),
    (["mobilenet_v3_small", "--runtime", "torch", "--threads", "0"], "impossible"),
    (["mobilenet_v3_small", "--runtime", "torch", "--runs", "10"], "50"),
    (["mobilenet_v3_small", "mobilenet_v3_large", "--runtime", "torch", "--runs", "10"], "50"),
    (["no_such_net", "--runtime", "torch"], "no_such_net"),
    (["mobilenet_v3_small", "--runtime", "torch", "--batch", "0"], "batch"),
])
def test_bench_bad_inputs(capsys, tmp_path, argv, needle):
    csv_path = tmp_path / "b.csv"
    code, out, err = bench(capsys, *argv, "--width", "0.35", "--resolution", RES, "--no-progress",
                           "--csv", csv_path)
    assert needle in _one_line_error(code, out, err)
    assert not csv_path.exists()


def test_bench_missing_runtime_package(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, out, err = bench(capsys, "mobilenet_v3_small", "--runtime", "onnxruntime", "--no-progress",
                           "--csv", tmp_path / "b.csv")
    assert "pip install onnxruntime" in _one_line_error(code, out, err)


def test_timing_is_frozen():
    t = Timing(1.0, 0.5, 2.0, 50)
    with pytest.raises(AttributeError):
        t.repeats = 3  # type: ignore[misc]


def test_measure_ratio_cancels_a_drifting_machine():
    from mnv3.latency import measure_ratio

    ft, speed = FakeTime(), [1.0]

    def drifting(cost: float):
        def run():
            ft.work(cost * speed[0])
            speed[0] *= 1.01          # the machine slows down a little with every call
        return run

    ratio = measure_ratio(drifting(0.004), drifting(0.002), rounds=20, burst=3, clock=ft.clock)
    assert ratio == pytest.approx(2.0, rel=0.05)
    # the absolute medians of the same workload drift far more than that
    first = measure(drifting(0.002), runs=50, clock=ft.clock).median_ms
    second = measure(drifting(0.002), runs=50, clock=ft.clock).median_ms
    assert second / first > 1.5
    with pytest.raises(LatencyError, match="at least 50"):
        measure_ratio(drifting(0.004), drifting(0.002), rounds=5, burst=3, clock=ft.clock)


def test_measure_relative_keeps_the_units_of_one_moment():
    from mnv3.latency import measure_relative

    ft, speed = FakeTime(), [1.0]

    def drifting(cost: float):
        def run():
            ft.work(cost * speed[0])
            speed[0] *= 1.01
        return run

    reference = drifting(0.002)
    unit = measure(reference, runs=50, clock=ft.clock).median_ms        # the reference "now"
    assert speed[0] > 1.5
    late = measure_relative(drifting(0.006), reference, unit, runs=50, clock=ft.clock)
    assert speed[0] > 3     # the machine is now more than 3x slower than when `unit` was taken ...
    # ... yet the part reads as 3 references of that moment, with percentiles around it
    assert late.median_ms == pytest.approx(3 * unit, rel=0.05)
    assert late.p10_ms <= late.median_ms <= late.p90_ms and late.runs >= 50
    with pytest.raises(LatencyError, match="at least 50"):
        measure_relative(drifting(0.006), reference, unit, runs=20, clock=ft.clock)


def test_interleaved_ratios_spread_every_function_over_the_whole_call():
    from mnv3.latency.protocol import interleaved_ratios

    ft, calls = FakeTime(), []

    def fn(name: str, cost: float):
        def run():
            calls.append(name)
            # the machine turns 2x slower halfway through: every function sees both halves
            ft.work(cost * (2.0 if len(calls) > 300 else 1.0))
        return run

    a, b, ref = fn("a", 0.003), fn("b", 0.001), fn("r", 0.002)
    ratios = interleaved_ratios([a, b], ref, rounds=20, burst=3, clock=ft.clock)
    assert [len(r) for r in ratios] == [20, 20]
    assert statistics.median(ratios[0]) == pytest.approx(1.5) and statistics.median(ratios[1]) == pytest.approx(0.5)
    timed = calls[12:]          # after the warm-up: a burst of a, of the reference, of b, of the reference
    assert timed[:12] == ["a"] * 3 + ["r"] * 3 + ["b"] * 3 + ["r"] * 3 and len(timed) == 20 * 12
    with pytest.raises(LatencyError, match="at least 50"):
        interleaved_ratios([a], ref, rounds=5, burst=3, clock=ft.clock)
    assert len(interleaved_ratios([a], ref, rounds=5, burst=3, clock=ft.clock, minimum=15)[0]) == 5


def test_pool_weights_two_passes_by_their_runs():
    from mnv3.latency.protocol import pool

    first, second = Timing(10.0, 9.0, 12.0, 18), Timing(13.0, 12.0, 15.0, 36, repeats=1)
    both = pool(first, second)
    assert both.median_ms == pytest.approx(12.0) and both.p10_ms == pytest.approx(11.0)
    assert both.p90_ms == pytest.approx(14.0) and both.runs == 54 and both.repeats == 1
    assert pool(None, second) == second


def test_measure_side_by_side_survives_a_load():
    from mnv3.latency import measure_side_by_side

    ft, calls = FakeTime(), []

    def fn(name: str, cost: float):
        def run():
            calls.append(name)
            # another job loads the machine (2x slower) during the middle third of the calls: timed
            # one after the other, it would fall on one network and move its ratio by 2x
            ft.work(cost * (2.0 if 80 < len(calls) <= 160 else 1.0))
        return run

    first, big, small = fn("f", 0.002), fn("b", 0.003), fn("s", 0.001)
    got = measure_side_by_side([first, big, small], runs=50, burst=3, clock=ft.clock, burst_ms=0)
    (t0, r0), (t1, r1), (t2, r2) = got
    assert (r0, r1, r2) == (1.0, pytest.approx(1.5), pytest.approx(0.5))
    assert t1.runs == t2.runs == 51 and t0.runs == 102      # the first: one burst after every other's
    assert (t0.median_ms, t1.median_ms, t2.median_ms) == pytest.approx((2.0, 3.0, 1.0))
    timed = calls[40:]          # after 10 warm-up calls of each other network, each with one of the first
    assert timed[:12] == ["b"] * 3 + ["f"] * 3 + ["s"] * 3 + ["f"] * 3 and len(timed) == 17 * 12
    with pytest.raises(LatencyError, match="at least 50"):
        measure_side_by_side([first, big], runs=20, clock=ft.clock)
    with pytest.raises(LatencyError, match="two"):
        measure_side_by_side([first], clock=ft.clock)


def test_side_by_side_bursts_outlast_a_networks_cold_calls():
    """A network's first calls after another ran are slow (its weights left the caches): bursts of
    3 calls report them; bursts of at least BURST_MS report the warm time, which a network timed
    alone shows."""
    from mnv3.latency import measure_side_by_side
    from mnv3.latency.protocol import BURST_MS

    ft, last, streak = FakeTime(), [None], [0]

    def fn(name: str, cost: float):
        def run():
            streak[0] = streak[0] + 1 if last[0] == name else 0
            last[0] = name
            ft.work(cost * (3.0 if streak[0] < 2 else 1.0))   # the first two calls after a switch: 3x
        return run

    nets = [fn("a", 0.0005), fn("b", 0.0004), fn("c", 0.0006)]
    short = measure_side_by_side(nets, runs=60, clock=ft.clock, burst_ms=0)
    assert short[1][0].median_ms > 1.0          # 0.4 ms warm, reported 3x
    long = measure_side_by_side(nets, runs=60, clock=ft.clock)
    assert [round(t.median_ms, 3) for t, _ in long] == [0.5, 0.4, 0.6]
    assert [r for _, r in long] == [1.0, pytest.approx(0.8), pytest.approx(1.2)]
    assert long[1][0].runs >= 60 and long[1][0].runs >= 20 * int(BURST_MS / 0.4)
