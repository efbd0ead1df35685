"""A weight-sharing supernet over a `SearchSpace` (Once-for-All, BigNAS): the largest network of the
space, whose sub-networks run by slicing its weights, and extraction of any sub-network as a
standalone `ArchSpec` + weights with the same outputs.

Elastic dimensions, all read from the space (so a genome means the same network here as in the
latency table and the proxy oracle):
  * depth: a stage runs its first d block slots;
  * width (a stage's output channels) and expansion (make_divisible(ratio x input channels)): the
    first c channels of every layer (`sort_channels` puts the most important first, as Once-for-All
    does, by the L1 norm of the weights that read them; the sort is stable);
  * kernel: the centre of the largest kernel, passed through Once-for-All's learned kernel
    transformation (one (k*k) x (k*k) matrix per block and kernel step, 7->5, 5->3, initialised to
    the identity, shared by the channels);
  * squeeze-and-excite on or off (its squeeze width make_divisible(expansion / 4) sliced the same way)
    and the activation (no weights).
The last 1x1 conv follows the last stage's width as `SearchSpace.head_for` says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnv3.arch import ArchSpec, make_divisible
from mnv3.nn.layers import ConvBNAct, init_weights, same_padding
from mnv3.search.genome import GenomeSpace, Value
from mnv3.space import SearchSpace

_ACT = {"relu": F.relu, "relu6": F.relu6, "hswish": F.hardswish}


@dataclass(frozen=True)
class SlotConfig:
    """What one block slot runs for the active genome."""

    cin: int
    expansion: int
    out: int
    kernel: int
    stride: int
    se: int | None
    activation: str

    @property
    def has_expand(self) -> bool:
        return self.expansion != self.cin

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.cin == self.out


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, c: int) -> torch.Tensor:
    """Batch norm over the first `c` channels of `bn` (in training, their running statistics are
    updated in place through the slices, as Once-for-All's dynamic batch norm does)."""
    if c == bn.num_features:
        return bn(x)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                        bn.training or not bn.track_running_stats, momentum, bn.eps)


