"""Training a supernet through the engine, its file, and the supernet accuracy oracle.

Training rules (the recipe's `supernet_rule`):
  * sandwich (the default; BigNAS): every step trains the largest sub-network on the labels and the
    smallest plus `supernet_random` random ones on the largest's (detached) predictions, in-place
    distillation; one backward through the sum;
  * progressive (Once-for-All's progressive shrinking): the run is cut in four: the largest network
    alone, then elastic kernel (with SE and activation), then depth, then expansion and width, with
    the channels sorted by importance when that last phase starts; random sub-networks of the
    phase's elastic dimensions learn from the largest as above.
Random sub-networks are drawn from a generator seeded by the recipe's seed and the step: every
data-parallel process trains the same ones, and a resumed run draws them again.

Scoring a candidate: its weights are sliced out of the supernet (`Supernet.extract`), batch-norm
statistics are recomputed on a fixed set of training images, then top-1 is measured on the search's
held-out split of the training set.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnv3.arch import ArchSpec, SpecError
from mnv3.data.datasets import ClassificationData, EvalSet, collate, open_data
from mnv3.files import atomic_write, atomic_write_text
from mnv3.search.genome import GenomeError, Value
from mnv3.search.supernet import Supernet, apply_moves, space_difference
from mnv3.space import SearchSpace
from mnv3.train.engine import RunOptions, Trainer, TrainError
from mnv3.train.recipe import Recipe
from mnv3.weights import Preprocess

SUPERNET_FORMAT = "mnv3.supernet/1"
SUPERNET_FILE = "supernet.safetensors"
# which genes each phase of progressive shrinking lets vary (the rest stay at the largest's value)
_PHASES = ((), ("kernel", "se", "act"), ("kernel", "se", "act", "depth"),
           ("kernel", "se", "act", "depth", "expansion", "width"))


class SupernetError(SpecError):
    """A supernet file or run cannot be used; the message says why and what to do."""


# -- batch norm --------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_bn(net: nn.Module, images: torch.Tensor, batch: int = 256) -> None:
    """Recompute every batch-norm layer's running statistics on `images` (an average over the
    batches, not a moving one), leaving every other tensor as it was; the network ends in eval mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i in range(0, len(images), batch):
        net(images[i:i + batch])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        m.eval()


