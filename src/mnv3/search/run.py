"""A platform-aware search: an Optuna study whose trials are genomes of a space, each decoded to a
network, timed by the latency source, scored by the accuracy oracle and rewarded with MnasNet's
objective; then the best networks measured end to end, and the run folder's files written.

The study (in its storage: an SQLite file in the run folder, or a PostgreSQL URL shared by
workers) is the only state: a resumed or added worker reads everything from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnv3.arch import ArchSpec
from mnv3.complexity import count
from mnv3.files import atomic_write_csv
from mnv3.search.genome import GenomeSpace
from mnv3.search.reward import Reward
from mnv3.search.strategies import make_sampler
from mnv3.space import SearchSpace

STUDY_FORMAT = "mnv3.search/1"


class SearchError(ValueError):
    """A search that cannot start or continue; the message names the cause and the fix."""


@dataclass
class SearchResult:
    best: ArchSpec
    best_trial: dict[str, Any]
    finals: list[dict[str, Any]]
    trials: int
    out: Path
    summary: dict[str, Any] = field(default_factory=dict)


def stored_target(storage, study: str) -> float | None:
    """T as the study's first run measured it: a resumed search keeps its target instead of
    measuring the reference network again (and getting another figure)."""
    try:
        return optuna.load_study(study_name=study, storage=storage).user_attrs.get("target_ms")
    except KeyError:
        return None


# SQLSTATEs of two workers creating Optuna's tables at once: duplicate table, duplicate object,
# unique violation (PostgreSQL's catalogue rows for a type or an index made twice).
_CREATE_RACE = {"42P07", "42710", "23505"}


def _create_race(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    text = str(orig or exc)
    return code in _CREATE_RACE or "already exists" in text or "duplicate key" in text


@contextlib.contextmanager
def _creation_lock(url: str):
    """On PostgreSQL, a session advisory lock held while one worker creates (or finds) Optuna's
    tables, so that workers started together on a new database do not race to create them; no
    lock elsewhere. Failing to take it is not fatal: the retry in `open_storage` still applies."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy as sa

    engine = conn = None
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        conn = engine.connect()
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtext('mnv3.search: create tables'))"))
    except Exception:  # noqa: BLE001 - unlocked then; a bad URL is reported by RDBStorage, with the fix
        if conn is not None:
            conn.close()
        conn = None
    try:
        yield
    finally:
        if conn is not None:
            conn.close()                    # a session lock ends with its session
        if engine is not None:
            engine.dispose()


