"""The `mnv3` command: parses arguments, calls the library, prints. Errors print one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mnv3.arch import SpecError

EXIT_USAGE = 2


def _add_arch_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--width", type=float, default=None,
                   help="width multiplier for a preset (0.35, 0.5, 0.75, 1.0, 1.25, ...)")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default: 224 or the spec's)")


def _spec_from_args(args: argparse.Namespace):
    from mnv3.arch import reduced_tail, with_output_stride
    from mnv3.presets import resolve_arch

    spec = resolve_arch(args.arch, args.width, args.resolution)
    if getattr(args, "reduced_tail", False):
        spec = reduced_tail(spec)
    if getattr(args, "output_stride", None):
        spec = with_output_stride(spec, args.output_stride)
    return spec


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    from mnv3.complexity import count

    spec = _spec_from_args(args)
    cost = count(spec, args.num_classes)
    header = f"{'layer':<11}{'input':>9}{'in':>6}{'exp':>6}{'out':>6}{'k':>3}{'SE':>5}{'NL':>8}{'s':>3}{'d':>3}" \
             f"{'params':>12}{'MACs':>14}"
    print(f"{spec.name}: {spec.resolution}x{spec.resolution}, padding {spec.padding}, "
          f"{args.num_classes} classes")
    print(header)
    print("-" * len(header))
    for row in cost.layers:
        size = f"{row.input_size}²" if row.input_size > 1 else "1"
        exp = "" if row.expansion is None else str(row.expansion)
        se = "-" if row.se is None else str(row.se)
        print(f"{row.name:<11}{size:>9}{row.in_channels:>6}{exp:>6}{row.out_channels:>6}{row.kernel:>3}"
              f"{se:>5}{row.activation:>8}{row.stride:>3}{row.dilation:>3}{_fmt_int(row.params):>12}{_fmt_int(row.macs):>14}")
    print("-" * len(header))
    print(f"total: {_fmt_int(cost.params)} parameters, {cost.macs / 1e6:.1f}M MACs")
    if args.save:
        spec.save(args.save)
        print(f"spec written to {args.save}")
    if args.json:
        print(json.dumps({"arch": spec.name, "resolution": spec.resolution, "params": cost.params,
                          "macs": cost.macs, "num_classes": args.num_classes}))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from mnv3.weights import load, model_meta, save

    model = load(args.source, arch=args.arch)
    path = save(model, args.output)
    meta = model_meta(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {path}")
    print(f"  network: {model.spec.name} ({_fmt_int(n_params)} parameters, padding {model.spec.padding})")
    print(f"  classes: {model.num_classes}" + (" (ImageNet ids and names)" if meta.classes and
                                                 len(meta.classes) == 1000 else ""))
    pre = meta.preprocess
    print(f"  preprocess: resize {pre.resize}, crop {pre.resolution}, {pre.interpolation}, "
          f"mean {tuple(round(m, 4) for m in pre.mean)}, std {tuple(round(s, 4) for s in pre.std)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mnv3.data import DataError
    from mnv3.train.evaluate import predict
    from mnv3.weights import load

    model = load(args.weights, arch=args.arch)
    failed, results = 0, []
    for image in args.images:
        try:
            top = predict(model, image, k=args.top)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        results.append({"image": image, "top": [{"class": c, "label": label, "prob": p} for c, label, p in top]})
        print(image)
        for rank, (_, label, prob) in enumerate(top, start=1):
            print(f"  {rank}. {prob:6.1%}  {label}")
    if failed:
        print(f"{failed} of {len(args.images)} image(s) could not be read", file=sys.stderr)
    if args.json:
        print(json.dumps({"results": results, "failed": failed}))
    return 1 if failed else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mnv3.train.evaluate import evaluate
    from mnv3.weights import load

    model = load(args.weights, arch=args.arch)
    result = evaluate(model, args.data, batch_size=args.batch_size, workers=args.workers,
                      progress=not args.no_progress)
    print(f"{model.spec.name} on {args.data}: top-1 {result.top1:.2%}, top-5 {result.top5:.2%} "
          f"({result.images} images)")
    if result.skipped:
        print(f"skipped {result.skipped} unreadable image(s):", file=sys.stderr)
        for line in result.skipped_files[:10]:
            print(f"  {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mnv3.complexity import count
    from mnv3.files import atomic_write_csv
    from mnv3.latency import MIN_RUNS, DriftGuard, LatencyError, check_threads, get_runtime, measure_all
    from mnv3.presets import resolve_arch

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    if args.batch < 1:
        raise SpecError(f"--batch: expected at least 1, got {args.batch}")
    if args.runs < MIN_RUNS:      # before any (slow) conversion
        raise LatencyError(f"--runs: the protocol times at least {MIN_RUNS} runs, got {args.runs}")
    specs = [resolve_arch(a, args.width, args.resolution) for a in args.archs]
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
    path = atomic_write_csv(args.csv, rows)
    print(f"written {path}")
    if args.json:
        keys = ("arch", "runtime", "median_ms", "p10_ms", "p90_ms", "params", "macs")
        print(json.dumps({"environment": {k: v for k, v in rows[0].items() if k in env.as_dict()},
                          "results": [{k: r[k] for k in keys} for r in rows]}))
    return 0


def _space_from_args(args: argparse.Namespace):
    """--space: a seed (preset or spec JSON) with the default choices, or a whole space JSON
    (`SearchSpace.to_dict()`: a "seed" spec and the choice lists)."""
    from mnv3.presets import resolve_arch
    from mnv3.space import SearchSpace

    path = Path(args.space)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict) and "seed" in data:
            try:
                space = SearchSpace.from_dict(data)
            except TypeError as exc:
                raise SpecError(f"{path}: not a search space ({exc})") from None
            if args.resolution and args.resolution != space.seed.resolution:
                space = SearchSpace.from_dict({**data, "seed": space.seed.replace(
                    resolution=args.resolution).to_dict()})
            return space
    return SearchSpace(resolve_arch(args.space, None, args.resolution))


_CHOICES = (("kernels", int, "kernel sizes"), ("expansion_ratios", float, "expansion ratios"),
            ("se", str, "squeeze-and-excite: off, on"), ("activations", str, "relu, hswish"),
            ("widths", float, "width multipliers per stage"), ("depth_deltas", int, "blocks added per stage"))


def cmd_lut_space(args: argparse.Namespace) -> int:
    import dataclasses

    from mnv3.files import atomic_write_text
    from mnv3.latency.lut import space_parts

    space = _space_from_args(args)
    changes = {}
    for name, _, _ in _CHOICES:
        values = getattr(args, name)
        if values is None:
            continue
        if name == "se":
            bad = [v for v in values if v not in ("on", "off")]
            if bad:
                raise SpecError(f"--se: expected on and/or off, got {' '.join(bad)}")
            values = [v == "on" for v in values]
        changes[name] = tuple(dict.fromkeys(values))
    space = dataclasses.replace(space, **changes)
    entries = len(space_parts(space))
    seed = space.seed
    print(f"space {space.key()}: seed {seed.name} at {seed.resolution}x{seed.resolution}, "
          f"{float(space.size()):.2e} networks, {entries} lookup-table entries")
    print(f"  per block: kernels {list(space.kernels)}, expansion ratios {list(space.expansion_ratios)}, "
          f"SE {['on' if v else 'off' for v in space.se]}, activations {list(space.activations)}")
    stages = [{"input": st.input_size, "stride": st.stride, "widths": space.stage_widths(st),
               "depths": space.depths(st)} for st in space.stages()]
    print(f"  {'stage':<7}{'input':>6}{'stride':>8}  {'widths':<18}depths")
    for i, st in enumerate(stages, 1):
        print(f"  {i:<7}{st['input']:>6}{st['stride']:>8}  {st['widths']!s:<18}{st['depths']}")
    if args.save:
        atomic_write_text(args.save, json.dumps(space.to_dict(), indent=1) + "\n")
        print(f"written {args.save} (pass it as --space to mnv3 lut build / validate)")
    if args.json:
        print(json.dumps({"space": space.key(), "networks": space.size(), "entries": entries,
                          "stages": stages, "file": str(args.save) if args.save else None}))
    return 0


def cmd_lut_build(args: argparse.Namespace) -> int:
    from mnv3.latency import LatencyError, check_threads, get_runtime
    from mnv3.latency.lut import build_table
    from mnv3.latency.table import LatencyTable

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    space = _space_from_args(args)
    table = LatencyTable(args.db)
    if args.chunk < 1 or args.calibrate < 2:
        raise LatencyError("--chunk must be at least 1 and --calibrate at least 2")
    summary = build_table(space, runtime, table, threads=threads, calibration_networks=args.calibrate,
                          chunk=args.chunk, passes=args.passes, progress=not args.no_progress)
    cal = summary["calibration"]
    print(f"table {table.url}: {summary['entries']} entries ({summary['measured']} measured now); "
          f"calibration measured = {cal['a']:.3f} x sum + {cal.get('c', 0.0):.3f} x parts + {cal['b']:.3f} ms "
          f"({cal.get('model', 'a*sum+c*parts+b')} on {cal['n']} networks"
          + (f", leave-one-out MAPE {cal['loo_mape']:.1%})" if cal.get("loo_mape") is not None else ")"))
    if args.json:
        print(json.dumps({**summary, "space": space.key(), "db": table.url}))
    return 0


def cmd_lut_validate(args: argparse.Namespace) -> int:
    from mnv3.latency import check_threads, get_runtime
    from mnv3.latency.lut import scatter_plot, validate
    from mnv3.latency.table import LatencyTable

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    space = _space_from_args(args)
    table = LatencyTable(args.db)
    stats, points = validate(space, runtime, table, n=args.n, threads=threads, seed=args.seed,
                             progress=not args.no_progress)
    print(f"{stats['n']} random networks of {space.key()} on {runtime.name}: MAPE {stats['mape']:.1%}, "
          f"RMSE {stats['rmse_ms']:.3f} ms, within ±5% {stats['within_5']:.0%}, within ±10% {stats['within_10']:.0%}")
    plot = args.plot or f"lut-validate-{runtime.name}.png"
    scatter_plot(points, plot, f"{space.key()} on {runtime.name}\n{stats['within_10']:.0%} within ±10%, MAPE {stats['mape']:.1%}")
    print(f"scatter plot written to {plot}")
    if args.json:
        print(json.dumps(stats))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnv3", description="MobileNetV3 networks, search on your own device, and deployment.",
        epilog="ARCH is a preset name (see `mnv3 info --help`), a peer's model name "
               "(e.g. tf_mobilenetv3_large_100) or a spec JSON file.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from mnv3.presets import list_presets

    p = sub.add_parser("info", help="block table, parameters and MACs of a network",
                       description="Print a network's block table, parameters and multiply-adds. "
                                   f"Presets: {', '.join(list_presets())}.")
    p.add_argument("arch", metavar="ARCH", help="preset name or spec JSON file")
    _add_arch_options(p)
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--reduced-tail", action="store_true", help="halve the layers between C4 and C5")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="dilate to keep this output stride")
    p.add_argument("--save", metavar="SPEC.json", help="write the spec as JSON")
    p.add_argument("--json", action="store_true", help="end with one JSON line: arch, params, macs")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="import weights (torchvision, timm, TFLite, URL) into a model file",
                       description="Import weights into one mnv3 model file (spec + weights + classes "
                                   "+ preprocessing). SOURCE: a torchvision or timm state dict, a TFLite "
                                   "file, a URL, or a named set like torchvision:IMAGENET1K_V2.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--arch", help="the network the weights belong to (recognised when left out, "
                                  "except for timm weights)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="model file to write (.safetensors)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="top-5 classes of images",
                       description="Print the top classes of each image with names and probabilities.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, metavar="FILE", help="model file (or any SOURCE convert takes)")
    p.add_argument("--arch", help="only for weights that do not carry their network")
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="top-1/top-5 on an image folder",
                       description="Evaluate on FOLDER/<class id>/<images>; class folders are named by "
                                   "the model's class ids (ImageNet wnids for ImageNet weights); a subset "
                                   "of the classes is fine. Unreadable images are skipped and counted.")
    p.add_argument("--weights", required=True, metavar="FILE", help="model file (or any SOURCE convert takes)")
    p.add_argument("--data", required=True, metavar="FOLDER")
    p.add_argument("--arch", help="only for weights that do not carry their network")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="end with one JSON line: top1, top5 (fractions)")
    p.set_defaults(func=cmd_eval)

    from mnv3.train.command import add_parser as add_train_parser

    add_train_parser(sub)

    p = sub.add_parser("bench", help="measure latency on a runtime (torch, onnxruntime, litert)",
                       description="Measure end-to-end latency of networks on one runtime with the "
                                   "protocol: fixed threads, warm-up, at least 50 timed runs, median "
                                   "with p10/p90; the first network is re-measured between the others "
                                   "and measurements taken while it drifted by more than 3% are repeated.")
    p.add_argument("archs", nargs="+", metavar="ARCH")
    p.add_argument("--runtime", required=True, help="torch, torch-fused, onnxruntime or litert")
    p.add_argument("--threads", type=int, default=1, help="threads the runtime may use (default 1)")
    p.add_argument("--batch", type=int, default=1)
    _add_arch_options(p)
    p.add_argument("--runs", type=int, default=50, help="timed runs per network (at least 50)")
    p.add_argument("--csv", default="mnv3-bench.csv", metavar="FILE", help="CSV to write (default mnv3-bench.csv)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="end with one JSON line: results [{arch, runtime, median_ms, ...}]")
    p.set_defaults(func=cmd_bench)

    lut = sub.add_parser("lut", help="per-block latency lookup tables and the latency predictor",
                         description="Latency lookup tables for a search space on a runtime, stored in a "
                                     "database (SQLite file by default, or a PostgreSQL URL shared by "
                                     "several machines).")
    lut_sub = lut.add_subparsers(dest="lut_command", metavar="COMMAND", required=True)
    for name, func, text in (("space", cmd_lut_space, ("show a search space and save it as JSON, with "
                                                      "its choices changed")),
                             ("build", cmd_lut_build, ("measure every block configuration of the space "
                                                      "(resumes where an interrupted build stopped)")),
                             ("validate", cmd_lut_validate, "predicted vs measured latency of random networks")):
        q = lut_sub.add_parser(name, help=text, description=text)
        q.add_argument("--space", default="mobilenet_v3_large", metavar="SEED",
                       help="the search space: a seed (preset or spec JSON) with the default choices, "
                            "or a space JSON (default mobilenet_v3_large)")
        q.add_argument("--resolution", type=int, default=None, help="input resolution (default: the seed's)")
        q.add_argument("--json", action="store_true", help="end with one JSON line of the results")
        q.set_defaults(func=func)
        if name == "space":
            for choice, kind, what in _CHOICES:
                q.add_argument("--" + choice.replace("_", "-"), dest=choice, nargs="+", type=kind,
                               metavar="V", help=f"{what} (default: the space's)")
            q.add_argument("--save", metavar="JSON", help="write the space here")
            continue
        q.add_argument("--runtime", required=True, help="torch, torch-fused, onnxruntime or litert")
        q.add_argument("--db", default=None, metavar="URL", help="table database (default sqlite:///mnv3-lut.sqlite)")
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--no-progress", action="store_true")
        if name == "build":
            q.add_argument("--calibrate", type=int, default=12, metavar="N",
                           help="random networks measured end to end to fit the calibration (default 12)")
            q.add_argument("--chunk", type=int, default=48, metavar="N",
                           help="entries converted together and committed together (default 48)")
            q.add_argument("--passes", type=int, default=3, metavar="N",
                           help="passes over the space that share each entry's runs, minutes apart, so "
                                "that no entry carries one minute's machine state (default 3)")
        else:
            q.add_argument("--n", type=int, required=True, help="random networks to measure end to end")
            q.add_argument("--plot", metavar="PNG", help="scatter plot file (default lut-validate-RUNTIME.png)")
            q.add_argument("--seed", type=int, default=7,
                           help="which random networks (default 7; the calibration's are seed 1234)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from mnv3.data import DataError
    from mnv3.latency import LatencyError
    from mnv3.train.engine import TrainError
    from mnv3.train.recipe import RecipeError
    from mnv3.weights import WeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (SpecError, WeightsError, DataError, LatencyError, TrainError, RecipeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
