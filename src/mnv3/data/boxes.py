"""Object-detection data: images with labelled boxes, in two layouts, and the joint image/box
transforms for SSDLite training (torchvision transforms v2 with `tv_tensors.BoundingBoxes`).

Layouts (`open_boxes`):
  COCO JSON    ROOT/annotations/instances_<split>.json (train: the one whose name holds "train",
               val: "val"), images at ROOT/images/<split>/ or ROOT/<split>/ (the json's file_name);
               classes in category-id order; `iscrowd` annotations are left out (and counted);
               images without annotations are kept with no box. ../shared/data/coco128
  YOLO labels  a YAML file (or a folder holding config.yaml / data.yaml) with `names:` (index ->
               name, or a list) and `train:` / `val:` image folders relative to `path:` (itself
               relative to the YAML's folder, or failing that to its parent); one .txt per image of
               `class cx cy w h` lines (normalised), in the images' folder with /images/ replaced by
               /labels/, or failing that in <YAML folder>/labels/<image folder name>; an image
               without a label file has no box. ../shared/data/coco128/object_detection

Every box is checked when the data set is opened, before any training: a box outside its image
(by more than 1 pixel; within that it is clipped), a box without width or height, an unknown
category, a missing image or an unparseable annotation is each one error naming the file, or with
`skip_bad` dropped and counted. Boxes are kept as float32 x1, y1, x2, y2 in pixels of the original
image; the data sets give them in pixels of the model input.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnv3.data.images import IMAGE_SUFFIXES, DataError, load_image
from mnv3.weights.model_file import Preprocess

TOLERANCE = 1.0       # pixels a box may stick out of its image (it is clipped)
SKIP_HINT = "fix the annotation or pass --skip-bad-boxes"
LAYOUTS = ("a COCO folder (annotations/instances_<split>.json with images/<split>/ or <split>/)",
           "a YOLO data YAML (or a folder holding config.yaml or data.yaml) with names, path, train, val")


@dataclass
class BoxSamples:
    """One split: image files, their ids, and per image float32 (M, 4) x1, y1, x2, y2 boxes in
    pixels of the original image with int64 (M,) class indices (M may be 0). `sizes` (w, h), when
    known, are the image sizes the boxes refer to; an image found to differ is an error."""

    images: list[Path]
    image_ids: list[int]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return str(self.images[i])


@dataclass
class DetectionData:
    name: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...]     # the data's own category id of each class
    train: BoxSamples
    val: BoxSamples
    source: str = ""
    ref: str = ""
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, self.classes, self.category_ids, len(self.train),
                                       len(self.val)]).encode())
        for split in (self.train, self.val):
            for image, boxes in zip(split.images, split.boxes):
                h.update(f"{image.name}:{len(boxes)}\n".encode())
        return h.hexdigest()[:16]


# -- opening ---------------------------------------------------------------------------------------
class _Checker:
    """Turns each bad annotation into a DataError, or with `skip_bad` counts it under `kind`."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad, self.skipped = skip_bad, {}

    def bad(self, kind: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.count(kind)

    def count(self, kind: str, n: int = 1) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + n

    def box(self, where: str, xyxy: tuple[float, float, float, float], size: tuple[int, int]) -> list | None:
        """The box clipped to the image, or None (counted) when it is bad."""
        x1, y1, x2, y2 = xyxy
        w, h = size
        if not all(np.isfinite(xyxy)) or x2 <= x1 or y2 <= y1:
            self.bad("boxes", f"{where}: box {_fmt(xyxy)} has no width or height; {SKIP_HINT}")
            return None
        if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > w + TOLERANCE or y2 > h + TOLERANCE:
            self.bad("boxes", f"{where}: box {_fmt(xyxy)} (x1, y1, x2, y2) lies outside the {w}x{h} image; "
                              f"{SKIP_HINT}")
            return None
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if x2 <= x1 or y2 <= y1:
            self.bad("boxes", f"{where}: box {_fmt(xyxy)} is empty once clipped to the {w}x{h} image; {SKIP_HINT}")
            return None
        return [x1, y1, x2, y2]


def _fmt(xyxy) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in xyxy) + "]"


