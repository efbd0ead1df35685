"""Building blocks shared by every network: conv + batch norm + activation (foldable for inference),
squeeze-and-excite with a hard-sigmoid gate, and the inverted-residual bottleneck."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mnv3.arch import BlockSpec


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


def gate(name: str) -> nn.Module:
    return nn.Hardsigmoid(inplace=True) if name == "hard_sigmoid" else nn.Sigmoid()


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after); the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Module):
    """k x k convolution, batch norm, activation. `fuse()` folds the batch norm into the conv.

    With `same=True` a strided conv pads like TensorFlow (asymmetric); stride-1 convs with odd
    kernels pad symmetrically either way, which is what TensorFlow does too.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1,
                 dilation: int = 1, act: str = "none", same: bool = False, eps: float = 1e-3,
                 momentum: float = 0.01) -> None:
        super().__init__()
        self.pad_same = same and stride > 1
        padding = 0 if self.pad_same else (kernel - 1) // 2 * dilation
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation,
                              groups=groups, bias=False)
        # Absent parts are None rather than nn.Identity: eager inference pays for every module call.
        self.bn: nn.Module | None = nn.BatchNorm2d(cout, eps=eps, momentum=momentum)
        self.act = None if act == "none" else activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_same:
            k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
            top, bottom = same_padding(x.shape[-2], k, s, d)
            left, right = same_padding(x.shape[-1], k, s, d)
            x = F.pad(x, (left, right, top, bottom))
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return x if self.act is None else self.act(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold batch norm (running statistics) into the convolution's weight and bias."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        bn, conv = self.bn, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv, self.bn = fused, None


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce (bias) -> ReLU -> 1x1 expand (bias) -> gate -> channel scale."""

    def __init__(self, channels: int, squeeze: int, gate_name: str = "hard_sigmoid") -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate(gate_name)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate, (N, C, 1, 1)."""
        return self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale(x)
        # Without autograd, scale in place: saves allocating (and faulting in) a full feature map.
        return x * s if torch.is_grad_enabled() else x.mul_(s)


class InvertedResidual(nn.Module):
    """The bottleneck of MobileNetV2/V3 and MnasNet as one `BlockSpec` describes it."""

    def __init__(self, cin: int, block: BlockSpec, *, same: bool = False, se_gate: str = "hard_sigmoid",
                 eps: float = 1e-3, momentum: float = 0.01) -> None:
        super().__init__()
        norm = {"eps": eps, "momentum": momentum}
        exp = block.expansion
        self.has_expand = exp != cin
        self.expand = ConvBNAct(cin, exp, 1, act=block.activation, **norm) if self.has_expand else None
        self.dw = ConvBNAct(exp, exp, block.kernel, block.stride, groups=exp, dilation=block.dilation,
                            act=block.activation, same=same, **norm)
        self.se = SqueezeExcite(exp, block.se, se_gate) if block.se is not None else None
        self.project = ConvBNAct(exp, block.out, 1, **norm)
        self.residual = block.stride == 1 and cin == block.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_expansion(x)[1]

    def forward_expansion(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expansion output, block output): the expansion output is what SSDLite taps."""
        e = x if self.expand is None else self.expand(x)
        y = self.dw(e)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        if self.residual:
            y = x + y if torch.is_grad_enabled() else y.add_(x)
        return e, y

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expansion output, depthwise output, block output), for feature taps (LR-ASPP's low branch
        taps the depthwise output); nothing is computed in place over a returned tensor."""
        e = x if self.expand is None else self.expand(x)
        d = self.dw(e)
        y = d if self.se is None else d * self.se.scale(d)
        y = self.project(y)
        return e, d, (x + y if self.residual else y)


def init_weights(model: nn.Module) -> None:
    """The MobileNet initialisation: convolutions Kaiming-normal (fan out), batch norm scale 1 and
    shift 0, linear layers normal(0, 0.01), biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
