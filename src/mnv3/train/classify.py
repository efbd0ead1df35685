"""Classification training: the network (from a spec, or from pretrained weights with a new
classifier), its preprocessing, and the engine run that writes `DIR/model.safetensors`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from mnv3.arch import ArchSpec, with_total_stride
from mnv3.data.datasets import ClassificationData, open_data
from mnv3.files import atomic_write_text
from mnv3.nn import MobileNet, build
from mnv3.presets import resolve_arch
from mnv3.train.distributed import Dist, setup, teardown
from mnv3.train.engine import ClassificationTask, RunOptions, Trainer, TrainError, TrainResult
from mnv3.train.recipe import Recipe
from mnv3.weights import ModelMeta, Preprocess, load, model_meta, save

DEFAULT_ARCH = "mobilenet_v3_small"


def prepare_model(data: ClassificationData, recipe: Recipe, arch: str | ArchSpec | None = None,
                  weights: str | None = None, total_stride: int | None = None,
                  progress: bool = True) -> tuple[MobileNet, Preprocess]:
    """The network to train and the preprocessing to train it with.

    From scratch: `arch` (default mobilenet_v3_small); small-image sets (digits, CIFAR) default to
    their own resolution and a total stride of 8. From `weights`: the pretrained network, its
    normalisation, and a fresh classifier when the classes differ."""
    torch.manual_seed(recipe.seed)      # the same initial weights in every process and every rerun
    if weights:
        model = load(weights, arch, progress=progress)
        spec, mean_std = model.spec, model_meta(model).preprocess
        resolution = recipe.resolution or spec.resolution
    else:
        spec, mean_std, model = resolve_arch(arch or DEFAULT_ARCH), Preprocess(), None
        resolution = recipe.resolution or data.resolution or spec.resolution
        if total_stride is None:
            total_stride = data.total_stride
    target = spec.replace(resolution=resolution)
    if total_stride is not None and total_stride != target.total_stride():
        target = with_total_stride(target, total_stride)
    if recipe.dropout is not None and recipe.dropout != target.head.dropout:
        target = target.replace(head=dataclasses.replace(target.head, dropout=recipe.dropout))
    if recipe.bn_momentum is not None:
        target = target.replace(bn_momentum=recipe.bn_momentum)
    n = len(data.classes)
    if model is None:
        model = build(target, n)
    else:
        if target != model.spec:       # stride, resolution, dropout and BN momentum change no weight shape
            rebuilt = build(target, model.num_classes)
            rebuilt.load_state_dict(model.state_dict())
            rebuilt.meta = model_meta(model)
            model = rebuilt
        if model.num_classes != n or model_meta(model).classes != data.classes:
            model.reset_classifier(n)
    pre = Preprocess(resolution=resolution, resize=max(resolution, round(resolution / recipe.crop_pct)),
                     mean=mean_std.mean, std=mean_std.std, interpolation=mean_std.interpolation)
    model.meta = ModelMeta(classes=data.classes, class_names=data.class_names, preprocess=pre,
                           source=str(weights) if weights else None)
    if weights and has_folded_batchnorm(model):
        from mnv3.data.datasets import EvalSet

        n = unfold_batchnorm(model, EvalSet(data.train, pre))
        if progress:
            print(f"note: {weights} has batch norm folded into its convolutions; batch-norm statistics "
                  f"were estimated on {n} training images so that training starts from the same network",
                  file=sys.stderr)
    return model, pre


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def _folded(bn: torch.nn.BatchNorm2d) -> bool:
    return bool((bn.running_mean == 0).all() and (bn.weight == 1).all()
                and torch.allclose(bn.running_var, torch.full_like(bn.running_var, 1 - bn.eps)))


def has_folded_batchnorm(model: torch.nn.Module) -> bool:
    """Imported TFLite models carry batch norm folded into the convolutions: their BN layers are
    the identity plus a bias (mean 0, variance 1 - eps, scale 1)."""
    bns = _batchnorms(model)
    return bool(bns) and all(_folded(bn) for bn in bns)


@torch.no_grad()
def unfold_batchnorm(model: torch.nn.Module, dataset, images: int = 128, batch: int = 32) -> int:
    """Give folded BN layers real statistics without changing the network's function: with the
    per-channel mean m and variance v of each BN input (measured on `images` samples of `dataset`,
    whose items are (input, target, error)), set running stats (m, v), scale sqrt(v + eps) and
    bias + m. In eval mode the output is unchanged; in training mode, batch statistics now
    normalise as the pretrained network expects. Only folded layers change (a segmentation
    model's new layers keep theirs)."""
    from mnv3.data.datasets import collate

    bns = [bn for bn in _batchnorms(model) if _folded(bn)]
    sums: dict[int, list[torch.Tensor]] = {}

    def hook(module, inputs):
        x = inputs[0].double()
        s = sums.setdefault(id(module), [torch.zeros(x.shape[1], dtype=torch.float64)] * 2 + [0])
        sums[id(module)] = [s[0] + x.sum((0, 2, 3)), s[1] + (x * x).sum((0, 2, 3)), s[2] + x.numel() / x.shape[1]]

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    g = torch.Generator().manual_seed(0)
    chosen = torch.randperm(len(dataset), generator=g)[:images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=batch,
                                         collate_fn=collate)
    was_training, seen = model.training, 0
    model.eval()
    try:
        for x, _, _ in loader:
            if x is not None:
                model(x)
                seen += len(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise TrainError("none of the training images could be read to calibrate batch norm")
    for bn in bns:
        total, squares, n = sums[id(bn)]
        mean = total / n
        var = (squares / n - mean * mean).clamp_min(0)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.add_(mean.to(bn.bias.dtype))
    return seen


def identity(model: MobileNet, data: ClassificationData) -> dict[str, Any]:
    """What a resumed run must share with the run it continues ("data_ref", the --data it was
    opened from, only names the data in messages; the data's identity is its fingerprint)."""
    return {"task": "classify", "spec": model.spec.to_json(indent=None), "num_classes": model.num_classes,
            "classes": list(data.classes), "data": data.fingerprint(), "data_ref": data.ref or data.source}


def train(data: str | ClassificationData, out: str | Path, *, arch: str | ArchSpec | None = None,
          weights: str | None = None, recipe: Recipe | None = None, resume: bool = False,
          total_stride: int | None = None, workers: int = 0, checkpoint_steps: int = 500, eval_every: int = 1,
          strict: bool = False, progress: bool = True, tensorboard: bool = True, curves: str = "epoch",
          device: str = "auto") -> TrainResult:
    """Train a classifier and write the run folder `out` (recipe, metrics, curves, checkpoint,
    model file). Under torchrun every process calls this; process 0 writes the files."""
    recipe = recipe or Recipe()
    out = Path(out)
    if resume and not out.is_dir():
        raise TrainError(f"{out}: no such run folder to resume")
    data_set = open_data(data) if not isinstance(data, ClassificationData) else data
    if workers < 0 or checkpoint_steps < 0:
        raise TrainError("--workers and --checkpoint-steps must be >= 0")
    if not resume and ((out / "checkpoint.pt").exists() or (out / "model.safetensors").exists()):
        raise TrainError(f"{out} already holds a run; pass --resume to continue it, or choose "
                         "another --out")
    d: Dist = setup(device)
    try:
        model, pre = prepare_model(data_set, recipe, arch, weights, total_stride, progress and d.main)
        inputs = {"data": data_set.ref or str(data),
                  "arch": arch.to_dict() if isinstance(arch, ArchSpec) else arch, "weights": weights, "total_stride": total_stride}
        if d.main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "run.json", json.dumps(inputs, indent=2) + "\n")

        if recipe.qat:
            from mnv3.train.qat import prepare_qat

            points = prepare_qat(model)
            if d.main:
                print(f"quantization-aware training: int8 weights per channel and {points} activation points "
                      "simulated; the model file stays float (export it with mnv3 export --int8)", file=sys.stderr)

        def save_model(module: MobileNet, path: Path, metrics: dict[str, float]) -> None:
            meta = dataclasses.replace(model.meta, training={
                "recipe": recipe.name, "data": data_set.name, "epochs": recipe.epochs,
                "top1": metrics.get("val_top1"), "top5": metrics.get("val_top5"), "qat": recipe.qat})
            if recipe.qat:
                import copy

                from mnv3.train.qat import strip_qat

                module = strip_qat(copy.deepcopy(module))
            save(module, path, meta)

        options = RunOptions(out, resume=resume, workers=workers, checkpoint_steps=checkpoint_steps, eval_every=eval_every,
                             strict=strict, progress=progress, tensorboard=tensorboard, curves=curves)
        trainer = Trainer(model, data_set, recipe, options, ClassificationTask(recipe.label_smoothing),
                          d, pre, identity(model, data_set), save_model)
        return trainer.fit()
    finally:
        teardown(d)


def train_logged(data: str | ClassificationData, out: str | Path, **kw: Any) -> TrainResult:
    """`train` into a fresh `out` (what an interrupted run left there is cleared first), with the
    engine's lines kept in `out/train.log` instead of the terminal: one short run among many (a
    search trial, a NetAdapt proposal). Its curves.png is drawn once, after the last epoch."""
    import contextlib
    import io
    import shutil

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            return train(data, out, **{"curves": "end", **kw})
    finally:
        if out.is_dir():
            (out / "train.log").write_text(log.getvalue())


def run_inputs(out: str | Path) -> dict[str, Any]:
    """What a run in `out` was started from (data, arch, weights), for `--resume` with fewer flags."""
    path = Path(out) / "run.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError):
        raise TrainError(f"{path}: damaged; pass --data (and --arch or --weights) again with --resume") from None


def saved_recipe(out: str | Path) -> Recipe | None:
    path = Path(out) / "recipe.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise TrainError(f"{path}: damaged; pass --recipe with --resume") from None
    return Recipe.from_dict(data, str(path))
