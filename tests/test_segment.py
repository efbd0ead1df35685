"""Segmentation (issue 13): the LR-ASPP head as data and as a module, the backbone transforms it
needs, its counts against the paper's Table 7, torchvision's weights, model files and `mnv3 info`."""

from __future__ import annotations

import json

import pytest
import torch

import mnv3
from mnv3.arch import SpecError, halve_last_stage, reduced_tail, with_output_stride
from mnv3.cli import main
from mnv3.complexity import count
from mnv3.heads import DenseHead, lraspp, parse_resolution, pool_window, segment_backbone
from mnv3.nn import build
from mnv3.nn.lraspp import Segmenter, build_segmenter
from mnv3.nn.profile import module_cost
from mnv3.presets import resolve_arch


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def segmenter(kind: str = "lraspp", arch: str = "mobilenet_v3_small", width: float = 0.35,
              size: tuple[int, int] = (64, 96), classes: int = 5) -> Segmenter:
    spec = segment_backbone(resolve_arch(arch, width), kind, size)
    return build_segmenter(spec, lraspp(kind, classes, size)).eval()


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# -- the head's description -------------------------------------------------------------------------
def test_head_json_round_trip_and_validation():
    head = lraspp("lraspp", 11, (360, 480))
    assert DenseHead.from_json(head.to_json()) == head
    assert hash(DenseHead.from_json(head.to_json())) == hash(head)
    assert head.taps == ("last_conv", "stride8.depthwise") and head.pool["kernel"] == (49, 49)
    assert lraspp("lraspp-torchvision", 21, (520, 520)).pool is None
    for bad, field in (({"kind": "aspp"}, "head.kind"), ({"num_classes": 0}, "head.num_classes"),
                       ({"taps": ["last_conv"]}, "head.taps"), ({"resolution": [8, 480]}, "head.resolution"),
                       ({"gate": "tanh"}, "head.gate"), ({"pool": {"kernel": [49, 49]}}, "head.pool"),
                       ({"colour": 1}, "unknown field")):
        with pytest.raises(SpecError, match=field):
            DenseHead.from_dict({**head.to_dict(), **bad})
    with pytest.raises(SpecError, match="unknown segmentation head"):
        lraspp("deeplab", 3, (64, 64))
    assert parse_resolution("360x480") == (360, 480) and parse_resolution("224") == 224
    with pytest.raises(SpecError, match="HxW"):
        parse_resolution("360by480")


def test_pool_window_scales_with_the_feature_map():
    head = lraspp("lraspp", 19, (1024, 2048))
    assert pool_window(head, (64, 128)) == ((49, 49), (16, 20))          # the paper's, at 1024x2048
    assert pool_window(head, (32, 64)) == ((25, 25), (8, 10))
    for size in ((64, 128), (32, 64), (23, 30), (45, 60), (4, 6)):      # always a 1 x 4 grid of regions
        (kh, kw), (sh, sw) = pool_window(head, size)
        assert (size[0] - kh) // sh + 1 == 1 and (size[1] - kw) // sw + 1 == 4, size
    assert pool_window(head, (1, 1)) == ((1, 1), (1, 1))                 # one pixel: global pooling
    (kh, kw), _ = pool_window(head, (2, 3))
    assert 1 <= kh <= 2 and 1 <= kw <= 3                                 # never larger than the map
    assert pool_window(lraspp("lraspp-torchvision", 19, (64, 64)), (4, 4)) is None


# -- backbone transforms -----------------------------------------------------------------------------
def test_rf2_halves_the_last_stage_as_deeplab_does():
    large = resolve_arch("mobilenet_v3_large")
    rf2 = halve_last_stage(large)
    assert [(b.expansion, b.out, b.se) for b in rf2.blocks[12:]] == [(336, 80, 88), (480, 80, 120), (480, 80, 120)]
    assert rf2.head.last_conv == 480 and rf2.blocks[:12] == large.blocks[:12]
    assert reduced_tail(large).blocks[12].expansion == 672                # detection keeps C4's expansion
    small = halve_last_stage(resolve_arch("mobilenet_v3_small"))
    assert [(b.expansion, b.out) for b in small.blocks[8:]] == [(144, 48), (288, 48), (288, 48)]
    assert small.head.last_conv == 288


def test_output_stride_conventions():
    large = resolve_arch("mobilenet_v3_large")
    tf = with_output_stride(large, 16)
    tv = with_output_stride(large, 16, "torchvision")
    assert [(b.stride, b.dilation) for b in tf.blocks[12:]] == [(1, 1), (1, 2), (1, 2)]
    assert [(b.stride, b.dilation) for b in tv.blocks[12:]] == [(1, 2), (1, 2), (1, 2)]
    with pytest.raises(SpecError, match="convention"):
        with_output_stride(large, 16, "caffe")


# -- the module -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lraspp", "lraspp-torchvision"])
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (49, 75), (32, 32)])
def test_logits_at_the_input_size_for_any_shape(kind, size):
    model = segmenter(kind, size=(64, 96))
    assert model.strides == (16, 8)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size) and torch.isfinite(out).all()


