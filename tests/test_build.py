"""`mnv3.build`: the module every spec turns into, its taps, batch-norm folding, memory formats,
TF padding, dilation, and export (torch.export, torch.compile, ONNX)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import mnv3
from mnv3 import reduced_tail, with_output_stride
from mnv3.nn.layers import same_padding

RES = 64
CASES = [(name, 1.0) for name in mnv3.PRESETS] + [
    ("mobilenet_v3_large", 0.5), ("mobilenet_v3_small", 0.75), ("mnasnet_a1", 0.35)]
CASE_IDS = [f"{n}-{w}" for n, w in CASES]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm statistics and affine terms that are neither the identity nor so far from the real
    activation statistics that the input stops mattering, and linear layers of unit gain: folding,
    export and memory-format tests then compare input-dependent outputs. Returns the model in eval
    mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 0.5 + 0.75)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
        # Calibrate the running statistics on random images (cumulative average, one batch)...
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        res = model.spec.resolution
        model.train()(torch.randn(8, model.spec.in_channels, res, res, generator=g))
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            # ...then move them off the batch statistics.
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(bn.num_features, generator=g) * 0.1 * std)
            bn.running_var.mul_(torch.rand(bn.num_features, generator=g) * 0.5 + 0.75)
    return model.eval()


def make(name: str, width: float = 1.0, res: int = RES, seed: int = 0, **changes) -> mnv3.MobileNet:
    spec = mnv3.preset(name, width, res)
    if changes:
        spec = spec.replace(**changes)
    torch.manual_seed(seed)
    return randomize(mnv3.build(spec), seed)


def image(n: int = 2, res: int = RES, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def assert_nontrivial(y: torch.Tensor) -> None:
    """Finite, not near zero, and different for the different images of the batch."""
    assert torch.isfinite(y).all()
    assert y.std() > 1e-2
    assert len(y) > 1 and (y[0] - y[1]).abs().max() > 0.1 * y.abs().max()


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |got - expected| <= tol * max(1, max |expected|): float32 rounding grows with the scale
    of the outputs (these random networks give logits up to ~25)."""
    assert got.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff <= tol * scale, f"max difference {diff:.3g} > {tol:g} x {scale:.3g}"


# -- forward / backward --------------------------------------------------------------------------

@pytest.mark.parametrize("name, width", CASES, ids=CASE_IDS)
def test_forward_backward(name, width):
    spec = mnv3.preset(name, width, RES)
    torch.manual_seed(0)
    model = mnv3.build(spec).train()
    x = image()
    y = model(x)
    assert y.shape == (2, 1000)
    y.square().mean().backward()
    grad = model.stem.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    # Batch-norm running statistics were updated in train mode.
    assert not torch.equal(model.stem.bn.running_mean, torch.zeros_like(model.stem.bn.running_mean))

    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, spec.head.last_conv, RES // 32, RES // 32)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, spec.feature_channels())
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-6)


@pytest.mark.parametrize("res", [72, 65, 33])
@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_feature_size_at_odd_resolutions(res, padding):
    model = make("mobilenet_v3_small", res=res, padding=padding)
    size = res
    for _ in range(5):
        size = math.ceil(size / 2)
    with torch.no_grad():
        assert model.forward_features(image(1, res)).shape[-2:] == (size, size)


def test_reset_classifier_and_num_classes():
    model = make("mobilenet_v3_small")
    x = image()
    model.reset_classifier(10)
    assert model.num_classes == 10
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 1024)

    spec = mnv3.preset("mobilenet_v3_large", 1.0, RES)
    headless = mnv3.build(spec, num_classes=0).eval()
    assert isinstance(headless.classifier, nn.Identity)
    with torch.no_grad():
        out = headless(x)
    assert out.shape == (2, 1280)
    v2 = mnv3.build(mnv3.preset("mobilenet_v2", 1.0, RES), 0).eval()
    with torch.no_grad():
        assert v2(x).shape == (2, 1280) == (2, v2.num_features)
    for bad in (-1, 2.0, True, "10"):
        with pytest.raises(ValueError, match="num_classes"):
            mnv3.build(spec, bad)


