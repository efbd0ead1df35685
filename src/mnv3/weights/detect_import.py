"""Import torchvision's `ssdlite320_mobilenet_v3_large` state dict into an SSDLite `Detector`.

torchvision splits its MobileNetV3 at C4: `backbone.features.0` runs from the stem to block 13's
expansion layer (`features.0.13`), `backbone.features.1` from that block's depthwise conv to the
last 1x1 conv; the extra layers are `backbone.extra.<i>` and the heads `head.{classification,
regression}_head.module_list.<i>`. The backbone is put back into torchvision's classifier layout
(`features.<i>`) and mapped by order as the classifier importer does; extra layers and heads carry
our names already. The backbone (full or reduced tail, any width) is recognised by trying the
presets.
"""

from __future__ import annotations

import re

import torch

from mnv3.arch import ArchSpec, SpecError, reduced_tail
from mnv3.heads import ssdlite
from mnv3.nn.ssdlite import Detector, build_detector
from mnv3.presets import candidates
from mnv3.weights.model_file import ModelMeta, Preprocess, WeightsError, set_meta
from mnv3.weights.state_dicts import find_backbone, map_state_dict, module_order

TORCHVISION_SIZE = (320, 320)


def is_torchvision_ssdlite(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("head.classification_head.module_list.") for k in state) and \
        any(k.startswith("backbone.features.1.") for k in state)


def _classifier_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's SSD backbone names back in its classifier's `features.<i>` layout."""
    first = {k for k in state if k.startswith("backbone.features.0.")}
    c4 = max(int(k.split(".")[3]) for k in first)          # the expansion layer of the C4 block
    out = {}
    for k, v in state.items():
        if k.startswith("backbone.features.0."):
            i, rest = k.removeprefix("backbone.features.0.").split(".", 1)
            out[f"features.{i}.{rest}" if int(i) < c4 else f"features.{c4}.block.0.{rest}"] = v
        elif k.startswith("backbone.features.1."):
            m = re.match(r"backbone\.features\.1\.(\d+)\.(.*)", k)
            j, rest = int(m.group(1)), m.group(2)
            out[f"features.{c4}.block.{rest}" if j == 0 else f"features.{c4 + j}.{rest}"] = v
    return module_order(out, "torchvision")


def _fit(state: dict[str, torch.Tensor], spec: ArchSpec, num_classes: int):
    model = build_detector(spec, ssdlite(spec, num_classes, TORCHVISION_SIZE))
    mapped, problems = map_state_dict(_classifier_layout(state), model.backbone)
    mapped = {f"backbone.{k}": v for k, v in mapped.items()}
    ours = model.state_dict()
    for k, v in state.items():
        if k.startswith("backbone.features.") or k.endswith("num_batches_tracked"):
            continue
        name = k.replace("backbone.extra.", "extra.", 1)
        if name not in ours or ours[name].shape != v.shape:
            problems.append(f"{k} {list(v.shape)} does not fit {list(ours[name].shape) if name in ours else 'nothing'}")
        else:
            mapped[name] = v
    return model, mapped, problems


def import_torchvision_ssdlite(state: dict[str, torch.Tensor], arch: ArchSpec | None, source: str) -> Detector:
    """The Detector holding torchvision's SSDLite weights, in eval mode. torchvision counts the
    background among its classes (91 for COCO: index 0 background, then COCO category ids 1-90 with
    gaps); ours has those 90 ids as classes."""
    key = "head.classification_head.module_list.0.1.weight"
    if key not in state:
        raise WeightsError(f"{source}: a torchvision SSDLite state dict without {key}; the file is incomplete")
    per_location = state["head.regression_head.module_list.0.1.weight"].shape[0] // 4
    num_classes = int(state[key].shape[0]) // per_location - 1
    tried = [arch] if arch is not None else [s for base in candidates() for s in (base, _reduced(base)) if s]
    found = find_backbone(tried, lambda spec: _fit(state, spec, num_classes), arch, source,
                          "torchvision SSDLite (full or reduced tail)")
    model, mapped, _ = _fit(state, found, num_classes)
    model.load_state_dict(mapped, strict=False)
    ids = tuple(str(i) for i in range(1, num_classes + 1))
    pre = Preprocess(resolution=TORCHVISION_SIZE[0], resize=TORCHVISION_SIZE[0], mean=(0.5,) * 3, std=(0.5,) * 3)
    set_meta(model, ModelMeta(classes=ids, class_names=ids, preprocess=pre, source=f"torchvision:{source}"))
    return model.eval()


def _reduced(spec: ArchSpec) -> ArchSpec | None:
    try:
        return reduced_tail(spec)
    except SpecError:
        return None
