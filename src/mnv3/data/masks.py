"""Segmentation data: images with single-channel class-index masks, in two layouts, and the joint
image/mask transforms (torchvision transforms v2 with `tv_tensors.Mask`).

Layouts (`open_masks`):
  mask folders   ROOT/classes.txt (one class name per line, index = line number - 1) and
                 ROOT/{train,val}/images/*.jpg|png with ROOT/{train,val}/masks/<same stem>.png
                 (`test/` stands in for a missing `val/`); CamVid in ../shared/data/camvid
  Pascal VOC     ROOT/JPEGImages, ROOT/SegmentationClass (palette PNGs: the palette index is the
                 class, 255 the border), ROOT/ImageSets/Segmentation/{train,val}.txt; the 21 VOC
                 classes
  class-id masks ROOT/config.yaml (or the YAML file itself): `train: {images: DIR, masks: DIR}`,
                 `val: {...}` (relative to the YAML's folder) and `classes: {id: name}`; mask values
                 are category ids (COCO panoptic ids in ../shared/data/coco128/semantic_segmentation),
                 mapped to class indices 0..K-1 in id order, and an `unlabeled`/`void` id to the
                 ignore index. Every mask is paired with the image of its name; images without a
                 mask are left out (and counted)

Every mask is checked when the data set is opened, before any training: a missing mask, a mask
whose size differs from its image, a mask that is not single-channel, or values that are neither a
class nor the ignore index are each one error naming the file. Masks are resized with nearest
neighbour only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnv3.data.images import IMAGE_SUFFIXES, DataError, load_image
from mnv3.weights.model_file import Preprocess

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


UNKNOWN = 65535      # a category id the class map does not name


@dataclass
class MaskSamples:
    """One split: image files and their masks, pair by pair; `lut` maps the masks' values (category
    ids) to class indices when they are not indices already."""

    images: list[Path]
    masks: list[Path]
    lut: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return str(self.images[i])

    def mask(self, i: int) -> np.ndarray:
        raw = read_mask(self.masks[i])
        return raw if self.lut is None else self.lut[raw].astype(np.uint8)


@dataclass
class SegmentationData:
    name: str
    classes: tuple[str, ...]
    train: MaskSamples
    val: MaskSamples
    ignore_index: int = 255
    source: str = ""
    ref: str = ""

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, self.classes, self.ignore_index, len(self.train),
                                       len(self.val)]).encode())
        for split in (self.train, self.val):
            for image, mask in zip(split.images, split.masks):
                h.update(f"{image.name}:{mask.name}\n".encode())
        return h.hexdigest()[:16]


# -- opening ---------------------------------------------------------------------------------------
def open_masks(data: str | Path, ignore_index: int = 255, check: bool = True,
               progress: bool = True) -> SegmentationData:
    """A segmentation data set in either layout (see the module doc), every mask checked (with a
    progress bar for 200 masks or more, unless `progress` is off)."""
    root = Path(data)
    if not root.is_dir() and not (root.is_file() and root.suffix.lower() in (".yaml", ".yml")):
        raise DataError(f"--data {root}: no such folder; expected a mask-folder data set (classes.txt, "
                        "train/images, train/masks, val/...), a Pascal VOC folder (JPEGImages, ...) or a "
                        "class-id mask set (config.yaml)")
    if not 0 <= ignore_index <= 255:
        raise DataError(f"--ignore-index: expected 0-255 (masks are 8-bit), got {ignore_index}")
    if root.suffix.lower() in (".yaml", ".yml") and root.is_file():
        data_set = _class_id_masks(root, ignore_index)
    elif (root / "config.yaml").is_file():
        data_set = _class_id_masks(root / "config.yaml", ignore_index)
    elif (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        data_set = _voc(root, ignore_index)
    else:
        data_set = _mask_folders(root, ignore_index)
    if check:
        for split in (data_set.train, data_set.val):
            check_masks(split, len(data_set.classes), ignore_index, progress)
    data_set.ref = str(data)
    return data_set


def _classes_file(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing; a mask-folder data set names its classes there, one per line "
                        "(index = line number - 1)")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise DataError(f"{path}: no class names")
    if len(names) > 255:
        raise DataError(f"{path}: {len(names)} classes; 8-bit masks hold at most 255 (one value is the ignore index)")
    return names


def _split_folder(root: Path, name: str) -> MaskSamples:
    images_dir, masks_dir = root / name / "images", root / name / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d}: missing; expected {root}/{name}/images and {root}/{name}/masks")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"{images_dir}: no images")
    masks = []
    for image in images:
        mask = masks_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise DataError(f"{image}: no mask; expected {mask}")
        masks.append(mask)
    return MaskSamples(images, masks)


def _mask_folders(root: Path, ignore_index: int) -> SegmentationData:
    classes = _classes_file(root)
    val_name = "val" if (root / "val").is_dir() else "test"
    return SegmentationData(root.name, classes, _split_folder(root, "train"), _split_folder(root, val_name),
                            ignore_index, source=str(root))


def _voc(root: Path, ignore_index: int) -> SegmentationData:
    def split(name: str) -> MaskSamples:
        listing = root / "ImageSets" / "Segmentation" / f"{name}.txt"
        if not listing.is_file():
            raise DataError(f"{listing}: missing; a Pascal VOC folder lists its {name} images there")
        images, masks = [], []
        for stem in (s.strip() for s in listing.read_text().splitlines() if s.strip()):
            image, mask = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
            if not image.is_file():
                raise DataError(f"{image}: listed in {listing} but missing")
            if not mask.is_file():
                raise DataError(f"{image}: no mask; expected {mask}")
            images.append(image)
            masks.append(mask)
        if not images:
            raise DataError(f"{listing}: no images listed")
        return MaskSamples(images, masks)

    classes = _classes_file(root) if (root / "classes.txt").is_file() else VOC_CLASSES
    return SegmentationData(root.name, classes, split("train"), split("val"), ignore_index, source=str(root))


def _class_id_masks(config: Path, ignore_index: int) -> SegmentationData:
    import yaml

    try:
        spec = yaml.safe_load(config.read_text())
    except Exception as exc:  # noqa: BLE001 - yaml raises its own error types
        raise DataError(f"{config}: not valid YAML ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), dict):
        raise DataError(f"{config}: expected `classes: {{id: name}}` and train/val entries")
    void = {int(k) for k, v in spec["classes"].items() if str(v).lower() in ("unlabeled", "unlabelled", "void")}
    ids = sorted(int(k) for k in spec["classes"] if int(k) not in void)
    if any(not 0 <= i <= 255 for i in ids):
        raise DataError(f"{config}: class ids must be 0-255 to fit 8-bit masks")
    lut = np.full(256, UNKNOWN, dtype=np.int64)
    for index, category in enumerate(ids):
        lut[category] = index
    for category in void:
        lut[category] = ignore_index
    by_id = {int(k): str(v) for k, v in spec["classes"].items()}
    names = tuple(by_id[i] for i in ids)

    def split(name: str) -> MaskSamples:
        entry = spec.get(name) or (spec.get("test") if name == "val" else None)
        if not isinstance(entry, dict) or "images" not in entry or "masks" not in entry:
            raise DataError(f"{config}: `{name}: {{images: DIR, masks: DIR}}` missing")
        images_dir, masks_dir = config.parent / entry["images"], config.parent / entry["masks"]
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise DataError(f"{d}: no such folder (named in {config})")
        by_stem = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = sorted(masks_dir.glob("*.png"))
        missing = [m for m in masks if m.stem not in by_stem]
        if missing:
            raise DataError(f"{missing[0]}: no image {missing[0].stem}.* in {images_dir}")
        if not masks:
            raise DataError(f"{masks_dir}: no masks (*.png)")
        unlabelled = len(by_stem) - len(masks)
        if unlabelled:
            print(f"{name}: {unlabelled} of {len(by_stem)} images in {images_dir} have no mask and are left out",
                  file=sys.stderr)
        return MaskSamples([by_stem[m.stem] for m in masks], masks, lut)

    return SegmentationData(config.parent.name, names, split("train"), split("val"), ignore_index,
                            source=str(config))


# -- masks -----------------------------------------------------------------------------------------
def read_mask(path: Path) -> np.ndarray:
    """The class indices of a single-channel (L or palette) PNG, uint8 HxW."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DataError(f"{path}: a {img.mode} image; a mask must be single-channel class indices "
                                "(8-bit grayscale or palette PNG)")
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read mask ({type(exc).__name__}: {exc})") from None


