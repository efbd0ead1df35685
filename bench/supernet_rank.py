"""Is the supernet's ranking trustworthy? On this CPU: a supernet trained over the search's default
space around MobileNetV3-Small (32x32 CIFAR-10 proxy, total stride 8) by `mnv3 supernet train`,
then networks of the space spread over the latency range, plus networks within +-10% of one
latency, each trained alone with the proxy recipe (`ProxyOracle`, the search's own oracle), and the
two accuracies compared: Kendall tau and Spearman rho over all of them and within the band, a
scatter plot, and the seconds one supernet estimate takes. Each network is trained alone with
`--alone-seeds` seeds (default 2): the ranking of seed 0 against seed 1 is the proxy's own
reproducibility, the ceiling that no estimate can be shown to pass on this budget (a supernet that
ranked exactly like the proxy's expectation would still meet a noisy proxy at that tau).

Both sides score on the same held-out part of CIFAR-10's training images (the search's split) and
train on the same fixed subset of the rest. Stages write under bench/results/supernet_rank/ and
are skipped when done, so a stopped run resumes; `--stage supernet` and `--stage alone` can run
side by side as two processes, then `--stage report`.

    python bench/supernet_rank.py [--stage all|networks|supernet|alone|report] [--subset 5000] [--epochs 8]
                                  [--proxy-epochs 3] [--spread 12] [--band 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, SHARED, write_csv

from mnv3.cli import main as mnv3_main

DATA = SHARED / "data" / "cifar10"
OUT = RESULTS / "supernet_rank"
RUNTIME = "onnxruntime"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def the_space():
    """The default space of `mnv3 search` and `mnv3 supernet train` for 32x32 data."""
    from mnv3.cli.search import DEFAULT_CHOICES, fit
    from mnv3.presets import resolve_arch
    from mnv3.space import SearchSpace

    return SearchSpace(fit(resolve_arch("mobilenet_v3_small"), 32, 8), **DEFAULT_CHOICES)


def space_file() -> Path:
    path = OUT / "space.json"
    if not path.is_file():
        OUT.mkdir(parents=True, exist_ok=True)
        the_space().save(path)
    return path


def train_supernet(args) -> Path:
    out = OUT / "supernet"
    if (out / "supernet.safetensors").is_file():
        return out
    cmd = ["supernet", "train", "--space", str(space_file()), "--data", str(DATA), "--proxy-subset", str(args.subset),
           "--proxy-held-out", str(args.held_out), "--epochs", str(args.epochs), "--out", str(out), "--no-progress",
           "--threads", str(args.threads), "--checkpoint-steps", "100"]
    if (out / "checkpoint.pt").is_file():
        cmd.append("--resume")
    log(f"supernet: {args.epochs} epochs on {args.subset} images ({' '.join(cmd)})")
    start = time.perf_counter()
    if mnv3_main(cmd) != 0:
        sys.exit("supernet training failed")
    log(f"supernet trained in {time.perf_counter() - start:.0f} s")
    return out


def latency_source():
    from mnv3.search.latency import open_latency

    return open_latency("predict", the_space(), RUNTIME, db=f"sqlite:///{OUT / 'lut.sqlite'}", build=True,
                        progress=False, space_file=space_file())


def chosen_networks(args) -> list[dict]:
    """`--spread` networks at evenly spaced latency ranks of a random pool, and `--band` more
    within +-10% of the pool's median latency (fixed by the seed; kept in networks.json)."""
    path = OUT / "networks.json"
    if path.is_file():
        return json.loads(path.read_text())
    from mnv3.search.genome import GenomeSpace

    genomes = GenomeSpace(the_space())
    latency = latency_source()
    rng = random.Random(args.seed)
    pool, seen = [], set()
    while len(pool) < args.pool:
        g = genomes.canonical(genomes.random(rng))
        if g in seen:
            continue
        seen.add(g)
        pool.append({"genome": list(g), "predicted_ms": float(latency.ms(genomes.decode(g)))})
    pool.sort(key=lambda n: n["predicted_ms"])
    picked = [pool[round(i * (len(pool) - 1) / (args.spread - 1))] for i in range(args.spread)]
    for n in picked:
        n["group"] = "spread"
    centre = statistics.median(n["predicted_ms"] for n in pool)
    band = [n for n in pool if abs(n["predicted_ms"] - centre) <= 0.1 * centre and n not in picked]
    for n in rng.sample(band, min(args.band, len(band))):
        picked.append({**n, "group": "band"})
    for i, n in enumerate(picked):
        n["name"] = f"net{i:02d}"
        n["band_centre_ms"] = centre
    path.write_text(json.dumps(picked, indent=1))
    return picked


