"""`mnv3 search`: platform-aware architecture search on this machine's runtime (the main job)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from mnv3.cli.common import add_json, add_output, add_threads, emit_json

# The quick default: a small space around MobileNetV3-Small at the data's resolution.
DEFAULT_CHOICES = {"kernels": (3, 5), "expansion_ratios": (3.0, 6.0), "se": (False, True),
                   "activations": ("relu", "hswish"), "widths": (0.5, 0.75, 1.0), "depth_deltas": (-1, 0)}


def register(sub) -> None:
    from mnv3.search.reward import REWARDS
    from mnv3.search.strategies import STRATEGIES

    p = sub.add_parser(
        "search", help="platform-aware architecture search against this machine's runtime",
        description="MnasNet's platform-aware search, as MobileNetV3 was found, run against your own "
                    "runtime: candidates of a search space are timed by the latency table's predictor "
                    "(or measured), trained briefly on a proxy task and rewarded with ACC x (LAT/T)^w. "
                    "Trials live in an Optuna study (SQLite in the run folder, or a PostgreSQL URL shared "
                    "by several workers); running the same command again continues it. With no "
                    "arguments: a small space around MobileNetV3-Small on digits, a few minutes.",
        epilog="The run folder gets best.json (an ArchSpec every command takes), trials.csv, pareto.png, "
               "progress.png and summary.json.")
    g = p.add_argument_group("space and data")
    g.add_argument("--space", metavar="SEED|SPACE.json",
                   help="a seed (preset, spec JSON or model file) with the default choices, or a space "
                        "JSON from `mnv3 lut space --save` (default: a small space around "
                        "mobilenet_v3_small at the data's resolution)")
    g.add_argument("--data", default="digits",
                   help="proxy task: digits (offline, default), cifar10, or an image folder")
    g.add_argument("--num-classes", "--classes", dest="classes", type=int, metavar="N",
                   help="classes of the classifier the deployed network ends in, which latencies include "
                        "(default: the space JSON's, 1000 unless it says otherwise; for the default space, "
                        "the data's). A proxy for an ImageNet model keeps 1000; a model for this data "
                        "set, its own count")
    g.add_argument("--proxy-epochs", type=int, default=3, metavar="N", help="epochs per candidate (default 3)")
    g.add_argument("--proxy-resolution", type=int, metavar="PX",
                   help="training resolution of the proxy (default: the data's, 32 for digits and CIFAR)")
    g.add_argument("--proxy-subset", type=int, metavar="N",
                   help="train candidates on a fixed random subset of N training images")
    g.add_argument("--proxy-held-out", type=float, default=0.2, metavar="F|N",
                   help="training images held out to rank candidates: a fraction (default 0.2) or a count")
    g.add_argument("--recipe", default="cifar", help="recipe of the proxy training (default cifar)")
    g.add_argument("--oracle", default="proxy", metavar="proxy|supernet:DIR",
                   help="how candidates' accuracy is found: proxy (train each, MnasNet's way; default) or "
                        "supernet:DIR (estimate each in seconds with a supernet from `mnv3 supernet train`, "
                        "which brings its own data split; the proxy flags are then unused)")
    g = p.add_argument_group("objective")
    g.add_argument("--reward", choices=REWARDS, default="soft",
                   help="soft: ACC x (LAT/T)^-0.07 (default); hard: ACC, or ACC x (LAT/T)^-1 above T; "
                        "pareto: accuracy and latency as two objectives (with --strategy nsga2)")
    g.add_argument("--w", type=float, help="the soft reward's exponent (MnasNet -0.07; MobileNetV3-Small used -0.15)")
    g.add_argument("--target-ms", type=float, metavar="T", help="latency target in ms")
    g.add_argument("--target-of", metavar="ARCH",
                   help="latency target: this network's latency on the same runtime and table "
                        "(default: the space's seed family at --target-width)")
    g.add_argument("--target-width", type=float, default=None, metavar="W",
                   help="width of a preset --target-of (e.g. 0.75)")
    g = p.add_argument_group("strategy")
    g.add_argument("--strategy", choices=STRATEGIES, default="evolution",
                   help="evolution (regularized evolution, default), ppo (MnasNet's RL controller), random, "
                        "nsga2 (with --reward pareto)")
    g.add_argument("--trials", type=int, default=8, metavar="N",
                   help="finished trials in all, counting earlier runs and other workers (default 8)")
    g.add_argument("--minutes", type=float, metavar="M",
                   help="time budget of this worker: no new trial starts after M minutes (the study keeps "
                        "what finished; the same command again continues)")
    g.add_argument("--population", type=int, metavar="P",
                   help="evolution: population (default min(100, trials / 4), AmoebaNet used 100); "
                        "nsga2: population")
    g.add_argument("--seed", type=int, default=0, help="seed of the strategy and of the proxy split")
    g = p.add_argument_group("latency")
    g.add_argument("--runtime", default="onnxruntime", help="onnxruntime (default), litert, torch, torch-fused")
    g.add_argument("--latency", choices=("predict", "measure"), default="predict",
                   help="predict: the lookup table's calibrated predictor (default); measure: time every "
                        "candidate end to end")
    g.add_argument("--db", default=None, metavar="URL",
                   help="latency table database (default sqlite:///mnv3-lut.sqlite, as mnv3 lut build)")
    g.add_argument("--build-table", action="store_true",
                   help="build the table for the space when it is missing (always for the default space)")
    g.add_argument("--runtime-threads", type=int, default=1, metavar="N",
                   help="threads of the runtime the latency is for (default 1, as the table)")
    g.add_argument("--final-k", type=int, default=5, metavar="K",
                   help="best networks measured end to end at the end, with the references (default 5)")
    g.add_argument("--references", type=_reference_width, nargs="*", default=None, metavar="W",
                   help="widths of the seed family trained and measured as reference points "
                        "(default 0.5 0.75 1.0 when the seed is a preset; `--references none`, or the "
                        "flag alone: leave them out)")
    g.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="before choosing best.json, train the K best networks and the references again with "
                        "more seeds and rank them by the mean (the best of many one-seed proxy trainings "
                        "is mostly the luckiest; default 0: off)")
    g.add_argument("--rerank-seeds", type=int, default=3, metavar="S",
                   help="proxy trainings per network when reranking, the search's own included (default 3)")
    g = p.add_argument_group("run")
    add_output(p, "--out", kind="dir", metavar="DIR", help="run folder (default runs/search-TIME)")
    g.add_argument("--storage", metavar="URL",
                   help="Optuna storage (default: sqlite in the run folder; a PostgreSQL URL for workers "
                        "on several machines)")
    g.add_argument("--study", default="search", help="study name in the storage (default search)")
    g.add_argument("--heartbeat", type=int, default=10, metavar="S",
                   help="seconds between a worker's heartbeats; a trial whose worker is silent for 3x "
                        "this is marked failed and its network queued again (default 10)")
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json(p, "best, accuracy, predicted_ms, measured_ms, reward, trials, out")
    p.set_defaults(func=cmd_search)


def _reference_width(text: str) -> float | str:
    """A width of --references, or `none` (checked when the arguments are read, not after the search)."""
    if text.lower() == "none":
        return "none"
    try:
        width = float(text)
    except ValueError:
        width = float("nan")
    if not width > 0:
        raise argparse.ArgumentTypeError(f"expected a width above 0 (0.5, 0.75, ...) or none, got {text!r}")
    return width


def fit(spec, resolution: int, total_stride: int | None):
    """`spec` at the proxy's resolution, downsampling by at most `total_stride` (as training does)."""
    from mnv3.arch import with_total_stride

    spec = spec.replace(resolution=resolution) if spec.resolution != resolution else spec
    if total_stride and spec.total_stride() > total_stride:
        spec = with_total_stride(spec, total_stride)
    return spec