def test_depthwise_tap_is_the_depthwise_output_before_se():
    net = build(resolve_arch("mobilenet_v3_large", 0.35), 0).eval()
    randomize_batchnorm(net)
    taps = net.feature_taps()
    assert taps["stride8.depthwise"].channels == net.spec.blocks[5].expansion      # block 6 in Large
    assert taps["stride8.first"].channels == net.spec.blocks[3].out               # block 4 (torchvision's)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = net.forward_taps(x, ["block6.depthwise", "block6", "stride8.first"])
        y = net.blocks[:5](net.stem(x))
        block = net.blocks[5]
        expected_dw = block.dw(block.expand(y))
        assert torch.allclose(got["block6.depthwise"], expected_dw, atol=1e-6)
        assert torch.allclose(got["block6"], block(y.clone()), atol=1e-6)   # the tap left the block output intact
        assert torch.allclose(got["stride8.first"], net.blocks[:4](net.stem(x)), atol=1e-6)


def test_paper_gate_pools_a_window_and_torchvision_pools_globally():
    paper, tv = segmenter("lraspp", size=(64, 128)), segmenter("lraspp-torchvision", size=(64, 128))
    high = torch.randn(1, paper.classifier.scale[1].in_channels, 8, 16)
    assert paper.classifier.gate_input(high).shape[-2:] == (1, 4)
    high = torch.randn(1, tv.classifier.scale[1].in_channels, 8, 16)
    assert torch.allclose(tv.classifier.gate_input(high), high.mean((2, 3), keepdim=True))
    assert paper.classifier.scale[1].bias is not None and tv.classifier.scale[1].bias is None


def test_unknown_tap_is_one_clear_error():
    spec = segment_backbone(resolve_arch("mobilenet_v3_small", 0.35), "lraspp", (64, 64))
    head = lraspp("lraspp", 3, (64, 64)).replace(taps=("last_conv", "block99"))
    with pytest.raises(SpecError, match="no feature tap"):
        build_segmenter(spec, head)


# -- counts against the paper's Table 7 ---------------------------------------------------------------
@pytest.mark.parametrize("arch,params,macs", [("mobilenet_v3_large", 1.51e6, 9.74e9),
                                              ("mobilenet_v3_small", 0.47e6, 2.90e9)])
def test_counts_against_table_7(arch, params, macs):
    spec = segment_backbone(resolve_arch(arch), "lraspp", (1024, 2048))
    head = lraspp("lraspp", 19, (1024, 2048))
    p, m, _ = module_cost(lambda: build_segmenter(spec, head), (1024, 2048))
    assert abs(p - params) / params < 0.005          # parameters: as the paper, to its rounding
    assert 0.90 < m / macs < 1.0                     # MACs: 3.8% (Large) and 5.9% (Small) below, see README


def test_module_count_equals_the_spec_count_for_classifiers():
    for arch in ("mobilenet_v3_large", "mobilenet_v3_small", "mnasnet_a1"):
        spec = resolve_arch(arch)
        p, m, _ = module_cost(lambda s=spec: build(s, 1000), (224, 224))
        assert (p, m) == (count(spec).params, count(spec).macs), arch


# -- torchvision's weights ----------------------------------------------------------------------------
def test_torchvision_lraspp_weights_give_equal_outputs(tmp_path):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    theirs = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).eval()
    randomize_batchnorm(theirs)
    torch.save(theirs.state_dict(), tmp_path / "lraspp.pth")
    ours = mnv3.load(tmp_path / "lraspp.pth")
    assert isinstance(ours, Segmenter) and ours.head_spec.kind == "lraspp-torchvision"
    assert ours.meta.class_names[15] == "person"
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = theirs(x)["out"]
        assert (ours(x) - expected).abs().max() < 1e-4
        mnv3.save(ours, tmp_path / "seg.safetensors")            # a model file keeps head and weights
        again = mnv3.load(tmp_path / "seg.safetensors")
        assert isinstance(again, Segmenter) and again.head_spec == ours.head_spec
        assert (again(x) - expected).abs().max() < 1e-4
    state = theirs.state_dict()
    del state["classifier.low_classifier.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(mnv3.WeightsError, match="low_classifier"):
        mnv3.load(tmp_path / "broken.pth")


def test_model_file_of_a_segmenter_and_a_mismatched_head(tmp_path):
    model = segmenter("lraspp", classes=3)
    path = mnv3.save(model, tmp_path / "seg.safetensors")
    loaded = mnv3.load(path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    other = segmenter("lraspp-torchvision", classes=3)
    with pytest.raises(mnv3.WeightsError, match="do not fit this network"):
        from mnv3.weights.model_file import load_weights

        load_weights(other, dict(loaded.state_dict()), "seg.safetensors")


# -- mnv3 info ----------------------------------------------------------------------------------------
def test_info_segment_prints_params_and_macs(capsys, tmp_path):
    code, out, err = run(capsys, "info", "mobilenet_v3_large", "--task", "segment", "--head", "lraspp",
                         "--classes", "19", "--resolution", "1024x2048", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["params"] == 1507198 and doc["resolution"] == [1024, 2048] and doc["head"] == "lraspp"
    assert "block15" in err and "head.cbr" in err and "9.37B MACs" in err
    model = segmenter("lraspp-torchvision", classes=4, size=(96, 128))
    path = mnv3.save(model, tmp_path / "seg.safetensors")
    code, out, err = run(capsys, "info", path, "--json")             # a model file needs no flags
    assert code == 0, err
    doc = json.loads(out)
    assert doc["task"] == "segment" and doc["num_classes"] == 4 and doc["resolution"] == [96, 128]
    assert doc["params"] == sum(p.numel() for p in model.parameters())
    code, out, err = run(capsys, "info", "mobilenet_v3_small", "--resolution", "96x128")
    assert code == 2 and "square" in err and "--task segment" in err and "Traceback" not in err
