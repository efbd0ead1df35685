"""Parameters and multiply-adds of a spec, counted from the spec itself (conv and linear layers;
batch norm, activations and pooling add no multiply-adds here, as in the paper's tables)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mnv3.arch import ArchSpec


@dataclass(frozen=True)
class LayerCost:
    """One row of the complexity table: a named stage of the network at its input size."""

    name: str
    input_size: int
    in_channels: int
    out_channels: int
    kernel: int
    expansion: int | None
    se: int | None
    activation: str
    stride: int
    params: int
    macs: int
    dilation: int = 1


@dataclass(frozen=True)
class Complexity:
    layers: tuple[LayerCost, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)


def _conv(size: int, cin: int, cout: int, kernel: int, stride: int, groups: int = 1,
          bn: bool = True, bias: bool = False) -> tuple[int, int, int]:
    """(params, macs, output size) of one convolution (+ batch norm)."""
    out_size = math.ceil(size / stride)
    weights = cout * (cin // groups) * kernel * kernel
    params = weights + (2 * cout if bn else 0) + (cout if bias else 0)
    return params, weights * out_size * out_size, out_size


def count(spec: ArchSpec, num_classes: int = 1000) -> Complexity:
    """Per-layer parameters and MACs of `spec` with a `num_classes` classifier (0 = no classifier)."""
    size, rows = spec.resolution, []
    stem = spec.stem
    p, m, out_size = _conv(size, spec.in_channels, stem.out, stem.kernel, stem.stride)
    rows.append(LayerCost("stem", size, spec.in_channels, stem.out, stem.kernel, None, None,
                          stem.activation, stem.stride, p, m))
    size = out_size
    for i, (block, cin) in enumerate(zip(spec.blocks, spec.block_inputs()), start=1):
        params = macs = 0
        exp = block.expansion
        if exp != cin:
            p, m, _ = _conv(size, cin, exp, 1, 1)
            params, macs = params + p, macs + m
        p, m, out_size = _conv(size, exp, exp, block.kernel, block.stride, groups=exp)
        params, macs = params + p, macs + m
        if block.se is not None:
            params += exp * block.se + block.se + block.se * exp + exp
            macs += 2 * exp * block.se
        p, m, _ = _conv(out_size, exp, block.out, 1, 1)
        params, macs = params + p, macs + m
        rows.append(LayerCost(f"block{i}", size, cin, block.out, block.kernel, exp, block.se,
                              block.activation, block.stride, params, macs, block.dilation))
        size = out_size
    head = spec.head
    cin = spec.blocks[-1].out
    p, m, _ = _conv(size, cin, head.last_conv, 1, 1)
    rows.append(LayerCost("last_conv", size, cin, head.last_conv, 1, None, None, head.activation,
                          1, p, m))
    features = head.last_conv
    if head.pre_logits is not None:
        p = head.last_conv * head.pre_logits + head.pre_logits
        rows.append(LayerCost("pre_logits", 1, head.last_conv, head.pre_logits, 1, None, None,
                              head.activation, 1, p, head.last_conv * head.pre_logits))
        features = head.pre_logits
    if num_classes:
        rows.append(LayerCost("classifier", 1, features, num_classes, 1, None, None, "none", 1,
                              features * num_classes + num_classes, features * num_classes))
    return Complexity(tuple(rows))