def open_storage(url: str, heartbeat: int | None = 10, grace: int | None = 30):
    """Optuna's RDB storage with heartbeats: a trial whose worker died (SIGKILL) is marked failed
    after `grace` seconds without a heartbeat, and put back in the queue once (its genome is
    evaluated again by whichever worker is free)."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=ExperimentalWarning)    # heartbeats: experimental since 2.x
    # Workers started together on a new database race to create Optuna's tables (one fails with
    # "relation already exists" or a duplicate catalogue key). On PostgreSQL an advisory lock
    # serialises the creation; elsewhere, or if the lock could not be taken, the next attempt
    # finds the tables made.
    attempts = 5
    for attempt in range(attempts):
        try:
            with _creation_lock(url):
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                                  engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds for a bad URL
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
            if url.startswith("sqlite"):
                raise SearchError(f"--storage {url}: cannot open or create the SQLite file ({first}); "
                                  "choose another --storage or --out") from None
            if attempt < attempts - 1 and _create_race(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise SearchError(f"--storage {url}: cannot connect ({first}); check the URL and that the server "
                              "runs and accepts this user") from None


class Search:
    """One worker of a search. `run(trials)` adds trials until the study holds `trials` finished
    ones (counting every worker's), then writes the run folder's files."""

    def __init__(self, space: SearchSpace, oracle, latency, reward: Reward, *, strategy: str = "evolution",
                 out: str | Path, storage=None, study: str = "search", seed: int = 0,
                 strategy_options: dict[str, Any] | None = None, heartbeat: int | None = 10,
                 grace: int | None = 30, progress: bool = True, target: str | None = None) -> None:
        self.space, self.oracle, self.latency, self.reward = space, oracle, latency, reward
        self.target = target or f"{reward.target_ms:.6g} ms"     # what T was given as
        self.genomes = GenomeSpace(space)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if storage is None or isinstance(storage, str):
            storage = open_storage(storage or f"sqlite:///{(self.out / 'search.sqlite').resolve()}", heartbeat, grace)
        self.storage = storage
        self.storage_url = str(storage.engine.url.render_as_string(hide_password=True))
        self.study_name, self.strategy, self.progress = study, strategy, progress
        self.sampler = make_sampler(strategy, self.genomes, seed=seed, pareto=reward.mode == "pareto",
                                    **(strategy_options or {}))
        self.study = self._open_study()

    # -- the study ---------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"format": STUDY_FORMAT, "space": self.space.key(), "reward": self.reward.mode,
                "target": self.target, "w": [self.reward.alpha, self.reward.beta],
                "oracle": self.oracle.describe(), "latency": self.latency.name,
                "runtime": self.latency.describe().get("runtime")}

    def _open_study(self) -> optuna.Study:
        try:
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                        directions=self.reward.directions, load_if_exists=True)
        except ValueError as exc:      # directions differ from the stored study's
            raise SearchError(f"study {self.study_name!r} in {self.storage_url}: {exc}; use another --study") from None
        mine = self.identity()
        theirs = study.user_attrs.get("identity")
        if theirs is None:
            study.set_user_attr("identity", mine)
            study.set_user_attr("target_ms", self.reward.target_ms)
            study.set_user_attr("space_json", self.space.to_dict())
        elif theirs != mine:
            diff = [f"{k}: study {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in mine if theirs.get(k) != mine[k]]
            raise SearchError(f"study {self.study_name!r} in {self.storage_url} was created for another search "
                              f"({'; '.join(diff)}); run the same command it was started with, or use another "
                              "--study or --out")
        return study

    def finished(self) -> list[FrozenTrial]:
        return sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)

    # -- one trial ---------------------------------------------------------------------------------
    def objective(self, trial: optuna.Trial):
        params = {g.name: trial.suggest_categorical(g.name, g.choices) for g in self.genomes.genes}
        genome = self.genomes.from_params(params)
        spec = self.genomes.decode(genome)
        key = self.genomes.spec_key(spec)
        trial.set_user_attr("spec_key", key)
        earlier = self._same_network(key, trial.number)
        start = time.perf_counter()
        if earlier is not None:            # the same network again: its result, not a second training
            for name in ("accuracy", "predicted_ms", "params", "macs"):
                trial.set_user_attr(name, earlier.user_attrs[name])
            trial.set_user_attr("duplicate_of", earlier.number)
            accuracy, latency = earlier.user_attrs["accuracy"], earlier.user_attrs["predicted_ms"]
        else:
            cost = count(spec, self.oracle_classes())
            latency = float(self.latency.ms(spec))
            trial.set_user_attr("predicted_ms", latency)
            trial.set_user_attr("params", cost.params)
            trial.set_user_attr("macs", cost.macs)
            accuracy = float(self.oracle.accuracy(spec, self.out / "trials" / f"{trial.number:05d}"))
            trial.set_user_attr("accuracy", accuracy)
        reward = self.reward(accuracy, latency)
        trial.set_user_attr("reward", reward)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("spec", spec.to_dict())
        if self.reward.mode == "pareto":
            return accuracy, latency
        return reward

    def _same_network(self, key: str, number: int) -> FrozenTrial | None:
        """A finished trial of the same network, to reuse. When another worker is training the same
        network under a lower trial number, wait for it: a network is trained once, not once per
        worker that happened to draw it (if that worker dies, its trial fails and this one trains)."""
        while True:
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            same = [t for t in trials if t.user_attrs.get("spec_key") == key and t.number != number]
            done = [t for t in same if t.state == TrialState.COMPLETE and "accuracy" in t.user_attrs]
            if done:
                return min(done, key=lambda t: t.number)
            if not any(t.state == TrialState.RUNNING and t.number < number for t in same):
                return None
            time.sleep(1.0)

    def oracle_classes(self) -> int:
        data = getattr(self.oracle, "data", None)
        return len(data.classes) if data is not None else 1000

    # -- the run -----------------------------------------------------------------------------------
    def run(self, trials: int, minutes: float | None = None) -> int:
        """Add trials until `trials` have finished in the study, or `minutes` have passed (no new
        trial starts after that); returns how many this worker ran."""
        from tqdm import tqdm

        if trials < 1:
            raise SearchError(f"--trials: expected at least 1, got {trials}")
        if self.storage_url.startswith("sqlite"):
            self._fail_orphans()
        done = len(self.finished())
        if done:
            print(f"resuming study {self.study_name!r}: {done} of {trials} trials finished", file=sys.stderr)
        bar = tqdm(total=trials, initial=min(done, trials), desc="search", unit="trial",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        ran = 0

        def after(study: optuna.Study, trial: FrozenTrial) -> None:
            nonlocal ran
            ran += 1
            now = len(self.finished())
            bar.n = min(now, trials)
            best = self.best_trial()
            if best is not None:
                bar.set_postfix(best=f"{best.user_attrs['reward']:.4f}", acc=f"{best.user_attrs['accuracy']:.3f}",
                                ms=f"{best.user_attrs['predicted_ms']:.2f}", refresh=False)
            bar.refresh()
            if now >= trials or out_of_time():
                study.stop()

        started = time.monotonic()

        def out_of_time() -> bool:
            return minutes is not None and time.monotonic() - started > minutes * 60

        while len(self.finished()) < trials and not out_of_time():
            self.study.optimize(self.objective, n_trials=trials - len(self.finished()), callbacks=[after],
                                gc_after_trial=False, show_progress_bar=False)
        bar.close()
        self._fail_stale_before_leaving()
        return ran

    def _fail_stale_before_leaving(self) -> None:
        """A worker that leaves while other trials are still RUNNING waits, at most one grace period
        and one heartbeat interval (past --minutes, if need be), for each to finish or to go stale: a
        dead worker's trial is then failed (and its genome queued again) instead of staying RUNNING in
        a study nobody works on any more. A live worker's long trial costs the leaving one that wait."""
        interval = getattr(self.storage, "heartbeat_interval", None)
        if not interval:
            return
        grace = getattr(self.storage, "grace_period", None) or 2 * interval
        deadline = time.monotonic() + grace + interval
        while True:
            optuna.storages.fail_stale_trials(self.study)   # a dead worker's trial: failed and queued again
            if not self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) \
                    or time.monotonic() > deadline:
                return
            time.sleep(min(1.0, interval / 2))

    def _fail_orphans(self) -> None:
        """An SQLite study belongs to one process: trials left running by a killed run are failed
        now and their genomes put back in the queue, instead of after the heartbeat's grace period."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL) and t.params:
                self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)

    def best_trial(self) -> FrozenTrial | None:
        done = [t for t in self.finished() if "reward" in t.user_attrs]
        return max(done, key=lambda t: t.user_attrs["reward"]) if done else None

    def top(self, k: int) -> list[FrozenTrial]:
        """The k best distinct networks (by reward; with --reward pareto, the front first)."""
        done = [t for t in self.finished() if "reward" in t.user_attrs and "duplicate_of" not in t.user_attrs]
        if self.reward.mode == "pareto":
            front = {t.number for t in self.study.best_trials}
            done.sort(key=lambda t: (t.number not in front, -t.user_attrs["reward"]))
        else:
            done.sort(key=lambda t: -t.user_attrs["reward"])
        return done[:k]

    def rows(self) -> list[dict[str, Any]]:
        rows, measured = [], self.study.user_attrs      # read once: each read is a storage query
        for t in self.finished():
            a = t.user_attrs
            rows.append({"trial": t.number, "genome": json.dumps(self.genomes.from_params(t.params)),
                         "spec_key": a.get("spec_key"), "accuracy": a.get("accuracy"),
                         "predicted_ms": a.get("predicted_ms"),
                         "measured_ms": measured.get(f"measured:{t.number}"),
                         "reward": a.get("reward"), "rerank_accuracy": _mean(measured.get(f"rerank:{a.get('spec_key')}")),
                         "params": a.get("params"), "macs": a.get("macs"),
                         "seconds": round(a.get("seconds", math.nan), 2),
                         "duplicate_of": a.get("duplicate_of", "")})
        return rows

    def write_trials(self) -> Path:
        """trials.csv: one row per finished trial; `rerank_accuracy` is the mean over the seeds of
        `--rerank` for the networks it trained again (empty for the others)."""
        return atomic_write_csv(self.out / "trials.csv", self.rows())


def _mean(accuracies: dict[str, float] | None) -> float | None:
    return sum(accuracies.values()) / len(accuracies) if accuracies else None
