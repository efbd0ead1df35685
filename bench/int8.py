"""int8 against float on this CPU, as `mnv3 export` writes them (issue 15's benchmark).

Latency: MobileNetV3-Large, -Small and MobileNetV2 (224x224, batch 1, 1 thread), exported float and
int8 for ONNX Runtime (static QDQ) and LiteRT (AI Edge quantizer + hard-swish rewritten for XNNPACK),
each int8 twice: as `mnv3 export --int8` writes it (the stem float) and with `--int8-stem`; plus the AI Edge quantizer's int8 file without our rewrite (what a user of the quantizer alone
gets) and the int8 ONNX file with the network's own expansion widths (`mnv3 export` pads them to
multiples of 16), all timed interleaved in one run; printed as ratios to the float file of the same runtime,
with XNNPACK's partition count of each TFLite file.

Accuracy: the authors' MobileNetV3-Large-minimalistic uint8 TFLite (the one ImageNet-trained V3
here) run by LiteRT, against its import in float and our int8 re-quantizations of that import
(calibrated on 64 ants/bees photographs, not the evaluation images), top-1 on the 200-image
ImageNet sample; and its latency beside ours.

    python bench/int8.py [--rounds 15] [--calibration-images 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import SHARED, cpu_flags, paired_ratio, time_interleaved, write_csv

import mnv3
from mnv3.deploy import export
from mnv3.deploy.tflite_int8 import delegate_partitions, quantize_tflite
from mnv3.latency.runtimes import calibrate_batchnorm, cpu_model, export_tflite

AUTHORS = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
IMAGES = SHARED / "data" / "imagenet-sample"
CALIBRATION = SHARED / "data" / "hymenoptera" / "train"


def quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*a, **kw)


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    return lambda: sess.run(None, feed)


def lite_session(path: Path):
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
    return interp.invoke


def plain_int8_tflite(model, x: torch.Tensor, calib: torch.Tensor, path: Path) -> Path:
    """The AI Edge quantizer's int8 file as it comes (hard-swish left as the quantizer wrote it)."""
    from mnv3.deploy.export import fold_batchnorm

    export_tflite(fold_batchnorm(model), x, path)
    quantize_tflite(path, calib.numpy(), decompose=False, float_stem=False)
    return path


def unpadded_int8_onnx(model, calib: torch.Tensor, path: Path) -> Path:
    """The int8 ONNX file with the network's own expansion widths (`mnv3 export` pads them to
    multiples of 16 for ONNX Runtime's depthwise kernel): what the padding gains, in the same run."""
    from mnv3.deploy.export import _write_onnx, description, fold_batchnorm, quantize_onnx

    _write_onnx(fold_batchnorm(model), calib[:1], path, False, description(model))
    quantize_onnx(path, calib)
    return path


def exports(model, name: str, folder: Path, calib: torch.Tensor, tolerance: float) -> dict[str, Path]:
    files = {}
    for fmt in ("onnx", "tflite"):
        for kind in ("float", "int8", "int8 (int8 stem)"):
            int8 = kind != "float"
            path = folder / f"{name}-{kind.split()[0]}{'-stem' if 'stem' in kind else ''}.{fmt}"
            quiet(export, model, path, fmt, int8=int8, calibration=str(CALIBRATION) if int8 else None,
                  images=str(CALIBRATION), calibration_images=len(calib), tolerance=tolerance, force=True,
                  int8_stem="stem" in kind)
            files[f"{fmt} {kind}"] = path
    if any(b.expansion % 16 for b in model.spec.blocks[1:]):
        files["onnx int8 (widths kept)"] = quiet(unpadded_int8_onnx, model, calib, folder / f"{name}-int8-kept.onnx")
    if any(b.activation == "hswish" for b in model.spec.blocks):
        x = calib[:1]
        files["tflite int8 (quantizer alone)"] = quiet(plain_int8_tflite, model, x, calib, folder / f"{name}-plain.tflite")
    return files


def top1(model_or_file, images: Path) -> float:
    from mnv3.deploy.runner import ExportedModel
    from mnv3.train.evaluate import evaluate

    model = ExportedModel(model_or_file) if isinstance(model_or_file, Path) else model_or_file
    return evaluate(model, images, progress=False).top1


