"""ArchSpec as data: JSON round trips, files, validation messages and the spec transforms."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mnv3
from mnv3 import ArchSpec, BlockSpec, HeadSpec, SpecError, StemSpec, reduced_tail, with_output_stride
from mnv3.arch import SPEC_FORMAT, make_divisible

WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.25)
RESOLUTIONS = (224, 160, 96)


def _variants():
    """(id, spec) for every preset x width x resolution, plus the transformed specs."""
    for name in mnv3.PRESETS:
        for width in WIDTHS:
            for res in RESOLUTIONS:
                spec = mnv3.preset(name, width, res)
                yield f"{name}-{width}-{res}", spec
            spec = mnv3.preset(name, width)
            yield f"{name}-{width}-reduced", reduced_tail(spec)
            for os_ in (16, 8):
                yield f"{name}-{width}-os{os_}", with_output_stride(spec, os_)
            yield f"{name}-{width}-reduced-os16", with_output_stride(reduced_tail(spec), 16)
        yield f"{name}-same", mnv3.preset(name).replace(padding="same", bn_eps=1e-5)


VARIANTS = list(_variants())


@pytest.fixture
def large() -> ArchSpec:
    return mnv3.preset("mobilenet_v3_large")


def _with_block(spec: ArchSpec, index: int, **changes) -> ArchSpec:
    """`spec` with block `index` (1-based) changed, not validated."""
    blocks = list(spec.blocks)
    blocks[index - 1] = dataclasses.replace(blocks[index - 1], **changes)
    return dataclasses.replace(spec, blocks=tuple(blocks))


# -- JSON round trip ---------------------------------------------------------------------------

def test_variants_cover_every_preset_and_transform():
    names = {spec.name for _, spec in VARIANTS}
    assert any(n.endswith("_reduced_tail") for n in names)
    assert any("_os16" in n for n in names) and any("_os8" in n for n in names)
    # Several widths really give different networks.
    assert len({spec.blocks for _, spec in VARIANTS}) > 6 * len(WIDTHS)


@pytest.mark.parametrize("spec", [s for _, s in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_json_round_trip_is_lossless(spec: ArchSpec):
    text = spec.to_json()
    back = ArchSpec.from_json(text)
    assert back == spec
    assert hash(back) == hash(spec)
    assert back.to_json() == text
    assert isinstance(back.blocks, tuple) and all(isinstance(b, BlockSpec) for b in back.blocks)
    assert isinstance(back.stem, StemSpec) and isinstance(back.head, HeadSpec)
    # Compact JSON too, and the dict form.
    assert ArchSpec.from_json(spec.to_json(indent=None)) == spec
    assert ArchSpec.from_dict(json.loads(text)) == spec
    data = json.loads(text)
    assert data["format"] == SPEC_FORMAT
    assert len(data["blocks"]) == len(spec.blocks)


@pytest.mark.parametrize("index", [0, 7, 24, 40, len(VARIANTS) - 1])
def test_save_load_round_trip(tmp_path, index):
    _, spec = VARIANTS[index]
    path = spec.save(tmp_path / "sub" / "spec.json")
    assert path.is_file()
    assert ArchSpec.load(path) == spec
    assert ArchSpec.load(str(path)) == spec
    # No temporary files left behind by the atomic write.
    assert [p.name for p in path.parent.iterdir()] == ["spec.json"]


def test_load_missing_file_raises_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        ArchSpec.load(tmp_path / "nope.json")


def test_load_bad_file_names_the_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(SpecError) as info:
        ArchSpec.load(path)
    assert str(path) in str(info.value)
    assert "parse" in str(info.value)


def test_lists_become_tuples_and_spec_is_hashable(large):
    spec = ArchSpec(name="x", stem=large.stem, blocks=list(large.blocks), head=large.head)
    assert isinstance(spec.blocks, tuple)
    assert spec == large.replace(name="x")
    assert len({spec, large.replace(name="x")}) == 1


def test_replace_validates(large):
    assert large.replace(resolution=192).resolution == 192
    with pytest.raises(SpecError, match="padding"):
        large.replace(padding="valid")
    with pytest.raises(SpecError, match="se_gate"):
        large.replace(se_gate="tanh")


# -- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("index, changes, needles", [
    (3, {"kernel": 4}, ["block 3", "kernel", "odd"]),
    (2, {"stride": 3}, ["block 2", "stride", "1 or 2"]),
    (5, {"out": 0}, ["block 5", "out", "at least 1"]),
    (7, {"expansion": -8}, ["block 7", "expansion"]),
    (4, {"activation": "gelu"}, ["block 4", "activation", "gelu"]),
    (2, {"dilation": 2}, ["block 2", "dilation", "strided"]),
    (6, {"se": 0}, ["block 6", "se"]),
    (1, {"kernel": True}, ["block 1", "kernel"]),
])
def test_block_validation_names_block_and_field(large, index, changes, needles):
    bad = _with_block(large, index, **changes)
    with pytest.raises(SpecError) as info:
        bad.validate()
    for needle in needles:
        assert needle in str(info.value)
    # spec.replace validates as well.
    with pytest.raises(SpecError):
        large.replace(blocks=bad.blocks)


def test_dilation_on_stride_one_block_is_valid(large):
    assert _with_block(large, 15, dilation=2).validate().blocks[14].dilation == 2


@pytest.mark.parametrize("changes, needles", [
    ({"stem": StemSpec(out=16, kernel=2)}, ["stem.kernel", "odd"]),
    ({"stem": StemSpec(out=16, stride=4)}, ["stem.stride"]),
    ({"stem": StemSpec(out=16, activation="swish")}, ["stem.activation", "swish"]),
    ({"head": HeadSpec(last_conv=0, pre_logits=1280)}, ["head.last_conv"]),
    ({"head": HeadSpec(last_conv=960, pre_logits=0)}, ["head.pre_logits"]),
    ({"head": HeadSpec(last_conv=960, pre_logits=1280, dropout=1.0)}, ["head.dropout"]),
    ({"head": HeadSpec(last_conv=960, pre_logits=1280, activation="elu")}, ["head.activation"]),
    ({"resolution": 16}, ["resolution", "16", "32"]),
    ({"resolution": 0}, ["resolution"]),
    ({"in_channels": 0}, ["in_channels"]),
    ({"name": ""}, ["name"]),
    ({"bn_eps": 0.0}, ["bn_eps"]),
    ({"bn_momentum": 0.0}, ["bn_momentum"]),
    ({"blocks": ()}, ["blocks"]),
])
def test_spec_validation_names_field(large, changes, needles):
    with pytest.raises(SpecError) as info:
        dataclasses.replace(large, **changes).validate()
    for needle in needles:
        assert needle in str(info.value)


def test_constructed_spec_validates():
    spec = ArchSpec(
        name="tiny", stem=StemSpec(out=8),
        blocks=(BlockSpec(kernel=3, expansion=8, out=8, se=None, activation="relu", stride=2),
                BlockSpec(kernel=5, expansion=32, out=16, se=8, activation="hswish", stride=1)),
        head=HeadSpec(last_conv=32, pre_logits=None), resolution=4)
    assert spec.validate() is spec
    assert spec.total_stride() == 4
    assert spec.block_inputs() == [8, 8]
    assert spec.feature_channels() == 32
    with pytest.raises(SpecError, match="resolution: 2 is too small"):
        dataclasses.replace(spec, resolution=2).validate()
    bad_block = dataclasses.replace(spec.blocks[1], kernel=6)
    with pytest.raises(SpecError, match=r"block 2\.kernel"):
        ArchSpec(name="tiny", stem=spec.stem, blocks=(spec.blocks[0], bad_block), head=spec.head,
                 resolution=4).validate()
    with pytest.raises(SpecError, match="block 1: expected a BlockSpec"):
        ArchSpec(name="tiny", stem=spec.stem, blocks=({"kernel": 3},), head=spec.head).validate()


# -- JSON errors -------------------------------------------------------------------------------

def _data(spec: ArchSpec) -> dict:
    return json.loads(spec.to_json())


def test_unknown_field_in_block(large):
    data = _data(large)
    data["blocks"][2]["groups"] = 4
    with pytest.raises(SpecError) as info:
        ArchSpec.from_dict(data)
    msg = str(info.value)
    assert "block 3" in msg and "groups" in msg and "unknown" in msg


@pytest.mark.parametrize("part", ["stem", "head"])
def test_unknown_field_in_stem_or_head(large, part):
    data = _data(large)
    data[part]["colour"] = "red"
    with pytest.raises(SpecError, match=rf"{part}: unknown field.*colour"):
        ArchSpec.from_dict(data)


def test_unknown_top_level_field(large):
    data = _data(large)
    data["width"] = 1.0
    with pytest.raises(SpecError, match=r"unknown field.*width"):
        ArchSpec.from_dict(data)


def test_missing_field_in_block(large):
    data = _data(large)
    del data["blocks"][4]["kernel"]
    with pytest.raises(SpecError) as info:
        ArchSpec.from_dict(data)
    msg = str(info.value)
    assert "block 5" in msg and "kernel" in msg and "missing" in msg


def test_optional_block_field_may_be_missing(large):
    data = _data(large)
    del data["blocks"][4]["dilation"]
    assert ArchSpec.from_dict(data) == large


@pytest.mark.parametrize("part", ["stem", "head", "blocks", "name"])
def test_missing_top_level_part(large, part):
    data = _data(large)
    del data[part]
    with pytest.raises(SpecError) as info:
        ArchSpec.from_dict(data)
    assert part in str(info.value) and "missing" in str(info.value)


def test_missing_head_field(large):
    data = _data(large)
    del data["head"]["last_conv"]
    with pytest.raises(SpecError, match=r"head: missing field.*last_conv"):
        ArchSpec.from_dict(data)


def test_json_values_are_validated(large):
    data = _data(large)
    data["blocks"][8]["kernel"] = 2
    with pytest.raises(SpecError, match=r"block 9\.kernel"):
        ArchSpec.from_dict(data)
    data = _data(large)
    data["blocks"][0]["out"] = "16"
    with pytest.raises(SpecError, match=r"block 1\.out: expected an integer"):
        ArchSpec.from_dict(data)


@pytest.mark.parametrize("text", ["", "{", "[1, 2", "not json", "{'format': 1}"])
def test_bad_json_text(text):
    with pytest.raises(SpecError, match="does not parse"):
        ArchSpec.from_json(text)


@pytest.mark.parametrize("text, where", [
    ("[]", "spec"), ("3", "spec"), ('"x"', "spec"),
])
def test_json_that_is_not_an_object(text, where):
    with pytest.raises(SpecError, match=where):
        ArchSpec.from_json(text)


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.update(stem=[16, 3]), "stem"),
    (lambda d: d.update(head=None), "head"),
    (lambda d: d.update(blocks={"kernel": 3}), "blocks"),
    (lambda d: d["blocks"].__setitem__(3, [3, 72, 40]), "block 4"),
])
def test_wrong_json_types(large, mutate, where):
    data = _data(large)
    mutate(data)
    with pytest.raises(SpecError, match=where):
        ArchSpec.from_dict(data)


@pytest.mark.parametrize("fmt", ["mnv3.arch/2", "timm", 1, None])
def test_wrong_format(large, fmt):
    data = _data(large)
    data["format"] = fmt
    with pytest.raises(SpecError, match="format"):
        ArchSpec.from_json(json.dumps(data))


def test_format_may_be_omitted(large):
    data = _data(large)
    del data["format"]
    assert ArchSpec.from_dict(data) == large


# -- make_divisible ----------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (16 * 0.35, 8), (16 * 0.75, 16), (24 * 0.75, 24), (40 * 0.75, 32), (72 * 0.75, 56),
    (120 / 4, 32), (672 / 4, 168), (960 / 4, 240), (88 * 1.25, 112), (1280 * 1.25, 1600), (3, 8),
    (27, 32), (17, 16), (19, 24),
])
def test_make_divisible(value, expected):
    assert make_divisible(value) == expected
    assert make_divisible(value) % 8 == 0
    assert make_divisible(value) >= 0.9 * value


# -- transforms --------------------------------------------------------------------------------

def test_reduced_tail_of_large(large):
    spec = reduced_tail(large)
    assert spec.name == "mobilenet_v3_large_100_reduced_tail"
    assert spec.blocks[:12] == large.blocks[:12]
    b13, b14, b15 = spec.blocks[12:]
    assert (b13.out, b14.out, b15.out) == (80, 80, 80)
    assert b13.expansion == 672 and b13.se == 168  # C4 tap keeps its width
    assert (b14.expansion, b15.expansion) == (480, 480)
    assert (b14.se, b15.se) == (120, 120)
    assert spec.head.last_conv == 480
    assert spec.head.pre_logits == 1280
    assert [b.kernel for b in spec.blocks] == [b.kernel for b in large.blocks]
    assert [b.stride for b in spec.blocks] == [b.stride for b in large.blocks]


def test_reduced_tail_of_small():
    small = mnv3.preset("mobilenet_v3_small")
    spec = reduced_tail(small)
    assert spec.blocks[:8] == small.blocks[:8]
    assert [b.out for b in spec.blocks[8:]] == [48, 48, 48]
    assert [b.expansion for b in spec.blocks[8:]] == [288, 288, 288]
    assert spec.head.last_conv == 288


@pytest.mark.parametrize("os_, strides, dilations", [
    (32, [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1], [1] * 15),
    (16, [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 13 + [2, 2]),
    (8, [1, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 7 + [2] * 6 + [4, 4]),
])
def test_output_stride_of_large(large, os_, strides, dilations):
    spec = with_output_stride(large, os_)
    assert spec.total_stride() == os_
    assert [b.stride for b in spec.blocks] == strides
    assert [b.dilation for b in spec.blocks] == dilations
    assert spec.name == ("mobilenet_v3_large_100" if os_ == 32 else f"mobilenet_v3_large_100_os{os_}")
    assert [dataclasses.replace(b, stride=1, dilation=1) for b in spec.blocks] == \
        [dataclasses.replace(b, stride=1, dilation=1) for b in large.blocks]


@pytest.mark.parametrize("name", list(mnv3.PRESETS))
@pytest.mark.parametrize("os_", [16, 8])
def test_output_stride_every_preset(name, os_):
    base = mnv3.preset(name)
    spec = with_output_stride(base, os_)
    assert spec.total_stride() == os_
    assert max(b.dilation for b in spec.blocks) == 32 // os_
    assert all(b.dilation == 1 for b in spec.blocks if b.stride > 1)
    assert spec.head == base.head and spec.stem == base.stem


def test_output_stride_rejects_bad_values_and_dilated_specs(large):
    for bad in (4, 12, 64, "16"):
        with pytest.raises(SpecError, match="output_stride"):
            with_output_stride(large, bad)
    os16 = with_output_stride(large, 16)
    with pytest.raises(SpecError, match="already dilated"):
        with_output_stride(os16, 8)
    with pytest.raises(SpecError, match="already dilated"):
        reduced_tail(os16)


def test_reduced_tail_then_output_stride(large):
    spec = with_output_stride(reduced_tail(large), 16)
    assert spec.total_stride() == 16
    assert [b.out for b in spec.blocks[12:]] == [80, 80, 80]
    assert [b.dilation for b in spec.blocks[12:]] == [1, 2, 2]
    assert spec.head.last_conv == 480


# -- presets -----------------------------------------------------------------------------------

def test_preset_names_and_errors():
    assert mnv3.preset("mobilenet_v3_large").name == "mobilenet_v3_large_100"
    assert mnv3.preset("mobilenet_v3_small", 0.75, 192).name == "mobilenet_v3_small_075_192"
    assert mnv3.preset("mobilenet_v3_large_minimal").name == "mobilenet_v3_large_minimal_100"
    with pytest.raises(SpecError, match="unknown architecture"):
        mnv3.preset("resnet50")
    for bad in (0.0, 5.0, -1, True, "1.0"):
        with pytest.raises(SpecError, match="width"):
            mnv3.preset("mobilenet_v3_large", bad)
    with pytest.raises(SpecError, match="resolution"):
        mnv3.preset("mobilenet_v3_large", 1.0, 16)
    with pytest.raises(SpecError, match="fixes the width"):
        mnv3.preset("tf_mobilenetv3_large_075", 0.5)
    assert mnv3.preset("tf_mobilenetv3_large_075", 0.75).blocks == \
        mnv3.preset("mobilenet_v3_large", 0.75).blocks


def test_peer_names_carry_padding_and_eps():
    tf = mnv3.preset("tf_mobilenetv3_large_100")
    assert tf.padding == "same" and tf.bn_eps == 1e-3
    pt = mnv3.preset("mobilenetv3_large_100")
    assert pt.padding == "symmetric" and pt.bn_eps == 1e-5
    assert tf.blocks == pt.blocks == mnv3.preset("mobilenet_v3_large").blocks
    assert mnv3.preset("semnasnet_100").se_gate == "sigmoid"


def test_resolve_arch(tmp_path, large):
    assert mnv3.resolve_arch("mobilenet_v3_large") == large
    assert mnv3.resolve_arch("mobilenet_v3_small", 0.75, 160) == mnv3.preset("mobilenet_v3_small", 0.75, 160)
    path = reduced_tail(large).save(tmp_path / "rt.json")
    assert mnv3.resolve_arch(str(path)) == reduced_tail(large)
    assert mnv3.resolve_arch(str(path), resolution=320).resolution == 320
    with pytest.raises(SpecError, match="--width"):
        mnv3.resolve_arch(str(path), width=0.5)
    assert mnv3.resolve_arch(large, resolution=192).resolution == 192


def test_float_stride_is_rejected(large):
    data = large.to_dict()
    data["blocks"][0]["stride"] = 2.0
    with pytest.raises(SpecError, match=r"block 1\.stride"):
        ArchSpec.from_dict(data)


@pytest.mark.parametrize("part, field", [("head", "dropout"), (None, "bn_eps"), (None, "bn_momentum")])
def test_non_numeric_values_raise_spec_error(large, part, field):
    data = large.to_dict()
    (data[part] if part else data)[field] = "0.2"
    with pytest.raises(SpecError, match=field):
        ArchSpec.from_dict(data)


@pytest.mark.parametrize("total, stem, first_strided", [(16, 1, 0), (8, 1, 1), (4, 1, 3)])
def test_total_stride_removes_the_earliest_strides(total, stem, first_strided):
    small = mnv3.preset("mobilenet_v3_small", 1.0, 32)
    spec = mnv3.with_total_stride(small, total)
    assert spec.total_stride() == total and spec.stem.stride == stem
    assert spec.name == f"{small.name}_s{total}"
    assert [b.stride for b in spec.blocks][first_strided + 1:] == [b.stride for b in small.blocks][first_strided + 1:]
    assert all(b.dilation == 1 for b in spec.blocks)
    assert mnv3.count(spec, 10).params == mnv3.count(small, 10).params   # strides change no weights
    assert ArchSpec.from_json(spec.to_json()) == spec
    assert mnv3.build(spec, 10)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_total_stride_rejects_bad_values():
    small = mnv3.preset("mobilenet_v3_small")
    assert mnv3.with_total_stride(small, 32) == small
    for bad in (64, 3, 0):
        with pytest.raises(SpecError, match="total_stride"):
            mnv3.with_total_stride(small, bad)
    with pytest.raises(SpecError, match="already dilated"):
        mnv3.with_total_stride(with_output_stride(small, 16), 8)
