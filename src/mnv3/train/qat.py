"""Quantization-aware training: fine-tune a float network while it sees the int8 rounding that
`mnv3 export --int8` will apply, so that the exported int8 file loses less.

What is simulated (straight-through estimator for the gradients):
  * weights of every convolution and linear layer, int8 symmetric with one scale per output channel.
    Batch norm is folded into the convolutions at export; folding multiplies each output channel by
    one factor, which per-channel symmetric scales follow exactly, so quantizing the unfolded weight
    here gives the same integers as quantizing the folded one there;
  * activations, 8-bit affine with one scale per tensor from a moving min/max: every conv + BN +
    activation output, every block output (after the residual add) and every squeeze-and-excite
    output, where the exporters put their quantize/dequantize pairs.
The stem (the first convolution and its activation) is left float, input included, as `mnv3 export
--int8` leaves it, and block 0 with it when it has no expansion (`float_stem=False` simulates
`--int8-stem`: the input and every weight quantized too); the float part's output is quantized,
where the export puts its one QUANTIZE.
The weights stay float: the model file written at the end is an ordinary float model (nothing of
the simulation is saved), which `mnv3 export --int8` calibrates and quantizes as any other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightFakeQuant(nn.Module):
    """int8 symmetric per-output-channel rounding of a weight (a parametrization)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, w.dim()))
        scale = (w.detach().abs().amax(dim=dims) / 127).clamp_min(1e-12)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def activation_fake_quant() -> nn.Module:
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine, reduce_range=False)


class _OutputQuant(nn.Module):
    """Holds the fake-quant module of one layer's output (so it is saved in checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.fq = activation_fake_quant()


def prepare_qat(model: nn.Module, float_stem: bool = True) -> int:
    """Add the simulation to `model` in place; returns how many activation points it quantizes."""
    from mnv3.nn.layers import ConvBNAct, InvertedResidual, SqueezeExcite

    if is_qat(model):
        return 0
    stem = getattr(model, "stem", None) if float_stem else None
    blocks = getattr(model, "blocks", None)
    first = blocks[0] if blocks is not None and len(blocks) else None
    # block 0 stays float with the stem when it has no expansion, as the exporters leave it
    part = [stem] + ([first] if isinstance(first, InvertedResidual) and first.expand is None else []) \
        if stem is not None else []
    kept = {id(m) for p in part for m in p.modules()}
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in kept:
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
    points = 0
    # outputs quantized: each layer's but those inside the float part, whose own output is (the quantize op)
    targets = [m for m in model.modules() if isinstance(m, (ConvBNAct, InvertedResidual, SqueezeExcite))
               and (id(m) not in kept or m is part[-1])]
    for m in targets:
        m.qat_out = _OutputQuant()
        m.register_forward_hook(_quantize_output)
        points += 1
    if stem is None:
        model.qat_in = _OutputQuant()
        model.register_forward_pre_hook(_quantize_input)
        points += 1
    return points


def _quantize_output(module: nn.Module, inputs, output):
    return module.qat_out.fq(output) if hasattr(module, "qat_out") else output


def _quantize_input(module: nn.Module, inputs):
    if not hasattr(module, "qat_in"):
        return None
    return (module.qat_in.fq(inputs[0]), *inputs[1:])


def is_qat(model: nn.Module) -> bool:
    return any(hasattr(m, "qat_out") or hasattr(m, "qat_in") for m in model.modules())


def strip_qat(model: nn.Module) -> nn.Module:
    """The float network without the simulation (in place): weights made plain again, fake-quant
    modules removed (their hooks then pass values through)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        if hasattr(m, "qat_out"):
            del m.qat_out
    if hasattr(model, "qat_in"):
        del model.qat_in
    for m in model.modules():          # the hooks find nothing to apply now; drop them too
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if hook in (_quantize_output, _quantize_input):
                    del hooks[key]
    return model
