"""ImageNet-1k class ids (WordNet ids) and names in the standard class-index order."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names), both of length 1000, index = class index of ImageNet-trained models."""
    text = resources.files("mnv3.resources").joinpath("imagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return tuple(r[0] for r in rows), tuple(r[1].replace("_", " ") for r in rows)