def check_masks(samples: MaskSamples, num_classes: int, ignore_index: int, progress: bool = True) -> None:
    """Every mask readable, the size of its image, with values that are classes or the ignore index."""
    from tqdm import tqdm

    for image, mask_path in tqdm(list(zip(samples.images, samples.masks)), desc="checking masks", unit="mask",
                                 file=sys.stderr, leave=False, disable=not progress or len(samples) < 200):
        mask = read_mask(mask_path)
        if samples.lut is not None:
            unknown = sorted({int(v) for v in np.unique(mask) if samples.lut[v] == UNKNOWN})
            if unknown:
                raise DataError(f"{mask_path}: category ids {unknown[:10]} are not in the class map's classes")
            mask = samples.lut[mask]
        try:
            with Image.open(image) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{image}: cannot read image ({type(exc).__name__}: {exc})") from None
        if (mask.shape[1], mask.shape[0]) != size:
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image.name} is "
                            f"{size[0]}x{size[1]} (width x height); masks must match their images")
        values = np.unique(mask)
        bad = [int(v) for v in values if v >= num_classes and v != ignore_index]
        if bad:
            raise DataError(f"{mask_path}: values {bad[:10]} are neither a class (0-{num_classes - 1}) nor the "
                            f"ignore index {ignore_index}; fix the mask or pass --ignore-index")


