"""MobileNetV3-Small trained from scratch on CIFAR-10 (../shared/data/cifar10) in a fixed time budget,
the proxy task the search will use. The network keeps its blocks but downsamples 32x32 input by 8
instead of 32 (stem and first block at stride 1: `mnv3.with_total_stride`).

First, training throughput (img/s, data loading included) of our network and of torchvision's
MobileNetV3-Small given the same stride profile, in the same engine, as single steps taken in
alternation (the machine's drifts hit both alike); then
our network is trained with the `cifar` recipe for as many epochs as fit the budget. Prints test
top-1, both img/s and their ratio.

    python bench/train_cifar10.py [--minutes 20] [--pairs 40] [--workers 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import write_csv

from mnv3.data.datasets import open_data
from mnv3.train.classify import prepare_model, train
from mnv3.train.distributed import Dist
from mnv3.train.engine import ClassificationTask, RunOptions, Trainer
from mnv3.train.recipe import load_recipe

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def torchvision_small(spec, num_classes: int) -> torch.nn.Module:
    """torchvision's MobileNetV3-Small with the strides of `spec` (our stride profile)."""
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small")
    assert len(setting) == len(spec.blocks)
    for cnf, block in zip(setting, spec.blocks):
        cnf.stride = block.stride            # before construction, so residual links follow
    model = MobileNetV3(setting, last_channel, num_classes=num_classes)
    model.features[0][0].stride = (spec.stem.stride,) * 2
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget (default 20)")
    parser.add_argument("--pairs", type=int, default=40, help="paired single training steps timed")
    parser.add_argument("--workers", type=int, default=1, help="data-loading processes")
    parser.add_argument("--out", help="run folder (default: a temporary folder)")
    args = parser.parse_args()

    data = open_data(DATA)
    recipe = load_recipe("cifar")
    ours, pre = prepare_model(data, recipe, "mobilenet_v3_small")
    torch.manual_seed(0)
    theirs = torchvision_small(ours.spec, len(data.classes))
    print(f"{ours.spec.name}: total stride {ours.spec.total_stride()}, {sum(p.numel() for p in ours.parameters()):,} "
          f"params (torchvision: {sum(p.numel() for p in theirs.parameters()):,}); batch {recipe.batch_size}, "
          f"channels_last {recipe.channels_last}, {torch.get_num_threads()} threads, {args.workers} loader workers")

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: Trainer(model, data, recipe, RunOptions(Path(tmp) / name, workers=0,
                                                                  progress=False),
                                  ClassificationTask(recipe.label_smoothing), Dist(), pre, {}, None)
                    for name, model in (("mnv3", ours), ("torchvision", theirs))}
        speed: dict[str, list[float]] = {name: [] for name in trainers}
        for trainer in trainers.values():     # warm-up: first steps allocate and pick kernels
            trainer.benchmark(2, warmup=1)
        for r in range(args.pairs):     # single steps, alternating, so drifts hit both alike
            order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
            for name in order:
                speed[name].append(trainers[name].benchmark(1, warmup=0))
        ratio = statistics.median(a / b for a, b in zip(speed["mnv3"], speed["torchvision"]))
        img_s = {n: statistics.median(v) for n, v in speed.items()}
        print(f"throughput over {args.pairs} paired steps: " +
              ", ".join(f"{n} {img_s[n]:.0f} img/s" for n in trainers))
        del trainers

        per_epoch = len(data.train) / img_s["mnv3"] + len(data.val) / (3 * img_s["mnv3"])
        epochs = max(1, int(args.minutes * 60 / per_epoch))
        print(f"about {per_epoch / 60:.1f} min per epoch: {epochs} epoch(s) fit {args.minutes:g} minutes")
        out = Path(args.out) if args.out else Path(tmp) / "run"
        start = time.perf_counter()
        result = train(data, out, arch="mobilenet_v3_small", recipe=recipe.override({"epochs": epochs}),
                       workers=args.workers, checkpoint_steps=0)
        minutes = (time.perf_counter() - start) / 60

    top1 = result.metrics["val_top1"]
    print(f"\nMobileNetV3-Small (stride 8) from scratch on CIFAR-10, {epochs} epoch(s), {minutes:.1f} min: "
          f"test top-1 {top1:.4f}, top-5 {result.metrics['val_top5']:.4f}")
    print(f"training throughput, same engine and stride profile: mnv3 {img_s['mnv3']:.0f} img/s, torchvision "
          f"{img_s['torchvision']:.0f} img/s, ratio {ratio:.3f} (median of {args.pairs} paired steps, data loading in the "
          f"main process; "
          f"{'not slower' if ratio >= 0.97 else 'SLOWER'})")
    path = write_csv("train_cifar10.csv", [{
        "epochs": epochs, "minutes": round(minutes, 1), "test_top1": round(top1, 4),
        "test_top5": round(result.metrics["val_top5"], 4), "mnv3_img_s": round(img_s["mnv3"], 1),
        "torchvision_img_s": round(img_s["torchvision"], 1), "ratio": round(ratio, 3)}])
    print(f"written {path}")


if __name__ == "__main__":
    main()
