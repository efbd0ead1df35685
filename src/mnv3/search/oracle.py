"""Accuracy oracles: how good a candidate network is, as the search sees it.

The interface is one method, `accuracy(spec, trial_dir) -> float`. `ProxyOracle` trains the network
briefly through the training engine (MnasNet's way) and measures top-1 on a split held out from the
training set; the test split is never looked at during the search. A weight-sharing supernet oracle
(Once-for-All, BigNAS) implements the same method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mnv3.arch import ArchSpec
from mnv3.data.datasets import ClassificationData, Samples, open_data
from mnv3.train.recipe import Recipe, load_recipe


class Oracle(Protocol):
    name: str

    def accuracy(self, spec: ArchSpec, trial_dir: Path) -> float: ...

    def describe(self) -> dict: ...


def _take(samples: Samples, idx: np.ndarray) -> Samples:
    labels = [samples.labels[i] for i in idx]
    if samples.arrays is not None:
        return Samples(labels, arrays=samples.arrays[idx])
    return Samples(labels, paths=[samples.paths[i] for i in idx])


def search_splits(data: ClassificationData, *, held_out: float = 0.2, subset: int | None = None,
                  seed: int = 0) -> ClassificationData:
    """The search's own data: the training images split into a proxy training part (optionally a
    fixed random `subset` of it) and a held-out part (`held_out` of the images, at least one per
    class; a number >= 1 is a count of images) on which candidates are ranked. The data set's own
    validation/test split is left out."""
    labels = np.asarray(data.train.labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    share = held_out if held_out < 1 else held_out / len(labels)      # a fraction, or a number of images
    if not 0 < share < 1:
        from mnv3.data import DataError

        raise DataError(f"--proxy-held-out {held_out:g}: expected a fraction in (0, 1) or fewer images than "
                        f"the {len(labels)} training images")
    held = np.concatenate([order[labels[order] == c][:max(1, round(share * (labels == c).sum()))]
                           for c in range(len(data.classes)) if (labels == c).any()])
    rest = np.setdiff1d(order, held, assume_unique=True)
    rest = rest[np.argsort(rng.permutation(len(rest)))]    # a fixed random order of the rest
    if subset is not None:
        rest = rest[:subset]
    return ClassificationData(f"{data.name}-search", data.classes, _take(data.train, np.sort(rest)),
                              _take(data.train, np.sort(held)), class_names=data.class_names,
                              resolution=data.resolution, total_stride=data.total_stride,
                              source=data.source, ref=data.ref)


@dataclass
class ProxyOracle:
    """Train each candidate for `epochs` on the proxy training part, at `resolution`, with `recipe`
    (default `cifar`), and return top-1 on the held-out part of the training set."""

    data: ClassificationData
    epochs: int = 3
    recipe: Recipe | None = None
    workers: int = 0
    keep_runs: bool = False
    name: str = "proxy"

    @classmethod
    def open(cls, data: str, *, epochs: int = 3, resolution: int | None = None, subset: int | None = None,
             recipe: str | Recipe | None = "cifar", held_out: float = 0.2, seed: int = 0,
             **kw) -> ProxyOracle:
        full = open_data(data)
        if subset is not None and subset < len(full.classes):
            from mnv3.data import DataError

            raise DataError(f"--proxy-subset {subset}: fewer images than the {len(full.classes)} classes")
        split = search_splits(full, held_out=held_out, subset=subset, seed=seed)
        r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe or "cifar")
        r = r.override({"epochs": epochs, **({"resolution": resolution} if resolution else {})})
        if len(split.train) < r.batch_size:
            r = r.override({"batch_size": max(2, len(split.train) // 2 // 2 * 2)})
        return cls(split, epochs=epochs, recipe=r, **kw)

    @property
    def resolution(self) -> int | None:
        return (self.recipe.resolution if self.recipe else None) or self.data.resolution

    def accuracy(self, spec: ArchSpec, trial_dir: Path, seed: int | None = None) -> float:
        """Top-1 on the held-out split after the proxy training; `seed` (weights, data order,
        augmentation) other than the recipe's trains the same network again, as `--rerank` does."""
        from mnv3.train.classify import train_logged

        trial_dir = Path(trial_dir)     # a trial that died midway starts again, cleanly
        recipe = self.recipe if seed is None else self.recipe.override({"seed": seed})
        result = train_logged(self.data, trial_dir, arch=spec, recipe=recipe, workers=self.workers,
                              checkpoint_steps=0, progress=False, tensorboard=False)
        if not self.keep_runs:
            for name in ("checkpoint.pt", "model.safetensors"):
                (trial_dir / name).unlink(missing_ok=True)
        return float(result.metrics["val_top1"])

    def describe(self) -> dict:
        return {"oracle": self.name, "data": self.data.ref, "train_images": len(self.data.train),
                "held_out_images": len(self.data.val), "epochs": self.epochs,
                "resolution": self.resolution, "recipe": self.recipe.name if self.recipe else None}
