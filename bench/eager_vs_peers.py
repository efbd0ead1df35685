"""Eager PyTorch speed of our MobileNetV3-Large/Small against torchvision's and timm's implementations
of the same networks: single thread, batch 1, 224x224, inference mode, measured in one interleaved
run. Prints ours/peer ratios (goal <= 1.03) and fused/unfused (goal < 1).

    python bench/eager_vs_peers.py [--rounds 15] [--iters 20]
"""

from __future__ import annotations

import argparse
import platform

import timm
import torch
import torchvision
from common import paired_ratio, time_interleaved, write_csv

import mnv3

PAIRS = {
    "large": ("mobilenet_v3_large", torchvision.models.mobilenet_v3_large, "mobilenetv3_large_100"),
    "small": ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, "mobilenetv3_small_100"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.resolution, args.resolution)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
          f"{platform.processor() or platform.machine()}, 1 thread, batch 1, {args.resolution}x{args.resolution}")
    rows = []
    for size, (preset, tv_fn, timm_name) in PAIRS.items():
        ours = mnv3.build(mnv3.preset(preset)).eval()
        fused = mnv3.build(mnv3.preset(preset)).eval().fuse()
        models = {"mnv3": ours, "mnv3 fused": fused, "torchvision": tv_fn().eval(),
                  "timm": timm.create_model(timm_name).eval()}
        fns = {}
        for name, model in models.items():
            def run(model=model):
                with torch.inference_mode():
                    return model(x)
            fns[name] = run
        timings = time_interleaved(fns, rounds=args.rounds, iters=args.iters)
        print(f"\nMobileNetV3-{size.capitalize()}")
        for name, t in timings.items():
            ratio = paired_ratio(timings, name, "torchvision")
            print(f"  {name:<12} median {t['median_ms']:7.2f} ms  (p10 {t['p10_ms']:.2f}, p90 {t['p90_ms']:.2f})"
                  f"  x{ratio:.3f} of torchvision")
            rows.append({"network": size, "impl": name, "median_ms": round(t["median_ms"], 3),
                         "p10_ms": round(t["p10_ms"], 3), "p90_ms": round(t["p90_ms"], 3),
                         "ratio_vs_torchvision": round(ratio, 3)})
        print(f"  ratio mnv3/torchvision {paired_ratio(timings, 'mnv3', 'torchvision'):.3f}   "
              f"mnv3/timm {paired_ratio(timings, 'mnv3', 'timm'):.3f}   (goal <= 1.03; median of per-round ratios)")
        print(f"  ratio fused/unfused    {paired_ratio(timings, 'mnv3 fused', 'mnv3'):.3f}   (goal < 1)")
    print(f"\nwritten {write_csv('eager_vs_peers.csv', rows)}")


if __name__ == "__main__":
    main()
