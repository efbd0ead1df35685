"""The figure the search exists for: on this CPU, with T = the latency of MobileNetV3-Small 0.75 on
ONNX Runtime (1 thread, batch 1, 32x32 CIFAR input, total stride 8), search a space around
MobileNetV3-Small on a CIFAR-10 proxy within a time budget; then train the best network found and
the seed family at widths 0.5, 0.75 and 1.0 with the same recipe and several seeds, measure them all
end to end in one round-robin run, and print test top-1 against measured latency. The goal: the
found network sits above the width-scaled curve (more accurate than the preset interpolated at its
latency) by more than the seeds' spread.

Then the strategies side by side on the same budget of trials with a cheaper oracle (the same for
all three): best reward after N trials for ppo, evolution and random.

Every stage writes its results under bench/results/search_cifar10/ and is skipped when run again
(the search continues its study), so a stopped run resumes.

    python bench/search_cifar10.py [--search-minutes 60] [--seeds 2] [--final-epochs 4]
                                   [--train-only found x0.5 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, SHARED, write_csv

import mnv3
from mnv3.arch import with_total_stride
from mnv3.cli import main as mnv3_main
from mnv3.data.datasets import open_data
from mnv3.search.genome import GenomeSpace
from mnv3.train.recipe import load_recipe

DATA = SHARED / "data" / "cifar10"
OUT = RESULTS / "search_cifar10"
RUNTIME = "onnxruntime"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def family(width: float) -> mnv3.ArchSpec:
    return with_total_stride(mnv3.preset("mobilenet_v3_small", width, 32), 8)


def space_file() -> Path:
    """The space: around MobileNetV3-Small at 32x32 (total stride 8), MnasNet's per-block choices
    (kernel 3/5/7, expansion 3/4/6, SE, ReLU/h-swish, depth -1/0/+1) and stage widths 0.5/0.75/1.0 of
    the seed's: with the default 0.75/1.0/1.25, the fastest network of the space (0.60 ms) was
    slower than the target itself (MobileNetV3-Small 0.75, 0.56-0.70 ms) on this CPU, since an
    expansion ratio of 3 at 32x32 costs more than the seed's first block (ratio 1)."""
    from mnv3.space import SearchSpace

    path = OUT / "space.json"
    if not path.is_file():
        SearchSpace(family(1.0), widths=(0.5, 0.75, 1.0)).save(path)
    return path


def run_search(args) -> dict:
    """`mnv3 search` itself, as many trials as fit the budget (`--minutes`; the study keeps them, so
    a rerun continues)."""
    out = OUT / f"search-c10{args.tag}"      # the 10-class space (runs before --classes: search/, another study)
    cmd = ["search", "--space", str(space_file()), "--data", str(DATA), "--runtime", RUNTIME,
           "--build-table", "--db", f"sqlite:///{OUT / 'lut.sqlite'}", "--target-of", "mobilenet_v3_small",
           "--classes", "10",      # the networks are timed as the 10-class classifiers they become
           "--target-width", "0.75", "--proxy-subset", str(args.proxy_subset), "--proxy-epochs",
           str(args.proxy_epochs), "--proxy-held-out", str(args.held_out), "--strategy", "evolution",
           "--population", "12", "--out", str(out), "--no-progress", "--final-k", "3", "--references",
           "--trials", "10000", "--minutes", str(args.search_minutes), "--threads", str(args.threads),
           "--rerank", str(args.rerank), "--rerank-seeds", str(args.rerank_seeds)]
    log(f"search: {args.search_minutes} minutes")
    if not (out / "summary.json").is_file() and mnv3_main(cmd) != 0:
        sys.exit("the search failed")
    return json.loads((out / "summary.json").read_text())


def train_final(spec: mnv3.ArchSpec, label: str, seed: int, args) -> dict:
    """One final training (the same recipe for every network), top-1 on CIFAR-10's test split."""
    from mnv3.train.classify import train

    # kept per final recipe too: a rerun with other --final-epochs/--final-subset must not reuse them
    out = OUT / f"final-e{args.final_epochs}-n{args.final_subset}" / f"{label}-seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = load_recipe("cifar").override({"epochs": args.final_epochs, "seed": seed})
    data = final_data(args.final_subset)
    log(f"final training: {label}, seed {seed}")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        result = train(data, out, arch=spec, recipe=recipe, resume=(out / "checkpoint.pt").exists(),
                       progress=False, tensorboard=False, checkpoint_steps=200)
    return result.as_dict()


_FINAL = {}


def final_data(subset: int):
    """CIFAR-10's training images (a fixed random subset of `subset`, the same for every network)
    and its test split, which the search never saw."""
    if subset not in _FINAL:
        import numpy as np

        from mnv3.search.oracle import _take

        data = open_data(str(DATA))
        if subset and subset < len(data.train):
            idx = np.sort(np.random.default_rng(0).permutation(len(data.train))[:subset])
            data.train = _take(data.train, idx)
        _FINAL[subset] = data
    return _FINAL[subset]


