"""NetAdapt's proposals on any `ArchSpec`, and the weights they keep.

A network's prunable layers (MobileNetV3 paper, section 4.2):
  - `expand{i}`: the 1x1 expansion layer of block i (its depthwise convolution, squeeze-and-excite
    and the projection's input follow it);
  - `width{n}`: one bottleneck width, shared by every layer a residual connection ties to it (the
    stem's output and the outputs of blocks that are added to their input must stay equal), so it
    shrinks everywhere at once; a block without an expansion layer (its expansion equals its input)
    runs its depthwise convolution on that width and follows it;
  - `last_conv` and `pre_logits`: the head's 1x1 layers.
Channel counts stay multiples of 8. A proposal never changes the network's structure: a count that
would add or remove a residual connection or an expansion layer (input == expansion) is skipped.

Weights are kept, not re-initialised: the filters with the largest L2 norm (NetAdapt), with the
matching input channels of every layer that reads them and the batch-norm statistics sliced to
match. Where a width is produced by several layers (a residual group), a channel's norm is summed
over all its producers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mnv3.arch import ArchSpec, SpecError, make_divisible
from mnv3.nn import MobileNet, build


class PruneError(ValueError):
    """A proposal cannot be made as asked."""


@dataclass(frozen=True)
class Layer:
    """One prunable layer of a network: its name and current number of channels."""

    name: str
    channels: int


def width_groups(spec: ArchSpec) -> list[list[int]]:
    """The bottleneck widths: groups of nodes (0 = the stem's output, i = block i's output) that a
    residual connection ties together, in order of their first node."""
    parent = list(range(len(spec.blocks) + 1))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, (cin, block) in enumerate(zip(spec.block_inputs(), spec.blocks), start=1):
        if block.stride == 1 and cin == block.out:
            parent[find(i)] = find(i - 1)
    groups: dict[int, list[int]] = {}
    for node in range(len(spec.blocks) + 1):
        groups.setdefault(find(node), []).append(node)
    return list(groups.values())


def _node_width(spec: ArchSpec, node: int) -> int:
    return spec.stem.out if node == 0 else spec.blocks[node - 1].out


def structure(spec: ArchSpec) -> tuple:
    """What a proposal may not change: per block, whether it has an expansion layer and a residual
    connection and whether it has SE; whether the head has a pre-logits layer."""
    return tuple((exp_layer(cin, b), b.stride == 1 and cin == b.out, b.se is not None)
                 for cin, b in zip(spec.block_inputs(), spec.blocks)) + (spec.head.pre_logits is not None,)


def exp_layer(cin: int, block) -> bool:
    return block.expansion != cin


def layers(spec: ArchSpec) -> list[Layer]:
    """Every prunable layer of `spec`, in network order."""
    out = []
    for n, group in enumerate(width_groups(spec)):
        out.append(Layer(f"width{n}", _node_width(spec, group[0])))
    for i, (cin, block) in enumerate(zip(spec.block_inputs(), spec.blocks), start=1):
        if exp_layer(cin, block):
            out.append(Layer(f"expand{i}", block.expansion))
    out.append(Layer("last_conv", spec.head.last_conv))
    if spec.head.pre_logits is not None:
        out.append(Layer("pre_logits", spec.head.pre_logits))
    return out


def _scaled_se(se: int | None, old: int, new: int) -> int | None:
    return None if se is None else min(make_divisible(se * new / old), new)


def shrink(spec: ArchSpec, layer: str, channels: int) -> ArchSpec:
    """`spec` with `layer` reduced to `channels` (the SE squeeze of an affected block keeps its ratio
    to the expansion). Raises PruneError when the count is not allowed or changes the structure."""
    if channels < 8 or channels % 8:
        raise PruneError(f"{layer}: {channels} channels; counts are multiples of 8, at least 8")
    blocks, stem, head = list(spec.blocks), spec.stem, spec.head
    cins = spec.block_inputs()
    if layer.startswith("width"):
        groups = width_groups(spec)
        n = int(layer[5:]) if layer[5:].isdigit() else -1
        if not 0 <= n < len(groups):
            raise PruneError(f"{layer}: no such width in {spec.name} (it has {len(groups)})")
        nodes = set(groups[n])
        for node in nodes:
            if node == 0:
                stem = dataclasses.replace(stem, out=channels)
            else:
                blocks[node - 1] = dataclasses.replace(blocks[node - 1], out=channels)
        for i, (cin, block) in enumerate(zip(cins, spec.blocks)):   # blocks that read this width
            if i in nodes and not exp_layer(cin, block):                # node i is block i+1's input
                b = blocks[i]
                blocks[i] = dataclasses.replace(b, expansion=channels, se=_scaled_se(b.se, b.expansion, channels))
    elif layer.startswith("expand"):
        i = int(layer[6:]) if layer[6:].isdigit() else 0
        if not 1 <= i <= len(blocks) or not exp_layer(cins[i - 1], blocks[i - 1]):
            raise PruneError(f"{layer}: {spec.name} has no expansion layer there")
        b = blocks[i - 1]
        blocks[i - 1] = dataclasses.replace(b, expansion=channels, se=_scaled_se(b.se, b.expansion, channels))
    elif layer == "last_conv":
        head = dataclasses.replace(head, last_conv=channels)
    elif layer == "pre_logits" and head.pre_logits is not None:
        head = dataclasses.replace(head, pre_logits=channels)
    else:
        raise PruneError(f"{layer}: not a prunable layer of {spec.name}; "
                         f"choose from {[lay.name for lay in layers(spec)]}")
    try:
        new = spec.replace(stem=stem, blocks=tuple(blocks), head=head)
    except SpecError as exc:
        raise PruneError(f"{layer} at {channels}: {exc}") from None
    if structure(new) != structure(spec):
        raise PruneError(f"{layer} at {channels} channels would add or remove a residual connection or "
                         "an expansion layer")
    return new


def smaller_counts(spec: ArchSpec, layer: Layer) -> list[tuple[int, ArchSpec]]:
    """Every allowed smaller count of `layer` (multiples of 8, largest first) with its spec."""
    out = []
    top = layer.channels // 8 * 8
    if top == layer.channels:
        top -= 8
    for c in range(top, 7, -8):
        try:
            out.append((c, shrink(spec, layer.name, c)))
        except PruneError:
            continue
    return out


# -- weights ---------------------------------------------------------------------------------------

def _norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().flatten(1).pow(2).sum(1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    return torch.topk(scores, k).indices.sort().values


def keep_indices(model: MobileNet, new: ArchSpec) -> dict[str, torch.Tensor]:
    """The channels `new` keeps of each channel space of `model` (node n, `exp{i}`, `se{i}`,
    `last_conv`, `pre_logits`): those whose producing filters have the largest L2 norm."""
    old = model.spec
    if len(old.blocks) != len(new.blocks) or structure(old) != structure(new):
        raise PruneError("the pruned spec does not have the model's structure (blocks, residuals, "
                         "expansion layers, SE, pre-logits)")
    keep: dict[str, torch.Tensor] = {}
    for group in width_groups(old):
        score = None
        for node in group:
            w = model.stem.conv.weight if node == 0 else model.blocks[node - 1].project.conv.weight
            score = _norms(w) if score is None else score + _norms(w)
        k = _node_width(new, group[0])
        for node in group:
            keep[f"n{node}"] = _top(score, k)
    for i, (m, b_new) in enumerate(zip(model.blocks, new.blocks), start=1):
        if m.expand is not None:
            keep[f"exp{i}"] = _top(_norms(m.expand.conv.weight), b_new.expansion)
        else:
            keep[f"exp{i}"] = keep[f"n{i - 1}"]
        if m.se is not None:
            reduce = m.se.reduce.weight.detach()[:, keep[f"exp{i}"]]
            keep[f"se{i}"] = _top(_norms(reduce), b_new.se)
    keep["last_conv"] = _top(_norms(model.last_conv.conv.weight), new.head.last_conv)
    if model.pre_logits is not None:
        keep["pre_logits"] = _top(_norms(model.pre_logits.weight), new.head.pre_logits)
    return keep


def pruned_model(model: MobileNet, new: ArchSpec) -> MobileNet:
    """A model of `new` that keeps `model`'s weights for the channels that remain (largest L2 norm
    first); the classifier and the metadata come along. With `new == model.spec` it is an exact copy."""
    if model.fused or any(m.bn is None for m in model.modules() if hasattr(m, "bn")):
        raise PruneError("the model has batch norm folded into its convolutions; fine-tune it once with "
                         "mnv3 train --weights MODEL (which unfolds it) and adapt that model file")
    keep = keep_indices(model, new)
    out = build(new, model.num_classes)
    with torch.no_grad():
        _conv_bn(out.stem, model.stem, keep["n0"], None)
        last = len(new.blocks)
        for i, (dst, src) in enumerate(zip(out.blocks, model.blocks), start=1):
            n_in, n_out, e = keep[f"n{i - 1}"], keep[f"n{i}"], keep[f"exp{i}"]
            if src.expand is not None:
                _conv_bn(dst.expand, src.expand, e, n_in)
            _conv_bn(dst.dw, src.dw, e, None)
            if src.se is not None:
                s = keep[f"se{i}"]
                dst.se.reduce.weight.copy_(src.se.reduce.weight[s][:, e])
                dst.se.reduce.bias.copy_(src.se.reduce.bias[s])
                dst.se.expand.weight.copy_(src.se.expand.weight[e][:, s])
                dst.se.expand.bias.copy_(src.se.expand.bias[e])
            _conv_bn(dst.project, src.project, n_out, e)
        lc = keep["last_conv"]
        _conv_bn(out.last_conv, model.last_conv, lc, keep[f"n{last}"])
        feat = lc
        if model.pre_logits is not None:
            p = keep["pre_logits"]
            out.pre_logits.weight.copy_(model.pre_logits.weight[p][:, lc])
            out.pre_logits.bias.copy_(model.pre_logits.bias[p])
            feat = p
        if model.num_classes:
            out.classifier.weight.copy_(model.classifier.weight[:, feat])
            out.classifier.bias.copy_(model.classifier.bias)
    if getattr(model, "meta", None) is not None:
        out.meta = model.meta
    return out


def _conv_bn(dst, src, rows: torch.Tensor, cols: torch.Tensor | None) -> None:
    """Copy a ConvBNAct's kept output channels `rows` (and input channels `cols`, for a full
    convolution; a depthwise one has one input channel per filter)."""
    w = src.conv.weight[rows]
    if cols is not None:
        w = w[:, cols]
    dst.conv.weight.copy_(w)
    if src.conv.bias is not None:
        dst.conv.bias.copy_(src.conv.bias[rows])
    if src.bn is not None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst.bn, name).copy_(getattr(src.bn, name)[rows])
        dst.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)
