"""The paper's networks as tables, turned into `ArchSpec`s for any width multiplier and resolution.

Rows read like Table 1 and 2 of the paper: kernel, expansion channels, output channels, SE,
activation, stride, all for the 1.0 network. Widths follow the paper/TF convention: outputs are
make_divisible(out * width), expansions keep the 1.0 network's expansion ratio over the (scaled)
input, and the 1280/1024 pre-logits layer is only scaled up, never down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from mnv3.arch import ArchSpec, BlockSpec, HeadSpec, SpecError, StemSpec, make_divisible

RE, HS, R6 = "relu", "hswish", "relu6"


class Row(NamedTuple):
    kernel: int
    exp: int
    out: int
    se: bool
    act: str
    stride: int


# MobileNetV3-Large, paper Table 1 (input 224x224x3, stem 3x3 s2 16 ch h-swish).
V3_LARGE = (
    #   k  exp  out   SE     NL  s
    Row(3, 16, 16, False, RE, 1),
    Row(3, 64, 24, False, RE, 2),
    Row(3, 72, 24, False, RE, 1),
    Row(5, 72, 40, True, RE, 2),
    Row(5, 120, 40, True, RE, 1),
    Row(5, 120, 40, True, RE, 1),
    Row(3, 240, 80, False, HS, 2),
    Row(3, 200, 80, False, HS, 1),
    Row(3, 184, 80, False, HS, 1),
    Row(3, 184, 80, False, HS, 1),
    Row(3, 480, 112, True, HS, 1),
    Row(3, 672, 112, True, HS, 1),
    Row(5, 672, 160, True, HS, 2),
    Row(5, 960, 160, True, HS, 1),
    Row(5, 960, 160, True, HS, 1),
)

# MobileNetV3-Small, paper Table 2.
V3_SMALL = (
    #   k  exp  out   SE     NL  s
    Row(3, 16, 16, True, RE, 2),
    Row(3, 72, 24, False, RE, 2),
    Row(3, 88, 24, False, RE, 1),
    Row(5, 96, 40, True, HS, 2),
    Row(5, 240, 40, True, HS, 1),
    Row(5, 240, 40, True, HS, 1),
    Row(5, 120, 48, True, HS, 1),
    Row(5, 144, 48, True, HS, 1),
    Row(5, 288, 96, True, HS, 2),
    Row(5, 576, 96, True, HS, 1),
    Row(5, 576, 96, True, HS, 1),
)

# MobileNetV2 (Sandler et al., Table 2): expansion factor t, channels c, repeats n, first stride s.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))

# MnasNet-A1 (Tan et al., Figure 7): t, kernel, channels, repeats, first stride, SE ratio of the
# block's input channels.
MNASNET_A1_STAGES = ((1, 3, 16, 1, 1, 0.0), (6, 3, 24, 2, 2, 0.0), (3, 5, 40, 3, 2, 0.25),
                     (6, 3, 80, 4, 2, 0.0), (6, 3, 112, 2, 1, 0.25), (6, 5, 160, 3, 2, 0.25),
                     (6, 3, 320, 1, 1, 0.0))


def _scaled_name(base: str, width: float, resolution: int) -> str:
    name = f"{base}_{round(width * 100):03d}"
    return name if resolution == 224 else f"{name}_{resolution}"


def _check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0.1 <= width <= 4.0):
        raise SpecError(f"width: expected a multiplier between 0.1 and 4.0, got {width!r}")
    return float(width)


def _mobilenet_v3(base: str, rows: tuple[Row, ...], last_conv: int, pre_logits: int,
                  width: float, resolution: int, minimal: bool) -> ArchSpec:
    width = _check_width(width)
    stem_act = RE if minimal else HS
    stem = StemSpec(out=make_divisible(16 * width), kernel=3, stride=2, activation=stem_act)
    blocks, in_1, in_w = [], 16, stem.out
    for row in rows:
        out_w = make_divisible(row.out * width)
        exp_w = make_divisible(row.exp * in_w / in_1)
        blocks.append(BlockSpec(
            kernel=3 if minimal else row.kernel,
            expansion=exp_w,
            out=out_w,
            se=make_divisible(exp_w / 4) if row.se and not minimal else None,
            activation=RE if minimal else row.act,
            stride=row.stride,
        ))
        in_1, in_w = row.out, out_w
    head = HeadSpec(
        last_conv=make_divisible(last_conv * in_w / in_1),
        pre_logits=make_divisible(pre_logits * max(1.0, width)),
        dropout=0.2,
        activation=stem_act,
    )
    name = _scaled_name(base + ("_minimal" if minimal else ""), width, resolution)
    return ArchSpec(name=name, stem=stem, blocks=tuple(blocks), head=head,
                    resolution=resolution).validate()


def mobilenet_v3_large(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    return _mobilenet_v3("mobilenet_v3_large", V3_LARGE, 960, 1280, width, resolution, False)


def mobilenet_v3_small(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    return _mobilenet_v3("mobilenet_v3_small", V3_SMALL, 576, 1024, width, resolution, False)


def mobilenet_v3_large_minimal(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    return _mobilenet_v3("mobilenet_v3_large", V3_LARGE, 960, 1280, width, resolution, True)


def mobilenet_v3_small_minimal(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    return _mobilenet_v3("mobilenet_v3_small", V3_SMALL, 576, 1024, width, resolution, True)


def _stage_blocks(stages, width: float, stem_out: int, act: str, se_of) -> list[BlockSpec]:
    blocks, in_w = [], stem_out
    for t, kernel, c, n, s, se_ratio in stages:
        out_w = make_divisible(c * width)
        for i in range(n):
            exp = round(in_w * t)
            se = se_of(in_w, se_ratio)
            blocks.append(BlockSpec(kernel=kernel, expansion=exp, out=out_w, se=se,
                                    activation=act, stride=s if i == 0 else 1))
            in_w = out_w
    return blocks


def mobilenet_v2(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    """MobileNetV2 with torchvision's channel rounding (its 1.0 network has 3,504,872 parameters)."""
    width = _check_width(width)
    stem = StemSpec(out=make_divisible(32 * width), kernel=3, stride=2, activation=R6)
    stages = [(t, 3, c, n, s, 0.0) for t, c, n, s in V2_STAGES]
    blocks = _stage_blocks(stages, width, stem.out, R6, lambda in_w, r: None)
    head = HeadSpec(last_conv=make_divisible(1280 * max(1.0, width)), pre_logits=None,
                    dropout=0.2, activation=R6)
    return ArchSpec(name=_scaled_name("mobilenet_v2", width, resolution), stem=stem,
                    blocks=tuple(blocks), head=head, resolution=resolution).validate()


