"""Detection (issue 14): the SSDLite head as data and as a module, its anchors against torchvision's,
torchvision's weights, matching and the SSD loss on hand-made boxes, COCO evaluation against
pycocotools, counts, and the commands end to end on coco128 (the data layer: test_detect_data.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_segment import randomize_batchnorm  # random BN statistics, for the import tests

import mnv3
from mnv3.arch import SpecError, reduced_tail
from mnv3.cli import main
from mnv3.heads import DenseHead, c4_tap, ssdlite
from mnv3.nn.profile import module_cost
from mnv3.nn.ssdlite import Detector, build_detector, decode, default_boxes, encode, feature_grids
from mnv3.presets import resolve_arch
from mnv3.train.detect import Detections, coco_scores, detection_loss, match_anchors

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def small_detector(size=(96, 128), classes=3) -> Detector:
    spec = resolve_arch("mobilenet_v3_small", 0.35).replace(resolution=min(size))
    return build_detector(spec, ssdlite(spec, classes, size)).eval()


# -- the head and the module ----------------------------------------------------------------------------
def test_head_json_round_trip_and_validation():
    spec = mnv3.preset("mobilenet_v3_large")
    head = ssdlite(spec, 80)
    assert head.taps == ("block13.expansion", "last_conv") and head.extras == (512, 256, 256, 128)
    assert DenseHead.from_json(head.to_json()) == head
    assert c4_tap(mnv3.preset("mobilenet_v3_small")) == "block9.expansion"
    with pytest.raises(SpecError, match="head.anchors"):
        head.replace(anchors={"aspect_ratios": [[2, 3]] * 2, "min_ratio": 0.2, "max_ratio": 0.95})
    with pytest.raises(SpecError, match="unknown detect head"):
        head.replace(kind="lraspp")


@pytest.mark.parametrize("size", [(320, 320), (160, 224)])
def test_anchors_equal_torchvision(size):
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    head = ssdlite(mnv3.preset("mobilenet_v3_large"), 80, size)
    grids = feature_grids(head, size)
    generator = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    maps = [torch.zeros(1, 1, h, w) for h, w in grids]
    theirs = generator(ImageList(torch.zeros(1, 3, *size), [size]), maps)[0]
    ours = default_boxes(head, grids, size)
    assert ours.shape == theirs.shape == (sum(h * w for h, w in grids) * 6, 4)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_output_shape_non_square_and_strides():
    model = small_detector((96, 128), classes=3)
    raw = model(torch.randn(2, 3, 96, 128))
    assert raw.shape == (2, len(model.anchors()), 4 + 1 + 3)
    maps = model.features(torch.randn(1, 3, 96, 128))
    assert [tuple(m.shape[-2:]) for m in maps] == feature_grids(model.head_spec, (96, 128))
    assert [tuple(m.shape[-2:]) for m in maps][:2] == [(6, 8), (3, 4)]      # 1/16 and 1/32


def test_encode_decode_round_trip():
    anchors = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 100.0, 100.0]])
    boxes = torch.tensor([[12.0, 8.0, 47.0, 44.0], [20.0, 30.0, 60.0, 90.0]])
    assert torch.allclose(decode(encode(boxes, anchors), anchors), boxes, atol=1e-4)


def test_reduced_tail_count_equals_torchvision():
    """torchvision's ssdlite320_mobilenet_v3_large without backbone weights is built with the reduced
    tail, 91 outputs (90 COCO ids and the background): its parameter count must be ours."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    theirs = sum(p.numel() for p in ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).parameters())
    spec = reduced_tail(mnv3.preset("mobilenet_v3_large")).replace(resolution=320)
    params, _, _ = module_cost(lambda: build_detector(spec, ssdlite(spec, 90)), (320, 320))
    assert params == theirs


