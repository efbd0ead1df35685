"""The paper's headline latency claims, on this device: MobileNetV3-Large 1.0 vs MobileNetV2 1.0 and
MobileNetV3-Small 1.0 vs MobileNetV2 0.35, on LiteRT (XNNPACK) and ONNX Runtime, single-threaded,
batch 1, 224x224, in one run. Each ratio is printed beside the paper's Pixel-1 ratio
(51/64 = 0.80 and 15.8/16.6 = 0.95).

    python bench/paper_latency.py [--rounds 5] [--runtimes litert onnxruntime]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import write_csv
from tqdm import tqdm

import mnv3
from mnv3.latency import get_runtime, measure

PAIRS = (  # (ours, baseline, paper ratio)
    (("mobilenet_v3_large", 1.0), ("mobilenet_v2", 1.0), 51 / 64),
    (("mobilenet_v3_small", 1.0), ("mobilenet_v2", 0.35), 15.8 / 16.6),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of 50 timed runs each")
    parser.add_argument("--runtimes", nargs="+", default=["litert", "onnxruntime"])
    args = parser.parse_args()
    rows = []
    for runtime_name in args.runtimes:
        runtime = get_runtime(runtime_name)
        env = runtime.environment(1, 1, 224)
        print(f"\n{runtime.name} {env.runtime_version} on {env.cpu}, 1 thread, batch 1, 224x224", flush=True)
        for (a_name, a_w), (b_name, b_w), paper in PAIRS:
            a_spec, b_spec = mnv3.preset(a_name, a_w), mnv3.preset(b_name, b_w)
            sessions = {a_spec.name: runtime.session(a_spec), b_spec.name: runtime.session(b_spec)}
            medians = {name: [] for name in sessions}
            for r in tqdm(range(args.rounds), desc=f"{a_spec.name} vs {b_spec.name}", file=sys.stderr):
                order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
                for name in order:
                    medians[name].append(measure(sessions[name]).median_ms)
            ratio = statistics.median(a / b for a, b in zip(medians[a_spec.name], medians[b_spec.name]))
            a_ms, b_ms = (statistics.median(medians[n]) for n in (a_spec.name, b_spec.name))
            print(f"  {a_spec.name} {a_ms:7.2f} ms vs {b_spec.name} {b_ms:7.2f} ms: ratio {ratio:.3f} "
                  f"(paper, Pixel-1 TFLite: {paper:.2f})")
            rows.append({"runtime": runtime.name, "runtime_version": env.runtime_version, "cpu": env.cpu,
                         "network": a_spec.name, "baseline": b_spec.name, "network_ms": round(a_ms, 3),
                         "baseline_ms": round(b_ms, 3), "ratio": round(ratio, 3), "paper_ratio": round(paper, 3)})
    print(f"\nwritten {write_csv('paper_latency.csv', rows)}")


if __name__ == "__main__":
    main()
