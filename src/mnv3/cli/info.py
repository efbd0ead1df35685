"""`mnv3 info`: a network's block table, parameters and MACs (and, for a model file, its classes
and preprocessing)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mnv3.cli.common import (
    add_arch_options,
    add_json,
    add_output,
    add_task_options,
    dense_from_args,
    emit_json,
    fmt_int,
)


def register(sub) -> None:
    from mnv3.presets import list_presets

    p = sub.add_parser("info", help="block table, parameters and MACs of a network",
                       description="Print a network's block table, parameters and multiply-adds. "
                                   "ARCH: a preset, a peer's name, a spec JSON or a model file "
                                   f"(.safetensors). Presets: {', '.join(list_presets())}.")
    p.add_argument("arch", metavar="ARCH", help="preset name, spec JSON or model file")
    add_arch_options(p, dense=True)
    add_task_options(p)
    p.add_argument("--num-classes", "--classes", type=int, default=None, dest="num_classes",
                   help="classes (default 1000 for a classifier, 19 for --task segment, 80 for --task detect, or "
                        "the model file's)")
    p.add_argument("--reduced-tail", action="store_true", help="halve the layers between C4 and C5")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="dilate to keep this output stride")
    add_output(p, "--save", metavar="SPEC.json", help="write the spec as JSON")
    add_json(p, "arch, resolution, params, macs, num_classes; task and head for a segmentation or detection model; "
                "classes and preprocess for a model file")
    p.set_defaults(func=cmd_info)


def _model_header(arch: str):
    """(num_classes, ModelMeta) when ARCH is an mnv3 model file, else None."""
    from mnv3.arch import is_model_file
    from mnv3.weights.model_file import ModelMeta, read_header

    if not is_model_file(arch):
        return None
    header = read_header(Path(arch))
    return int(header["num_classes"]), ModelMeta.from_json(header["meta"])


def cmd_info(args: argparse.Namespace) -> int:
    spec, head = dense_from_args(args)
    model = _model_header(args.arch)
    if head is not None:
        doc = _dense_info(spec, head)
        num_classes = head.num_classes
    else:
        num_classes = args.num_classes or (model[0] if model else 1000)
        doc = _classifier_info(spec, num_classes)
    if model:
        meta = model[1]
        names = [meta.label(i) for i in range(min(num_classes, 5))]
        more = f", ... ({num_classes} in all)" if num_classes > 5 else ""
        pre = meta.preprocess
        print(f"classes: {', '.join(names)}{more}")
        print(f"preprocess: resize {pre.resize}, crop {pre.resolution}, {pre.interpolation}, "
              f"mean {tuple(round(m, 4) for m in pre.mean)}, std {tuple(round(s, 4) for s in pre.std)}")
        if meta.training:
            print(f"training: {meta.training}")
        doc["classes"] = list(meta.classes or [])
        doc["preprocess"] = dataclasses.asdict(pre)
    if args.save:
        spec.save(args.save)
        print(f"spec written to {args.save}" + (" (the backbone's)" if head is not None else ""))
    if args.json:
        emit_json(doc)
    return 0


def _classifier_info(spec, num_classes: int) -> dict:
    from mnv3.complexity import count

    cost = count(spec, num_classes)
    header = f"{'layer':<11}{'input':>9}{'in':>6}{'exp':>6}{'out':>6}{'k':>3}{'SE':>5}{'NL':>8}{'s':>3}{'d':>3}" \
             f"{'params':>12}{'MACs':>14}"
    print(f"{spec.name}: {spec.resolution}x{spec.resolution}, padding {spec.padding}, {num_classes} classes")
    print(header)
    print("-" * len(header))
    for row in cost.layers:
        size = f"{row.input_size}²" if row.input_size > 1 else "1"
        exp = "" if row.expansion is None else str(row.expansion)
        se = "-" if row.se is None else str(row.se)
        print(f"{row.name:<11}{size:>9}{row.in_channels:>6}{exp:>6}{row.out_channels:>6}{row.kernel:>3}"
              f"{se:>5}{row.activation:>8}{row.stride:>3}{row.dilation:>3}{fmt_int(row.params):>12}"
              f"{fmt_int(row.macs):>14}")
    print("-" * len(header))
    print(f"total: {fmt_int(cost.params)} parameters, {cost.macs / 1e6:.1f}M MACs")
    return {"arch": spec.name, "resolution": spec.resolution, "params": cost.params, "macs": cost.macs,
            "num_classes": num_classes}


def _dense_info(spec, head) -> dict:
    """Parameters and MACs of a segmentation or detection model, counted on the built module at the
    head's (non-square) resolution; per block with the backbone's shapes beside them."""
    from mnv3.nn import build_dense
    from mnv3.nn.profile import module_cost

    height, width = head.resolution
    def group(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3] if name.startswith("backbone.blocks.") else parts[:2])

    params, macs, parts = module_cost(lambda: build_dense(spec, head), (height, width), group=group)
    print(f"{spec.name} + {head.kind}: {height}x{width}, {head.num_classes} classes, taps "
          f"{' + '.join(head.taps)}, padding {spec.padding}")
    line = f"{'layer':<22}{'in':>6}{'exp':>6}{'out':>6}{'k':>3}{'SE':>5}{'NL':>8}{'s':>3}{'d':>3}{'params':>12}{'MACs':>16}"
    print(line)
    print("-" * len(line))
    shapes = {f"backbone.blocks.{i}": (cin, b) for i, (cin, b) in enumerate(zip(spec.block_inputs(), spec.blocks))}
    for name, (p, m) in parts.items():
        if name in shapes:
            cin, b = shapes[name]
            label = f"block{int(name.rsplit('.', 1)[1]) + 1}"
            cols = (f"{cin:>6}{b.expansion:>6}{b.out:>6}{b.kernel:>3}{'-' if b.se is None else b.se:>5}"
                    f"{b.activation:>8}{b.stride:>3}{b.dilation:>3}")
        else:
            label = name.removeprefix("backbone.").replace("classifier.", "head.", 1)
            cols = " " * 46
        print(f"{label:<22}{cols}{fmt_int(p):>12}{fmt_int(m):>16}")
    print("-" * len(line))
    print(f"total: {fmt_int(params)} parameters, {macs / 1e9:.2f}B MACs")
    return {"arch": spec.name, "task": head.task, "head": head.kind, "resolution": [height, width],
            "params": params, "macs": macs, "num_classes": head.num_classes, "taps": list(head.taps)}
