"""A search space as data: the per-block choices around a seed spec (kernel, expansion ratio, SE,
activation) and per-stage choices (width, depth), as in MnasNet's factorized hierarchical space.

The latency tables enumerate every block configuration the space can produce; the search samples
networks from it. Both read this description; nothing here measures or trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from mnv3.arch import ACTIVATIONS, ArchSpec, BlockSpec, SpecError, make_divisible


@dataclass(frozen=True)
class Stage:
    """Consecutive seed blocks with the same output channels; the first one may stride."""

    first: int
    depth: int
    out: int
    stride: int
    input_size: int     # spatial size of the stage's input at the seed's resolution


@dataclass(frozen=True)
class BlockEntry:
    """One block configuration at one input size: what a latency table measures."""

    input_size: int
    cin: int
    block: BlockSpec

    def key(self) -> str:
        b = self.block
        se = "none" if b.se is None else str(b.se)
        return (f"block:s{self.input_size}:i{self.cin}:e{b.expansion}:o{b.out}:k{b.kernel}:st{b.stride}"
                f":d{b.dilation}:se{se}:{b.activation}")


@dataclass(frozen=True)
class SearchSpace:
    seed: ArchSpec
    kernels: tuple[int, ...] = (3, 5, 7)
    expansion_ratios: tuple[float, ...] = (3.0, 4.0, 6.0)
    se: tuple[bool, ...] = (False, True)
    activations: tuple[str, ...] = ("relu", "hswish")
    widths: tuple[float, ...] = (0.75, 1.0, 1.25)
    depth_deltas: tuple[int, ...] = (-1, 0, 1)
    # The classifier every network of the space ends in, as deployed: its size is part of the head's
    # latency (1000 ImageNet classes cost a 10-class network about a sixth of its time at 32x32).
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise SpecError(f"space.num_classes: a whole number of classes, 1 or more, got {self.num_classes!r}")
        for name in ("kernels", "expansion_ratios", "se", "activations", "widths", "depth_deltas"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise SpecError(f"space.{name}: needs at least one choice")
        if any(k % 2 == 0 or k < 1 for k in self.kernels):
            raise SpecError(f"space.kernels: odd sizes only, got {self.kernels}")
        if any(a not in ACTIVATIONS for a in self.activations):
            raise SpecError(f"space.activations: expected some of {ACTIVATIONS}, got {self.activations}")
        if any(r <= 0 for r in self.expansion_ratios) or any(w <= 0 for w in self.widths):
            raise SpecError("space: expansion ratios and widths must be positive")
        if any(b.dilation > 1 for b in self.seed.blocks):
            raise SpecError("space: the seed must be undilated (dilate the result instead)")

    # -- structure -------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        stages, size = [], -(-self.seed.resolution // self.seed.stem.stride)
        for i, block in enumerate(self.seed.blocks):
            if i == 0 or block.stride > 1 or block.out != self.seed.blocks[i - 1].out:
                stages.append(Stage(i, 1, block.out, block.stride, size))
            else:
                last = stages[-1]
                stages[-1] = dataclasses.replace(last, depth=last.depth + 1)
            size = -(-size // block.stride)
        return stages

    def stage_widths(self, stage: Stage) -> list[int]:
        return sorted({make_divisible(stage.out * w) for w in self.widths})

    def depths(self, stage: Stage) -> list[int]:
        return sorted({max(1, stage.depth + d) for d in self.depth_deltas})

    def _block(self, cin: int, cout: int, stride: int, kernel: int, ratio: float, se: bool,
               act: str) -> BlockSpec:
        exp = make_divisible(ratio * cin)
        return BlockSpec(kernel=kernel, expansion=exp, out=cout, se=make_divisible(exp / 4) if se else None,
                         activation=act, stride=stride)

    def head_for(self, last_out: int):
        """The seed's head for a last stage of `last_out` channels (last conv keeps its ratio)."""
        seed_last = self.seed.blocks[-1].out
        return dataclasses.replace(self.seed.head,
                                   last_conv=make_divisible(self.seed.head.last_conv * last_out / seed_last))

    # -- enumeration (what a latency table must hold) ----------------------------------------------
    def block_entries(self) -> list[BlockEntry]:
        """Every distinct block configuration any network of the space contains."""
        entries: dict[str, BlockEntry] = {}
        prev_widths = [self.seed.stem.out]
        for stage in self.stages():
            widths = self.stage_widths(stage)
            shapes = [(cin, cout, stage.stride, stage.input_size) for cin in prev_widths for cout in widths]
            if max(self.depths(stage)) > 1:
                size = -(-stage.input_size // stage.stride)
                shapes += [(c, c, 1, size) for c in widths]
            for cin, cout, stride, size in shapes:
                for k in self.kernels:
                    for r in self.expansion_ratios:
                        for se in self.se:
                            for act in self.activations:
                                entry = BlockEntry(size, cin, self._block(cin, cout, stride, k, r, se, act))
                                entries.setdefault(entry.key(), entry)
            prev_widths = widths
        return list(entries.values())

    def last_widths(self) -> list[int]:
        return self.stage_widths(self.stages()[-1])

    def size(self) -> int:
        """How many networks the space holds (it is sampled, never enumerated)."""
        per_block = len(self.kernels) * len(self.expansion_ratios) * len(self.se) * len(self.activations)
        total = 1
        for stage in self.stages():
            total *= len(self.stage_widths(stage)) * sum(per_block ** d for d in self.depths(stage))
        return total

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> ArchSpec:
        """A random network of the space, uniformly per choice."""
        blocks, cin = [], self.seed.stem.out
        for stage in self.stages():
            cout = rng.choice(self.stage_widths(stage))
            for j in range(rng.choice(self.depths(stage))):
                blocks.append(self._block(cin, cout, stage.stride if j == 0 else 1, rng.choice(self.kernels),
                                          rng.choice(self.expansion_ratios), rng.choice(self.se),
                                          rng.choice(self.activations)))
                cin = cout
        return self.seed.replace(name=f"{self.seed.name}_sample", blocks=tuple(blocks),
                                 head=self.head_for(cin))

    # -- data form -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("seed", "num_classes")}
        # ImageNet's 1000 is left out, so spaces, tables and studies saved before the key existed keep their keys
        extra = {"num_classes": self.num_classes} if self.num_classes != 1000 else {}
        return {"seed": self.seed.to_dict(), **data, **extra}

    @classmethod
    def from_dict(cls, data: dict) -> SearchSpace:
        data = dict(data)
        seed = ArchSpec.from_dict(data.pop("seed"))
        classes = data.pop("num_classes", 1000)
        return cls(seed=seed, num_classes=classes, **{k: tuple(v) for k, v in data.items()})

    def save(self, path) -> Path:
        """The space as JSON (what `--space` of every command reads back), written atomically."""
        from mnv3.files import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def key(self) -> str:
        """A short stable name for this space (tables and calibrations are stored under it)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return f"{self.seed.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