def alone_dir(name: str, seed: int) -> Path:
    """Seed 0 where the first runs of this bench kept it; later seeds beside it."""
    return OUT / "alone" / name / ("" if seed == 0 else f"seed{seed}")


def train_alone(args) -> None:
    """Every network trained alone by the search's own proxy oracle, seed by seed (all networks at
    seed 0 first, so that a budget cut short still has one full ranking)."""
    from mnv3.search.genome import GenomeSpace
    from mnv3.search.oracle import ProxyOracle
    from mnv3.train.recipe import load_recipe

    genomes = GenomeSpace(the_space())
    for seed in range(args.alone_seeds):
        oracle = ProxyOracle.open(str(DATA), epochs=args.proxy_epochs, subset=args.subset, held_out=args.held_out,
                                  recipe=load_recipe("cifar").override({"seed": seed}))
        for n in chosen_networks(args):
            done = alone_dir(n["name"], seed) / "top1.json"
            if done.is_file():
                continue
            log(f"alone: {n['name']} ({n['group']}, {n['predicted_ms']:.3f} ms predicted), seed {seed}, "
                f"{args.proxy_epochs} epochs")
            start = time.perf_counter()
            top1 = oracle.accuracy(genomes.decode(n["genome"]), alone_dir(n["name"], seed) / "run")
            done.write_text(json.dumps({"top1": top1, "seconds": time.perf_counter() - start}))


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties in either list counted as neither concordant nor discordant)."""
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx * dy > 0:
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def spearman_rho(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def report(args) -> None:
    from mnv3.search.genome import GenomeSpace
    from mnv3.search.supernet_train import SupernetOracle

    genomes = GenomeSpace(the_space())
    nets = chosen_networks(args)
    missing = [f"{n['name']} seed {s}" for s in range(args.alone_seeds) for n in nets
               if not (alone_dir(n["name"], s) / "top1.json").is_file()]
    if missing:
        sys.exit(f"networks not trained alone yet: {', '.join(missing)} (run --stage alone)")
    oracle = SupernetOracle(OUT / "supernet", the_space())
    rows = []
    for n in nets:
        spec = genomes.decode(n["genome"])
        start = time.perf_counter()
        estimate = oracle.accuracy(spec)
        seconds = time.perf_counter() - start
        alone = [json.loads((alone_dir(n["name"], s) / "top1.json").read_text()) for s in range(args.alone_seeds)]
        rows.append({"network": n["name"], "group": n["group"], "predicted_ms": round(n["predicted_ms"], 4),
                     "alone_top1": round(statistics.mean(a["top1"] for a in alone), 4),
                     **{f"alone_top1_seed{s}": a["top1"] for s, a in enumerate(alone)},
                     "supernet_top1": estimate, "estimate_s": round(seconds, 2),
                     "alone_train_s": round(statistics.mean(a["seconds"] for a in alone), 1), "spec": spec.name})
    centre = nets[0]["band_centre_ms"]
    band = [r for r in rows if abs(r["predicted_ms"] - centre) <= 0.1 * centre]
    stats = {
        "tau_all": kendall_tau([r["alone_top1"] for r in rows], [r["supernet_top1"] for r in rows]),
        "rho_all": spearman_rho([r["alone_top1"] for r in rows], [r["supernet_top1"] for r in rows]),
        "tau_band": kendall_tau([r["alone_top1"] for r in band], [r["supernet_top1"] for r in band]),
        "rho_band": spearman_rho([r["alone_top1"] for r in band], [r["supernet_top1"] for r in band]),
        "n_all": len(rows), "n_band": len(band), "band_ms": centre, "alone_seeds": args.alone_seeds,
        "estimate_s_median": statistics.median(r["estimate_s"] for r in rows),
        "alone_s_median": statistics.median(r["alone_train_s"] for r in rows),
        "held_out_images": len(oracle.held_x), "calibration_images": oracle.calibration_count,
    }
    if args.alone_seeds >= 2:      # the proxy against itself: how far its ranking is reproducible
        for key, group in (("all", rows), ("band", band)):
            stats[f"tau_{key}_seed0_vs_seed1"] = kendall_tau([r["alone_top1_seed0"] for r in group],
                                                             [r["alone_top1_seed1"] for r in group])
            stats[f"tau_{key}_supernet_vs_seed0"] = kendall_tau([r["alone_top1_seed0"] for r in group],
                                                                [r["supernet_top1"] for r in group])
        stats["alone_seed_spread"] = max(max(r[f"alone_top1_seed{s}"] for s in range(args.alone_seeds))
                                         - min(r[f"alone_top1_seed{s}"] for s in range(args.alone_seeds)) for r in rows)
    supernet_run = json.loads((OUT / "supernet" / "result.json").read_text()) if (OUT / "supernet" / "result.json").is_file() else {}
    write_csv("supernet_rank.csv", rows)
    (OUT.parent / "supernet_rank.json").write_text(json.dumps({**stats, "supernet": supernet_run,
                                                               "cpu": platform_cpu(),
                                                               "args": vars(args)}, indent=1) + "\n")
    plot(rows, stats, OUT.parent / "supernet_rank.png")
    print(f"{'network':<8}{'group':<8}{'pred. ms':>9}{'alone':>8}{'supernet':>10}{'est. s':>8}")
    for r in rows:
        print(f"{r['network']:<8}{r['group']:<8}{r['predicted_ms']:>9.3f}{r['alone_top1']:>8.4f}"
              f"{r['supernet_top1']:>10.4f}{r['estimate_s']:>8.2f}")
    print(f"supernet against the alone mean of {args.alone_seeds} seed(s):")
    print(f"all {stats['n_all']} networks: Kendall tau {stats['tau_all']:.3f}, Spearman rho {stats['rho_all']:.3f}")
    print(f"within +-10% of {centre:.3f} ms ({stats['n_band']} networks): Kendall tau {stats['tau_band']:.3f}, "
          f"Spearman rho {stats['rho_band']:.3f}")
    if args.alone_seeds >= 2:
        print(f"the proxy against itself (seed 0 vs seed 1): Kendall tau {stats['tau_all_seed0_vs_seed1']:.3f} over "
              f"all, {stats['tau_band_seed0_vs_seed1']:.3f} within the band; the supernet against seed 0 alone: "
              f"{stats['tau_all_supernet_vs_seed0']:.3f}, {stats['tau_band_supernet_vs_seed0']:.3f}; largest "
              f"seed-to-seed difference of one network {stats['alone_seed_spread']:.4f}")
    print(f"one supernet estimate: {stats['estimate_s_median']:.2f} s (median; {stats['held_out_images']} held-out "
          f"images, BN on {stats['calibration_images']}); one proxy training: {stats['alone_s_median']:.0f} s")
    print(f"goal Kendall tau >= 0.6: {'met' if stats['tau_all'] >= 0.6 else 'NOT met'} over all; "
          f"{'met' if stats['tau_band'] >= 0.6 else 'NOT met'} within the band")


def plot(rows, stats, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter([r["alone_top1"] for r in rows], [r["supernet_top1"] for r in rows],
                    c=[r["predicted_ms"] for r in rows], cmap="viridis",
                    marker="o", edgecolors=["red" if r["group"] == "band" else "none" for r in rows])
    fig.colorbar(sc, label="predicted latency (ms, ONNX Runtime, 1 thread)")
    ax.set(xlabel="held-out top-1, trained alone (proxy recipe)", ylabel="held-out top-1, supernet estimate",
           title=f"Kendall tau {stats['tau_all']:.2f} (all {stats['n_all']}), {stats['tau_band']:.2f} "
                 f"(the {stats['n_band']} within ±10%)" + (
                     f"\nthe proxy against itself (seed 0 vs 1): {stats['tau_all_seed0_vs_seed1']:.2f}, "
                     f"{stats['tau_band_seed0_vs_seed1']:.2f}" if "tau_all_seed0_vs_seed1" in stats else "")
                 + "\nred rims: the networks drawn for the band")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("all", "networks", "supernet", "alone", "report"), default="all",
                        help="networks: only choose the networks (and build the latency table, best on an idle "
                             "machine), so that supernet and alone can then run side by side")
    parser.add_argument("--subset", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--held-out", type=float, default=2000, help="held-out training images (default 2000)")
    parser.add_argument("--epochs", type=int, default=8, help="supernet epochs (default 8)")
    parser.add_argument("--proxy-epochs", type=int, default=3, help="epochs of each network trained alone")
    parser.add_argument("--alone-seeds", type=int, default=2,
                        help="trainings of each network alone, with seeds 0, 1, ... (default 2: the proxy's own "
                             "seed-to-seed ranking is printed beside the supernet's)")
    parser.add_argument("--spread", type=int, default=12, help="networks spread over the latency range")
    parser.add_argument("--band", type=int, default=8, help="networks within +-10%% of the median latency")
    parser.add_argument("--pool", type=int, default=300, help="random networks the choice is made from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    log(f"CPU: {platform_cpu()}; stage {args.stage}")
    if args.stage in ("all", "networks", "alone"):
        chosen_networks(args)
    if args.stage in ("all", "supernet"):
        train_supernet(args)
    if args.stage in ("all", "alone"):
        with contextlib.redirect_stderr(io.StringIO()):
            train_alone(args)
    if args.stage in ("all", "report"):
        report(args)


def platform_cpu() -> str:
    from mnv3.latency.runtimes import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
