"""`mnv3 supernet`: train a weight-sharing supernet over a search space, estimate networks with it,
extract one as a model file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mnv3.cli.common import add_json, add_output, add_threads, emit_json


def register(sub) -> None:
    p = sub.add_parser(
        "supernet", help="a weight-sharing supernet: train once, estimate any network of a space in seconds",
        description="Once-for-All/BigNAS for the search: one network whose sub-networks share weights is "
                    "trained over a search space (the same space, genomes and latency tables as mnv3 search); "
                    "then any network of the space is estimated in seconds (its weights sliced out, batch norm "
                    "recalibrated, top-1 on the search's held-out images). Use it in a search with "
                    "`mnv3 search --oracle supernet:DIR`.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = verbs.add_parser(
        "train", help="train a supernet over a space",
        description="Train a supernet over --space on the search's split of --data (the held-out part, on "
                    "which the search ranks networks, is left out). The run folder gets supernet.safetensors, "
                    "space.json, metrics.csv (top-1 of the largest and smallest sub-networks per epoch), "
                    "curves.png and checkpoint.pt; --resume continues a stopped run.",
        epilog="Rules (--supernet-rule): sandwich (default, BigNAS) or progressive (Once-for-All).")
    t.add_argument("--space", metavar="SEED|SPACE.json",
                   help="a seed (preset, spec JSON or model file) with the default choices, or a space JSON "
                        "(default: the small space mnv3 search uses by default)")
    t.add_argument("--data", default=None, help="digits (default), cifar10, or an image folder")
    t.add_argument("--proxy-held-out", type=float, default=None, metavar="F|N",
                   help="training images held out for ranking, as mnv3 search's flag (default 0.2)")
    t.add_argument("--proxy-subset", type=int, default=None, metavar="N",
                   help="train on a fixed random subset of N of the remaining images")
    t.add_argument("--split-seed", type=int, default=None, help="seed of the split (as mnv3 search --seed; default 0)")
    t.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="training images batch norm is recalibrated on for each sub-network (default 500)")
    t.add_argument("--recipe", metavar="NAME|FILE", help="training recipe (default supernet)")
    add_output(t, "--out", kind="dir", metavar="DIR", help="run folder (default runs/supernet-DATA)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    add_threads(t)
    t.add_argument("--checkpoint-steps", type=int, default=500, help="also checkpoint every N steps (default 500)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe key")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(t, "top1 of the largest and smallest sub-networks, the supernet file, the run folder")
    from mnv3.cli.train import add_recipe_flags

    add_recipe_flags(t)
    t.set_defaults(func=cmd_train)

    for verb, text in (("estimate", "estimate networks' accuracy with a trained supernet"),
                       ("extract", "write one sub-network as a model file (mnv3 train --weights, mnv3 eval)")):
        e = verbs.add_parser(verb, help=text, description=text + ". Networks are given as a spec JSON of the "
                             "space (best.json of a search), a genome (JSON list or {gene: value} object, inline "
                             "or in a file), or --largest/--smallest.")
        e.add_argument("supernet", metavar="DIR|FILE", help="a supernet run folder or supernet.safetensors")
        which = e.add_mutually_exclusive_group(required=verb == "extract")
        which.add_argument("--spec", metavar="FILE", help="a network of the space as a spec JSON")
        which.add_argument("--genome", metavar="JSON|FILE", help="a genome of the space")
        which.add_argument("--largest", action="store_true", help="the largest network of the space")
        which.add_argument("--smallest", action="store_true", help="the smallest network of the space")
        if verb == "estimate":
            which.add_argument("--random", type=int, metavar="N", help="N random networks of the space")
        e.add_argument("--calibration", type=int, default=None, metavar="N",
                       help="training images for batch-norm recalibration (default: the supernet's, 500)")
        if verb == "extract":
            add_output(e, "-o", "--output", kind="file", metavar="FILE", required=True, help="model file to write")
            add_json(e, "model, spec name, held-out top-1")
            e.set_defaults(func=cmd_extract)
        else:
            e.add_argument("--images", type=int, default=None, metavar="N",
                           help="held-out images scored (default: all of the search's held-out split)")
            e.add_argument("--seed", type=int, default=0, help="seed of --random")
            add_threads(e)
            add_json(e, "a list of {spec, top1, seconds}")
            e.set_defaults(func=cmd_estimate)


# -- train -------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from mnv3.cli.search import resolve_space
    from mnv3.cli.train import _overrides
    from mnv3.data.datasets import open_data
    from mnv3.search.supernet_train import SUPERNET_FILE, train_supernet
    from mnv3.train.classify import run_inputs, saved_recipe
    from mnv3.train.engine import TrainError
    from mnv3.train.recipe import load_recipe
    from mnv3.train.threads import apply_threads

    apply_threads(args.threads, workers=args.workers)
    if args.resume:
        if not args.out:
            raise TrainError("--resume needs the --out folder of the run to continue")
        if not os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
            raise TrainError(f"{os.path.join(args.out, 'checkpoint.pt')}: no checkpoint to resume from; start the "
                             "run without --resume")
    earlier = run_inputs(args.out) if args.resume else {}
    data = args.data or earlier.get("data") or "digits"
    held_out = args.proxy_held_out if args.proxy_held_out is not None else earlier.get("held_out", 0.2)
    subset = args.proxy_subset if args.proxy_subset is not None else earlier.get("subset")
    split_seed = args.split_seed if args.split_seed is not None else earlier.get("split_seed", 0)
    calibration = args.calibration or earlier.get("calibration") or 500
    if calibration < 1:
        raise TrainError("--calibration: expected at least 1 image")
    full = open_data(data)
    if args.space is None and args.resume and Path(args.out, "space.json").is_file():
        args.space = str(Path(args.out, "space.json"))
    resolution = full.resolution or 224
    space, _ = resolve_space(args, resolution, full.total_stride)
    if args.recipe:
        recipe = load_recipe(args.recipe)
    elif args.resume and saved_recipe(args.out) is not None:
        recipe = saved_recipe(args.out)
    else:
        recipe = load_recipe("supernet")
    recipe = recipe.override(_overrides(args))
    out = args.out or f"runs/supernet-{full.name}"
    if not args.out:
        from mnv3.files import check_writable

        check_writable(out, kind="dir", flag="--out")
    main = os.environ.get("RANK", "0") == "0"
    if main:
        print(f"supernet over space {space.key()} ({float(space.size()):.2e} networks around {space.seed.name}) on "
              f"{full.name}, rule {recipe.supernet_rule}, {recipe.epochs} epochs -> {out}", file=sys.stderr)
    result = train_supernet(full, out, space, recipe, held_out=held_out, subset=subset, split_seed=split_seed,
                            calibration=calibration, resume=args.resume, workers=args.workers,
                            checkpoint_steps=args.checkpoint_steps, progress=not args.no_progress,
                            device=args.device)
    if main and result.model_path is not None:
        m = result.metrics
        print(f"held-out top-1: largest {m.get('val_top1', 0):.4f}, smallest {m.get('val_top1_smallest', 0):.4f}; "
              f"supernet written to {result.model_path}")
        print(f"search with it: mnv3 search --oracle supernet:{out}")
    if main and args.json and result.model_path is not None:
        emit_json({"top1_largest": result.metrics.get("val_top1"),
                   "top1_smallest": result.metrics.get("val_top1_smallest"),
                   "supernet": str(Path(out) / SUPERNET_FILE), "run": str(out), "epochs": len(result.history)})
    return 0


# -- estimate / extract ------------------------------------------------------------------------------
def _genome_arg(text: str, genomes):
    """A genome from inline JSON or a file: a list of gene values, or {gene name: value}."""
    from mnv3.search.genome import GenomeError

    path = Path(text)
    source = path.read_text() if path.is_file() else text
    try:
        value = json.loads(source)
    except ValueError:
        raise GenomeError(f"--genome {text}: neither a file nor JSON (a list of gene values, or an object of "
                          "gene names to values)") from None
    if isinstance(value, dict):
        return genomes.from_params(value)
    if isinstance(value, list):
        return genomes.check(value)
    raise GenomeError(f"--genome {text}: expected a JSON list or object")


def _networks(args: argparse.Namespace, oracle) -> list[tuple[str, object]]:
    import random

    from mnv3.arch import ArchSpec

    genomes = oracle.net.genomes
    if args.spec:
        return [(Path(args.spec).stem, ArchSpec.load(args.spec))]
    if args.genome:
        return [("genome", _genome_arg(args.genome, genomes))]
    if getattr(args, "random", None):
        rng = random.Random(args.seed)
        return [(f"random {i}", genomes.random(rng)) for i in range(args.random)]
    if args.smallest:
        return [("smallest", oracle.net.smallest())]
    return [("largest", oracle.net.largest())]


def cmd_estimate(args: argparse.Namespace) -> int:
    import time

    from mnv3.search.supernet_train import SupernetOracle
    from mnv3.train.threads import apply_threads

    apply_threads(args.threads)
    oracle = SupernetOracle(args.supernet, calibration=args.calibration, images=args.images)
    rows = []
    print(f"{'network':<16}{'top-1':>8}{'seconds':>9}  spec")
    for label, net in _networks(args, oracle):
        start = time.perf_counter()
        module = oracle.network(net)
        top1 = oracle.top1(module)
        seconds = time.perf_counter() - start
        rows.append({"network": label, "spec": module.spec.name, "top1": top1, "seconds": seconds,
                     "blocks": len(module.spec.blocks)})
        print(f"{label:<16}{top1:>8.4f}{seconds:>9.2f}  {module.spec.name}")
    print(f"(top-1 on {len(oracle.held_x)} held-out training images, batch norm recalibrated on "
          f"{oracle.calibration_count})", file=sys.stderr)
    if args.json:
        emit_json(rows)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from mnv3.search.supernet_train import SupernetOracle
    from mnv3.weights import ModelMeta, save

    oracle = SupernetOracle(args.supernet, calibration=args.calibration)
    (_, net), = _networks(args, oracle)
    module = oracle.network(net)
    top1 = oracle.top1(module)
    info = oracle.info
    meta = ModelMeta(classes=info.classes, class_names=info.class_names, preprocess=info.preprocess,
                     source=str(oracle.path), training={"supernet": str(oracle.path), "held_out_top1": top1,
                                                        "data": info.data})
    path = save(module.eval(), args.output, meta)
    print(f"{module.spec.name}: held-out top-1 {top1:.4f} as extracted (batch norm recalibrated on "
          f"{oracle.calibration_count} training images); written to {path}")
    print(f"fine-tune it: mnv3 train --weights {path} --data {info.data}")
    if args.json:
        emit_json({"model": str(path), "spec": module.spec.name, "top1": top1})
    return 0
