"""The segmentation task of the training engine: per-pixel cross-entropy with an ignore index, and
metrics from one confusion matrix accumulated over the whole split (mIoU, per-class IoU, pixel
accuracy), never a mean of per-image scores."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """num_classes x num_classes counts, rows = true class, columns = predicted; ignored pixels and
    pixels whose label is outside the classes are left out."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: torch.Tensor, class_names: tuple[str, ...] | None = None) -> dict:
    """mIoU over the classes that occur (in the labels or the predictions), per-class IoU (NaN for a
    class that never occurs) and pixel accuracy."""
    m = matrix.double()
    tp = m.diag()
    union = m.sum(0) + m.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = union > 0
    names = class_names or tuple(str(i) for i in range(len(tp)))
    return {"miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / m.sum().clamp(min=1)),
            "per_class": {n: float(v) for n, v in zip(names, iou.tolist())}}


class SegmentationTask:
    name = "segment"

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: tuple[str, ...] | None = None,
                 class_weights: torch.Tensor | None = None) -> None:
        self.num_classes, self.ignore_index, self.class_names = num_classes, ignore_index, class_names
        self.class_weights = class_weights
        self.eval_stat_count = num_classes * num_classes + 2

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = None if self.class_weights is None else self.class_weights.to(outputs.device)
        return F.cross_entropy(outputs.float(), targets, weight=w, ignore_index=self.ignore_index)

    def train_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        keep = targets != self.ignore_index
        return [float(((outputs.argmax(1) == targets) & keep).sum()), float(keep.sum())]

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        outputs = outputs.float()
        loss = F.cross_entropy(outputs, targets, ignore_index=self.ignore_index, reduction="sum")
        pixels = float((targets != self.ignore_index).sum())
        matrix = confusion(outputs.argmax(1), targets, self.num_classes, self.ignore_index)
        return [float(loss), pixels, *matrix.flatten().double().tolist()]

    def metrics(self, sums: list[float], prefix: str) -> dict[str, float]:
        if prefix == "train":
            return {"train_pixel_acc": sums[0] / max(sums[1], 1.0)}
        c = self.num_classes
        loss, pixels = sums[0], max(sums[1], 1.0)
        matrix = torch.tensor(sums[2:2 + c * c], dtype=torch.float64).reshape(c, c)
        s = scores(matrix, self.class_names)
        per_class = {f"val_iou_{name}": v for name, v in s["per_class"].items()}
        return {"val_loss": loss / pixels, "val_miou": s["miou"], "val_pixel_acc": s["pixel_acc"], **per_class}


def class_frequencies(samples, num_classes: int, ignore_index: int, progress: bool = False) -> torch.Tensor:
    """Each class's share of the labelled pixels over all masks of a split (the ignore index and
    values outside the classes are left out)."""
    from tqdm import tqdm

    counts = np.zeros(num_classes, np.int64)
    for i in tqdm(range(len(samples)), desc="class frequencies", disable=not progress, leave=False):
        m = samples.mask(i)
        counts += np.bincount(m[(m != ignore_index) & (m < num_classes)].ravel(), minlength=num_classes)[:num_classes]
    return torch.from_numpy(counts / max(counts.sum(), 1))


def class_weights(freq: torch.Tensor, how: str) -> torch.Tensor | None:
    """Loss weights from class frequencies: "enet" 1 / ln(1.02 + p) (ENet, Paszke et al. 2016: at most
    about 50), "median" median(p) / p (SegNet's median frequency balancing); a class with no pixel
    gets weight 0 (it cannot occur in the loss anyway); "none" is None."""
    if how == "none":
        return None
    f = freq.double()
    if how == "enet":
        w = 1.0 / torch.log(1.02 + f)
    elif how == "median":
        w = f[f > 0].median() / f.clamp(min=1e-12)
    else:
        raise ValueError(f"unknown class weighting {how!r}")
    return torch.where(f > 0, w, torch.zeros_like(w)).float()


# -- the run -------------------------------------------------------------------------------------------
DEFAULT_SEGMENT_ARCH = "mobilenet_v3_large"


def prepare_segmenter(data, recipe, head_kind: str, size: tuple[int, int], arch=None, weights: str | None = None,
                      progress: bool = True):
    """(Segmenter, Preprocess, note): from `weights` (any source the classifier importers take, or a
    segmentation model file, whose head is kept when the classes match) or from `arch`."""
    import dataclasses

    from mnv3.data.masks import SegEvalSet
    from mnv3.heads import lraspp, segment_backbone
    from mnv3.nn.lraspp import Segmenter, build_segmenter
    from mnv3.train.dense import backbone_note, load_source, restore_batchnorm

    torch.manual_seed(recipe.seed)
    n = len(data.classes)
    source, base, mean_std = load_source(weights, arch, DEFAULT_SEGMENT_ARCH, recipe, progress)
    note = "from scratch"
    if isinstance(source, Segmenter):
        kind = source.head_spec.kind
        head = source.head_spec.replace(num_classes=n, resolution=size)
        spec = base.replace(resolution=min(size))
    else:
        kind = head_kind
        spec = segment_backbone(base, kind, size)
        head = lraspp(kind, n, size)
    model = build_segmenter(spec, head)
    if isinstance(source, Segmenter) and source.num_classes == n and source.head_spec.kind == kind:
        model.load_state_dict(source.state_dict())
        note = f"continued from {weights} (backbone and head)"
    elif source is not None:
        note = backbone_note(model, source, weights, "head and any changed layers")
    pre = dataclasses.replace(mean_std, resolution=size[0], resize=size[0])
    note += restore_batchnorm(model, source, SegEvalSet(data.train, pre, size))
    return model, pre, note


