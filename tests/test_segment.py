"""Segmentation (issue 13): the LR-ASPP head as data and as a module, the backbone transforms it
needs, its counts against the paper's Table 7, torchvision's weights, model files and `mnv3 info`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mnv3
from mnv3.arch import SpecError, halve_last_stage, reduced_tail, with_output_stride
from mnv3.cli import main
from mnv3.complexity import count
from mnv3.data import DataError
from mnv3.data.masks import SegEvalSet, SegTrainSet, open_masks, read_mask
from mnv3.heads import DenseHead, lraspp, parse_resolution, pool_window, segment_backbone
from mnv3.nn import build
from mnv3.nn.lraspp import Segmenter, build_segmenter
from mnv3.nn.profile import module_cost
from mnv3.presets import resolve_arch
from mnv3.train.recipe import load_recipe
from mnv3.train.segment import SegmentationTask, confusion, scores
from mnv3.weights import Preprocess


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


def test_rf2_stage_inherits_the_largest_filters_of_the_imagenet_backbone():
    """The halved last stage starts from the classifier's weights (the filters of largest L2 norm and
    their matching inputs), not from random ones: the head is then the only new part."""
    from mnv3.train.dense import transfer_backbone

    source = build(resolve_arch("mobilenet_v3_small"), 1000)
    randomize_batchnorm(source, 3)
    model = build_segmenter(segment_backbone(source.spec, "lraspp", (64, 96)), lraspp("lraspp", 5, (64, 96)))
    copied, fresh = transfer_backbone(model, source)
    assert fresh == 0 and copied == len(model.backbone.state_dict())
    ours, theirs = model.backbone.blocks[-1], source.blocks[-1]
    w, v = ours.dw.conv.weight, theirs.dw.conv.weight
    assert w.shape[0] == v.shape[0] // 2
    norms = theirs.expand.conv.weight.flatten(1).pow(2).sum(1)
    kept = torch.topk(norms, w.shape[0]).indices.sort().values
    assert torch.equal(w, v[kept]) and torch.equal(ours.dw.bn.running_var, theirs.dw.bn.running_var[kept])
    assert torch.equal(model.backbone.blocks[0].dw.conv.weight, source.blocks[0].dw.conv.weight)


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


# -- data -------------------------------------------------------------------------------------------
CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="module")
def camvid_tiny(tmp_path_factory) -> Path:
    """A mask-folder data set of 12 + 4 CamVid images (links to ../shared, nothing copied)."""
    root = tmp_path_factory.mktemp("camvid-tiny")
    (root / "classes.txt").write_text((CAMVID / "classes.txt").read_text())
    for split, n in (("train", 12), ("val", 4)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for image in sorted((CAMVID / split / "images").glob("*.jpg"))[:n]:
            (root / split / "images" / image.name).symlink_to(image)
            (root / split / "masks" / f"{image.stem}.png").symlink_to(CAMVID / split / "masks" / f"{image.stem}.png")
    return root


def small_set(root: Path, masks: dict[str, np.ndarray], size=(40, 30), classes=("a", "b", "c")) -> Path:
    """A mask-folder set written by the test: one train and one val pair per entry of `masks`
    (image size `size`, width x height; a mask array may have another size)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    photo = Image.open(min((CAMVID / "val" / "images").glob("*.jpg"))).convert("RGB").resize(size)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for stem, mask in masks.items():
            photo.save(root / split / "images" / f"{stem}.jpg")
            if mask is not None:
                Image.fromarray(mask).save(root / split / "masks" / f"{stem}.png")
    return root


def test_camvid_opens_with_its_void_as_ignore_index(camvid_tiny):
    data = open_masks(CAMVID, ignore_index=11)
    assert (len(data.train), len(data.val), len(data.classes)) == (367, 101, 11)
    with pytest.raises(DataError, match=r"values \[11\].*--ignore-index"):
        open_masks(camvid_tiny)                        # 255 is the default; CamVid's void is 11


