"""mnv3: MobileNetV3 networks, their hardware-aware search and deployment, as one toolkit."""

from mnv3.arch import (
                       ArchSpec,
                       BlockSpec,
                       HeadSpec,
                       SpecError,
                       StemSpec,
                       reduced_tail,
                       with_output_stride,
                       with_total_stride,
)
from mnv3.complexity import count
from mnv3.nn import MobileNet, build
from mnv3.presets import PRESETS, preset, resolve_arch
from mnv3.weights import ModelMeta, Preprocess, WeightsError, load, save

__version__ = "0.1.0"

__all__ = [
           "PRESETS",
           "ArchSpec",
           "BlockSpec",
           "HeadSpec",
           "MobileNet",
           "ModelMeta",
           "Preprocess",
           "SpecError",
           "StemSpec",
           "WeightsError",
           "build",
           "count",
           "load",
           "preset",
           "reduced_tail",
           "resolve_arch",
           "save",
           "with_output_stride",
           "with_total_stride",
]
