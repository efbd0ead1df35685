"""Dense-prediction heads as data: `DenseHead` says which head sits on a backbone `ArchSpec`, where it
taps the backbone, how wide it is, how many classes it predicts and at what input size it runs.

A segmentation (and later detection) model is a backbone spec plus one `DenseHead`; both travel in
the model file, and every command (info, train, eval, predict, bench, export) reads them the same
way. Like `mnv3.arch`, nothing here imports torch.

LR-ASPP (the paper's section 6.4, and the authors' DeepLab release it points to):
  high branch, on the backbone's last 1x1 conv at 1/16: 1x1 conv to `channels` + BN + ReLU,
  multiplied by a gate: average pooling with a large window (49x49, stride (16, 20) on the 64x128
  feature map of a 1024x2048 input), 1x1 conv with bias, sigmoid, bilinear upsampling to the map;
  then upsampled to the low branch's 1/8 map and a 1x1 conv to the classes;
  low branch: the 1/8 features through a 1x1 conv to the classes; the two are summed and upsampled
  to the input.
`lraspp` taps, as the authors' code does, the depthwise output of the last block at stride 8
(block 6 in Large: 120 channels; block 3 in Small: 88) and gates with the large pooling window;
`lraspp-torchvision` taps the output of the first block at stride 8 (block 4 in Large: 40
channels) and gates with global pooling, as torchvision's `lraspp_mobilenet_v3_large`.

The pooling window scales with the feature map, axis by axis: on a map of h x w the stride is
round(16 h / 64) x round(20 w / 128) and the kernel about 49 h / 64 x 49 w / 128, moved by the
rounding so that the windows form the same grid as at the reference (1 x 4: windows covering about
77% of the height and 38% of the width). A model trained at 360x480 and run at 720x960 thus sees
the same gate. On a map too small for that grid (fewer than 4 pixels wide) the window keeps its
scaled size, at least one pixel and at most the map, and the grid has fewer cells; a map of one
pixel along an axis pools that axis globally. Pooling is 'valid' (no padding), as in DeepLab.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from mnv3.arch import SpecError

HEAD_FORMAT = "mnv3.head/1"
SEGMENT_KINDS = ("lraspp", "lraspp-torchvision")
DETECT_KINDS = ("ssdlite",)
TASKS = ("segment", "detect")
KINDS = {"segment": SEGMENT_KINDS, "detect": DETECT_KINDS}
GATES = ("sigmoid", "hard_sigmoid")

# The paper's window, and the 1/16 feature map it was given for (1024x2048 input).
PAPER_POOL = {"kernel": (49, 49), "stride": (16, 20), "reference": (64, 128)}


@dataclass(frozen=True)
class DenseHead:
    """A head on a backbone. `taps` are backbone feature taps, high-level first (see
    `mnv3.nn.MobileNet.feature_taps`); `resolution` is the (height, width) the model is built for
    (training crops and exports); `pool` is None for a global-pool gate, else the window's kernel
    and stride at the `reference` feature-map size (scaled to the actual map, see the module doc)."""

    task: str
    kind: str
    num_classes: int
    taps: tuple[str, ...]
    channels: int = 128
    resolution: tuple[int, int] = (512, 512)
    gate: str = "sigmoid"
    pool: dict[str, tuple[int, int]] | None = None
    extras: tuple[int, ...] = ()
    anchors: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "taps", tuple(self.taps))
        object.__setattr__(self, "extras", tuple(self.extras))
        object.__setattr__(self, "resolution", tuple(self.resolution))
        if self.pool is not None:
            object.__setattr__(self, "pool", {k: tuple(v) for k, v in self.pool.items()})

    def __hash__(self) -> int:
        return hash(self.to_json())

    def validate(self) -> DenseHead:
        if self.task not in TASKS:
            raise SpecError(f"head.task: expected one of {TASKS}, got {self.task!r}")
        if self.kind not in KINDS[self.task]:
            raise SpecError(f"head.kind: unknown {self.task} head {self.kind!r}; expected one of {KINDS[self.task]}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise SpecError(f"head.num_classes: expected an integer >= 1, got {self.num_classes!r}")
        if len(self.taps) != 2 or not all(isinstance(t, str) and t for t in self.taps):
            raise SpecError(f"head.taps: expected two tap names (high, low), got {list(self.taps)!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise SpecError(f"head.channels: expected an integer >= 1, got {self.channels!r}")
        if len(self.resolution) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16
                                                for v in self.resolution):
            raise SpecError(f"head.resolution: expected [height, width], each an integer >= 16, got "
                            f"{list(self.resolution)!r}")
        if self.gate not in GATES:
            raise SpecError(f"head.gate: expected one of {GATES}, got {self.gate!r}")
        pool_ok = self.pool is None or (set(self.pool) == {"kernel", "stride", "reference"} and all(
            len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v) for v in self.pool.values()))
        if not pool_ok:
            raise SpecError("head.pool: expected {kernel: [h, w], stride: [h, w], reference: [h, w]} "
                            f"with positive integers, or null for global pooling; got {self.pool!r}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 2 for c in self.extras):
            raise SpecError(f"head.extras: expected channel counts >= 2, got {list(self.extras)!r}")
        if self.task == "detect":
            a = self.anchors
            ok = isinstance(a, dict) and set(a) == {"aspect_ratios", "min_ratio", "max_ratio"} and \
                0 < a["min_ratio"] < a["max_ratio"] <= 1 and \
                len(a["aspect_ratios"]) == 2 + len(self.extras) and \
                all(isinstance(r, (list, tuple)) and all(x > 0 for x in r) for r in a["aspect_ratios"])
            if not ok:
                raise SpecError("head.anchors: expected {aspect_ratios: one list per feature map (2 + extras), "
                                f"min_ratio, max_ratio with 0 < min < max <= 1}}; got {a!r}")
        return self

    def replace(self, **changes: Any) -> DenseHead:
        return dataclasses.replace(self, **changes).validate()

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["taps"], data["resolution"] = list(self.taps), list(self.resolution)
        if self.pool is not None:
            data["pool"] = {k: list(v) for k, v in self.pool.items()}
        data["extras"] = list(self.extras)
        if self.anchors is not None:
            data["anchors"] = {**self.anchors, "aspect_ratios": [list(r) for r in self.anchors["aspect_ratios"]]}
        return {"format": HEAD_FORMAT, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> DenseHead:
        if not isinstance(data, dict):
            raise SpecError(f"head: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", HEAD_FORMAT)
        if fmt != HEAD_FORMAT:
            raise SpecError(f"head.format: expected {HEAD_FORMAT!r}, got {fmt!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise SpecError(f"head: unknown field(s) {unknown}; expected {sorted(fields)}")
        try:
            return cls(**data).validate()
        except TypeError as exc:
            raise SpecError(f"head: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> DenseHead:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"head JSON does not parse: {exc}") from None


def lraspp(kind: str, num_classes: int, resolution: tuple[int, int], channels: int = 128,
           gate: str | None = None) -> DenseHead:
    """The LR-ASPP head of `kind` ("lraspp": the paper's; "lraspp-torchvision")."""
    if kind not in SEGMENT_KINDS:
        raise SpecError(f"--head: unknown segmentation head {kind!r}; expected one of {SEGMENT_KINDS}")
    paper = kind == "lraspp"
    return DenseHead(task="segment", kind=kind, num_classes=num_classes,
                     taps=("last_conv", "stride8.depthwise" if paper else "stride8.first"), channels=channels,
                     resolution=tuple(resolution), gate=gate or "sigmoid",
                     pool=dict(PAPER_POOL) if paper else None).validate()


# SSDLite as torchvision's ssdlite320_mobilenet_v3_large: four extra layers, six anchors per location.
SSDLITE_EXTRAS = (512, 256, 256, 128)
SSDLITE_ANCHORS = {"aspect_ratios": [[2, 3]] * 6, "min_ratio": 0.2, "max_ratio": 0.95}


def c4_tap(spec) -> str:
    """SSDLite's C4: the expansion output of the first block of the last strided stage (block 13 of
    MobileNetV3-Large, block 9 of Small), at output stride 16."""
    strided = [i for i, b in enumerate(spec.blocks) if b.stride > 1]
    if not strided:
        raise SpecError(f"{spec.name}: SSDLite's C4 needs a strided block (the start of the last stage)")
    return f"block{strided[-1] + 1}.expansion"


def ssdlite(spec, num_classes: int, resolution: tuple[int, int] = (320, 320),
            extras: tuple[int, ...] = SSDLITE_EXTRAS) -> DenseHead:
    """The SSDLite head for backbone `spec` (C4 = `c4_tap(spec)`, C5 = the last 1x1 conv)."""
    anchors = {**SSDLITE_ANCHORS, "aspect_ratios": [[2, 3]] * (2 + len(extras))}
    return DenseHead(task="detect", kind="ssdlite", num_classes=num_classes, taps=(c4_tap(spec), "last_conv"),
                     resolution=tuple(resolution), extras=tuple(extras),
                     anchors=anchors).validate()


def pool_window(head: DenseHead, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(kernel, stride) of the gate's average pooling on a feature map of `size` (h, w); None for
    global pooling. See the module doc for the rule."""
    if head.pool is None:
        return None
    kernel, stride = [], []
    for axis in (0, 1):
        n, ref = size[axis], head.pool["reference"][axis]
        k0, s0 = head.pool["kernel"][axis], head.pool["stride"][axis]
        windows = max(1, (ref - k0) // s0 + 1)             # along this axis at the reference size
        s = min(n, max(1, round(s0 * n / ref)))
        target = k0 * n / ref
        lo, hi = max(1, n - windows * s + 1), n - (windows - 1) * s
        k = min(max(round(target), lo), hi) if hi >= lo else min(n, max(1, round(target)))
        kernel.append(k)
        stride.append(s)
    return (kernel[0], kernel[1]), (stride[0], stride[1])


def parse_resolution(text: str | int) -> int | tuple[int, int]:
    """"512" -> 512; "360x480" -> (360, 480)."""
    if isinstance(text, int):
        return text
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SpecError(f"--resolution: expected N or HxW (e.g. 224 or 360x480), got {text!r}") from None
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise SpecError(f"--resolution: expected N or HxW with positive sizes, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def segment_backbone(spec, kind: str, resolution: tuple[int, int] | None = None):
    """The backbone a segmentation head of `kind` expects, from a classification spec: output stride
    16 with the last stage dilated; for "lraspp" the last stage's channels halved first (RF2), for
    "lraspp-torchvision" torchvision's dilated MobileNetV3 (full tail, its dilation convention). A
    spec that is already dilated is taken as it is (a segmentation model's own backbone)."""
    from mnv3.arch import halve_last_stage, with_output_stride

    if kind not in SEGMENT_KINDS:
        raise SpecError(f"--head: unknown segmentation head {kind!r}; expected one of {SEGMENT_KINDS}")
    if not any(b.dilation > 1 for b in spec.blocks):
        if kind == "lraspp":
            spec = with_output_stride(halve_last_stage(spec), 16, "tf")
        else:
            spec = with_output_stride(spec, 16, "torchvision")
    if resolution is not None:
        spec = spec.replace(resolution=min(resolution))
    return spec
