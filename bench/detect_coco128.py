"""SSDLite on coco128: ours against torchvision's, from the same ImageNet backbone, trained the same way.

Both start from the TensorFlow authors' MobileNetV3-Large-minimalistic (../shared/weights, uint8
TFLite, batch norm folded: statistics are re-estimated on 64 training images first, as `mnv3 train`
does) and train on coco128's 128 train2017 images at 320x320 with the `detect` recipe (SGD, cosine,
batch 16), at lr 0.05 (8 steps an epoch want a faster rate than the recipe's 0.0094 at batch 16:
tried, it barely moved), the same batches in the same order and the same augmentation from
`mnv3.data.boxes` (`--augment`: the recipe's ssdlite policy, or ssd); both are scored on coco128's
128 val2017 images by the same pycocotools evaluation.

- ours: `mnv3.train.detect.train_detect` (the engine: our matching, loss, post-processing);
- torchvision's: the model `ssdlite320_mobilenet_v3_large` assembles (`MobileNetV3` features split
  at C4 by `_mobilenet_extractor`, its extra layers, `SSDLiteHead`, `DefaultBoxGenerator`, `SSD`
  with its own matching, loss and post-processing), built on the minimalistic configuration (3x3
  kernels, no SE, ReLU; torchvision hard-codes hard-swish after the stem and the last conv, which
  are set back to ReLU), its backbone weights copied from ours tensor by tensor. One difference
  stays: torchvision pads symmetrically where the TFLite weights were trained with TF's "same"
  padding, a half-pixel shift at each stride-2 layer that fine-tuning absorbs.

Training time counts the training steps only (not the per-epoch evaluation); as the two runs go one
after the other, a load on the machine would favour one, so the script also times single training
steps of both side by side (alternating, 20 rounds on one batch) and prints the median ratio. Runs
live in bench/results/detect_coco128/<augment>/{mnv3,torchvision}/ and resume when the script is run
again; a larger --epochs extends them.

    python bench/detect_coco128.py [--epochs 40] [--lr 0.05] [--augment ssdlite|ssd] [--batch 16] [--size 320]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from functools import partial

import torch
from common import RESULTS, SHARED, cpu_flags, write_csv
from torch import nn

from mnv3.data.boxes import DetEvalSet, DetTrainSet, open_boxes
from mnv3.data.datasets import EpochBatches, collate
from mnv3.latency.runtimes import cpu_model
from mnv3.train.detect import Detections, coco_scores, image_targets, prepare_detector, train_detect
from mnv3.train.engine import make_optimizer
from mnv3.train.recipe import load_recipe

COCO128 = SHARED / "data" / "coco128"
WEIGHTS = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
RUNS = RESULTS / "detect_coco128"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def recipe_for(args):
    return load_recipe("detect").override({"epochs": str(args.epochs), "batch_size": str(args.batch),
                                           "lr": str(args.lr), "lr_batch": str(args.batch),
                                           "det_augment": args.augment})


def run_ours(args, data, size) -> dict:
    out = RUNS / (args.augment + args.tag) / "mnv3"
    resume = (out / "checkpoint.pt").is_file()
    log(f"mnv3: training {args.epochs} epochs at {size[0]}x{size[1]}" + (" (resumed)" if resume else ""))
    result = train_detect(data, out, size=size, weights=str(WEIGHTS), recipe=recipe_for(args), resume=resume,
                          eval_every=args.eval_every, progress=False, tensorboard=False)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {"model": "mnv3", "epochs": len(rows), "train_min": sum(float(r["epoch_s"]) for r in rows) / 60,
            "map": result.metrics["val_map"], "map50": result.metrics["val_map50"]}


# -- torchvision's SSDLite --------------------------------------------------------------------------------
def torchvision_ssdlite(ours, num_classes: int, size):
    """torchvision's SSDLite assembled as `ssdlite320_mobilenet_v3_large` does, on `ours`' backbone
    configuration and weights."""
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor
    from torchvision.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3

    spec = ours.spec
    norm = partial(nn.BatchNorm2d, eps=spec.bn_eps, momentum=0.03)
    settings = [InvertedResidualConfig(cin, b.kernel, b.expansion, b.out, b.se is not None,
                                       "HS" if b.activation == "hswish" else "RE", b.stride, b.dilation, 1.0)
                for cin, b in zip(spec.block_inputs(), spec.blocks)]
    mobilenet = MobileNetV3(settings, last_channel=1280, norm_layer=norm)
    if spec.stem.activation != "hswish":
        mobilenet.features[0][2] = nn.ReLU(inplace=True)
    if spec.head.activation != "hswish":
        mobilenet.features[-1][2] = nn.ReLU(inplace=True)
    theirs = [(k, v) for k, v in mobilenet.features.state_dict().items()]
    mine = list(ours.backbone.state_dict().items())
    if len(theirs) != len(mine) or any(a.shape != b.shape for (_, a), (_, b) in zip(theirs, mine)):
        raise SystemExit("the torchvision backbone does not line up with ours tensor by tensor")
    mobilenet.features.load_state_dict({k: v for (k, _), (_, v) in zip(theirs, mine)})
    backbone = _mobilenet_extractor(mobilenet, 6, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    channels = det_utils.retrieve_out_channels(backbone, size)
    head = SSDLiteHead(channels, anchors.num_anchors_per_location(), num_classes + 1, norm)
    return SSD(backbone, anchors, size, num_classes + 1, head=head, score_thresh=0.001, nms_thresh=0.55,
               detections_per_img=300, topk_candidates=300, image_mean=[0.0] * 3, image_std=[1.0] * 3)


def run_torchvision(args, data, size) -> dict:
    """The same batches, augmentation and schedule through torchvision's SSD training forward."""
    out = RUNS / (args.augment + args.tag) / "torchvision"
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipe_for(args)
    ours, pre, _ = prepare_detector(data, recipe, size, weights=str(WEIGHTS), progress=False)
    model = torchvision_ssdlite(ours, len(data.classes), size)
    # Inputs arrive normalised by `pre` (as ours get them); torchvision's own normalisation is the identity.
    optimizer = make_optimizer(model, recipe)
    state = {"epoch": 0, "seconds": 0.0, "history": []}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"torchvision: resumed after epoch {state['epoch']}")
    train_set = DetTrainSet(data.train, pre, size, recipe.seed, recipe.hflip, recipe.det_augment)
    steps = len(train_set) // recipe.batch_size
    torch.manual_seed(recipe.seed)
    while state["epoch"] < recipe.epochs:
        epoch = state["epoch"]
        train_set.epoch = epoch
        batches = EpochBatches(len(train_set), recipe.batch_size, seed=recipe.seed, epoch=epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate)
        model.train()
        t0, total = time.perf_counter(), 0.0
        for b, (x, y, _) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch * steps + b, steps)
            targets = [{"boxes": boxes, "labels": labels + 1} for boxes, labels in image_targets(y, len(x))]
            losses = model(list(x), targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        state["seconds"] += time.perf_counter() - t0
        if (epoch + 1) % args.eval_every == 0 or epoch == 0 or epoch + 1 == recipe.epochs:
            score = evaluate_torchvision(model, data, pre, size)
        else:
            score = {"map": float("nan"), "map50": float("nan")}
        state["history"].append({"epoch": epoch + 1, "train_loss": total / steps, **score})
        state["epoch"] = epoch + 1
        log(f"torchvision: epoch {epoch + 1}/{recipe.epochs} loss {total / steps:.3f} mAP {score['map']:.4f} "
            f"mAP50 {score['map50']:.4f}")
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, tmp)
        tmp.replace(ckpt)
    (out / "history.json").write_text(json.dumps(state["history"], indent=1) + "\n")
    last = state["history"][-1]
    return {"model": "torchvision", "epochs": state["epoch"], "train_min": state["seconds"] / 60,
            "map": last["map"], "map50": last["map50"]}


