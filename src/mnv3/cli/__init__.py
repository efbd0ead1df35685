"""The `mnv3` command: one module per command group (parse, call the library, print). Errors print
one clear line and exit with code 2; with --json, stdout carries exactly one JSON document."""

from __future__ import annotations

import argparse
import contextlib
import sys

from mnv3.cli import adapt, bench, convert, export, info, lut, predict, search, supernet, train
from mnv3.cli.common import _JSON_OUT, EXIT_USAGE, check_outputs

# In the order of the workflow: look at a network, bring weights in, measure it on your device,
# build the latency tables the search reads, (train a supernet,) search, train the winner, shrink it with NetAdapt, then
# use and export the model.
COMMANDS = (info, convert, bench, lut, supernet, search, train, adapt, predict, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnv3", description="MobileNetV3 networks, search on your own device, and deployment.",
        epilog="ARCH is a preset name (see `mnv3 info --help`), a peer's model name "
               "(e.g. tf_mobilenetv3_large_100), a spec JSON file or a model file (.safetensors).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's problem: printed as one line, exit code 2."""
    from mnv3.adapt import PruneError
    from mnv3.arch import SpecError
    from mnv3.data import DataError
    from mnv3.deploy import ExportError
    from mnv3.files import OutputError
    from mnv3.latency import LatencyError
    from mnv3.search.reward import RewardError
    from mnv3.search.run import SearchError
    from mnv3.search.strategies import StrategyError
    from mnv3.train.engine import TrainError
    from mnv3.train.recipe import RecipeError
    from mnv3.train.threads import ThreadsError
    from mnv3.weights import WeightsError

    return (SpecError, WeightsError, DataError, LatencyError, TrainError, RecipeError, OutputError,
            ThreadsError, SearchError, RewardError, StrategyError, PruneError, ExportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    as_json = bool(getattr(args, "json", False))
    _JSON_OUT.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            check_outputs(args)
            return args.func(args)
    except errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _JSON_OUT.pop()


if __name__ == "__main__":
    sys.exit(main())
