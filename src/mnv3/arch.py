"""Network descriptions as data: `ArchSpec` and its parts, JSON form, validation and spec transforms.

Every other part of mnv3 (build, complexity, latency, search) reads these specs; nothing here
imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIVATIONS = ("relu", "relu6", "hswish")
SE_GATES = ("hard_sigmoid", "sigmoid")
PADDINGS = ("symmetric", "same")
SPEC_FORMAT = "mnv3.arch/1"
MODEL_FORMAT = "mnv3.model/1"       # the safetensors header of a model file (mnv3.weights.model_file)


class SpecError(ValueError):
    """A network description is invalid; the message names the part and field and what was expected."""


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of `divisor`, never going more than 10% below `value` (TF/paper rule)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class StemSpec:
    """The first full convolution: kernel x kernel, stride, then batch norm and activation."""

    out: int = 16
    kernel: int = 3
    stride: int = 2
    activation: str = "hswish"


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual bottleneck: 1x1 expand (skipped when expansion equals the input channels),
    kernel x kernel depthwise, optional squeeze-and-excite, linear 1x1 projection."""

    kernel: int
    expansion: int
    out: int
    se: int | None
    activation: str
    stride: int
    dilation: int = 1


@dataclass(frozen=True)
class HeadSpec:
    """The efficient last stage: 1x1 conv (+BN+act) at full resolution, global pool, optional
    pre-logits 1x1 layer with bias and no BN (+act), dropout, classifier."""

    last_conv: int
    pre_logits: int | None
    dropout: float = 0.2
    activation: str = "hswish"