# -- samples as tensors ----------------------------------------------------------------------------
class _PairSet(torch.utils.data.Dataset):
    samples: MaskSamples

    def __len__(self) -> int:
        return len(self.samples)

    def pair(self, i: int):
        """(RGB image, class-index mask) of sample i, or the DataError's message."""
        try:
            return load_image(self.samples.images[i]), self.samples.mask(i)
        except DataError as exc:
            return str(exc)


class SegTrainSet(_PairSet):
    """Jointly augmented (image, mask) pairs at `size` (h, w): random scale of the target size
    (`scale`), random crop (padded with the ignore index where the image is smaller), random
    horizontal flip; each sample under its own seed, as the classification TrainSet."""

    def __init__(self, samples: MaskSamples, pre: Preprocess, size: tuple[int, int], ignore_index: int,
                 scale: tuple[float, float] = (0.5, 2.0), hflip: bool = True, seed: int = 0) -> None:
        from torchvision.transforms import v2

        self.samples, self.seed, self.epoch = samples, seed, 0
        from torchvision import tv_tensors

        steps = [v2.RandomResize(max(1, round(min(size) * scale[0])), max(2, round(min(size) * scale[1]))),
                 v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index})]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                  v2.Normalize(pre.mean, pre.std)]
        self.transform = v2.Compose(steps)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        from mnv3.data.datasets import sample_seed

        pair = self.pair(i)
        if isinstance(pair, str):
            return None, None, pair
        img, mask = pair
        image = tv_tensors.Image(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        target = tv_tensors.Mask(torch.from_numpy(mask))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            x, y = self.transform(image, target)
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor).long(), None


class SegEvalSet(_PairSet):
    """(image, mask) resized to `size` (h, w): bilinear for the image, nearest for the mask; the
    metrics are computed at the model's resolution."""

    def __init__(self, samples: MaskSamples, pre: Preprocess, size: tuple[int, int]) -> None:
        self.samples, self.pre, self.size = samples, pre, size

    def __getitem__(self, i: int):
        pair = self.pair(i)
        if isinstance(pair, str):
            return None, None, pair
        img, mask = pair
        h, w = self.size
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1).div_(255.0)
        mean, std = torch.tensor(self.pre.mean).view(3, 1, 1), torch.tensor(self.pre.std).view(3, 1, 1)
        return (x - mean) / std, torch.from_numpy(mask.astype(np.int64)), None
