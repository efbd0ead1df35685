"""The generic MobileNet backbone and classifier: `build(spec)` turns any `ArchSpec` into a module.

Feature taps are named openly so heads can ask for them:
  "stem", "block{i}" (1-based, as in the paper's tables), "block{i}.expansion" (the output of the
  block's 1x1 expansion, where SSDLite attaches), "block{i}.depthwise" (the depthwise conv's output,
  before squeeze-and-excite, where the paper's LR-ASPP takes its 1/8 features), "last_conv",
  "stride{2,4,8,16,32}" (the last block output at that stride), "stride{s}.depthwise" (the
  depthwise output of that block) and "stride{s}.first" (the first output at that stride, where
  torchvision's LR-ASPP takes its 1/8 features).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from mnv3.arch import ArchSpec
from mnv3.nn.layers import ConvBNAct, InvertedResidual, activation, init_weights


@dataclass(frozen=True)
class FeatureTap:
    name: str
    channels: int
    stride: int


class MobileNet(nn.Module):
    """stem -> blocks -> last 1x1 conv -> pool -> pre-logits -> dropout -> classifier."""

    def __init__(self, spec: ArchSpec, num_classes: int = 1000) -> None:
        super().__init__()
        spec.validate()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an integer >= 0, got {num_classes!r}")
        self.spec = spec
        self.fused = False
        same = spec.padding == "same"
        norm = {"eps": spec.bn_eps, "momentum": spec.bn_momentum}
        self.stem = ConvBNAct(spec.in_channels, spec.stem.out, spec.stem.kernel, spec.stem.stride,
                              act=spec.stem.activation, same=same, **norm)
        self.blocks = nn.Sequential(*[
            InvertedResidual(cin, block, same=same, se_gate=spec.se_gate, **norm)
            for cin, block in zip(spec.block_inputs(), spec.blocks)])
        head = spec.head
        self.last_conv = ConvBNAct(spec.blocks[-1].out, head.last_conv, 1, act=head.activation, **norm)
        if head.pre_logits is not None:
            self.pre_logits: nn.Module | None = nn.Linear(head.last_conv, head.pre_logits)
            self.pre_act: nn.Module | None = activation(head.activation)
        else:
            self.pre_logits = self.pre_act = None
        self.dropout = nn.Dropout(head.dropout)
        self.num_features = spec.feature_channels()
        self.num_classes = num_classes
        self.classifier: nn.Module = (nn.Linear(self.num_features, num_classes)
                                      if num_classes else nn.Identity())
        self._taps = self._describe_taps()
        if self.stem.conv.weight.device.type != "meta":   # shape-only builds skip the random init
            self._init_weights()

    # -- forward ---------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled output of the last 1x1 conv, (N, last_conv, H/32, W/32)."""
        return self.last_conv(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.pre_logits is not None:
            x = self.pre_act(self.pre_logits(x))
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for `num_classes` (0 removes it). Class ids and
        names attached to the model (`model.meta`) no longer apply and are cleared."""
        self.num_classes = num_classes
        if getattr(self, "meta", None) is not None:
            self.meta = dataclasses.replace(self.meta, classes=None, class_names=None)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.normal_(self.classifier.weight, 0, 0.01)
            nn.init.zeros_(self.classifier.bias)

    # -- feature taps ----------------------------------------------------------------------------
    def _describe_taps(self) -> dict[str, FeatureTap]:
        spec, taps = self.spec, {}
        stride = spec.stem.stride
        taps["stem"] = FeatureTap("stem", spec.stem.out, stride)
        for i, (block, module) in enumerate(zip(spec.blocks, self.blocks), start=1):
            if module.has_expand:
                taps[f"block{i}.expansion"] = FeatureTap(f"block{i}.expansion", block.expansion, stride)
            stride *= block.stride
            taps[f"block{i}.depthwise"] = FeatureTap(f"block{i}.depthwise", block.expansion, stride)
            taps[f"block{i}"] = FeatureTap(f"block{i}", block.out, stride)
        taps["last_conv"] = FeatureTap("last_conv", spec.head.last_conv, stride)
        # strideN: the last block output (or the stem) at that stride.
        by_stride: dict[int, FeatureTap] = {}
        first: dict[int, FeatureTap] = {}
        for tap in taps.values():
            if tap.name != "last_conv" and "." not in tap.name:
                by_stride[tap.stride] = tap
                first.setdefault(tap.stride, tap)
        self._stride_alias = {}
        for s, tap in sorted(first.items()):
            taps[f"stride{s}.first"] = FeatureTap(f"stride{s}.first", tap.channels, s)
            self._stride_alias[f"stride{s}.first"] = tap.name
        for s, tap in sorted(by_stride.items()):
            taps[f"stride{s}"] = FeatureTap(f"stride{s}", tap.channels, s)
            self._stride_alias[f"stride{s}"] = tap.name
            if tap.name.startswith("block"):
                dw = taps[f"{tap.name}.depthwise"]
                taps[f"stride{s}.depthwise"] = FeatureTap(f"stride{s}.depthwise", dw.channels, s)
                self._stride_alias[f"stride{s}.depthwise"] = dw.name
        return taps

    def feature_taps(self) -> dict[str, FeatureTap]:
        """Every tap name with its channels and stride."""
        return dict(self._taps)

    def forward_taps(self, x: torch.Tensor, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Run the backbone and return the requested taps by name (stopping after the last one)."""
        unknown = [n for n in names if n not in self._taps]
        if unknown:
            raise KeyError(f"unknown feature tap(s) {unknown}; available: {list(self._taps)}")
        wanted = {self._stride_alias.get(n, n) for n in names}
        found: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        found["stem"] = x
        for i, module in enumerate(self.blocks, start=1):
            if wanted.issubset(found):
                break
            if f"block{i}.depthwise" in wanted:
                e, found[f"block{i}.depthwise"], x = module.forward_parts(x)
                found[f"block{i}.expansion"] = e
            elif f"block{i}.expansion" in wanted:
                e, x = module.forward_expansion(x)
                found[f"block{i}.expansion"] = e
            else:
                x = module(x)
            found[f"block{i}"] = x
        if "last_conv" in wanted:
            found["last_conv"] = self.last_conv(x)
        return {n: found[self._stride_alias.get(n, n)] for n in names}

    # -- inference -------------------------------------------------------------------------------
    def fuse(self) -> MobileNet:
        """Fold every batch norm into its convolution for inference (puts the model in eval mode)."""
        self.eval()
        for module in self.modules():
            if isinstance(module, ConvBNAct):
                module.fuse()
        self.fused = True
        return self

    def _init_weights(self) -> None:
        init_weights(self)


def build(spec: ArchSpec, num_classes: int = 1000) -> MobileNet:
    """The module for `spec` with a `num_classes` classifier (0: features only)."""
    return MobileNet(spec, num_classes)
