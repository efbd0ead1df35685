"""SSDLite on any MobileNet backbone (the paper's section 6.3): `build_detector(spec, head)`.

C4 is the expansion output of the first block of the last strided stage (1/16), C5 the last 1x1
conv (1/32); four extra layers (1x1 to half the channels, 3x3 depthwise stride 2, 1x1 to 512, 256,
256, 128; BN + ReLU6 each) give maps at 1/64 ... 1/512; on every map a 3x3 depthwise + BN + ReLU6
-> 1x1 conv predicts 6 anchors' box offsets and class logits. Anchors follow torchvision's
`DefaultBoxGenerator` (scales spread linearly from `min_ratio` to `max_ratio`, plus 1.0; per
location the scale s_k, sqrt(s_k s_k+1) and s_k with each aspect ratio r and 1/r; centres at
(i + 0.5) / map size; widths and heights clipped to [0, 1]). Box offsets are encoded as torchvision's
`BoxCoder` with weights (10, 10, 5, 5).

The network's output is one tensor, (N, anchors, 4 + 1 + classes): the box offsets, then the class
logits with the background first; `split_raw` cuts it, `postprocess` turns it into detections
(softmax, per class a score threshold and top-k, `torchvision.ops.batched_nms`, the best
`max_detections`), as torchvision's SSD does. Post-processing is not part of the network (nor of an
export or of `mnv3 bench`). Names follow torchvision's `SSDLiteHead` and extra layers so that its
weights map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mnv3.arch import ArchSpec, SpecError
from mnv3.heads import DenseHead
from mnv3.nn.mobilenet import MobileNet

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_CLIP = math.log(1000.0 / 16)


def _cbr(cin: int, cout: int, kernel: int, stride: int, groups: int, eps: float, momentum: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout, eps=eps, momentum=momentum), nn.ReLU6(inplace=True))


class _ScoringHead(nn.Module):
    """Per map: 3x3 depthwise + BN + ReLU6, 1x1 conv to anchors x columns; (N, HWA, columns) over maps."""

    def __init__(self, channels: list[int], anchors: list[int], columns: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.columns = columns
        self.module_list = nn.ModuleList(
            nn.Sequential(_cbr(c, c, 3, 1, c, eps, momentum), nn.Conv2d(c, a * columns, 1))
            for c, a in zip(channels, anchors))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for module, x in zip(self.module_list, maps):
            y = module(x)
            n, _, h, w = y.shape
            out.append(y.view(n, -1, self.columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, self.columns))
        return torch.cat(out, dim=1)


class SSDLiteHead(nn.Module):
    def __init__(self, channels: list[int], anchors: list[int], num_classes: int, eps: float, momentum: float):
        super().__init__()
        self.classification_head = _ScoringHead(channels, anchors, num_classes + 1, eps, momentum)
        self.regression_head = _ScoringHead(channels, anchors, 4, eps, momentum)


def wh_pairs(head: DenseHead) -> list[torch.Tensor]:
    """Per feature map, the (w, h) of its anchors relative to the image (torchvision's order)."""
    a = head.anchors
    n = len(a["aspect_ratios"])
    scales = [a["min_ratio"] + (a["max_ratio"] - a["min_ratio"]) * k / (n - 1.0) for k in range(n)] + [1.0]
    pairs = []
    for k in range(n):
        s, s_next = scales[k], math.sqrt(scales[k] * scales[k + 1])
        wh = [[s, s], [s_next, s_next]]
        for r in a["aspect_ratios"][k]:
            w, h = s * math.sqrt(r), s / math.sqrt(r)
            wh += [[w, h], [h, w]]
        pairs.append(torch.tensor(wh, dtype=torch.float32))
    return pairs


def default_boxes(head: DenseHead, grids: list[tuple[int, int]], image_size: tuple[int, int]) -> torch.Tensor:
    """(anchors, 4) x1 y1 x2 y2 in pixels of an image of `image_size` (h, w), for feature maps of
    `grids` sizes, in the order of the network's output (map, row, column, anchor)."""
    boxes = []
    for (fh, fw), wh in zip(grids, wh_pairs(head)):
        ys = (torch.arange(fh, dtype=torch.float32) + 0.5) / fh
        xs = (torch.arange(fw, dtype=torch.float32) + 0.5) / fw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), -1).repeat_interleave(len(wh), 0)
        sizes = wh.clamp(0, 1).repeat(fh * fw, 1)
        boxes.append(torch.cat((centres, sizes), 1))
    b = torch.cat(boxes)
    scale = torch.tensor([image_size[1], image_size[0]], dtype=torch.float32)
    return torch.cat(((b[:, :2] - 0.5 * b[:, 2:]) * scale, (b[:, :2] + 0.5 * b[:, 2:]) * scale), 1)