def mnasnet_a1(width: float = 1.0, resolution: int = 224) -> ArchSpec:
    """MnasNet-A1: ReLU throughout, squeeze-and-excite sized from the block input, sigmoid gate."""
    width = _check_width(width)
    stem = StemSpec(out=make_divisible(32 * width), kernel=3, stride=2, activation=RE)
    blocks = _stage_blocks(MNASNET_A1_STAGES, width, stem.out, RE,
                           lambda in_w, r: max(1, int(in_w * r)) if r else None)
    head = HeadSpec(last_conv=make_divisible(1280 * max(1.0, width)), pre_logits=None,
                    dropout=0.2, activation=RE)
    return ArchSpec(name=_scaled_name("mnasnet_a1", width, resolution), stem=stem,
                    blocks=tuple(blocks), head=head, resolution=resolution,
                    se_gate="sigmoid").validate()


PRESETS: dict[str, Callable[..., ArchSpec]] = {
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large_minimal": mobilenet_v3_large_minimal,
    "mobilenet_v3_small_minimal": mobilenet_v3_small_minimal,
    "mobilenet_v2": mobilenet_v2,
    "mnasnet_a1": mnasnet_a1,
}


class PeerArch(NamedTuple):
    """A peer's model name, as ours: preset, width and the settings its weights were trained with."""

    preset: str
    width: float
    padding: str = "symmetric"
    bn_eps: float = 1e-3


