"""Accuracy of the latency predictor on this machine, in one run: build (or resume) the lookup table
for a space and runtime, calibrate on random networks, then measure other random networks end to
end and compare. Prints MAPE, RMSE and the share within ±5% / ±10% per runtime (the goal is 98%
within ±10%), and writes one row per validated network to bench/results/lut_accuracy_RUNTIME.csv
and the predicted-vs-measured scatter plot beside it (.png).

    python bench/lut_accuracy.py [--runtimes onnxruntime litert] [--space mobilenet_v3_large]
                                 [--calibrate 48] [--n 40] [--db sqlite:///lut-accuracy.sqlite]
                                 [--seed 7] [--passes 3] [--keep-calibration] [--tag _rerun]

`--keep-calibration` validates against the calibration the table holds (the same networks timed
anew: how far one run's readings move from another's); `--passes N` times the validation networks
in N whole runs, one after another, and compares each network's median reading (the table's entries
are timed in passes for the same reason); `--tag` names the CSV and PNG apart.

Run it on a quiet machine: every other process on the cores moves the numbers.
"""

from __future__ import annotations

import argparse
import time

from common import RESULTS, write_csv

from mnv3.latency import check_threads, get_runtime
from mnv3.latency.lut import build_table, calibrate, passes_note, scatter_plot, validate
from mnv3.latency.table import LatencyTable
from mnv3.space import SearchSpace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", default=["onnxruntime"])
    parser.add_argument("--space", default="mobilenet_v3_large", help="seed preset of the space")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--calibrate", type=int, default=48,
                        help="networks measured to fit the calibration (default 48; `mnv3 lut build` calibrates on 12)")
    parser.add_argument("--n", type=int, default=40, help="other networks measured to validate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--db", default="sqlite:///lut-accuracy.sqlite")
    parser.add_argument("--seed", type=int, default=7, help="which random networks are validated (default 7)")
    parser.add_argument("--passes", type=int, default=3,
                        help="whole runs over the validation networks, each network's median compared (default 3)")
    parser.add_argument("--keep-calibration", action="store_true",
                        help="validate against the table's calibration instead of calibrating afresh")
    parser.add_argument("--tag", default="", help="suffix of the CSV and PNG names")
    args = parser.parse_args()

    from mnv3.presets import resolve_arch

    space = SearchSpace(resolve_arch(args.space, resolution=args.resolution))
    table = LatencyTable(args.db)
    threads = check_threads(args.threads)
    lines = []
    for name in args.runtimes:
        runtime = get_runtime(name)
        start = time.perf_counter()
        summary = build_table(space, runtime, table, threads=threads, calibration_networks=args.calibrate)
        if summary["measured"] == 0 and not args.keep_calibration:   # the table was complete: calibrate afresh
            summary["calibration"] = calibrate(space, runtime, table, threads=threads, n=args.calibrate)
        built = time.perf_counter() - start
        stats, points = validate(space, runtime, table, n=args.n, threads=threads, seed=args.seed,
                                 passes=args.passes)
        cal = summary["calibration"]
        worst = max(points, key=lambda p: abs(p[1] / p[2] - 1))
        line = (f"{runtime.name}: {summary['entries']} entries ({summary['measured']} measured now, "
                + (f"the calibration on {cal['n']} networks kept); " if args.keep_calibration and not summary["measured"]
                   else f"{built / 60:.1f} min with calibration on {cal['n']} networks); ")
                + f"{stats['n']} other networks (seed {args.seed}"
                + passes_note(stats, ", ") + "): "
                f"MAPE {stats['mape']:.1%}, RMSE {stats['rmse_ms']:.2f} ms, within ±5% {stats['within_5']:.1%}, "
                f"within ±10% {round(stats['within_10'] * stats['n'])}/{stats['n']} = {stats['within_10']:.1%} "
                f"(goal 98%); worst {worst[1]:.2f} ms predicted against {worst[2]:.2f} measured")
        print(line)
        lines.append(line)
        scatter_plot(points, RESULTS / f"lut_accuracy_{runtime.name}{args.tag}.png",
                     f"{space.key()} on {runtime.name}, seed {args.seed}\n{stats['within_10']:.0%} within ±10%, "
                     f"MAPE {stats['mape']:.1%}")
        write_csv(f"lut_accuracy_{runtime.name}{args.tag}.csv",
                  [{"network": n, "predicted_ms": round(p, 4), "measured_ms": round(m, 4),
                    "error": round((p - m) / m, 4)} for n, p, m in points])
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