def test_build_rejects_invalid_spec():
    spec = mnv3.preset("mobilenet_v3_small")
    bad = dataclasses.replace(spec, resolution=8)
    with pytest.raises(mnv3.SpecError):
        mnv3.build(bad)


def test_in_channels_and_sigmoid_gate():
    spec = mnv3.preset("mnasnet_a1", 1.0, RES).replace(in_channels=1)
    model = mnv3.build(spec).eval()
    assert model.stem.conv.in_channels == 1
    assert any(isinstance(m, nn.Sigmoid) for m in model.modules())
    assert not any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    with torch.no_grad():
        assert model(torch.randn(1, 1, RES, RES)).shape == (1, 1000)


def test_module_structure_follows_spec():
    spec = mnv3.preset("mobilenet_v3_large")
    model = mnv3.build(spec)
    assert len(model.blocks) == 15
    assert not model.blocks[0].has_expand and model.blocks[1].has_expand
    assert [m.residual for m in model.blocks] == [
        True, False, True, False, True, True, False, True, True, True, False, True, False, True, True]
    assert model.blocks[3].dw.conv.kernel_size == (5, 5)
    assert model.blocks[3].se.reduce.out_channels == 24
    assert isinstance(model.blocks[3].se.gate, nn.Hardsigmoid)
    assert isinstance(model.blocks[6].dw.act, nn.Hardswish) and isinstance(model.blocks[5].dw.act, nn.ReLU)
    assert model.blocks[6].project.act is None  # linear bottleneck
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.01)}
    assert model.dropout.p == 0.2


# -- feature taps ---------------------------------------------------------------------------------

def _check_taps(model: mnv3.MobileNet, res: int, strides: tuple[int, ...]) -> None:
    spec = model.spec
    taps = model.feature_taps()
    names = set(taps)
    assert {f"stride{s}" for s in strides} <= names
    assert "last_conv" in names and "stem" in names
    assert {f"block{i}" for i in range(1, len(spec.blocks) + 1)} <= names
    cin = spec.block_inputs()
    for i, block in enumerate(spec.blocks, start=1):
        assert (f"block{i}.expansion" in names) == (block.expansion != cin[i - 1])
        assert taps[f"block{i}"].channels == block.out
    assert taps["last_conv"].channels == spec.head.last_conv
    assert max(t.stride for t in taps.values()) == max(strides)

    x = image(1, res)
    with torch.no_grad():
        out = model.forward_taps(x, list(taps))
        feats = model.forward_features(x)
    assert list(out) == list(taps)
    for name, tensor in out.items():
        tap = taps[name]
        size = math.ceil(res / tap.stride)
        assert tensor.shape == (1, tap.channels, size, size), name
    torch.testing.assert_close(out["last_conv"], feats)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("name", list(mnv3.PRESETS))
def test_feature_taps(name, padding):
    model = make(name, padding=padding)
    _check_taps(model, RES, (2, 4, 8, 16, 32))
    taps = model.feature_taps()
    if name.startswith("mobilenet_v3_large"):
        assert taps["stride16"].channels == 112 and taps["stride32"].channels == 160
        assert taps["block13.expansion"].channels == 672 and taps["block13.expansion"].stride == 16
        assert taps["stride2"].channels == 16 and taps["stride8"].channels == 40


def test_forward_taps_subset_matches_full_run():
    model = make("mobilenet_v3_large")
    x = image()
    with torch.no_grad():
        full = model.forward_taps(x, list(model.feature_taps()))
        few = model.forward_taps(x, ["block13.expansion", "stride8", "stem"])
        assert list(few) == ["block13.expansion", "stride8", "stem"]
        for name, tensor in few.items():
            torch.testing.assert_close(tensor, full[name])
        torch.testing.assert_close(full["stride32"], full["block15"])
        torch.testing.assert_close(full["stride16"], full["block12"])
        torch.testing.assert_close(full["stride2"], full["block1"])
        # The expansion tap is the input of the depthwise conv of that block.
        torch.testing.assert_close(model.blocks[12].expand(full["block12"]), full["block13.expansion"])
    with pytest.raises(KeyError, match="block1.expansion"):
        model.forward_taps(x, ["block1.expansion"])
    with pytest.raises(KeyError):
        model.forward_taps(x, ["stride64"])


