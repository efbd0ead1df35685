"""NetAdapt: proposals on every block kind, the weights they keep, the predictor's cut, and
`mnv3 adapt` end to end (outputs, resume after SIGKILL, bad input)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mnv3
from mnv3.adapt import PruneError, layers, pruned_model, shrink, smaller_counts, width_groups
from mnv3.adapt.prune import structure
from mnv3.cli import main


def _randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=g))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=g))
    return model.eval()


SPECS = {
    "small_s32": mnv3.preset("mobilenet_v3_small", width=0.5, resolution=64),
    "small_s8": mnv3.with_total_stride(mnv3.preset("mobilenet_v3_small", width=0.5, resolution=32), 8),
    "large_s32": mnv3.preset("mobilenet_v3_large", width=0.35, resolution=64),
}


@pytest.mark.parametrize("name", SPECS)
def test_every_proposal_is_a_valid_network_of_the_same_structure(name):
    spec = SPECS[name]
    model = _randomize_bn(mnv3.build(spec, 5))
    x = torch.randn(1, 3, spec.resolution, spec.resolution)
    kinds = set()
    for layer in layers(spec):
        counts = smaller_counts(spec, layer)
        assert all(c % 8 == 0 and 8 <= c < layer.channels for c, _ in counts)
        assert [c for c, _ in counts] == sorted((c for c, _ in counts), reverse=True)
        for c, new in counts[:1] + counts[-1:]:
            assert structure(new) == structure(spec)
            pruned = pruned_model(model, new).eval()
            assert pruned.spec == new and pruned(x).shape == (1, 5)
            assert mnv3.count(new, 5).params < mnv3.count(spec, 5).params
        kinds.add(layer.name.rstrip("0123456789"))
    assert kinds >= {"width", "expand", "last_conv", "pre_logits"}
    # residual groups shrink together: every block added to its input keeps in == out
    by_name = {lay.name: lay for lay in layers(spec)}
    groups = [(n, g) for n, g in enumerate(width_groups(spec)) if len(g) > 1]
    assert groups
    for n, group in groups:
        for c, new in smaller_counts(spec, by_name[f"width{n}"])[:1]:
            outs = {new.stem.out if node == 0 else new.blocks[node - 1].out for node in group}
            assert outs == {c}


def test_blocks_of_every_kind_are_present_in_the_tested_specs():
    seen = set()
    for spec in SPECS.values():
        for cin, b in zip(spec.block_inputs(), spec.blocks):
            seen.add((b.stride, b.stride == 1 and cin == b.out, b.se is not None, b.expansion != cin))
    # stride 1 and 2, with and without residual, with and without SE, with and without expansion layer
    assert {s for s, *_ in seen} == {1, 2} and {r for _, r, _, _ in seen} == {True, False}
    assert {se for *_, se, _ in seen} == {True, False} and {e for *_, e in seen} == {True, False}


@pytest.mark.parametrize("name", SPECS)
def test_nothing_removed_reproduces_the_network_exactly(name):
    spec = SPECS[name]
    model = _randomize_bn(mnv3.build(spec, 7))
    x = torch.randn(2, 3, spec.resolution, spec.resolution)
    assert torch.equal(pruned_model(model, spec).eval()(x), model(x))


def test_removing_dead_channels_keeps_the_outputs_and_the_largest_norm_filters():
    spec = SPECS["small_s8"]
    model = _randomize_bn(mnv3.build(spec, 3))
    i = next(k for k, (cin, b) in enumerate(zip(spec.block_inputs(), spec.blocks), 1)
             if b.expansion != cin and b.se is not None)
    block = model.blocks[i - 1]
    exp = spec.blocks[i - 1].expansion
    dead = torch.arange(0, exp, 2)[:8]                 # 8 channels to remove
    with torch.no_grad():
        for conv_bn in (block.expand, block.dw):       # these channels carry exactly zero
            conv_bn.bn.weight[dead] = 0
            conv_bn.bn.bias[dead] = 0
        block.expand.conv.weight[dead] = 0             # and have the smallest norm
    new = shrink(spec, f"expand{i}", exp - 8)
    x = torch.randn(2, 3, 32, 32)
    pruned = pruned_model(model, new).eval()
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-5)
    alive = [c for c in range(exp) if c not in set(dead.tolist())]
    assert torch.equal(pruned.blocks[i - 1].expand.conv.weight, block.expand.conv.weight[alive])


def test_shrink_refuses_what_would_change_the_structure():
    spec = SPECS["small_s8"]
    with pytest.raises(PruneError, match="multiples of 8"):
        shrink(spec, "expand2", 13)
    with pytest.raises(PruneError, match="not a prunable layer"):
        shrink(spec, "conv9", 8)
    # a block whose expansion would equal its input loses its expansion layer: refused
    cin = spec.block_inputs()[1]
    with pytest.raises(PruneError, match="structure|residual|expansion"):
        shrink(spec, "expand2", cin)


def test_a_folded_model_is_refused():
    spec = SPECS["small_s8"]
    model = mnv3.build(spec, 3).fuse()
    with pytest.raises(PruneError, match="folded"):
        pruned_model(model, spec)


# -- the predictor: each proposal cuts at least delta x L, and just enough ------------------------------
def test_proposals_cut_at_least_delta_and_no_more_channels_than_needed(tmp_path):
    from mnv3.adapt.latency import AdaptLatency
    from mnv3.latency import get_runtime

    spec = SPECS["small_s8"]
    lat = AdaptLatency(get_runtime("onnxruntime"), spec, db=f"sqlite:///{tmp_path / 'lut.sqlite'}", runs=50)
    seed_ms = lat.measure_seed(spec)
    predict = lat.predictor(spec, seed_ms)
    timed = {layer.name: predict([s for _, s in smaller_counts(spec, layer)]) for layer in layers(spec)}
    # Cutting channels must lower the predicted latency, in several layers. How far it can lower it
    # moves with the machine's load (measured parts), so delta comes from the deepest cuts themselves:
    # the third-best layer's cut, at most 3% (a fixed 3% found only 2 layers on a loaded 2-core host).
    cuts = sorted(((seed_ms - min(ms)) / seed_ms for ms in timed.values() if ms), reverse=True)
    assert len(cuts) >= 3 and cuts[2] > 0.005, cuts
    delta = min(0.03, 0.9 * cuts[2])
    goal = seed_ms - delta * seed_ms
    made = 0
    for ms in timed.values():
        hits = [i for i, m in enumerate(ms) if m <= goal]
        if not hits:
            continue
        made += 1
        first = hits[0]
        assert ms[first] <= seed_ms - delta * seed_ms                # cuts at least delta x L
        assert all(m > goal for m in ms[:first])                    # every larger count falls short
    assert made >= 3 and lat.added > 0
    again = AdaptLatency(get_runtime("onnxruntime"), spec, db=f"sqlite:///{tmp_path / 'lut.sqlite'}", runs=50)
    again.predictor(spec, seed_ms)([s for _, s in smaller_counts(spec, layers(spec)[-1])])
    assert again.added == 0                                        # the parts were kept in the table


# -- mnv3 adapt end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapt-seed")
    spec = mnv3.with_total_stride(mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32), 8)
    spec.save(folder / "tiny.json")
    code = main(["train", "--data", "digits", "--arch", str(folder / "tiny.json"), "--epochs", "2",
                 "--no-progress", "--out", str(folder / "run")])
    assert code == 0
    return folder / "run" / "model.safetensors"


def adapt_argv(seed: Path, out: Path, db: Path, *extra: str) -> list[str]:
    # Cuts of 2%: with 5%, a 2-core AVX-512 Xeon had one feasible proposal at step 1 and none at step 2.
    return ["adapt", "--weights", str(seed), "--data", "digits", "--target-ratio", "0.96", "--delta", "0.02",
            "--steps", "3", "--out", str(out), "--db", f"sqlite:///{db}", "--no-progress", "--threads", "1",
            *extra]


def test_adapt_end_to_end_cli(seed_model, tmp_path, capsys):
    code = main(adapt_argv(seed_model, tmp_path / "run", tmp_path / "lut.sqlite", "--json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) >= {"spec", "accuracy", "predicted_ms", "measured_ms", "steps", "model"}
    assert doc["measured_ms"] <= doc["target_ms"] < doc["seed_ms"] and doc["steps"] >= 1
    model = mnv3.load(doc["model"])
    seed = mnv3.load(seed_model)
    assert model.spec == mnv3.ArchSpec.from_dict(doc["spec"])
    assert mnv3.count(model.spec, 10).params < mnv3.count(seed.spec, 10).params
    assert mnv3.ArchSpec.load(tmp_path / "run" / "spec.json") == model.spec
    with open(tmp_path / "run" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["layer"] == "seed" and sum(int(r["chosen"]) for r in rows) == doc["steps"] + 1
    # Every evaluated proposal is a row (rejected ones too). How many proposals are feasible depends on
    # the measured latencies: on a loaded machine one step once had a single feasible proposal.
    assert len(rows) >= doc["steps"] + 1 and all(r["accuracy"] for r in rows)
    assert (tmp_path / "run" / "trajectory.png").stat().st_size > 1000
    # the same command again: the run is complete, nothing is fine-tuned again
    code = main(adapt_argv(seed_model, tmp_path / "run", tmp_path / "lut.sqlite"))
    _, err = capsys.readouterr()
    assert code == 0 and "resuming" in err
    # other settings on the same folder are refused, naming the difference
    code = main(adapt_argv(seed_model, tmp_path / "run", tmp_path / "lut.sqlite", "--select", "accuracy"))
    _, err = capsys.readouterr()
    assert code == 2 and "select" in err.strip().splitlines()[-1] and "Traceback" not in err


def _done(db: Path) -> dict[tuple[int, str], tuple[float, float]]:
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("select step, layer, accuracy, seconds from adapt_proposals where state='done'")
            return {(s, lay): (a, sec) for s, lay, a, sec in rows}
    except sqlite3.OperationalError:
        return {}


def test_adapt_resumes_after_sigkill_without_losing_a_finished_fine_tune(seed_model, tmp_path):
    out, db = tmp_path / "run", tmp_path / "lut.sqlite"
    # A farther target: several steps of several proposals, so that the kill comes mid-run.
    argv = [sys.executable, "-m", "mnv3", *adapt_argv(seed_model, out, db, "--heartbeat", "1", "--target-ratio",
                                                      "0.9")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(_done(out / "history.sqlite")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _done(out / "history.sqlite")
    assert len(before) >= 2
    done = subprocess.run(argv + ["--json"], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _done(out / "history.sqlite")
    assert all(after[k] == v for k, v in before.items())      # kept as they were, not fine-tuned again
    assert json.loads(done.stdout)["measured_ms"] <= json.loads(done.stdout)["target_ms"]


@pytest.mark.parametrize("case", ["above", "unreachable", "no_spec", "other_classes", "bad_db", "bad_ratio"])
def test_adapt_bad_input_is_one_clear_error(case, seed_model, tmp_path, capsys):
    db = tmp_path / "lut.sqlite"
    argv = adapt_argv(seed_model, tmp_path / "run", db)
    expect = {"above": "already runs in", "unreachable": "can be cut by", "no_spec": "not an mnv3 model file",
              "other_classes": "other classes", "bad_db": "database", "bad_ratio": "--target-ratio"}[case]
    if case == "above":
        argv[argv.index("--target-ratio"):argv.index("--target-ratio") + 2] = ["--target-ms", "1000"]
    elif case == "unreachable":
        argv[argv.index("--delta") + 1] = "0.6"
        argv[argv.index("--target-ratio") + 1] = "0.3"
    elif case == "no_spec":
        from safetensors.torch import save_file

        plain = tmp_path / "plain.safetensors"
        save_file({"w": torch.zeros(2)}, str(plain))
        argv[argv.index("--weights") + 1] = str(plain)
    elif case == "other_classes":
        argv[argv.index("--data") + 1] = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera")
    elif case == "bad_db":
        db.write_bytes(os.urandom(4096))
    elif case == "bad_ratio":
        argv[argv.index("--target-ratio") + 1] = "1.5"
    code = main(argv)
    _out, err = capsys.readouterr()
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and expect in last and "Traceback" not in err, last


def test_two_workers_share_a_step_on_postgresql(seed_model, tmp_path, pg_url):
    """Two `mnv3 adapt` processes on one PostgreSQL history: one is killed mid-fine-tune; the other
    takes over its proposal and finishes the run; every proposal is fine-tuned and recorded once."""
    import sqlalchemy as sa

    def worker() -> subprocess.Popen:
        # --delta 0.02: enough feasible proposals in step 1 for two workers, whatever this CPU's
        # latencies (at 0.05 a host gave only two, and the workers ran one each and were done)
        argv = [sys.executable, "-m", "mnv3", *adapt_argv(seed_model, tmp_path / "run", tmp_path / "lut.sqlite",
                                                          "--storage", pg_url, "--heartbeat", "1", "--delta", "0.02",
                                                          "--target-ratio", "0.98")]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    engine = sa.create_engine(pg_url)

    def rows() -> list[tuple[str, str, str]]:
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text("select layer, state, worker from adapt_proposals "
                                            "where step = 1")).fetchall()
        except sa.exc.ProgrammingError:        # the tables are not created yet
            return []

    a, b = worker(), worker()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None and b.poll() is None:   # kill a while both fine-tune
            if len({w for _, s, w in rows() if s == "running"}) == 2:
                break
            time.sleep(0.1)
        else:
            for proc in (a, b):
                proc.kill()
            pytest.fail("the two workers never fine-tuned at the same time: "
                        + " | ".join(p.communicate()[1][-1500:] for p in (a, b)))
        a_name = f"{os.uname().nodename}:{a.pid}"
        a.send_signal(signal.SIGKILL)
        a.wait()
        taken = [lay for lay, s, w in rows() if s == "running" and w == a_name]
        _, err = b.communicate(timeout=600)
        assert b.returncode == 0, err[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    final = {lay: (s, w) for lay, s, w in rows()}
    assert all(s == "done" for s, _ in final.values())
    assert len(taken) == 1 and final[taken[0]][1] != a_name      # a's proposal, finished by b
    with engine.connect() as conn:
        steps = conn.execute(sa.text("select step from adapt_steps order by step")).fetchall()
    assert [s for (s,) in steps] == list(range(len(steps))) and len(steps) >= 2
    folders = list((tmp_path / "run" / "steps" / "001").iterdir())
    assert sorted(f.name for f in folders) == sorted(final)        # one folder per proposal


def test_measure_mode_times_every_candidate_end_to_end(tmp_path):
    from mnv3.adapt.latency import AdaptLatency
    from mnv3.latency import get_runtime

    spec = SPECS["small_s8"]
    lat = AdaptLatency(get_runtime("onnxruntime"), spec, db=f"sqlite:///{tmp_path / 'lut.sqlite'}", mode="measure",
                       num_classes=10)
    seed_ms = lat.measure_seed(spec)
    lat.anchor(spec, seed_ms)
    small = spec
    for name in ("last_conv", "pre_logits", "expand10", "expand11"):      # the head and two blocks at 8
        small = shrink(small, name, 8)
    same, cut = lat.predictor(spec, seed_ms)([spec, small])
    assert abs(same / seed_ms - 1) < 0.25 and cut < same
    assert lat.added == 0                               # no table parts: whole networks only