def paired_steps(args, data, size, rounds: int = 20) -> float:
    """Median over `rounds` of (torchvision's step time / ours) for one training step on the same
    batch, the two alternating."""
    import statistics

    from mnv3.train.detect import detection_loss

    recipe = recipe_for(args)
    ours, pre, _ = prepare_detector(data, recipe, size, weights=str(WEIGHTS), progress=False)
    peer = torchvision_ssdlite(ours, len(data.classes), size)
    train_set = DetTrainSet(data.train, pre, size, recipe.seed, recipe.hflip, recipe.det_augment)
    x, y, _ = collate([train_set[i] for i in range(recipe.batch_size)])
    targets = [{"boxes": boxes, "labels": labels + 1} for boxes, labels in image_targets(y, len(x))]
    anchors = ours.anchors(size)
    opt_ours, opt_peer = make_optimizer(ours, recipe), make_optimizer(peer, recipe)
    ours.train()
    peer.train()

    def step_ours():
        loss, _ = detection_loss(ours(x), y, anchors, recipe.neg_pos_ratio, recipe.box_loss)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_peer():
        loss = sum(peer(list(x), targets).values())
        opt_peer.zero_grad(set_to_none=True)
        loss.backward()
        opt_peer.step()

    ratios = []
    for r in range(rounds + 2):
        t0 = time.perf_counter()
        step_ours()
        t1 = time.perf_counter()
        step_peer()
        t2 = time.perf_counter()
        if r >= 2:                                  # two rounds of warm-up
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


