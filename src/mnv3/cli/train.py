"""`mnv3 train`: arguments, recipe overrides (one flag per recipe key), resume, JSON output."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from mnv3.cli.common import add_json, add_output, add_threads, emit_json
from mnv3.train.recipe import HELP, Recipe, RecipeError, builtin_recipes, load_recipe

_NOT_FLAGS = ("name", "about")


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a classifier (image folder, digits, cifar10), a segmentation or a "
                      "detection model",
        description="Train a classifier (or, with --task segment, an LR-ASPP segmentation model on a "
                    "mask data set; with --task detect, an SSDLite detector on COCO-JSON or YOLO boxes) "
                    "and write a run folder: the resolved recipe, metrics.csv, "
                    "TensorBoard logs, curves.png, checkpoint.pt and model.safetensors (which "
                    "`mnv3 eval` and `mnv3 predict` take). Runs under `torchrun --nproc_per_node N "
                    "-m mnv3 train ...` as data-parallel processes.",
        epilog="Every recipe key has its own flag (below); --set KEY=VALUE does the same. "
               f"Built-in recipes: {', '.join(builtin_recipes())}.")
    p.add_argument("--data", metavar="DATA",
                   help="a folder with train/ and val/ (or test/) class folders, or digits (offline, "
                        "scikit-learn's 8x8 digits: a quick first run), or cifar10")
    p.add_argument("--task", choices=("classify", "segment", "detect"), default=None,
                   help="classify (default); segment: --data is then a mask-folder (classes.txt, "
                        "{train,val}/images, {train,val}/masks) or Pascal VOC folder; detect: a COCO-JSON "
                        "folder (annotations/instances_*.json) or a YOLO data YAML; --weights the backbone")
    p.add_argument("--head", choices=("lraspp", "lraspp-torchvision", "ssdlite"), default=None,
                   help="segmentation head (default lraspp, the paper's); detection: ssdlite")
    p.add_argument("--reduced-tail", action="store_true", default=None,
                   help="detection: halve the layers between C4 and C5 (the paper's reduced tail)")
    p.add_argument("--skip-bad-boxes", action="store_true", default=None,
                   help="detection: drop (and count) boxes outside their image, of no size or of an unknown "
                        "class, and images that are missing, instead of stopping with an error")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="segmentation: the mask value that is not a class (default 255; CamVid's void is 11)")
    p.add_argument("--arch", metavar="ARCH",
                   help="network (default mobilenet_v3_small; mobilenet_v3_large for --task segment); may "
                        "be left out when --weights carries it")
    p.add_argument("--width", type=float, help="width multiplier for a preset --arch (default 1.0)")
    p.add_argument("--weights", metavar="SOURCE",
                   help="start from these weights (model file, torchvision/timm state dict, TFLite, URL, "
                        "torchvision:IMAGENET1K_V1); the classifier is replaced for the data's classes")
    p.add_argument("--recipe", metavar="NAME|FILE",
                   help=f"built-in ({', '.join(builtin_recipes())}) or a JSON/YAML file "
                        "(default: finetune with --weights, otherwise cifar for small images, else paper)")
    add_output(p, "--out", kind="dir", metavar="DIR", help="run folder (default runs/DATA-ARCH)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (flags left out are taken "
                        "from the run); a larger --epochs extends it")
    p.add_argument("--total-stride", type=int, choices=(4, 8, 16, 32),
                   help="downsample the input by this much (default: 8 for small images when training "
                        "from scratch, else the network's 32)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    add_threads(p)
    p.add_argument("--checkpoint-steps", type=int, default=500,
                   help="also checkpoint every N steps (default 500; 0: at epoch ends only)")
    p.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="validate after every N-th epoch only (and the first and last; default 1): for long "
                        "runs on small data, where validation costs as much as training")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image instead of skipping and counting it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p, "top1, top5 (fractions), the model file's path, the run folder")
    add_recipe_flags(p)
    p.set_defaults(func=cmd_train)


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """One flag per recipe key (--lr, --epochs, ...), read back by `_overrides`."""
    group = p.add_argument_group("recipe values (override the recipe's)")
    for f in fields(Recipe):
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"recipe_{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=HELP.get(f.name))
        elif f.name == "resolution":
            group.add_argument(flag, dest=f"recipe_{f.name}", metavar="N|HxW", default=None,
                               help=HELP.get(f.name) + " (HxW for --task segment; default: the first "
                                    "training image's size)")
        else:
            group.add_argument(flag, dest=f"recipe_{f.name}", metavar=f.name.split("_")[-1].upper(),
                               default=None, help=HELP.get(f.name))


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    changes: dict[str, object] = {}
    for item in args.set:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=0.05")
        key, value = item.split("=", 1)
        changes[key.strip()] = value.strip()
    for f in fields(Recipe):
        value = getattr(args, f"recipe_{f.name}", None)
        if value is not None:
            changes[f.name] = value if isinstance(value, str) else str(value)
    return changes


def _recipe(args: argparse.Namespace, default_recipe: str) -> Recipe:
    """--recipe, the resumed run's, or `default_recipe`, with the flags applied (a bad value is a
    RecipeError here, so the dense tasks call it before opening and checking their data)."""
    from mnv3.train.classify import saved_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe)
    elif args.resume and saved_recipe(args.out) is not None:
        recipe = saved_recipe(args.out)
    else:
        recipe = load_recipe(default_recipe)
    return recipe.override(_overrides(args))


def _recipe_and_out(args: argparse.Namespace, default_recipe: str | Recipe, data_set, arch_name: str,
                    head: str | None = None) -> tuple[Recipe, str, bool]:
    """The recipe (`_recipe`, or the one given), the run folder (--out, or runs/DATA-[HEAD-]ARCH)
    and whether this is the process that reports."""
    from mnv3.files import check_writable

    recipe = default_recipe if isinstance(default_recipe, Recipe) else _recipe(args, default_recipe)
    name = str(arch_name).rsplit("/", 1)[-1].removesuffix(".json")
    out = args.out or f"runs/{data_set.name}-{head + '-' if head else ''}{name}"
    if not args.out:
        check_writable(out, kind="dir", flag="--out")
    main = os.environ.get("RANK", "0") == "0"
    if main:
        what = f"{arch_name} + {head}" if head else arch_name
        print(f"training {what} on {data_set.name} ({len(data_set.train)} train / {len(data_set.val)} val "
              f"images, {len(data_set.classes)} classes) with recipe {recipe.name} -> {out}", file=sys.stderr)
    return recipe, out, main


def _arch(args: argparse.Namespace, earlier: dict, default: str):
    """--arch (with --width), else the resumed run's (a name, or a spec saved in run.json)."""
    arch = args.arch or earlier.get("arch")
    if isinstance(arch, dict):
        from mnv3.arch import ArchSpec

        arch = ArchSpec.from_dict(arch)
    if args.width is not None:
        from mnv3.presets import resolve_arch

        arch = resolve_arch(arch or default, args.width)
    return arch


