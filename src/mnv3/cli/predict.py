"""`mnv3 predict` and `mnv3 eval`: use a trained model on images."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mnv3.cli.common import add_json, add_output, add_threads, emit_json


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 on an image folder; mIoU for a segmentation model, COCO mAP "
                                    "for a detector",
                       description="Evaluate on FOLDER/<class id>/<images>; class folders are named by "
                                   "the model's class ids (ImageNet wnids for ImageNet weights); a subset "
                                   "of the classes is fine; or on the val (or test) split of a data set mnv3 "
                                   "train takes (digits, cifar10, a folder with train/ and val/). Unreadable "
                                   "images are skipped and counted. "
                                   "A segmentation model is scored on the val/ split of a mask data set "
                                   "(mIoU and per-class IoU from one confusion matrix, pixel accuracy); a "
                                   "detector on the val split of a COCO-JSON or YOLO data set (COCO "
                                   "mAP@[.5:.95], mAP@.5 and per-class AP with pycocotools).")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="model file, an exported .onnx/.tflite file (scored as deployed), or any SOURCE convert takes")
    p.add_argument("--data", required=True, metavar="FOLDER|DATA",
                   help="a folder of class folders, or a training data set (digits, cifar10, train/ + val/)")
    p.add_argument("--arch", help="only for weights that do not carry their network")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ignore-index", type=int, default=None,
                   help="segmentation: the mask value that is not a class (default: the one the model was "
                        "trained with, else 255)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default 0)")
    add_postprocess(p, score=0.001)
    p.add_argument("--skip-bad-boxes", action="store_true",
                   help="detection: drop (and count) bad boxes and missing images instead of stopping")
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p, "top1, top5 (fractions), images, skipped; for a segmentation model miou, pixel_acc, per_class, "
                "images; for a detector map, map50, per_class, images")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-5 classes of images; masks for a segmentation model, boxes for "
                                       "a detector",
                       description="Print the top classes of each image with names and probabilities "
                                   "(a segmentation model: write a colour mask and an overlay PNG per "
                                   "image into --out; a detector: a PNG with labelled boxes per image and "
                                   "detections.json, COCO results format, into --out). "
                                   "A folder stands for the images in it (and its subfolders). A missing "
                                   "or unreadable image is reported on one line and the others are still "
                                   "predicted; the exit code is then 2.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="model file, an exported .onnx/.tflite file, or any SOURCE convert takes")
    p.add_argument("--arch", help="only for weights that do not carry their network")
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    add_output(p, "--out", kind="dir", metavar="DIR",
               help="segmentation and detection: folder for the PNGs (and detections.json) (default: "
                    "predictions, or predictions-2, ... when it exists)")
    add_postprocess(p, score=0.3)
    add_threads(p)
    add_json(p, "results [{image, top: [{class, label, prob}]}], failed; for a segmentation model "
                "results [{image, mask, overlay, classes}]; for a detector results [{image, png, detections: "
                "[{label, score, box}]}], coco_results")
    p.set_defaults(func=cmd_predict)


def load_model(source: str, arch: str | None, threads: int | None):
    """A model file or weights source as a model; an exported file (.onnx, or a .tflite that
    `mnv3 export` wrote) as an `ExportedModel` that runs the file itself."""
    from mnv3.deploy.runner import ExportedModel, is_exported
    from mnv3.weights import load

    if is_exported(source):
        return ExportedModel(source, threads=threads or 1)
    return load(source, arch=arch)


def add_postprocess(p: argparse.ArgumentParser, score: float) -> None:
    """A detector's post-processing (torchvision's SSD defaults but the score threshold)."""
    p.add_argument("--score-thresh", type=float, default=score,
                   help=f"detection: drop detections scoring below this (default {score})")
    p.add_argument("--nms-thresh", type=float, default=0.55,
                   help="detection: IoU above which batched_nms drops the weaker box of a class (default 0.55)")
    p.add_argument("--top-k", type=int, default=300,
                   help="detection: best candidates per class before NMS (default 300)")
    p.add_argument("--max-detections", type=int, default=300,
                   help="detection: detections kept per image after NMS (default 300)")


def postprocess_options(args: argparse.Namespace) -> dict:
    from mnv3.data import DataError

    if not 0 <= args.score_thresh < 1 or not 0 < args.nms_thresh <= 1 or args.top_k < 1 or args.max_detections < 1:
        raise DataError("--score-thresh must be in [0, 1), --nms-thresh in (0, 1], --top-k and --max-detections >= 1")
    return {"score_thresh": args.score_thresh, "nms_thresh": args.nms_thresh, "topk": args.top_k,
            "max_detections": args.max_detections}


def expand_images(items: list[str]) -> list[str]:
    """Image arguments with every folder replaced by the images in it, sorted."""
    from mnv3.data.images import IMAGE_SUFFIXES

    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                from mnv3.data import DataError

                raise DataError(f"{path}: a folder with no images (looked for {', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(item)
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from mnv3.cli.common import EXIT_USAGE
    from mnv3.data import DataError
    from mnv3.train.evaluate import predict
    from mnv3.train.threads import apply_threads

    if args.top < 1:
        raise DataError(f"--top: expected at least 1, got {args.top}")
    images = expand_images(args.images)
    threads = apply_threads(args.threads)
    model = load_model(args.weights, args.arch, threads)
    if getattr(model, "head_spec", None) is not None and model.head_spec.task == "detect":
        return _predict_boxes(args, model, images)
    if hasattr(model, "head_spec"):
        return _predict_masks(args, model, images)
    failed, results = 0, []
    for image in images:
        try:
            top = predict(model, image, k=args.top)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        results.append({"image": image, "top": [{"class": c, "label": label, "prob": p} for c, label, p in top]})
        print(image)
        for rank, (_, label, prob) in enumerate(top, start=1):
            print(f"  {rank}. {prob:6.1%}  {label}")
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    if args.json:
        emit_json({"results": results, "failed": failed})
    return EXIT_USAGE if failed else 0


def _predict_masks(args: argparse.Namespace, model, images: list[str]) -> int:
    from collections import Counter

    from mnv3.cli.common import EXIT_USAGE
    from mnv3.data import DataError
    from mnv3.files import unused_path
    from mnv3.train.evaluate import predict_mask, write_mask_pngs
    from mnv3.weights import model_meta

    out = Path(args.out) if args.out else unused_path("predictions")
    out.mkdir(parents=True, exist_ok=True)
    meta = model_meta(model)
    failed, results = 0, []
    for image in images:
        try:
            mask, img = predict_mask(model, image)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        stem = Path(image).stem
        if any(r["stem"] == stem for r in results):
            stem = f"{stem}-{len(results)}"
        mask_path, overlay_path = write_mask_pngs(mask, img, out, stem, model.num_classes)
        counts = Counter(mask.flatten().tolist())
        top = [(meta.label(c), n / mask.size) for c, n in counts.most_common(3)]
        results.append({"image": image, "stem": stem, "mask": str(mask_path), "overlay": str(overlay_path),
                        "classes": {meta.label(c): n / mask.size for c, n in counts.most_common()}})
        print(f"{image}: {', '.join(f'{label} {share:.0%}' for label, share in top)}")
    print(f"masks and overlays written to {out}/", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    if args.json:
        emit_json({"results": [{k: v for k, v in r.items() if k != "stem"} for r in results], "failed": failed,
                   "out": str(out)})
    return EXIT_USAGE if failed else 0


def _predict_boxes(args: argparse.Namespace, model, images: list[str]) -> int:
    import json

    from mnv3.cli.common import EXIT_USAGE
    from mnv3.data import DataError
    from mnv3.files import atomic_write_text, unused_path
    from mnv3.train.evaluate import draw_boxes, predict_boxes
    from mnv3.weights import model_meta

    out = Path(args.out) if args.out else unused_path("predictions")
    out.mkdir(parents=True, exist_ok=True)
    meta, post = model_meta(model), postprocess_options(args)
    names = [meta.label(i) for i in range(model.num_classes)]
    ids = [int(c) if str(c).isdigit() else i for i, c in enumerate(meta.classes or range(model.num_classes))]
    failed, results, coco = 0, [], []
    for number, image in enumerate(images):
        try:
            found, img = predict_boxes(model, image, post)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        stem = Path(image).stem
        image_id = int(stem) if stem.isdigit() else number
        if any(Path(r["png"]).stem == f"{stem}_boxes" for r in results):
            stem = f"{stem}-{number}"
        png = draw_boxes(img, found, names, out / f"{stem}_boxes.png")
        dets = [{"label": names[lab], "score": round(sc, 4), "box": [round(v, 1) for v in box]}
                for box, sc, lab in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())]
        coco += [{"image_id": image_id, "category_id": ids[lab], "score": round(sc, 5),
                  "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)]}
                 for b, sc, lab in zip(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist())]
        results.append({"image": image, "png": str(png), "detections": dets})
        shown = ", ".join(f"{d['label']} {d['score']:.2f}" for d in dets[:5])
        print(f"{image}: {len(dets)} detection(s){': ' + shown if dets else ''}{' ...' if len(dets) > 5 else ''}")
    coco_path = atomic_write_text(out / "detections.json", json.dumps(coco) + "\n")
    print(f"boxes drawn into {out}/, COCO results in {coco_path} (image_id: the file name's number, else its "
          f"position)", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(images)} image(s) could not be read", file=sys.stderr)
    if args.json:
        emit_json({"results": results, "failed": failed, "out": str(out), "coco_results": str(coco_path)})
    return EXIT_USAGE if failed else 0


def _per_class(args: argparse.Namespace, result, headline: str) -> int:
    """Print a dense model's score line and its per-class scores (- for a class never seen)."""
    print(headline)
    for name, value in result.per_class.items():
        print(f"  {name:<20} {'-' if math.isnan(value) else f'{value:.2%}'}")
    if args.json:
        emit_json(result.as_dict())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mnv3.train.evaluate import evaluate, evaluate_detection, evaluate_segmentation
    from mnv3.train.threads import apply_threads

    threads = apply_threads(args.threads, workers=args.workers)
    model = load_model(args.weights, args.arch, threads)
    if getattr(model, "head_spec", None) is not None and model.head_spec.task == "detect":
        result = evaluate_detection(model, args.data, batch_size=args.batch_size, workers=args.workers,
                                    progress=not args.no_progress, post=postprocess_options(args),
                                    skip_bad=args.skip_bad_boxes)
        return _per_class(args, result, f"{model.spec.name} + ssdlite on {args.data} (val, {result.images} images): "
                                        f"mAP@[.5:.95] {result.map:.2%}, mAP@.5 {result.map50:.2%}")
    if hasattr(model, "head_spec"):
        result = evaluate_segmentation(model, args.data, args.ignore_index, batch_size=args.batch_size,
                                       workers=args.workers, progress=not args.no_progress)
        return _per_class(args, result, f"{model.spec.name} + {model.head_spec.kind} on {args.data} (val, "
                                        f"{result.images} images): mIoU {result.miou:.2%}, pixel accuracy "
                                        f"{result.pixel_acc:.2%}")
    result = evaluate(model, args.data, batch_size=args.batch_size, workers=args.workers,
                      progress=not args.no_progress)
    print(f"{model.spec.name} on {args.data}: top-1 {result.top1:.2%}, top-5 {result.top5:.2%} "
          f"({result.images} images)")
    if result.skipped:
        print(f"skipped {result.skipped} unreadable image(s):", file=sys.stderr)
        for line in result.skipped_files[:10]:
            print(f"  {line}", file=sys.stderr)
    if args.json:
        emit_json(result.as_dict())
    return 0
