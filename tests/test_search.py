"""The search: genomes, the reward, strategies on a synthetic objective, the proxy oracle's splits,
and `mnv3 search` end to end (resume after SIGKILL, bad input)."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import mnv3
from mnv3.cli import main
from mnv3.search.genome import GenomeError, GenomeSpace
from mnv3.search.oracle import search_splits
from mnv3.search.reward import Reward, RewardError
from mnv3.search.strategies import PPOSampler, StrategyError, make_sampler
from mnv3.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tiny_space(**choices) -> SearchSpace:
    seed = mnv3.with_total_stride(mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32), 8)
    return SearchSpace(seed, **choices)


# -- genome ----------------------------------------------------------------------------------------------
def test_genome_round_trip_over_many_random_genomes():
    space = tiny_space()
    genomes = GenomeSpace(space)
    rng = random.Random(0)
    table_keys = {e.key() for e in space.block_entries()}
    seen = set()
    for _ in range(300):
        g = genomes.random(rng)
        spec = genomes.decode(g)
        spec.validate()
        assert {e for e in _block_keys(space, spec)} <= table_keys      # the table covers it
        canon = genomes.encode(spec)
        assert genomes.canonical(g) == canon and genomes.canonical(canon) == canon
        assert genomes.decode(canon, spec.name) == spec
        seen.add(genomes.spec_key(spec))
    assert len(seen) > 250
    # every network the space samples has a genome
    for _ in range(50):
        spec = space.sample(rng)
        assert genomes.decode(genomes.encode(spec), spec.name) == spec


def _block_keys(space, spec):
    from mnv3.space import BlockEntry

    size = -(-space.seed.resolution // space.seed.stem.stride)
    cin, keys = space.seed.stem.out, []
    for b in spec.blocks:
        keys.append(BlockEntry(size, cin, b).key())
        size, cin = -(-size // b.stride), b.out
    return keys


def test_unused_slots_do_not_make_another_network():
    genomes = GenomeSpace(tiny_space(depth_deltas=(-1, 0)))
    g = list(genomes.random(random.Random(1)))
    depth = genomes.index["s4.depth"]
    g[depth] = min(genomes.genes[depth].choices)
    last_slot = genomes.index[f"s4.b{max(genomes.genes[depth].choices)}.kernel"]
    other = list(g)
    other[last_slot] = next(k for k in genomes.genes[last_slot].choices if k != g[last_slot])
    assert genomes.decode(g) == genomes.decode(other)
    assert genomes.canonical(g) == genomes.canonical(other)
    assert genomes.digest(g) == genomes.digest(other)


def test_genome_choices_are_plain_and_fixed():
    genomes = GenomeSpace(tiny_space())
    for gene in genomes.genes:
        assert all(isinstance(c, (int, float, str)) and not isinstance(c, bool) for c in gene.choices)
        assert len(set(gene.choices)) == len(gene.choices)
    assert GenomeSpace(tiny_space()).genes == genomes.genes       # the same space, the same genes


def test_genome_errors():
    genomes = GenomeSpace(tiny_space())
    with pytest.raises(GenomeError, match="genes"):
        genomes.decode((3, 5))
    g = list(genomes.random(random.Random(0)))
    g[genomes.index["s1.b1.kernel"]] = 4
    with pytest.raises(GenomeError, match="s1.b1.kernel: 4 is not one of"):
        genomes.decode(g)
    with pytest.raises(GenomeError, match="not a network of this space"):
        genomes.encode(mnv3.preset("mobilenet_v3_large", resolution=32))


# -- reward ----------------------------------------------------------------------------------------------
def test_reward_modes():
    soft = Reward.make("soft", 10.0)
    assert (soft.alpha, soft.beta) == (-0.07, -0.07)
    assert soft(0.8, 10.0) == pytest.approx(0.8)
    assert soft(0.8, 20.0) == pytest.approx(0.8 * 2 ** -0.07)
    assert soft(0.8, 5.0) == pytest.approx(0.8 * 0.5 ** -0.07)     # faster than T is rewarded too
    # MnasNet's example: a 2x slower model must be about 5% more accurate to be worth the same
    assert soft(0.8 * 2 ** 0.07, 20.0) == pytest.approx(soft(0.8, 10.0))
    hard = Reward.make("hard", 10.0)
    assert hard(0.8, 5.0) == pytest.approx(0.8) and hard(0.8, 10.0) == pytest.approx(0.8)
    assert hard(0.8, 20.0) == pytest.approx(0.4)
    small = Reward.make("soft", 10.0, -0.15)
    assert small(0.8, 20.0) == pytest.approx(0.8 * 2 ** -0.15)
    pareto = Reward.make("pareto", 10.0)
    assert pareto.directions == ["maximize", "minimize"] and soft.directions == ["maximize"]
    for bad in (lambda: Reward.make("fast", 10), lambda: Reward.make("soft", 0), lambda: Reward.make("soft", 10, 0.1),
                lambda: Reward.make("hard", 10, -0.1), lambda: soft(0.5, -1)):
        with pytest.raises(RewardError):
            bad()


# -- strategies on a synthetic objective -----------------------------------------------------------------
def _synthetic(genomes: GenomeSpace, target):
    def objective(trial):
        g = genomes.from_params({x.name: trial.suggest_categorical(x.name, x.choices) for x in genomes.genes})
        return sum(a == b for a, b in zip(g, target)) / len(g)
    return objective


SYNTHETIC = {"evolution": {"population": 16, "sample_size": 4},
             # a learning rate for 120 trials of a synthetic objective; the default is MnasNet's 0.00035
             "ppo": {"lr": 0.03, "batch": 10, "hidden": 32}}


@pytest.mark.parametrize("strategy", sorted(SYNTHETIC))
def test_strategy_beats_random_on_a_synthetic_objective(strategy):
    genomes = GenomeSpace(tiny_space(widths=(1.0,), depth_deltas=(0,)))
    trials, wins = 120, 0
    for seed in range(3):
        target = genomes.random(random.Random(100 + seed))
        best = {}
        for name, opts in (("random", {}), (strategy, SYNTHETIC[strategy])):
            study = optuna.create_study(direction="maximize", sampler=make_sampler(name, genomes, seed=seed, **opts))
            study.optimize(_synthetic(genomes, target), n_trials=trials)
            # the mean of the last 20 trials: a strategy that learns proposes better genomes over time
            tail = [t.value for t in study.trials[-20:]]
            best[name] = sum(tail) / len(tail)
        wins += best[strategy] > best["random"] + 0.03
    assert wins >= 2, best


def test_evolution_rebuilds_its_population_from_the_study():
    genomes = GenomeSpace(tiny_space())
    target = genomes.random(random.Random(5))
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(direction="maximize", storage=storage, study_name="s",
                                sampler=make_sampler("evolution", genomes, seed=0, population=8, sample_size=3))
    study.optimize(_synthetic(genomes, target), n_trials=30)
    # a new sampler (another worker, or the same command again) continues from the study alone
    again = optuna.load_study(study_name="s", storage=storage,
                              sampler=make_sampler("evolution", genomes, seed=1, population=8, sample_size=3))
    again.optimize(_synthetic(genomes, target), n_trials=10)
    children = again.trials[30:]
    parents = [genomes.from_params(t.params) for t in again.trials[22:30]]
    for child in children[:1]:        # the first child is one choice away from a member of the last 8
        g = genomes.from_params(child.params)
        assert min(sum(a != b for a, b in zip(g, p)) for p in parents) == 1


def test_ppo_replays_to_the_same_controller():
    genomes = GenomeSpace(tiny_space(widths=(1.0,), depth_deltas=(0,)))
    target = genomes.random(random.Random(3))
    opts = {"batch": 5, "hidden": 16, "lr": 0.01}
    storage = optuna.storages.InMemoryStorage()
    first = make_sampler("ppo", genomes, seed=0, **opts)
    study = optuna.create_study(direction="maximize", storage=storage, study_name="p", sampler=first)
    study.optimize(_synthetic(genomes, target), n_trials=17)
    assert first.updates == 3 and all("ppo_logp" in t.user_attrs for t in study.trials)
    rebuilt = make_sampler("ppo", genomes, seed=0, **opts)
    assert isinstance(rebuilt, PPOSampler)
    rebuilt.learn(optuna.load_study(study_name="p", storage=storage))
    assert rebuilt.updates == 3 and rebuilt.baseline == pytest.approx(first.baseline)
    for a, b in zip(first.controller.parameters(), rebuilt.controller.parameters()):
        assert (a - b).abs().max() < 1e-6


def test_strategy_errors():
    genomes = GenomeSpace(tiny_space())
    with pytest.raises(StrategyError, match="expected one of"):
        make_sampler("annealing", genomes)
    with pytest.raises(StrategyError, match="nsga2"):
        make_sampler("evolution", genomes, pareto=True)
    with pytest.raises(StrategyError, match="--reward pareto"):
        make_sampler("nsga2", genomes)
    with pytest.raises(StrategyError, match="unknown option"):
        make_sampler("ppo", genomes, learning_rate=1)


# -- the proxy's data --------------------------------------------------------------------------------------
def test_search_splits_hold_out_training_images_and_never_the_test_split():
    from mnv3.data.datasets import open_data

    full = open_data("digits")
    split = search_splits(full, held_out=0.2, subset=300, seed=0)
    assert len(split.train) == 300
    assert abs(len(split.val) - 0.2 * len(full.train)) <= len(full.classes)
    train_px = {split.train.arrays[i].tobytes() for i in range(len(split.train))}
    held_px = {split.val.arrays[i].tobytes() for i in range(len(split.val))}
    all_train = {full.train.arrays[i].tobytes() for i in range(len(full.train))}
    assert held_px <= all_train and train_px <= all_train
    assert not (held_px & train_px) or len(held_px & train_px) < 5      # digits has a few duplicate images
    again = search_splits(full, held_out=0.2, subset=300, seed=0)
    assert again.train.labels == split.train.labels                      # fixed: the same every run
    assert math.isclose(sum(split.val.labels) / len(split.val), sum(full.train.labels) / len(full.train), rel_tol=0.1)
    assert json.dumps(sorted(set(split.val.labels))) == json.dumps(list(range(10)))
    counted = search_splits(full, held_out=100)               # a number of images, not a fraction
    assert abs(len(counted.val) - 100) <= 10 and len(counted.train) == len(full.train) - len(counted.val)
    from mnv3.data import DataError

    for bad in (0, len(full.train)):
        with pytest.raises(DataError, match="--proxy-held-out"):
            search_splits(full, held_out=bad)


# -- mnv3 search end to end ----------------------------------------------------------------------------

QUICK = ["--proxy-epochs", "1", "--proxy-subset", "160", "--no-progress", "--final-k", "2", "--references", "none"]


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    space = tiny_space(kernels=(3, 5), expansion_ratios=(3.0,), se=(False, True), activations=("relu",),
                       widths=(1.0,), depth_deltas=(-1, 0))
    path = tmp_path_factory.mktemp("space") / "space.json"
    path.write_text(json.dumps(space.to_dict()))
    return path


def finished_trials(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select number, state from trials order by number").fetchall()


def test_search_measure_end_to_end_then_train_the_winner(space_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["search", "--space", str(space_file), "--latency", "measure", "--trials", "4",
                 "--target-of", "mobilenet_v3_small", "--target-width", "0.35", "--out", str(out), *QUICK, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    # the space's heads are ImageNet's, the data's are not: said, with the flag that changes it
    assert "latencies include a 1000-class classifier (the space's) while digits has 10 classes; pass " \
           "--classes 10" in captured.err
    assert doc["trials"] == 4 and doc["best"] == str(out / "best.json")
    assert 0 <= doc["accuracy"] <= 1 and doc["predicted_ms"] > 0 and doc["measured_ms"] > 0
    assert doc["reward"] == pytest.approx(Reward.make("soft", doc["target_ms"])(doc["accuracy"], doc["predicted_ms"]))
    for name in ("best.json", "trials.csv", "pareto.png", "progress.png", "summary.json", "space.json"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    trial = out / "trials" / "00000"         # a proxy training's folder: metrics, and curves drawn at its end
    assert (trial / "curves.png").read_bytes()[:4] == b"\x89PNG" and (trial / "metrics.csv").is_file()
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {"trial", "genome", "spec_key", "accuracy", "predicted_ms", "measured_ms", "reward",
                                "params", "macs", "seconds"} <= set(rows[0])
    genomes = GenomeSpace(SearchSpace.from_dict(json.loads(space_file.read_text())))
    best = mnv3.ArchSpec.load(out / "best.json")
    assert genomes.encode(best)                          # a network of the space, usable by every command
    code = main(["info", str(out / "best.json"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["params"] > 0
    # running the same command again finds the work done: nothing is trained again
    code = main(["search", "--space", str(space_file), "--latency", "measure", "--trials", "4",
                 "--target-of", "mobilenet_v3_small", "--target-width", "0.35", "--out", str(out), *QUICK])
    err = capsys.readouterr().err
    assert code == 0 and "4 of 4 trials finished" in err
    assert len(finished_trials(out / "search.sqlite")) == 4
    # --rerank: the 2 best trained again with another seed, ranked by the mean; kept in the study
    rerun = ["search", "--space", str(space_file), "--latency", "measure", "--trials", "4", "--target-of",
             "mobilenet_v3_small", "--target-width", "0.35", "--out", str(out), *QUICK, "--rerank", "2",
             "--rerank-seeds", "2", "--json"]
    code = main(rerun)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("proxy training, seed 1") == 2 and "mean of 2 proxy trainings" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    finals = summary["finals"]
    assert summary["rerank"] == {"networks": 2, "seeds": 2}
    for f in finals:
        assert len(f["accuracy_seeds"]) == 2 and f["accuracy_seeds"][0] == f["search_accuracy"]
        assert f["accuracy"] == pytest.approx(sum(f["accuracy_seeds"]) / 2)
        assert f["reward"] == pytest.approx(Reward.make("soft", summary["target_ms"])(f["accuracy"], f["predicted_ms"]))
    assert finals[0]["reward"] >= finals[1]["reward"] and json.loads(captured.out)["accuracy"] == finals[0]["accuracy"]
    with open(out / "trials.csv") as f:
        reranked = [r for r in csv.DictReader(f) if r["rerank_accuracy"]]
    assert {int(r["trial"]) for r in reranked} >= {f["trial"] for f in finals}
    assert main(rerun) == 0 and "proxy training, seed" not in capsys.readouterr().err     # nothing trained again


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "evolution", "--reward", "pareto"], "use --strategy nsga2"),
    (["--target-ms", "0.00001"], "below the fastest network of the space"),
    (["--target-ms", "1", "--target-of", "mobilenet_v3_small"], "give one"),
    (["--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--target-ms", "100"], "cannot connect"),
    (["--latency", "predict", "--db", "sqlite:///{tmp}/empty.sqlite", "--target-ms", "100"], "mnv3 lut build"),
    (["--w", "0.5"], "negative exponent"),
    (["--trials", "0"], "at least 1"),
    (["--classes", "0"], "--classes 0: a classifier needs 1 class or more"),
    (["--references", "none", "0.5"], "give it alone"),
    (["--rerank", "2", "--rerank-seeds", "1"], "S >= 2 seeds"),
    (["--rerank", "-1"], "--rerank -1"),
    (["--rerank", "2", "--reward", "pareto", "--strategy", "nsga2"], "there is a front"),
    (["--rerank", "2", "--oracle", "supernet:nowhere"], "no training seed"),
])
def test_search_bad_input_is_one_line(extra, message, space_file, tmp_path, capsys):
    argv = ["search", "--space", str(space_file), "--latency", "measure", "--out", str(tmp_path / "run"),
            *QUICK, *[a.format(tmp=tmp_path) for a in extra]]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last and "Traceback" not in err


def test_a_bad_reference_width_is_refused_before_the_search(space_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--space", str(space_file), "--out", str(tmp_path / "run"), *QUICK, "--references", "wide"])
    assert exit_.value.code == 2 and "expected a width above 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_study_of_another_space_is_refused(space_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--latency", "measure", "--trials", "1", "--target-ms", "100", "--out", str(out), *QUICK]
    assert main(["search", "--space", str(space_file), *args]) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(tiny_space(kernels=(3,), expansion_ratios=(3.0,)).to_dict()))
    before = finished_trials(out / "search.sqlite")
    capsys.readouterr()
    assert main(["search", "--space", str(other), *args]) == 2
    err = capsys.readouterr().err
    assert "was created for another search" in err and "space" in err
    assert finished_trials(out / "search.sqlite") == before          # nothing finished is touched


def test_search_resumes_after_sigkill(space_file, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "mnv3", "search", "--space", str(space_file), "--latency", "measure",
            "--trials", "4", "--target-ms", "100", "--strategy", "random", "--out", str(out), *QUICK]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    db = out / "search.sqlite"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:       # kill it while trial 1 trains, after trial 0 finished
            try:
                with sqlite3.connect(db) if db.exists() else contextlib.nullcontext() as conn:
                    genes = dict(conn.execute(
                        "select t.state || t.number, count(p.param_id) from trials t left join trial_params p "
                        "on p.trial_id = t.trial_id group by t.trial_id").fetchall()) if conn else {}
            except sqlite3.OperationalError:  # the tables are being created
                genes = {}
            complete = [n for k, n in genes.items() if k.startswith("COMPLETE")]
            # training, not still drawing its genes (a trial killed with no genes has nothing to retry)
            if complete and any(k.startswith("RUNNING") and n == complete[0] for k, n in genes.items()):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the search never had a finished and a running trial")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {n: s for n, s in finished_trials(db)}
    done_before = [n for n, s in before.items() if s == "COMPLETE"]
    assert done_before and "RUNNING" in before.values()
    with sqlite3.connect(db) as conn:
        first_value = conn.execute("select value from trial_values where trial_id = 1").fetchone()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = finished_trials(db)
    assert sum(s == "COMPLETE" for _, s in after) == 4
    assert all(dict(after)[n] == "COMPLETE" for n in done_before)          # nothing finished is lost
    with sqlite3.connect(db) as conn:
        assert conn.execute("select value from trial_values where trial_id = 1").fetchone() == first_value
        killed = [n for n, s in before.items() if s == "RUNNING"]
        assert all(dict(after)[n] == "FAIL" for n in killed)              # the killed trial, failed ...
        retried = conn.execute("select value_json from trial_user_attributes where key = 'retry_of'").fetchall()
    assert [json.loads(v) for (v,) in retried] == killed                    # ... and its genome run again


def test_workers_opening_a_new_postgresql_database_together_all_get_the_storage(pg_server, monkeypatch):
    """Workers started at the same moment on an empty database race to create Optuna's tables
    (CI saw one fail with "relation 'studies' already exists"; threads here hit the duplicate
    catalogue key). The advisory lock alone must serialise them: the retry is switched off."""
    import threading

    from mnv3.search import run

    assert run._create_race(ValueError('relation "studies" already exists'))   # the error CI saw is retried
    monkeypatch.setattr(run, "_create_race", lambda exc: False)
    n = 6

    def worker(url, barrier, storages, errors):
        barrier.wait()
        try:
            storages.append(run.open_storage(url))
        except Exception as exc:  # noqa: BLE001 - collected and shown below
            errors.append(str(exc))

    for _ in range(2):
        url, barrier, storages, errors = pg_server.url(pg_server.new_database()), threading.Barrier(n), [], []
        threads = [threading.Thread(target=worker, args=(url, barrier, storages, errors)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        optuna.create_study(storage=storages[0], study_name="one")
        assert all([s.study_name for s in optuna.get_all_study_summaries(st)] == ["one"] for st in storages)


def test_two_workers_share_a_postgresql_study(space_file, tmp_path, pg_url):
    """Two `mnv3 search` processes on one study: one is killed mid-trial; the other finishes every
    requested trial, the killed trial is marked failed by the heartbeat and its network run again,
    and no network is trained twice by accident."""
    import sqlalchemy as sa

    def worker(name: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "mnv3", "search", "--space", str(space_file), "--latency", "measure",
                "--trials", "10", "--target-ms", "100", "--strategy", "random", "--seed", str(len(name)),
                "--storage", pg_url, "--study", "shared", "--heartbeat", "2", "--out", str(tmp_path / name),
                *QUICK]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    engine = sa.create_engine(pg_url)

    def states() -> list[tuple[int, str]]:
        try:
            with engine.connect() as conn:
                return conn.execute(sa.text("select number, state from trials order by number")).fetchall()
        except sa.exc.ProgrammingError:       # the tables are not created yet
            return []

    a = worker("a")
    b = worker("bb")
    try:
        deadline, ready = time.time() + 300, False
        while time.time() < deadline and a.poll() is None and b.poll() is None:   # a dead worker ends the wait
            now = states()      # kill worker a while both train a trial
            ready = sum(s == "COMPLETE" for _, s in now) >= 1 and sum(s == "RUNNING" for _, s in now) >= 2
            if ready:
                break
            time.sleep(0.2)
        if not ready:
            for proc in (a, b):
                proc.kill()
            pytest.fail("the two workers never trained at the same time: "
                        + " | ".join(p.communicate()[1][-1500:] for p in (a, b)))
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed_running = [n for n, s in states() if s == "RUNNING"]
        _, err = b.communicate(timeout=600)
        assert b.returncode == 0, err[-3000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    final = states()
    assert sum(s == "COMPLETE" for _, s in final) >= 10
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "select t.number, a.key, a.value_json from trials t join trial_user_attributes a "
            "on a.trial_id = t.trial_id where t.state = 'COMPLETE'")).fetchall()
    attrs: dict[int, dict] = {}
    for number, key, value in rows:
        attrs.setdefault(number, {})[key] = json.loads(value)
    trained = [a["spec_key"] for a in attrs.values() if "duplicate_of" not in a]
    assert len(trained) == len(set(trained))                # each network trained once
    # a's trial (one of the two running at the kill; b finished its own): failed by the heartbeat, and
    # its network queued again (and run by b, unless b had finished the requested trials by then)
    failed = [n for n in killed_running if dict(final)[n] == "FAIL"]
    assert len(failed) == 1, final
    # (a was killed after suggesting some or all of its genes: the retry carries those and draws the rest)
    study = optuna.load_study(study_name="shared", storage=pg_url)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    lost = trials[failed[0]].params
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == failed[0]]
    assert retries and all(t.params.items() >= lost.items() for t in retries), \
        [(t.number, t.state, t.params) for t in retries]
    assert any(t.state in (TrialState.COMPLETE, TrialState.WAITING) for t in retries), \
        [(t.number, t.state) for t in retries]
    engine.dispose()


def test_a_leaving_worker_fails_a_dead_workers_trial(tmp_path):
    """The last worker to leave does not leave a dead worker's trial RUNNING: it waits (at most one
    grace period and one heartbeat interval) until the trial's heartbeat is stale, fails it and
    queues its network again; a trial with a fresh heartbeat is left alone."""
    from mnv3.search.run import Search, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.sqlite'}", heartbeat=1, grace=2)
    study = optuna.create_study(storage=storage, study_name="s")
    dead = study.ask()
    dead.suggest_int("x", 0, 9)
    storage.record_heartbeat(dead._trial_id)       # then its worker dies: no more heartbeats
    leaving = Search.__new__(Search)                # only its storage and study are used here
    leaving.storage, leaving.study = storage, study
    start = time.monotonic()
    leaving._fail_stale_before_leaving()
    took = time.monotonic() - start
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[dead.number] == TrialState.FAIL and 1.5 < took < 4.5
    assert list(states.values()).count(TrialState.WAITING) == 1        # its network, queued again
    # a trial whose worker is alive (its heartbeat kept fresh) is not failed, and the wait is bounded
    import threading

    alive, stop = study.ask(), threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(alive._trial_id)
            stop.wait(0.3)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        start = time.monotonic()
        leaving._fail_stale_before_leaving()
        took = time.monotonic() - start
    finally:
        stop.set()
        beating.join()
    assert 2.5 < took < 4.5
    assert study.get_trials(deepcopy=False)[alive.number].state == TrialState.RUNNING