def cmd_train(args: argparse.Namespace) -> int:
    from mnv3.data.datasets import open_data
    from mnv3.train.classify import run_inputs, train
    from mnv3.train.engine import TrainError
    from mnv3.train.threads import apply_threads

    apply_threads(args.threads, workers=args.workers)
    if args.resume and not args.out:
        raise TrainError("--resume needs the --out folder of the run to continue")
    if args.resume and not os.path.isdir(args.out):
        raise TrainError(f"{args.out}: no such run folder to resume")
    if args.resume and not os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        raise TrainError(f"{os.path.join(args.out, 'checkpoint.pt')}: no checkpoint to resume from; "
                         "start the run without --resume")
    earlier = run_inputs(args.out) if args.resume and args.out else {}
    task = args.task or earlier.get("task")
    if task == "detect":
        return _train_detect(args, earlier)
    for flag, value in (("--reduced-tail", args.reduced_tail), ("--skip-bad-boxes", args.skip_bad_boxes)):
        if value:
            raise TrainError(f"{flag} applies to detection; add --task detect")
    if task == "segment":
        return _train_segment(args, earlier)
    data = args.data or earlier.get("data")
    if not data:
        raise TrainError("--data is required: an image folder with train/ and val/, digits, or cifar10")
    arch = _arch(args, earlier, "mobilenet_v3_small")
    weights = args.weights or earlier.get("weights")
    total_stride = args.total_stride or earlier.get("total_stride")
    data_set = open_data(data)
    recipe, out, main = _recipe_and_out(
        args, "finetune" if weights else "cifar" if data_set.resolution else "paper", data_set,
        getattr(arch, "name", arch) or ("weights" if weights else "mobilenet_v3_small"))
    result = train(data_set, out, arch=arch, weights=weights, recipe=recipe, resume=args.resume,
                   total_stride=total_stride, workers=args.workers, checkpoint_steps=args.checkpoint_steps, eval_every=args.eval_every,
                   strict=args.strict, progress=not args.no_progress, device=args.device)
    if main and result.model_path is not None:
        print(f"top-1 {result.metrics.get('val_top1', 0):.4f}, top-5 {result.metrics.get('val_top5', 0):.4f}; "
              f"model written to {result.model_path}")
        if result.skipped:
            print(f"{result.skipped} unreadable training image(s) were skipped (see the log above)")
    if main and args.json and result.model_path is not None:
        emit_json(result.as_dict())
    return 0


