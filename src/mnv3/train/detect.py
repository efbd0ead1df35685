"""The detection task of the training engine (SSDLite): anchor matching, the SSD loss, and COCO
evaluation with pycocotools.

Targets are the data layer's padded rows `[sample index, class index (-1: none), x1, y1, x2, y2]`
in input pixels (see `mnv3.data.boxes`). Matching (torchvision's SSD): each anchor takes the box it
overlaps most when that IoU is at least 0.5, and each box's best anchor is forced to it; the others
are background. Loss: the box loss over matched anchors (smooth L1 on the encoded offsets, or GIoU
on decoded boxes) plus cross-entropy over the matched anchors and the hardest background anchors,
`neg_pos_ratio` of them per matched one, both divided by the number of matched anchors.

Validation runs the post-processing (`mnv3.nn.ssdlite.postprocess`) and scores the detections with
pycocotools' COCOeval (mAP@[.5:.95], mAP@.5, per-class AP) against the boxes at the model's input
size. IoU does not change when both axes are scaled, so these equal the scores in the images' own
pixels; only COCO's small/medium/large split would differ, and it is not reported.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mnv3.nn.ssdlite import decode, encode, postprocess, split_raw

POSTPROCESS = {"score_thresh": 0.001, "nms_thresh": 0.55, "topk": 300, "max_detections": 300}


def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, iou_thresh: float = 0.5) -> torch.Tensor:
    """(anchors,) index of the box each anchor is matched to, -1 for background."""
    from torchvision.ops import box_iou

    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    iou = box_iou(boxes, anchors)                     # (boxes, anchors)
    best, index = iou.max(0)
    matched = torch.where(best >= iou_thresh, index, torch.full_like(index, -1))
    matched[iou.argmax(1)] = torch.arange(len(boxes), device=anchors.device)
    return matched


def image_targets(targets: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image of a batch, (boxes (M, 4), labels (M,)) from the padded target rows."""
    out = []
    for j in range(n):
        rows = targets[j]
        keep = rows[:, 1] >= 0
        out.append((rows[keep, 2:6].float(), rows[keep, 1].long()))
    return out


def detection_loss(raw: torch.Tensor, targets: torch.Tensor, anchors: torch.Tensor, neg_pos_ratio: float = 3.0,
                   box_loss: str = "smooth_l1") -> tuple[torch.Tensor, int]:
    """(loss, matched anchors) of a batch; see the module doc."""
    from torchvision.ops import generalized_box_iou_loss

    rel, logits = split_raw(raw.float())
    anchors = anchors.to(raw.device)
    n = raw.shape[0]
    classes = torch.zeros(logits.shape[:2], dtype=torch.long, device=raw.device)
    box_sum = raw.new_zeros((), dtype=torch.float32)
    for j, (boxes, labels) in enumerate(image_targets(targets, n)):
        matched = match_anchors(anchors, boxes)
        fg = matched >= 0
        if not fg.any():
            continue
        classes[j, fg] = labels[matched[fg]] + 1
        gt = boxes[matched[fg]]
        if box_loss == "giou":
            box_sum = box_sum + generalized_box_iou_loss(decode(rel[j, fg], anchors[fg]), gt, reduction="sum")
        else:
            box_sum = box_sum + F.smooth_l1_loss(rel[j, fg], encode(gt, anchors[fg]), reduction="sum")
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), classes.reshape(-1), reduction="none").view(n, -1)
    foreground = classes > 0
    negatives = neg_pos_ratio * foreground.sum(1, keepdim=True)
    hardness = ce.detach().clone()
    hardness[foreground] = -math.inf
    rank = hardness.sort(1, descending=True)[1].sort(1)[1]
    background = rank < negatives
    matched_total = int(foreground.sum())
    denominator = max(1, matched_total)
    return (box_sum + ce[foreground].sum() + ce[background].sum()) / denominator, matched_total


# -- COCO evaluation -----------------------------------------------------------------------------------
@dataclass
class Detections:
    """What an evaluation collects: per image id its detections and its ground truth."""

    found: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    truth: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, image_id: int, detections: dict[str, torch.Tensor], boxes: torch.Tensor,
            labels: torch.Tensor) -> None:
        self.found[image_id] = {k: v.detach().cpu() for k, v in detections.items()}
        self.truth[image_id] = (boxes.detach().cpu(), labels.detach().cpu())

    def add_batch(self, raw: torch.Tensor, targets: torch.Tensor, anchors: torch.Tensor, size: tuple[int, int],
                  post: dict) -> None:
        """Post-process a batch's raw output and add each image (its id: the sample index in its
        target rows) with its ground truth."""
        found = postprocess(raw, anchors, size, **post)
        for j, (boxes, labels) in enumerate(image_targets(targets, len(raw))):
            self.add(int(targets[j, 0, 0]), found[j], boxes, labels)


