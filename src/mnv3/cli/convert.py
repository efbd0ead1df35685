"""`mnv3 convert`: import weights (torchvision, timm, TFLite, a URL) into one mnv3 model file."""

from __future__ import annotations

import argparse

from mnv3.cli.common import add_json, add_output, emit_json, fmt_int


def register(sub) -> None:
    p = sub.add_parser("convert", help="import weights (torchvision, timm, TFLite, URL) into a model file",
                       description="Import weights into one mnv3 model file (spec + weights + classes "
                                   "+ preprocessing). SOURCE: a torchvision or timm state dict, a TFLite "
                                   "file, a URL, or a named set like torchvision:IMAGENET1K_V2.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--arch", help="the network the weights belong to (recognised when left out, "
                                  "except for timm weights)")
    add_output(p, "-o", "--output", required=True, metavar="FILE", help="model file to write (.safetensors)")
    add_json(p, "model, arch, params, num_classes")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from mnv3.weights import load, model_meta, save

    model = load(args.source, arch=args.arch)
    path = save(model, args.output)
    meta = model_meta(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {path}")
    print(f"  network: {model.spec.name} ({fmt_int(n_params)} parameters, padding {model.spec.padding})")
    print(f"  classes: {model.num_classes}" + (" (ImageNet ids and names)" if meta.classes and
                                                 len(meta.classes) == 1000 else ""))
    pre = meta.preprocess
    print(f"  preprocess: resize {pre.resize}, crop {pre.resolution}, {pre.interpolation}, "
          f"mean {tuple(round(m, 4) for m in pre.mean)}, std {tuple(round(s, 4) for s in pre.std)}")
    if args.json:
        emit_json({"model": str(path), "arch": model.spec.name, "params": n_params,
                   "num_classes": model.num_classes})
    return 0
