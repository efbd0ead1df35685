"""What every command shares: the network arguments, output flags that are checked before any
work starts, the `--json` document on stdout, and small formatting helpers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mnv3.arch import ArchSpec, SpecError
from mnv3.files import check_writable

EXIT_USAGE = 2

# The stdout of the process while a command runs with --json: everything human is printed to
# stderr then, and `emit_json` writes the one JSON document here (set by mnv3.cli.main).
_JSON_OUT: list[Any] = []


# -- networks ----------------------------------------------------------------------------------------
def add_arch_options(p: argparse.ArgumentParser, dense: bool = False) -> None:
    p.add_argument("--width", type=float, default=None,
                   help="width multiplier for a preset (0.35, 0.5, 0.75, 1.0, 1.25, ...)")
    if dense:
        p.add_argument("--resolution", type=_resolution, default=None, metavar="N|HxW",
                       help="input resolution: N, or HxW for --task segment (default: 224 or the spec's; "
                            "a segmentation model file's own)")
    else:
        p.add_argument("--resolution", type=int, default=None,
                       help="input resolution (default: 224 or the spec's)")


def _resolution(text: str) -> int | tuple[int, int]:
    from mnv3.heads import parse_resolution

    try:
        return parse_resolution(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--resolution: ")) from None


def add_task_options(p: argparse.ArgumentParser) -> None:
    """--task and --head: what turns a backbone into a dense-prediction model."""
    from mnv3.heads import DETECT_KINDS, SEGMENT_KINDS

    p.add_argument("--task", choices=("classify", "segment", "detect"), default=None,
                   help="classify (default), segment (a segmentation head on the backbone) or detect "
                        "(SSDLite); a model file says its own task")
    p.add_argument("--head", choices=SEGMENT_KINDS + DETECT_KINDS, default=None,
                   help="segmentation head: lraspp (the paper's: RF2 backbone, large pooling gate, the "
                        "default) or lraspp-torchvision (global-pool gate, torchvision's layout); "
                        "detection: ssdlite (the only one, the default)")


DEFAULT_HEADS = {"segment": "lraspp", "detect": "ssdlite"}
DEFAULT_CLASSES = {"segment": 19, "detect": 80}
DEFAULT_SIZES = {"segment": (512, 512), "detect": (320, 320)}


def check_head(task: str, head: str | None) -> str:
    """The --head for `task` (its default when None); a head of another task is an error."""
    from mnv3.heads import KINDS

    head = head or DEFAULT_HEADS[task]
    if head not in KINDS[task]:
        raise SpecError(f"--head {head}: not a {task} head; expected one of {', '.join(KINDS[task])}")
    return head


def dense_from_args(args: argparse.Namespace, arch: str | None = None):
    """(backbone spec, DenseHead or None): a dense model file's own, or ARCH turned into a
    segmentation or detection backbone with --head, --num-classes and --resolution when --task
    segment or detect."""
    from mnv3.heads import DenseHead, lraspp, segment_backbone, ssdlite

    arch = arch if arch is not None else args.arch
    res = args.resolution
    header = _model_header_of(arch)
    if header is not None and "head" in header:
        head = DenseHead.from_json(header["head"])
        if args.task not in (None, head.task):
            raise SpecError(f"{arch}: a {head.task} model; drop --task {args.task}")
        spec = ArchSpec.from_json(header["spec"])
        if res is not None:
            size = res if isinstance(res, tuple) else (res, res)
            head, spec = head.replace(resolution=size), spec.replace(resolution=min(size))
        if args.num_classes:
            head = head.replace(num_classes=args.num_classes)
        return spec, head
    if args.task not in ("segment", "detect"):
        if args.head:
            raise SpecError(f"--head {args.head} needs --task segment or --task detect")
        return spec_from_args(args, arch), None
    kind = check_head(args.task, args.head)
    size = res if isinstance(res, tuple) else (res, res) if res else DEFAULT_SIZES[args.task]
    classes = args.num_classes or DEFAULT_CLASSES[args.task]
    if args.task == "detect":
        spec = spec_from_args(args, arch, resolution=min(size))
        return spec, ssdlite(spec, classes, size)
    spec = segment_backbone(spec_from_args(args, arch, resolution=min(size)), kind, size)
    return spec, lraspp(kind, classes, size)


def _model_header_of(arch: str) -> dict[str, str] | None:
    from mnv3.arch import is_model_file
    from mnv3.weights.model_file import read_header

    return read_header(Path(arch)) if is_model_file(arch) else None


def spec_from_args(args: argparse.Namespace, arch: str | None = None, resolution: int | None = None) -> ArchSpec:
    """ARCH (a preset, a peer's name, a spec JSON or a model file) with --width, --resolution (or
    `resolution`) and, where the command has them, --reduced-tail and --output-stride applied."""
    from mnv3.arch import reduced_tail, with_output_stride
    from mnv3.presets import resolve_arch

    if resolution is None:
        resolution = args.resolution
        if isinstance(resolution, tuple):
            if resolution[0] != resolution[1]:
                raise SpecError(f"--resolution {resolution[0]}x{resolution[1]}: a classifier takes a square "
                                "input; give one size, or add --task segment")
            resolution = resolution[0]
    spec = resolve_arch(arch if arch is not None else args.arch, args.width, resolution)
    if getattr(args, "reduced_tail", False):
        spec = reduced_tail(spec)
    if getattr(args, "output_stride", None):
        spec = with_output_stride(spec, args.output_stride)
    return spec


def read_space_json(path: str | Path):
    """The SearchSpace in `path` when it is a space JSON (`SearchSpace.to_dict()`: a "seed" spec and
    the choice lists), else None (a seed: preset, spec JSON or model file)."""
    from mnv3.space import SearchSpace

    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid JSON ({exc})") from None
    if not (isinstance(data, dict) and "seed" in data):
        return None
    try:
        return SearchSpace.from_dict(data)
    except TypeError as exc:
        raise SpecError(f"{path}: not a search space ({exc})") from None


def space_from_args(args: argparse.Namespace):
    """--space: a seed (preset, spec JSON or model file) with the default choices, or a whole
    space JSON, at --resolution and with a --classes classifier when given."""
    import dataclasses

    from mnv3.presets import resolve_arch
    from mnv3.space import SearchSpace

    space = read_space_json(args.space)
    if space is None:
        space = SearchSpace(resolve_arch(args.space, None, args.resolution))
    elif args.resolution and args.resolution != space.seed.resolution:
        space = dataclasses.replace(space, seed=space.seed.replace(resolution=args.resolution))
    classes = getattr(args, "classes", None)
    if classes is not None:
        if classes < 1:
            raise SpecError(f"--classes {classes}: a classifier needs 1 class or more")
        space = dataclasses.replace(space, num_classes=classes)
    return space


# -- outputs -----------------------------------------------------------------------------------------
def add_output(p: argparse.ArgumentParser, *flags: str, kind: str = "file", **kw: Any) -> None:
    """An argument that names a file (`kind="file"`) or folder (`kind="dir"`) the command writes.
    `mnv3.cli.main` checks every such path before the command starts, so no measurement or
    training run is done and then lost to an unwritable path."""
    action = p.add_argument(*flags, **kw)
    outputs = list(p.get_default("outputs") or ())
    outputs.append((action.dest, action.option_strings[-1] if action.option_strings else action.dest, kind))
    p.set_defaults(outputs=tuple(outputs))


def check_outputs(args: argparse.Namespace) -> None:
    for dest, flag, kind in getattr(args, "outputs", ()) or ():
        value = getattr(args, dest, None)
        if value is not None:
            check_writable(value, kind=kind, flag=flag)


def add_json(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print one JSON document on stdout ({what}); everything else goes to stderr")


def emit_json(doc: Any) -> None:
    """The command's one JSON document, on the real stdout (human output is on stderr with --json)."""
    out = _JSON_OUT[-1] if _JSON_OUT else sys.stdout
    print(json.dumps(doc), file=out, flush=True)


# -- threads -----------------------------------------------------------------------------------------
def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads per process (default: chosen from the free cores, the "
                        "processes of this run and the data-loading workers; printed at start)")


def fmt_int(n: int) -> str:
    return f"{n:,}"
