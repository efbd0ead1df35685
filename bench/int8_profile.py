"""Where int8 time goes, per part of the network, on LiteRT and ONNX Runtime (issue 15's profile).

LiteRT: XNNPACK runs the whole graph as one delegate node, so LiteRT's op profiler sees one op.
Instead, each file is cut after the last op of every part (the stem, each block, the head) into
prefix graphs that end there; all prefixes of all files are timed interleaved in one run, and a
part's time is the median over rounds of (its prefix - the one before). A cut materialises the part's
output, which the whole graph also does at block boundaries, so the parts add up to the whole.
ONNX Runtime: its own profiler (per node, summed per op type; convolutions split into the stem,
depthwise, pointwise and SE ones).

Files per network (MobileNetV3-Large and -Small, 224x224, random weights with batch norm from random
images: latency only): float, int8 as `mnv3 export --int8` writes it (the stem float) and int8 with
`--int8-stem` (the whole graph integer). Writes bench/results/int8_profile_litert.csv and
int8_profile_onnx.csv.

    python bench/int8_profile.py [--nets mobilenet_v3_large mobilenet_v3_small] [--rounds 15]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED, cpu_flags, write_csv
from int8 import lite_session

import mnv3
from mnv3.deploy import export
from mnv3.deploy.export import verification_batch
from mnv3.deploy.tflite_int8 import read_model, write_model
from mnv3.latency.runtimes import calibrate_batchnorm, cpu_model

CALIBRATION = SHARED / "data" / "hymenoptera" / "train"
KINDS = {"float": {}, "int8": {"int8": True}, "int8 (int8 stem)": {"int8": True, "int8_stem": True}}


def part_names(model) -> list[str]:
    """The part each op of the first subgraph belongs to: stem, blockNN or head, from the output
    tensor names litert-torch writes (module paths); ops before the first block are the stem."""
    sub = model.subgraphs[0]
    raw = []
    for op in sub.operators:
        name = sub.tensors[op.outputs[0]].name.decode()
        m = re.search(r"InvertedResidual_(\d+)", name)
        raw.append(f"block{int(m.group(1)):02d}" if m else "")
    first = next(i for i, p in enumerate(raw) if p)
    return [p or ("stem" if i < first else "head") for i, p in enumerate(raw)]


def prefixes(path: Path, folder: Path) -> list[tuple[str, Path]]:
    parts = part_names(read_model(path))
    cuts = [i for i in range(len(parts)) if i == len(parts) - 1 or parts[i + 1] != parts[i]]
    out = []
    for c in cuts:
        model = read_model(path)
        sub = model.subgraphs[0]
        sub.operators = sub.operators[:c + 1]
        sub.outputs = [sub.operators[-1].outputs[0]]
        model.signatureDefs = []
        file = folder / f"{path.stem}-cut{c:03d}.tflite"
        write_model(model, file)
        out.append((parts[c], file))
    return out


def litert_parts(files: dict[str, Path], folder: Path, rounds: int, iters: int) -> dict[str, dict[str, float]]:
    fns, order = {}, []
    for kind, path in files.items():
        for part, file in prefixes(path, folder):
            fns[(kind, part)] = lite_session(file)
            order.append((kind, part))
    for fn in fns.values():
        for _ in range(5):
            fn()
    samples: dict[tuple, list[float]] = {k: [] for k in order}
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            for _ in range(iters):
                fns[k]()
            samples[k].append((time.perf_counter() - start) / iters * 1e3)
    out: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for kind in files:
        previous = [0.0] * rounds
        for k in [k for k in order if k[0] == kind]:
            out[kind][k[1]] = statistics.median(a - b for a, b in zip(samples[k], previous))
            previous = samples[k]
    return out


def onnx_ops(path: Path, runs: int, folder: Path) -> dict[str, tuple[float, int]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    warmup = 10
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    after = starts[warmup]             # node events of the timed runs only
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < after:
            continue
        op, name = e["args"]["op_name"], e["name"]
        if "Conv" in op:
            op += ("/stem" if "/stem/" in name else "/depthwise" if "/dw/" in name else
                   "/se" if "/se/" in name else "/pointwise")
        total[op] += e["dur"] / 1e3
        count[op] += 1
    return {op: (total[op] / runs, count[op] // runs) for op in total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="*", default=["mobilenet_v3_large", "mobilenet_v3_small"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ort-runs", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_model()}; {cpu_flags()}", flush=True)
    lite_rows, ort_rows = [], []
    with tempfile.TemporaryDirectory(prefix="mnv3-int8-profile-") as tmp:
        folder = Path(tmp)
        for name in args.nets:
            model = calibrate_batchnorm(mnv3.build(mnv3.preset(name, 1.0, 224), 1000), (8, 3, 224, 224))
            calib = verification_batch(model, str(CALIBRATION), 64, "--calibration")
            files: dict[str, dict[str, Path]] = {"tflite": {}, "onnx": {}}
            for fmt, written in files.items():
                for kind, flags in KINDS.items():
                    path = folder / f"{name}-{kind.replace(' ', '_').replace('(', '').replace(')', '')}.{fmt}"
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        export(model, path, fmt, calibration=str(CALIBRATION) if flags else None,
                               images=str(CALIBRATION), calibration_images=len(calib), tolerance=10.0,
                               force=True, **flags)
                    written[kind] = path
            print(f"{name}: LiteRT parts, {len(KINDS)} files cut after every part, timed interleaved", flush=True)
            parts = litert_parts(files["tflite"], folder, args.rounds, args.iters)
            names = list(parts["float"])
            print(f"\n{'part':<10}" + "".join(f"{k:>18}" for k in KINDS) + f"{'int8 / float':>14}")
            for part in names + ["total"]:
                ms = {k: (sum(parts[k].values()) if part == "total" else parts[k].get(part, float("nan")))
                      for k in KINDS}
                print(f"{part:<10}" + "".join(f"{ms[k]:>18.3f}" for k in KINDS) + f"{ms['int8'] / ms['float']:>14.2f}")
                lite_rows.append({"network": name, "part": part, **{f"{k} ms": round(ms[k], 4) for k in KINDS},
                                  "int8 / float": round(ms["int8"] / ms["float"], 3)})
            print(f"\n{name}: ONNX Runtime profiler, ms per run by op type (count per run)", flush=True)
            ops = {kind: onnx_ops(path, args.ort_runs, folder) for kind, path in files["onnx"].items()}
            for kind, table in ops.items():
                whole = sum(ms for ms, _ in table.values())
                print(f"  {kind} (sum of nodes {whole:.3f} ms): " + ", ".join(
                    f"{op} {ms:.3f} ({n})" for op, (ms, n) in sorted(table.items(), key=lambda kv: -kv[1][0])))
                for op, (ms, n) in table.items():
                    ort_rows.append({"network": name, "file": kind, "op": op, "ms_per_run": round(ms, 4),
                                     "nodes": n, "share": round(ms / whole, 4)})
    write_csv("int8_profile_litert.csv", lite_rows)
    write_csv("int8_profile_onnx.csv", ort_rows)
    print("written to bench/results/int8_profile_litert.csv and int8_profile_onnx.csv", file=sys.stderr)


if __name__ == "__main__":
    main()