@torch.no_grad()
def evaluate_torchvision(model, data, pre, size) -> dict:
    model.eval()
    loader = torch.utils.data.DataLoader(DetEvalSet(data.val, pre, size), batch_size=16, collate_fn=collate)
    collected = Detections()
    for x, y, _ in loader:
        found = model(list(x))
        for j, (boxes, labels) in enumerate(image_targets(y, len(x))):
            d = found[j]
            collected.add(int(y[j, 0, 0]), {**d, "labels": d["labels"] - 1}, boxes, labels)
    s = coco_scores(collected, tuple(data.classes))
    return {"map": s["map"], "map50": s["map50"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.05,
                    help="at --batch (the recipe's 0.15 at 256, 0.0094 at 16, barely moves in 320 steps: tried)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--only", choices=("mnv3", "torchvision"), help="run one side only")
    ap.add_argument("--augment", choices=("ssd", "ssdlite"), default="ssdlite",
                    help="ssdlite (IoU crop, flip: the recipe's) or ssd (also photometric distortion, zoom out)")
    ap.add_argument("--eval-every", type=int, default=1, metavar="N",
                    help="score on val2017 after every N-th epoch only (and the first and last)")
    ap.add_argument("--tag", default="", help="suffix of the run folders and the CSV (a second schedule "
                                               "beside the first)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    size = (args.size, args.size)
    data = open_boxes(COCO128)
    log(f"CPU: {cpu_model()} [{cpu_flags()}], {torch.get_num_threads()} threads; coco128 {len(data.train)} train / "
        f"{len(data.val)} val images, {len(data.classes)} classes")
    rows = []
    if args.only != "torchvision":
        rows.append(run_ours(args, data, size))
    if args.only != "mnv3":
        rows.append(run_torchvision(args, data, size))
    print(f"\ncoco128 val2017 (128 images), {size[0]}x{size[1]}, MobileNetV3-Large-minimalistic (authors' TFLite); "
          f"CPU {cpu_model()} [{cpu_flags()}]")
    print(f"{'model':<14}{'epochs':>7}{'train min':>11}{'mAP':>8}{'mAP50':>8}")
    for r in rows:
        print(f"{r['model']:<14}{r['epochs']:>7}{r['train_min']:>11.1f}{100 * r['map']:>8.2f}{100 * r['map50']:>8.2f}")
    if not args.only:
        ratio = paired_steps(args, data, size)
        print(f"one training step, side by side (batch {args.batch}, median of 20 rounds): torchvision's / ours "
              f"= {ratio:.3f}")
        for r in rows:
            r["step_time_vs_ours"] = round(ratio, 3) if r["model"] == "torchvision" else 1.0
        path = write_csv(f"detect_coco128_{args.augment}{args.tag}.csv",
                         [{**r, "augment": args.augment, "lr": args.lr, "size": f"{size[0]}x{size[1]}",
                           "cpu": cpu_model(), "cpu_flags": cpu_flags()} for r in rows])
        log(f"written {path}")


if __name__ == "__main__":
    main()
