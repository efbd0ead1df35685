"""The search: genomes, the reward, strategies on a synthetic objective, the proxy oracle's splits,
and `mnv3 search` end to end (resume after SIGKILL, bad input)."""

from __future__ import annotations

import json
import math
import random

import optuna
import pytest

import mnv3
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