@dataclass(frozen=True)
class ArchSpec:
    """A whole classification network. `padding` is "symmetric" (PyTorch) or "same" (TensorFlow's
    asymmetric padding for strided convolutions, needed by weights trained in TensorFlow)."""

    name: str
    stem: StemSpec
    blocks: tuple[BlockSpec, ...]
    head: HeadSpec
    resolution: int = 224
    in_channels: int = 3
    padding: str = "symmetric"
    se_gate: str = "hard_sigmoid"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01

    def __post_init__(self) -> None:
        # Accept lists from JSON or user code, store tuples so the spec is hashable.
        if not isinstance(self.blocks, tuple):
            object.__setattr__(self, "blocks", tuple(self.blocks))

    # -- derived facts -------------------------------------------------------------------------
    def block_inputs(self) -> list[int]:
        """Input channels of every block, in order."""
        chans, prev = [], self.stem.out
        for block in self.blocks:
            chans.append(prev)
            prev = block.out
        return chans

    def total_stride(self) -> int:
        stride = self.stem.stride
        for block in self.blocks:
            stride *= block.stride
        return stride

    def feature_channels(self) -> int:
        return self.head.pre_logits or self.head.last_conv

    def replace(self, **changes: Any) -> ArchSpec:
        """A copy with some fields changed, validated."""
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> ArchSpec:
        """Raise SpecError naming the first bad field; return self when the spec is sound."""
        _check_text(self.name, "name")
        if self.padding not in PADDINGS:
            raise SpecError(f"padding: expected one of {PADDINGS}, got {self.padding!r}")
        if self.se_gate not in SE_GATES:
            raise SpecError(f"se_gate: expected one of {SE_GATES}, got {self.se_gate!r}")
        _check_int(self.in_channels, "in_channels")
        if not _is_number(self.bn_eps) or not (0 < self.bn_eps < 1):
            raise SpecError(f"bn_eps: expected a small positive number, got {self.bn_eps!r}")
        if not _is_number(self.bn_momentum) or not (0 < self.bn_momentum <= 1):
            raise SpecError(f"bn_momentum: expected a value in (0, 1], got {self.bn_momentum!r}")
        stem = self.stem
        _check_int(stem.out, "stem.out")
        _check_kernel(stem.kernel, "stem.kernel")
        _check_stride(stem.stride, "stem.stride")
        _check_act(stem.activation, "stem.activation")
        if not self.blocks:
            raise SpecError("blocks: a network needs at least one block")
        for i, block in enumerate(self.blocks, start=1):
            where = f"block {i}"
            if not isinstance(block, BlockSpec):
                raise SpecError(f"{where}: expected a BlockSpec, got {type(block).__name__}")
            _check_kernel(block.kernel, f"{where}.kernel")
            _check_int(block.expansion, f"{where}.expansion")
            _check_int(block.out, f"{where}.out")
            if block.se is not None:
                _check_int(block.se, f"{where}.se")
            _check_act(block.activation, f"{where}.activation")
            _check_stride(block.stride, f"{where}.stride")
            _check_int(block.dilation, f"{where}.dilation")
            if block.dilation > 1 and block.stride > 1:
                raise SpecError(f"{where}.dilation: a strided block cannot be dilated "
                                f"(stride {block.stride}, dilation {block.dilation})")
        head = self.head
        _check_int(head.last_conv, "head.last_conv")
        if head.pre_logits is not None:
            _check_int(head.pre_logits, "head.pre_logits")
        if not _is_number(head.dropout) or not (0.0 <= head.dropout < 1.0):
            raise SpecError(f"head.dropout: expected a value in [0, 1), got {head.dropout!r}")
        _check_act(head.activation, "head.activation")
        _check_int(self.resolution, "resolution")
        if self.resolution < self.total_stride():
            raise SpecError(
                f"resolution: {self.resolution} is too small for this network's total stride "
                f"{self.total_stride()}; use at least {self.total_stride()}")
        return self

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["blocks"] = [dataclasses.asdict(b) for b in self.blocks]
        return {"format": SPEC_FORMAT, **data}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        if not isinstance(data, dict):
            raise SpecError(f"spec: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        fmt = data.pop("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise SpecError(f"format: expected {SPEC_FORMAT!r}, got {fmt!r}")
        try:
            stem = _from_fields(StemSpec, data.pop("stem"), "stem")
            head = _from_fields(HeadSpec, data.pop("head"), "head")
            raw_blocks = data.pop("blocks")
        except KeyError as exc:
            raise SpecError(f"{exc.args[0]}: missing from the spec") from None
        if not isinstance(raw_blocks, list):
            raise SpecError("blocks: expected a list of block objects")
        blocks = tuple(_from_fields(BlockSpec, b, f"block {i}") for i, b in enumerate(raw_blocks, 1))
        spec = _from_fields(cls, {**data, "stem": stem, "head": head, "blocks": blocks}, "spec")
        return spec.validate()

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec JSON does not parse: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        from mnv3.files import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        """A spec JSON file, or the spec an mnv3 model file (.safetensors) carries."""
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such spec file")
        header = safetensors_metadata(path)
        if header is not None:
            if header.get("format") != MODEL_FORMAT or "spec" not in header:
                raise SpecError(f"{path}: a safetensors file but not an mnv3 model file (it carries no "
                                "network spec); import it with `mnv3 convert SOURCE --arch ARCH -o FILE`")
            text = header["spec"]
        else:
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                raise SpecError(f"{path}: a binary file, neither a spec JSON nor an mnv3 model file "
                                "(.safetensors)") from None
        try:
            return cls.from_json(text)
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None


def safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file (its header is an 8-byte length and JSON), or None
    when `path` is not one. Reads the header only, never the tensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            size = int.from_bytes(head, "little")
            if not 2 <= size <= 100_000_000 or f.read(1) != b"{":
                return None
            header = json.loads(b"{" + f.read(size - 1))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def is_model_file(path: str | Path) -> bool:
    """Whether `path` is an mnv3 model file (a safetensors file with a spec in its header)."""
    header = safetensors_metadata(path) if Path(path).is_file() else None
    return bool(header) and header.get("format") == MODEL_FORMAT


def _from_fields(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise SpecError(f"{where}: missing field(s) {missing}")
    return cls(**data)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_text(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: expected a non-empty string, got {value!r}")


def _check_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if value < 1:
        raise SpecError(f"{where}: must be at least 1, got {value}")


def _check_kernel(value: Any, where: str) -> None:
    _check_int(value, where)
    if value % 2 == 0:
        raise SpecError(f"{where}: kernel size must be odd (3, 5, 7, ...), got {value}")


def _check_stride(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2):
        raise SpecError(f"{where}: stride must be 1 or 2, got {value!r}")


def _check_act(value: Any, where: str) -> None:
    if value not in ACTIVATIONS:
        raise SpecError(f"{where}: unknown activation {value!r}; expected one of {ACTIVATIONS}")


# -- spec transforms -------------------------------------------------------------------------------

def with_output_stride(spec: ArchSpec, output_stride: int, convention: str = "tf") -> ArchSpec:
    """Keep the feature map at 1/output_stride for dense prediction: once that stride is reached,
    strided blocks become stride 1 and every later block is dilated. `convention` "tf" (TF-slim and
    DeepLab, where the paper's models come from): the block that loses its stride keeps the current
    rate and the rate doubles after it; "torchvision": that block is already dilated (torchvision's
    `dilated=True` MobileNetV3, which its LR-ASPP and weights use)."""
    if output_stride not in (8, 16, 32):
        raise SpecError(f"output_stride: expected 8, 16 or 32, got {output_stride!r}")
    if convention not in ("tf", "torchvision"):
        raise SpecError(f"output_stride convention: expected 'tf' or 'torchvision', got {convention!r}")
    _check_undilated(spec, "output_stride")
    current, rate, blocks = spec.stem.stride, 1, []
    for block in spec.blocks:
        if block.stride > 1 and current * block.stride > output_stride:
            rate_after = rate * block.stride
            blocks.append(dataclasses.replace(block, stride=1, dilation=rate if convention == "tf" else rate_after))
            rate = rate_after
        else:
            current *= block.stride
            blocks.append(dataclasses.replace(block, dilation=rate))
    name = spec.name if output_stride == 32 else f"{spec.name}_os{output_stride}"
    return spec.replace(blocks=tuple(blocks), name=name)


def with_total_stride(spec: ArchSpec, total: int) -> ArchSpec:
    """Downsample by `total` instead of the spec's 32, for small inputs such as CIFAR's 32x32: the
    earliest strided layers (the stem first, then blocks in order) become stride 1 until the product
    of the strides is `total`. Unlike `with_output_stride`, nothing is dilated."""
    current = spec.total_stride()
    if total not in (1, 2, 4, 8, 16, 32) or total > current:
        raise SpecError(f"total_stride: expected a power of 2 no larger than {spec.name}'s "
                        f"{current}, got {total!r}")
    _check_undilated(spec, "total_stride")
    if total == current:
        return spec
    stem, blocks = spec.stem, list(spec.blocks)
    if stem.stride > 1 and current > total:
        current //= stem.stride
        stem = dataclasses.replace(stem, stride=1)
    for i, block in enumerate(blocks):
        if current <= total:
            break
        if block.stride > 1:
            current //= block.stride
            blocks[i] = dataclasses.replace(block, stride=1)
    return spec.replace(stem=stem, blocks=tuple(blocks), name=f"{spec.name}_s{total}")


def reduced_tail(spec: ArchSpec) -> ArchSpec:
    """Halve the channels of every layer between C4 and C5 (paper section 6.3): the blocks of the
    last strided stage get half their output, expansion and squeeze channels, and the last 1x1 conv
    is halved too. The stage's first block keeps its expansion, where C4 is tapped."""
    return _halve_last_stage(spec, keep_first_expansion=True, suffix="_reduced_tail")


def halve_last_stage(spec: ArchSpec) -> ArchSpec:
    """The segmentation backbone's "RF2" (paper section 6.4, "reduce the filters in the last block by
    a factor of 2"), as the authors' DeepLab release applies it: every block of the last strided
    stage gets half its output, expansion and squeeze channels (the first block's expansion too,
    unlike `reduced_tail`), and the last 1x1 conv is halved."""
    return _halve_last_stage(spec, keep_first_expansion=False, suffix="_rf2")


def _halve_last_stage(spec: ArchSpec, keep_first_expansion: bool, suffix: str) -> ArchSpec:
    _check_undilated(spec, suffix.strip("_"))
    strided = [i for i, b in enumerate(spec.blocks) if b.stride > 1]
    if not strided:
        raise SpecError(f"{spec.name}: {suffix.strip('_')} needs a strided block to start the last stage")
    first, blocks = strided[-1], list(spec.blocks)
    for i in range(first, len(blocks)):
        b = blocks[i]
        expansion = b.expansion if i == first and keep_first_expansion else make_divisible(b.expansion / 2)
        se = None if b.se is None else make_divisible(expansion / 4)
        blocks[i] = dataclasses.replace(b, expansion=expansion, out=make_divisible(b.out / 2), se=se)
    head = dataclasses.replace(spec.head, last_conv=make_divisible(spec.head.last_conv / 2))
    return spec.replace(blocks=tuple(blocks), head=head, name=spec.name + suffix)


def _check_undilated(spec: ArchSpec, transform: str) -> None:
    if any(b.dilation > 1 for b in spec.blocks):
        raise SpecError(f"{transform}: {spec.name} is already dilated; apply {transform} to the "
                        "undilated spec (reduced_tail first, then output_stride)")
