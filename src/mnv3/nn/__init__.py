"""Layers, the MobileNet backbone and (later) the dense-prediction heads."""

from mnv3.nn.mobilenet import FeatureTap, MobileNet, build

__all__ = ["FeatureTap", "MobileNet", "build"]
