"""Classification data sets for training: image folders and the named sets `digits` and `cifar10`.

Every sample is augmented under its own random seed, drawn from (run seed, epoch, sample index), so
a batch is the same whatever the number of loader workers, data-parallel processes, or the point a
resumed run starts from. Unreadable images never stop a run: the item comes back with its error,
and the collate function drops it and counts it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mnv3.data.images import IMAGE_SUFFIXES, DataError, load_image, preprocess_pixels, to_input
from mnv3.weights.model_file import Preprocess

AUGMENTS = ("rrc", "padcrop", "none")
NAMED = ("digits", "cifar10")


@dataclass
class Samples:
    """One split: image files with labels, or decoded uint8 HWC images held in memory."""

    labels: list[int]
    paths: list[Path] | None = None
    arrays: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[i]).convert("RGB")
        return load_image(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i]) if self.paths is not None else f"image {i}"


@dataclass
class ClassificationData:
    """A named training set: class ids (and readable names), train and validation splits, and the
    input size it suits (`None`: the network's own)."""

    name: str
    classes: tuple[str, ...]
    train: Samples
    val: Samples
    class_names: tuple[str, ...] | None = None
    resolution: int | None = None
    total_stride: int | None = None
    source: str = ""
    ref: str = ""          # what opened it (--data), so a resumed run can open it again

    def fingerprint(self) -> str:
        """Identifies the data: the classes, the split sizes and every file name (not the pixels)."""
        h = hashlib.sha256(json.dumps([self.name, self.classes, len(self.train), len(self.val)]).encode())
        for split in (self.train, self.val):
            if split.paths is not None:
                for p in split.paths:
                    h.update(f"{p.parent.name}/{p.name}\n".encode())
            h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


# -- opening a data set ------------------------------------------------------------------------------
def open_data(data: str | Path) -> ClassificationData:
    """`data`: a folder with train/ and val/ (or test/) class folders, or `digits`, or `cifar10`
    (a local folder in $MNV3_DATA/cifar10 when there is one, otherwise torchvision's download)."""
    text = str(data)
    data_set = _open(text)
    data_set.ref = text
    return data_set


def _open(text: str) -> ClassificationData:
    if text == "digits":
        return _digits()
    if text == "cifar10":
        return _cifar10()
    root = Path(text)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. --data takes a folder with train/ and val/ "
                        f"(or test/) class folders, or one of: {', '.join(NAMED)}")
    data_set = image_folders(root)
    side = None      # small images (CIFAR-like) are trained at their own size, with a shallower stride
    for i in range(min(5, len(data_set.train))):
        try:
            side = max(data_set.train.image(i).size)
            break
        except DataError:
            continue
    if side is not None and side <= 64:
        data_set.resolution, data_set.total_stride = max(8, side // 8 * 8), 8
    return data_set


def image_folders(root: Path) -> ClassificationData:
    train_dir = root / "train"
    val_dir = next((root / n for n in ("val", "valid", "validation", "test") if (root / n).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise DataError(f"{root}: expected {root}/train/<class>/<images> and {root}/val/<class>/<images> "
                        "(or test/ instead of val/)")
    train_classes, val_classes = _class_folders(train_dir), _class_folders(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DataError(f"{root}: train/ and {val_dir.name}/ have different classes "
                        f"(only in train: {only_train or 'none'}; only in {val_dir.name}: {only_val or 'none'})")
    classes = tuple(train_classes)
    train, val = _scan(train_dir, classes), _scan(val_dir, classes)
    return ClassificationData(root.name, classes, train, val, source=str(root.resolve()))


def _class_folders(split: Path) -> list[str]:
    folders = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{split}: no class folders; expected {split}/<class>/<image files>")
    return folders


def _scan(split: Path, classes: Sequence[str]) -> Samples:
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not found:
            empty.append(name)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DataError(f"{split}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    if empty:
        raise DataError(f"{split}: class folder(s) with no images: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}")
    return Samples(labels, paths=paths)


def _digits() -> ClassificationData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))   # fixed 80/20 split, stratified
    val_idx = np.concatenate([order[labels[order] == c][: int(0.2 * (labels == c).sum())] for c in range(10)])
    is_val = np.zeros(len(labels), bool)
    is_val[val_idx] = True
    split = {name: Samples(labels[mask].tolist(), arrays=images[mask])
             for name, mask in (("train", ~is_val), ("val", is_val))}
    return ClassificationData("digits", tuple(str(d) for d in range(10)), split["train"], split["val"],
                              resolution=32, total_stride=8, source="sklearn.datasets.load_digits")


def _cifar10() -> ClassificationData:
    local = Path(os.environ.get("MNV3_DATA", "")) / "cifar10" if os.environ.get("MNV3_DATA") else None
    if local is not None and local.is_dir():
        data_set = image_folders(local)
        data_set.name, data_set.resolution, data_set.total_stride = "cifar10", 32, 8
        return data_set
    from torchvision.datasets import CIFAR10

    from mnv3.files import cache_dir

    root = cache_dir() / "cifar10"
    try:
        train, val = (CIFAR10(str(root), train=t, download=True) for t in (True, False))
    except (OSError, RuntimeError) as exc:
        raise DataError(f"cifar10: download failed ({exc}); pass a local copy as an image folder "
                        "(--data DIR with train/ and test/) or set MNV3_DATA to a folder holding cifar10/") from None
    return ClassificationData("cifar10", tuple(train.classes),
                              Samples(list(train.targets), arrays=train.data),
                              Samples(list(val.targets), arrays=val.data),
                              resolution=32, total_stride=8, source=str(root))


# -- turning samples into tensors -------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class TrainSet(torch.utils.data.Dataset):
    """Augmented training samples; set `epoch` before iterating so each epoch draws new crops."""

    def __init__(self, samples: Samples, pre: Preprocess, augment: str = "rrc", min_scale: float = 0.08,
                 hflip: bool = True, seed: int = 0) -> None:
        from torchvision.transforms import v2

        if augment not in AUGMENTS:
            raise DataError(f"augment: expected one of {AUGMENTS}, got {augment!r}")
        self.samples, self.pre, self.seed, self.epoch, self.augment = samples, pre, seed, 0, augment
        res = pre.resolution
        steps: list = []
        if augment == "rrc":
            steps.append(v2.RandomResizedCrop(res, scale=(min_scale, 1.0), antialias=True))
        elif augment == "padcrop":
            self.transform = _PadCrop(pre, max(1, res // 8), hflip)
            return
        if hflip and augment != "none":
            steps.append(v2.RandomHorizontalFlip())
        steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        label = self.samples.labels[i]
        try:
            img = self.samples.image(i)
        except DataError as exc:
            return None, label, str(exc)
        if self.augment == "none":
            return to_input(preprocess_pixels(img, self.pre), self.pre)[0], label, None
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))  # CPU only: fast
            return self.transform(img), label, None


class _PadCrop:
    """Small images: resize to the resolution if needed, reflect-pad, random crop, random flip,
    normalise. Written with plain tensor ops: on 32x32 images the generic transforms cost 10x more
    than decoding."""

    def __init__(self, pre: Preprocess, pad: int, hflip: bool) -> None:
        self.res, self.pad, self.hflip = pre.resolution, pad, hflip
        self.mean = torch.tensor(pre.mean).view(3, 1, 1) * 255
        self.std = torch.tensor(pre.std).view(3, 1, 1) * 255

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.size != (self.res, self.res):
            img = img.resize((self.res, self.res), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        x = torch.nn.functional.pad(x[None], (self.pad,) * 4, mode="reflect")[0]
        i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        x = x[:, i:i + self.res, j:j + self.res]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(2)
        return ((x - self.mean) / self.std).contiguous()


class EvalSet(torch.utils.data.Dataset):
    """Validation samples prepared exactly as `mnv3 eval` prepares them (resize, center crop)."""

    def __init__(self, samples: Samples, pre: Preprocess) -> None:
        self.samples, self.pre = samples, pre

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        label = self.samples.labels[i]
        try:
            pixels = preprocess_pixels(self.samples.image(i), self.pre)
        except DataError as exc:
            return None, label, str(exc)
        return to_input(pixels, self.pre)[0], label, None


def collate(items):
    """Stack the readable items; return the errors of the rest so the caller can count them."""
    good = [(x, y) for x, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    if not good:
        return None, None, errors
    labels = [y for _, y in good]
    if isinstance(labels[0], torch.Tensor) and labels[0].dim() == 2 and labels[0].is_floating_point():
        rows = max(len(y) for y in labels)     # detection targets: pad with -1 rows (label -1: no box)
        labels = [torch.cat([y, y.new_full((rows - len(y), y.shape[1]), -1.0)]) for y in labels]
    targets = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)
    return torch.stack([x for x, _ in good]), targets, errors


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch: a permutation drawn from (seed, epoch), cut into global batches of
    `batch` samples; process `rank` of `world` takes its slice of each. `start` skips batches
    already done (a resumed run). The last incomplete batch is dropped when `drop_last`."""

    def __init__(self, n: int, batch: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world: int = 1, start: int = 0) -> None:
        if batch % world:
            raise DataError(f"batch size {batch} is not divisible by the {world} processes")
        if shuffle:
            g = torch.Generator().manual_seed(sample_seed(seed, epoch, 0))
            self.order = torch.randperm(n, generator=g).tolist()
        else:
            self.order = list(range(n))
        self.batch, self.rank, self.world, self.start = batch, rank, world, start
        self.count = n // batch if drop_last else -(-n // batch)

    def __len__(self) -> int:
        return max(0, self.count - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.start, self.count):
            chunk = self.order[b * self.batch:(b + 1) * self.batch]
            per = -(-len(chunk) // self.world)
            yield chunk[self.rank * per:(self.rank + 1) * per]