def test_joint_transforms_keep_image_and_mask_aligned(camvid_tiny):
    data = open_masks(camvid_tiny, ignore_index=11)
    pre = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    train = SegTrainSet(data.train, pre, (48, 64), 11, scale=(0.5, 2.0), seed=3)
    for i in range(4):
        x, y, err = train[i]
        assert err is None and x.shape == (3, 48, 64) and y.shape == (48, 64) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(range(12))           # classes, void, never a blend
        again, y2, _ = train[i]
        assert torch.equal(x, again) and torch.equal(y, y2)          # a sample's own seed
        padded = (x == 0).all(0)                                     # pixels added by the crop's padding ...
        assert (y[padded] == 11).all() or not padded.any()           # ... are labelled with the ignore index
    # the flip and the scale move image and mask together: a constant-colour region keeps one label
    raw = np.asarray(Image.open(data.train.masks[0]))
    x, y, _ = SegEvalSet(data.train, pre, (raw.shape[0], raw.shape[1]))[0]
    assert torch.equal(y, torch.from_numpy(raw.astype(np.int64)))


def test_bad_masks_are_one_error_naming_the_file(tmp_path):
    ok = np.zeros((30, 40), np.uint8)
    root = small_set(tmp_path / "missing", {"a": ok, "b": None})
    with pytest.raises(DataError, match=r"b\.jpg: no mask; expected .*b\.png"):
        open_masks(root)
    root = small_set(tmp_path / "size", {"a": ok, "b": np.zeros((31, 40), np.uint8)})
    with pytest.raises(DataError, match=r"b\.png: mask is 40x31 but its image b\.jpg is 40x30"):
        open_masks(root)
    root = small_set(tmp_path / "values", {"a": np.full((30, 40), 7, np.uint8)})
    with pytest.raises(DataError, match=r"a\.png: values \[7\] are neither a class \(0-2\)"):
        open_masks(root)
    assert len(open_masks(small_set(tmp_path / "ignored", {"a": np.full((30, 40), 255, np.uint8)})).train) == 1
    root = small_set(tmp_path / "rgb", {"a": ok})
    Image.new("RGB", (40, 30)).save(root / "train" / "masks" / "a.png")
    with pytest.raises(DataError, match="a.png: a RGB image; a mask must be single-channel"):
        open_masks(root)
    with pytest.raises(DataError, match="classes.txt: missing"):
        open_masks(tmp_path / "size" / "train")


def test_voc_layout(tmp_path):
    root = tmp_path / "VOC"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    photo = Image.open(min((CAMVID / "val" / "images").glob("*.jpg"))).convert("RGB").resize((40, 30))
    for stem in ("2007_000001", "2007_000002"):
        photo.save(root / "JPEGImages" / f"{stem}.jpg")
        mask = Image.fromarray(np.where(np.arange(40)[None, :] < 20, 15, 255).repeat(30, 0).astype(np.uint8), "P")
        mask.putpalette([0, 0, 0] * 256)
        mask.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    data = open_masks(root)
    assert data.classes[15] == "person" and len(data.classes) == 21 and len(data.train) == len(data.val) == 1
    assert set(np.unique(read_mask(data.val.masks[0])).tolist()) == {15, 255}


