"""The training engine: one loop for every task (classification now; segmentation and detection
plug in as tasks), with mixed precision, EMA, clipping, channels_last, optional torch.compile,
torchrun data parallelism, atomic checkpoints and exact resume.

A task says how to compute the loss of a batch and how to score a validation set; the engine does
the rest. Checkpoints hold only tensors and plain values and are read with `weights_only=True`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mnv3.data.datasets import ClassificationData, EpochBatches, EvalSet, TrainSet, collate
from mnv3.data.images import DataError
from mnv3.files import atomic_write, atomic_write_csv, atomic_write_text
from mnv3.train.distributed import Dist, TrainError, convert_sync_bn
from mnv3.train.recipe import Recipe

CHECKPOINT_FORMAT = "mnv3.checkpoint/1"


# -- tasks -----------------------------------------------------------------------------------------
class Task(Protocol):
    name: str

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def train_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]: ...

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]: ...

    def metrics(self, sums: list[float], prefix: str) -> dict[str, float]: ...


class ClassificationTask:
    """Cross-entropy (with label smoothing); train top-1, validation loss/top-1/top-5."""

    name = "classify"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(outputs.float(), targets)

    def train_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        return [float((outputs.argmax(1) == targets).sum())]

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        outputs = outputs.float()
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices == targets[:, None]
        return [float(loss), float(top[:, 0].sum()), float(top.any(1).sum())]

    def metrics(self, sums: list[float], prefix: str) -> dict[str, float]:
        n = max(sums[-1], 1.0)
        if prefix == "train":
            return {"train_top1": sums[0] / n}
        return {"val_loss": sums[0] / n, "val_top1": sums[1] / n, "val_top5": sums[2] / n}


# -- options and results ---------------------------------------------------------------------------
@dataclass
class RunOptions:
    out: Path
    resume: bool = False
    workers: int = 0
    checkpoint_steps: int = 500      # also checkpoint every N optimizer steps (0: at epoch ends only)
    strict: bool = False             # an unreadable image stops the run instead of being skipped
    progress: bool = True
    tensorboard: bool = True
    model_file: str = "model.safetensors"   # the name `save_model` writes in the run folder
    eval_every: int = 1              # validate after every N-th epoch (and the first and last); others: NaN
    curves: str = "epoch"            # curves.png after every epoch, or "end": after the last one only


@dataclass
class TrainResult:
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    run_dir: Path
    model_path: Path | None
    skipped: int

    def as_dict(self) -> dict[str, Any]:
        scores = {"top1": self.metrics.get("val_top1"), "top5": self.metrics.get("val_top5")}
        if "val_miou" in self.metrics:
            scores = {"miou": self.metrics["val_miou"], "pixel_acc": self.metrics.get("val_pixel_acc")}
        if "val_map" in self.metrics:
            scores = {"map": self.metrics["val_map"], "map50": self.metrics.get("val_map50")}
        return {**scores, "model": str(self.model_path) if self.model_path else None, "run": str(self.run_dir),
                "epochs": len(self.history), "skipped_images": self.skipped}


class Ema:
    """Exponential moving average of all weights and buffers, with TF's warm-up of the decay
    (min(decay, (1 + n) / (10 + n))) so short runs are averaged over their own length."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for ours, theirs in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ours.dtype.is_floating_point:
                ours.mul_(d).add_(theirs.detach(), alpha=1 - d)
            else:
                ours.copy_(theirs)


