"""Search space, latency lookup tables, resume after a killed build, predictor and `mnv3 lut`."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mnv3
from mnv3.cli import main
from mnv3.latency import LatencyError, Timing, get_runtime
from mnv3.latency.lut import (
    TABLE_PROTOCOL,
    Predictor,
    _reference_part,
    build_table,
    network_parts,
    space_parts,
)
from mnv3.latency.table import LatencyTable
from mnv3.space import SearchSpace


def tiny_space(**choices) -> SearchSpace:
    seed = mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32)
    defaults = {"kernels": (3, 5), "expansion_ratios": (3.0,), "se": (False, True), "activations": ("relu",),
                    "widths": (1.0,), "depth_deltas": (0,)}
    return SearchSpace(seed, **{**defaults, **choices})


# -- the space ------------------------------------------------------------------------------------

def test_default_space_around_large():
    space = SearchSpace(mnv3.preset("mobilenet_v3_large"))
    stages = space.stages()
    assert [(s.out, s.depth, s.stride) for s in stages] == [
        (16, 1, 1), (24, 2, 2), (40, 3, 2), (80, 4, 2), (112, 2, 1), (160, 3, 2)]
    assert [s.input_size for s in stages] == [112, 112, 56, 28, 14, 14]
    entries = space.block_entries()
    assert len(entries) == len({e.key() for e in entries}) > 1000
    assert {e.block.kernel for e in entries} == {3, 5, 7}
    assert space.size() > 10 ** 20


def test_every_sampled_network_is_covered_by_the_table_parts():
    space = SearchSpace(mnv3.preset("mobilenet_v3_small", resolution=96))
    keys = {p.key for p in space_parts(space)}
    rng = random.Random(0)
    for _ in range(25):
        spec = space.sample(rng)
        spec.validate()
        assert {p.key for p in network_parts(spec)} <= keys


def test_space_round_trip_and_errors():
    space = tiny_space()
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space and again.key() == space.key()
    assert tiny_space(kernels=(3,)).key() != space.key()
    with pytest.raises(mnv3.SpecError, match="kernels"):
        tiny_space(kernels=(4,))
    with pytest.raises(mnv3.SpecError, match="activations"):
        tiny_space(activations=("gelu",))
    with pytest.raises(mnv3.SpecError, match="dilated"):
        SearchSpace(mnv3.with_output_stride(mnv3.preset("mobilenet_v3_small"), 16))


# -- tables and the predictor ---------------------------------------------------------------------

def test_build_lookup_resume_and_predict(tmp_path, capsys):
    space = tiny_space()
    runtime = get_runtime("onnxruntime")
    table = LatencyTable(f"sqlite:///{tmp_path / 'lut.sqlite'}")
    logs: list[str] = []
    first = build_table(space, runtime, table, chunk=8, calibration_networks=3, progress=True, log=logs.append)
    parts = space_parts(space)
    n_entries = len(parts)
    # a fresh table says so (its reference part, measured first, does not make it look resumed)
    assert logs.pop().startswith(f"fresh table: {n_entries} entries to measure in 3 passes, the heaviest in 6 "
                                 f"(space {space.key()}")
    # The progress bar counts entries as measure_all reports them, a whole group at a time (here a
    # chunk of 8): no ETA before the first group, and never one entry standing for a group's time.
    # The heavy entries' three more passes join the count when the first three are done.
    frames = re.findall(r"lut build:[^\r\n]*?(\d+)/(\d+) \[[^<]*<([^,\]]*)", capsys.readouterr().err)
    per_pass, heavy = n_entries - 1, first["heavy"]     # the reference part is measured whole, apart
    ends = {p * per_pass + min(c, per_pass) for p in range(3) for c in range(8, per_pass + 8, 8)}
    ends |= {3 * per_pass + p * heavy + min(c, heavy) for p in range(3) for c in range(8, heavy + 8, 8)}
    assert frames[0][0] == "0" and frames[0][2] == "?" and int(frames[-1][0]) == 3 * per_pass + 3 * heavy
    assert {int(n) for n, _, _ in frames[1:]} <= ends
    assert first["entries"] == len(parts) and first["measured"] == len(parts)
    stored = table.get(first["env"])
    assert set(stored) == {p.key for p in parts}
    assert all(t.runs >= 50 and t.p10_ms <= t.median_ms <= t.p90_ms for t in stored.values())
    # the heavy entries (at least a fifth of a typical network) got twice the runs, the others not
    from mnv3.latency.lut import heavy_parts

    heavy_keys = {p.key for p in heavy_parts(space, parts, stored)}
    assert 0 < len(heavy_keys) == heavy < len(parts) // 2
    assert all((t.runs >= 100) == (k in heavy_keys) for k, t in stored.items() if k != _reference_part(space, 1).key)

    again = build_table(space, runtime, table, progress=False, log=logs.append)
    assert logs.pop().startswith(f"complete: all {n_entries} entries are in the table")
    assert again["measured"] == 0 and table.get(first["env"]) == stored      # nothing re-measured

    predictor = Predictor(space, runtime, table)
    spec = space.sample(random.Random(3))
    total = sum(stored[p.key].median_ms for p in network_parts(spec))
    assert predictor.sum_of_parts(spec) == pytest.approx(total)
    cal = predictor.calibration
    parts = len(spec.blocks) + 2
    if cal["model"] == "per-stage sums+b":      # one coefficient per stage's sum, and the constant
        stage = {"ends": 0.0, "s2": 0.0, "s4": 0.0, "s8": 0.0, "s16": 0.0}
        for i, p in enumerate(network_parts(spec)):
            level = 0 if i in (0, parts - 1) else min(16, 2 ** round(math.log2(spec.resolution / p.input_shape[-1])))
            stage[f"s{level}" if level else "ends"] += stored[p.key].median_ms
        assert predictor.predict(spec) == pytest.approx(sum(cal["coef"][t] * v for t, v in stage.items())
                                                        + cal["coef"]["one"])
    elif "a_heavy" in cal:        # the heavy entries' sum and the rest's, each with its coefficient
        heavy = sum(stored[p.key].median_ms for p in network_parts(spec) if stored[p.key].median_ms >= cal["heavy_ms"])
        assert predictor.predict(spec) == pytest.approx(cal["a_heavy"] * heavy + cal["a"] * (total - heavy) + cal["b"])
    else:
        assert predictor.predict(spec) == pytest.approx(cal["a"] * total + cal.get("c", 0.0) * parts + cal["b"])
    assert cal["heavy_ms"] > 0 and all("heavy_sum_ms" in n and "stage_ms" in n for n in cal["networks"])
    assert predictor.predict(spec) > 0

    # End-to-end measurements come out in table units through the calibration's networks, timed
    # again beside them: were those networks stored at twice their latency, everything measured
    # reads about twice as slow; a calibration without them converts through its reference_ms.
    from mnv3.latency.lut import measure_in_table_units

    others = [space.sample(random.Random(s)) for s in (5, 6)]
    before = measure_in_table_units(others, space, runtime, table)
    doubled = {**cal, "networks": [{**n, "measured_ms": 2 * n["measured_ms"]} for n in cal["networks"]]}
    table.set_calibration(first["env"], space.key(), doubled)
    after = measure_in_table_units(others, space, runtime, table)
    assert all(1.5 < a / b < 2.6 for a, b in zip(after, before))
    table.set_calibration(first["env"], space.key(), {**doubled, "networks": []})
    alone = measure_in_table_units(others, space, runtime, table)
    assert all(0.6 < a / b < 1.6 for a, b in zip(alone, before))
    assert measure_in_table_units([], space, runtime, table) == []      # nothing to time: nothing timed
    table.set_calibration(first["env"], space.key(), cal)

    # A calibration timed with the old protocol (bursts of 3 runs, no burst_ms stored): the predictor
    # says so and names the command; that build calibrates anew and re-measures no entry.
    capsys.readouterr()
    old = {k: v for k, v in cal.items() if k != "burst_ms"}
    table.set_calibration(first["env"], space.key(), old)
    Predictor(space, runtime, table)
    assert "bursts of 3 runs" in capsys.readouterr().err
    redone = build_table(space, runtime, table, calibration_networks=3, progress=False, log=logs.append)
    assert redone["measured"] == 0 and redone["calibration"]["burst_ms"] > 0
    Predictor(space, runtime, table)
    assert "bursts of 3" not in capsys.readouterr().err

    outside = mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32).replace(
        blocks=(mnv3.BlockSpec(7, 64, 16, None, "hswish", 2),) + space.seed.blocks[1:])
    with pytest.raises(LatencyError, match="not in the table"):
        predictor.predict(outside)
    # the search's latency source measures such a network instead, once: asked again, the same figure
    from mnv3.search.latency import PredictedLatency

    source = PredictedLatency(space, runtime, table.url)
    timed = source.ms(outside)
    assert not source.covers(outside) and timed > 0 and source.ms(outside) == timed
    with pytest.raises(LatencyError, match=r"has no torch table \(it holds onnxruntime tables\); build one first"):
        Predictor(space, get_runtime("torch"), table)

    # Entries are stored in the units of the reference part's own entry, taken when the table was
    # started: a resumed build times what is missing against that part and scales by that entry, so
    # doubling it doubles what is measured next (absolute timings would not move).
    env, ref = first["env"], _reference_part(space, 1).key
    redo = [k for k in stored if k != ref][:6]
    unit = stored[ref]
    table.put(env, [(ref, Timing(2 * unit.median_ms, 2 * unit.p10_ms, 2 * unit.p90_ms, unit.runs))])
    with sqlite3.connect(tmp_path / "lut.sqlite") as conn:
        conn.executemany("delete from latency_entries where key = ?", [(k,) for k in redo])
    resumed = build_table(space, runtime, table, calibration_networks=3, progress=False, log=logs.append)
    assert logs.pop().startswith(f"resuming: {n_entries - len(redo)} of {n_entries} entries complete, "
                                 f"{len(redo)} to measure")
    assert resumed["measured"] == len(redo)
    now = table.get(env)
    assert 1.5 < statistics.median(now[k].median_ms / stored[k].median_ms for k in redo) < 2.6


def test_fit_calibration_picks_the_model_the_data_supports():
    from mnv3.latency.lut import fit_calibration

    rng = np.random.default_rng(0)
    sums = rng.uniform(10, 100, 30)
    counts = rng.integers(12, 22, 30).astype(float)
    noise = 1 + rng.normal(0, 0.03, 30)
    # proportional with 3% noise: the extra terms only fit noise, the simplest model wins
    fit = fit_calibration(sums, counts, 0.9 * sums * noise)
    assert fit["model"] == "a*sum" and fit["a"] == pytest.approx(0.9, rel=0.03) and fit["b"] == fit["c"] == 0
    assert 0 < fit["loo_mape"] < 0.05
    # a real per-call overhead per part and a constant: the full model, with its coefficients back
    exact = 0.8 * sums + 0.5 * counts + 4.0
    fit = fit_calibration(sums, counts, exact * (1 + rng.normal(0, 0.001, 30)))
    assert fit["model"] == "a*sum+c*parts+b"
    assert (fit["a"], fit["c"], fit["b"]) == pytest.approx((0.8, 0.5, 4.0), rel=0.05)
    # every network of one depth: no part-count term; two networks: only a*sum can be scored
    assert fit_calibration(sums, np.full(30, 17.0), sums + 5)["model"] == "a*sum+b"
    few = fit_calibration(sums[:2], counts[:2], sums[:2] * 1.1)
    assert few["model"] == "a*sum" and few["a"] == pytest.approx(1.1)
    # heavy entries that run faster in a network than alone: their own coefficient, offered only
    # when the heavy sums are given
    heavy = sums * rng.uniform(0.1, 0.8, 30)
    timed = (0.85 * heavy + 1.05 * (sums - heavy) + 1.0) * (1 + rng.normal(0, 0.002, 30))
    fit = fit_calibration(sums, counts, timed, heavy)
    assert fit["model"] == "a_h*heavy+a*rest+b"
    assert (fit["a_heavy"], fit["a"], fit["b"]) == pytest.approx((0.85, 1.05, 1.0), rel=0.05)
    assert fit_calibration(sums, counts, timed)["model"] != "a_h*heavy+a*rest+b"
    assert "a_heavy" not in fit_calibration(sums, counts, 0.9 * sums * noise, heavy)    # proportional: a*sum
    # each stage's blocks at their own speed in a network: one coefficient a stage, offered only when
    # the stage sums are given
    terms = ("ends", "s2", "s4", "s8", "s16")
    shares = rng.dirichlet(np.ones(5), 30)
    stages = [dict(zip(terms, total * share)) for total, share in zip(sums, shares)]
    slopes = dict(zip(terms, (1.0, 0.7, 0.9, 1.1, 1.3)))
    timed = np.array([sum(slopes[t] * s[t] for t in terms) + 2.0 for s in stages]) * (1 + rng.normal(0, 0.002, 30))
    fit = fit_calibration(sums, counts, timed, heavy, stages)
    assert fit["model"] == "per-stage sums+b"
    assert [fit["coef"][t] for t in (*terms, "one")] == pytest.approx([*slopes.values(), 2.0], rel=0.05)
    assert fit_calibration(sums, counts, timed, heavy)["model"] != "per-stage sums+b"
    assert fit_calibration(sums, counts, 0.9 * sums * noise, heavy, stages)["model"] == "a*sum"


def test_bad_database_urls(tmp_path):
    with pytest.raises(LatencyError, match="cannot open"):
        LatencyTable("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(LatencyError, match="not a database URL"):
        LatencyTable("no-such-scheme")
    # SQLite has no server: the message names the file and the system's reason
    missing = tmp_path / "missing-dir" / "x.sqlite"
    with pytest.raises(LatencyError) as caught:
        LatencyTable(f"sqlite:///{missing}")
    assert str(caught.value) == (f"sqlite:///{missing}: cannot create the database file {missing} "
                                 "(No such file or directory); choose another --db")
    assert not missing.parent.exists()
    with pytest.raises(LatencyError, match=r"cannot open the database file .* \(Is a directory\)"):
        LatencyTable(f"sqlite:///{tmp_path}")
    other = tmp_path / "notes.sqlite"
    other.write_text("not a database, but long enough to have a header " * 4)
    with pytest.raises(LatencyError, match=r"cannot open the database file .*notes.sqlite \(file is not a database\)"):
        LatencyTable(f"sqlite:///{other}")


# -- the command, killed and resumed ----------------------------------------------------------------

def _count(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from latency_entries").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_lut_build_killed_then_resumed(tmp_path, capsys):
    space = tiny_space(kernels=(3, 5, 7), expansion_ratios=(3.0, 6.0))
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(space.to_dict()))
    db = tmp_path / "lut.sqlite"
    args = ["lut", "build", "--runtime", "onnxruntime", "--space", str(space_file), "--db", f"sqlite:///{db}",
            "--chunk", "4", "--calibrate", "3", "--no-progress"]
    total = len(space_parts(space))
    proc = subprocess.Popen([sys.executable, "-m", "mnv3", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while _count(db) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _count(db)
    assert 0 < done < total, "the build should have been killed midway"
    with sqlite3.connect(db) as conn:
        before = dict(conn.execute("select key, runs from latency_entries").fetchall())
    unit = _reference_part(space, 1).key
    assert before.pop(unit) >= 50                       # the reference part: measured whole, first
    assert set(before.values()) == {18}                 # the others: the first of three passes

    assert main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    out = json.loads(out)
    # the reference part was measured whole before the kill, the others got their first pass
    assert f"resuming: 1 of {total} entries complete, {total - 1} to measure" in err
    assert out["entries"] == total and out["measured"] == total - 1 and out["passes"] == 3
    with sqlite3.connect(db) as conn:
        after = dict(conn.execute("select key, runs from latency_entries").fetchall())
    assert len(after) == total
    # Every entry got exactly three passes of 18 runs, the heavy ones six: the first pass of those
    # measured before the kill was kept and pooled with the next, not measured again.
    runs = [v for k, v in after.items() if k != unit]
    assert sorted(runs) == [54] * (total - 1 - out["heavy"]) + [108] * out["heavy"] and out["heavy"] > 0

    assert main(["lut", "validate", "--runtime", "onnxruntime", "--space", str(space_file),
                 "--db", f"sqlite:///{db}", "--n", "3", "--plot", str(tmp_path / "v.png"),
                 "--no-progress", "--json", "--seed", "5", "--passes", "2"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)                      # stdout: the one JSON document; the text line on stderr
    assert set(stats) >= {"mape", "within_10", "within_5", "n"} and stats["n"] == 3
    # two whole runs, each network's median compared; how far a reading moved between them, said
    assert stats["passes"] == 2 and 0 <= stats["pass_sd"] < 0.5 and "medians of 2 runs" in err
    assert 0 <= stats["within_5"] <= stats["within_10"] <= 1
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lut", "validate", "--runtime", "onnxruntime", "--space", str(space_file),
                 "--db", f"sqlite:///{db}", "--n", "3", "--seed", "1234", "--no-progress"]) == 2
    assert "calibration's own networks" in capsys.readouterr().err
    assert main(["lut", "validate", "--runtime", "onnxruntime", "--space", str(space_file),
                 "--db", f"sqlite:///{db}", "--n", "3", "--passes", "0", "--no-progress"]) == 2
    assert "--passes: need 1 or more whole runs, got 0" in capsys.readouterr().err

    # Validating what was not built names the table that was, and the flag that differs.
    def refused(*flags: str) -> str:
        assert main(["lut", "validate", "--runtime", "onnxruntime", "--db", f"sqlite:///{db}", "--n", "2",
                     "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: the table database "), err
        return err

    err = refused("--space", str(space_file), "--resolution", "48")
    assert "has no onnxruntime table for this space" in err and "at --resolution 48 with --threads 1" in err
    assert "it holds one for the same --space at --resolution 32 with --threads 1 (pass --resolution 32); " in err
    assert err.endswith(f"or build this one: mnv3 lut build --runtime onnxruntime --space {space_file} "
                        f"--resolution 48 --db sqlite:///{db}\n")
    other = tmp_path / "other.json"
    other.write_text(json.dumps(tiny_space(kernels=(3, 5, 7), expansion_ratios=(4.0,)).to_dict()))
    err = refused("--space", str(other))
    assert (f"it holds one for space {space.key()} (--expansion-ratios 3 6, not 4) at --resolution 32 with "
            "--threads 1 (pass its --space); ") in err


@pytest.mark.parametrize("extra, message", [
    (["--runtime", "nope"], "unknown runtime"),
    (["--runtime", "onnxruntime", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none"],
     "check that the server runs"),
    (["--runtime", "onnxruntime", "--db", "sqlite:///no-dir/lut.sqlite"],
     ("error: sqlite:///no-dir/lut.sqlite: cannot create the database file no-dir/lut.sqlite (No such file or "
      "directory); choose another --db\n")),
    (["--runtime", "onnxruntime", "--threads", "0"], "impossible"),
    (["--runtime", "onnxruntime", "--space", "no_such_net"], "unknown architecture"),
    (["--runtime", "onnxruntime", "--passes", "0"], "passes: 0; use 1 to 16"),
])
def test_lut_bad_input(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["lut", "build", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lut_space_saves_a_space_that_build_accepts(tmp_path, capsys):
    saved = tmp_path / "space.json"
    assert main(["lut", "space", "--space", "mobilenet_v3_small", "--resolution", "96", "--kernels", "3", "5",
                 "--se", "off", "--activations", "relu", "--save", str(saved), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    space = SearchSpace.from_dict(json.loads(saved.read_text()))
    assert space.kernels == (3, 5) and space.se == (False,) and space.activations == ("relu",)
    assert space.seed.resolution == 96 and out["space"] == space.key()
    assert out["entries"] == len(space_parts(space)) and out["networks"] == space.size()
    assert [st["input"] for st in out["stages"]] == [s.input_size for s in space.stages()]
    # the file is what --space of the other commands reads back, unchanged
    assert main(["lut", "space", "--space", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["space"] == space.key()

    for bad, message in ((["--se", "maybe"], "--se"), (["--kernels", "4"], "odd sizes"),
                         (["--widths", "0"], "positive")):
        assert main(["lut", "space", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_validate_without_table(tmp_path, capsys):
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(tiny_space().to_dict()))
    db = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    code = main(["lut", "validate", "--runtime", "onnxruntime", "--space", str(space_file),
                 "--db", db, "--n", "2", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err == (f"error: the table database {db} holds no lookup table yet; build one "
                                       f"first: mnv3 lut build --runtime onnxruntime --space {space_file} "
                                       f"--resolution 32 --db {db}\n")


def test_missing_table_lists_the_tables_the_database_holds(tmp_path):
    """No table for the request: the message lists this runtime's tables, this machine's first, with
    the flag to pass where a flag is what differs (nothing is measured here)."""
    import dataclasses

    from mnv3.latency.lut import MissingTable

    space, runtime = tiny_space(), get_runtime("onnxruntime")
    here = runtime.environment(1, 1, 32)
    table = LatencyTable(f"sqlite:///{tmp_path / 'lut.sqlite'}")
    calibration = {"a": 1.0, "b": 0.0, "space": space.to_dict()}
    envs = [dataclasses.replace(here, cpu="Other CPU", cores=64), dataclasses.replace(here, runtime_version="0.1"),
            dataclasses.replace(here, threads=2), dataclasses.replace(here, runtime="litert")]
    for env in envs:
        table.put(f"{env.key()}|{TABLE_PROTOCOL}", [("stem:x", Timing(1.0, 0.9, 1.1, 50))])
        table.set_calibration(f"{env.key()}|{TABLE_PROTOCOL}", space.key(), calibration)
    table.put(f"{dataclasses.replace(here, resolution=64).key()}|{TABLE_PROTOCOL}", [("stem:y", Timing(1.0, 0.9, 1.1, 50))])
    # this very table, timed with the protocol before TABLE_PROTOCOL: not used, and said why
    table.put(here.key(), [("stem:x", Timing(1.0, 0.9, 1.1, 50))])
    table.set_calibration(here.key(), space.key(), calibration)
    with pytest.raises(MissingTable) as caught:
        Predictor(space, runtime, table)
    same = "the same --space at --resolution"
    assert str(caught.value) == (
        f"the table database {table.url} has no onnxruntime table for this space ({space.key()}) at --resolution "
        f"32 with --threads 1, batch 1, on this machine; it holds tables for: 1 entry not yet calibrated (a "
        f"build that stopped or still runs) at --resolution 64 with --threads 1; {same} 32 with --threads 2 "
        f"(pass --threads 2); {same} 32 with --threads 1, timed with the older protocol (reference bursts of 3 "
        f"calls, which read large blocks up to 20% fast), so build it anew; {same} 32 with --threads 1, "
        f"onnxruntime 0.1, not the installed {here.runtime_version}; and 1 more; or build this one: mnv3 lut build "
        f"--runtime onnxruntime --space SPACE --resolution 32 --db {table.url}")
    assert caught.value.describe("space.json").endswith("--space space.json --resolution 32 --db " + table.url)


def test_a_space_for_another_class_count_times_its_own_heads(tmp_path):
    """The classifier the networks end in is part of the space: 1000 (ImageNet's, left out of the JSON
    so earlier spaces keep their keys) or the deployed count. Its heads are other table entries, its
    calibration another key, and a table for 1000 classes is not silently used for 10."""
    import dataclasses

    from mnv3.latency.lut import MissingTable
    from mnv3.search.latency import MeasuredLatency

    space = tiny_space()
    ten = dataclasses.replace(space, num_classes=10)
    assert "num_classes" not in space.to_dict() and ten.to_dict()["num_classes"] == 10
    assert SearchSpace.from_dict(json.loads(json.dumps(ten.to_dict()))) == ten and ten.key() != space.key()
    with pytest.raises(mnv3.SpecError, match="num_classes"):
        dataclasses.replace(space, num_classes=0)
    heads = {p.key for p in space_parts(space)} ^ {p.key for p in space_parts(ten)}
    assert heads and all(k.startswith("head:") and k.endswith((":n1000", ":n10")) for k in heads)
    spec = ten.sample(random.Random(1))
    assert {p.key for p in network_parts(spec, num_classes=10)} <= {p.key for p in space_parts(ten)}

    runtime = get_runtime("onnxruntime")
    table = LatencyTable(f"sqlite:///{tmp_path / 'lut.sqlite'}")
    env = f"{runtime.environment(1, 1, 32).key()}|{TABLE_PROTOCOL}"
    table.put(env, [(p.key, Timing(0.1, 0.09, 0.11, 50)) for p in space_parts(space)])
    table.set_calibration(env, space.key(), {"a": 1.0, "b": 0.0, "space": space.to_dict()})
    with pytest.raises(MissingTable) as caught:
        Predictor(ten, runtime, table)
    assert "(--classes 1000, not 10" in str(caught.value) and "--classes 10 --db" in str(caught.value)
    table.put(env, [(p.key, Timing(0.02, 0.018, 0.022, 50)) for p in space_parts(ten) if p.key.endswith(":n10")])
    table.set_calibration(env, ten.key(), {"a": 1.0, "b": 0.0, "space": ten.to_dict()})
    assert Predictor(space, runtime, table).predict(spec) - Predictor(ten, runtime, table).predict(spec) == \
        pytest.approx(0.1 - 0.02)
    # measured end to end, a candidate ends in the space's classifier too
    out = MeasuredLatency(runtime, num_classes=10).session(spec)()
    assert out[0].shape == (1, 10)


# -- LiteRT entries written directly as TFLite graphs ---------------------------------------------

def _ops(data: bytes, tmp_path: Path) -> list[str]:
    from mnv3.weights.tflite_import import _Graph

    path = tmp_path / "g.tflite"
    path.write_bytes(data)
    return [kind for kind, _, _ in _Graph(path).ops]


def test_tflite_writer_lays_out_blocks(tmp_path):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from mnv3.latency.tflite_writer import block_tflite, head_tflite, network_tflite, stem_tflite

    se_block = mnv3.BlockSpec(5, 120, 40, 32, "hswish", 1)
    data = block_tflite(40, 14, se_block)
    ops = _ops(data, tmp_path)
    assert ops.count("CONV_2D") == 4 and ops.count("DEPTHWISE_CONV_2D") == 1     # expand, SE x2, project
    assert ops.count("HARD_SWISH") == 2 and "MEAN" in ops and ops.count("MUL") == 2 and ops[-1] == "ADD"
    plain = _ops(block_tflite(16, 28, mnv3.BlockSpec(3, 16, 24, None, "relu", 2)), tmp_path)
    assert plain == ["DEPTHWISE_CONV_2D", "CONV_2D"]          # no expansion, no SE, no residual
    spec = mnv3.preset("mobilenet_v3_small", resolution=64)
    whole = network_tflite(spec)          # the whole network: its parts' ops, chained
    assert len(_ops(whole, tmp_path)) == sum(len(_ops(p.tflite(), tmp_path)) for p in network_parts(spec))
    for graph, shape in ((data, (1, 14, 14, 40)), (stem_tflite(spec), (1, 32, 32, 16)),
                         (head_tflite(spec, 96, 2, 1000), (1, 1000)), (whole, (1, 1000))):
        interpreter = Interpreter(model_content=graph, num_threads=1)
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.set_tensor(inp["index"], np.ones(inp["shape"], np.float32))
        interpreter.invoke()
        assert tuple(interpreter.get_tensor(out["index"]).shape) == shape
        assert np.isfinite(interpreter.get_tensor(out["index"])).all()


def test_litert_table_and_predictor(tmp_path):
    pytest.importorskip("litert_torch")
    space = tiny_space(se=(True,), kernels=(3,))
    runtime = get_runtime("litert")
    table = LatencyTable(f"sqlite:///{tmp_path / 'lut.sqlite'}")
    summary = build_table(space, runtime, table, calibration_networks=2, progress=False, log=lambda s: None)
    assert summary["measured"] == summary["entries"] == len(space_parts(space))
    prediction = Predictor(space, runtime, table).predict(space.sample(random.Random(0)))
    assert 0 < prediction < 1000