def load_images(dataset, count: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` items (all with None) of an EvalSet-like dataset, chosen at random with `seed`, as
    one (N, C, H, W) tensor and their labels; unreadable images are left out."""
    order = np.random.default_rng(seed).permutation(len(dataset)) if count is not None else np.arange(len(dataset))
    chosen = sorted(order[:count].tolist()) if count is not None else order.tolist()
    xs, ys = [], []
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=256,
                                         collate_fn=collate)
    for x, y, _ in loader:
        if x is not None:
            xs.append(x)
            ys.append(y)
    if not xs:
        raise TrainError("none of the images could be read")
    return torch.cat(xs), torch.cat(ys)


# -- training ----------------------------------------------------------------------------------------
class SandwichModel(nn.Module):
    """What the engine trains: the supernet, run for each genome of `plan` on the same batch; the
    outputs are stacked, (len(plan), N, classes), the first being the teacher's."""

    def __init__(self, supernet: Supernet) -> None:
        super().__init__()
        self.supernet = supernet
        self.plan: list[tuple[Value, ...]] = [supernet.largest()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for genome in self.plan:
            self.supernet.set_genome(genome)
            outs.append(self.supernet(x))
        y = torch.stack(outs)
        if self.training:     # every parameter takes part in the graph (DDP needs it), at no cost
            y = y + 0.0 * sum(p.sum() for b in self.supernet.blocks for p in b.transforms.values())
        return y


class _Pair(nn.Module):
    """The largest and smallest sub-networks, extracted and recalibrated: what each epoch scores."""

    def __init__(self, big: nn.Module, small: nn.Module) -> None:
        super().__init__()
        self.big, self.small = big, small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.big(x), self.small(x)])


class SupernetTask:
    """Loss: cross-entropy of the first output (the largest network) on the labels, plus the
    cross-entropy of every other output on the first's detached softmax (in-place distillation).
    Validation: top-1 of the largest and the smallest sub-networks, each with recalibrated BN."""

    name = "supernet"
    eval_stat_count = 4

    def __init__(self, recipe: Recipe, calibration: torch.Tensor) -> None:
        self.recipe, self.calibration = recipe, calibration
        self.sorted_at: int | None = None

    # the plan of each step
    def phase(self, step: int, total: int) -> int:
        return min(3, 4 * step // max(total, 1))

    def before_step(self, trainer: Trainer) -> None:
        model: SandwichModel = trainer.model
        net, r = model.supernet, self.recipe
        step, total = trainer.state["step"], trainer.steps_per_epoch * r.epochs
        genes = net.genomes.genes
        largest = net.largest()
        if r.supernet_rule == "sandwich":
            free = _PHASES[-1]
            plan = [largest, net.smallest()]
        else:
            phase = self.phase(step, total)
            free = _PHASES[phase]
            plan = [largest]
            if phase == 3 and self.phase(step - 1, total) == 2 and step > 0:
                self.sort(trainer)
        # the same draws in every process (all train the same sub-networks: batch-norm statistics synced
        # over processes stay in step) and a pure function of the step (a resumed run draws them again)
        gen = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
        for _ in range(r.supernet_random if free else 0):
            picks = torch.randint(0, 1 << 30, (len(genes),), generator=gen).tolist()
            plan.append(tuple(g.choices[p % len(g.choices)] if g.name.rsplit(".", 1)[-1] in free else v
                              for g, p, v in zip(genes, picks, largest)))
        model.plan = plan

    def sort(self, trainer: Trainer) -> None:
        """Sort the channels by importance (Once-for-All, before the expansion/width phase), with
        the optimizer's state and the EMA following the weights."""
        model: SandwichModel = trainer.model
        moves = model.supernet.sort_channels()
        states: dict[str, dict[str, torch.Tensor]] = {}   # optimizer state kind -> {parameter name: tensor}
        for name, p in model.supernet.named_parameters():
            for kind, t in trainer.optimizer.state.get(p, {}).items():
                if torch.is_tensor(t) and t.shape == p.shape:     # momentum buffers, shaped like their parameter
                    states.setdefault(kind, {})[name] = t
        for tensors in states.values():
            apply_moves(tensors, moves)
        if trainer.ema is not None:
            apply_moves(trainer.ema.module.supernet.state_dict(), moves)
        if trainer.dist.main:
            print(f"step {trainer.state['step']}: channels sorted by importance (progressive shrinking: "
                  "elastic expansion and width from here)", file=sys.stderr)

    # loss and statistics
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs.float()
        loss = F.cross_entropy(outputs[0], targets, label_smoothing=self.recipe.label_smoothing)
        if len(outputs) > 1:
            soft = outputs[0].detach().softmax(1)
            for student in outputs[1:]:
                loss = loss + torch.sum(-soft * F.log_softmax(student, 1), 1).mean()
        return loss

    def train_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        return [float((outputs[0].argmax(1) == targets).sum())]

    def eval_model(self, model: nn.Module, trainer: Trainer) -> nn.Module:
        net = model.supernet
        pair = _Pair(net.extract(net.largest()), net.extract(net.smallest()))
        for sub in (pair.big, pair.small):
            calibrate_bn(sub, self.calibration.to(trainer.dist.device))
        return pair.eval()

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        big, small = outputs[0].float(), outputs[-1].float()
        loss = F.cross_entropy(big, targets, reduction="sum")
        top = big.topk(min(5, big.shape[1]), dim=1).indices == targets[:, None]
        return [float(loss), float(top[:, 0].sum()), float(top.any(1).sum()),
                float((small.argmax(1) == targets).sum())]

    def metrics(self, sums: list[float], prefix: str) -> dict[str, float]:
        n = max(sums[-1], 1.0)
        if prefix == "train":
            return {"train_top1": sums[0] / n}
        return {"val_loss": sums[0] / n, "val_top1": sums[1] / n, "val_top5": sums[2] / n,
                "val_top1_smallest": sums[3] / n}


# -- the supernet file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SupernetInfo:
    """What travels with a supernet's weights: its space, classes, preprocessing and the split of the
    training data it was trained on (the search ranks candidates on the held-out part)."""

    space: SearchSpace
    num_classes: int
    classes: tuple[str, ...]
    class_names: tuple[str, ...] | None
    preprocess: Preprocess
    data: str
    data_fingerprint: str
    held_out: float
    subset: int | None
    split_seed: int
    training: dict[str, Any]

    def to_header(self) -> dict[str, str]:
        return {"format": SUPERNET_FORMAT, "space": json.dumps(self.space.to_dict()),
                "info": json.dumps({"num_classes": self.num_classes, "classes": list(self.classes),
                                    "class_names": list(self.class_names) if self.class_names else None,
                                    "preprocess": dataclasses.asdict(self.preprocess), "data": self.data,
                                    "data_fingerprint": self.data_fingerprint, "held_out": self.held_out,
                                    "subset": self.subset, "split_seed": self.split_seed,
                                    "training": self.training})}

    @classmethod
    def from_header(cls, header: dict[str, str], where: str) -> SupernetInfo:
        if header.get("format") != SUPERNET_FORMAT:
            raise SupernetError(f"{where}: not an mnv3 supernet file (make one with mnv3 supernet train)")
        try:
            info = json.loads(header["info"])
            return cls(SearchSpace.from_dict(json.loads(header["space"])), int(info["num_classes"]),
                       tuple(info["classes"]), tuple(info["class_names"]) if info.get("class_names") else None,
                       Preprocess.from_dict(info["preprocess"]), info["data"], info["data_fingerprint"],
                       float(info["held_out"]), info.get("subset"), int(info["split_seed"]),
                       dict(info.get("training") or {}))
        except (KeyError, ValueError, TypeError) as exc:
            raise SupernetError(f"{where}: damaged supernet header ({exc})") from None


def save_supernet(net: Supernet, info: SupernetInfo, path: str | Path) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=info.to_header()))


def supernet_path(where: str | Path) -> Path:
    """A supernet file, or a `mnv3 supernet train` run folder holding one."""
    path = Path(where)
    if path.is_dir():
        if not (path / SUPERNET_FILE).is_file():
            hint = (" (its training has not finished: continue it with mnv3 supernet train --out "
                    f"{path} --resume)") if (path / "checkpoint.pt").is_file() else ""
            raise SupernetError(f"{path}: no {SUPERNET_FILE} in this folder{hint}")
        path = path / SUPERNET_FILE
    if not path.is_file():
        raise SupernetError(f"{path}: no such supernet file or run folder")
    return path


def read_supernet_info(where: str | Path) -> SupernetInfo:
    """What a supernet file says about itself (its space, data split, ...), from its header only."""
    from mnv3.arch import safetensors_metadata

    path = supernet_path(where)
    return SupernetInfo.from_header(safetensors_metadata(path) or {}, str(path))


def load_supernet(where: str | Path, space: SearchSpace | None = None) -> tuple[Supernet, SupernetInfo]:
    """The supernet of a file or run folder; with `space`, it must be the space it was trained over."""
    from mnv3.weights.model_file import read_safetensors

    path = supernet_path(where)
    tensors, header = read_safetensors(path)
    info = SupernetInfo.from_header(header, str(path))
    # the classifier size a search's latencies include is no part of the supernet (its own is the data's)
    if space is not None and dataclasses.replace(space, num_classes=info.space.num_classes).to_dict() != info.space.to_dict():
        raise SupernetError(f"{path} was trained over another search space ({space_difference(space, info.space)}: "
                            "this search's vs the supernet's); search its own space (--space "
                            f"{path.parent / 'space.json'}) or train a supernet for this one")
    net = Supernet(info.space, info.num_classes)
    ours = net.state_dict()
    if set(ours) != set(tensors) or any(ours[k].shape != tensors[k].shape for k in ours):
        raise SupernetError(f"{path}: its tensors do not fit the supernet of its own space (a damaged file, or one "
                            "written by another mnv3 version)")
    net.load_state_dict(tensors)
    return net.eval(), info


# -- the run -----------------------------------------------------------------------------------------
def preprocess_for(space: SearchSpace, recipe: Recipe) -> Preprocess:
    res = space.seed.resolution
    return Preprocess(resolution=res, resize=max(res, round(res / recipe.crop_pct)))


def train_supernet(data: str | ClassificationData, out: str | Path, space: SearchSpace, recipe: Recipe, *,
                   held_out: float = 0.2, subset: int | None = None, split_seed: int = 0,
                   calibration: int = 500, resume: bool = False, workers: int = 0,
                   checkpoint_steps: int = 500, progress: bool = True, tensorboard: bool = True,
                   device: str = "auto"):
    """Train a supernet over `space` on the search's split of `data` (the training images less the
    held-out part the search ranks candidates on) and write the run folder `out` with
    supernet.safetensors and space.json. Under torchrun every process calls this."""
    from mnv3.search.oracle import search_splits
    from mnv3.train.distributed import setup, teardown

    out = Path(out)
    if resume and not out.is_dir():
        raise TrainError(f"{out}: no such run folder to resume")
    if not resume and ((out / "checkpoint.pt").exists() or (out / SUPERNET_FILE).exists()):
        raise TrainError(f"{out} already holds a supernet run; pass --resume to continue it, or choose another --out")
    if space.seed.padding != "symmetric":
        raise SupernetError("supernet: the space's seed uses TensorFlow 'same' padding; use a symmetric-padding seed")
    full = open_data(data) if not isinstance(data, ClassificationData) else data
    split = search_splits(full, held_out=held_out, subset=subset, seed=split_seed)
    if split.resolution and split.resolution != space.seed.resolution:
        raise SupernetError(f"the space's seed is at {space.seed.resolution}x{space.seed.resolution} and "
                            f"{full.name}'s images at {split.resolution}: save the space at {split.resolution}")
    if recipe.resolution is not None and recipe.resolution != space.seed.resolution:
        raise SupernetError(f"--resolution {recipe.resolution}: a supernet trains at its space's resolution "
                            f"({space.seed.resolution}); save the space at the resolution wanted")
    pre = preprocess_for(space, recipe)
    if recipe.sync_bn:
        # sub-networks slice the batch-norm layers, which SyncBatchNorm's autograd cannot follow; each
        # process keeps its own statistics (estimates recalibrate them anyway)
        recipe = recipe.override({"sync_bn": False})
    d = setup(device)
    try:
        torch.manual_seed(recipe.seed)
        n = len(split.classes)
        net = Supernet(space, n)
        if recipe.dropout is not None:            # training settings, not the space (its key names tables)
            net.dropout.p = recipe.dropout
        if recipe.bn_momentum is not None:
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = recipe.bn_momentum
        model = SandwichModel(net)
        calib, _ = load_images(EvalSet(split.train, pre), calibration, seed=split_seed)
        task = SupernetTask(recipe, calib)
        fingerprint = split.fingerprint()       # hashes every file name: once
        identity = {"task": "supernet", "spec": json.dumps(space.to_dict(), sort_keys=True), "num_classes": n,
                    "classes": list(split.classes), "data": fingerprint, "data_ref": split.ref or split.source}
        info = SupernetInfo(space, n, tuple(split.classes), tuple(split.class_names) if split.class_names else None,
                            pre, str(full.ref or data), fingerprint, held_out, subset, split_seed,
                            {"recipe": recipe.name, "rule": recipe.supernet_rule, "epochs": recipe.epochs,
                             "calibration_images": calibration})
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            space.save(out / "space.json")
            if not resume:
                atomic_write_text(out / "run.json", json.dumps({"data": str(full.ref or data), "held_out": held_out,
                                                                "subset": subset, "split_seed": split_seed,
                                                                "calibration": calibration}, indent=2) + "\n")

        def save_model(module: SandwichModel, path: Path, metrics: dict[str, float]) -> None:
            training = {**info.training, "top1_largest": metrics.get("val_top1"),
                        "top1_smallest": metrics.get("val_top1_smallest")}
            save_supernet(module.supernet, dataclasses.replace(info, training=training), path)

        options = RunOptions(out, resume=resume, workers=workers, checkpoint_steps=checkpoint_steps,
                             progress=progress, tensorboard=tensorboard, model_file=SUPERNET_FILE)
        return Trainer(model, split, recipe, options, task, d, pre, identity, save_model).fit()
    finally:
        teardown(d)


# -- the oracle ----------------------------------------------------------------------------------------
class SupernetOracle:
    """Estimate a candidate's accuracy with a trained supernet: its sub-network's weights, batch norm
    recalibrated on `calibration` fixed training images, top-1 on (up to `images` of) the held-out
    split the supernet was trained without."""

    name = "supernet"

    def __init__(self, where: str | Path, space: SearchSpace | None = None, *, calibration: int | None = None,
                 images: int | None = None) -> None:
        from mnv3.search.oracle import search_splits

        self.path = supernet_path(where)
        self.net, self.info = load_supernet(self.path, space)
        full = open_data(self.info.data)
        self.data = search_splits(full, held_out=self.info.held_out, subset=self.info.subset,
                                  seed=self.info.split_seed)
        if self.data.fingerprint() != self.info.data_fingerprint:
            raise SupernetError(f"{self.path}: its data ({self.info.data}) has changed since the supernet was trained "
                                "(another file list or split); retrain it on the data as it is now")
        pre = self.info.preprocess
        self.calibration_count = calibration or int(self.info.training.get("calibration_images", 500))
        self.calibration, _ = load_images(EvalSet(self.data.train, pre), self.calibration_count,
                                          seed=self.info.split_seed)
        self.calibration = self.calibration.contiguous(memory_format=torch.channels_last)
        self.held_x, self.held_y = load_images(EvalSet(self.data.val, pre), images, seed=self.info.split_seed)
        self.held_x = self.held_x.contiguous(memory_format=torch.channels_last)
        self.space = self.info.space

    @property
    def resolution(self) -> int:
        return self.info.space.seed.resolution

    def network(self, spec_or_genome) -> nn.Module:
        """The standalone network of a spec (of the space) or a genome, BN recalibrated."""
        genomes = self.net.genomes
        try:
            genome = genomes.encode(spec_or_genome) if isinstance(spec_or_genome, ArchSpec) else \
                genomes.check(spec_or_genome)
        except GenomeError as exc:
            raise SupernetError(f"the supernet cannot estimate this network: {exc}") from None
        name = spec_or_genome.name if isinstance(spec_or_genome, ArchSpec) else None
        net = self.net.extract(genome, name).to(memory_format=torch.channels_last)
        calibrate_bn(net, self.calibration)
        return net.to(memory_format=torch.contiguous_format)

    @torch.inference_mode()
    def top1(self, net: nn.Module) -> float:
        """Top-1 on the held-out images; scored on a copy with batch norm folded, channels last
        (the faster form on CPUs; the same function)."""
        import copy

        fast = copy.deepcopy(net).fuse().to(memory_format=torch.channels_last)
        correct = 0
        for i in range(0, len(self.held_x), 500):
            correct += int((fast(self.held_x[i:i + 500]).argmax(1) == self.held_y[i:i + 500]).sum())
        return correct / len(self.held_x)

    def accuracy(self, spec: ArchSpec, trial_dir: Path | None = None) -> float:
        start = time.perf_counter()
        acc = self.top1(self.network(spec))
        if trial_dir is not None:
            trial_dir = Path(trial_dir)
            trial_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(trial_dir / "estimate.json", json.dumps(
                {"top1": acc, "seconds": time.perf_counter() - start, "supernet": str(self.path)}) + "\n")
        return acc

    def describe(self) -> dict:
        return {"oracle": self.name, "supernet": str(self.path.resolve()), "data": self.info.data,
                "calibration_images": self.calibration_count, "held_out_images": len(self.held_x)}