# -- the engine --------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, model: nn.Module, data: ClassificationData, recipe: Recipe, options: RunOptions,
                 task: Task, dist: Dist, pre, identity: dict[str, Any],
                 save_model=None, sets: tuple[Any, Any] | None = None) -> None:
        """`pre`: the Preprocess used for training and evaluation. `identity`: what must match for
        a resume (spec, classes, ...). `save_model(module, path, metrics)` writes the final model.
        `sets`: the (training, validation) datasets of a task whose samples are not classification
        images (segmentation: image and mask; detection: image and box rows); each item is (input,
        target, error or None). A task that scores the whole split at once (detection) may define
        `eval_begin()` and `eval_gather(dist)`, called before and after the validation batches; one
        may define `before_step(trainer)` (called before each optimizer step) and `eval_model(model,
        trainer)` (the module to score in place of `model`): the supernet task does."""
        self.model, self.data, self.recipe, self.opts = model, data, recipe, options
        self.task, self.dist, self.pre, self.identity, self.save_model = task, dist, pre, identity, save_model
        self.out = Path(options.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.world_batch = recipe.batch_size
        self.steps_per_epoch = len(data.train) // recipe.batch_size
        if options.eval_every < 1:
            raise TrainError(f"--eval-every {options.eval_every}: must be 1 or more (1 validates after every epoch)")
        if self.steps_per_epoch < 1:
            raise TrainError(f"batch size {recipe.batch_size} is larger than the {len(data.train)} "
                             "training images; lower --batch-size")
        if recipe.batch_size % dist.world:
            raise TrainError(f"batch size {recipe.batch_size} does not split over {dist.world} "
                             "processes; use a multiple of the process count")
        if recipe.amp == "fp16" and dist.device.type != "cuda":
            raise TrainError("amp fp16 needs a CUDA device; on the CPU use --amp bf16")
        if sets is not None:
            self.train_set, self.val_set = sets
        else:
            self.train_set = TrainSet(data.train, pre, recipe.augment, recipe.min_scale, recipe.hflip, recipe.seed)
            self.val_set = EvalSet(data.val, pre)
        self._writer = None

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        r, d = self.recipe, self.dist
        model = self.model.to(d.device)
        if r.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if d.active and r.sync_bn:
            convert_sync_bn(model, d.device)
        self.frozen = [m for name, m in model.named_children()
                       if r.freeze_backbone and name in ("stem", "blocks", "last_conv", "backbone")]
        for m in self.frozen:
            m.requires_grad_(False)
        if r.freeze_backbone and not self.frozen:
            raise TrainError("--freeze-backbone: this network has no stem/blocks/last_conv to freeze")
        self.ema = Ema(model, r.ema_decay) if r.ema_decay > 0 else None
        self.optimizer = make_optimizer(model, r)
        self.scaler = _grad_scaler() if r.amp == "fp16" else None
        net: nn.Module = model
        if d.active:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
        if r.compile:
            net = torch.compile(net)
        self.net = net
        self.state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "running": None, "skipped": 0,
                      "extended": []}

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "identity": self.identity, "recipe": self.recipe.to_dict(),
                "model": self.model.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                "ema_updates": self.ema.updates if self.ema else 0,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": self._rng_states(), "world": self.dist.world, "threads": torch.get_num_threads(),
                **self.state}

    def save_checkpoint(self) -> None:
        ckpt = self._checkpoint()      # on every process: the random states are gathered
        if self.dist.main:
            atomic_write(self.ckpt_path, lambda tmp: torch.save(ckpt, tmp))
        self.dist.barrier()

    def restore(self) -> None:
        ckpt = read_checkpoint(self.ckpt_path)
        extension = check_resume(ckpt, self.identity, self.recipe, self.ckpt_path)
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
            self.ema.updates = ckpt["ema_updates"]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("world") == self.dist.world:       # each process continues its own dropout stream
            mine = ckpt["rng"][self.dist.rank]
            torch.set_rng_state(mine["cpu"])
            if mine.get("cuda") is not None and self.dist.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.dist.device)
        for key in self.state:
            self.state[key] = ckpt.get(key, self.state[key])     # "extended" is newer than the format
        planned = ckpt["recipe"]["epochs"]
        self.state["history"] = [{"epoch": row["epoch"], "epochs": row.get("epochs", planned), **row}
                                 for row in self.state["history"]]
        if extension is not None:
            self.state["extended"] = [*self.state["extended"], extension]
        if self.dist.main:
            self._announce_resume(extension)
            if ckpt.get("threads", torch.get_num_threads()) != torch.get_num_threads():
                print(f"note: the run so far used {ckpt['threads']} thread(s) per process, now "
                      f"{torch.get_num_threads()}: sums are rounded differently, so the metrics will differ from "
                      f"an uninterrupted run's in the last digits (--threads {ckpt['threads']} keeps them equal)",
                      file=sys.stderr)
        if not self.dist.main and self.state["running"] is not None:   # process 0 carries the sums
            self.state["running"] = {**self.state["running"], "loss": 0.0, "n": 0, "skipped": 0,
                                     "stats": [0.0] * len(self.state["running"]["stats"] or []) or None}

    def _announce_resume(self, extension: dict[str, int] | None) -> None:
        s, r = self.state, self.recipe
        where = f"epoch {s['epoch'] + 1} of {r.epochs}"
        if s["batch"]:
            where += f", batch {s['batch'] + 1} of {self.steps_per_epoch}"
        if s["epoch"] >= r.epochs:
            where = f"the end of its {r.epochs} epochs"
        print(f"resuming {self.out} at {where} (step {s['step']})", file=sys.stderr)
        if extension is not None:
            print(f"extending the run from {extension['from_epochs']} to {extension['to_epochs']} epochs at step "
                  f"{extension['at_step']}: from here the learning rate follows the {extension['to_epochs']}-epoch "
                  f"schedule (recorded in recipe.json)", file=sys.stderr)

    def _rng_states(self) -> list[dict[str, Any]]:
        mine = {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None}
        if not self.dist.active:
            return [mine]
        import torch.distributed as tdist

        states: list[Any] = [None] * self.dist.world
        tdist.all_gather_object(states, mine)
        return states

    # -- steps -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.recipe.amp == "none":
            return torch.autocast(self.dist.device.type, enabled=False)
        dtype = torch.bfloat16 if self.recipe.amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> tuple[float, list[float]]:
        """One optimizer step on a local batch; returns (loss, task train statistics). `weight`
        scales this process's loss when local batches differ in size (skipped images), so the
        averaged gradient is still the global batch's mean."""
        r = self.recipe
        if hasattr(self.task, "before_step"):        # a task that changes the network as training goes
            self.task.before_step(self)
        lr = r.lr_at(self.state["step"], self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
        if r.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.net(x)
            loss = self.task.loss(out, y)
        finite = bool(torch.isfinite(loss))
        if self.dist.active:
            finite = self.dist.sum([0.0 if finite else 1.0])[0] == 0
        if not finite:
            raise TrainError(f"the loss became {float(loss)} at step {self.state['step']}; lower the "
                             "learning rate (--lr) or turn on gradient clipping (--clip-grad 1.0)")
        self.optimizer.zero_grad(set_to_none=True)
        if weight != 1.0:
            loss = loss * weight
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if r.clip_grad > 0:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], r.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.state["step"] += 1
        return float(loss.detach()) / weight, self.task.train_stats(out.detach(), y)

    def benchmark(self, steps: int, warmup: int = 2) -> float:
        """Training throughput, images per second over `steps` optimizer steps after `warmup`,
        data loading included (what a run would see). Changes the weights; for measuring only."""
        if not hasattr(self, "net"):
            self.prepare()
        if steps + warmup > self.steps_per_epoch:
            raise TrainError(f"benchmark: {steps} + {warmup} steps exceed one epoch ({self.steps_per_epoch})")
        self._set_train_mode()
        d = self.dist
        sampler = EpochBatches(len(self.train_set), self.world_batch, seed=self.recipe.seed,
                               epoch=self.state["step"], rank=d.rank, world=d.world)
        self.train_set.epoch = self.state["step"]
        batches = iter(self._loader(self.train_set, sampler))
        for _ in range(warmup):
            x, y, _ = next(batches)
            self.train_step(x, y)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            x, y, _ = next(batches)
            self.train_step(x, y)
            images += len(y) * d.world
        return images / (time.perf_counter() - start)

    def _set_train_mode(self) -> None:
        self.model.train()
        for m in self.frozen:    # a frozen backbone keeps its batch-norm statistics too
            m.eval()

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        from tqdm import tqdm

        r, d = self.recipe, self.dist
        torch.manual_seed(r.seed * 7919 + d.rank)   # dropout; data augmentation has its own seeds
        self.prepare()
        if self.opts.resume:
            self.restore()
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(".checkpoint.pt.*.tmp"):    # left by a kill mid-write
                stale.unlink(missing_ok=True)
            record = {"extended": self.state["extended"]} if self.state["extended"] else {}
            atomic_write_text(self.out / "recipe.json", _json({**r.to_dict(), **record}))
        while self.state["epoch"] < r.epochs:
            epoch, start = self.state["epoch"], self.state["batch"]
            running = self.state["running"] or {"loss": 0.0, "stats": None, "n": 0, "skipped": 0,
                                                "errors": [], "seconds": 0.0}
            self.train_set.epoch = epoch
            sampler = EpochBatches(len(self.train_set), self.world_batch, seed=r.seed, epoch=epoch,
                                   rank=d.rank, world=d.world, start=start)
            loader = self._loader(self.train_set, sampler)
            self._set_train_mode()
            bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{r.epochs}",
                       unit="batch", disable=not (self.opts.progress and d.main), file=sys.stderr,
                       dynamic_ncols=True)
            t0, images = time.perf_counter(), 0
            for x, y, errors in loader:
                self._count_errors(errors, running)
                local = 0 if x is None else len(y)
                total = int(d.sum([float(local)])[0]) if d.active else local
                if local == 0 or total == 0:
                    if d.active and total:     # every process must step together, or none
                        raise DataError(f"all {len(errors)} images of this process's share of a batch "
                                        f"were unreadable ({errors[0]}); remove the unreadable files")
                    self.state["batch"] += 1
                    bar.update()
                    continue
                loss, stats = self.train_step(x, y, weight=local * d.world / total)
                running["loss"] += loss * len(y)
                running["stats"] = stats if running["stats"] is None else \
                    [a + b for a, b in zip(running["stats"], stats)]
                running["n"] += len(y)
                images += len(y) * d.world
                self.state["batch"] += 1
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{images / max(elapsed, 1e-9):.0f}", refresh=False)
                bar.update()
                if self.opts.checkpoint_steps and self.state["step"] % self.opts.checkpoint_steps == 0 \
                        and self.state["batch"] < self.steps_per_epoch:
                    running["seconds"] += time.perf_counter() - t0
                    t0, images = time.perf_counter(), 0
                    self.state["running"] = self._global_running(running)
                    self.save_checkpoint()
            bar.close()
            running["seconds"] += time.perf_counter() - t0
            row = self._end_epoch(epoch, running)
            self.state.update(epoch=epoch + 1, batch=0, running=None)
            self.state["history"].append(row)
            self.state["skipped"] += row["skipped"]
            if d.main:       # outputs first: a kill before the checkpoint repeats the epoch, losing nothing
                self._log_epoch(row)
            self.save_checkpoint()
        return self._finish()

    def _global_running(self, running: dict[str, Any]) -> dict[str, Any]:
        """The epoch's running sums over all processes (what a checkpoint stores; on resume,
        process 0 carries them and the others start from zero)."""
        if not self.dist.active:
            return running
        stats = running["stats"] or []
        sums = self.dist.sum([running["loss"], float(running["n"]), float(running["skipped"]), *stats])
        return {**running, "loss": sums[0], "n": int(sums[1]), "skipped": int(sums[2]),
                "stats": sums[3:] or None}

    def _count_errors(self, errors: list[str], running: dict[str, Any]) -> None:
        if self.opts.strict:
            anywhere = self.dist.sum([float(len(errors))])[0] if self.dist.active else len(errors)
            if anywhere:
                where = errors[0] if errors else "in another process's share of the batch"
                raise DataError(f"unreadable image: {where} (--strict stops at the first one)")
        if not errors:
            return
        running["skipped"] += len(errors)
        running["errors"] = (running["errors"] + errors)[:5]

    def _end_epoch(self, epoch: int, running: dict[str, Any]) -> dict[str, Any]:
        total = self._global_running(running)
        skipped, n = total["skipped"], max(total["n"], 1)
        train = self.task.metrics([*(total["stats"] or [0.0]), total["n"]], "train")
        every, last = max(1, self.opts.eval_every), epoch + 1 == self.recipe.epochs
        earlier = [h for h in self.state["history"] if any(k.startswith("val_") for k in h)]
        if every == 1 or last or (epoch + 1) % every == 0 or not earlier:
            val = self.evaluate(self.ema.module if self.ema else self.model)
        else:      # not validated this epoch: the same columns, empty (metrics.csv keeps one header)
            val = {k: math.nan for k in earlier[-1] if k.startswith("val_")}
        seconds = running["seconds"]
        row = {"epoch": epoch + 1, "epochs": self.recipe.epochs, "step": self.state["step"],
               "lr": self.optimizer.param_groups[0]["lr"], "train_loss": total["loss"] / n, **train, **val,
               "img_per_s": total["n"] / max(seconds, 1e-9), "epoch_s": seconds, "skipped": skipped}
        if skipped and self.dist.main:
            shown = "; ".join(running["errors"][:3])
            print(f"epoch {epoch + 1}: skipped {skipped} unreadable image(s): {shown}", file=sys.stderr)
        return row

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        d = self.dist
        sampler = EpochBatches(len(self.val_set), self.world_batch, shuffle=False, drop_last=False,
                               rank=d.rank, world=d.world)
        if hasattr(self.task, "eval_model"):         # what is scored may differ from what is trained
            model = self.task.eval_model(model, self)
        was_training = model.training
        model.eval()
        sums, skipped = None, 0
        if hasattr(self.task, "eval_begin"):
            self.task.eval_begin()
        for x, y, errors in self._loader(self.val_set, sampler):
            skipped += len(errors)
            if errors and self.opts.strict and not d.active:
                raise DataError(f"unreadable image: {errors[0]} (--strict)")
            if x is None:
                continue
            x, y = x.to(d.device), y.to(d.device)
            if self.recipe.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                stats = [*self.task.eval_stats(model(x), y), float(len(y))]
            sums = stats if sums is None else [a + b for a, b in zip(sums, stats)]
        model.train(was_training)
        if sums is None:       # this process read nothing: as many zeros as the task's statistics
            count = getattr(self.task, "eval_stat_count", None) or len(self.task.metrics([0.0] * 8, "val"))
            sums = [0.0] * (count + 1)
        total = d.sum([*sums, float(skipped)])
        if hasattr(self.task, "eval_gather"):
            self.task.eval_gather(d)
        if self.opts.strict and total[-1]:
            raise DataError(f"{int(total[-1])} validation image(s) unreadable (--strict)")
        if total[-2] == 0:
            raise DataError(f"none of the {len(self.val_set)} validation images could be read")
        return {**self.task.metrics(total[:-1], "val"), "val_skipped": int(total[-1])}

    def _loader(self, dataset, sampler) -> torch.utils.data.DataLoader:
        # A loader of its own generator: making an iterator draws a seed, which must not come from
        # the global stream that dropout uses (a resumed run would draw it at another point).
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=self.opts.workers,
                                           collate_fn=collate, worker_init_fn=_worker_init,
                                           generator=torch.Generator().manual_seed(self.recipe.seed),
                                           persistent_workers=False)

    # -- outputs -----------------------------------------------------------------------------------
    def _log_epoch(self, row: dict[str, Any]) -> None:
        history = self.state["history"]
        atomic_write_csv(self.out / "metrics.csv", history)
        if self.opts.curves != "end" or row["epoch"] >= row["epochs"]:
            write_curves(history, self.out / "curves.png")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "epochs") and isinstance(value, (int, float)):
                    writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("train", "val")) else key,
                                      value, row["epoch"])
            writer.flush()
        print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), file=sys.stderr)

    def _tensorboard(self):
        if self._writer is None and self.opts.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: TensorBoard logs need the tensorboard package (pip install tensorboard); "
                      "metrics.csv is written anyway", file=sys.stderr)
                self.opts.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.out / "tensorboard"),
                                         purge_step=len(self.state["history"]) + 1)   # epochs are 1-based
        return self._writer

    def _finish(self) -> TrainResult:
        history = self.state["history"]
        final = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
        model_path = None
        if self.dist.main and self.save_model is not None:
            model_path = self.out / self.opts.model_file
            self.save_model(self.ema.module if self.ema else self.model, model_path, final)
        if self._writer is not None:
            self._writer.close()
        result = TrainResult(final, history, self.out, model_path, self.state["skipped"])
        if self.dist.main:
            atomic_write_text(self.out / "result.json", _json(result.as_dict()))
        self.dist.barrier()
        return result


