"""`mnv3 bench`: end-to-end latency of networks on one runtime, with the measurement protocol."""

from __future__ import annotations

import argparse
import sys

from mnv3.arch import SpecError
from mnv3.cli.common import (
    add_arch_options,
    add_json,
    add_output,
    add_task_options,
    dense_from_args,
    emit_json,
)

DEFAULT_CSV = "mnv3-bench.csv"


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure latency on a runtime (torch, onnxruntime, litert)",
                       description="Measure end-to-end latency of networks on one runtime with the "
                                   "protocol: fixed threads, warm-up, at least 50 timed runs per network, "
                                   "median with p10/p90. Several networks are timed side by side, "
                                   "round-robin: each round times a burst of every other network (at least 3 "
                                   "runs and 10 ms, so that a network's cold first runs after the others ran "
                                   "do not set its median), each followed by a burst of the first, and every "
                                   "network gets its ratio "
                                   "to the first (the median of the per-round ratios, which holds while "
                                   "another job loads the machine). "
                                   "ARCH: a preset, a peer's name, a spec JSON or a model file. A "
                                   "segmentation model (a model file, or ARCH with --task segment) is "
                                   "timed whole (backbone, head and the final upsampling) at its "
                                   "resolution; a detector (--task detect) is timed as a network: "
                                   "backbone, extra layers and heads up to the raw box offsets and class "
                                   "logits, without the post-processing (decoding, NMS). An exported "
                                   "file (.onnx on onnxruntime, .tflite from `mnv3 export` on litert) is "
                                   "timed as it is: the deployed file's latency.")
    p.add_argument("archs", nargs="+", metavar="ARCH")
    p.add_argument("--runtime", required=True, help="torch, torch-fused, onnxruntime or litert")
    p.add_argument("--threads", type=int, default=1, help="threads the runtime may use (default 1)")
    p.add_argument("--batch", type=int, default=1)
    add_arch_options(p, dense=True)
    add_task_options(p)
    p.add_argument("--num-classes", "--classes", type=int, default=None, dest="num_classes",
                   help="--task segment or detect: classes of the head (default 19 and 80)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per network (at least 50)")
    add_output(p, "--csv", default=DEFAULT_CSV, metavar="FILE",
               help=f"CSV the rows are added to (default {DEFAULT_CSV}); a file with other columns is "
                    "kept and the rows go to a new file beside it")
    p.add_argument("--no-progress", action="store_true")
    add_json(p, "environment, results [{arch, runtime, median_ms, p10_ms, p90_ms, ratio, params, macs}], csv")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mnv3.files import append_csv
    from mnv3.latency import MIN_RUNS, LatencyError, check_threads, get_runtime, measure, measure_side_by_side

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    if args.batch < 1:
        raise SpecError(f"--batch: expected at least 1, got {args.batch}")
    if args.runs < MIN_RUNS:      # before any (slow) conversion
        raise LatencyError(f"--runs: the protocol times at least {MIN_RUNS} runs, got {args.runs}")
    nets = [_network(args, a) for a in args.archs]
    specs = [n[0] for n in nets]
    env = runtime.environment(threads, args.batch, nets[0][2][0])
    print(f"{env.runtime} {env.runtime_version} on {env.cpu} ({env.cores} cores), {threads} thread(s), "
          f"batch {args.batch}, at least {args.runs} timed runs each", flush=True)
    sessions = [_session(runtime, threads, args.batch, spec, module, size)
                for spec, module, size, _ in tqdm(nets, desc="prepare", unit="net", file=sys.stderr,
                                                  disable=args.no_progress)]
    if len(sessions) == 1:
        results = [(measure(sessions[0], args.runs), 1.0)]
    else:
        # Round-robin in short bursts, each burst followed by one of the first network: a load that
        # comes and goes hits every network alike, and the per-round ratios cancel it (timed one
        # after the other, mobilenet_v3_large / mobilenet_v2 on LiteRT read 1.12 under load, 0.85 idle).
        rounds = -(-args.runs // 3)
        with tqdm(total=rounds, desc=f"measure {len(specs)} networks side by side", unit="round",
                  file=sys.stderr, disable=args.no_progress) as bar:
            results = measure_side_by_side(sessions, args.runs, burst=3, on_round=lambda r: bar.update())
    rows = []
    print(f"{'arch':<34}{'params':>12}{'MACs':>10}{'median ms':>11}{'p10':>9}{'p90':>9}{'ratio':>8}")
    for (spec, _, size, (name, params, macs)), (timing, ratio) in zip(nets, results):
        env = runtime.environment(threads, args.batch, size[0])
        rows.append({"arch": name, "runtime": runtime.name, "median_ms": round(timing.median_ms, 4),
                     "p10_ms": round(timing.p10_ms, 4), "p90_ms": round(timing.p90_ms, 4),
                     "ratio": round(ratio, 4), "params": params, "macs": macs, "runs": timing.runs,
                     **{k: v for k, v in env.as_dict().items() if k != "runtime"}, "input": f"{size[0]}x{size[1]}"})
        print(f"{name:<34}{params:>12,}{macs / 1e6:>9.1f}M{timing.median_ms:>11.3f}"
              f"{timing.p10_ms:>9.3f}{timing.p90_ms:>9.3f}{ratio:>8.3f}")
    if len(specs) > 1:
        print(f"ratio: each network's time over {nets[0][3][0]}'s, median of {rounds} rounds timed side by side")
    path, how = append_csv(args.csv, rows)
    print({"appended": f"{len(rows)} row(s) appended to {path}",
           "written": f"written {path}",
           "new file": f"{args.csv} has other columns and was kept; written {path}"}[how])
    if args.json:
        keys = ("arch", "runtime", "median_ms", "p10_ms", "p90_ms", "ratio", "params", "macs")
        emit_json({"environment": {k: v for k, v in rows[0].items() if k in env.as_dict()},
                   "results": [{k: r[k] for k in keys} for r in rows], "csv": str(path)})
    return 0


def _session(runtime, threads: int, batch: int, spec, module, size):
    """A timing session: an exported file run as it is, a spec converted (and cached), a module."""
    from pathlib import Path

    if isinstance(module, Path):
        return _file_session(runtime, module, threads, batch)
    if module is None:
        return runtime.session(spec, threads=threads, batch=batch)
    return runtime.session(module, threads=threads, input_shape=(batch, 3, *size))


def _file_session(runtime, path, threads: int, batch: int):
    """The exported file itself on its runtime (.onnx: onnxruntime, .tflite: litert), at the batch
    it was exported with (a dynamic batch: --batch)."""
    import numpy as np

    from mnv3.deploy import read_metadata
    from mnv3.deploy.runner import RUNNABLE
    from mnv3.latency import LatencyError

    wanted = RUNNABLE[path.suffix.lower()]
    if runtime.name != wanted:
        raise LatencyError(f"{path}: an exported {path.suffix} file runs on {wanted}; pass --runtime {wanted}")
    if wanted == "litert":
        return runtime.session_from_tflite(path.read_bytes(), threads)
    info = read_metadata(path)["input"]
    b = batch if info.get("batch") == "dynamic" else int(info.get("batch", 1))
    x = np.random.default_rng(0).standard_normal((b, 3, info["height"], info["width"])).astype(np.float32)
    return runtime.session_from_onnx(path.read_bytes(), x, threads)


def _network(args: argparse.Namespace, arch: str):
    """(spec, module, path or None, (h, w), (name, params, MACs)): a classifier is timed from its
    spec (its conversion cached), a segmentation or detection model as a module at its own
    resolution (a detector without its post-processing: the network's raw boxes and logits), an
    exported file (.onnx, or a .tflite that `mnv3 export` wrote) as the file itself."""
    from pathlib import Path

    from mnv3.arch import is_model_file
    from mnv3.complexity import count
    from mnv3.deploy.runner import ExportedModel, is_exported

    if is_exported(arch):
        exported = ExportedModel(arch)
        spec, head = exported.spec, getattr(exported, "head_spec", None)
        if head is None:
            cost = count(spec, exported.num_classes)
            return spec, Path(arch), (spec.resolution, spec.resolution), (Path(arch).name, cost.params, cost.macs)
        from mnv3.nn import build_dense
        from mnv3.nn.profile import module_cost

        params, macs, _ = module_cost(lambda: build_dense(spec, head), tuple(head.resolution))
        return spec, Path(arch), tuple(head.resolution), (Path(arch).name, params, macs)

    spec, head = dense_from_args(args, arch)
    if head is None:
        cost = count(spec, 1000)
        return spec, None, (spec.resolution, spec.resolution), (spec.name, cost.params, cost.macs)
    from mnv3.latency.runtimes import calibrate_batchnorm
    from mnv3.nn import build_dense
    from mnv3.nn.profile import module_cost

    size = tuple(head.resolution)
    if is_model_file(arch) and args.resolution is None and not args.num_classes:
        from mnv3.weights import load

        module = load(arch)
    else:
        module = calibrate_batchnorm(build_dense(spec, head), (2, 3, *size))
    params, macs, _ = module_cost(lambda: build_dense(spec, head), size)
    return spec, module, size, (f"{spec.name}+{head.kind}", params, macs)
