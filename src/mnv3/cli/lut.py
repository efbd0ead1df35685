"""`mnv3 lut`: per-block latency lookup tables for a search space, and the latency predictor."""

from __future__ import annotations

import argparse

from mnv3.arch import SpecError
from mnv3.cli.common import add_json, add_output, emit_json, space_from_args


def register(sub) -> None:
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
                       help="the search space: a seed (preset, spec JSON or model file) with the default choices, "
                            "or a space JSON (default mobilenet_v3_large)")
        q.add_argument("--resolution", type=int, default=None, help="input resolution (default: the seed's)")
        q.add_argument("--num-classes", "--classes", dest="classes", type=int, default=None, metavar="N",
                       help="classes of the classifier every network ends in, part of the head's latency "
                            "(default: the space JSON's, or ImageNet's 1000)")
        add_json(q, "the results")
        q.set_defaults(func=func)
        if name == "space":
            for choice, kind, what in _CHOICES:
                q.add_argument("--" + choice.replace("_", "-"), dest=choice, nargs="+", type=kind,
                               metavar="V", help=f"{what} (default: the space's)")
            add_output(q, "--save", metavar="JSON", help="write the space here")
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
                                "that no entry carries one minute's machine state (default 3; the heaviest "
                                "entries, a fifth of a typical network or more, get twice as many)")
        else:
            q.add_argument("--n", type=int, required=True, help="random networks to measure end to end")
            add_output(q, "--plot", metavar="PNG",
                       help="scatter plot file (default lut-validate-RUNTIME.png, or -2, -3, ... when taken)")
            q.add_argument("--seed", type=int, default=7,
                           help="which random networks (default 7; the calibration's are seed 1234)")
            q.add_argument("--passes", type=int, default=1, metavar="N",
                           help="time all the networks N times, one whole run after another, and compare "
                                "each one's median reading (default 1); prints how far readings move "
                                "between runs on this machine")


_CHOICES = (("kernels", int, "kernel sizes"), ("expansion_ratios", float, "expansion ratios"),
            ("se", str, "squeeze-and-excite: off, on"), ("activations", str, "relu, hswish"),
            ("widths", float, "width multipliers per stage"), ("depth_deltas", int, "blocks added per stage"))


def cmd_lut_space(args: argparse.Namespace) -> int:
    import dataclasses

    from mnv3.latency.lut import space_parts

    space = space_from_args(args)
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
          f"{float(space.size()):.2e} networks, {entries} lookup-table entries, {space.num_classes}-class classifier")
    print(f"  per block: kernels {list(space.kernels)}, expansion ratios {list(space.expansion_ratios)}, "
          f"SE {['on' if v else 'off' for v in space.se]}, activations {list(space.activations)}")
    stages = [{"input": st.input_size, "stride": st.stride, "widths": space.stage_widths(st),
               "depths": space.depths(st)} for st in space.stages()]
    print(f"  {'stage':<7}{'input':>6}{'stride':>8}  {'widths':<18}depths")
    for i, st in enumerate(stages, 1):
        print(f"  {i:<7}{st['input']:>6}{st['stride']:>8}  {st['widths']!s:<18}{st['depths']}")
    if args.save:
        space.save(args.save)
        print(f"written {args.save} (pass it as --space to mnv3 lut build / validate)")
    if args.json:
        emit_json({"space": space.key(), "networks": space.size(), "entries": entries, "classes": space.num_classes,
                          "stages": stages, "file": str(args.save) if args.save else None})
    return 0


def cmd_lut_build(args: argparse.Namespace) -> int:
    from mnv3.latency import LatencyError, check_threads, get_runtime
    from mnv3.latency.lut import build_table, calibration_formula
    from mnv3.latency.table import LatencyTable

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    space = space_from_args(args)
    table = LatencyTable(args.db)
    if args.chunk < 1 or args.calibrate < 2:
        raise LatencyError("--chunk must be at least 1 and --calibrate at least 2")
    summary = build_table(space, runtime, table, threads=threads, calibration_networks=args.calibrate,
                          chunk=args.chunk, passes=args.passes, progress=not args.no_progress)
    cal = summary["calibration"]
    print(f"table {table.url}: {summary['entries']} entries ({summary['measured']} measured now, "
          f"{summary['heavy']} heavy ones in twice the passes); "
          + f"calibration measured = {calibration_formula(cal)} "
          + f"({cal.get('model', 'a*sum+c*parts+b')} on {cal['n']} networks"
          + (f", leave-one-out MAPE {cal['loo_mape']:.1%})" if cal.get("loo_mape") is not None else ")"))
    if args.json:
        emit_json({**summary, "space": space.key(), "db": table.url})
    return 0


def cmd_lut_validate(args: argparse.Namespace) -> int:
    from mnv3.files import unused_path
    from mnv3.latency import LatencyError, check_threads, get_runtime
    from mnv3.latency.lut import MissingTable, passes_note, scatter_plot, validate
    from mnv3.latency.table import LatencyTable

    runtime = get_runtime(args.runtime)
    threads = check_threads(args.threads)
    space = space_from_args(args)
    table = LatencyTable(args.db)
    try:
        stats, points = validate(space, runtime, table, n=args.n, threads=threads, seed=args.seed,
                                 passes=args.passes, progress=not args.no_progress)
    except MissingTable as e:            # the build command it suggests, with this --space
        raise LatencyError(e.describe(args.space)) from None
    print(f"{stats['n']} random networks of {space.key()} on {runtime.name}: MAPE {stats['mape']:.1%}, "
          f"RMSE {stats['rmse_ms']:.3f} ms, within ±5% {stats['within_5']:.0%}, within ±10% "
          f"{round(stats['within_10'] * stats['n'])}/{stats['n']} ({stats['within_10']:.1%})"
          + passes_note(stats, "; "))
    plot = args.plot or unused_path(f"lut-validate-{runtime.name}.png")
    scatter_plot(points, plot, f"{space.key()} on {runtime.name}\n{stats['within_10']:.1%} within ±10%, "
                               f"MAPE {stats['mape']:.1%}")
    print(f"scatter plot written to {plot}")
    if args.json:
        emit_json(stats)
    return 0