class ElasticBlock(nn.Module):
    """One block slot at its largest: every sub-block of the slot is a slice of these weights."""

    def __init__(self, cin: int, expansion: int, out: int, kernels: Sequence[int], stride: int, se: int,
                 *, same: bool, se_gate: str, eps: float, momentum: float) -> None:
        super().__init__()
        self.kernels = tuple(sorted(set(kernels), reverse=True))
        k = self.kernels[0]
        norm = {"eps": eps, "momentum": momentum}
        self.expand = ConvBNAct(cin, expansion, 1, **norm)
        self.dw = ConvBNAct(expansion, expansion, k, stride, groups=expansion, same=same, **norm)
        self.se_reduce = nn.Conv2d(expansion, se, 1)
        self.se_expand = nn.Conv2d(se, expansion, 1)
        self.gate = F.hardsigmoid if se_gate == "hard_sigmoid" else torch.sigmoid
        self.project = ConvBNAct(expansion, out, 1, **norm)
        self.stride, self.same = stride, same
        # Once-for-All's kernel transformation: big -> small, applied to the centre, identity at first
        self.transforms = nn.ParameterDict({
            f"{a}to{b}": nn.Parameter(torch.eye(b * b)) for a, b in zip(self.kernels, self.kernels[1:])})

    def dw_weight(self, c: int, kernel: int) -> torch.Tensor:
        w = self.dw.conv.weight[:c]
        size = self.kernels[0]
        for small in self.kernels[1:]:
            if size == kernel:
                break
            start = (size - small) // 2
            w = w[:, :, start:start + small, start:start + small]
            w = F.linear(w.reshape(c, small * small), self.transforms[f"{size}to{small}"]).reshape(c, 1, small, small)
            size = small
        if size != kernel:
            raise ValueError(f"kernel {kernel} is not one of this slot's {self.kernels}")
        return w

    def forward(self, x: torch.Tensor, cfg: SlotConfig) -> torch.Tensor:
        act = _ACT[cfg.activation]
        e = cfg.expansion
        h = x
        if cfg.has_expand:
            h = act(_bn(F.conv2d(x, self.expand.conv.weight[:e, :cfg.cin]), self.expand.bn, e))
        k = cfg.kernel
        if self.same and self.stride > 1:
            top, bottom = same_padding(h.shape[-2], k, self.stride, 1)
            left, right = same_padding(h.shape[-1], k, self.stride, 1)
            h = F.conv2d(F.pad(h, (left, right, top, bottom)), self.dw_weight(e, k), None, self.stride, 0, 1, e)
        else:
            h = F.conv2d(h, self.dw_weight(e, k), None, self.stride, (k - 1) // 2, 1, e)
        h = act(_bn(h, self.dw.bn, e))
        if cfg.se is not None:
            s = cfg.se
            g = F.conv2d(h.mean((2, 3), keepdim=True), self.se_reduce.weight[:s, :e], self.se_reduce.bias[:s])
            g = self.gate(F.conv2d(F.relu(g), self.se_expand.weight[:e, :s], self.se_expand.bias[:e]))
            h = h * g
        y = _bn(F.conv2d(h, self.project.conv.weight[:cfg.out, :e]), self.project.bn, cfg.out)
        return x + y if cfg.residual else y


class Supernet(nn.Module):
    """The space's largest network; `set_genome(g)` (or `set_spec`) picks the sub-network `forward`
    runs, `extract(g)` returns it as a standalone `MobileNet`."""

    def __init__(self, space: SearchSpace, num_classes: int) -> None:
        super().__init__()
        self.space, self.genomes, self.num_classes = space, GenomeSpace(space), num_classes
        seed = space.seed
        same = seed.padding == "same"
        norm = {"eps": seed.bn_eps, "momentum": seed.bn_momentum}
        self.stem = ConvBNAct(seed.in_channels, seed.stem.out, seed.stem.kernel, seed.stem.stride,
                              act=seed.stem.activation, same=same, **norm)
        blocks, self.slot_of = [], []          # slot_of[i] = (stage, index in stage)
        cins = [seed.stem.out]
        for s, stage in enumerate(self.genomes.stages):
            widths = space.stage_widths(stage)
            for j in range(max(space.depths(stage))):
                inputs = cins if j == 0 else widths
                exp = max(make_divisible(r * c) for r in space.expansion_ratios for c in inputs)
                blocks.append(ElasticBlock(max(inputs), exp, max(widths), space.kernels,
                                           stage.stride if j == 0 else 1, make_divisible(exp / 4), same=same,
                                           se_gate=seed.se_gate, **norm))
                self.slot_of.append((s, j))
            cins = widths
        self.blocks = nn.ModuleList(blocks)
        head = seed.head
        last = max(space.head_for(w).last_conv for w in cins)
        self.last_conv = ConvBNAct(max(cins), last, 1, act=head.activation, **norm)
        self.head_act = head.activation
        features = head.pre_logits or last
        self.pre_logits = nn.Linear(last, head.pre_logits) if head.pre_logits else None
        self.dropout = nn.Dropout(head.dropout)
        self.classifier = nn.Linear(features, num_classes)
        init_weights(self)
        self.set_genome(self.largest())

    # -- genomes -----------------------------------------------------------------------------------
    def largest(self) -> tuple[Value, ...]:
        """Widest, deepest, largest kernels and expansion, SE everywhere, hard-swish."""
        return self.genomes.canonical(self.genomes.extreme(True))

    def smallest(self) -> tuple[Value, ...]:
        return self.genomes.canonical(self.genomes.extreme(False))

    def configs(self, spec: ArchSpec, genome: Sequence[Value]) -> tuple[list[SlotConfig | None], int]:
        g = dict(zip((x.name for x in self.genomes.genes), genome))
        blocks = iter(zip(spec.block_inputs(), spec.blocks))
        slots: list[SlotConfig | None] = []
        for s, j in self.slot_of:
            if j < int(g[f"s{s + 1}.depth"]):
                cin, b = next(blocks)
                slots.append(SlotConfig(cin, b.expansion, b.out, b.kernel, b.stride, b.se, b.activation))
            else:
                slots.append(None)
        return slots, spec.head.last_conv

    def set_genome(self, genome: Sequence[Value]) -> ArchSpec:
        """Make `genome` the sub-network `forward` runs; returns its spec."""
        genome = self.genomes.check(genome)
        spec = self.genomes.decode(genome)
        self.active, self.active_spec = self.configs(spec, genome), spec
        return spec

    def set_spec(self, spec: ArchSpec) -> tuple[Value, ...]:
        genome = self.genomes.encode(spec)
        self.set_genome(genome)
        return genome

    # -- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        slots, last = self.active
        x = self.stem(x)
        for block, cfg in zip(self.blocks, slots):
            if cfg is not None:
                x = block(x, cfg)
        c = x.shape[1]
        return _ACT[self.head_act](_bn(F.conv2d(x, self.last_conv.conv.weight[:last, :c]), self.last_conv.bn, last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean((2, 3))
        c = x.shape[1]
        if self.pre_logits is not None:
            x = _ACT[self.head_act](F.linear(x, self.pre_logits.weight[:, :c], self.pre_logits.bias))
            return self.classifier(self.dropout(x))
        return F.linear(self.dropout(x), self.classifier.weight[:, :c], self.classifier.bias)

    # -- extraction --------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, genome: Sequence[Value] | None = None, name: str | None = None):
        """The sub-network of `genome` (default: the active one) as a standalone `MobileNet` with
        its sliced weights and batch-norm statistics: the same outputs as the supernet's."""
        from mnv3.nn import build

        genome = self.genomes.check(genome) if genome is not None else None
        spec = self.genomes.decode(genome, name) if genome is not None else self.active_spec
        slots, last = self.configs(spec, genome) if genome is not None else self.active
        if name:
            spec = spec.replace(name=name)
        net = build(spec, self.num_classes).to(self.classifier.weight.device)
        net.train(self.training)

        def copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, c: int) -> None:
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, key).copy_(getattr(src, key)[:c])
            dst.num_batches_tracked.copy_(src.num_batches_tracked)

        net.stem.load_state_dict(self.stem.state_dict())
        modules = iter(net.blocks)
        for block, cfg in zip(self.blocks, slots):
            if cfg is None:
                continue
            m, e = next(modules), cfg.expansion
            if cfg.has_expand:
                m.expand.conv.weight.copy_(block.expand.conv.weight[:e, :cfg.cin])
                copy_bn(m.expand.bn, block.expand.bn, e)
            m.dw.conv.weight.copy_(block.dw_weight(e, cfg.kernel))
            copy_bn(m.dw.bn, block.dw.bn, e)
            if cfg.se is not None:
                s = cfg.se
                m.se.reduce.weight.copy_(block.se_reduce.weight[:s, :e])
                m.se.reduce.bias.copy_(block.se_reduce.bias[:s])
                m.se.expand.weight.copy_(block.se_expand.weight[:e, :s])
                m.se.expand.bias.copy_(block.se_expand.bias[:e])
            m.project.conv.weight.copy_(block.project.conv.weight[:cfg.out, :e])
            copy_bn(m.project.bn, block.project.bn, cfg.out)
        c = spec.blocks[-1].out
        net.last_conv.conv.weight.copy_(self.last_conv.conv.weight[:last, :c])
        copy_bn(net.last_conv.bn, self.last_conv.bn, last)
        if self.pre_logits is not None:
            net.pre_logits.weight.copy_(self.pre_logits.weight[:, :last])
            net.pre_logits.bias.copy_(self.pre_logits.bias)
            net.classifier.load_state_dict(self.classifier.state_dict())
        else:
            net.classifier.weight.copy_(self.classifier.weight[:, :last])
            net.classifier.bias.copy_(self.classifier.bias)
        return net

    # -- channel importance ------------------------------------------------------------------------
    def can_skip_expansion(self) -> bool:
        """Whether some sub-network skips a block's expansion (a ratio of 1: the depthwise layer then
        reads the block input's channels directly)."""
        stages, cins = self.genomes.stages, [self.space.seed.stem.out]
        for stage in stages:
            widths = self.space.stage_widths(stage)
            for c in set(cins) | set(widths):
                if any(make_divisible(r * c) == c for r in self.space.expansion_ratios):
                    return True
            cins = widths
        return False

    @torch.no_grad()
    def sort_channels(self) -> list[tuple[str, int, torch.Tensor]]:
        """Reorder channels so that the most important come first (Once-for-All): each block's
        expansion channels by the L1 norm of the projection weights that read them, its squeeze
        channels by the L1 norm of the SE expand weights that read them, and each stage's output
        channels by the L1 norm of every weight that reads them (the next blocks' expansions, or
        the last conv). The sort is stable (equal norms keep their order) and the largest network
        computes the same function afterwards. Returns the moves made, [(tensor name, dim,
        permutation)] in order, for `apply_moves` on copies of the weights (an EMA, optimizer state)."""
        if self.can_skip_expansion():
            raise ValueError("sort_channels: an expansion ratio of this space gives some blocks no expansion "
                             "layer, so their depthwise weights read the stage's channels; sorting would change "
                             "those sub-networks")
        moves: list[tuple[str, int, torch.Tensor]] = []
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}

        def order(importance: torch.Tensor) -> torch.Tensor:
            return torch.sort(importance, descending=True, stable=True).indices

        def move(name: str, dim: int, perm: torch.Tensor) -> None:
            t = tensors[name]
            t.data.copy_(t.data.index_select(dim, perm))
            moves.append((name, dim, perm))

        def move_bn(prefix: str, perm: torch.Tensor) -> None:
            for key in ("weight", "bias", "running_mean", "running_var"):
                move(f"{prefix}.{key}", 0, perm)

        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}"
            perm = order(block.project.conv.weight.abs().sum((0, 2, 3)))
            move(f"{p}.expand.conv.weight", 0, perm)
            move_bn(f"{p}.expand.bn", perm)
            move(f"{p}.dw.conv.weight", 0, perm)
            move_bn(f"{p}.dw.bn", perm)
            move(f"{p}.se_reduce.weight", 1, perm)
            move(f"{p}.se_expand.weight", 0, perm)
            move(f"{p}.se_expand.bias", 0, perm)
            move(f"{p}.project.conv.weight", 1, perm)
            squeeze = order(block.se_expand.weight.abs().sum((0, 2, 3)))
            move(f"{p}.se_reduce.weight", 0, squeeze)
            move(f"{p}.se_reduce.bias", 0, squeeze)
            move(f"{p}.se_expand.weight", 1, squeeze)
        for s in range(len(self.genomes.stages)):     # stage outputs: every projection of the stage writes them
            mine = [i for i, (st, _) in enumerate(self.slot_of) if st == s]
            nxt = [i for i, (st, j) in enumerate(self.slot_of) if st == s + 1 and j == 0]
            readers = [f"blocks.{i}.expand.conv.weight" for i in mine[1:] + nxt] or []
            if not nxt:
                readers.append("last_conv.conv.weight")
            perm = order(sum(tensors[r].abs().sum((0, 2, 3)) for r in readers))
            for i in mine:
                move(f"blocks.{i}.project.conv.weight", 0, perm)
                move_bn(f"blocks.{i}.project.bn", perm)
            for r in readers:
                move(r, 1, perm)
        return moves


def apply_moves(tensors: dict[str, torch.Tensor], moves: list[tuple[str, int, torch.Tensor]]) -> None:
    """Replay `Supernet.sort_channels`'s moves on another copy of its tensors ({name: tensor}: an
    EMA's state dict, or optimizer state keyed by parameter name), in place."""
    for name, dim, perm in moves:
        t = tensors.get(name)
        if t is not None and t.dim() > dim:
            t.copy_(t.index_select(dim, perm.to(t.device)))


def space_difference(mine: SearchSpace, theirs: SearchSpace) -> str:
    """What differs between two spaces, in words (empty when they are the same)."""
    a, b = mine.to_dict(), theirs.to_dict()
    diff = []
    for key in a:
        if key == "seed":
            continue
        if a[key] != b.get(key):
            diff.append(f"{key} {a[key]} vs {b.get(key)}")
    if a["seed"] != b["seed"]:
        sa, sb = mine.seed, theirs.seed
        parts = [f.name for f in dataclasses.fields(sa) if getattr(sa, f.name) != getattr(sb, f.name)]
        diff.append(f"seed network ({', '.join(parts)})")
    return "; ".join(diff)
