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


@torch.inference_mode()
def predict(model: MobileNet, image: str | Path, k: int = 5) -> list[tuple[str, str, float]]:
    """The top-k (class id, label, probability) for one image file."""
    meta = model_meta(model)
    x = to_input(preprocess_pixels(load_image(image), meta.preprocess), meta.preprocess)
    probs = model.eval()(x).softmax(dim=1)[0]
    values, indices = probs.topk(min(k, probs.numel()))
    return [((meta.classes[i] if meta.classes else str(i)), meta.label(i), float(v))
            for v, i in zip(values.tolist(), indices.tolist())]