def test_class_id_masks_through_a_class_map(tmp_path):
    coco = CAMVID.parent / "coco128" / "semantic_segmentation"
    data = open_masks(coco)
    assert len(data.classes) == 129 and data.classes[0] == "person" and len(data.train) == 100
    raw = read_mask(data.train.masks[0])
    mapped = data.train.mask(0)
    assert (mapped[raw == 0] == 255).all()                    # unlabeled: the ignore index
    person = raw == 1
    assert (mapped[person] == 0).all() and mapped.max() == 255 and (mapped[mapped != 255] < 129).all()
    # a category id the map does not name is one error naming the mask
    root = tmp_path / "ids"
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    photo = Image.open(min((CAMVID / "val" / "images").glob("*.jpg"))).convert("RGB").resize((40, 30))
    photo.save(root / "img" / "x.jpg")
    Image.fromarray(np.full((30, 40), 12, np.uint8)).save(root / "msk" / "x.png")
    (root / "config.yaml").write_text("train: {images: img, masks: msk}\nval: {images: img, masks: msk}\n"
                                      "classes: {0: unlabeled, 7: train, 9: boat}\n")
    with pytest.raises(DataError, match=r"x\.png: category ids \[12\] are not in the class map"):
        open_masks(root)


# -- metrics ----------------------------------------------------------------------------------------
def test_miou_from_one_confusion_matrix_with_the_ignore_index():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    m = confusion(pred, target, 3, 255)
    assert m.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]          # rows: truth; ignored pixels left out
    s = scores(m, ("a", "b", "c"))
    # IoU a = 1 / (2 + 2 - 1), b = 2 / (2 + 3 - 2), c = 1 / (2 + 1 - 1)
    assert s["per_class"] == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2})
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3) and s["pixel_acc"] == pytest.approx(4 / 6)
    # one matrix over the split, not a mean of per-image scores
    first, second = confusion(pred[:1], target[:1], 3, 255), confusion(pred[1:], target[1:], 3, 255)
    assert torch.equal(first + second, m)
    per_image = (scores(first)["miou"] + scores(second)["miou"]) / 2
    assert per_image != pytest.approx(s["miou"])
    task = SegmentationTask(3, 255)
    logits = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1)[None].float() * 10
    metrics = task.metrics(task.eval_stats(logits, target[None]), "val")
    assert metrics["val_miou"] == pytest.approx(s["miou"])
    assert task.loss(logits, torch.full_like(target[None], 255)).isnan()      # all ignored: no signal
    assert task.loss(logits, target[None]) > 0


def test_class_weights_from_the_training_masks(tmp_path):
    from mnv3.data.masks import MaskSamples
    from mnv3.train.recipe import RecipeError
    from mnv3.train.segment import class_frequencies, class_weights

    masks = []
    for i, rows in enumerate(([[0, 0, 0, 1]], [[0, 2, 9, 9]])):        # 9: the ignore index
        masks.append(tmp_path / f"{i}.png")
        Image.fromarray(np.array(rows, np.uint8)).save(masks[-1])
    freq = class_frequencies(MaskSamples(masks, masks), 4, 9)
    assert freq.tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6, 0])       # class 3 never occurs
    enet = class_weights(freq, "enet")
    assert enet[:3].tolist() == pytest.approx([1 / np.log(1.02 + p) for p in (4 / 6, 1 / 6, 1 / 6)], rel=1e-5)
    assert enet[3] == 0 and class_weights(freq, "none") is None
    assert class_weights(freq, "median").tolist() == pytest.approx([0.25, 1, 1, 0])
    task = SegmentationTask(4, 9, class_weights=enet)
    logits, target = torch.randn(1, 4, 2, 3), torch.tensor([[[0, 1, 2], [0, 9, 0]]])
    picked = torch.log_softmax(logits, 1)[0, target[0].clamp(max=3), torch.arange(2)[:, None], torch.arange(3)]
    w = torch.where(target[0] == 9, 0.0, enet[target[0].clamp(max=3)])
    assert task.loss(logits, target) == pytest.approx(float(-(picked * w).sum() / w.sum()), rel=1e-5)
    with pytest.raises(RecipeError, match="seg_class_weights"):
        load_recipe("segment").override({"seg_class_weights": "inverse"})


def test_poly_schedule():
    r = load_recipe("segment").override({"epochs": "10", "lr": "0.04", "lr_batch": "8", "batch_size": "8"})
    assert r.lr_at(0, 10) == pytest.approx(0.04)
    assert r.lr_at(50, 10) == pytest.approx(0.04 * 0.5 ** 0.9)
    assert r.lr_at(99, 10) < 0.001


