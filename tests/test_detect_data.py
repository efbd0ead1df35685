"""Detection data: coco128 in both layouts, boxes through every transform, bad input, collate."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from mnv3.data.boxes import BoxSamples, DetEvalSet, DetTrainSet, fill_pixel, open_boxes, train_steps
from mnv3.data.datasets import collate
from mnv3.data.images import DataError
from mnv3.weights.model_file import Preprocess

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
if not COCO128.is_dir():
    COCO128 = Path("/work/shared/data/coco128")
PRE = Preprocess()
BOX = (10, 8, 40, 30)        # x1, y1, x2, y2 of the white rectangle in a 64x48 image


@pytest.fixture(scope="module")
def coco128():
    if not COCO128.is_dir():
        pytest.skip(f"{COCO128} not found")
    return open_boxes(COCO128), open_boxes(COCO128 / "object_detection")


def rect_image(bg=(0, 0, 0), w: int = 64, h: int = 48, box=BOX) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    img[box[1]:box[3], box[0]:box[2]] = 255
    return img


def bright_box(gray: np.ndarray, threshold: float) -> np.ndarray:
    """x1, y1, x2, y2 (pixel edges) of the pixels above `threshold` in an HxW array."""
    ys, xs = np.nonzero(gray > threshold)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def apply(steps, img: np.ndarray, box, seed: int):
    """Run `steps` on (uint8 HWC image, one box labelled 3); (uint8 CHW image, boxes, labels)."""
    h, w = img.shape[:2]
    sample = {"image": tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()),
              "boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYXY",
                                                canvas_size=(h, w)),
              "labels": torch.tensor([3])}
    torch.manual_seed(seed)
    out = v2.Compose(steps)(sample)
    return out["image"].as_subclass(torch.Tensor), out["boxes"].as_subclass(torch.Tensor), out["labels"]


def step(kind, **changes):
    """The configured train step of type `kind`, with attributes changed (e.g. p=1)."""
    found = copy.copy(next(s for s in train_steps(PRE, (64, 64)) if isinstance(s, kind)))
    for k, v in changes.items():
        setattr(found, k, v)
    return found


# -- opening ---------------------------------------------------------------------------------------
def test_coco128_both_layouts_agree(coco128):
    coco, yolo = coco128
    for d in (coco, yolo):
        assert (len(d.train), len(d.val), len(d.classes)) == (128, 128, 80)
        assert (sum(map(len, d.train.boxes)), sum(map(len, d.val.boxes))) == (929, 898)
        assert d.skipped == {} and len(d.fingerprint()) == 16
    assert coco.classes == yolo.classes and coco.classes[0] == "person"
    assert coco.category_ids[:3] == (1, 2, 3) and coco.category_ids[-1] == 90
    assert yolo.category_ids == tuple(range(80))
    assert sum(len(b) == 0 for b in coco.train.boxes) == 2          # images without annotations are kept
    for a, b in ((coco.train, yolo.train), (coco.val, yolo.val)):
        other = {p.name: (bx, lab) for p, bx, lab in zip(b.images, b.boxes, b.labels)}
        assert {p.name for p in a.images} == set(other)
        for p, bx, lab in zip(a.images, a.boxes, a.labels):
            assert bx.dtype == np.float32 and bx.shape == (len(lab), 4) and lab.dtype == np.int64
            np.testing.assert_array_equal(lab, other[p.name][1])
            np.testing.assert_allclose(bx, other[p.name][0], atol=1.0)


def test_unknown_layout(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}.*COCO.*YOLO"):
        open_boxes(tmp_path)


# -- transforms keep boxes on their objects --------------------------------------------------------
def test_flip():
    out, boxes, _ = apply([step(v2.RandomHorizontalFlip, p=1.0)], rect_image(), BOX, seed=0)
    assert boxes.tolist() == [[64 - 40, 8, 64 - 10, 30]]
    np.testing.assert_array_equal(bright_box(out[0].numpy(), 128), boxes[0].numpy())


def test_resize():
    out, boxes, _ = apply([v2.Resize((32, 40), antialias=True)], rect_image(), BOX, seed=0)
    assert out.shape == (3, 32, 40)
    np.testing.assert_allclose(boxes[0].numpy(), [10 * 40 / 64, 8 * 32 / 48, 40 * 40 / 64, 30 * 32 / 48], atol=1e-4)
    np.testing.assert_allclose(bright_box(out[0].numpy(), 128), boxes[0].numpy(), atol=1.0)


def test_zoom_out():
    fill = fill_pixel(PRE)
    assert fill == (124, 116, 104)
    for seed in range(50):
        out, boxes, _ = apply([step(v2.RandomZoomOut, p=1.0)], rect_image(), BOX, seed)
        if out.shape[2] >= 96:
            break
    assert out.shape[2] >= 96 and out.shape[1] * 64 == pytest.approx(out.shape[2] * 48, abs=64)
    np.testing.assert_array_equal(bright_box(out[0].numpy(), 190), boxes[0].numpy())   # shifted whole pixels
    assert (boxes[0, 2:] - boxes[0, :2]).tolist() == [30, 22]
    canvas = out.permute(1, 2, 0).reshape(-1, 3)
    assert (canvas == torch.tensor(fill, dtype=torch.uint8)).all(1).any()        # the padding is the mean pixel


def test_iou_crop():
    steps = [step(v2.RandomIoUCrop), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1)]
    checked = 0
    for seed in range(40):
        out, boxes, labels = apply(steps, rect_image(), BOX, seed)
        if out.shape[1:] == (48, 64) or not len(boxes):
            continue
        assert labels.tolist() == [3]
        np.testing.assert_array_equal(bright_box(out[0].numpy(), 128), boxes[0].numpy())
        checked += 1
    assert checked >= 3


def write_image(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def test_train_pipeline_keeps_boxes_on_the_object(tmp_path):
    path = write_image(tmp_path / "rect.png", rect_image(bg=fill_pixel(PRE)))
    n = 16
    samples = BoxSamples([path] * n, list(range(n)), [np.array([BOX], np.float32)] * n, [np.array([3])] * n)
    data = DetTrainSet(samples, PRE, (64, 64), seed=1)
    mean, std = torch.tensor(PRE.mean).view(3, 1, 1), torch.tensor(PRE.std).view(3, 1, 1)
    kept = 0
    for i in range(n):
        x, target, err = data[i]
        assert err is None and x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert target.dtype == torch.float32 and target.shape[1] == 6 and (target[:, 0] == i).all()
        if target[0, 1] < 0:
            continue
        assert target[:, 1].tolist() == [3]
        gray = (x * std + mean).sum(0).numpy()
        found = bright_box(gray, (gray.max() + gray.min()) / 2)
        np.testing.assert_allclose(found, target[0, 2:].numpy(), atol=2.0)
        kept += 1
    assert kept >= n // 2


def test_eval_set_scales_boxes(tmp_path, coco128):
    path = write_image(tmp_path / "rect.png", rect_image())
    samples = BoxSamples([path], [0], [np.array([BOX], np.float32)], [np.array([3])], [(64, 48)])
    x, target, err = DetEvalSet(samples, PRE, (32, 40))[0]
    assert err is None and x.shape == (3, 32, 40)
    expected = [10 * 40 / 64, 8 * 32 / 48, 40 * 40 / 64, 30 * 32 / 48]
    np.testing.assert_allclose(target[0].numpy(), [0, 3, *expected], atol=1e-4)
    gray = (x * torch.tensor(PRE.std).view(3, 1, 1) + torch.tensor(PRE.mean).view(3, 1, 1))[0].numpy()
    np.testing.assert_allclose(bright_box(gray, 0.5), expected, atol=1.0)
    val = coco128[0].val
    x, target, err = DetEvalSet(val, PRE, (64, 64))[5]
    w, h = val.sizes[5]
    assert err is None and x.shape == (3, 64, 64) and (target[:, 0] == 5).all()
    np.testing.assert_allclose(target[:, 2:].numpy(), val.boxes[5] * np.array([64 / w, 64 / h] * 2), rtol=1e-5)


def test_no_boxes_and_collate(tmp_path):
    path = write_image(tmp_path / "empty.png", rect_image())
    samples = BoxSamples([path] * 2, [0, 1], [np.zeros((0, 4), np.float32)] * 2, [np.zeros(0, np.int64)] * 2)
    for data in (DetTrainSet(samples, PRE, (64, 64)), DetEvalSet(samples, PRE, (64, 64))):
        x, target, err = data[1]
        assert err is None and x.shape == (3, 64, 64)
        assert target.tolist() == [[1, -1, 0, 0, 0, 0]]
    three = torch.tensor([[0, 1, 0, 0, 5, 5], [0, 2, 1, 1, 6, 6], [0, 0, 2, 2, 9, 9]], dtype=torch.float32)
    x = torch.zeros(3, 8, 8)
    images, targets, errors = collate([(x, target, None), (None, None, "bad.jpg: broken"), (x, three, None)])
    assert images.shape == (2, 3, 8, 8) and targets.shape == (2, 3, 6) and errors == ["bad.jpg: broken"]
    assert targets[0, 0].tolist() == [1, -1, 0, 0, 0, 0] and (targets[0, 1:] == -1).all()
    assert torch.equal(targets[1], three)
    _, labels, _ = collate([(x, 1, None), (x, 2, None)])                 # classification unchanged
    assert labels.tolist() == [1, 2]


def test_same_epoch_and_index_same_sample(coco128):
    data = DetTrainSet(coco128[0].train, PRE, (64, 64), seed=3)
    first = [data[i] for i in range(3)]
    again = [data[i] for i in range(3)]
    data.epoch = 1
    later = [data[i] for i in range(3)]
    for (x, t, _), (x2, t2, _) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(t, t2)
    assert any(not torch.equal(x, x2) for (x, _, _), (x2, _, _) in zip(first, later))


# -- bad input -------------------------------------------------------------------------------------
def coco_set(root: Path, annotations: list[dict], extra_images: list[dict] = ()) -> Path:
    """A 64x48 COCO set: train image a.png (id 1), b.png (id 2, no annotation); val: one clean image."""
    for split in ("train", "val"):
        for name in ("a.png", "b.png"):
            write_image(root / "images" / split / name, rect_image())
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cats = [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.png", "width": 64, "height": 48}, *extra_images]
    ok = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 8, 30, 22], "iscrowd": 0}
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": [ok, *annotations], "categories": cats}))
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images[:1], "annotations": [ok], "categories": cats}))
    return root


def ann(bbox, category=1, **kw):
    return {"id": 9, "image_id": 1, "category_id": category, "bbox": bbox, "iscrowd": 0, **kw}


def test_coco_clean_set(tmp_path):
    d = open_boxes(coco_set(tmp_path, [ann([10, 10, 54.5, 5]), ann([1, 2, 3, 4], iscrowd=1)]))
    assert d.classes == ("cat", "dog") and d.category_ids == (1, 7) and d.skipped == {"crowd": 1}
    assert d.train.boxes[0].tolist() == [[10, 8, 40, 30], [10, 10, 64, 15]]       # 64.5 clipped to 64
    assert d.train.labels[0].tolist() == [1, 0] and d.train.boxes[1].shape == (0, 4)


@pytest.mark.parametrize("bad, kind, message", [
    ([ann([50, 10, 30, 10])], "boxes", "outside the 64x48 image"),
    ([ann([10, 10, 0, 5])], "boxes", "no width or height"),
    ([ann([10, 10, 5, -1])], "boxes", "no width or height"),
    ([ann([10, 10, 5, 5], category=99)], "boxes", "unknown category id 99"),
    ([ann([10, 10, "x", 5])], "boxes", "bbox"),
])
def test_coco_bad_box(tmp_path, capsys, bad, kind, message):
    root = coco_set(tmp_path, bad)
    with pytest.raises(DataError, match=message) as caught:
        open_boxes(root)
    assert "instances_train.json" in str(caught.value) and "--skip-bad-boxes" in str(caught.value)
    d = open_boxes(root, skip_bad=True)
    assert d.skipped == {kind: 1} and len(d.train.boxes[0]) == 1
    assert f"1 {kind}" in capsys.readouterr().err


def test_coco_missing_image(tmp_path):
    root = coco_set(tmp_path, [ann([1, 1, 5, 5], image_id=3)],
                    [{"id": 3, "file_name": "gone.png", "width": 64, "height": 48}])
    with pytest.raises(DataError, match="gone.png: missing"):
        open_boxes(root)
    d = open_boxes(root, skip_bad=True)
    assert d.skipped == {"images": 1} and len(d.train) == 2


def test_coco_unreadable_json(tmp_path):
    root = coco_set(tmp_path, [])
    (root / "annotations" / "instances_val.json").write_text("{not json")
    for skip in (False, True):
        with pytest.raises(DataError, match="instances_val.json: cannot read"):
            open_boxes(root, skip_bad=skip)


def test_corrupt_image_fails_at_load_not_open(tmp_path):
    root = coco_set(tmp_path, [])
    (root / "images" / "train" / "a.png").write_bytes(b"not an image")
    d = open_boxes(root)
    for data in (DetTrainSet(d.train, PRE, (64, 64)), DetEvalSet(d.train, PRE, (64, 64))):
        x, target, err = data[0]
        assert x is None and target is None and "a.png" in err
        assert data[1][2] is None


def yolo_set(root: Path, lines: list[str]) -> Path:
    """A YOLO set (names a, b) at 64x48: train a.png with `lines` (after one good box) and b.png
    without a label file; val: one image."""
    for split in ("train", "val"):
        for name in ("a.png", "b.png"):
            write_image(root / "images" / split / name, rect_image())
        (root / "labels" / split).mkdir(parents=True)
        extra = lines if split == "train" else []
        (root / "labels" / split / "a.txt").write_text("\n".join(["1 0.390625 0.395833 0.46875 0.458333", *extra]))
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    return root / "data.yaml"


def test_yolo_clean_set(tmp_path):
    d = open_boxes(yolo_set(tmp_path, []).parent)
    assert d.classes == ("a", "b") and d.category_ids == (0, 1) and d.skipped == {}
    np.testing.assert_allclose(d.train.boxes[0], [[10, 8, 40, 30]], atol=1e-3)
    assert d.train.labels[0].tolist() == [1] and d.train.boxes[1].shape == (0, 4)


@pytest.mark.parametrize("line, message", [
    ("2 0.5 0.5 0.1 0.1", "class 2 is not one of the 2 classes"),
    ("0 0.5 0.5 abc 0.1", "cannot parse"),
    ("0 0.5 0.5 0.1", "cannot parse"),
    ("0 0.9 0.5 0.5 0.5", "outside the 64x48 image"),
    ("0 0.5 0.5 0 0.2", "no width or height"),
])
def test_yolo_bad_line(tmp_path, line, message):
    config = yolo_set(tmp_path, [line])
    with pytest.raises(DataError, match=message) as caught:
        open_boxes(config)
    assert "a.txt:2" in str(caught.value) and "--skip-bad-boxes" in str(caught.value)
    d = open_boxes(config, skip_bad=True)
    assert d.skipped == {"boxes": 1} and len(d.train.boxes[0]) == 1


def test_yolo_unreadable_image(tmp_path):
    config = yolo_set(tmp_path, [])
    (tmp_path / "images" / "train" / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="b.png: cannot read image"):
        open_boxes(config)
    d = open_boxes(config, skip_bad=True)
    assert d.skipped == {"images": 1} and len(d.train) == 1