def resolve_space(args: argparse.Namespace, resolution: int, total_stride: int | None):
    """The space: --space (a space JSON as it is; a seed at the proxy's resolution and total stride),
    or the small default around MobileNetV3-Small. Returns (space, family preset or None)."""
    from mnv3.arch import SpecError
    from mnv3.cli.common import read_space_json
    from mnv3.presets import PRESETS, resolve_arch
    from mnv3.space import SearchSpace

    if args.space is None:
        seed = fit(resolve_arch("mobilenet_v3_small"), resolution, total_stride)
        return SearchSpace(seed, **DEFAULT_CHOICES), "mobilenet_v3_small"
    space = read_space_json(args.space)
    if space is not None:
        if space.seed.resolution != resolution:
            raise SpecError(f"--space {args.space}: its seed is at {space.seed.resolution}x{space.seed.resolution}, "
                            f"the proxy trains at {resolution}; pass --proxy-resolution "
                            f"{space.seed.resolution} or save the space at {resolution}")
        return space, None
    family = args.space if args.space in PRESETS else None
    return SearchSpace(fit(resolve_arch(args.space), resolution, total_stride)), family


def family_spec(family: str, width: float, space):
    """A preset of the seed family at the space's resolution and total stride."""
    from mnv3.presets import preset

    return fit(preset(family, width, space.seed.resolution), space.seed.resolution, space.seed.total_stride())


