"""MobileNetV3-Large and -Small on every runtime mnv3 measures (PyTorch eager, eager with batch norm
folded, ONNX Runtime, LiteRT/XNNPACK), single-threaded, batch 1, 224x224, in one run, with the
protocol (warm-up, 50 timed runs, median with p10/p90).

    python bench/runtimes.py [--runtimes torch torch-fused onnxruntime litert]
"""

from __future__ import annotations

import argparse
import sys

from common import write_csv
from tqdm import tqdm

import mnv3
from mnv3.latency import RUNTIMES, get_runtime, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 50 timed runs; the median is kept")
    args = parser.parse_args()
    specs = [mnv3.preset("mobilenet_v3_large"), mnv3.preset("mobilenet_v3_small")]
    sessions, envs = {}, {}
    for name in args.runtimes:
        runtime = get_runtime(name)
        envs[name] = runtime.environment(1, 1, 224)
        for spec in tqdm(specs, desc=f"prepare {name}", file=sys.stderr):
            sessions[(name, spec.name)] = runtime.session(spec)
    results = {key: [] for key in sessions}
    for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for key, fn in sessions.items():     # every runtime in every round: noise hits all alike
            results[key].append(measure(fn))
    cpu = next(iter(envs.values())).cpu
    print(f"{cpu}, 1 thread, batch 1, 224x224")
    print(f"{'runtime':<14}{'version':<15}{'network':<26}{'median ms':>10}{'p10':>9}{'p90':>9}")
    rows = []
    for (name, arch), timings in results.items():
        best = sorted(timings, key=lambda t: t.median_ms)[len(timings) // 2]
        env = envs[name]
        print(f"{name:<14}{env.runtime_version:<15}{arch:<26}{best.median_ms:>10.2f}{best.p10_ms:>9.2f}{best.p90_ms:>9.2f}")
        rows.append({"runtime": name, "runtime_version": env.runtime_version, "network": arch,
                     "median_ms": round(best.median_ms, 3), "p10_ms": round(best.p10_ms, 3),
                     "p90_ms": round(best.p90_ms, 3), "cpu": cpu})
    print(f"written {write_csv('runtimes.csv', rows)}")


if __name__ == "__main__":
    main()
