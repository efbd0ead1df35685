"""Import torchvision's `lraspp_mobilenet_v3_large` state dict into the `lraspp-torchvision` head.

torchvision's model is its dilated MobileNetV3 feature stack under `backbone.<i>` (the last 1x1 conv
included) and the head under `classifier.{cbr, scale, low_classifier, high_classifier}`. The
backbone maps by order as the classifier importer does (`map_state_dict`); the head's names are
ours too. The network is recognised by trying the presets at the common widths.
"""

from __future__ import annotations

import torch

from mnv3.arch import ArchSpec
from mnv3.heads import lraspp, segment_backbone
from mnv3.nn.lraspp import Segmenter, build_segmenter
from mnv3.presets import candidates
from mnv3.weights.model_file import ModelMeta, Preprocess, WeightsError, set_meta
from mnv3.weights.state_dicts import find_backbone, map_state_dict, module_order

# torchvision's COCO_WITH_VOC_LABELS_V1 categories (Pascal VOC's 20 classes and the background).
VOC_CLASSES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
TORCHVISION_RESIZE = 520       # torchvision's segmentation weights are evaluated at this size


def is_torchvision_lraspp(state: dict[str, torch.Tensor]) -> bool:
    return "classifier.cbr.0.weight" in state and any(k.startswith("backbone.0.") for k in state)


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    backbone = {"features." + k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    return module_order(backbone, "torchvision"), head


def _fit(state: dict[str, torch.Tensor], spec: ArchSpec, num_classes: int,
         resolution: tuple[int, int]) -> tuple[Segmenter, dict[str, torch.Tensor], list[str]]:
    head = lraspp("lraspp-torchvision", num_classes, resolution)
    model = build_segmenter(segment_backbone(spec, "lraspp-torchvision", resolution), head)
    backbone, head_state = _split(state)
    mapped, problems = map_state_dict(backbone, model.backbone)
    mapped = {f"backbone.{k}": v for k, v in mapped.items()}
    ours = model.state_dict()
    for k, v in head_state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in ours or ours[k].shape != v.shape:
            problems.append(f"{k} {list(v.shape)} does not fit {list(ours[k].shape) if k in ours else 'nothing'}")
        else:
            mapped[k] = v
    return model, mapped, problems


def import_torchvision_lraspp(state: dict[str, torch.Tensor], arch: ArchSpec | None, source: str,
                              resolution: tuple[int, int] = (TORCHVISION_RESIZE, TORCHVISION_RESIZE)) -> Segmenter:
    """The `lraspp-torchvision` Segmenter holding torchvision's LR-ASPP weights, in eval mode."""
    if "classifier.low_classifier.weight" not in state:
        raise WeightsError(f"{source}: a torchvision LR-ASPP state dict without classifier.low_classifier; "
                           "the file is incomplete")
    num_classes = int(state["classifier.low_classifier.weight"].shape[0])
    found = find_backbone([arch] if arch is not None else candidates(),
                          lambda spec: _fit(state, spec, num_classes, resolution), arch, source, "torchvision LR-ASPP")
    model, mapped, _ = _fit(state, found, num_classes, resolution)
    model.load_state_dict(mapped, strict=False)
    names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else None
    pre = Preprocess(resolution=resolution[0], resize=resolution[0])
    set_meta(model, ModelMeta(classes=names, class_names=names, preprocess=pre, source=f"torchvision:{source}"))
    return model.eval()
