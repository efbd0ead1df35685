"""Search strategies as Optuna samplers over a genome: `random`, `evolution` (regularized
evolution), `ppo` (MnasNet's LSTM controller trained with PPO) and `nsga2` (for the Pareto reward).

The study is the only state. A sampler that needs memory rebuilds it from the study's finished
trials: evolution's population is the last P finished trials; the PPO controller replays its
updates over the finished trials in the order they finished batches, so a resumed search, or a
worker that joins late, reaches the same controller. What a worker must hand to the others (the
log-probability of a genome under the policy that proposed it) is a trial attribute.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from mnv3.search.genome import GenomeSpace, Value

STRATEGIES = ("random", "evolution", "ppo", "nsga2")


class StrategyError(ValueError):
    """An unknown strategy, or one that does not fit the reward (nsga2 needs --reward pareto)."""


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials in the order they were created (trial number)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.number)


class GenomeSampler(BaseSampler):
    """Proposes a whole genome at once (Optuna's relative sampling over every gene)."""

    def __init__(self, genomes: GenomeSpace, seed: int | None = None) -> None:
        self.genomes = genomes
        self.rng = random.Random(seed)
        self.distributions = {g.name: CategoricalDistribution(g.choices) for g in genomes.genes}

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self.distributions)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if not search_space:
            return {}
        return self.genomes.to_params(self.propose(study, trial))

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self.rng.choice(param_distribution.choices)

    def reseed_rng(self) -> None:
        self.rng.seed()

    def propose(self, study: optuna.Study, trial: FrozenTrial) -> tuple[Value, ...]:
        seen = self.seen(study)
        return self.new_genome(lambda: self.genomes.random(self.rng), seen)

    def genome_of(self, trial: FrozenTrial) -> tuple[Value, ...]:
        return self.genomes.from_params(trial.params)

    def seen(self, study: optuna.Study) -> set[tuple[Value, ...]]:
        """Canonical genomes of every trial so far (finished, running or queued)."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                          TrialState.WAITING))
        return {self.genomes._canonical_fast(self.genome_of(t)) for t in trials
                if len(t.params) == len(self.genomes.genes)}

    def new_genome(self, draw, seen: set, tries: int = 100) -> tuple[Value, ...]:
        """`draw()` until it gives a network not seen in the study (a repeat would only reuse a
        result), or `tries` run out in a small, well-explored space."""
        for _ in range(tries):
            genome = draw()
            if self.genomes._canonical_fast(genome) not in seen:
                return genome
        return genome


class RandomSampler(GenomeSampler):
    """Every gene uniformly at random (the baseline every strategy must beat)."""


class EvolutionSampler(GenomeSampler):
    """Regularized evolution (Real et al., AmoebaNet, 2019): the population is the `population`
    most recent finished trials (so the oldest is removed as each child arrives); a parent is the
    best of `sample_size` members drawn with replacement, and its child differs in one choice that
    changes the network. Until the population is full, genomes are random."""

    def __init__(self, genomes: GenomeSpace, seed: int | None = None, *, population: int = 100,
                 sample_size: int = 25) -> None:
        super().__init__(genomes, seed)
        if population < 2 or not 1 <= sample_size <= population:
            raise StrategyError(f"evolution: population {population} and sample size {sample_size} must "
                                "satisfy 2 <= population and 1 <= sample size <= population")
        self.population, self.sample_size = population, sample_size

    def propose(self, study, trial) -> tuple[Value, ...]:
        # Repeats of a network (trials that reused an earlier result) are not members: clones of
        # the best would crowd the population out.
        done = [t for t in finished(study) if "duplicate_of" not in t.user_attrs]
        seen = self.seen(study)
        if len(done) < self.population:
            return self.new_genome(lambda: self.genomes.random(self.rng), seen)
        members = done[-self.population:]

        def child() -> tuple[Value, ...]:
            parent = max((self.rng.choice(members) for _ in range(self.sample_size)), key=lambda t: t.values[0])
            return self.mutate(self.genome_of(parent))

        return self.new_genome(child, seen)

    def mutate(self, genome: Sequence[Value]) -> tuple[Value, ...]:
        """Change one choice; retried until the network changes (a choice of an unused slot, or one
        that rounds to the same channels, would give the parent again)."""
        before = self.genomes.canonical(genome)
        mutable = [i for i, g in enumerate(self.genomes.genes) if len(g.choices) > 1]
        if not mutable:
            return tuple(genome)
        for _ in range(100):
            i = self.rng.choice(mutable)
            child = list(genome)
            child[i] = self.rng.choice([c for c in self.genomes.genes[i].choices if c != genome[i]])
            if self.genomes.canonical(child) != before:
                return tuple(child)
        return tuple(child)


# -- MnasNet's controller -----------------------------------------------------------------------------
# NASNet/MnasNet: a one-layer LSTM of 100 units, weights U(-0.1, 0.1), trained with PPO at learning
# rate 0.00035, entropy weight 1e-5, a moving-average baseline with decay 0.95, one update per 20
# architectures. The papers give no clip range or epoch count: we use PPO's usual 0.2 and 4 epochs.
PPO_DEFAULTS = {"hidden": 100, "lr": 0.00035, "entropy": 1e-5, "baseline_decay": 0.95, "batch": 20,
                "clip": 0.2, "epochs": 4, "init_range": 0.1}


class Controller(nn.Module):
    """Emits the genome's choices one by one: each step reads the previous choice's embedding."""

    def __init__(self, sizes: Sequence[int], hidden: int = 100, init_range: float = 0.1) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.start = nn.Parameter(torch.zeros(1, hidden))
        self.embed = nn.ModuleList(nn.Embedding(n, hidden) for n in self.sizes)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, actions: torch.Tensor | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample one genome (`actions` None) or score a batch [B, genes] of them. Returns
        (actions [B, genes], log-probability [B], entropy [B])."""
        batch = 1 if actions is None else actions.shape[0]
        x = self.start.expand(batch, -1)
        h = c = torch.zeros_like(x)
        taken, logp, entropy = [], torch.zeros(batch), torch.zeros(batch)
        for t, head in enumerate(self.heads):
            h, c = self.cell(x, (h, c))
            log_probs = torch.log_softmax(head(h), dim=-1)
            if actions is None:
                a = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
            else:
                a = actions[:, t]
            taken.append(a)
            logp = logp + log_probs.gather(1, a[:, None]).squeeze(1)
            entropy = entropy - (log_probs.exp() * log_probs).sum(-1)
            x = self.embed[t](a)
        return torch.stack(taken, 1), logp, entropy


