"""LR-ASPP segmentation on any MobileNet backbone: `build_segmenter(spec, head)`.

The head is described by `mnv3.heads.DenseHead` (see its module doc for the two variants and the
pooling rule). The module's state-dict names follow torchvision's `LRASPPHead` (cbr, scale,
low_classifier, high_classifier) so that its weights map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnv3.arch import ArchSpec
from mnv3.heads import DenseHead, pool_window
from mnv3.nn.layers import gate
from mnv3.nn.mobilenet import MobileNet


class LRASPPHead(nn.Module):
    def __init__(self, head: DenseHead, high_channels: int, low_channels: int, bn_eps: float) -> None:
        super().__init__()
        self.head = head
        inter = head.channels
        self.cbr = nn.Sequential(nn.Conv2d(high_channels, inter, 1, bias=False),
                                 nn.BatchNorm2d(inter, eps=bn_eps), nn.ReLU(inplace=True))
        # Index 1 for the conv as in torchvision's Sequential(pool, conv, sigmoid); DeepLab's gate conv
        # has a bias, torchvision's has none.
        self.scale = nn.Sequential(nn.Identity(), nn.Conv2d(high_channels, inter, 1, bias=head.kind == "lraspp"),
                                   gate("hard_sigmoid" if head.gate == "hard_sigmoid" else "sigmoid"))
        self.low_classifier = nn.Conv2d(low_channels, head.num_classes, 1)
        self.high_classifier = nn.Conv2d(inter, head.num_classes, 1)

    def gate_input(self, high: torch.Tensor) -> torch.Tensor:
        window = pool_window(self.head, (high.shape[-2], high.shape[-1]))
        if window is None:
            return high.mean((2, 3), keepdim=True)
        kernel, stride = window
        return F.avg_pool2d(high, kernel, stride)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high)
        s = self.scale(self.gate_input(high))
        if s.shape[-2:] != x.shape[-2:]:
            s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = x * s
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class Segmenter(nn.Module):
    """Backbone (a MobileNet without its classifier layers) + LR-ASPP head; logits at the input's
    size, (N, classes, H, W)."""

    def __init__(self, spec: ArchSpec, head: DenseHead) -> None:
        super().__init__()
        head.validate()
        self.spec, self.head_spec = spec, head
        self.num_classes = head.num_classes
        self.backbone = MobileNet(spec, num_classes=0)
        self.backbone.pre_logits = self.backbone.pre_act = None    # only the feature maps are used
        taps = self.backbone.feature_taps()
        missing = [t for t in head.taps if t not in taps]
        if missing:
            from mnv3.arch import SpecError

            raise SpecError(f"head.taps: {spec.name} has no feature tap {missing}; available: "
                            f"{', '.join(t for t in taps if t.startswith(('stride', 'last')))}, block<i>, ...")
        high, low = (taps[t] for t in head.taps)
        self.strides = (high.stride, low.stride)
        self.classifier = LRASPPHead(head, high.channels, low.channels,
                                     spec.bn_eps if head.kind == "lraspp" else 1e-5)
        if self.backbone.stem.conv.weight.device.type != "meta":
            for m in self.classifier.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            # The two class layers start small, as a classifier's does: on an ImageNet backbone's
            # unnormalised features (120-960 channels of magnitude ~1-10) a He-initialised 1x1 conv
            # gives logits in the tens, a first loss near 80 and a diverging first epoch.
            for conv in (self.classifier.low_classifier, self.classifier.high_classifier):
                nn.init.normal_(conv.weight, 0, 0.01)

    @property
    def fused(self) -> bool:
        return self.backbone.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_taps(x, self.head_spec.taps)
        out = self.classifier(*(feats[t] for t in self.head_spec.taps))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def fuse(self) -> Segmenter:
        self.backbone.fuse()
        return self.eval()


def build_segmenter(spec: ArchSpec, head: DenseHead) -> Segmenter:
    return Segmenter(spec, head)
