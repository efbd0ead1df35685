"""`mnv3 bench`: end-to-end latency of networks on one runtime, with the measurement protocol."""

from __future__ import annotations

import argparse
import sys

from mnv3.arch import SpecError
from mnv3.cli.common import add_arch_options, add_json, add_output, emit_json, spec_from_args

DEFAULT_CSV = "mnv3-bench.csv"


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure latency on a runtime (torch, onnxruntime, litert)",
                       description="Measure end-to-end latency of networks on one runtime with the "
                                   "protocol: fixed threads, warm-up, at least 50 timed runs, median "
                                   "with p10/p90; the first network is re-measured between the others "
                                   "and measurements taken while it drifted by more than 3% are repeated. "
                                   "ARCH: a preset, a peer's name, a spec JSON or a model file.")
    p.add_argument("archs", nargs="+", metavar="ARCH")
    p.add_argument("--runtime", required=True, help="torch, torch-fused, onnxruntime or litert")
    p.add_argument("--threads", type=int, default=1, help="threads the runtime may use (default 1)")
    p.add_argument("--batch", type=int, default=1)
    add_arch_options(p)
    p.add_argument("--runs", type=int, default=50, help="timed runs per network (at least 50)")
    add_output(p, "--csv", default=DEFAULT_CSV, metavar="FILE",
               help=f"CSV the rows are added to (default {DEFAULT_CSV}); a file with other columns is "
                    "kept and the rows go to a new file beside it")
    p.add_argument("--no-progress", action="store_true")
    add_json(p, "environment, results [{arch, runtime, median_ms, ...}], csv")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mnv3.complexity import count
    from mnv3.files import append_csv
    from mnv3.latency import MIN_RUNS, DriftGuard, LatencyError, check_threads, get_runtime, measure_all

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    if args.batch < 1:
        raise SpecError(f"--batch: expected at least 1, got {args.batch}")
    if args.runs < MIN_RUNS:      # before any (slow) conversion
        raise LatencyError(f"--runs: the protocol times at least {MIN_RUNS} runs, got {args.runs}")
    specs = [spec_from_args(args, a) for a in args.archs]
    env = runtime.environment(threads, args.batch, specs[0].resolution)
    print(f"{env.runtime} {env.runtime_version} on {env.cpu} ({env.cores} cores), {threads} thread(s), "
          f"batch {args.batch}, {args.runs} timed runs each", flush=True)
    sessions = [runtime.session(spec, threads=threads, batch=args.batch)
                for spec in tqdm(specs, desc="prepare", unit="net", file=sys.stderr,
                                 disable=args.no_progress)]
    guard = DriftGuard(sessions[0], runs=args.runs) if len(sessions) > 1 else None
    bar = tqdm(total=len(specs), desc="measure", unit="net", file=sys.stderr, disable=args.no_progress)
    timings = measure_all(sessions, guard, runs=args.runs, on_result=lambda i, t: bar.update())
    bar.close()
    rows = []
    print(f"{'arch':<34}{'params':>12}{'MACs':>10}{'median ms':>11}{'p10':>9}{'p90':>9}")
    for spec, timing in zip(specs, timings):
        cost = count(spec, 1000)
        env = runtime.environment(threads, args.batch, spec.resolution)
        rows.append({"arch": spec.name, "runtime": runtime.name, "median_ms": round(timing.median_ms, 4),
                     "p10_ms": round(timing.p10_ms, 4), "p90_ms": round(timing.p90_ms, 4),
                     "params": cost.params, "macs": cost.macs, "runs": timing.runs,
                     "repeats": timing.repeats, **{k: v for k, v in env.as_dict().items() if k != "runtime"}})
        print(f"{spec.name:<34}{cost.params:>12,}{cost.macs / 1e6:>9.1f}M{timing.median_ms:>11.3f}"
              f"{timing.p10_ms:>9.3f}{timing.p90_ms:>9.3f}")
    if guard is not None and guard.drifts:
        print(f"the reference ({specs[0].name}) drifted {guard.drifts} time(s) by more than 3%; "
              "those measurements were repeated", file=sys.stderr)
    path, how = append_csv(args.csv, rows)
    print({"appended": f"{len(rows)} row(s) appended to {path}",
           "written": f"written {path}",
           "new file": f"{args.csv} has other columns and was kept; written {path}"}[how])
    if args.json:
        keys = ("arch", "runtime", "median_ms", "p10_ms", "p90_ms", "params", "macs")
        emit_json({"environment": {k: v for k, v in rows[0].items() if k in env.as_dict()},
                   "results": [{k: r[k] for k in keys} for r in rows], "csv": str(path)})
    return 0
