"""SSDLite parameters and MACs at 320x320 against the paper's Table 6, counted two ways:

- as `mnv3 info --task detect` builds the model: 80 classes, 6 anchors on every map, batch-norm
  parameters included;
- as the TensorFlow Object Detection API counts the paper's model: 91 class columns (90 COCO ids and
  the background), 3 anchors on the lowest map (C4; `reduce_boxes_in_lowest_layer`), batch norm
  folded (no parameters of its own). The 3 dropped anchors of C4 are taken off the built model's
  C4 prediction layers (their 1x1 conv's weights and biases, and its MACs on the 20x20 map).

    python bench/detect_counts.py
"""

from __future__ import annotations

import torch
from common import write_csv
from torch import nn

import mnv3
from mnv3.arch import reduced_tail
from mnv3.heads import ssdlite
from mnv3.nn.profile import module_cost
from mnv3.nn.ssdlite import build_detector, feature_grids

PAPER = {"mobilenet_v3_large": (4.97e6, 0.62e9), "mobilenet_v3_large_reduced_tail": (3.22e6, 0.51e9)}


def counts(spec, classes: int, size=(320, 320)) -> tuple[int, int, int, int]:
    head = ssdlite(spec, classes, size)
    params, macs, _ = module_cost(lambda: build_detector(spec, head), size)
    with torch.device("meta"):
        model = build_detector(spec, head)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    # C4's 1x1 prediction convs, per anchor: (classes + 1 + 4) outputs over the C4 channels, plus biases
    c4_channels = model.head.regression_head.module_list[0][1].in_channels
    per_anchor = (classes + 1 + 4) * (c4_channels + 1)
    h, w = feature_grids(head, size)[0]
    return params, macs, params - bn - 3 * per_anchor, macs - 3 * (classes + 1 + 4) * c4_channels * h * w


def main() -> None:
    rows = []
    print(f"{'backbone':<34}{'built params':>14}{'MACs':>8}{'TF-API params':>15}{'MACs':>8}{'paper':>16}")
    for name, spec in (("mobilenet_v3_large", mnv3.preset("mobilenet_v3_large")),
                       ("mobilenet_v3_large_reduced_tail", reduced_tail(mnv3.preset("mobilenet_v3_large")))):
        spec = spec.replace(resolution=320)
        built_p, built_m, _, _ = counts(spec, 80)
        _, _, tf_p, tf_m = counts(spec, 90)
        paper = PAPER[name]
        rows.append({"backbone": name, "built_params": built_p, "built_macs": built_m, "tf_api_params": tf_p,
                     "tf_api_macs": tf_m, "paper_params": int(paper[0]), "paper_macs": int(paper[1])})
        print(f"{name:<34}{built_p:>14,}{built_m / 1e9:>7.2f}B{tf_p:>15,}{tf_m / 1e9:>7.3f}B"
              f"{paper[0] / 1e6:>9.2f}M/{paper[1] / 1e9:.2f}B")
    write_csv("detect_counts.csv", rows)


if __name__ == "__main__":
    main()