def authors_top1(path: Path, images: Path, classes) -> float:
    """The authors' uint8 file run by LiteRT on the same preprocessed pixels mnv3 uses."""
    from ai_edge_litert.interpreter import Interpreter

    from mnv3.data import ImageFolderSet, load_image, preprocess_pixels

    model = mnv3.load(path)
    pre = model.meta.preprocess
    interp = Interpreter(str(path), num_threads=1)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    hits = n = 0
    for image, label in ImageFolderSet(images, classes, pre).samples:
        interp.set_tensor(inp["index"], preprocess_pixels(load_image(image), pre)[None])
        interp.invoke()
        scores = interp.get_tensor(out["index"])[0].astype(np.float32)[1:]      # index 0: background
        hits += int(np.argmax(scores) == label)
        n += 1
    return hits / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--nets", nargs="*", default=["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2"])
    parser.add_argument("--tag", default="", help="suffix of the CSV's name, e.g. _epyc for another host's run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flags = cpu_flags()
    dot = [f for f in ("avx512_vnni", "avx_vnni", "asimddp") if f in flags.split()] or ["none"]
    print(f"CPU: {cpu_model()}; {flags}; int8 dot-product instructions: {', '.join(dot)}", flush=True)
    from mnv3.deploy.export import verification_batch

    rows, fns, labels = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="mnv3-int8-bench-") as tmp:
        folder = Path(tmp)
        for name in args.nets:
            model = calibrate_batchnorm(mnv3.build(mnv3.preset(name, 1.0, 224), 1000), (8, 3, 224, 224))
            calib = verification_batch(model, str(CALIBRATION), args.calibration_images, "--calibration")
            print(f"exporting {name} (random weights, batch norm from random images: latency only)", flush=True)
            files = exports(model, name, folder, calib, tolerance=10.0)
            for kind, path in files.items():
                key = f"{name} | {kind}"
                fns[key] = ort_session(path) if path.suffix == ".onnx" else lite_session(path)
                labels[key] = (name, kind, path)
        # the authors' network: their uint8 file, our float import, our int8 files of it
        imported = mnv3.load(AUTHORS)
        calib = verification_batch(imported, str(CALIBRATION), args.calibration_images, "--calibration")
        print("exporting the imported Large-minimalistic (float, int8 for ONNX Runtime and LiteRT)", flush=True)
        mine = exports(imported, "large_minimal", folder, calib, tolerance=0.5)
        for kind, path in mine.items():
            fns[f"large_minimal | {kind}"] = ort_session(path) if path.suffix == ".onnx" else lite_session(path)
            labels[f"large_minimal | {kind}"] = ("large_minimal", kind, path)
        fns["large_minimal | authors' uint8 tflite"] = lite_session(AUTHORS)
        labels["large_minimal | authors' uint8 tflite"] = ("large_minimal", "authors' uint8 tflite", AUTHORS)
        print(f"timing {len(fns)} files interleaved, {args.rounds} rounds", flush=True)
        timings = time_interleaved(fns, rounds=args.rounds, iters=args.iters, warmup=5)
        print("top-1 on the ImageNet sample", flush=True)
        accuracy = {"float (PyTorch)": top1(imported.eval(), IMAGES)}
        for kind, path in mine.items():
            accuracy[kind] = top1(path, IMAGES)
        accuracy["authors' uint8 tflite"] = authors_top1(AUTHORS, IMAGES, imported.meta.classes)
        for key, (name, kind, path) in labels.items():
            runtime = "onnx" if kind.startswith("onnx") else "tflite"
            reference = f"{name} | {runtime} float"
            rows.append({"network": name, "file": kind, "median_ms": round(timings[key]["median_ms"], 3),
                         "vs_float": round(paired_ratio(timings, key, reference), 3),
                         "xnnpack_partitions": delegate_partitions(path) if path.suffix == ".tflite" else "",
                         "top1": round(accuracy[kind], 4) if name == "large_minimal" and kind in accuracy else ""})
    rows.append({"network": "large_minimal", "file": "float (PyTorch)", "top1": round(accuracy["float (PyTorch)"], 4)})
    print(f"\n{'network':<20}{'file':<32}{'ms':>8}{'x float':>9}{'partitions':>11}{'top-1':>8}")
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if "median_ms" in r else ""
        ratio = f"{r['vs_float']:.2f}" if "vs_float" in r else ""
        print(f"{r['network']:<20}{r['file']:<32}{ms:>8}{ratio:>9}{r.get('xnnpack_partitions', '')!s:>11}"
              f"{r.get('top1', '')!s:>8}")
    for name in args.nets:
        for runtime in ("onnx", "tflite"):
            ratio = paired_ratio(timings, f"{name} | {runtime} int8", f"{name} | {runtime} float")
            print(f"{name} {runtime}: int8 / float = {ratio:.2f} ({'faster' if ratio < 1 else 'NOT faster'}; "
                  f"goal < 1{', <= 0.6 with dot-product instructions' if dot != ['none'] else ''})")
        if f"{name} | onnx int8 (widths kept)" in timings:
            kept = paired_ratio(timings, f"{name} | onnx int8 (widths kept)", f"{name} | onnx float")
            print(f"{name} onnx: int8 with the network's own widths / float = {kept:.2f} (padded: "
                  f"{paired_ratio(timings, f'{name} | onnx int8', f'{name} | onnx float'):.2f})")
    name = f"int8_{'vnni' if dot != ['none'] else 'novnni'}{args.tag}.csv"
    write_csv(name, rows)
    print(f"written to bench/results/{name}", file=sys.stderr)


if __name__ == "__main__":
    main()