def test_small_taps():
    model = make("mobilenet_v3_small")
    taps = model.feature_taps()
    assert "block1.expansion" not in taps
    assert taps["stride2"].channels == 16 and taps["stride2"].stride == 2  # the stem
    assert taps["stride4"].channels == 16 and taps["stride32"].channels == 96


@pytest.mark.parametrize("os_", [16, 8])
@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"])
def test_output_stride_forward(name, os_):
    spec = with_output_stride(mnv3.preset(name, 1.0, RES), os_)
    torch.manual_seed(0)
    model = randomize(mnv3.build(spec))
    with torch.no_grad():
        feats = model.forward_features(image(1))
        assert model(image(1)).shape == (1, 1000)
    assert feats.shape[-2:] == (RES // os_, RES // os_)
    dilations = {m.dilation for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert (2, 2) in dilations
    if os_ == 8:
        assert (4, 4) in dilations
    _check_taps(model, RES, tuple(s for s in (2, 4, 8, 16) if s <= os_))
    assert f"stride{os_ * 2}" not in model.feature_taps()


def test_dilation_preserves_weights_and_changes_output():
    base = make("mobilenet_v3_large")
    os16 = mnv3.build(with_output_stride(base.spec, 16)).eval()
    os16.load_state_dict(base.state_dict())
    x = image()
    with torch.no_grad():
        a, b = base(x), os16(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-3)


def test_reduced_tail_module():
    spec = reduced_tail(mnv3.preset("mobilenet_v3_large", 1.0, RES))
    model = randomize(mnv3.build(spec))
    taps = model.feature_taps()
    assert taps["block13.expansion"].channels == 672 and taps["block13.expansion"].stride == 16
    assert taps["last_conv"].channels == 480 and taps["stride32"].channels == 80
    with torch.no_grad():
        out = model.forward_taps(image(1), ["block13.expansion", "last_conv"])
    assert out["block13.expansion"].shape == (1, 672, 4, 4)
    assert out["last_conv"].shape == (1, 480, 2, 2)


# -- batch-norm folding, memory format, padding ---------------------------------------------------

@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("name", list(mnv3.PRESETS))
def test_fuse_matches_unfused(name, padding):
    model = make(name, padding=padding)
    x = image()
    with torch.no_grad():
        expected = model(x)
        plain = mnv3.build(model.spec).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        for m in plain.modules():  # default batch-norm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.reset_parameters()
        assert not torch.allclose(plain(x), expected, atol=1e-3), "random BN stats had no effect"
        fused = copy.deepcopy(model).train().fuse()
        assert fused.fused and not fused.training
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        assert fused.stem.conv.bias is not None
        got = fused(x)
        again = fused.fuse()(x)  # fusing twice is harmless
    assert_nontrivial(expected)
    # float32 rounding alone reaches ~9e-6 of the output scale here (mnasnet_a1, same padding);
    # a wrong eps or a missed batch norm is off by >1e-3.
    assert_close_scaled(got, expected, 2e-5)
    assert_close_scaled(again, expected, 2e-5)


def test_fuse_dilated_and_taps():
    spec = with_output_stride(mnv3.preset("mobilenet_v3_large", 1.0, RES), 16)
    model = randomize(mnv3.build(spec))
    x = image()
    names = ["stride8", "block13.expansion", "last_conv"]
    with torch.no_grad():
        expected = model.forward_taps(x, names)
        got = copy.deepcopy(model).fuse().forward_taps(x, names)
    for name in names:
        assert_nontrivial(expected[name].flatten(1))
        assert_close_scaled(got[name], expected[name], 2e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small_minimal", "mnasnet_a1"])
def test_channels_last_matches_contiguous(name):
    model = make(name)
    x = image()
    with torch.no_grad():
        expected = model(x)
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        assert cl_model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
        got = cl_model(x.contiguous(memory_format=torch.channels_last))
        got_feats = cl_model.forward_features(x.contiguous(memory_format=torch.channels_last))
        feats = model.forward_features(x)
    assert_nontrivial(expected)
    assert_close_scaled(got, expected, 1e-5)
    assert_close_scaled(got_feats, feats, 1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_same_padding_changes_output_not_shape(name):
    sym = make(name)
    same = mnv3.build(sym.spec.replace(padding="same")).eval()
    same.load_state_dict(sym.state_dict())
    x = image()
    with torch.no_grad():
        a, b = sym(x), same(x)
        fa, fb = sym.forward_features(x), same.forward_features(x)
    assert a.shape == b.shape and fa.shape == fb.shape
    assert_nontrivial(a)
    assert (a - b).abs().max() > 1e-2 * a.abs().max()


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_same_padding_is_symmetric_on_odd_sizes(name):
    # At 65 px every strided conv sees an odd size (65, 33, 17, 9, 5), where TF SAME pads
    # symmetrically: the two paddings must then agree exactly.
    sym = make(name, res=65)
    same = mnv3.build(sym.spec.replace(padding="same")).eval()
    same.load_state_dict(sym.state_dict())
    x = image(2, 65)
    with torch.no_grad():
        a, b = sym(x), same(x)
    assert_nontrivial(a)
    assert_close_scaled(b, a, 1e-6)


def test_same_padding_is_tensorflow_same():
    assert same_padding(64, 3, 2, 1) == (0, 1)
    assert same_padding(65, 3, 2, 1) == (1, 1)
    assert same_padding(64, 5, 2, 1) == (1, 2)
    assert same_padding(7, 5, 2, 1) == (2, 2)
    assert same_padding(8, 3, 1, 1) == (1, 1)
    # A stride-2 3x3 conv with TF SAME padding equals the conv on the input padded (0, 1).
    torch.manual_seed(0)
    layer = mnv3.nn.layers.ConvBNAct(3, 4, 3, 2, same=True).eval()
    x = torch.randn(1, 3, 8, 8)
    ref = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), layer.conv.weight, stride=2)
    with torch.no_grad():
        torch.testing.assert_close(layer.conv(nn.functional.pad(x, (0, 1, 0, 1))), ref)
        torch.testing.assert_close(layer(x), layer.bn(ref))


# -- export ---------------------------------------------------------------------------------------

def test_torch_export_matches_eager():
    model = make("mobilenet_v3_large", padding="same")
    x = image()
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    got = exported.module()(x)
    assert_nontrivial(expected)
    assert_close_scaled(got, expected, 1e-5)


def test_torch_compile_matches_eager():
    model = make("mobilenet_v3_small", res=32)
    x = image(2, 32)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model)(x)
    assert_nontrivial(expected)
    assert_close_scaled(got, expected, 1e-4)


def _onnx_model(kind: str) -> mnv3.MobileNet:
    if kind == "large":
        return make("mobilenet_v3_large")
    if kind == "small":
        return make("mobilenet_v3_small")
    if kind == "small-same":
        return make("tf_mobilenetv3_small_100")
    if kind == "large-fused":
        return make("mobilenet_v3_large", seed=3).fuse()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["large", "small", "small-same", "large-fused"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, kind):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _onnx_model(kind)
    x = image()
    with torch.no_grad():
        expected = model(x)
    assert_nontrivial(expected)
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    assert path.is_file() and path.stat().st_size > 100_000
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (got,) = session.run(None, {inp.name: x.numpy()})
    assert got.shape == (2, 1000)
    assert_close_scaled(torch.from_numpy(got), expected, 1e-4)


def test_fuse_keeps_float64_precision():
    from mnv3.nn.layers import ConvBNAct

    layer = randomize_bn_only(ConvBNAct(8, 8, 3, act="hswish").double())
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    before = layer(x)
    layer.fuse()
    assert layer.conv.weight.dtype == torch.float64
    torch.testing.assert_close(layer(x), before, atol=1e-10, rtol=1e-10)


def randomize_bn_only(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        bn = layer.bn
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return layer.eval()