def target_network(args: argparse.Namespace, family: str | None, space):
    """The network whose latency is T (--target-of, or the seed family at --target-width) and its label."""
    from mnv3.presets import resolve_arch
    from mnv3.search.run import SearchError

    if args.target_of is None:
        if family is None:
            raise SearchError("give a latency target: --target-ms T or --target-of ARCH (the space's seed "
                              "is not a preset, so there is no seed family to take it from)")
        width = 0.75 if args.target_width is None else args.target_width
        return family_spec(family, width, space), f"{family} x{width}"
    ref = fit(resolve_arch(args.target_of, args.target_width, space.seed.resolution), space.seed.resolution,
              space.seed.total_stride())
    return ref, args.target_of + (f" x{args.target_width}" if args.target_width else "")


def open_oracle(args: argparse.Namespace):
    """The accuracy oracle (--oracle), the space and its seed family (a preset name or None). A
    supernet brings its space: --space left out means the supernet's, a different one is refused."""
    from mnv3.search.oracle import ProxyOracle
    from mnv3.search.run import SearchError

    if args.oracle == "proxy":
        oracle = ProxyOracle.open(args.data, epochs=args.proxy_epochs, resolution=args.proxy_resolution,
                                  subset=args.proxy_subset, recipe=args.recipe, seed=args.seed,
                                  held_out=args.proxy_held_out)
        space, family = resolve_space(args, oracle.resolution or 224, oracle.data.total_stride)
        return oracle, space, family
    if not args.oracle.startswith("supernet:") or not args.oracle[len("supernet:"):]:
        raise SearchError(f"--oracle {args.oracle}: expected proxy or supernet:DIR (a folder from mnv3 supernet train)")
    from mnv3.search.supernet_train import SupernetOracle, read_supernet_info

    where = args.oracle[len("supernet:"):]
    info = read_supernet_info(where)
    mine = info.space
    default, family = resolve_space(argparse.Namespace(space=None), mine.seed.resolution, mine.seed.total_stride())
    if args.space is not None:
        mine, family = resolve_space(args, info.space.seed.resolution, info.space.seed.total_stride())
    elif dataclasses.replace(default, num_classes=mine.num_classes).to_dict() != mine.to_dict():
        family = None
    return SupernetOracle(where, mine), mine, family


def with_classes(args: argparse.Namespace, oracle, space):
    """The space with the classifier size its latencies include: --classes, else the space's own
    (the default space: the data's class count); a note when it is not the data's."""
    from mnv3.search.run import SearchError

    data = getattr(oracle, "data", None)
    have = len(data.classes) if data is not None else None
    if args.classes is not None and args.classes < 1:
        raise SearchError(f"--classes {args.classes}: a classifier needs 1 class or more")
    wanted = args.classes or (have if args.space is None and args.oracle == "proxy" else None) or space.num_classes
    space = dataclasses.replace(space, num_classes=wanted)
    if have is not None and have != wanted:
        name = args.data if args.oracle == "proxy" else data.name
        print(f"note: latencies include a {wanted}-class classifier (the space's) while {name} has {have} "
              f"classes; pass --classes {have} if the network will be deployed for this data set", file=sys.stderr)
    return space


def _in_space(genomes, spec) -> bool:
    from mnv3.search.genome import GenomeError

    try:
        genomes.encode(spec)
        return True
    except GenomeError:
        return False


