"""Fine-tuning from the TensorFlow authors' uint8 TFLite MobileNetV3-Large-minimalistic on the
ants/bees set (../shared/data/hymenoptera): the `finetune` recipe, at most 5 epochs, 224x224.
Prints validation top-1 per epoch and at the end, beside the goal (0.92) and the PyTorch transfer
learning tutorial's ResNet-18 (about 0.93-0.95 on the same set).

    python bench/finetune_hymenoptera.py [--epochs 5] [--out DIR] [--freeze-backbone]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import write_csv

from mnv3.train.classify import train
from mnv3.train.recipe import load_recipe

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data" / "hymenoptera"
WEIGHTS = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
GOAL = 0.92


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", help="run folder (default: a temporary folder)")
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the finetune recipe (repeatable)")
    args = parser.parse_args()
    if args.epochs > 5:
        parser.error("the goal is for at most 5 epochs")
    changes = dict(item.split("=", 1) for item in args.set)
    recipe = load_recipe("finetune").override({"epochs": args.epochs, "freeze_backbone": args.freeze_backbone,
                                               **changes})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        start = time.perf_counter()
        result = train(str(DATA), out, weights=str(WEIGHTS), recipe=recipe, workers=args.workers)
        seconds = time.perf_counter() - start
    print(f"\n{'epoch':>5} {'train loss':>11} {'val loss':>9} {'val top-1':>10}")
    for row in result.history:
        print(f"{row['epoch']:>5} {row['train_loss']:>11.4f} {row['val_loss']:>9.4f} {row['val_top1']:>10.4f}")
    top1 = result.metrics["val_top1"]
    print(f"\nMobileNetV3-Large-minimalistic (authors' uint8 TFLite, imported) fine-tuned {args.epochs} epochs "
          f"with recipe finetune{' (head only)' if args.freeze_backbone else ''}: val top-1 {top1:.4f} "
          f"({round(top1 * 153)}/153) in {seconds / 60:.1f} min; goal >= {GOAL} -> "
          f"{'met' if top1 >= GOAL else 'NOT met'}. ResNet-18, PyTorch tutorial: about 0.93-0.95.")
    path = write_csv("finetune_hymenoptera.csv", [{"epochs": args.epochs, "freeze_backbone": args.freeze_backbone,
                                               "val_top1": round(top1, 4), "minutes": round(seconds / 60, 2)}])
    print(f"written {path}")


if __name__ == "__main__":
    main()