def coco_scores(collected: Detections, class_names: tuple[str, ...]) -> dict:
    """{"map", "map50", "per_class": {name: AP or NaN when the class has no box}} from pycocotools'
    COCOeval (bbox) over the collected detections."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    k = len(class_names)
    images, annotations = [], []
    for image_id, (boxes, labels) in sorted(collected.truth.items()):
        images.append({"id": image_id})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
    results = [{"image_id": image_id, "category_id": int(label) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(score)}
               for image_id, d in sorted(collected.found.items())
               for b, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    empty = {"map": 0.0, "map50": 0.0, "per_class": {n: float("nan") for n in class_names}}
    if not annotations:
        return {**empty, "map": float("nan"), "map50": float("nan")}
    present = {a["category_id"] for a in annotations}
    if not results:
        return {**empty, "per_class": {n: 0.0 if i + 1 in present else float("nan") for i, n in enumerate(class_names)}}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]      # IoU x recall x class, all areas, 100 dets
    per_class = {}
    for i, name in enumerate(class_names[:k]):
        p = precision[:, :, i]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else float("nan")
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1]), "per_class": per_class}


class DetectionTask:
    """The engine's plug-in: `loss` matches and scores; evaluation collects post-processed
    detections (`eval_begin`, `eval_stats`, `eval_gather`) that `metrics` scores with COCOeval."""

    name = "detect"
    eval_stat_count = 1

    def __init__(self, anchors: torch.Tensor, size: tuple[int, int], class_names: tuple[str, ...],
                 neg_pos_ratio: float = 3.0, box_loss: str = "smooth_l1", post: dict | None = None) -> None:
        self.anchors, self.size, self.class_names = anchors, tuple(size), tuple(class_names)
        self.neg_pos_ratio, self.box_loss = neg_pos_ratio, box_loss
        self.post = {**POSTPROCESS, **(post or {})}
        self.collected = Detections()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return detection_loss(outputs, targets, self.anchors, self.neg_pos_ratio, self.box_loss)[0]

    def train_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        return [float((targets[..., 1] >= 0).sum())]

    def eval_begin(self) -> None:
        self.collected = Detections()

    def eval_stats(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        loss, _ = detection_loss(outputs, targets, self.anchors, self.neg_pos_ratio, self.box_loss)
        self.collected.add_batch(outputs, targets, self.anchors, self.size, self.post)
        return [float(loss) * len(outputs)]

    def eval_gather(self, dist) -> None:
        """Every process's detections on every process (DDP), so that each scores the whole split."""
        if not getattr(dist, "active", False):
            return
        import torch.distributed as td

        parts: list = [None] * dist.world
        td.all_gather_object(parts, (self.collected.found, self.collected.truth))
        self.collected = Detections()
        for found, truth in parts:
            self.collected.found.update(found)
            self.collected.truth.update(truth)

    def metrics(self, sums: list[float], prefix: str) -> dict[str, float]:
        if prefix == "train":
            return {"train_boxes_per_image": sums[0] / max(sums[-1], 1.0)}
        s = coco_scores(self.collected, self.class_names)
        return {"val_loss": sums[0] / max(sums[-1], 1.0), "val_map": s["map"], "val_map50": s["map50"]}


# -- the run -------------------------------------------------------------------------------------------
DEFAULT_DETECT_ARCH = "mobilenet_v3_large"