def _arrays(rows: list[list[float]], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def open_boxes(data: str | Path, skip_bad: bool = False) -> DetectionData:
    """A detection data set in either layout (see the module doc), every box checked."""
    root = Path(data)
    checker = _Checker(skip_bad)
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        data_set = _yolo(root, checker)
    elif root.is_dir() and sorted((root / "annotations").glob("instances_*.json")):
        data_set = _coco(root, checker)
    elif root.is_dir() and any((root / n).is_file() for n in ("config.yaml", "data.yaml")):
        data_set = _yolo(next(root / n for n in ("config.yaml", "data.yaml") if (root / n).is_file()), checker)
    else:
        raise DataError(f"--data {root}: not a detection data set; expected {LAYOUTS[0]}, or {LAYOUTS[1]}")
    data_set.ref, data_set.skipped = str(data), checker.skipped
    if checker.skipped:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(checker.skipped.items()))
        print(f"{data_set.name}: left out {counts}", file=sys.stderr)
    return data_set


def _coco(root: Path, checker: _Checker) -> DetectionData:
    found = sorted((root / "annotations").glob("instances_*.json"))

    def pick(word: str) -> Path:
        matches = [p for p in found if word in p.stem]
        if len(matches) != 1:
            raise DataError(f"{root / 'annotations'}: expected one instances_*{word}*.json, found "
                            f"{[p.name for p in matches] or 'none'}")
        return matches[0]

    train_json, val_json = pick("train"), pick("val")
    spec = _read_json(train_json)
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in spec["categories"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{train_json}: `categories` must be a list of {{id, name}}") from None
    if not categories:
        raise DataError(f"{train_json}: no categories")
    index = {cid: k for k, (cid, _) in enumerate(categories)}
    train = _coco_split(root, train_json, spec, index, checker)
    val = _coco_split(root, val_json, _read_json(val_json), index, checker)
    return DetectionData(root.name, tuple(n for _, n in categories), tuple(c for c, _ in categories), train, val,
                         source=str(root))


def _read_json(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO annotations ({type(exc).__name__}: {exc})") from None
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise DataError(f"{path}: expected a COCO instances file with `images`, `annotations` and `categories` lists")
    return spec


def _coco_split(root: Path, path: Path, spec: dict, index: dict[int, int], checker: _Checker) -> BoxSamples:
    split = path.stem.removeprefix("instances_")
    folder = next((d for d in (root / "images" / split, root / split) if d.is_dir()), None)
    if folder is None:
        raise DataError(f"{path}: no image folder; expected {root / 'images' / split} or {root / split}")
    images: dict[int, tuple[Path, tuple[int, int]]] = {}
    for entry in spec["images"]:
        try:
            image_id, size = int(entry["id"]), (int(entry["width"]), int(entry["height"]))
            file = folder / str(entry["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: image entry {str(entry)[:80]} lacks id, file_name, width or height") from None
        if not file.is_file():
            checker.bad("images", f"{file}: missing (listed in {path}); add the image or pass --skip-bad-boxes")
            continue
        images[image_id] = (file, size)
    rows: dict[int, list] = {i: [] for i in images}
    labels: dict[int, list] = {i: [] for i in images}
    listed = {int(e["id"]) for e in spec["images"]}
    for ann in spec["annotations"]:
        try:
            image_id, category, bbox = int(ann["image_id"]), int(ann["category_id"]), [float(v) for v in ann["bbox"]]
            if len(bbox) != 4:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            checker.bad("boxes", f"{path}: annotation {str(ann)[:80]} lacks image_id, category_id or a 4-number "
                                 f"bbox; {SKIP_HINT}")
            continue
        if ann.get("iscrowd", 0):
            checker.count("crowd")
            continue
        if image_id not in images:
            if image_id not in listed:
                checker.bad("boxes", f"{path}: annotation {ann.get('id')} names image id {image_id}, which is not "
                                     f"in `images`; {SKIP_HINT}")
            continue          # its image was left out
        file, size = images[image_id]
        where = f"{file} (annotation {ann.get('id')} in {path})"
        if category not in index:
            checker.bad("boxes", f"{where}: unknown category id {category}; {SKIP_HINT}")
            continue
        x, y, w, h = bbox
        box = checker.box(where, (x, y, x + w, y + h), size)
        if box is not None:
            rows[image_id].append(box)
            labels[image_id].append(index[category])
    order = list(images)
    pairs = [_arrays(rows[i], labels[i]) for i in order]
    if not order:
        raise DataError(f"{path}: no images")
    return BoxSamples([images[i][0] for i in order], order, [b for b, _ in pairs], [lab for _, lab in pairs],
                      [images[i][1] for i in order])


def _yolo(config: Path, checker: _Checker) -> DetectionData:
    import yaml

    try:
        spec = yaml.safe_load(config.read_text())
    except Exception as exc:  # noqa: BLE001 - yaml raises its own error types
        raise DataError(f"{config}: not valid YAML ({exc})") from None
    names = spec.get("names") if isinstance(spec, dict) else None
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DataError(f"{config}: expected `names:` (index: name, or a list) and `train:` / `val:` image folders")
    try:
        by_index = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise DataError(f"{config}: `names:` keys must be class indices 0..K-1") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{config}: `names:` must number the classes 0..{len(by_index) - 1} without gaps")
    classes = tuple(by_index[k] for k in range(len(by_index)))
    base = Path(str(spec.get("path") or "."))

    def split(name: str) -> BoxSamples:
        entry = spec.get(name) or (spec.get("test") if name == "val" else None)
        if not isinstance(entry, str):
            raise DataError(f"{config}: `{name}:` must name an image folder (relative to `path:`)")
        tried = [config.parent / base / entry, config.parent.parent / base / entry]
        folder = next((d for d in tried if d.is_dir()), None)
        if folder is None:
            raise DataError(f"{config}: `{name}: {entry}` is not a folder; looked at {tried[0]} and {tried[1]}")
        return _yolo_split(config, folder, len(classes), checker)

    train, val = split("train"), split("val")
    return DetectionData(config.parent.name, classes, tuple(range(len(classes))), train, val, source=str(config))


def _labels_folder(config: Path, folder: Path) -> Path:
    parts = list(folder.parts)
    if "images" in parts:
        k = len(parts) - 1 - parts[::-1].index("images")
        conventional = Path(*parts[:k], "labels", *parts[k + 1:])
        if conventional.is_dir():
            return conventional
    fallback = config.parent / "labels" / folder.name
    if not fallback.is_dir():
        raise DataError(f"{folder}: no labels folder; expected the images path with /images/ replaced by "
                        f"/labels/, or {fallback}")
    return fallback


def _yolo_split(config: Path, folder: Path, num_classes: int, checker: _Checker) -> BoxSamples:
    labels_dir = _labels_folder(config, folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    samples = BoxSamples([], [], [], [], [])
    for k, image in enumerate(files):
        try:
            with Image.open(image) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            checker.bad("images", f"{image}: cannot read image ({type(exc).__name__}: {exc}); replace it or pass "
                                  "--skip-bad-boxes")
            continue
        label_file = (labels_dir / image.relative_to(folder)).with_suffix(".txt")
        rows, labels = [], []
        text = label_file.read_text() if label_file.is_file() else ""
        w, h = size
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{label_file}:{n} (image {image.name})"
            try:
                fields = line.split()
                if len(fields) != 5:
                    raise ValueError
                cls_f, cx, cy, bw, bh = (float(v) for v in fields)
                if cls_f != int(cls_f):
                    raise ValueError
            except ValueError:
                checker.bad("boxes", f"{where}: cannot parse {line.strip()[:60]!r}; expected `class cx cy w h` "
                                     f"(normalised); {SKIP_HINT}")
                continue
            if not 0 <= cls_f < num_classes:
                checker.bad("boxes", f"{where}: class {int(cls_f)} is not one of the {num_classes} classes "
                                     f"(0-{num_classes - 1}); {SKIP_HINT}")
                continue
            box = checker.box(where, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h),
                              size)
            if box is not None:
                rows.append(box)
                labels.append(int(cls_f))
        b, lab = _arrays(rows, labels)
        samples.images.append(image)
        samples.image_ids.append(k)
        samples.boxes.append(b)
        samples.labels.append(lab)
        samples.sizes.append(size)
    return samples


# -- samples as tensors ----------------------------------------------------------------------------
def make_target(i: int, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 (max(M, 1), 6) rows [i, label, x1, y1, x2, y2]; no box: one row [i, -1, 0, 0, 0, 0]."""
    if len(boxes) == 0:
        return torch.tensor([[float(i), -1.0, 0.0, 0.0, 0.0, 0.0]])
    index = torch.full((len(boxes), 1), float(i))
    return torch.cat([index, labels.reshape(-1, 1).float(), boxes.reshape(-1, 4).float()], dim=1)


def fill_pixel(pre: Preprocess) -> tuple[int, int, int]:
    """The mean pixel (0-255 per channel): what zoom-out pads with, 0 after normalisation."""
    return tuple(round(m * 255) for m in pre.mean)


AUGMENT_POLICIES = ("ssd", "ssdlite")


def train_steps(pre: Preprocess, size: tuple[int, int], hflip: bool = True, iou_crop: bool = True,
                policy: str = "ssd") -> list:
    """The SSD augmentation, in order: photometric distortion, zoom out, IoU crop, flip, resize to
    `size` (h, w), then boxes clamped and those under 1 pixel dropped with their labels. Policy
    "ssdlite" (torchvision's SSDLite reference) leaves out the photometric distortion and the zoom
    out: a small network gains little from objects shrunk up to 4x."""
    from torchvision.transforms import v2

    if policy not in AUGMENT_POLICIES:
        raise DataError(f"detection augmentation: expected one of {AUGMENT_POLICIES}, got {policy!r}")
    steps = [] if policy == "ssdlite" else [v2.RandomPhotometricDistort(p=0.5),
                                             v2.RandomZoomOut(fill=fill_pixel(pre), side_range=(1.0, 4.0), p=0.5)]
    if iou_crop:
        steps.append(v2.RandomIoUCrop())
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return steps + [v2.Resize(size, antialias=True), v2.ClampBoundingBoxes(),
                    v2.SanitizeBoundingBoxes(min_size=1, labels_getter="default"),
                    v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]


class _BoxSet(torch.utils.data.Dataset):
    samples: BoxSamples

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Image.Image | str:
        """The RGB image of sample i, or the error message naming its file."""
        try:
            img = load_image(self.samples.images[i])
        except DataError as exc:
            return str(exc)
        sizes = self.samples.sizes
        if sizes is not None and img.size != tuple(sizes[i]):
            return (f"{self.samples.images[i]}: image is {img.size[0]}x{img.size[1]} but its annotations are for "
                    f"{sizes[i][0]}x{sizes[i][1]}")
        return img


class DetTrainSet(_BoxSet):
    """SSD-augmented (image, boxes) at `size` (h, w), each sample under its own seed (seed, epoch,
    index); set `epoch` before each epoch. An image without boxes skips the IoU crop, which needs
    boxes (on none it only ever leaves the image as it is)."""

    def __init__(self, samples: BoxSamples, pre: Preprocess, size: tuple[int, int], seed: int = 0,
                 hflip: bool = True, policy: str = "ssd") -> None:
        from torchvision.transforms import v2

        self.samples, self.pre, self.size, self.seed, self.epoch = samples, pre, tuple(size), seed, 0
        self.transform = v2.Compose(train_steps(pre, self.size, hflip, policy=policy))
        self.transform_empty = v2.Compose(train_steps(pre, self.size, hflip, iou_crop=False, policy=policy))

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        from mnv3.data.datasets import sample_seed

        img = self.image(i)
        if isinstance(img, str):
            return None, None, img
        boxes = self.samples.boxes[i]
        sample = {"image": tv_tensors.Image(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)),
                  "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.copy()), format="XYXY",
                                                    canvas_size=(img.size[1], img.size[0])),
                  "labels": torch.from_numpy(self.samples.labels[i].copy())}
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            out = (self.transform if len(boxes) else self.transform_empty)(sample)
        x = out["image"].as_subclass(torch.Tensor)
        return x, make_target(i, out["boxes"].as_subclass(torch.Tensor), out["labels"]), None


class DetEvalSet(_BoxSet):
    """(image, boxes) resized to `size` (h, w), bilinear, boxes scaled alike."""

    def __init__(self, samples: BoxSamples, pre: Preprocess, size: tuple[int, int]) -> None:
        self.samples, self.pre, self.size = samples, pre, tuple(size)

    def __getitem__(self, i: int):
        img = self.image(i)
        if isinstance(img, str):
            return None, None, img
        h, w = self.size
        scale = torch.tensor([w / img.size[0], h / img.size[1]] * 2)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        mean, std = torch.tensor(self.pre.mean).view(3, 1, 1), torch.tensor(self.pre.std).view(3, 1, 1)
        boxes = torch.from_numpy(self.samples.boxes[i]) * scale
        return (x - mean) / std, make_target(i, boxes, torch.from_numpy(self.samples.labels[i])), None
