"""SSDLite backbones side by side, as the paper's Table 6 compares them: MobileNetV3-Large with and
without the reduced tail, and MobileNetV2, at 320x320 on ONNX Runtime and LiteRT with 1 thread:
parameters, MACs and measured latency of the network (backbone, extra layers and heads up to the
raw box offsets and class logits; post-processing is not timed, as in `mnv3 bench`).

Per runtime the models are timed round-robin (`measure_side_by_side`): each round a burst of
MobileNetV3-Large (full tail), then a burst of each other; a ratio is the median of the per-round
ratios, which holds while the machine's load comes and goes. Paper (Pixel 1, 1 core, 91 classes):
V3-Large 137 ms, reduced tail 119 ms (0.87x), V2 162 ms (1.18x). The CPU and its instruction sets
are printed beside the figures.

    python bench/detect_latency.py [--classes 80] [--runs 60] [--runtimes onnxruntime litert] [--size 320]
"""

from __future__ import annotations

import argparse
import sys
import time

from common import RESULTS, cpu_flags, write_csv

import mnv3
from mnv3.arch import reduced_tail
from mnv3.heads import ssdlite
from mnv3.latency import get_runtime, measure_side_by_side
from mnv3.latency.runtimes import calibrate_batchnorm, cpu_model
from mnv3.nn.profile import module_cost
from mnv3.nn.ssdlite import build_detector

PAPER_MS = {"mobilenet_v3_large": 137, "mobilenet_v3_large (reduced tail)": 119, "mobilenet_v2": 162}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--runs", type=int, default=60, help="timed runs per model (rounds of 3 runs each)")
    ap.add_argument("--runtimes", nargs="+", default=["onnxruntime", "litert"])
    ap.add_argument("--size", type=int, default=320)
    args = ap.parse_args()
    size = (args.size, args.size)
    print(f"CPU: {cpu_model()} [{cpu_flags()}], 1 thread, {args.size}x{args.size}, {args.classes} classes", flush=True)
    backbones = {"mobilenet_v3_large": mnv3.preset("mobilenet_v3_large"),
                 "mobilenet_v3_large (reduced tail)": reduced_tail(mnv3.preset("mobilenet_v3_large")),
                 "mobilenet_v2": mnv3.preset("mobilenet_v2")}
    models, costs = {}, {}
    for name, spec in backbones.items():
        spec = spec.replace(resolution=args.size)
        head = ssdlite(spec, args.classes, size)
        models[name] = calibrate_batchnorm(build_detector(spec, head), (2, 3, *size))
        costs[name] = module_cost(lambda s=spec, h=head: build_detector(s, h), size)[:2]
    rows = []
    for runtime_name in args.runtimes:
        runtime = get_runtime(runtime_name)
        t0 = time.time()
        sessions = [runtime.session(m, threads=1, input_shape=(1, 3, *size)) for m in models.values()]
        print(f"{runtime_name}: converted in {time.time() - t0:.0f} s, timing ...", flush=True)
        results = measure_side_by_side(sessions, args.runs, burst=3)
        for (name, (params, macs)), (timing, ratio) in zip(costs.items(), results):
            paper = PAPER_MS[name] / PAPER_MS["mobilenet_v3_large"]
            rows.append({"backbone": name, "input": f"{args.size}x{args.size}", "classes": args.classes,
                         "runtime": runtime_name, "params": params, "macs": macs,
                         "median_ms": round(timing.median_ms, 2), "p10_ms": round(timing.p10_ms, 2),
                         "p90_ms": round(timing.p90_ms, 2), "ratio_to_large": round(ratio, 3),
                         "paper_ratio": round(paper, 3), "runs": timing.runs, "cpu": cpu_model(),
                         "cpu_flags": cpu_flags()})
            print(f"  {name:<34} {params:>10,} params {macs / 1e9:>5.2f}B MACs {timing.median_ms:>8.2f} ms "
                  f"(p10 {timing.p10_ms:.2f}, p90 {timing.p90_ms:.2f})  x{ratio:.3f} of V3-Large "
                  f"(paper x{paper:.3f})", flush=True)
    path = write_csv("detect_latency.csv", rows)
    print(f"written {path.relative_to(RESULTS.parent.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