def prepare_detector(data, recipe, size: tuple[int, int], arch=None, weights: str | None = None,
                     reduced: bool = False, progress: bool = True):
    """(Detector, Preprocess, note): from `weights` (any source the classifier importers take, or a
    detection model file, whose heads are kept when the classes match) or from `arch`; `reduced`
    halves the layers between C4 and C5 (the paper's reduced tail)."""
    import dataclasses

    from mnv3.arch import reduced_tail
    from mnv3.data.boxes import DetEvalSet
    from mnv3.heads import ssdlite
    from mnv3.nn.ssdlite import Detector, build_detector
    from mnv3.train.dense import backbone_note, load_source, restore_batchnorm

    torch.manual_seed(recipe.seed)
    n = len(data.classes)
    source, base, mean_std = load_source(weights, arch, DEFAULT_DETECT_ARCH, recipe, progress)
    note = "from scratch"
    if reduced and not isinstance(source, Detector) and not base.name.endswith("_reduced_tail"):
        base = reduced_tail(base)
    spec = base.replace(resolution=min(size))
    model = build_detector(spec, ssdlite(spec, n, size))
    if isinstance(source, Detector) and source.num_classes == n:
        model.load_state_dict(source.state_dict())
        note = f"continued from {weights} (backbone, extra layers and heads)"
    elif isinstance(source, Detector):
        theirs = {k: v for k, v in source.state_dict().items() if not k.startswith("head.classification_head")}
        ours = model.state_dict()
        model.load_state_dict({k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}, strict=False)
        note = f"from {weights}: all but the class layers ({source.num_classes} classes there, {n} here)"
    elif source is not None:
        note = backbone_note(model, source, weights, "reduced layers, if any")
    pre = dataclasses.replace(mean_std, resolution=size[0], resize=size[0])
    note += restore_batchnorm(model, source, DetEvalSet(data.train, pre, size))
    return model, pre, note


def detect_identity(model, data) -> dict:
    return {"task": "detect", "spec": model.spec.to_json(indent=None), "head": model.head_spec.to_json(),
            "num_classes": model.num_classes, "classes": list(data.classes), "data": data.fingerprint(),
            "data_ref": data.ref or data.source}


def train_detect(data, out, *, size: tuple[int, int] = (320, 320), arch=None, weights: str | None = None,
                 reduced: bool = False, recipe=None, resume: bool = False, workers: int = 0,
                 checkpoint_steps: int = 500, eval_every: int = 1, progress: bool = True, tensorboard: bool = True,
                 device: str = "auto", skip_bad: bool = False):
    """Train an SSDLite detector on a COCO-JSON or YOLO data set (see `mnv3.data.boxes`) and write the
    run folder `out` as the other tasks do (recipe, metrics, curves, checkpoint, model)."""
    import dataclasses
    import json

    from mnv3.data.boxes import DetectionData, DetEvalSet, DetTrainSet, open_boxes
    from mnv3.files import atomic_write_text
    from mnv3.train.dense import check_run_folder
    from mnv3.train.distributed import setup, teardown
    from mnv3.train.engine import RunOptions, Trainer
    from mnv3.train.recipe import load_recipe
    from mnv3.weights import ModelMeta, save

    recipe = recipe or load_recipe("detect")
    out = check_run_folder(out, resume)
    data_set = data if isinstance(data, DetectionData) else open_boxes(data, skip_bad=skip_bad)
    d = setup(device)
    try:
        model, pre, note = prepare_detector(data_set, recipe, size, arch, weights, reduced, progress and d.main)
        if d.main:
            print(f"{model.spec.name} + ssdlite at {size[0]}x{size[1]}, {len(data_set.classes)} classes, "
                  f"{len(model.anchors())} anchors: {note}", file=sys.stderr)
        if d.main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            inputs = {"task": "detect", "data": data_set.ref or str(data), "size": list(size), "arch": arch.to_dict() if hasattr(arch, "to_dict") else arch,
                      "weights": weights, "reduced_tail": reduced, "skip_bad": skip_bad}
            atomic_write_text(out / "run.json", json.dumps(inputs, indent=2) + "\n")

        def save_model(module, path, metrics) -> None:
            meta = ModelMeta(classes=tuple(str(i) for i in data_set.category_ids), class_names=tuple(data_set.classes),
                             preprocess=pre, source=weights,
                             training={"recipe": recipe.name, "data": data_set.name, "epochs": recipe.epochs,
                                       "map": metrics.get("val_map"), "map50": metrics.get("val_map50")})
            save(module, path, meta)

        sets = (DetTrainSet(data_set.train, pre, size, recipe.seed, recipe.hflip, recipe.det_augment),
                DetEvalSet(data_set.val, pre, size))
        options = RunOptions(out, resume=resume, workers=workers, checkpoint_steps=checkpoint_steps, eval_every=eval_every,
                             progress=progress, tensorboard=tensorboard)
        task = DetectionTask(model.anchors(size), size, tuple(data_set.classes), recipe.neg_pos_ratio, recipe.box_loss)
        trainer = Trainer(model, data_set, dataclasses.replace(recipe), options, task, d, pre,
                          detect_identity(model, data_set), save_model, sets=sets)
        return trainer.fit()
    finally:
        teardown(d)
