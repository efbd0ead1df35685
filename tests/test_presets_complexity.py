"""The presets against the paper's tables (REFERENCE.md sections 1-2) and the peers, and the analytic
parameter / multiply-add counts against real modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import mnv3
from mnv3 import reduced_tail, with_output_stride
from mnv3.presets import PEER_ARCHS, V3_LARGE, V3_SMALL

WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.25)
META = torch.device("meta")


def real_params(spec, num_classes=1000) -> int:
    with META:
        model = mnv3.build(spec, num_classes)
    return sum(p.numel() for p in model.parameters())


def measured_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every Conv2d and Linear, measured on a forward pass with hooks."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * (module.in_channels // module.groups) * k

    def linear_hook(module, inputs, output):
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


# -- paper / reference figures -----------------------------------------------------------------

@pytest.mark.parametrize("name, width, params", [
    ("mobilenet_v3_large", 1.0, 5_483_032),
    ("mobilenet_v3_large", 0.75, 3_993_528),
    ("mobilenet_v3_small", 1.0, 2_542_856),
    ("mobilenet_v3_small", 0.75, 2_041_872),
    ("mobilenet_v3_large_minimal", 1.0, 3_924_288),
    ("mobilenet_v3_small_minimal", 1.0, 2_044_736),
    ("mobilenet_v2", 1.0, 3_504_872),
])
def test_params_exact(name, width, params):
    assert mnv3.count(mnv3.preset(name, width), 1000).params == params


@pytest.mark.parametrize("name, width, macs, rel", [
    ("mobilenet_v3_large", 1.0, 216.6e6, 0.01),
    ("mobilenet_v3_small", 1.0, 56.5e6, 0.01),
    ("mobilenet_v3_large", 0.75, 155e6, 0.01),
    ("mobilenet_v3_small", 0.75, 44e6, 0.02),
    ("mobilenet_v3_large_minimal", 1.0, 209e6, 0.01),
    ("mobilenet_v3_small_minimal", 1.0, 52e6, 0.02),
    ("mobilenet_v2", 1.0, 300e6, 0.02),
    ("mobilenet_v2", 0.35, 59.2e6, 0.02),
    ("mnasnet_a1", 1.0, 312e6, 0.02),
])
def test_macs_match_reference(name, width, macs, rel):
    assert mnv3.count(mnv3.preset(name, width)).macs == pytest.approx(macs, rel=rel)


def test_mnasnet_a1_params():
    assert mnv3.count(mnv3.preset("mnasnet_a1")).params == pytest.approx(3.9e6, rel=0.02)


# Paper Table 9 (width sweep, 224 px) and the resolution sweep of 1.0 networks, MACs in millions.
# The paper rounds to whole millions, so allow 2% or 1M, whichever is larger.
@pytest.mark.parametrize("name, width, res, macs_m", [
    ("mobilenet_v3_large", 1.25, 224, 356), ("mobilenet_v3_large", 0.5, 224, 69),
    ("mobilenet_v3_large", 0.35, 224, 40), ("mobilenet_v3_small", 1.25, 224, 91),
    ("mobilenet_v3_small", 0.5, 224, 21), ("mobilenet_v3_small", 0.35, 224, 12),
    ("mobilenet_v3_large", 1.0, 256, 282), ("mobilenet_v3_large", 1.0, 192, 160),
    ("mobilenet_v3_large", 1.0, 160, 112), ("mobilenet_v3_large", 1.0, 128, 73),
    ("mobilenet_v3_large", 1.0, 96, 43), ("mobilenet_v3_small", 1.0, 256, 74),
    ("mobilenet_v3_small", 1.0, 160, 30), ("mobilenet_v3_small", 1.0, 128, 20),
    ("mobilenet_v3_small", 1.0, 96, 12),
])
def test_macs_sweeps_match_paper(name, width, res, macs_m):
    macs = mnv3.count(mnv3.preset(name, width, res)).macs / 1e6
    assert abs(macs - macs_m) <= max(0.02 * macs_m, 1.0), macs


def test_large_table_1():
    spec = mnv3.preset("mobilenet_v3_large")
    assert spec.stem.out == 16 and spec.stem.stride == 2 and spec.stem.activation == "hswish"
    rows = [(b.kernel, b.expansion, b.out, b.se, b.activation, b.stride) for b in spec.blocks]
    se = {4: 24, 5: 32, 6: 32, 11: 120, 12: 168, 13: 168, 14: 240, 15: 240}
    expected = [(r.kernel, r.exp, r.out, se.get(i), r.act, r.stride)
                for i, r in enumerate(V3_LARGE, start=1)]
    assert rows == expected
    assert [r[1] for r in rows] == [16, 64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960]
    assert (spec.head.last_conv, spec.head.pre_logits, spec.head.dropout) == (960, 1280, 0.2)
    assert spec.total_stride() == 32 and spec.bn_eps == 1e-3 and spec.bn_momentum == 0.01


def test_small_table_2():
    spec = mnv3.preset("mobilenet_v3_small")
    se = {1: 8, 4: 24, 5: 64, 6: 64, 7: 32, 8: 40, 9: 72, 10: 144, 11: 144}
    expected = [(r.kernel, r.exp, r.out, se.get(i), r.act, r.stride)
                for i, r in enumerate(V3_SMALL, start=1)]
    assert [(b.kernel, b.expansion, b.out, b.se, b.activation, b.stride) for b in spec.blocks] == expected
    assert (spec.head.last_conv, spec.head.pre_logits) == (576, 1024)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_minimal_variants(name):
    full, minimal = mnv3.preset(name), mnv3.preset(name + "_minimal")
    assert all(b.se is None and b.kernel == 3 and b.activation == "relu" for b in minimal.blocks)
    assert minimal.stem.activation == minimal.head.activation == "relu"
    assert [(b.expansion, b.out, b.stride) for b in minimal.blocks] == \
        [(b.expansion, b.out, b.stride) for b in full.blocks]


def test_width_keeps_expansion_ratio_and_head():
    spec = mnv3.preset("mobilenet_v3_large", 0.75)
    assert [b.out for b in spec.blocks] == [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 88, 88, 120, 120, 120]
    assert spec.head.pre_logits == 1280  # not scaled down
    assert spec.head.last_conv == 720
    assert mnv3.preset("mobilenet_v3_large", 1.25).head.pre_logits == 1600
    assert mnv3.preset("mobilenet_v3_small", 0.5).head.pre_logits == 1024
    for name in mnv3.PRESETS:
        for w in WIDTHS:
            spec = mnv3.preset(name, w)
            assert all(c % 8 == 0 for c in [spec.stem.out] + [b.out for b in spec.blocks])


# -- analytic counts against real modules ------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(mnv3.PRESETS))
def test_analytic_params_equal_module(name, width):
    spec = mnv3.preset(name, width)
    assert mnv3.count(spec, 1000).params == real_params(spec, 1000)
    assert mnv3.count(spec, 0).params == real_params(spec, 0)
    assert mnv3.count(spec, 10).params == real_params(spec, 10)


@pytest.mark.parametrize("name", list(mnv3.PRESETS))
def test_analytic_params_equal_module_transformed(name):
    spec = mnv3.preset(name)
    for s in (reduced_tail(spec), with_output_stride(spec, 8),
              spec.replace(padding="same", in_channels=1)):
        assert mnv3.count(s).params == real_params(s)


def test_count_rows():
    spec = mnv3.preset("mobilenet_v3_large")
    c = mnv3.count(spec)
    names = [row.name for row in c.layers]
    assert names == ["stem"] + [f"block{i}" for i in range(1, 16)] + ["last_conv", "pre_logits",
                                                                     "classifier"]
    assert c.params == sum(r.params for r in c.layers) and c.macs == sum(r.macs for r in c.layers)
    assert [r.input_size for r in c.layers[:3]] == [224, 112, 112]
    assert c.layers[-2].params == 960 * 1280 + 1280
    assert c.layers[-1].params == 1280 * 1000 + 1000
    assert mnv3.count(spec, 0).layers[-1].name == "pre_logits"
    assert mnv3.count(spec, 0).params == c.params - 1_281_000


@pytest.mark.parametrize("spec", [
    mnv3.preset("mobilenet_v3_large", 1.0, 64),
    mnv3.preset("mobilenet_v3_small", 0.75, 72),
    mnv3.preset("mnasnet_a1", 1.0, 64),
    mnv3.preset("mobilenet_v2", 0.5, 65),
    mnv3.preset("tf_mobilenetv3_small_100", 1.0, 65),
    with_output_stride(reduced_tail(mnv3.preset("mobilenet_v3_large", 1.0, 64)), 16),
], ids=lambda s: s.name)
def test_analytic_macs_equal_measured(spec):
    torch.manual_seed(0)
    model = mnv3.build(spec)
    x = torch.randn(1, 3, spec.resolution, spec.resolution)
    assert mnv3.count(spec).macs == measured_macs(model, x)


def test_analytic_macs_scale_with_resolution():
    def split(res):
        spec = mnv3.preset("mobilenet_v3_large", 1.0, res)
        c = mnv3.count(spec)
        # SE layers and the layers after the pool run at 1x1 whatever the resolution.
        fixed = sum(2 * b.expansion * b.se for b in spec.blocks if b.se is not None)
        fixed += sum(r.macs for r in c.layers if r.name in ("pre_logits", "classifier"))
        return c.macs - fixed, fixed

    (conv_a, fixed_a), (conv_b, fixed_b) = split(256), split(128)
    assert fixed_a == fixed_b > 0
    assert conv_a == 4 * conv_b


# -- peers -------------------------------------------------------------------------------------

def _param_sizes(model: nn.Module) -> list[int]:
    return sorted(p.numel() for p in model.parameters())


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("peer, ours", [
    ("mobilenet_v3_large", "mobilenet_v3_large"),
    ("mobilenet_v3_small", "mobilenet_v3_small"),
    ("mobilenet_v2", "mobilenet_v2"),
])
def test_same_params_as_torchvision(peer, ours):
    torchvision = pytest.importorskip("torchvision")
    with META:
        theirs = getattr(torchvision.models, peer)()
        mine = mnv3.build(mnv3.preset(ours))
    assert _param_sizes(mine) == _param_sizes(theirs)
    assert _bn_count(mine) == _bn_count(theirs)


@pytest.mark.parametrize("name", sorted(PEER_ARCHS))
def test_same_params_as_timm(name):
    timm = pytest.importorskip("timm")
    spec = mnv3.preset(name)
    with META:
        theirs = timm.create_model(name)
        mine = mnv3.build(spec)
    assert _param_sizes(mine) == _param_sizes(theirs)
    assert _bn_count(mine) == _bn_count(theirs)
    assert mnv3.count(spec).params == sum(p.numel() for p in theirs.parameters())
    eps = {m.eps for m in theirs.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {spec.bn_eps}
    assert spec.padding == ("same" if name.startswith("tf_") else "symmetric")


@pytest.mark.parametrize("name, params", [
    ("mobilenetv3_large_100", 5_483_032), ("tf_mobilenetv3_large_075", 3_993_528),
    ("semnasnet_100", 3_887_038),
])
def test_timm_names_exact_params(name, params):
    assert mnv3.count(mnv3.preset(name)).params == params


def test_reduced_tail_large_counts():
    spec = reduced_tail(mnv3.preset("mobilenet_v3_large"))
    assert mnv3.count(spec).params == real_params(spec)
    full = mnv3.count(mnv3.preset("mobilenet_v3_large"))
    assert mnv3.count(spec).params < full.params and mnv3.count(spec).macs < full.macs


def test_dilation_keeps_params_and_raises_macs():
    base = mnv3.preset("mobilenet_v3_large")
    os16 = with_output_stride(base, 16)
    assert mnv3.count(os16).params == mnv3.count(base).params
    # The last stage runs at 14x14 instead of 7x7.
    assert mnv3.count(os16).macs > mnv3.count(base).macs * 1.2
    rows = {r.name: r for r in mnv3.count(os16).layers}
    assert rows["last_conv"].input_size == 14
    assert dataclasses.replace(os16, name=base.name).blocks != base.blocks
