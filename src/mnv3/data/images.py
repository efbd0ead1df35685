"""Reading images and preparing them exactly as a model's `Preprocess` says.

Preprocessing stops at uint8 pixels (`preprocess_pixels`) so the same pixels can be fed to our model
and to another runtime (for example the LiteRT interpreter) for a like-for-like comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnv3.weights.model_file import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class DataError(ValueError):
    """An image or data set cannot be used; the message names the file or folder and the fix."""


def load_image(path: str | Path) -> Image.Image:
    """An RGB image, or DataError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None


def preprocess_pixels(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Resize the shorter side to `pre.resize`, center-crop `pre.resolution`: uint8 HWC RGB."""
    w, h = img.size
    scale = pre.resize / min(w, h)
    size = (max(pre.resolution, round(w * scale)), max(pre.resolution, round(h * scale)))
    img = img.resize(size, _RESAMPLE[pre.interpolation])
    left, top = (size[0] - pre.resolution) // 2, (size[1] - pre.resolution) // 2
    img = img.crop((left, top, left + pre.resolution, top + pre.resolution))
    return np.asarray(img, dtype=np.uint8).copy()


def to_input(pixels: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """uint8 HWC (or NHWC) pixels -> normalised float NCHW tensor."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
    x = x.unsqueeze(0) if x.dim() == 3 else x
    x = x.permute(0, 3, 1, 2)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class ImageFolderSet(torch.utils.data.Dataset):
    """`root/<class id>/<image>`: labels are the model's output indices of each folder's class id.

    Unreadable images are not fatal: the item comes back as None and is counted by the caller.
    """

    def __init__(self, root: str | Path, classes: tuple[str, ...] | list[str] | None,
                 pre: Preprocess) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder")
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{root}: no class folders; expected {root}/<class id>/<image files>")
        if classes is None:
            classes = [p.name for p in folders]
        index = {c: i for i, c in enumerate(classes)}
        unknown = [p.name for p in folders if p.name not in index]
        if unknown:
            raise DataError(
                f"{root}: {len(unknown)} class folder(s) are not classes of this model "
                f"({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); folders must be named by "
                f"the model's class ids, e.g. {', '.join(list(classes)[:3])}")
        self.samples = [(p, index[folder.name]) for folder in folders
                        for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.pre = pre

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            pixels = preprocess_pixels(load_image(path), self.pre)
        except DataError as exc:
            return None, label, str(exc)
        return to_input(pixels, self.pre)[0], label, None
