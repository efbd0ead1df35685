"""Import state dicts of the peers' MobileNetV3 implementations (torchvision, timm, timm's tf_ ports).

Both peers order their layers as the paper does and as our module does (stem, per block: expand,
depthwise, SE reduce/expand, project; last conv, pre-logits, classifier), so the i-th tensor of
theirs is the i-th of ours. Every pair is checked by role (weight, bias, running mean/var) and shape
before anything is copied; a 1x1 conv and a linear layer of the same size count as the same shape.
"""

from __future__ import annotations

import torch

from mnv3.arch import ArchSpec
from mnv3.nn import MobileNet

_ROLES = ("weight", "bias", "running_mean", "running_var")


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """"torchvision", "timm" or "mnv3", from the names of the tensors."""
    keys = list(state)
    if any(k.startswith("features.0.0.") for k in keys):
        return "torchvision"
    if any(k.startswith("conv_stem.") for k in keys):
        return "timm"
    if any(k.startswith("stem.conv.") for k in keys):
        return "mnv3"
    sample = ", ".join(keys[:4])
    raise ValueError(f"unrecognised state dict (first keys: {sample}); expected torchvision's "
                     "(features.*), timm's (conv_stem.*, blocks.*) or mnv3's (stem.*, blocks.*)")


_ROLE_RANK = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}
_TIMM_TOP = {"conv_stem": 0, "bn1": 1, "blocks": 2, "conv_head": 3, "norm_head": 4, "classifier": 5}
_TIMM_IR = ("conv_pw", "bn1", "conv_dw", "bn2", "se", "conv_pwl", "bn3")
_TIMM_DS = ("conv_dw", "bn1", "se", "conv_pw", "bn2")
_TIMM_CBA = ("conv", "bn1")


def module_order(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The state dict in module registration order (safetensors files store their keys sorted)."""
    if fmt == "mnv3":
        return state
    inverted = {k.split(".conv_pwl.")[0] for k in state if ".conv_pwl." in k}
    plain = {k.split(".conv.")[0] for k in state if ".conv." in k}

    def segment(p: str):
        return (0, int(p), "") if p.isdigit() else (1, 0, p)

    def key(name: str):
        *path, role = name.split(".")
        if fmt == "torchvision":
            ranks = [({"features": 0, "classifier": 1}.get(path[0], 2), 0, "")]
            ranks += [segment(p) for p in path[1:]]
        else:
            ranks = [(_TIMM_TOP.get(path[0], 9), 0, "")]
            if path[0] == "blocks" and len(path) >= 4:
                block = ".".join(path[:3])
                table = _TIMM_IR if block in inverted else _TIMM_CBA if block in plain else _TIMM_DS
                ranks += [segment(path[1]), segment(path[2]),
                          (table.index(path[3]) if path[3] in table else 9, 0, "")]
                ranks += [({"conv_reduce": 0, "conv_expand": 1}.get(p, 2), 0, p) for p in path[4:]]
            else:
                ranks += [segment(p) for p in path[1:]]
        return ranks, _ROLE_RANK.get(role, 9)

    return {k: state[k] for k in sorted(state, key=key)}


def _ordered(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def _compatible(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    if theirs.shape == ours.shape:
        return True
    squeeze = lambda t: tuple(d for i, d in enumerate(t.shape) if not (i >= 2 and d == 1))
    return squeeze(theirs) == squeeze(ours)


def map_state_dict(state: dict[str, torch.Tensor], model: MobileNet,
                   drop_classifier: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Their tensors renamed and reshaped to our keys, plus a list of the problems found (empty when
    every tensor fits). With `drop_classifier`, the last weight/bias pair is not required to fit."""
    theirs = _ordered(state)
    ours = _ordered(model.state_dict())
    if drop_classifier and model.num_classes:
        ours = [(k, v) for k, v in ours if not k.startswith("classifier.")]
        theirs = theirs[:-2]
    problems, mapped = [], {}
    if len(theirs) != len(ours):
        problems.append(f"the source has {len(theirs)} tensors, this network has {len(ours)}")
    for (tk, tv), (ok, ov) in zip(theirs, ours):
        t_role, o_role = tk.rsplit(".", 1)[-1], ok.rsplit(".", 1)[-1]
        if (t_role in _ROLES and t_role != o_role) or not _compatible(tv, ov):
            problems.append(f"{tk} {list(tv.shape)} does not fit {ok} {list(ov.shape)}")
            continue
        mapped[ok] = tv.detach().reshape(ov.shape).to(ov.dtype)
    return mapped, problems


def matches(state: dict[str, torch.Tensor], spec: ArchSpec, num_classes: int) -> bool:
    """Whether the state dict's shapes fit `spec` (used to recognise an unnamed network)."""
    from mnv3.nn import build

    with torch.device("meta"):
        model = build(spec, num_classes)
    return not map_state_dict(state, model)[1]


def num_classes_of(state: dict[str, torch.Tensor]) -> int:
    """Outputs of the classifier: the first dimension of the last weight in the state dict."""
    weights = [v for k, v in _ordered(state) if k.endswith("weight")]
    return int(weights[-1].shape[0]) if weights else 0


def find_backbone(tried, fit, arch, source: str, what: str):
    """The first spec of `tried` whose `fit(spec)` -> (model, mapped, problems) reports no problem,
    tried on the meta device (nothing allocated); with `arch` given, its problems are the error."""
    from mnv3.arch import SpecError
    from mnv3.weights.model_file import WeightsError

    for spec in tried:
        try:
            with torch.device("meta"):
                _, _, problems = fit(spec)
        except SpecError:
            continue
        if not problems:
            return spec
        if arch is not None:
            shown = "\n  ".join(problems[:20])
            raise WeightsError(f"{source}: the {what} weights do not fit {arch.name}:\n  {shown}")
    raise WeightsError(f"{source}: these {what} weights match no preset backbone; pass --arch")