# -- helpers -----------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    """Weight decay on conv and linear weights only (not biases or batch-norm parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TrainError("nothing to train: every parameter is frozen")
    lr = r.scaled_lr()
    if r.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=r.momentum, nesterov=r.nesterov and r.momentum > 0)
    if r.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=r.rmsprop_alpha, eps=r.rmsprop_eps, momentum=r.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or foreign file
        raise TrainError(f"{path}: not a readable mnv3 checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not an mnv3 training checkpoint")
    return ckpt


def check_resume(ckpt: dict[str, Any], identity: dict[str, Any], recipe: Recipe,
                 path: Path) -> dict[str, int] | None:
    """Resuming must continue the same run: same network, same data, same recipe, except that
    the epoch count may be raised. Returns the record of such an extension
    ({at_epoch, at_step, from_epochs, to_epochs}: epochs completed and optimizer steps taken
    when it was extended), or None."""
    theirs = ckpt["identity"]
    for key, what in (("spec", "network spec"), ("num_classes", "number of classes"),
                      ("classes", "classes"), ("data", "data set"), ("task", "task")):
        if theirs.get(key) != identity.get(key):
            if key == "data":
                was, now = _data_ref(theirs, path), identity.get("data_ref") or "?"
                shown = f"{was}, fingerprint {theirs.get(key)} vs now {now}, fingerprint {identity.get(key)}"
            else:
                shown = f"{_short(theirs.get(key))} vs now {_short(identity.get(key))}"
            raise TrainError(f"{path}: cannot resume: the run was started with a different {what} ({shown}). "
                             "Resume with the run's own --arch/--data, or start a new run in another --out")
    saved = ckpt["recipe"]
    # What the run computes is compared, not its description (name, about); a key the run's recipe
    # predates counts as its default value.
    defaults = Recipe().to_dict()
    diff = [f"{k}: run {saved.get(k, defaults[k])!r} vs now {v!r}" for k, v in recipe.to_dict().items()
            if k not in ("epochs", "name", "about") and saved.get(k, defaults[k]) != v]
    if diff:
        raise TrainError(f"{path}: cannot resume with a changed recipe ({'; '.join(diff)}). "
                         "Drop those overrides to continue, or start a new run in another --out")
    before = saved["epochs"]
    if recipe.epochs < before:
        raise TrainError(f"{path}: cannot resume with fewer epochs than the run plans ({recipe.epochs} < {before}): "
                         f"the rates of the steps already taken belong to the {before}-epoch schedule. "
                         f"Resume with --epochs {before} or more")
    if recipe.epochs == before:
        return None
    return {"at_epoch": ckpt["epoch"], "at_step": ckpt["step"], "from_epochs": before, "to_epochs": recipe.epochs}


def _data_ref(identity: dict[str, Any], path: Path) -> str:
    """The --data a run was started with: in its checkpoint, or (older runs) in its run.json."""
    if identity.get("data_ref"):
        return str(identity["data_ref"])
    try:
        import json

        return str(json.loads((path.parent / "run.json").read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _grad_scaler():
    if hasattr(torch.amp, "GradScaler"):      # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and top-1 against epochs, train and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        left.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=label)
    segment, detect = any("val_miou" in h for h in history), any("val_map" in h for h in history)
    curves, title = (("train_top1", "train"), ("val_top1", "validation"), ("val_top5", "val top-5")), "top-1 / top-5"
    if segment:
        curves = (("train_pixel_acc", "train pixel acc."), ("val_pixel_acc", "val pixel acc."), ("val_miou", "val mIoU"))
        title = "pixel accuracy / mIoU"
    elif detect:
        curves, title = (("val_map", "val mAP@[.5:.95]"), ("val_map50", "val mAP@.5")), "COCO mAP"
    for key, label in curves:
        right.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title=title, ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
