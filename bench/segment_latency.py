"""LR-ASPP heads side by side: the paper's (RF2 backbone, large pooling gate, depthwise 1/8 tap)
against torchvision's variant (full tail, global gate), on MobileNetV3-Large, at 512x1024 and
1024x2048, on ONNX Runtime and LiteRT with 1 thread: parameters, MACs and measured latency.

Per runtime and resolution the two models are timed round-robin (`measure_side_by_side`): each
round a burst of the torchvision variant, then a burst of the paper's; the ratio is the median of
the per-round ratios, which holds while the machine's load comes and goes. The CPU and its
instruction sets are printed beside the figures.

    python bench/segment_latency.py [--arch mobilenet_v3_large] [--classes 19] [--runs 50]
                                    [--runtimes onnxruntime litert] [--sizes 512x1024 1024x2048]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import RESULTS, cpu_flags, write_csv

import mnv3
from mnv3.heads import SEGMENT_KINDS, lraspp, parse_resolution, segment_backbone
from mnv3.latency import get_runtime, measure_side_by_side
from mnv3.latency.runtimes import calibrate_batchnorm, cpu_model
from mnv3.nn.lraspp import build_segmenter
from mnv3.nn.profile import module_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mobilenet_v3_large")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model (rounds of 3 runs each)")
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "litert"])
    ap.add_argument("--sizes", nargs="+", default=["512x1024", "1024x2048"])
    args = ap.parse_args()
    print(f"CPU: {cpu_model()} [{cpu_flags()}], 1 thread", flush=True)
    rows = []
    for text in args.sizes:
        size = parse_resolution(text)
        size = size if isinstance(size, tuple) else (size, size)
        models, costs = {}, {}
        for kind in reversed(SEGMENT_KINDS):          # torchvision's first: the reference of the ratio
            spec = segment_backbone(mnv3.preset(args.arch), kind, size)
            head = lraspp(kind, args.classes, size)
            models[kind] = calibrate_batchnorm(build_segmenter(spec, head), (2, 3, *size))
            costs[kind] = module_cost(lambda s=spec, h=head: build_segmenter(s, h), size)[:2]
        for name in args.runtimes:
            runtime = get_runtime(name)
            t0 = time.time()
            sessions = [runtime.session(m, threads=1, input_shape=(1, 3, *size)) for m in models.values()]
            print(f"{name} {size[0]}x{size[1]}: converted in {time.time() - t0:.0f} s, timing ...", flush=True)
            results = measure_side_by_side(sessions, args.runs, burst=3)
            for (kind, (params, macs)), (timing, ratio) in zip(costs.items(), results):
                rows.append({"arch": args.arch, "head": kind, "input": f"{size[0]}x{size[1]}", "runtime": name,
                             "params": params, "macs": macs, "median_ms": round(timing.median_ms, 2),
                             "p10_ms": round(timing.p10_ms, 2), "p90_ms": round(timing.p90_ms, 2),
                             "ratio_to_torchvision": round(ratio, 3), "runs": timing.runs,
                             "cpu": cpu_model(), "cpu_flags": cpu_flags()})
                print(f"  {kind:<20} {params:>10,} params {macs / 1e9:>6.2f}B MACs  {timing.median_ms:>9.1f} ms "
                      f"(p10 {timing.p10_ms:.1f}, p90 {timing.p90_ms:.1f})  x{ratio:.3f} of torchvision's",
                      flush=True)
    path = write_csv("segment_latency.csv", rows)
    print(f"written {path.relative_to(RESULTS.parent.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
