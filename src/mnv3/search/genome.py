"""A network of a `SearchSpace` as a fixed-length list of categorical choices (a genome).

Per stage: its width (output channels) and depth; per block slot, up to the stage's largest depth:
kernel, expansion ratio, squeeze-and-excite and activation. Slots past a stage's chosen depth are
ignored. Choice sets are fixed by the space alone (never by other choices), and every value is a
plain int, float or string, as Optuna's categorical distributions want. Decoding builds the spec
exactly as `SearchSpace.sample` does, so the latency table built for the space covers it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from mnv3.arch import ArchSpec, SpecError
from mnv3.space import SearchSpace

Value = int | float | str


class GenomeError(SpecError):
    """A genome does not fit its space (wrong length, a value that is not a choice)."""


@dataclass(frozen=True)
class Gene:
    name: str                      # "s2.width", "s2.b1.kernel", ...: the Optuna parameter name
    choices: tuple[Value, ...]


class GenomeSpace:
    """The genes of a `SearchSpace`, with decode (genome -> ArchSpec) and encode (spec -> genome)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.stages = space.stages()
        genes: list[Gene] = []
        for i, stage in enumerate(self.stages, 1):
            genes.append(Gene(f"s{i}.width", tuple(space.stage_widths(stage))))
            depths = space.depths(stage)
            genes.append(Gene(f"s{i}.depth", tuple(depths)))
            for j in range(1, max(depths) + 1):
                genes += [Gene(f"s{i}.b{j}.kernel", tuple(space.kernels)),
                          Gene(f"s{i}.b{j}.expansion", tuple(float(r) for r in space.expansion_ratios)),
                          Gene(f"s{i}.b{j}.se", tuple("on" if s else "off" for s in space.se)),
                          Gene(f"s{i}.b{j}.act", tuple(space.activations))]
        self.genes = tuple(genes)
        self.index = {g.name: i for i, g in enumerate(self.genes)}

    def __len__(self) -> int:
        return len(self.genes)

    # -- genomes -----------------------------------------------------------------------------------
    def check(self, genome: Sequence[Value]) -> tuple[Value, ...]:
        if len(genome) != len(self.genes):
            raise GenomeError(f"a genome of this space has {len(self.genes)} genes, got {len(genome)}")
        for gene, value in zip(self.genes, genome):
            if value not in gene.choices:
                raise GenomeError(f"{gene.name}: {value!r} is not one of {list(gene.choices)}")
        return tuple(genome)

    def from_params(self, params: dict[str, Value]) -> tuple[Value, ...]:
        """The genome of an Optuna trial's parameters (every gene must be there)."""
        missing = [g.name for g in self.genes if g.name not in params]
        if missing:
            raise GenomeError(f"parameters missing from the trial: {', '.join(missing[:5])}")
        return self.check([params[g.name] for g in self.genes])

    def to_params(self, genome: Sequence[Value]) -> dict[str, Value]:
        return {g.name: v for g, v in zip(self.genes, self.check(genome))}

    def extreme(self, largest: bool) -> tuple[Value, ...]:
        """The largest network of the space (widest, deepest, largest kernels and expansion, SE
        everywhere, hard-swish) or the smallest (and fastest: ReLU, no SE), gene by gene."""
        order = {"off": 0, "on": 1, "relu": 0, "relu6": 1, "hswish": 2}
        pick = max if largest else min
        return tuple(pick(g.choices, key=lambda v: order.get(v, 0) if isinstance(v, str) else v) for g in self.genes)

    def random(self, rng: random.Random) -> tuple[Value, ...]:
        return tuple(rng.choice(g.choices) for g in self.genes)

    def decode(self, genome: Sequence[Value], name: str | None = None) -> ArchSpec:
        """The network of `genome`: the same spec the space's latency table was built for."""
        g = dict(zip((x.name for x in self.genes), self.check(genome)))
        space, blocks, cin = self.space, [], self.space.seed.stem.out
        for i, stage in enumerate(self.stages, 1):
            cout = int(g[f"s{i}.width"])
            for j in range(1, int(g[f"s{i}.depth"]) + 1):
                blocks.append(space._block(cin, cout, stage.stride if j == 1 else 1, int(g[f"s{i}.b{j}.kernel"]),
                                           float(g[f"s{i}.b{j}.expansion"]), g[f"s{i}.b{j}.se"] == "on",
                                           str(g[f"s{i}.b{j}.act"])))
                cin = cout
        spec = space.seed.replace(name=name or f"{space.seed.name}_g{self.digest(genome)}",
                                  blocks=tuple(blocks), head=space.head_for(cin))
        return spec.validate()

    def encode(self, spec: ArchSpec) -> tuple[Value, ...]:
        """The canonical genome of a network of the space: the first choice that gives each block,
        and the first choice of every ignored slot. encode(decode(g)) is canonical for every g, so
        genomes that decode to the same network have the same canonical form."""
        if spec.stem != self.space.seed.stem:
            raise GenomeError(f"{spec.name}: not a network of this space (its stem differs from the seed's)")
        genome = self._encode_from(list(spec.blocks), 0, 0, self.space.seed.stem.out)
        if genome is None or self.decode(genome, spec.name) != spec:
            raise GenomeError(f"{spec.name}: not a network of this space ({len(spec.blocks)} blocks; the "
                              f"space has {len(self.stages)} stages with widths, depths and block choices "
                              "of its own, and its seed's head and input)")
        return genome

    def _encode_from(self, blocks: list, pos: int, i: int, cin: int) -> tuple[Value, ...] | None:
        """Stages i.. from block `pos` on; tries each depth, as a stage may end where the next
        one starts at the same width without a stride."""
        if i == len(self.stages):
            return () if pos == len(blocks) else None
        stage = self.stages[i]
        if pos >= len(blocks) or blocks[pos].out not in self.space.stage_widths(stage):
            return None
        cout, depths = blocks[pos].out, self.space.depths(stage)
        for depth in depths:
            if pos + depth > len(blocks):
                break
            slots: list[Value] = []
            c = cin
            for j in range(depth):
                genes = self._block_genes(blocks[pos + j], c, stage.stride if j == 0 else 1)
                if genes is None or blocks[pos + j].out != cout:
                    break
                slots += genes
                c = cout
            else:
                for j in range(depth, max(depths)):
                    first = self.index[f"s{i + 1}.b{j + 1}.kernel"]
                    slots += [g.choices[0] for g in self.genes[first:first + 4]]
                rest = self._encode_from(blocks, pos + depth, i + 1, cout)
                if rest is not None:
                    return (cout, depth, *slots, *rest)
        return None

    def _block_genes(self, block, cin: int, stride: int) -> list[Value] | None:
        s = self.space
        for k in s.kernels:
            for r in s.expansion_ratios:
                for se in s.se:
                    for act in s.activations:
                        if s._block(cin, block.out, stride, k, r, se, act) == block:
                            return [k, float(r), "on" if se else "off", act]
        return None

    def canonical(self, genome: Sequence[Value]) -> tuple[Value, ...]:
        return self.encode(self.decode(genome))

    def digest(self, genome: Sequence[Value]) -> str:
        """A short hash of the canonical genome's network (equal for equal networks)."""
        text = ",".join(map(str, self._canonical_fast(genome)))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def _canonical_fast(self, genome: Sequence[Value]) -> tuple[Value, ...]:
        """Unused slots reset to their first choice (decode would call digest again otherwise)."""
        g = list(self.check(genome))
        for i, _ in enumerate(self.stages, 1):
            depth = int(g[self.index[f"s{i}.depth"]])
            j = depth + 1
            while f"s{i}.b{j}.kernel" in self.index:
                for part in ("kernel", "expansion", "se", "act"):
                    k = self.index[f"s{i}.b{j}.{part}"]
                    g[k] = self.genes[k].choices[0]
                j += 1
        return tuple(g)

    @staticmethod
    def spec_key(spec: ArchSpec) -> str:
        """A hash of what a network is (blocks and head), whatever its name."""
        return hashlib.sha256(spec.replace(name="x").to_json(indent=None).encode()).hexdigest()[:12]