def test_info_prints_counts(capsys):
    code, out, _ = run(capsys, "info", "mobilenet_v3_large", "--task", "detect", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["task"] == "detect" and doc["resolution"] == [320, 320]
    assert doc["params"] == 5_031_140 and 0.6e9 < doc["macs"] < 0.7e9
    code, out, _ = run(capsys, "info", "mobilenet_v3_large", "--task", "detect", "--reduced-tail", "--json")
    assert json.loads(out)["params"] < 0.7 * doc["params"]
    code, _, err = run(capsys, "info", "mobilenet_v3_large", "--task", "detect", "--head", "lraspp")
    assert code != 0 and "not a detect head" in err and "Traceback" not in err


# -- torchvision's weights -------------------------------------------------------------------------------
def test_torchvision_import_equal_raw_outputs_and_detections(tmp_path):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    theirs = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    randomize_batchnorm(theirs)
    theirs.eval()
    path = tmp_path / "ssdlite.pth"
    torch.save(theirs.state_dict(), path)
    ours = mnv3.load(path)
    assert isinstance(ours, Detector) and ours.spec.name.endswith("_reduced_tail") and ours.num_classes == 90
    x = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        maps = list(theirs.backbone((x - 0.5) / 0.5).values())
        head = theirs.head(maps)
        raw = ours((x - 0.5) / 0.5)
        their_dets = theirs(list(x))
        our_dets = ours.detect((x - 0.5) / 0.5)
    assert (raw[..., :4] - head["bbox_regression"]).abs().max() < 1e-4
    assert (raw[..., 4:] - head["cls_logits"]).abs().max() < 1e-4
    for a, b in zip(their_dets, our_dets):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        assert (a["boxes"] - b["boxes"]).abs().max() < 1e-3
        assert torch.equal(a["labels"] - 1, b["labels"])
        assert (a["scores"] - b["scores"]).abs().max() < 1e-5
    # the model file keeps backbone, head and classes
    mnv3.save(ours, tmp_path / "det.safetensors")
    again = mnv3.load(tmp_path / "det.safetensors")
    assert isinstance(again, Detector) and again.head_spec == ours.head_spec
    with torch.no_grad():
        assert torch.equal(again((x - 0.5) / 0.5), raw)


# -- matching and the loss ----------------------------------------------------------------------------
def test_matching_threshold_and_forced_best_anchor():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0],      # IoU 0.81 with box 0
                            [1.0, 1.0, 11.0, 11.0],      # IoU 1.0 with box 0
                            [50.0, 50.0, 60.0, 60.0],    # nothing
                            [30.0, 30.0, 50.0, 50.0]])   # IoU 0.25 with box 1: below 0.5, but its best
    boxes = torch.tensor([[1.0, 1.0, 11.0, 11.0], [30.0, 30.0, 40.0, 40.0]])
    assert match_anchors(anchors, boxes).tolist() == [0, 0, -1, 1]
    assert match_anchors(anchors, torch.zeros(0, 4)).tolist() == [-1, -1, -1, -1]


def test_loss_by_hand_with_hard_negatives():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0],
                            [60.0, 60.0, 70.0, 70.0]])
    raw = torch.randn(1, 4, 4 + 3)
    targets = torch.tensor([[[0, 1, 0.0, 0.0, 10.0, 12.0], [0, -1, 0, 0, 0, 0]]])   # one box (class 1), padding
    loss, matched = detection_loss(raw, targets, anchors, neg_pos_ratio=2.0)
    assert matched == 1
    box = F.smooth_l1_loss(raw[0, 0, :4], encode(targets[0, :1, 2:6], anchors[:1])[0], reduction="sum")
    labels = torch.tensor([2, 0, 0, 0])                 # class 1 is column 2 (the background first)
    ce = F.cross_entropy(raw[0, :, 4:], labels, reduction="none")
    hardest = ce[1:].sort(descending=True).values[:2].sum()          # 2 negatives per matched anchor
    assert torch.allclose(loss, box + ce[0] + hardest, atol=1e-5)
    giou, _ = detection_loss(raw, targets, anchors, box_loss="giou")
    assert torch.isfinite(giou)
    empty, matched = detection_loss(raw, torch.tensor([[[0, -1, 0, 0, 0, 0.0]]]), anchors)
    assert matched == 0 and float(empty) == 0.0        # an image without boxes: no matched, no negatives


