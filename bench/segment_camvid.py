"""LR-ASPP on CamVid: MobileNetV3-Large-minimalistic from the authors' ImageNet TFLite weights
(../shared/weights) with each head (the paper's `lraspp` and `lraspp-torchvision`), trained on
CamVid's 367 training images at 360x480 with the `segment` recipe, scored on its 101 validation
images (mIoU from one confusion matrix, void = 11 ignored); training time and the latency of both
models measured side by side on ONNX Runtime, 1 thread, at 360x480.

Published anchors (CamVid's 233-image test split, which is not here, so not the same images):
SegNet 46.4 mIoU, ENet 51.3. The issue's goal: val mIoU above 55 with the paper's head, and the
paper's head at least as accurate as torchvision's.

Each head's run lives in bench/results/segment_camvid/<head>/ and resumes when the script is run
again (a finished run is read back, not trained again; a larger --epochs extends it, the poly
schedule then continuing as if planned that long from the resume point).

    python bench/segment_camvid.py [--epochs 30] [--batch 8] [--lr 0.02] [--class-weights enet] [--size 360x480]
                                   [--heads lraspp lraspp-torchvision] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import RESULTS, SHARED, cpu_flags, write_csv

import mnv3
from mnv3.heads import parse_resolution
from mnv3.latency import get_runtime, measure, measure_side_by_side
from mnv3.latency.runtimes import cpu_model
from mnv3.train.recipe import load_recipe
from mnv3.train.segment import train_segment

CAMVID = SHARED / "data" / "camvid"
WEIGHTS = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
OUT = RESULTS / "segment_camvid"
ANCHORS = {"SegNet (test)": 46.4, "ENet (test)": 51.3}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_head(head: str, args, size) -> dict:
    out = OUT / head
    result_file = out / "result.json"
    done = 0
    if (out / "metrics.csv").is_file():
        with open(out / "metrics.csv") as f:
            done = sum(1 for _ in f) - 1
    if result_file.is_file() and (out / "model.safetensors").is_file() and done >= args.epochs:
        log(f"{head}: finished earlier, read back from {out}")
    else:
        recipe = load_recipe("segment").override({"epochs": str(args.epochs), "batch_size": str(args.batch),
                                                  "lr": str(args.lr), "lr_batch": str(args.batch),
                                                  "seg_class_weights": args.class_weights})
        resume = (out / "checkpoint.pt").is_file()
        log(f"{head}: training {args.epochs} epochs at {size[0]}x{size[1]}" + (" (resumed)" if resume else ""))
        t0 = time.time()
        train_segment(str(CAMVID), out, head=head, size=size, weights=str(WEIGHTS), recipe=recipe,
                      resume=resume, ignore_index=11, workers=args.workers, progress=not args.no_progress,
                      tensorboard=False)
        log(f"{head}: trained in {(time.time() - t0) / 60:.1f} min (this session)")
    result = json.loads(result_file.read_text())
    import csv

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    minutes = sum(float(r["epoch_s"]) for r in rows) / 60
    last = rows[-1]
    per_class = {k.removeprefix("val_iou_"): float(v) for k, v in last.items() if k.startswith("val_iou_")}
    return {"head": head, "epochs": len(rows), "train_min": round(minutes, 1), "val_miou": result["miou"],
            "val_pixel_acc": result["pixel_acc"], "per_class": per_class, "model": result["model"]}


def plot(rows: list[dict], path, size: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mnv3.files import atomic_write

    classes = list(rows[0]["per_class"])
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([c + i * width for c in range(len(classes))], [100 * r["per_class"][k] for k in classes], width,
               label=f"{r['head']}: mIoU {100 * r['val_miou']:.1f}")
    ax.set_xticks([c + width * (len(rows) - 1) / 2 for c in range(len(classes))], classes, rotation=30)
    ax.set(ylabel="val IoU (%)", title=f"CamVid val, MobileNetV3-Large-minimalistic + LR-ASPP, {size[0]}x{size[1]}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02, help="learning rate at --batch (2-epoch pilots: 0.005 -> 33.7 mIoU, 0.02 -> 47.7, 0.05 diverges)")
    ap.add_argument("--size", default="360x480")
    ap.add_argument("--class-weights", default="enet", choices=["none", "enet", "median"],
                    help="loss weighting of rare classes (the recipe's seg_class_weights; ENet's by default)")
    ap.add_argument("--heads", nargs="+", default=["lraspp", "lraspp-torchvision"])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    size = parse_resolution(args.size)
    size = size if isinstance(size, tuple) else (size, size)
    log(f"CPU: {cpu_model()} [{cpu_flags()}]")
    rows = [run_head(head, args, size) for head in args.heads]
    models = [mnv3.load(r["model"]) for r in rows]
    runtime = get_runtime("onnxruntime")
    sessions = [runtime.session(m, threads=1, input_shape=(1, 3, *size)) for m in models]
    timings = (measure_side_by_side(sessions, args.runs, burst=3) if len(sessions) > 1
               else [(measure(sessions[0], args.runs), 1.0)])
    for r, m, (timing, ratio) in zip(rows, models, timings):
        r.update(params=sum(p.numel() for p in m.parameters()), ort_ms=round(timing.median_ms, 2),
                 ort_ratio=round(ratio, 3))
    print(f"\nCamVid val (101 images), {size[0]}x{size[1]}, void ignored, lr {args.lr} at batch {args.batch}, "
          f"class weights {args.class_weights}; CPU {cpu_model()} [{cpu_flags()}]")
    print(f"{'head':<22}{'epochs':>7}{'train min':>10}{'mIoU':>8}{'pixel acc':>10}{'params':>11}{'ORT ms':>9}{'ratio':>7}")
    for r in rows:
        print(f"{r['head']:<22}{r['epochs']:>7}{r['train_min']:>10.1f}{100 * r['val_miou']:>8.1f}"
              f"{100 * r['val_pixel_acc']:>10.1f}{r['params']:>11,}{r['ort_ms']:>9.1f}{r['ort_ratio']:>7.3f}")
    print("anchors (test split, published): " + ", ".join(f"{k} {v}" for k, v in ANCHORS.items()))
    flat = [{**{k: v for k, v in r.items() if k not in ("per_class", "model")},
             **{f"iou_{k}": round(v, 4) for k, v in r["per_class"].items()},
             "lr": args.lr, "batch": args.batch, "class_weights": args.class_weights,
             "size": f"{size[0]}x{size[1]}", "cpu": cpu_model(), "cpu_flags": cpu_flags()} for r in rows]
    path = write_csv("segment_camvid.csv", flat)
    plot(rows, RESULTS / "segment_camvid.png", size)
    print(f"written {path} and {RESULTS / 'segment_camvid.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