def measure_all(specs: dict[str, mnv3.ArchSpec]) -> dict[str, float]:
    """Every network timed side by side, round-robin, in one run (ms, 1 thread), as the trained
    CIFAR-10 classifiers they are (10 classes: a bare spec's session carries a 1000-class
    classifier, about a quarter of these networks' time), in bursts of at least 10 ms each
    (`protocol.BURST_MS`: bursts of 3 calls timed the networks' cold first calls, +19% to +35%)."""
    from mnv3.latency import get_runtime
    from mnv3.latency.protocol import measure_side_by_side
    runtime = get_runtime(RUNTIME)
    names = list(specs)
    sessions = [runtime.session(specs[n], threads=1, num_classes=10) for n in names]
    timed = measure_side_by_side(sessions, runs=150)
    return {n: t.median_ms for n, (t, _) in zip(names, timed)}


def interpolate(x: float, points: list[tuple[float, float]]) -> float:
    """The width-scaled curve's accuracy at latency x (linear between presets, extended at the ends)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1 or (x1, y1) == pts[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def strategy_oracle(args) -> tuple[str, list[str]]:
    """The strategies' oracle: a short proxy training, or a supernet (`--strategy-oracle DIR`, over
    its own space, with the latency table beside it, as bench/supernet_rank.py leaves them)."""
    if args.strategy_oracle:
        where = Path(args.strategy_oracle)
        return f"supernet-{where.name}", ["--oracle", f"supernet:{where}", "--db",
                                          f"sqlite:///{where.parent / 'lut.sqlite'}", "--build-table"]
    return (f"{args.strategy_subset}x{args.strategy_epochs}-c10",
            ["--space", str(space_file()), "--data", str(DATA), "--db", f"sqlite:///{OUT / 'lut.sqlite'}",
             "--classes", "10", "--proxy-subset", str(args.strategy_subset), "--proxy-epochs",
             str(args.strategy_epochs), "--proxy-held-out", "1000"])


def best_so_far(out: Path) -> list[float]:
    """The best reward after each finished trial, in trial order (a network proposed again counts as
    a trial, as MnasNet counted its controller's samples)."""
    import csv

    with open(out / "trials.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["trial"]))
    rewards = [float(r["reward"]) for r in rows]
    return [max(rewards[:i + 1]) for i in range(len(rewards))]


def strategies(args) -> tuple[list[dict], dict[str, list[list[float]]]]:
    """ppo, evolution and random side by side: the same trials, the same cheap oracle, each with
    every seed of --strategy-seeds (a strategy's luck on one seed says little)."""
    rows, curves = [], {strategy: [] for strategy in ("random", "evolution", "ppo")}
    tag, oracle = strategy_oracle(args)
    # seed by seed, the three strategies each: a run cut short still compares them
    for seed, strategy in itertools.product(args.strategy_seeds, curves):
        out = OUT / (f"strategy-{strategy}-{tag}" + (f"-s{seed}" if seed else ""))
        cmd = ["search", *oracle, "--runtime", RUNTIME, "--target-of", "mobilenet_v3_small", "--target-width",
               "0.75", "--strategy", strategy, "--trials", str(args.strategy_trials), "--out", str(out),
               "--no-progress", "--final-k", "1", "--references", "--json", "--threads", str(args.threads),
               "--seed", str(seed)]
        if strategy == "evolution":
            cmd += ["--population", str(max(4, args.strategy_trials // 3))]
        log(f"strategy {strategy}, seed {seed}: {args.strategy_trials} trials ({tag})")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            failed = mnv3_main(cmd) != 0
        if failed:
            sys.exit(f"strategy {strategy} failed (run `mnv3 {' '.join(cmd)}` to see why)")
        summary = json.loads((out / "summary.json").read_text())
        best = best_so_far(out)
        curves[strategy].append(best)
        rows.append({"strategy": strategy, "seed": seed, "trials": len(best), "best_reward": best[-1],
                     "best_accuracy": summary["accuracy"], "best_predicted_ms": summary["predicted_ms"],
                     "best_after_quarter": best[len(best) // 4 - 1], "best_after_half": best[len(best) // 2 - 1],
                     "oracle": tag})
    rows.sort(key=lambda r: (list(curves).index(r["strategy"]), r["seed"]))
    return rows, curves


def plot_strategies(curves: dict[str, list[list[float]]], path: Path, tag: str) -> None:
    """Best reward so far against trials: each seed thin, the mean of the seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (strategy, runs), colour in zip(curves.items(), ("tab:gray", "tab:green", "tab:blue")):
        n = min(len(r) for r in runs)
        for r in runs:
            ax.plot(range(1, len(r) + 1), r, color=colour, alpha=0.3, lw=0.8)
        ax.plot(range(1, n + 1), [statistics.mean(r[i] for r in runs) for i in range(n)], color=colour, lw=2.2,
                label=f"{strategy} (mean of {len(runs)} seeds)")
    ax.set(xlabel="trials", ylabel="best reward so far", title=f"strategies side by side, oracle {tag}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_final(rows: list[dict], expected: float, spread: float, path: Path, title: str) -> None:
    """Test top-1 against measured latency: the presets joined as the width-scaled curve, the found
    network on its own, each point's bar from its worst seed to its best, and the curve's value at
    the found network's latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    presets = sorted((r for r in rows if r["network"] != "found"), key=lambda r: r["measured_ms"])
    mine = next(r for r in rows if r["network"] == "found")
    for group, style, colour, size, label in ((presets, "o-", "tab:gray", 6, "width-scaled presets"),
                                              ([mine], "*", "tab:red", 12, "found network")):
        ax.errorbar([r["measured_ms"] for r in group], [r["top1_mean"] for r in group],
                    yerr=[[r["top1_mean"] - r["top1_min"] for r in group], [r["top1_max"] - r["top1_mean"] for r in group]],
                    fmt=style, color=colour, capsize=4, ms=size, label=f"{label} (mean, seeds' min to max)")
    for r in presets:
        ax.annotate(r["network"].replace("small ", ""), (r["measured_ms"], r["top1_mean"]),
                    textcoords="offset points", xytext=(6, -12))
    ax.plot([mine["measured_ms"]], [expected], "x", color="black", ms=9,
            label=f"curve at the found network's latency ({mine['top1_mean'] - expected:+.4f}; spread {spread:.4f})")
    ax.set(xlabel="measured latency (ms, 1 thread)", ylabel="test top-1", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-minutes", type=float, default=60, help="budget of the search (default 60)")
    parser.add_argument("--proxy-subset", type=int, default=4000, help="proxy training images (default 4000)")
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--held-out", type=float, default=2000, help="training images candidates are ranked on")
    parser.add_argument("--rerank", type=int, default=5,
                        help="the search's best networks trained again before best.json is chosen (default 5; 0: off)")
    parser.add_argument("--rerank-seeds", type=int, default=3, help="proxy trainings per reranked network (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="final trainings per network (default 2)")
    parser.add_argument("--final-epochs", type=int, default=4, help="epochs of the final trainings (default 4)")
    parser.add_argument("--final-subset", type=int, default=10000,
                        help="training images of the final trainings (default 10000; 0: all 50,000)")
    parser.add_argument("--strategy-trials", type=int, default=30)
    parser.add_argument("--strategy-subset", type=int, default=2000, help="images of the strategies' oracle")
    parser.add_argument("--strategy-epochs", type=int, default=2, help="epochs of the strategies' oracle")
    parser.add_argument("--strategy-oracle", metavar="SUPERNET_DIR",
                        help="a supernet folder as the strategies' oracle, over its own space (hundreds of "
                             "trials in the time of a few proxy trainings), e.g. "
                             "bench/results/supernet_rank/supernet")
    parser.add_argument("--strategy-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the strategies' samplers: each strategy runs once per seed (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads of the proxy and final trainings (default 2; 1 leaves a core free)")
    parser.add_argument("--tag", default="", help="suffix of the search folder and the results CSV (e.g. _rerank)")
    parser.add_argument("--train-only", nargs="+", choices=["found", "x0.5", "x0.75", "x1.0"],
                        help="train only these networks' final trainings and stop (so that two processes of "
                             "--threads 1 share them; a run without it then measures and prints)")
    parser.add_argument("--skip-strategies", action="store_true")
    parser.add_argument("--only-strategies", action="store_true", help="just the strategies side by side")
    args = parser.parse_args()
    import torch

    from mnv3.latency.runtimes import cpu_model

    torch.set_num_threads(args.threads)
    log(f"CPU: {cpu_model()}; runtime {RUNTIME}, 1 thread; budget {args.search_minutes} min; "
        f"training on {args.threads} thread(s)")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only_strategies:
        print_strategies(args)
        return
    summary = run_search(args)
    found = mnv3.ArchSpec.load(summary["best"])
    log(f"search: {summary['trials']} trials, best {summary['best']} (proxy accuracy {summary['accuracy']:.4f}, "
        f"{summary['predicted_ms']:.3f} ms predicted, T = {summary['target_ms']:.3f} ms)")
    if summary.get("rerank"):
        log(f"reranked: the best {summary['rerank']['networks']} by one proxy training, trained "
            f"{summary['rerank']['seeds']} times each: " + "; ".join(
                f"{f['label']} {f['search_accuracy']:.4f} -> {f['accuracy']:.4f}" for f in summary["finals"]))
    nets = {"found": found, **{f"small x{w}": family(w) for w in (0.5, 0.75, 1.0)}}
    # The found network's trainings are kept under what it is (the search's key of a network): a
    # later search that finds another network must not reuse them.
    labels = {"found": f"found-{GenomeSpace.spec_key(found)}", **{n: n.replace(" ", "_") for n in nets if n != "found"}}
    if args.train_only:
        for name in args.train_only:
            key = name if name == "found" else f"small {name}"
            for seed in range(args.seeds):
                train_final(nets[key], labels[key], seed, args)
        log(f"trained {', '.join(args.train_only)}; run again without --train-only to measure and compare")
        return
    results = {name: [train_final(spec, labels[name], seed, args) for seed in range(args.seeds)]
               for name, spec in nets.items()}
    log("measuring every network side by side")
    ms = measure_all(nets)
    rows = []
    for name, runs in results.items():
        tops = [r["top1"] for r in runs]
        rows.append({"network": name, "measured_ms": round(ms[name], 4), "top1_mean": round(statistics.mean(tops), 4),
                     "top1_min": min(tops), "top1_max": max(tops), "seeds": len(tops),
                     "params": mnv3.count(nets[name], 10).params, "macs": mnv3.count(nets[name], 10).macs,
                     "final_epochs": args.final_epochs, "final_subset": args.final_subset})
    curve = [(r["measured_ms"], r["top1_mean"]) for r in rows if r["network"] != "found"]
    mine = rows[0]
    expected = interpolate(mine["measured_ms"], curve)
    spread = max(r["top1_max"] - r["top1_min"] for r in rows)
    print(f"\n{'network':<14}{'measured ms':>12}{'test top-1':>11}{'min':>8}{'max':>8}{'params':>10}")
    for r in rows:
        print(f"{r['network']:<14}{r['measured_ms']:>12.3f}{r['top1_mean']:>11.4f}{r['top1_min']:>8.4f}"
              f"{r['top1_max']:>8.4f}{r['params']:>10,}")
    gain = mine["top1_mean"] - expected
    verdict = "above" if gain > spread else "not above"
    print(f"found network: {mine['top1_mean']:.4f} at {mine['measured_ms']:.3f} ms; the width-scaled curve gives "
          f"{expected:.4f} there: {gain:+.4f} ({verdict} the curve by more than the seeds' spread {spread:.4f})")
    # named by the final recipe as well (runs before 2026-12-05 left it out of the name)
    recipe = f"_n{args.final_subset}" if args.final_subset else "_all"
    name = f"search_cifar10_c10_e{args.final_epochs}{args.tag}{recipe}"
    write_csv(f"{name}.csv", rows + [{"network": "curve at found", "measured_ms": mine["measured_ms"],
                                      "top1_mean": round(expected, 4)}])
    plot_final(rows, expected, spread, RESULTS / f"{name}.png",
               f"CIFAR-10, {args.final_epochs} epochs on " + (f"{args.final_subset:,} images" if args.final_subset
                                                                else "all training images")
               + f", {args.seeds} seeds; {RUNTIME}")
    if not args.skip_strategies:
        print_strategies(args)


def print_strategies(args) -> None:
    srows, curves = strategies(args)
    tag = strategy_oracle(args)[0]
    print(f"\nstrategies side by side: {args.strategy_trials} trials each, seeds {args.strategy_seeds}, oracle {tag}")
    print(f"{'strategy':<11}{'seed':>5}{'trials':>7}{'best reward':>13}{'at N/4':>9}{'at N/2':>9}{'best acc':>10}{'its ms':>8}")
    for r in srows:
        print(f"{r['strategy']:<11}{r['seed']:>5}{r['trials']:>7}{r['best_reward']:>13.4f}{r['best_after_quarter']:>9.4f}"
              f"{r['best_after_half']:>9.4f}{r['best_accuracy']:>10.4f}{r['best_predicted_ms']:>8.3f}")
    print(f"{'mean':<11}{'':>5}{'':>7}{'best reward':>13}{'at N/4':>9}{'at N/2':>9}")
    for strategy in curves:
        mine = [r for r in srows if r["strategy"] == strategy]
        print(f"{strategy:<11}{'':>5}{'':>7}" + "".join(
            f"{statistics.mean(r[k] for r in mine):>{w}.4f}"
            for k, w in (("best_reward", 13), ("best_after_quarter", 9), ("best_after_half", 9))))
    write_csv(f"search_strategies_{tag}.csv", srows)
    plot_strategies(curves, RESULTS / f"search_strategies_{tag}.png", tag)


if __name__ == "__main__":
    main()