# -- COCO evaluation ------------------------------------------------------------------------------------
def test_coco_scores_equal_pycocotools_on_files(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    g = torch.Generator().manual_seed(3)
    collected = Detections()
    images, annotations, results = [], [], []
    for image_id in range(6):
        boxes = torch.rand(3, 2, generator=g) * 60
        boxes = torch.cat((boxes, boxes + 10 + torch.rand(3, 2, generator=g) * 30), 1)
        labels = torch.tensor([0, 1, image_id % 2])
        found = {"boxes": boxes + torch.randn(3, 4, generator=g) * 3, "scores": torch.rand(3, generator=g),
                 "labels": torch.tensor([0, image_id % 2, 1])}
        collected.add(image_id, found, boxes, labels)
        images.append({"id": image_id})
        for b, lab in zip(boxes.tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": lab + 1,
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]),
                                "iscrowd": 0})
        for b, s, lab in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": lab + 1, "score": s,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    gt = COCO(str(tmp_path / "gt.json"))
    e = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    ours = coco_scores(collected, ("a", "b", "c"))
    assert ours["map"] == pytest.approx(e.stats[0], abs=1e-9) and ours["map50"] == pytest.approx(e.stats[1], abs=1e-9)
    assert 0 < ours["map"] < 1 and math.isnan(ours["per_class"]["c"])      # no box of class c
    # perfect detections score 1; none score 0
    perfect = Detections()
    for image_id, (boxes, labels) in collected.truth.items():
        perfect.add(image_id, {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}, boxes, labels)
    assert coco_scores(perfect, ("a", "b", "c"))["map"] == pytest.approx(1.0)
    nothing = Detections()
    for image_id, (boxes, labels) in collected.truth.items():
        nothing.add(image_id, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()},
                    boxes, labels)
    assert coco_scores(nothing, ("a", "b", "c"))["map"] == 0.0


# -- end to end on coco128 ------------------------------------------------------------------------------
def test_few_steps_on_coco128_reduce_the_loss():
    from mnv3.data.boxes import DetTrainSet, open_boxes
    from mnv3.data.datasets import collate
    from mnv3.weights import Preprocess

    data = open_boxes(COCO128)
    size = (128, 128)
    model = small_detector(size, classes=len(data.classes)).train()
    items = [DetTrainSet(data.train, Preprocess(), size, seed=0)[i] for i in range(8)]
    x, y, errors = collate(items)
    assert not errors and y.shape[0] == 8 and y.shape[2] == 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(12):
        loss, _ = detection_loss(model(x), y, model.anchors(size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True), losses


def test_train_eval_predict_resume_on_coco128(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--task", "detect", "--data", COCO128, "--arch", "mobilenet_v3_small", "--width", "0.35",
            "--resolution", "96", "--epochs", "1", "--batch-size", "32", "--out", out, "--no-progress", "--json"]
    code, stdout, _ = run(capsys, *args)
    doc = json.loads(stdout)
    assert code == 0 and 0 <= doc["map"] <= 1 and (out / "model.safetensors").is_file()
    assert (out / "metrics.csv").read_text().splitlines()[0].count("val_map") == 2
    code, stdout, _ = run(capsys, "train", "--out", out, "--resume", "--epochs", "2", "--no-progress", "--json")
    assert code == 0 and json.loads(stdout)["epochs"] == 2
    model = out / "model.safetensors"
    code, stdout, _ = run(capsys, "info", model, "--json")
    assert json.loads(stdout)["task"] == "detect" and json.loads(stdout)["resolution"] == [96, 96]
    yolo = COCO128 / "object_detection"
    code, stdout, _ = run(capsys, "eval", "--weights", model, "--data", yolo, "--json", "--no-progress")
    doc = json.loads(stdout)
    assert code == 0 and set(doc) >= {"map", "map50", "per_class"} and doc["images"] == 128
    image = min((COCO128 / "images" / "val2017").glob("*.jpg"))
    code, stdout, _ = run(capsys, "predict", "--weights", model, image, "--score-thresh", "0.0", "--max-detections",
                          "5", "--out", tmp_path / "pred", "--json")
    doc = json.loads(stdout)
    assert code == 0 and Path(doc["results"][0]["png"]).is_file() and len(doc["results"][0]["detections"]) == 5
    coco = json.loads(Path(doc["coco_results"]).read_text())
    assert len(coco) == 5 and coco[0]["image_id"] == int(image.stem) and len(coco[0]["bbox"]) == 4


def test_augmentation_policies():
    from torchvision.transforms import v2

    from mnv3.data import DataError
    from mnv3.data.boxes import train_steps
    from mnv3.train.recipe import load_recipe
    from mnv3.weights import Preprocess

    ssd = [type(t) for t in train_steps(Preprocess(), (64, 64), policy="ssd")]
    lite = [type(t) for t in train_steps(Preprocess(), (64, 64), policy="ssdlite")]
    assert v2.RandomZoomOut in ssd and v2.RandomPhotometricDistort in ssd
    assert v2.RandomZoomOut not in lite and v2.RandomPhotometricDistort not in lite and v2.RandomIoUCrop in lite
    assert load_recipe("detect").det_augment == "ssdlite"       # torchvision's SSDLite reference
    with pytest.raises(DataError, match="augmentation"):
        train_steps(Preprocess(), (64, 64), policy="yolo")