# -- training, eval, predict, bench end to end ----------------------------------------------------------
def test_segment_train_resume_eval_predict_bench(camvid_tiny, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    from test_train import kill_in_second_epoch, metrics

    backbone = mnv3.save(build(resolve_arch("mobilenet_v3_small", 0.35), 10), tmp_path / "backbone.safetensors")
    args = ["train", "--task", "segment", "--data", camvid_tiny, "--weights", backbone, "--resolution", "48x64",
            "--ignore-index", "11", "--epochs", "3", "--batch-size", "4", "--lr", "0.05", "--lr-batch", "4",
            "--checkpoint-steps", "1", "--threads", "1", "--no-progress"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "whole", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert 0 <= doc["miou"] <= 1 and "pixel_acc" in doc and "backbone from" in err and "tensors copied" in err
    rows = metrics(tmp_path / "whole")
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])          # it learns
    assert "val_iou_road" in rows[0] and (tmp_path / "whole" / "curves.png").is_file()
    model = mnv3.load(doc["model"])
    assert isinstance(model, Segmenter) and model.head_spec.resolution == (48, 64)
    assert model.meta.class_names[3] == "road" and model.meta.training["ignore_index"] == 11

    # killed mid-run with SIGKILL, resumed from its last checkpoint: the same run
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mnv3", *map(str, args), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_in_second_epoch(proc, killed, lambda p: os.kill(p.pid, signal.SIGKILL))
    assert not (killed / "model.safetensors").exists()
    code, _, err = run(capsys, "train", "--out", killed, "--resume", "--no-progress", "--threads", "1")
    assert code == 0, err
    for a, b in zip(rows, metrics(killed)):
        for key in ("train_loss", "val_loss", "val_miou", "val_pixel_acc"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key

    # eval: the same confusion matrix as the run's last validation
    code, out, err = run(capsys, "eval", "--weights", doc["model"], "--data", camvid_tiny, "--no-progress", "--json")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["miou"] == pytest.approx(doc["miou"], abs=1e-6) and scored["images"] == 4
    assert set(scored["per_class"]) == set(model.meta.class_names) and "mIoU" in err

    # predict: a colour mask and an overlay per image, at the image's own size
    images = sorted((camvid_tiny / "val" / "images").iterdir())[:2]
    code, out, err = run(capsys, "predict", "--weights", doc["model"], *images, "--out", tmp_path / "pred", "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert len(results) == 2 and "written to" in err
    for r, image in zip(results, images):
        with Image.open(r["mask"]) as mask, Image.open(image) as photo, Image.open(r["overlay"]) as overlay:
            assert mask.size == photo.size == overlay.size and mask.mode == "RGB"
        assert sum(r["classes"].values()) == pytest.approx(1.0)

    # bench: the whole model at its resolution on ONNX Runtime
    code, out, err = run(capsys, "bench", doc["model"], "--runtime", "onnxruntime", "--no-progress",
                         "--csv", tmp_path / "bench.csv", "--json")
    assert code == 0, err
    timing = json.loads(out)["results"][0]
    assert timing["arch"].endswith("+lraspp") and timing["median_ms"] > 0
    assert timing["params"] == sum(p.numel() for p in model.parameters())


def test_segment_under_torchrun_with_amp_ema_and_class_weights_matches_one_process(camvid_tiny, tmp_path, capsys):
    """Two processes under torchrun (DDP, synchronised batch norm) with bf16 autocast, an EMA of the
    weights and ENet class weights train the model one process trains; one process reports, and
    `mnv3 eval` of its model file gives the run's mIoU."""
    import os
    import subprocess
    import sys

    from test_train import metrics

    args = ["train", "--task", "segment", "--data", camvid_tiny, "--arch", "mobilenet_v3_small",
            "--width", "0.35", "--resolution", "48x64", "--ignore-index", "11", "--epochs", "2",
            "--batch-size", "4", "--lr", "0.05", "--lr-batch", "4", "--amp", "bf16", "--ema-decay", "0.5",
            "--seg-class-weights", "enet", "--threads", "1", "--no-progress"]
    code, _, err = run(capsys, *args, "--out", tmp_path / "single")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "mnv3", *map(str, args), "--out", str(tmp_path / "ddp"), "--json"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"miou"') == 1 and proc.stderr.count("class weights (enet)") == 1
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_loss", "val_miou"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=5e-2, abs=1e-3), key
    doc = json.loads(proc.stdout)
    code, out, err = run(capsys, "eval", "--weights", doc["model"], "--data", camvid_tiny, "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["miou"] == pytest.approx(doc["miou"], abs=1e-6)


def test_segment_cli_bad_input_is_one_line(camvid_tiny, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--task", "segment", "--data", camvid_tiny, "--out", tmp_path / "r",
                       "--no-progress")
    assert code == 2 and "values [11]" in err and "--ignore-index" in err and "Traceback" not in err
    # a bad recipe flag is named first, before the masks are read (these ones would fail too)
    code, _, err = run(capsys, "train", "--task", "segment", "--data", camvid_tiny, "--out", tmp_path / "r",
                       "--seg-class-weights", "foo", "--no-progress")
    assert code == 2 and "seg_class_weights: expected none, enet or median" in err and "values [11]" not in err
    with pytest.raises(SystemExit) as exit_code:
        run(capsys, "train", "--task", "segment", "--head", "deeplab", "--data", camvid_tiny)
    assert exit_code.value.code == 2 and "invalid choice: 'deeplab'" in capsys.readouterr().err
    code, _, err = run(capsys, "train", "--task", "segment", "--data", tmp_path / "nowhere", "--out", tmp_path / "r")
    assert code == 2 and "no such folder" in err
    model = mnv3.save(segmenter("lraspp", classes=5), tmp_path / "seg5.safetensors")
    code, _, err = run(capsys, "eval", "--weights", model, "--data", camvid_tiny, "--ignore-index", "11",
                       "--no-progress")
    assert code == 2 and "11 classes in classes.txt but the model predicts 5" in err


def test_folded_batchnorm_backbone_gets_statistics_and_keeps_its_function(camvid_tiny, tmp_path):
    """A backbone imported from TFLite carries BN folded into its convolutions (identity BN + bias):
    its statistics are estimated on training images, without changing what the backbone computes;
    the segmenter's new layers keep their own."""
    from mnv3.train.classify import has_folded_batchnorm
    from mnv3.train.segment import prepare_segmenter

    source = build(resolve_arch("mobilenet_v3_small", 0.35), 10).eval()
    g = torch.Generator().manual_seed(1)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1 - m.eps)
            m.weight.data.fill_(1.0)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    assert has_folded_batchnorm(source)
    path = mnv3.save(source, tmp_path / "folded.safetensors")
    data = open_masks(camvid_tiny, ignore_index=11)
    recipe = load_recipe("segment")
    for kind in ("lraspp", "lraspp-torchvision"):
        model, _, note = prepare_segmenter(data, recipe, kind, (48, 64), weights=str(path), progress=False)
        assert "statistics estimated on 12 training images" in note
        stem_bn = model.backbone.stem.bn
        assert not torch.allclose(stem_bn.running_var, torch.full_like(stem_bn.running_var, 1 - stem_bn.eps))
        assert (model.classifier.cbr[1].running_var == 1).all()            # the head's BN: its own
        x = torch.randn(2, 3, 48, 64)
        with torch.no_grad():
            expected = source.eval().stem(x)
            assert torch.allclose(model.backbone.eval().stem(x), expected, atol=1e-4)   # same function
