"""Top-1/top-5 of the TensorFlow authors' MobileNetV3-Large-minimalistic uint8 TFLite file on the
ImageNet sample: run by the LiteRT interpreter itself, and imported into mnv3 (float, batch norm
already folded, TF same padding), on the very same preprocessed uint8 pixels.
Goal: mnv3's top-1 within 2 points of LiteRT's.

    python bench/imported_vs_tflite.py [--tflite PATH] [--data FOLDER]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import SHARED, write_csv
from tqdm import tqdm

import mnv3
from mnv3.data import ImageFolderSet, load_image, preprocess_pixels, to_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflite", default=str(SHARED / "weights/v3-large-minimalistic_224_1.0_uint8.tflite"))
    parser.add_argument("--data", default=str(SHARED / "data/imagenet-sample"))
    args = parser.parse_args()
    from ai_edge_litert.interpreter import Interpreter

    model = mnv3.load(args.tflite)
    pre = model.meta.preprocess
    interpreter = Interpreter(args.tflite, num_threads=1)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero = inp["quantization"]
    background = int(out["shape"][-1]) == model.num_classes + 1
    print(f"imported {model.spec.name} (padding {model.spec.padding}); LiteRT input {inp['dtype'].__name__} "
          f"scale {scale:.6f} zero {zero}; preprocess: resize {pre.resize}, crop {pre.resolution}, {pre.interpolation}")

    dataset = ImageFolderSet(args.data, model.meta.classes, pre)
    hits = {"litert": [0, 0], "mnv3": [0, 0]}
    agree = n = 0
    torch.set_num_threads(1)
    for path, label in tqdm(dataset.samples, desc="images", file=sys.stderr):
        pixels = preprocess_pixels(load_image(path), pre)
        if inp["dtype"] == np.uint8:
            interpreter.set_tensor(inp["index"], pixels[None])
        else:
            interpreter.set_tensor(inp["index"], to_input(pixels, pre).permute(0, 2, 3, 1).numpy())
        interpreter.invoke()
        lite = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        lite = lite[1:] if background else lite
        with torch.inference_mode():
            ours = model(to_input(pixels, pre))[0].numpy()
        for name, scores in (("litert", lite), ("mnv3", ours)):
            top5 = np.argsort(-scores, kind="stable")[:5]
            hits[name][0] += int(top5[0] == label)
            hits[name][1] += int(label in top5)
        agree += int(np.argmax(lite) == np.argmax(ours))
        n += 1
    rows = []
    for name, (h1, h5) in hits.items():
        print(f"{name:<7} top-1 {h1 / n:6.1%}  top-5 {h5 / n:6.1%}  ({n} images)")
        rows.append({"runtime": name, "top1": round(h1 / n, 4), "top5": round(h5 / n, 4), "images": n})
    gap = (hits["mnv3"][0] - hits["litert"][0]) / n * 100
    print(f"top-1 difference mnv3 - litert: {gap:+.1f} points (goal: within 2); "
          f"same top-1 class on {agree / n:.1%} of images")
    print(f"written {write_csv('imported_vs_tflite.csv', rows)}")


if __name__ == "__main__":
    main()