def _train_segment(args: argparse.Namespace, earlier: dict) -> int:
    from mnv3.data.masks import open_masks
    from mnv3.heads import parse_resolution
    from mnv3.train.engine import TrainError
    from mnv3.train.segment import train_segment

    data = args.data or earlier.get("data")
    if not data:
        raise TrainError("--data is required: a mask-folder data set (classes.txt, train/images, train/masks, "
                         "val/...) or a Pascal VOC folder")
    size = None
    if args.recipe_resolution is not None:
        parsed = parse_resolution(args.recipe_resolution)
        size = parsed if isinstance(parsed, tuple) else (parsed, parsed)
        args.recipe_resolution = None
    elif earlier.get("size"):
        size = tuple(earlier["size"])
    ignore = args.ignore_index if args.ignore_index is not None else earlier.get("ignore_index", 255)
    head = args.head or earlier.get("head") or "lraspp"
    arch = _arch(args, earlier, "mobilenet_v3_large")
    weights = args.weights or earlier.get("weights")
    recipe = _recipe(args, "segment")      # a bad flag is reported before every mask is read
    data_set = open_masks(data, ignore, progress=not args.no_progress)
    recipe, out, main = _recipe_and_out(
        args, recipe, data_set, getattr(arch, "name", arch) or ("weights" if weights else "mobilenet_v3_large"),
        head)
    result = train_segment(data_set, out, head=head, size=size, arch=arch, weights=weights, recipe=recipe,
                           resume=args.resume, workers=args.workers, checkpoint_steps=args.checkpoint_steps, eval_every=args.eval_every,
                           progress=not args.no_progress, device=args.device)
    if main and result.model_path is not None:
        print(f"mIoU {result.metrics.get('val_miou', 0):.4f}, pixel accuracy "
              f"{result.metrics.get('val_pixel_acc', 0):.4f}; model written to {result.model_path}")
    if main and args.json and result.model_path is not None:
        emit_json(result.as_dict())
    return 0


def _train_detect(args: argparse.Namespace, earlier: dict) -> int:
    from mnv3.data.boxes import open_boxes
    from mnv3.heads import parse_resolution
    from mnv3.train.detect import train_detect
    from mnv3.train.engine import TrainError

    data = args.data or earlier.get("data")
    if not data:
        raise TrainError("--data is required: a COCO-JSON folder (annotations/instances_*.json and its images) "
                         "or a YOLO data YAML")
    if args.head not in (None, "ssdlite"):
        raise TrainError(f"--head {args.head}: not a detection head; the detection head is ssdlite")
    size = tuple(earlier.get("size") or (320, 320))
    if args.recipe_resolution is not None:
        parsed = parse_resolution(args.recipe_resolution)
        size = parsed if isinstance(parsed, tuple) else (parsed, parsed)
        args.recipe_resolution = None
    arch = _arch(args, earlier, "mobilenet_v3_large")
    weights = args.weights or earlier.get("weights")
    reduced = bool(args.reduced_tail if args.reduced_tail is not None else earlier.get("reduced_tail"))
    skip_bad = bool(args.skip_bad_boxes if args.skip_bad_boxes is not None else earlier.get("skip_bad"))
    recipe = _recipe(args, "detect")       # a bad flag is reported before the annotations are read
    data_set = open_boxes(data, skip_bad=skip_bad)
    recipe, out, main = _recipe_and_out(
        args, recipe, data_set, getattr(arch, "name", arch) or ("weights" if weights else "mobilenet_v3_large"),
        "ssdlite")
    result = train_detect(data_set, out, size=size, arch=arch, weights=weights, reduced=reduced, recipe=recipe,
                          resume=args.resume, workers=args.workers, checkpoint_steps=args.checkpoint_steps, eval_every=args.eval_every,
                          progress=not args.no_progress, device=args.device, skip_bad=skip_bad)
    if main and result.model_path is not None:
        print(f"mAP@[.5:.95] {result.metrics.get('val_map', 0):.4f}, mAP@.5 {result.metrics.get('val_map50', 0):.4f}; "
              f"model written to {result.model_path}")
    if main and args.json and result.model_path is not None:
        emit_json(result.as_dict())
    return 0