def segment_identity(model, data) -> dict:
    return {"task": "segment", "spec": model.spec.to_json(indent=None), "head": model.head_spec.to_json(),
            "num_classes": model.num_classes, "classes": list(data.classes), "data": data.fingerprint(),
            "data_ref": data.ref or data.source, "ignore_index": data.ignore_index}


def train_segment(data, out, *, head: str = "lraspp", size: tuple[int, int] | None = None, arch=None,
                  weights: str | None = None, recipe=None, resume: bool = False, ignore_index: int = 255,
                  workers: int = 0, checkpoint_steps: int = 500, eval_every: int = 1, progress: bool = True,
                  tensorboard: bool = True, device: str = "auto"):
    """Train an LR-ASPP segmentation model on a mask data set (see `mnv3.data.masks`) and write the
    run folder `out` as classification training does (recipe, metrics, curves, checkpoint, model)."""
    import dataclasses
    import json

    from PIL import Image

    from mnv3.data.masks import SegEvalSet, SegmentationData, SegTrainSet, open_masks
    from mnv3.files import atomic_write_text
    from mnv3.train.dense import check_run_folder
    from mnv3.train.distributed import setup, teardown
    from mnv3.train.engine import RunOptions, Trainer
    from mnv3.train.recipe import load_recipe
    from mnv3.weights import ModelMeta, save

    recipe = recipe or load_recipe("segment")
    out = check_run_folder(out, resume)
    data_set = data if isinstance(data, SegmentationData) else open_masks(data, ignore_index, progress=progress)
    if size is None:
        with Image.open(data_set.train.images[0]) as img:
            size = (img.height, img.width)           # the data's own size
    d = setup(device)
    try:
        model, pre, note = prepare_segmenter(data_set, recipe, head, size, arch, weights, progress and d.main)
        if d.main:
            print(f"{model.spec.name} + {model.head_spec.kind} at {size[0]}x{size[1]}, "
                  f"{len(data_set.classes)} classes (ignore index {data_set.ignore_index}): {note}", file=sys.stderr)
        if d.main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            inputs = {"task": "segment", "data": data_set.ref or str(data), "head": head, "size": list(size),
                      "arch": arch.to_dict() if hasattr(arch, "to_dict") else arch, "weights": weights, "ignore_index": data_set.ignore_index}
            atomic_write_text(out / "run.json", json.dumps(inputs, indent=2) + "\n")

        def save_model(module, path, metrics) -> None:
            meta = ModelMeta(classes=tuple(data_set.classes), class_names=tuple(data_set.classes), preprocess=pre,
                             source=weights, training={"recipe": recipe.name, "data": data_set.name,
                                                       "epochs": recipe.epochs, "miou": metrics.get("val_miou"),
                                                       "pixel_acc": metrics.get("val_pixel_acc"),
                                                       "ignore_index": data_set.ignore_index})
            save(module, path, meta)

        sets = (SegTrainSet(data_set.train, pre, size, data_set.ignore_index,
                            (recipe.seg_min_scale, recipe.seg_max_scale), recipe.hflip, recipe.seed),
                SegEvalSet(data_set.val, pre, size))
        options = RunOptions(out, resume=resume, workers=workers, checkpoint_steps=checkpoint_steps, eval_every=eval_every,
                             progress=progress, tensorboard=tensorboard)
        loss_weights = None
        if recipe.seg_class_weights != "none":
            freq = class_frequencies(data_set.train, len(data_set.classes), data_set.ignore_index, progress and d.main)
            loss_weights = class_weights(freq, recipe.seg_class_weights)
            if d.main:
                print(f"class weights ({recipe.seg_class_weights}): " + ", ".join(
                    f"{n} {w:.2f}" for n, w in zip(data_set.classes, loss_weights.tolist())), file=sys.stderr)
        task = SegmentationTask(len(data_set.classes), data_set.ignore_index, tuple(data_set.classes), loss_weights)
        trainer = Trainer(model, data_set, dataclasses.replace(recipe), options, task, d, pre,
                          segment_identity(model, data_set), save_model, sets=sets)
        return trainer.fit()
    finally:
        teardown(d)
