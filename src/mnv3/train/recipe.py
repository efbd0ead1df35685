"""Training recipes as data: a JSON or YAML file of named values, built-ins selectable by name.

Every value can be overridden (`Recipe.override` takes strings, as the command line gives them),
and the resolved recipe is saved with each run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from mnv3.data.datasets import AUGMENTS

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "constant", "poly")
AMP_MODES = ("none", "bf16", "fp16")
# The warm-up lasts warmup_epochs, but at most this fraction of the run: a short run spends its few
# steps learning rather than warming up (3 epochs of digits are 135 steps).
WARMUP_MAX_FRACTION = 0.1
# Keys a run adds to its recipe.json that are a record of the run, not recipe values: reading the
# file back (--resume, or --recipe runs/x/recipe.json) skips them.
RUN_RECORD_KEYS = ("extended",)


class RecipeError(ValueError):
    """A recipe file or value cannot be used; the message names the key and what it accepts."""


@dataclass(frozen=True)
class Recipe:
    """How to train. `lr` is the learning rate at batch `lr_batch`; the rate used is scaled
    linearly to the global batch (`batch_size`, summed over data-parallel processes)."""

    name: str = "custom"
    about: str = ""
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    rmsprop_alpha: float = 0.9
    rmsprop_eps: float = 0.0316      # ~sqrt(1e-3): TF's RMSProp epsilon sits inside the square root
    weight_decay: float = 1e-5       # not applied to biases and batch-norm parameters
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_epochs: float = 3.0        # step schedule: multiply by decay_rate every decay_epochs
    decay_rate: float = 0.99
    min_lr: float = 0.0              # cosine schedule: the final rate, as a fraction of the peak
    poly_power: float = 0.9          # poly schedule: peak x (1 - t)^power (DeepLab's, for segmentation)
    label_smoothing: float = 0.0
    dropout: float | None = None     # None keeps the network spec's dropout
    bn_momentum: float | None = None # None keeps the spec's (0.01, TF's 0.99 decay: slow for short runs)
    ema_decay: float = 0.0           # 0 turns the exponential moving average of weights off
    clip_grad: float = 0.0           # max gradient norm; 0 turns clipping off
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = True             # batch-norm statistics over the global batch in DDP runs
    augment: str = "rrc"             # rrc: random resized crop; padcrop: padded random crop; none
    min_scale: float = 0.08          # smallest crop area for rrc
    hflip: bool = True
    seg_min_scale: float = 0.5       # segmentation: random rescale of the image and mask, as a factor
    seg_max_scale: float = 2.0       # of the training size, before the random crop
    seg_class_weights: str = "none"  # segmentation: none, enet (1 / ln(1.02 + p)) or median (frequency balancing)
    box_loss: str = "smooth_l1"      # detection: smooth_l1 on the encoded offsets, or giou on decoded boxes
    det_augment: str = "ssd"         # detection: ssd (photometric, zoom out, IoU crop, flip) or ssdlite
    neg_pos_ratio: float = 3.0       # detection: hard negatives per matched anchor
    supernet_rule: str = "sandwich"  # supernet: sandwich (BigNAS) or progressive (Once-for-All's shrinking)
    supernet_random: int = 2         # supernet: random sub-networks per step, besides largest (and smallest)
    crop_pct: float = 0.875          # evaluation: resize to resolution / crop_pct, center crop
    resolution: int | None = None    # None: the data set's size for small images, else the network's
    freeze_backbone: bool = False
    qat: bool = False                # simulate int8 (weights per channel, activations per tensor) while training
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RecipeError:
            return RecipeError(f"recipe {self.name!r}: {key}: {why}, got {getattr(self, key)!r}")

        for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("amp", AMP_MODES),
                             ("augment", AUGMENTS)):
            if getattr(self, key) not in choices:
                raise bad(key, f"expected one of {', '.join(choices)}")
        for key in ("epochs", "batch_size", "lr_batch"):
            if getattr(self, key) < 1:
                raise bad(key, "expected an integer >= 1")
        for key in ("lr", "weight_decay", "warmup_epochs", "clip_grad", "rmsprop_eps"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise bad(key, "expected a number >= 0")
        for key in ("momentum", "label_smoothing", "ema_decay", "min_lr", "rmsprop_alpha"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "expected a number in [0, 1)")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise bad("dropout", "expected a number in [0, 1) or null")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise bad("bn_momentum", "expected a number in (0, 1] or null")
        if not 0 < self.decay_rate <= 1 or self.decay_epochs <= 0:
            raise RecipeError(f"recipe {self.name!r}: decay_rate must be in (0, 1] and decay_epochs > 0")
        if not 0 < self.min_scale <= 1 or not 0 < self.crop_pct <= 1:
            raise RecipeError(f"recipe {self.name!r}: min_scale and crop_pct must be in (0, 1]")
        if not 0 < self.seg_min_scale <= self.seg_max_scale or self.poly_power <= 0:
            raise RecipeError(f"recipe {self.name!r}: need 0 < seg_min_scale <= seg_max_scale and poly_power > 0")
        if self.seg_class_weights not in ("none", "enet", "median"):
            raise bad("seg_class_weights", "expected none, enet or median")
        if self.box_loss not in ("smooth_l1", "giou"):
            raise bad("box_loss", "expected smooth_l1 or giou")
        if self.det_augment not in ("ssd", "ssdlite"):
            raise bad("det_augment", "expected ssd or ssdlite")
        if not math.isfinite(self.neg_pos_ratio) or self.neg_pos_ratio <= 0:
            raise bad("neg_pos_ratio", "expected a number > 0")
        if self.supernet_rule not in ("sandwich", "progressive"):
            raise bad("supernet_rule", "expected sandwich or progressive")
        if not 0 <= self.supernet_random <= 16:
            raise bad("supernet_random", "expected an integer from 0 to 16")
        if self.resolution is not None and self.resolution < 8:
            raise bad("resolution", "expected an integer >= 8 or null")

    # -- values ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping of recipe keys to values")
        known = {f.name: f for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                              f"recipe keys are: {', '.join(known)}")
        values = {}
        for key, value in data.items():
            values[key] = _check_type(key, value, _field_type(known[key]), where)
        return cls(**values)

    def override(self, changes: dict[str, Any]) -> Recipe:
        """A copy with `changes` applied; string values (from the command line) are parsed."""
        known = {f.name: f for f in fields(self)}
        parsed = {}
        for key, value in changes.items():
            key = key.replace("-", "_")
            if key not in known:
                raise RecipeError(f"unknown recipe key {key!r}; recipe keys are: {', '.join(known)}")
            kind = _field_type(known[key])
            parsed[key] = parse_value(key, value, kind) if isinstance(value, str) and kind is not str \
                else _check_type(key, value, kind, "override")
        return dataclasses.replace(self, **parsed)

    def scaled_lr(self, global_batch: int | None = None) -> float:
        return self.lr * (global_batch or self.batch_size) / self.lr_batch

    @property
    def warmup(self) -> float:
        """The warm-up's length in epochs: warmup_epochs, at most WARMUP_MAX_FRACTION of the run."""
        return min(self.warmup_epochs, WARMUP_MAX_FRACTION * self.epochs)

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate of optimizer step `step` (0-based): a pure function of the step and
        the recipe, so resuming needs no scheduler state.

        A run extended on resume (more epochs) takes its later steps from the schedule of the
        new total, as if it had been planned that long: the step schedule and a constant rate do
        not change; a cosine's rate steps up at the resume point to the longer cosine's (a warm
        restart, to about half the peak for a run extended to twice its length)."""
        peak = self.scaled_lr()
        epoch, warmup = step / steps_per_epoch, self.warmup
        if warmup and epoch < warmup:
            return peak * min(1.0, (step + 1) / (warmup * steps_per_epoch))
        if self.schedule == "constant":
            return peak
        if self.schedule == "step":
            return peak * self.decay_rate ** math.floor((epoch - warmup) / self.decay_epochs)
        total = max(1e-9, self.epochs - warmup)
        t = min(1.0, (epoch - warmup) / total)
        if self.schedule == "poly":
            return peak * (1.0 - t) ** self.poly_power
        floor = peak * self.min_lr
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


HELP = {
    "epochs": "epochs to train (with --resume, a larger value extends the run)",
    "batch_size": "global batch (summed over data-parallel processes)",
    "optimizer": "sgd, rmsprop or adamw",
    "lr": "learning rate at batch LR_BATCH (scaled linearly to --batch-size)",
    "lr_batch": "the batch size --lr is given for",
    "momentum": "SGD/RMSProp momentum",
    "nesterov": "Nesterov momentum (SGD)",
    "rmsprop_alpha": "RMSProp decay of the squared-gradient average",
    "rmsprop_eps": "RMSProp epsilon (added outside the square root, as torch does)",
    "weight_decay": "L2 weight decay on conv/linear weights",
    "schedule": "cosine, step (x DECAY_RATE every DECAY_EPOCHS), constant or poly",
    "warmup_epochs": "linear warm-up length in epochs (may be fractional; at most a tenth of the run)",
    "decay_epochs": "step schedule: epochs between decays",
    "decay_rate": "step schedule: factor applied at each decay",
    "min_lr": "cosine schedule: final rate as a fraction of the peak",
    "poly_power": "poly schedule: rate = peak x (1 - progress)^POLY_POWER",
    "label_smoothing": "label smoothing of the cross-entropy",
    "dropout": "dropout before the classifier (none: keep the network's)",
    "bn_momentum": "batch-norm running-statistics momentum (none: keep the network's)",
    "ema_decay": "EMA of the weights (0: off); the EMA weights are evaluated and saved",
    "clip_grad": "clip the gradient norm to this (0: off)",
    "amp": "mixed precision: none, bf16 (CPU or CUDA) or fp16 (CUDA)",
    "channels_last": "NHWC memory format (faster depthwise convolutions on CPUs)",
    "compile": "torch.compile the network",
    "sync_bn": "batch-norm statistics over the global batch under torchrun",
    "augment": "rrc (random resized crop), padcrop (padded random crop, small images) or none",
    "min_scale": "rrc: smallest crop, as a fraction of the image area",
    "hflip": "random horizontal flips",
    "box_loss": "detection: box regression loss, smooth_l1 (SSD's) or giou (on decoded boxes)",
    "neg_pos_ratio": "detection: hard negatives kept per matched anchor (SSD: 3)",
    "det_augment": "detection: ssd (photometric distortion, zoom out, IoU crop, flip) or ssdlite (IoU crop "
                   "and flip, torchvision's SSDLite reference)",
    "seg_min_scale": "segmentation: smallest random rescale (x the training size) before the crop",
    "seg_max_scale": "segmentation: largest random rescale (x the training size) before the crop",
    "seg_class_weights": "segmentation: weight each class's pixels in the loss by their frequency p in the "
                         "training masks: none, enet (1 / ln(1.02 + p), ENet's) or median (median p / p, "
                         "SegNet's); rare classes (poles, signs, people) then count",
    "supernet_rule": "supernet: sandwich (BigNAS: largest, smallest and random sub-networks each step, the "
                     "largest teaching the others) or progressive (Once-for-All: largest only, then elastic "
                     "kernel, depth, then expansion and width, channels sorted before that phase)",
    "supernet_random": "supernet: random sub-networks per step besides the largest (and the smallest)",
    "crop_pct": "evaluation: resize to RESOLUTION / CROP_PCT, then center-crop",
    "resolution": "training and evaluation input size",
    "freeze_backbone": "train the head only (pre-logits and classifier); the backbone's BN stays frozen",
    "qat": "quantization-aware training: the network sees int8 rounding of its weights (per channel) and "
           "activations (per tensor) while it trains, so `mnv3 export --int8` loses less; the model file "
           "stays float",
    "seed": "seed of weights, data order, augmentation and dropout",
}


# -- loading ---------------------------------------------------------------------------------------
def builtin_recipes() -> list[str]:
    folder = resources.files("mnv3.resources") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_recipe(recipe: str | Path | None) -> Recipe:
    """A built-in recipe by name (`paper`, `finetune`, `cifar`), or a JSON/YAML recipe file."""
    if recipe is None:
        return Recipe()
    text = str(recipe)
    if text in builtin_recipes():
        data = json.loads((resources.files("mnv3.resources") / "recipes" / f"{text}.json").read_text())
        return Recipe.from_dict(data, f"recipe {text}")
    path = Path(text)
    if not path.is_file():
        raise RecipeError(f"{text}: not a built-in recipe ({', '.join(builtin_recipes())}) "
                          "and no such file")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:   # json and yaml errors are ValueErrors or YAMLError
        raise RecipeError(f"{path}: not a valid recipe file ({exc})") from None
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise RecipeError(f"{path}: not valid YAML ({exc})") from None
        raise
    data = dict(data or {})
    data.setdefault("name", path.stem)
    return Recipe.from_dict(data, str(path))


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(Recipe)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def _nullable(key: str) -> bool:
    return key in ("dropout", "resolution", "bn_momentum")


def parse_value(key: str, text: str, kind: type) -> Any:
    if _nullable(key) and text.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        raise RecipeError(f"{key}: expected {kind.__name__}, got {text!r}") from None


def _check_type(key: str, value: Any, kind: type, where: str) -> Any:
    if value is None and _nullable(key):
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecipeError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
    return value