def cmd_search(args: argparse.Namespace) -> int:
    from mnv3.latency import LatencyError, check_threads
    from mnv3.search.genome import GenomeSpace
    from mnv3.search.latency import open_latency
    from mnv3.search.report import finish
    from mnv3.search.reward import Reward
    from mnv3.search.run import Search, SearchError, open_storage, stored_target
    from mnv3.search.strategies import check_strategy
    from mnv3.train.threads import apply_threads

    if args.trials < 1 or args.final_k < 1 or args.proxy_epochs < 1:
        raise SearchError("--trials, --final-k and --proxy-epochs must be at least 1")
    if args.rerank < 0 or (args.rerank and args.rerank_seeds < 2):
        raise SearchError(f"--rerank {args.rerank} --rerank-seeds {args.rerank_seeds}: rerank K >= 1 networks with "
                          "S >= 2 seeds each (or --rerank 0: off)")
    if args.rerank and args.reward == "pareto":
        raise SearchError("--rerank chooses by one reward; with --reward pareto there is a front, not one best: "
                          "leave --rerank out")
    if args.rerank and args.oracle != "proxy":
        raise SearchError(f"--rerank trains networks again with other seeds; --oracle {args.oracle} has no "
                          "training seed (its estimate is the same every time): leave --rerank out")
    if args.target_ms is not None and args.target_of is not None:
        raise SearchError("--target-ms and --target-of both set a target: give one")
    if args.references and "none" in args.references:
        if len(args.references) > 1:
            raise SearchError("--references: none leaves the reference networks out; give it alone, or widths")
        args.references = []
    check_threads(args.runtime_threads)
    apply_threads(args.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)      # the progress bar and the table report
    out = Path(args.out or time.strftime("runs/search-%Y%m%d-%H%M%S"))
    if not args.out:
        from mnv3.files import check_writable

        check_writable(out, kind="dir", flag="--out")
    # the objective first: an impossible reward or strategy is found before any data or table work
    Reward.make(args.reward, args.target_ms or 1.0, args.w)
    check_strategy(args.strategy, args.reward == "pareto")
    oracle, space, family = open_oracle(args)
    space = with_classes(args, oracle, space)
    genomes = GenomeSpace(space)
    out.mkdir(parents=True, exist_ok=True)
    space_file = space.save(out / "space.json")
    db = args.db or "sqlite:///mnv3-lut.sqlite"
    progress = not args.no_progress
    print(f"space {space.key()}: {float(space.size()):.2e} networks around {space.seed.name}, "
          f"{len(genomes)} genes; proxy: {oracle.describe()}", file=sys.stderr, flush=True)
    latency = open_latency(args.latency, space, args.runtime, db=db, threads=args.runtime_threads,
                           build=args.build_table or args.space is None, progress=progress, space_file=space_file)
    if args.heartbeat < 1:
        raise SearchError(f"--heartbeat: expected at least 1 second, got {args.heartbeat}")
    storage = open_storage(args.storage or f"sqlite:///{(out / 'search.sqlite').resolve()}", args.heartbeat,
                           3 * args.heartbeat)
    if args.target_ms is not None:
        target, target_label = args.target_ms, f"{args.target_ms:g} ms"
    else:
        ref, target_label = target_network(args, family, space)
        target = stored_target(storage, args.study) or float(latency.ms(ref))
    fastest = float(latency.ms(genomes.decode(genomes.extreme(largest=False))))
    if target < fastest:
        raise LatencyError(f"latency target {target:.3f} ms is below the fastest network of the space "
                           f"({fastest:.3f} ms on {args.runtime}); no network can meet it: raise the target or "
                           "search a smaller space")
    reward = Reward.make(args.reward, target, args.w)
    print(f"target T = {target:.3f} ms ({target_label})"
          + f"; reward {reward.describe()}; fastest network of the space {fastest:.3f} ms", file=sys.stderr)
    options = {}
    if args.strategy == "evolution":
        pop = args.population or min(100, max(4, args.trials // 4))
        options = {"population": pop, "sample_size": max(2, pop // 4)}
    elif args.strategy == "nsga2" and args.population:
        options = {"population": args.population}
    search = Search(space, oracle, latency, reward, strategy=args.strategy, out=out, storage=storage,
                    study=args.study, seed=args.seed, strategy_options=options, progress=progress,
                    target=target_label)
    print(f"run folder {out}; to continue after an interruption, run the same command with --out {out}",
          file=sys.stderr, flush=True)
    search.run(args.trials, args.minutes)
    widths = args.references if args.references is not None else ([0.5, 0.75, 1.0] if family else [])
    references = [(f"{family} x{w}", family_spec(family, w, space)) for w in widths] if family else []
    if oracle.name == "supernet":       # it can estimate networks of its space only
        kept = [(label, spec) for label, spec in references if _in_space(genomes, spec)]
        if len(kept) < len(references):
            left = ", ".join(label for label, _ in references if (label, _) not in kept)
            print(f"note: reference(s) {left} are not networks of the space, so the supernet cannot estimate "
                  "them; they are left out (train them with the proxy oracle to compare)", file=sys.stderr)
        references = kept
    summary = finish(search, final_k=args.final_k, references=references, progress=progress,
                     rerank=args.rerank, rerank_seeds=args.rerank_seeds)
    print(f"{'network':<24}{'accuracy':>9}{'predicted ms':>14}{'measured ms':>13}{'reward':>9}")
    for row in summary["references"] + summary["finals"]:
        measured = row.get("measured_ms")
        print(f"{row['label']:<24}{row['accuracy']:>9.4f}{row['predicted_ms']:>14.3f}"
              f"{(f'{measured:.3f}' if measured is not None else '-'):>13}{row['reward']:>9.4f}")
    if args.rerank:
        print(f"accuracy of the reranked networks and the references: mean of {args.rerank_seeds} proxy trainings")
    print(f"best: {summary['best']} (accuracy {summary['accuracy']:.4f}, {summary['predicted_ms']:.3f} ms "
          f"predicted, reward {summary['reward']:.4f}); files in {out}")
    print(f"train it: mnv3 train --arch {summary['best']} --data {oracle.describe()['data'] or args.data}")
    if args.json:
        emit_json({k: summary[k] for k in ("best", "accuracy", "predicted_ms", "measured_ms", "reward",
                                           "trials", "out", "study", "storage", "target_ms")})
    return 0
