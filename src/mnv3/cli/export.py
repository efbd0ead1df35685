"""`mnv3 export`: a model file to ONNX, TFLite, PT2 or TorchScript, verified against eager."""

from __future__ import annotations

import argparse

from mnv3.cli.common import add_json, add_output, add_threads, emit_json


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model file to ONNX, TFLite, PT2 or TorchScript, verified",
                       description="Export a model file (classifier, segmentation or detection; a detector "
                                   "without its post-processing) with batch norm folded, its spec, head, "
                                   "classes and preprocessing in the file's metadata, then verify it: the "
                                   "file is run by its own runtime on real images and compared with the "
                                   "eager model; a difference above the tolerance is an error and the file "
                                   "is removed. An existing file is kept unless --force.")
    p.add_argument("model", metavar="MODEL", help="model file (or any weights source `mnv3 convert` takes)")
    p.add_argument("--format", choices=("onnx", "tflite", "pt2", "torchscript"), default=None,
                   help="default: from the suffix of -o (.onnx, .tflite, .pt2, .pt)")
    add_output(p, "-o", "--output", required=True, metavar="FILE", help="file to write")
    p.add_argument("--arch", help="only for weights that do not carry their network")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch of the exported graph (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true",
                       help="any batch (ONNX, PT2, TorchScript; verified at batches 1 and 3)")
    p.add_argument("--images", metavar="DIR",
                   help="real images to verify on (default: the --calibration images with --int8, else "
                        "scikit-learn's handwritten digits, offline)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest accepted |exported - eager|, relative to the largest eager output (default "
                        "1e-3; 0.25 with --int8)")
    p.add_argument("--int8", action="store_true",
                   help="static post-training int8: ONNX (QDQ, uint8 activations, per-channel int8 weights) or "
                        "TFLite (AI Edge quantizer, hard-swish rewritten for XNNPACK); the stem (first convolution "
                        "and its activation) stays float, and block 0 with it when it has no expansion (faster on "
                        "CPUs), see --int8-stem")
    p.add_argument("--int8-stem", action="store_true",
                   help="--int8: quantize the stem and block 0 too (an integer-only graph with int8 input, for accelerators "
                        "without float; slower on CPUs: int8 kernels handle 3 input channels poorly)")
    p.add_argument("--calibration", metavar="DIR",
                   help="--int8: images to calibrate the activation ranges on (default: scikit-learn's digits)")
    p.add_argument("--calibration-images", type=int, default=64, metavar="N",
                   help="--int8: how many calibration images (default 64)")
    p.add_argument("--report", action="store_true",
                   help="print the op histogram of the result: integer ops, float ops, quantize/dequantize "
                        "nodes (ONNX: the graph as ONNX Runtime runs it; TFLite: and XNNPACK's partitions)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    add_threads(p)
    add_json(p, "path, format, batch, input_shape, output_shape, images, max_abs_diff, max_abs_output, tolerance; "
                "ops with --report")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mnv3.deploy import ExportError, export
    from mnv3.train.threads import apply_threads
    from mnv3.weights import load

    if Path(args.output).exists() and not args.force:      # before any work
        raise ExportError(f"{args.output} exists; pass --force to overwrite it")
    apply_threads(args.threads)
    model = load(args.model, arch=args.arch)
    if args.int8_stem and not args.int8:
        raise ExportError("--int8-stem: only with --int8 (it quantizes the stem of an int8 export)")
    if args.calibration_images < 1:
        raise ExportError(f"--calibration-images: expected at least 1, got {args.calibration_images}")
    report = export(model, args.output, args.format, batch=args.batch, dynamic=args.dynamic_batch,
                    images=args.images, tolerance=args.tolerance, force=args.force, int8=args.int8, int8_stem=args.int8_stem,
                    calibration=args.calibration, calibration_images=args.calibration_images)
    print(f"{args.model} -> {report.path} ({report.format}, batch {report.batch}, input {report.input_shape}, "
          f"output {report.output_shape})")
    print(f"  verified on {report.images} real image(s) at batch {', '.join(map(str, report.verified_batches))}: "
          f"max |{report.format} - eager| = {report.max_abs_diff:.3g} (largest output {report.max_abs_output:.3g}, "
          f"tolerance {report.tolerance:g} relative)")
    doc = report.as_dict()
    if args.report:
        if report.format not in ("onnx", "tflite"):
            raise ExportError(f"--report: the op histogram reads ONNX and TFLite graphs; {report.format} is neither")
        from mnv3.deploy.export import op_report
        from mnv3.deploy.tflite_int8 import op_report_tflite

        ops = op_report(report.path) if report.format == "onnx" else op_report_tflite(report.path)
        doc["ops"] = ops
        if report.format == "onnx":
            print("  ONNX Runtime's graph after its optimisations (QDQ fusion):")
        else:
            print(f"  the TFLite graph; XNNPACK's delegate takes it in {ops['delegate_partitions']} partition(s) "
                  "(1: every op delegated)")
        def listed(table: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(table.items(), key=lambda kv: -kv[1])) or "none"

        for kind in ("integer", "float"):
            print(f"  {kind} ops ({sum(ops[kind].values())}): {listed(ops[kind])}")
        if report.format == "onnx" and ops["float"]:
            for key, what in (("float_before_int8",
                               "before the first quantize (the input, the float stem and block 0 if it has no expansion)"),
                              ("float_inside_int8", "inside the int8 graph, each between a dequantize and a quantize"),
                              ("float_after_int8", "after the last dequantize (the output side)")):
                if ops[key]:
                    print(f"    {what}: {listed(ops[key])}")
        print(f"  quantize {ops['quantize']}, dequantize {ops['dequantize']} (each float op inside an int8 "
              "graph is fed by a dequantize and followed by a quantize)")
    if args.json:
        emit_json(doc)
    return 0
