"""The `mnv3` command: parses arguments, calls the library, prints. Errors print one clear line."""

from __future__ import annotations

import argparse
import json
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    from mnv3.data import DataError
    from mnv3.weights import WeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (SpecError, WeightsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
