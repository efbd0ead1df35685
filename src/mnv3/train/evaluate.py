"""Classification evaluation on an image folder and top-k prediction on single images."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnv3.data import DataError, ImageFolderSet, load_image, preprocess_pixels, to_input
from mnv3.data.datasets import collate
from mnv3.nn import MobileNet
from mnv3.weights import model_meta


@dataclass
class EvalResult:
    top1: float
    top5: float
    images: int
    skipped: int
    skipped_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "images": self.images, "skipped": self.skipped}


@torch.inference_mode()
def evaluate(model: MobileNet, folder: str | Path, batch_size: int = 32, workers: int = 0,
             progress: bool = True) -> EvalResult:
    """Top-1/top-5 of `model` on `folder/<class id>/*`; unreadable images are skipped and counted."""
    from tqdm import tqdm

    meta = model_meta(model)
    dataset = _named_split(folder, meta, model.num_classes)
    if dataset is None:
        dataset = ImageFolderSet(folder, meta.classes, meta.preprocess)
        if meta.classes is None and len({y for _, y in dataset.samples}) > model.num_classes:
            raise DataError(f"{folder}: more class folders than the model's {model.num_classes} outputs")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate)
    model.eval()
    correct1 = correct5 = seen = 0
    skipped: list[str] = []
    k = min(5, model.num_classes)
    for x, y, errors in tqdm(loader, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        skipped.extend(errors)
        if x is None:
            continue
        top = model(x).topk(k, dim=1).indices
        hits = top == y[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        seen += len(y)
    if seen == 0:
        raise DataError(f"{folder}: none of the {len(dataset)} images could be read")
    return EvalResult(correct1 / seen, correct5 / seen, seen, len(skipped), skipped)


def _named_split(folder: str | Path, meta, num_classes: int):
    """The validation (or test) split of a data set `mnv3 train --data` takes by name (digits,
    cifar10) or as a folder with train/ and val/ (or test/): what a model trained on it is scored on.
    None for a plain folder of class folders."""
    from mnv3.data.datasets import EvalSet, open_data

    root = Path(folder)
    named = str(folder) in ("digits", "cifar10") and not root.exists()
    if not (named or (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())):
        return None
    data = open_data(folder)
    if meta.classes is not None and tuple(meta.classes) != tuple(data.classes):
        raise DataError(f"--data {folder}: its classes ({', '.join(map(str, data.classes[:5]))}...) are not the "
                        "model's; score it on the data it was trained for")
    if len(data.classes) > num_classes:
        raise DataError(f"--data {folder}: {len(data.classes)} classes, more than the model's {num_classes} outputs")
    return EvalSet(data.val, meta.preprocess)


@torch.inference_mode()
def predict(model: MobileNet, image: str | Path, k: int = 5) -> list[tuple[str, str, float]]:
    """The top-k (class id, label, probability) for one image file."""
    meta = model_meta(model)
    x = to_input(preprocess_pixels(load_image(image), meta.preprocess), meta.preprocess)
    probs = model.eval()(x).softmax(dim=1)[0]
    values, indices = probs.topk(min(k, probs.numel()))
    return [((meta.classes[i] if meta.classes else str(i)), meta.label(i), float(v))
            for v, i in zip(values.tolist(), indices.tolist())]


# -- segmentation -----------------------------------------------------------------------------------
@dataclass
class SegEvalResult:
    miou: float
    pixel_acc: float
    per_class: dict[str, float]
    images: int

    def as_dict(self) -> dict:
        return {"miou": self.miou, "pixel_acc": self.pixel_acc, "per_class": self.per_class, "images": self.images}


@torch.inference_mode()
def evaluate_segmentation(model, data: str | Path, ignore_index: int | None = None, batch_size: int = 8,
                          workers: int = 0, progress: bool = True) -> SegEvalResult:
    """mIoU, per-class IoU and pixel accuracy of a segmentation model on the validation split of a
    mask data set, from one confusion matrix over the split, at the model's resolution."""
    from tqdm import tqdm

    from mnv3.data.masks import SegEvalSet, open_masks
    from mnv3.train.segment import confusion, scores

    meta = model_meta(model)
    if ignore_index is None:
        ignore_index = int((meta.training or {}).get("ignore_index", 255))
    data_set = open_masks(data, ignore_index, progress=progress)
    n = model.num_classes
    if len(data_set.classes) != n:
        raise DataError(f"{data}: {len(data_set.classes)} classes in classes.txt but the model predicts {n}")
    names = tuple(meta.class_names) if meta.class_names else data_set.classes
    if meta.class_names and tuple(meta.class_names) != tuple(data_set.classes):
        print(f"note: the model's class names differ from {data}'s classes.txt; scoring by index",
              file=sys.stderr)
    dataset = SegEvalSet(data_set.val, meta.preprocess, tuple(model.head_spec.resolution))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    model.eval()
    matrix = torch.zeros(n, n, dtype=torch.int64)
    seen = 0
    for x, y, errors in tqdm(loader, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        if errors:
            raise DataError(errors[0])
        matrix += confusion(model(x).argmax(1), y, n, ignore_index)
        seen += len(y)
    s = scores(matrix, names)
    return SegEvalResult(s["miou"], s["pixel_acc"], s["per_class"], seen)


def palette(n: int):
    """n distinct RGB colours (Pascal VOC's bit-interleaved palette), uint8 (n, 3)."""
    import numpy as np

    colours = np.zeros((max(n, 1), 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def resized_input(model, img) -> torch.Tensor:
    """A dense model's input from an RGB image: resized (bilinear, no crop) to the head's
    resolution, normalised with the model's preprocessing; (1, 3, h, w)."""
    import numpy as np
    from PIL import Image

    pre = model_meta(model).preprocess
    h, w = model.head_spec.resolution
    x = torch.from_numpy(np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32).copy())
    x = x.permute(2, 0, 1)[None].div_(255.0)
    return (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


@torch.inference_mode()
def predict_mask(model, image: str | Path):
    """(class-index mask at the image's own size, uint8 HxW; the RGB image): the image resized to
    the model's resolution, the logits resized back to the image."""
    import torch.nn.functional as F

    img = load_image(image)
    logits = model.eval()(resized_input(model, img))
    logits = F.interpolate(logits, size=(img.height, img.width), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).numpy(), img


def write_mask_pngs(mask, img, out: Path, stem: str, num_classes: int) -> tuple[Path, Path]:
    """`stem`_mask.png (colour mask) and `stem`_overlay.png (the image, half covered by it)."""
    import numpy as np
    from PIL import Image

    from mnv3.files import atomic_write

    colours = palette(num_classes)[mask]
    overlay = (0.5 * np.asarray(img, dtype=np.float32) + 0.5 * colours).astype(np.uint8)
    paths = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
    for path, pixels in zip(paths, (colours, overlay)):
        atomic_write(path, lambda tmp, p=pixels: Image.fromarray(p).save(tmp, format="PNG"))
    return paths


# -- detection -------------------------------------------------------------------------------------
@dataclass
class DetEvalResult:
    map: float
    map50: float
    per_class: dict[str, float]
    images: int

    def as_dict(self) -> dict:
        return {"map": self.map, "map50": self.map50, "per_class": self.per_class, "images": self.images}


@torch.inference_mode()
def evaluate_detection(model, data: str | Path, batch_size: int = 8, workers: int = 0, progress: bool = True,
                       post: dict | None = None, skip_bad: bool = False) -> DetEvalResult:
    """COCO mAP@[.5:.95], mAP@.5 and per-class AP (pycocotools) of a detector on the validation split
    of a COCO-JSON or YOLO data set, at the model's resolution (see `mnv3.train.detect`)."""
    from tqdm import tqdm

    from mnv3.data.boxes import DetEvalSet, open_boxes
    from mnv3.train.detect import POSTPROCESS, Detections, coco_scores

    meta = model_meta(model)
    data_set = open_boxes(data, skip_bad=skip_bad)
    if len(data_set.classes) != model.num_classes:
        raise DataError(f"{data}: {len(data_set.classes)} classes but the model predicts {model.num_classes}")
    if meta.class_names and tuple(meta.class_names) != tuple(data_set.classes):
        print(f"note: the model's class names differ from {data}'s; scoring by index", file=sys.stderr)
    size = tuple(model.head_spec.resolution)
    loader = torch.utils.data.DataLoader(DetEvalSet(data_set.val, meta.preprocess, size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate)
    model.eval()
    anchors, collected, seen = model.anchors(size), Detections(), 0
    options = {**POSTPROCESS, **(post or {})}
    for x, y, errors in tqdm(loader, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        if errors:
            raise DataError(errors[0])
        collected.add_batch(model(x), y, anchors, size, options)
        seen += len(x)
    s = coco_scores(collected, tuple(data_set.classes))
    return DetEvalResult(s["map"], s["map50"], s["per_class"], seen)


@torch.inference_mode()
def predict_boxes(model, image: str | Path, post: dict | None = None):
    """(detections {"boxes" in the image's own pixels, "scores", "labels"}, the RGB image): the image
    resized to the model's resolution, the boxes scaled back."""
    from mnv3.train.detect import POSTPROCESS

    img = load_image(image)
    h, w = model.head_spec.resolution
    found = model.eval().detect(resized_input(model, img), **{**POSTPROCESS, **(post or {})})[0]
    scale = torch.tensor([img.width / w, img.height / h] * 2)
    return {**found, "boxes": found["boxes"] * scale}, img


def draw_boxes(img, found: dict, names, path: Path) -> Path:
    """The image with each detection's box and "label score" drawn, as a PNG at `path`."""
    from PIL import ImageDraw

    from mnv3.files import atomic_write

    canvas = img.copy()
    draw = ImageDraw.Draw(canvas)
    colours = palette(max(len(names), 1) + 1)
    for box, score, label in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
        colour = tuple(int(c) for c in colours[label + 1])
        draw.rectangle(box, outline=colour, width=max(2, round(min(img.size) / 200)))
        text = f"{names[label]} {score:.2f}"
        left, top = box[0], max(0.0, box[1] - 12)
        draw.rectangle(draw.textbbox((left, top), text), fill=colour)
        draw.text((left, top), text, fill=(255, 255, 255))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
