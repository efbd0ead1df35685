"""The NetAdapt loop (Yang et al., 2018; MobileNetV3 section 4.2).

From a trained model file, each step:
  1. proposes, for every prunable layer (`prune.layers`), the largest smaller channel count that
     cuts the latency by at least delta x L(seed) (the predictor of `AdaptLatency`); a layer that
     cannot reach the cut proposes nothing;
  2. keeps the weights of each proposal (largest L2 norm) and fine-tunes it for `steps` steps on a
     fixed part of the training set (the same images for every proposal);
  3. ranks the proposals on a split held out from the training set and keeps, by MobileNetV3's rule,
     the one with the largest accuracy change per latency change (`--select ratio`; NetAdapt's own
     rule, the highest accuracy, is `--select accuracy`);
  4. measures the kept network end to end; the next step starts from that measurement.
It stops when the measured latency reaches the target, then fine-tunes the last network longer
(`final_epochs`). Every proposal and step is in the history database as it finishes (`AdaptStore`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnv3.adapt.latency import AdaptLatency
from mnv3.adapt.prune import PruneError, layers, pruned_model, smaller_counts
from mnv3.adapt.store import AdaptStore, config_differences
from mnv3.arch import ArchSpec
from mnv3.data.datasets import ClassificationData, EvalSet, collate, open_data
from mnv3.files import atomic_write_csv, atomic_write_text
from mnv3.search.oracle import _take, search_splits
from mnv3.train.recipe import Recipe, load_recipe
from mnv3.weights import load, model_meta, save

SELECT_RULES = ("ratio", "accuracy")


class AdaptError(PruneError):
    """NetAdapt cannot run as asked; the message says what to change."""


@dataclass
class AdaptConfig:
    weights: str
    data: str
    out: Path
    runtime: str = "onnxruntime"
    target_ms: float | None = None
    target_ratio: float | None = None
    delta: float = 0.01
    steps: int = 100
    select: str = "ratio"
    final_epochs: int = 0
    held_out: float = 0.1
    subset: int | None = None
    recipe: str = "cifar"
    lr: float | None = None
    latency: str = "predict"
    db: str | None = None
    storage: str | None = None
    runtime_threads: int = 1
    max_steps: int = 100
    heartbeat: float = 10.0

    def identity(self, weights_digest: str) -> dict:
        """What a resumed run must share with the run it continues."""
        return {"weights": weights_digest, "data": str(self.data), "runtime": self.runtime,
                "target_ms": self.target_ms, "target_ratio": self.target_ratio, "delta": self.delta,
                "steps": self.steps, "select": self.select, "held_out": self.held_out, "subset": self.subset, "recipe": self.recipe,
                "lr": self.lr, "latency": self.latency, "runtime_threads": self.runtime_threads}


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def heldout_accuracy(model, data: ClassificationData, batch: int = 128) -> float:
    """Top-1 of `model` on `data.val`, preprocessed as the model's file says."""
    loader = torch.utils.data.DataLoader(EvalSet(data.val, model_meta(model).preprocess), batch_size=batch,
                                         collate_fn=collate)
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for x, y, _ in loader:
            if x is None:
                continue
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    if not total:
        raise AdaptError("none of the held-out images could be read")
    return right / total