class PPOSampler(GenomeSampler):
    """MnasNet's reinforcement learning: the controller proposes genomes; every `batch` finished
    trials it takes `epochs` PPO steps on their rewards (advantage: reward minus a moving-average
    baseline; clipped probability ratio; entropy bonus). The log-probability of each genome under
    the policy that proposed it is stored with its trial (`ppo_logp`)."""

    def __init__(self, genomes: GenomeSpace, seed: int | None = None, **options: float) -> None:
        super().__init__(genomes, seed)
        unknown = set(options) - set(PPO_DEFAULTS)
        if unknown:
            raise StrategyError(f"ppo: unknown option(s) {sorted(unknown)}; known: {sorted(PPO_DEFAULTS)}")
        self.options = {**PPO_DEFAULTS, **options}
        self.seed = 0 if seed is None else seed
        self._reset()

    def _reset(self) -> None:
        o = self.options
        torch.manual_seed(self.seed)      # the same initial controller in every worker and resume
        self.controller = Controller([len(g.choices) for g in self.genomes.genes], int(o["hidden"]),
                                     o["init_range"])
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=o["lr"])
        self.generator = torch.Generator().manual_seed(self.seed + 1)
        self.baseline: float | None = None
        self.used: list[int] = []          # trial numbers the controller has learned from, in order
        self.updates = 0

    def _indices(self, genome: Sequence[Value]) -> list[int]:
        return [g.choices.index(v) for g, v in zip(self.genomes.genes, genome)]

    def learn(self, study: optuna.Study) -> None:
        """Catch up with the study: one update per full batch of finished trials not yet used."""
        done = [t for t in finished(study) if "ppo_logp" in t.user_attrs]
        if self.used and [t.number for t in done[:len(self.used)]] != self.used:
            self._reset()          # trials finished out of order (another worker): replay from the start
        new = done[len(self.used):]
        size = int(self.options["batch"])
        while len(new) >= size:
            self.update(new[:size])
            self.used += [t.number for t in new[:size]]
            new = new[size:]

    def update(self, trials: list[FrozenTrial]) -> None:
        o = self.options
        rewards = torch.tensor([t.values[0] for t in trials], dtype=torch.float32)
        old = torch.tensor([t.user_attrs["ppo_logp"] for t in trials], dtype=torch.float32)
        actions = torch.tensor([self._indices(self.genome_of(t)) for t in trials])
        if self.baseline is None:
            self.baseline = float(rewards.mean())
        advantage = rewards - self.baseline
        for _ in range(int(o["epochs"])):
            _, logp, entropy = self.controller(actions)
            ratio = torch.exp(logp - old)
            surrogate = torch.min(ratio * advantage, ratio.clamp(1 - o["clip"], 1 + o["clip"]) * advantage)
            loss = -(surrogate.mean() + o["entropy"] * entropy.mean())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        for r in rewards.tolist():        # the moving average over every reward seen
            self.baseline = o["baseline_decay"] * self.baseline + (1 - o["baseline_decay"]) * r
        self.updates += 1

    def propose(self, study, trial) -> tuple[Value, ...]:
        self.learn(study)
        with torch.no_grad():
            actions, logp, _ = self.controller(generator=self.generator)
        genome = tuple(g.choices[i] for g, i in zip(self.genomes.genes, actions[0].tolist()))
        study._storage.set_trial_user_attr(trial._trial_id, "ppo_logp", float(logp[0]))
        return genome


def check_strategy(strategy: str, pareto: bool) -> None:
    if strategy not in STRATEGIES:
        raise StrategyError(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if pareto and strategy not in ("nsga2", "random"):
        raise StrategyError(f"--reward pareto has two objectives: use --strategy nsga2 (or random); "
                            f"{strategy} maximises one reward")
    if strategy == "nsga2" and not pareto:
        raise StrategyError("--strategy nsga2 searches a Pareto front: use it with --reward pareto")


def make_sampler(strategy: str, genomes: GenomeSpace, *, seed: int | None = None, pareto: bool = False,
                 **options: Any) -> BaseSampler:
    """The Optuna sampler of `strategy` (options: evolution's population and sample_size, PPO's
    PPO_DEFAULTS keys, nsga2's population)."""
    check_strategy(strategy, pareto)
    if strategy == "random":
        return RandomSampler(genomes, seed)
    if strategy == "evolution":
        return EvolutionSampler(genomes, seed, **options)
    if strategy == "ppo":
        return PPOSampler(genomes, seed, **options)
    population = int(options.pop("population", 20))
    return optuna.samplers.NSGAIISampler(population_size=max(2, population), seed=seed, **options)