def encode(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Offsets (dx, dy, dw, dh) of boxes `gt` from `anchors` (both x1 y1 x2 y2), weights 10, 10, 5, 5."""
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    wx, wy, ww, wh = BOX_WEIGHTS
    return torch.stack((wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)), 1)


def decode(rel: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Boxes (x1 y1 x2 y2) from offsets `rel` (..., anchors, 4), as torchvision's BoxCoder."""
    rel = rel.float()
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    wx, wy, ww, wh = BOX_WEIGHTS
    dx, dy = rel[..., 0] / wx, rel[..., 1] / wy
    dw, dh = (rel[..., 2] / ww).clamp(max=BBOX_CLIP), (rel[..., 3] / wh).clamp(max=BBOX_CLIP)
    cx, cy = dx * aw + ax, dy * ah + ay
    w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def split_raw(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(box offsets (N, A, 4), class logits (N, A, 1 + classes)) of the network's output."""
    return raw[..., :4], raw[..., 4:]


@torch.no_grad()
def postprocess(raw: torch.Tensor, anchors: torch.Tensor, image_size: tuple[int, int], score_thresh: float = 0.001,
                nms_thresh: float = 0.55, topk: int = 300, max_detections: int = 300) -> list[dict[str, torch.Tensor]]:
    """Detections per image: {"boxes" (D, 4) x1 y1 x2 y2 in input pixels, "scores" (D,), "labels"
    (D,) class index 0..K-1}, best first (torchvision's SSD post-processing; its labels are ours + 1)."""
    from torchvision.ops import batched_nms, clip_boxes_to_image

    rel, logits = split_raw(raw.float())
    scores_all = torch.softmax(logits, -1)
    boxes_all = decode(rel, anchors.to(raw.device))
    results = []
    for boxes, scores in zip(boxes_all, scores_all):
        boxes = clip_boxes_to_image(boxes, image_size)
        keep_boxes, keep_scores, keep_labels = [], [], []
        for label in range(1, scores.shape[-1]):
            score = scores[:, label]
            keep = score > score_thresh
            score, box = score[keep], boxes[keep]
            score, idx = score.topk(min(topk, score.numel()))
            keep_boxes.append(box[idx])
            keep_scores.append(score)
            keep_labels.append(torch.full_like(idx, label - 1))
        b, s, lab = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
        keep = batched_nms(b, s, lab, nms_thresh)[:max_detections]
        results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return results


def feature_grids(head: DenseHead, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Feature-map sizes for an input of `size`: C4 at 1/16, C5 at 1/32, then halved (rounded up)."""
    h, w = math.ceil(size[0] / 16), math.ceil(size[1] / 16)
    grids = [(h, w)]
    for _ in range(1 + len(head.extras)):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        grids.append((h, w))
    return grids


class Detector(nn.Module):
    """Backbone (a MobileNet without its classifier layers) + SSDLite extra layers and heads; the
    raw output (N, anchors, 4 + 1 + classes), see the module doc."""

    def __init__(self, spec: ArchSpec, head: DenseHead) -> None:
        super().__init__()
        head.validate()
        if head.task != "detect":
            raise SpecError(f"head.task: a detector needs a detect head, got {head.task!r}")
        self.spec, self.head_spec = spec, head
        self.num_classes = head.num_classes
        self.backbone = MobileNet(spec, num_classes=0)
        self.backbone.pre_logits = self.backbone.pre_act = None
        taps = self.backbone.feature_taps()
        missing = [t for t in head.taps if t not in taps]
        if missing:
            raise SpecError(f"head.taps: {spec.name} has no feature tap {missing}; SSDLite taps the expansion "
                            "layer of the first block of the last strided stage (blocks whose expansion equals "
                            "their input have none)")
        c4, c5 = (taps[t] for t in head.taps)
        if (c4.stride, c5.stride) != (16, 32):
            raise SpecError(f"head.taps: SSDLite needs C4 at output stride 16 and C5 at 32; {spec.name} gives "
                            f"{c4.stride} and {c5.stride}")
        eps, momentum = spec.bn_eps, spec.bn_momentum
        self.extra = nn.ModuleList()
        cin = c5.channels
        for cout in head.extras:
            mid = cout // 2
            self.extra.append(nn.Sequential(_cbr(cin, mid, 1, 1, 1, eps, momentum), _cbr(mid, mid, 3, 2, mid, eps, momentum),
                                            _cbr(mid, cout, 1, 1, 1, eps, momentum)))
            cin = cout
        channels = [c4.channels, c5.channels, *head.extras]
        self.anchors_per_location = [2 + 2 * len(r) for r in head.anchors["aspect_ratios"]]
        self.head = SSDLiteHead(channels, self.anchors_per_location, head.num_classes, eps, momentum)
        if self.backbone.stem.conv.weight.device.type != "meta":
            for module in (self.extra, self.head):        # torchvision's SSDLite initialisation
                for m in module.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.normal_(m.weight, 0.0, 0.03)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        self._anchor_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def fused(self) -> bool:
        return self.backbone.fused

    def anchors(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(anchors, 4) boxes in pixels for an input of `size` (h, w; default: the head's resolution)."""
        size = tuple(size or self.head_spec.resolution)
        if size not in self._anchor_cache:
            self._anchor_cache[size] = default_boxes(self.head_spec, feature_grids(self.head_spec, size), size)
        return self._anchor_cache[size]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone.forward_taps(x, self.head_spec.taps)
        maps = [feats[t] for t in self.head_spec.taps]
        y = maps[-1]
        for layer in self.extra:
            y = layer(y)
            maps.append(y)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return torch.cat((self.head.regression_head(maps), self.head.classification_head(maps)), -1)

    def detect(self, x: torch.Tensor, **options) -> list[dict[str, torch.Tensor]]:
        """Post-processed detections for a batch `x` (see `postprocess` for the options)."""
        size = (x.shape[-2], x.shape[-1])
        return postprocess(self(x), self.anchors(size), size, **options)

    def fuse(self) -> Detector:
        self.backbone.fuse()
        return self.eval()


def build_detector(spec: ArchSpec, head: DenseHead) -> Detector:
    return Detector(spec, head)
