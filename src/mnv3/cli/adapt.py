"""`mnv3 adapt`: NetAdapt, as MobileNetV3 ran it after the search, against this machine's runtime."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mnv3.cli.common import add_json, add_output, add_threads, emit_json


def register(sub) -> None:
    from mnv3.adapt.run import SELECT_RULES

    p = sub.add_parser(
        "adapt", help="NetAdapt: shrink a trained network layer by layer to a latency target",
        description="NetAdapt as MobileNetV3 used it (section 4.2): each step proposes, for every "
                    "expansion layer, every bottleneck width (shared across residual connections) and "
                    "the head's 1x1 layers, the fewest channels removed (multiples of 8, largest L2-norm "
                    "filters kept) that cut latency by delta x L(seed); fine-tunes each proposal briefly, "
                    "ranks them on images held out from the training set, and keeps the best accuracy change "
                    "per latency change, until the measured latency reaches the target. Running the same "
                    "command again continues the run; several processes given one --storage share a step's "
                    "fine-tunes.",
        epilog="Latency: the table predictor by default (network parts the table lacks are measured and "
               "added to it), each kept network measured end to end; --latency measure times every "
               "candidate end to end. The run folder gets model.safetensors, spec.json, history.csv, "
               "trajectory.png and summary.json.")
    p.add_argument("--weights", required=True, metavar="MODEL",
                   help="a trained mnv3 model file (.safetensors, e.g. from mnv3 train)")
    p.add_argument("--data", required=True, help="the data it was trained on: digits, cifar10 or an image folder")
    g = p.add_argument_group("target")
    g.add_argument("--target-ms", type=float, metavar="T", help="latency target in ms (table units)")
    g.add_argument("--target-ratio", type=float, metavar="R",
                   help="latency target as a fraction of the model's measured latency (e.g. 0.75)")
    g.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "litert"),
                   help="runtime the latency is for (default onnxruntime)")
    g.add_argument("--runtime-threads", type=int, default=1, metavar="N", help="threads of the runtime (default 1)")
    g.add_argument("--latency", choices=("predict", "measure"), default="predict",
                   help="predict: lookup table, parts measured on demand (default); measure: every candidate "
                        "end to end")
    g.add_argument("--db", metavar="URL", help="latency table database (default sqlite:///mnv3-lut.sqlite)")
    g = p.add_argument_group("NetAdapt")
    g.add_argument("--delta", type=float, default=0.01,
                   help="latency cut per step as a fraction of the seed's latency (default 0.01, the paper's)")
    g.add_argument("--steps", type=int, default=100, metavar="N",
                   help="fine-tune steps per proposal (default 100; the paper's 10,000 were on ImageNet: "
                        "scale with the data)")
    g.add_argument("--select", choices=SELECT_RULES, default="ratio",
                   help="ratio: max accuracy change per latency change (MobileNetV3, default); accuracy: "
                        "the highest accuracy (NetAdapt)")
    g.add_argument("--final-epochs", type=int, default=0, metavar="N",
                   help="fine-tune the final network for N epochs on all training images (default 0)")
    g.add_argument("--held-out", type=float, default=0.1, metavar="F|N",
                   help="training images held out to rank proposals: a fraction (default 0.1) or a count")
    g.add_argument("--subset", type=int, metavar="N",
                   help="fine-tune (and --final-epochs train) on a fixed random subset of N training images")
    g.add_argument("--recipe", default="cifar", help="recipe of the fine-tunes (default cifar)")
    g.add_argument("--lr", type=float, help="learning rate of the fine-tunes (default: the recipe's / 10)")
    g.add_argument("--max-steps", type=int, default=100, metavar="N", help="stop after N NetAdapt steps (default 100)")
    g = p.add_argument_group("run")
    add_output(p, "--out", kind="dir", help="run folder (default runs/adapt-<time>); the same folder continues a run")
    p.add_argument("--storage", metavar="URL",
                   help="history database (default: SQLite in the run folder; a PostgreSQL URL for several workers)")
    p.add_argument("--heartbeat", type=float, default=10.0, metavar="S",
                   help="seconds between a worker's heartbeats; a claim silent for 3x this is taken over (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads(p)
    add_json(p, "spec, accuracy, predicted_ms, measured_ms, steps, model")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from mnv3.adapt.run import AdaptConfig, NetAdapt
    from mnv3.latency import check_threads
    from mnv3.train.threads import apply_threads

    check_threads(args.runtime_threads)
    apply_threads(args.threads)
    out = Path(args.out or time.strftime("runs/adapt-%Y%m%d-%H%M%S"))
    if not args.out:
        from mnv3.files import check_writable

        check_writable(out, kind="dir", flag="--out")
    if args.heartbeat < 1:
        from mnv3.adapt.run import AdaptError

        raise AdaptError(f"--heartbeat: expected at least 1 second, got {args.heartbeat}")
    cfg = AdaptConfig(weights=args.weights, data=args.data, out=out, runtime=args.runtime,
                      target_ms=args.target_ms, target_ratio=args.target_ratio, delta=args.delta, steps=args.steps,
                      select=args.select, final_epochs=args.final_epochs, held_out=args.held_out, subset=args.subset,
                      recipe=args.recipe,
                      lr=args.lr, latency=args.latency, db=args.db, storage=args.storage,
                      runtime_threads=args.runtime_threads, max_steps=args.max_steps, heartbeat=args.heartbeat)
    log = lambda text: print(text, file=sys.stderr, flush=True)
    adapt = NetAdapt(cfg, log=log, progress=not args.no_progress)
    log(f"run folder {out}; to continue after an interruption, run the same command with --out {out}")
    summary = adapt.run()
    print(f"adapted: {summary['seed_ms']:.3f} -> {summary['measured_ms']:.3f} ms measured ({summary['runtime']}, "
          f"target {summary['target_ms']:.3f}) in {summary['steps']} step(s); held-out top-1 "
          f"{summary['seed_accuracy']:.4f} -> {summary['accuracy']:.4f}")
    print(f"model: {summary['model']}; history, trajectory.png and summary.json in {out}")
    if args.json:
        emit_json({k: summary[k] for k in ("spec", "accuracy", "predicted_ms", "measured_ms", "steps", "model",
                                           "seed_ms", "seed_accuracy", "target_ms")})
    return 0