class NetAdapt:
    def __init__(self, cfg: AdaptConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> None:
        self.cfg, self.log, self.progress = cfg, log, progress
        if cfg.select not in SELECT_RULES:
            raise AdaptError(f"--select {cfg.select!r}: choose one of {', '.join(SELECT_RULES)}")
        if (cfg.target_ms is None) == (cfg.target_ratio is None):
            raise AdaptError("give exactly one of --target-ms T and --target-ratio R")
        if cfg.target_ratio is not None and not 0 < cfg.target_ratio < 1:
            raise AdaptError(f"--target-ratio {cfg.target_ratio:g}: expected a fraction of the model's "
                             "latency in (0, 1), e.g. 0.75")
        if cfg.target_ms is not None and not cfg.target_ms > 0:
            raise AdaptError(f"--target-ms {cfg.target_ms:g}: expected a positive latency in ms")
        if not 0 < cfg.delta < 1:
            raise AdaptError(f"--delta {cfg.delta:g}: expected a fraction of the seed's latency in (0, 1)")
        if cfg.steps < 1 or cfg.max_steps < 1 or cfg.final_epochs < 0:
            raise AdaptError("--steps and --max-steps must be at least 1, --final-epochs at least 0")
        from mnv3.arch import is_model_file

        if not Path(cfg.weights).is_file():
            raise AdaptError(f"--weights {cfg.weights}: no such model file")
        if not is_model_file(cfg.weights):
            raise AdaptError(f"--weights {cfg.weights}: not an mnv3 model file (a .safetensors file that carries "
                             "its network's spec, as mnv3 train writes); bring other weights in with mnv3 convert "
                             "SOURCE --arch ARCH -o FILE and train them on your data with mnv3 train first")
        self.model = load(cfg.weights)
        self.seed_spec: ArchSpec = self.model.spec
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = AdaptStore(cfg.storage or f"sqlite:///{(self.out / 'history.sqlite').resolve()}", "adapt")
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.identity = cfg.identity(file_digest(cfg.weights))
        self._data_splits()

    # -- data ------------------------------------------------------------------------------------
    def _data_splits(self) -> None:
        cfg = self.cfg
        full = open_data(cfg.data)
        classes = model_meta(self.model).classes
        if classes is not None and tuple(classes) != tuple(full.classes):
            raise AdaptError(f"{cfg.weights} was trained on other classes than {cfg.data} holds "
                             f"({len(classes)} vs {len(full.classes)}); adapt it on the data it was trained on")
        if cfg.subset is not None and cfg.subset < len(full.classes):
            raise AdaptError(f"--subset {cfg.subset}: fewer images than the {len(full.classes)} classes")
        self.split = search_splits(full, held_out=cfg.held_out, subset=cfg.subset)
        r = load_recipe(cfg.recipe)
        lr = cfg.lr if cfg.lr is not None else r.lr / 10
        want = cfg.steps * r.batch_size
        n = len(self.split.train)
        if n < r.batch_size:
            raise AdaptError(f"{n} training images after the held-out split: fewer than one batch of {r.batch_size}")
        # A short fine-tune is `steps` steps of the recipe's batch: one epoch over a fixed part of the
        # training images (the same for every proposal), or several epochs when the set is smaller.
        epochs = max(1, math.ceil(want / n))
        images = min(n, -(-want // epochs))
        self.ft_data = dataclasses.replace(self.split, train=_take(self.split.train, np.arange(images)))
        self.ft_recipe = r.override({"epochs": epochs, "lr": lr, "warmup_epochs": 0.0,
                                     "resolution": self.seed_spec.resolution})
        self.final_recipe = r.override({"epochs": max(1, cfg.final_epochs), "lr": lr,
                                        "resolution": self.seed_spec.resolution})

    @property
    def ft_steps(self) -> int:
        return self.ft_recipe.epochs * (len(self.ft_data.train) // self.ft_recipe.batch_size)

    def describe(self) -> str:
        r, steps = self.ft_recipe, self.ft_steps
        return (f"fine-tune: {steps} steps of batch {r.batch_size} at lr {r.lr:g} ({len(self.ft_data.train)} images x "
                f"{r.epochs} epoch(s)); held out {len(self.split.val)} training images for ranking")

    # -- fine-tuning -----------------------------------------------------------------------------
    def _fine_tune(self, model_file: Path, out: Path, data: ClassificationData,
                   recipe: Recipe) -> tuple[float, float, Path]:
        from mnv3.train.classify import train_logged

        result = train_logged(data, out, weights=str(model_file), recipe=recipe, checkpoint_steps=0,
                              progress=False, tensorboard=False)
        (out / "checkpoint.pt").unlink(missing_ok=True)
        return float(result.metrics["val_top1"]), float(result.metrics["val_loss"]), out / "model.safetensors"

    def _evaluate_proposal(self, step: int, prop: dict, current: dict) -> None:
        # A claim of a dead process on this machine is taken at once; another machine's after its
        # heartbeat has been silent for three intervals.
        grace = -1.0 if _dead_here(prop.get("worker")) else 3 * self.cfg.heartbeat
        if not self.store.claim(step, prop["layer"], self.worker, grace=grace):
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.cfg.heartbeat):
                with contextlib.suppress(Exception):
                    self.store.beat(step, prop["layer"], self.worker)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            start = time.perf_counter()
            folder = self.out / "steps" / f"{step:03d}" / prop["layer"]
            folder.mkdir(parents=True, exist_ok=True)
            parent = load(current["model"])
            child = pruned_model(parent, ArchSpec.from_json(prop["spec"]))
            init = save(child, folder / "init.safetensors")
            acc, loss, model_file = self._fine_tune(init, folder / "fine-tune", self.ft_data, self.ft_recipe)
            init.unlink(missing_ok=True)
            self.store.finish(step, prop["layer"], self.worker, acc, loss, time.perf_counter() - start,
                              str(model_file))
        finally:
            stop.set()
            thread.join()

    # -- steps -----------------------------------------------------------------------------------
    def _start(self, lat: AdaptLatency) -> dict:
        steps = self.store.steps()
        if steps:
            stored = json.loads(steps[0]["config"])
            diff = config_differences(stored, self.identity)
            if diff:
                raise AdaptError(f"{self.out} holds a NetAdapt run with other settings ({'; '.join(diff)}); "
                                 "rerun with the same ones to continue it, or choose another --out")
            self.log(f"resuming: {len(steps) - 1} step(s) done")
            return steps[0]
        acc = heldout_accuracy(self.model, self.split)
        ms = lat.measure_seed(self.seed_spec)
        seed_file = save(self.model, self.out / "steps" / "000" / "seed.safetensors")
        return self.store.add_step({"step": 0, "layer": None, "channels": None, "spec": self.seed_spec.to_json(indent=None),
                                    "accuracy": acc, "predicted_ms": ms, "measured_ms": ms, "model": str(seed_file),
                                    "config": json.dumps(self.identity)})

    def _propose(self, current: dict, lat: AdaptLatency, seed_ms: float) -> tuple[list[dict], tuple]:
        """Per layer, the largest smaller count whose latency is at most current - delta x L(seed).
        Also returns the fastest single-layer cut seen (ms, layer, channels), for the error when no
        layer reaches the goal."""
        spec = ArchSpec.from_json(current["spec"])
        goal = current["measured_ms"] - self.cfg.delta * seed_ms
        predict = lat.predictor(spec, current["measured_ms"])
        rows, fastest = [], (math.inf, None, None)
        for layer in layers(spec):
            counts = smaller_counts(spec, layer)
            for start in range(0, len(counts), 4):           # a few counts at a time: parts are measured in one go
                chunk = counts[start:start + 4]
                timed = list(zip(chunk, predict([s for _, s in chunk])))
                fastest = min([fastest] + [(ms, layer.name, c) for (c, _), ms in timed], key=lambda t: t[0])
                hit = [(c, s, ms) for (c, s), ms in timed if ms <= goal]
                if hit:
                    c, s, ms = hit[0]
                    rows.append({"layer": layer.name, "channels": c, "spec": s.to_json(indent=None), "predicted_ms": ms})
                    break
        return rows, fastest

    def _choose(self, current: dict, props: list[dict]) -> dict:
        """MobileNetV3's rule: the largest accuracy change per latency change; NetAdapt's: the highest
        accuracy. Ties (a held-out split the seed was trained on saturates at 100%) go to the lower
        held-out loss."""
        if self.cfg.select == "accuracy":
            return max(props, key=lambda p: (p["accuracy"], -p["loss"]))

        def ratio(p: dict) -> tuple[float, float]:
            cut = max(1e-9, abs(current["measured_ms"] - p["predicted_ms"]))
            return (p["accuracy"] - current["accuracy"]) / cut, -p["loss"]
        return max(props, key=ratio)

    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        lat = AdaptLatency(_runtime(cfg.runtime), self.seed_spec, db=cfg.db or _default_db(), mode=cfg.latency,
                           threads=cfg.runtime_threads, num_classes=self.model.num_classes, log=self.log)
        seed = self._start(lat)
        seed_ms = seed["measured_ms"]
        lat.anchor(self.seed_spec, seed_ms)
        target = cfg.target_ms if cfg.target_ms is not None else cfg.target_ratio * seed_ms
        if target >= seed_ms:
            raise AdaptError(f"--target-ms {target:.3f}: the model already runs in {seed_ms:.3f} ms (measured, "
                             f"{lat.runtime.name}); give a target below that")
        need = math.ceil((seed_ms - target) / (cfg.delta * seed_ms))
        self.log(f"seed {self.seed_spec.name}: held-out top-1 {seed['accuracy']:.4f}, {seed_ms:.3f} ms measured; "
                 f"target {target:.3f} ms, about {need} step(s) of delta {cfg.delta:g} x {seed_ms:.3f} ms")
        self.log(self.describe())
        current = self.store.steps()[-1]
        bar = tqdm(total=need, initial=min(need, current["step"]), unit="step", desc="netadapt", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        while current["measured_ms"] > target:
            step = current["step"] + 1
            if step > cfg.max_steps:
                raise AdaptError(f"stopped after --max-steps {cfg.max_steps} at {current['measured_ms']:.3f} ms, "
                                 f"above the target {target:.3f} ms; raise --max-steps or --delta")
            props = self.store.proposals(step)
            if not props:
                rows, fastest = self._propose(current, lat, seed_ms)
                if not rows:
                    ms, name, channels = fastest
                    best = (f"the largest cut of one layer is {current['measured_ms'] - ms:.3f} ms ({name} to "
                            f"{channels} channels)" if name else "every layer is at 8 channels")
                    raise AdaptError(
                        f"no layer of the step-{step - 1} network ({current['measured_ms']:.3f} ms) can be cut by "
                        f"delta x L = {cfg.delta:g} x {seed_ms:.3f} = {cfg.delta * seed_ms:.3f} ms: {best}. Lower "
                        f"--delta, or the target {target:.3f} ms is below what NetAdapt reaches from this "
                        f"network; the network so far is {current['model']}")
                self.store.add_proposals(step, rows)
                props = self.store.proposals(step)
            bar.set_postfix_str(f"{current['measured_ms']:.3f} ms, top-1 {current['accuracy']:.3f}, "
                                f"{len(props)} proposals")
            # The proposals of this step, fine-tuned by this worker or others, with their own ETA.
            inner = tqdm(total=len(props), desc=f"step {step} fine-tunes", unit="proposal", file=sys.stderr,
                         disable=not self.progress, leave=False, position=1, dynamic_ncols=True)

            def seen(rows: list[dict], inner=inner) -> None:
                inner.update(sum(r["state"] == "done" for r in rows) - inner.n)

            seen(props)
            while True:
                for p in props:
                    if p["state"] != "done":
                        self._evaluate_proposal(step, p, current)
                        seen(self.store.proposals(step))
                props = self.store.proposals(step)
                seen(props)
                if all(p["state"] == "done" for p in props):
                    break
                time.sleep(1.0)           # other workers hold the rest; a dead one's claim expires
            inner.close()
            best = self._choose(current, props)
            measured = lat.measure(ArchSpec.from_json(best["spec"]))
            current = self.store.add_step({"step": step, "layer": best["layer"], "channels": best["channels"],
                                           "spec": best["spec"], "accuracy": best["accuracy"],
                                           "predicted_ms": best["predicted_ms"], "measured_ms": measured,
                                           "model": best["model"]})
            self.log(f"step {step}: {best['layer']} -> {best['channels']} channels; top-1 {best['accuracy']:.4f}, "
                     f"{best['predicted_ms']:.3f} ms predicted, {current['measured_ms']:.3f} measured "
                     f"(of {len(props)} proposals)")
            bar.update(1)
        bar.close()
        return self._finish(current, seed, target, lat)

    def _finish(self, current: dict, seed: dict, target: float, lat: AdaptLatency) -> dict:
        cfg = self.cfg
        final_file, accuracy = Path(current["model"]), current["accuracy"]
        if cfg.final_epochs:
            done = self.out / "final" / "model.safetensors"
            if done.is_file():
                accuracy = heldout_accuracy(load(done), self.split)
            else:
                self.log(f"final fine-tune: {cfg.final_epochs} epoch(s) on {len(self.split.train)} images")
                accuracy, _, done = self._fine_tune(final_file, self.out / "final", self.split, self.final_recipe)
            final_file = done
        shutil.copyfile(final_file, self.out / "model.safetensors.tmp")
        os.replace(self.out / "model.safetensors.tmp", self.out / "model.safetensors")
        spec = ArchSpec.from_json(current["spec"])
        summary = {"spec": spec.to_dict(), "model": str(self.out / "model.safetensors"), "accuracy": accuracy,
                   "seed_accuracy": seed["accuracy"], "predicted_ms": current["predicted_ms"],
                   "measured_ms": current["measured_ms"], "seed_ms": seed["measured_ms"], "target_ms": target,
                   "steps": current["step"], "runtime": lat.runtime.name, "parts_added": lat.added,
                   "fine_tune": {"steps": self.ft_steps, "batch": self.ft_recipe.batch_size,
                                 "images": len(self.ft_data.train), "lr": self.ft_recipe.lr},
                   "final_epochs": cfg.final_epochs}
        self.write_outputs(summary)
        return summary

    def write_outputs(self, summary: dict) -> None:
        steps = self.store.steps()
        chosen = {(s["step"], s["layer"]) for s in steps}
        measured = {s["step"]: s["measured_ms"] for s in steps}
        rows = [{"step": 0, "layer": "seed", "channels": "", "chosen": 1, "accuracy": round(steps[0]["accuracy"], 5),
                 "loss": "",
                 "predicted_ms": round(steps[0]["predicted_ms"], 4), "measured_ms": round(steps[0]["measured_ms"], 4),
                 "params": _params(steps[0]["spec"]), "seconds": ""}]
        for p in self.store.all_proposals():
            if p["state"] != "done":
                continue
            pick = (p["step"], p["layer"]) in chosen
            rows.append({"step": p["step"], "layer": p["layer"], "channels": p["channels"], "chosen": int(pick),
                         "accuracy": round(p["accuracy"], 5), "loss": round(p["loss"], 5),
                         "predicted_ms": round(p["predicted_ms"], 4),
                         "measured_ms": round(measured[p["step"]], 4) if pick else "",
                         "params": _params(p["spec"]), "seconds": round(p["seconds"], 1)})
        atomic_write_csv(self.out / "history.csv", rows)
        trajectory_plot(rows, self.out / "trajectory.png", summary)
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        ArchSpec.from_dict(summary["spec"]).save(self.out / "spec.json")


def _dead_here(worker: str | None) -> bool:
    """Whether `worker` ("host:pid") was a process of this machine that no longer runs."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _params(spec_json: str) -> int:
    from mnv3.complexity import count

    return count(ArchSpec.from_json(spec_json), 10).params


def _runtime(name: str):
    from mnv3.latency import get_runtime

    return get_runtime(name)


def _default_db() -> str:
    from mnv3.latency.table import DEFAULT_URL

    return DEFAULT_URL


def trajectory_plot(rows: list[dict], path: Path, summary: dict) -> None:
    """Accuracy against latency per step: every proposal (predicted ms), the kept ones joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rejected = [r for r in rows if not r["chosen"]]
    kept = [r for r in rows if r["chosen"]]
    ax.scatter([r["predicted_ms"] for r in rejected], [r["accuracy"] for r in rejected], s=12, c="0.6",
               label="proposals (predicted ms)")
    ax.plot([r["measured_ms"] for r in kept], [r["accuracy"] for r in kept], "o-", c="C0",
            label="kept, step by step (measured ms)")
    ax.axvline(summary["target_ms"], ls="--", c="C3", label=f"target {summary['target_ms']:.3f} ms")
    ax.set_xlabel(f"latency, ms ({summary['runtime']})")
    ax.set_ylabel("held-out top-1 after the short fine-tune")
    ax.set_title(f"NetAdapt: {summary['steps']} steps, {summary['seed_ms']:.3f} -> {summary['measured_ms']:.3f} ms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from mnv3.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
