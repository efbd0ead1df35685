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
def add_arch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=float, default=None,
                   help="width multiplier for a preset (0.35, 0.5, 0.75, 1.0, 1.25, ...)")
    p.add_argument("--resolution", type=int, default=None, help="input resolution (default: 224 or the spec's)")


def spec_from_args(args: argparse.Namespace, arch: str | None = None) -> ArchSpec:
    """ARCH (a preset, a peer's name, a spec JSON or a model file) with --width, --resolution and,
    where the command has them, --reduced-tail and --output-stride applied."""
    from mnv3.arch import reduced_tail, with_output_stride
    from mnv3.presets import resolve_arch

    spec = resolve_arch(arch if arch is not None else args.arch, args.width, args.resolution)
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
    space JSON, at --resolution when given."""
    import dataclasses

    from mnv3.presets import resolve_arch
    from mnv3.space import SearchSpace

    space = read_space_json(args.space)
    if space is None:
        return SearchSpace(resolve_arch(args.space, None, args.resolution))
    if args.resolution and args.resolution != space.seed.resolution:
        space = dataclasses.replace(space, seed=space.seed.replace(resolution=args.resolution))
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
