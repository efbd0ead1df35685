"""The search figure again, with the supernet as the oracle: on this CPU, in the space of
bench/supernet_rank.py (the search's default space around MobileNetV3-Small, 32x32 CIFAR-10 proxy,
total stride 8) and with T = MobileNetV3-Small 0.75's latency on ONNX Runtime:

  * `mnv3 search --oracle supernet:DIR` for `--search-minutes` (the supernet of supernet_rank.py);
  * `mnv3 search` with the proxy-training oracle for the same wall time: the supernet's training
    time (from its metrics.csv) plus the supernet search's;
  * the best network of each, and the width-scaled MobileNetV3-Small at 0.5, 0.75 and 1.0, trained
    alone with the same recipe and several seeds, measured side by side in one round-robin run;
    test top-1 (CIFAR-10's test split, never seen by either search) against measured latency.

Stages write under bench/results/supernet_search/ and are skipped when done.

    python bench/supernet_search.py [--search-minutes 10] [--seeds 2] [--final-epochs 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
import time

import search_cifar10 as figure
import supernet_rank as rank
from common import RESULTS, write_csv

import mnv3
from mnv3.cli import main as mnv3_main

OUT = RESULTS / "supernet_search"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def supernet_minutes() -> float:
    with open(rank.OUT / "supernet" / "metrics.csv") as f:
        return sum(float(r["epoch_s"]) for r in csv.DictReader(f)) / 60


def search(oracle: str, minutes: float, args) -> dict:
    out = OUT / f"search-{oracle.split(':')[0]}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cmd = ["search", "--space", str(rank.space_file()), "--data", str(rank.DATA), "--runtime", rank.RUNTIME,
           "--build-table", "--db", f"sqlite:///{rank.OUT / 'lut.sqlite'}", "--target-of", "mobilenet_v3_small",
           "--target-width", "0.75", "--strategy", "evolution", "--out", str(out), "--no-progress", "--final-k", "3",
           "--references", "--trials", "100000", "--minutes", f"{minutes:.2f}", "--threads", str(args.threads)]
    if oracle == "proxy":
        cmd += ["--proxy-subset", str(args.subset), "--proxy-epochs", str(args.proxy_epochs), "--proxy-held-out",
                str(args.held_out), "--population", "12"]
    else:
        cmd += ["--oracle", f"supernet:{rank.OUT / 'supernet'}", "--population", "50"]
    log(f"search with the {oracle.split(':')[0]} oracle: {minutes:.1f} minutes")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        if mnv3_main(cmd) != 0:
            sys.exit(f"the {oracle} search failed")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search-minutes", type=float, default=10, help="the supernet search's budget")
    parser.add_argument("--subset", type=int, default=5000, help="proxy training images (as the supernet's)")
    parser.add_argument("--held-out", type=float, default=2000)
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--final-epochs", type=int, default=4)
    parser.add_argument("--final-subset", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stage", choices=("all", "supernet-search", "proxy-search", "final"), default="all")
    args = parser.parse_args()
    import torch

    from mnv3.latency.runtimes import cpu_model

    torch.set_num_threads(args.threads)
    figure.OUT = OUT              # final trainings of this figure land here
    OUT.mkdir(parents=True, exist_ok=True)
    log(f"CPU: {cpu_model()}; runtime {rank.RUNTIME}, 1 thread")
    if not (rank.OUT / "supernet" / "supernet.safetensors").is_file():
        sys.exit("no supernet yet: run bench/supernet_rank.py --stage supernet first")
    trained = supernet_minutes()
    budgets = {"supernet": args.search_minutes, "proxy": trained + args.search_minutes}
    summaries = {}
    if args.stage in ("all", "supernet-search", "final"):
        summaries["supernet"] = search(f"supernet:{rank.OUT / 'supernet'}", budgets["supernet"], args)
    if args.stage in ("all", "proxy-search", "final"):
        summaries["proxy"] = search("proxy", budgets["proxy"], args)
    if args.stage not in ("all", "final"):
        return
    nets = {"supernet's best": mnv3.ArchSpec.load(summaries["supernet"]["best"]),
            "proxy's best": mnv3.ArchSpec.load(summaries["proxy"]["best"]),
            **{f"small x{w}": figure.family(w) for w in (0.5, 0.75, 1.0)}}
    results = {name: [figure.train_final(spec, name.replace(" ", "_").replace("'", ""), seed, args)
                      for seed in range(args.seeds)] for name, spec in nets.items()}
    log("measuring every network side by side")
    ms = figure.measure_all(nets)
    rows = []
    for name, runs in results.items():
        tops = [r["top1"] for r in runs]
        which = name.split("'")[0]
        rows.append({"network": name, "measured_ms": round(ms[name], 4), "top1_mean": round(statistics.mean(tops), 4),
                     "top1_min": min(tops), "top1_max": max(tops), "seeds": len(tops),
                     "params": mnv3.count(nets[name], 10).params,
                     "search_trials": summaries[which]["trials"] if which in summaries else "",
                     "search_minutes": round(budgets[which], 1) if which in budgets else ""})
    curve = [(r["measured_ms"], r["top1_mean"]) for r in rows if r["network"].startswith("small")]
    spread = max(r["top1_max"] - r["top1_min"] for r in rows)
    print(f"\n{'network':<17}{'measured ms':>12}{'test top-1':>11}{'min':>8}{'max':>8}{'trials':>8}{'minutes':>9}")
    for r in rows:
        print(f"{r['network']:<17}{r['measured_ms']:>12.3f}{r['top1_mean']:>11.4f}{r['top1_min']:>8.4f}"
              f"{r['top1_max']:>8.4f}{r['search_trials']!s:>8}{r['search_minutes']!s:>9}")
    extra = []
    for r in rows[:2]:
        expected = figure.interpolate(r["measured_ms"], curve)
        print(f"{r['network']}: {r['top1_mean']:.4f} at {r['measured_ms']:.3f} ms; width-scaled curve there "
              f"{expected:.4f} ({r['top1_mean'] - expected:+.4f}; seeds' spread {spread:.4f})")
        extra.append({"network": f"curve at {r['network']}", "measured_ms": r["measured_ms"],
                      "top1_mean": round(expected, 4)})
    print(f"(supernet: {trained:.1f} min of training + {args.search_minutes:.1f} min of search; proxy search "
          f"{budgets['proxy']:.1f} min)")
    write_csv("supernet_search.csv", rows + extra)


if __name__ == "__main__":
    main()
