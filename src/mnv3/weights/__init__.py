"""Model files (spec + weights + metadata in one safetensors file) and weight importers."""

from mnv3.weights.model_file import ModelMeta, Preprocess, WeightsError, model_meta, save
from mnv3.weights.sources import NAMED_WEIGHTS, download, load

__all__ = [
           "NAMED_WEIGHTS",
           "ModelMeta",
           "Preprocess",
           "WeightsError",
           "download",
           "load",
           "model_meta",
           "save",
]