# Names other libraries use for the same networks, so `--arch` can take them directly. timm's own
# (non-tf_) models use PyTorch's default batch-norm eps; its tf_ ports use TF "same" padding.
PEER_ARCHS: dict[str, PeerArch] = {
    "mobilenetv3_large_100": PeerArch("mobilenet_v3_large", 1.0, bn_eps=1e-5),
    "mobilenetv3_large_075": PeerArch("mobilenet_v3_large", 0.75, bn_eps=1e-5),
    "mobilenetv3_small_100": PeerArch("mobilenet_v3_small", 1.0, bn_eps=1e-5),
    "mobilenetv3_small_075": PeerArch("mobilenet_v3_small", 0.75, bn_eps=1e-5),
    "tf_mobilenetv3_large_100": PeerArch("mobilenet_v3_large", 1.0, "same"),
    "tf_mobilenetv3_large_075": PeerArch("mobilenet_v3_large", 0.75, "same"),
    "tf_mobilenetv3_large_minimal_100": PeerArch("mobilenet_v3_large_minimal", 1.0, "same"),
    "tf_mobilenetv3_small_100": PeerArch("mobilenet_v3_small", 1.0, "same"),
    "tf_mobilenetv3_small_075": PeerArch("mobilenet_v3_small", 0.75, "same"),
    "tf_mobilenetv3_small_minimal_100": PeerArch("mobilenet_v3_small_minimal", 1.0, "same"),
    "semnasnet_100": PeerArch("mnasnet_a1", 1.0, bn_eps=1e-5),
    "mobilenetv2_100": PeerArch("mobilenet_v2", 1.0, bn_eps=1e-5),
}


def preset(name: str, width: float = 1.0, resolution: int = 224) -> ArchSpec:
    """A preset (or a peer library's name for one) at the given width and resolution."""
    if name in PEER_ARCHS:
        peer = PEER_ARCHS[name]
        if width != 1.0 and width != peer.width:
            raise SpecError(f"{name} fixes the width at {peer.width}; leave --width out "
                            f"or use the preset {peer.preset!r}")
        spec = PRESETS[peer.preset](peer.width, resolution)
        return spec.replace(padding=peer.padding, bn_eps=peer.bn_eps)
    if name not in PRESETS:
        raise SpecError(f"unknown architecture {name!r}; expected a spec JSON file or one of "
                        f"{sorted(PRESETS)} (or a peer name: {sorted(PEER_ARCHS)})")
    return PRESETS[name](width, resolution)


def resolve_arch(arch: str | ArchSpec, width: float | None = None,
                 resolution: int | None = None) -> ArchSpec:
    """`arch` as every command takes it: a preset name, a peer's name or a spec JSON path."""
    if isinstance(arch, ArchSpec):
        spec = arch
    elif arch.endswith(".json") or Path(arch).is_file():
        spec = ArchSpec.load(arch)
        if width not in (None, 1.0):
            raise SpecError(f"--width applies to presets; {arch} is a spec file with fixed channels")
    else:
        return preset(arch, 1.0 if width is None else width, resolution or 224)
    if resolution is not None and resolution != spec.resolution:
        spec = spec.replace(resolution=resolution)
    return spec


COMMON_WIDTHS = (1.0, 0.75, 0.5, 0.35, 1.25)


def candidates(resolution: int = 224) -> Iterator[ArchSpec]:
    """Every preset at the common widths: what an unnamed set of weights is matched against."""
    for make in PRESETS.values():
        for width in COMMON_WIDTHS:
            yield make(width, resolution)


def list_presets() -> list[str]:
    return sorted(PRESETS)


__all__ = [
    "PEER_ARCHS",
    "PRESETS",
    "list_presets",
    "mnasnet_a1",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_large_minimal",
    "mobilenet_v3_small",
    "mobilenet_v3_small_minimal",
    "preset",
    "resolve_arch",
]
