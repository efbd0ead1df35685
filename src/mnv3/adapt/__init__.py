"""NetAdapt as MobileNetV3 used it: shrink a trained network layer by layer to a latency target."""

from mnv3.adapt.prune import Layer, PruneError, layers, pruned_model, shrink, smaller_counts, width_groups

__all__ = ["Layer", "PruneError", "layers", "pruned_model", "shrink", "smaller_counts", "width_groups"]
