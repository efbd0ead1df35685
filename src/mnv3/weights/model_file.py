"""The mnv3 model file: one safetensors file with the spec, the weights and what a user needs to run
the model (class ids and names, preprocessing). Loading it needs nothing else, and never unpickles."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from mnv3.arch import MODEL_FORMAT, ArchSpec, SpecError, safetensors_metadata
from mnv3.files import atomic_write
from mnv3.heads import DenseHead
from mnv3.nn import MobileNet, build, build_dense
from mnv3.nn.lraspp import Segmenter
from mnv3.nn.ssdlite import Detector

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class WeightsError(ValueError):
    """A weights file or source cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared: resize the shorter side to `resize`, center-crop `resolution`,
    scale pixels to [0, 1], subtract `mean` and divide by `std` (per RGB channel)."""

    resolution: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @classmethod
    def for_resolution(cls, resolution: int, **kw: Any) -> Preprocess:
        return cls(resolution=resolution, resize=round(resolution / 0.875), **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        data = dict(data)
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        pre = cls(**data)
        if pre.interpolation not in INTERPOLATIONS:
            raise WeightsError(f"preprocess.interpolation: expected one of {INTERPOLATIONS}, "
                               f"got {pre.interpolation!r}")
        return pre


@dataclass(frozen=True)
class ModelMeta:
    """What travels with the weights: class ids (for ImageNet, WordNet ids), readable names,
    preprocessing and where the weights came from."""

    classes: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    source: str | None = None
    training: dict[str, Any] | None = None   # how the weights were trained: recipe, data, accuracy

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        classes = tuple(data["classes"]) if data.get("classes") is not None else None
        names = tuple(data["class_names"]) if data.get("class_names") is not None else None
        return cls(classes=classes, class_names=names,
                   preprocess=Preprocess.from_dict(data["preprocess"]), source=data.get("source"),
                   training=data.get("training"))

    def label(self, index: int) -> str:
        """A readable label for output `index`: "name (id)" when both are known."""
        cid = self.classes[index] if self.classes else str(index)
        name = self.class_names[index] if self.class_names else None
        return f"{name} ({cid})" if name and name != cid else cid


def model_meta(model: MobileNet | Segmenter | Detector) -> ModelMeta:
    """The model's metadata; a model built from a bare spec gets default preprocessing (a
    segmentation model: resized to its head's height, no crop)."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, ModelMeta):
        return meta
    if isinstance(model, (Segmenter, Detector)):
        height = model.head_spec.resolution[0]
        return ModelMeta(preprocess=Preprocess(resolution=height, resize=height))
    return ModelMeta(preprocess=Preprocess.for_resolution(model.spec.resolution))


def set_meta(model: MobileNet, meta: ModelMeta) -> MobileNet:
    n = model.num_classes
    for what in ("classes", "class_names"):
        values = getattr(meta, what)
        if values is not None and len(values) != n:
            raise WeightsError(f"{what}: {len(values)} given for a model with {n} outputs")
    model.meta = meta
    return model


def save(model: MobileNet | Segmenter | Detector, path: str | Path, meta: ModelMeta | None = None) -> Path:
    """Write `model` (spec, weights, metadata; a segmentation or detection model's head too) to one
    safetensors file, atomically."""
    if not isinstance(model, (MobileNet, Segmenter, Detector)):
        raise WeightsError(f"save: expected an mnv3 model (from mnv3.build or mnv3.load), "
                           f"got {type(model).__name__}")
    meta = meta or model_meta(model)
    set_meta(model, meta)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header = {
        "format": MODEL_FORMAT,
        "spec": model.spec.to_json(indent=None),
        "num_classes": str(model.num_classes),
        "fused": "1" if model.fused else "0",
        "meta": meta.to_json(),
    }
    if isinstance(model, (Segmenter, Detector)):
        header["head"] = model.head_spec.to_json()
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file, with a clear error if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, header


def read_header(path: Path) -> dict[str, str]:
    """The header of an mnv3 model file, without reading its tensors."""
    header = safetensors_metadata(path)
    if header is None or not is_model_header(header):
        raise WeightsError(f"{path}: not an mnv3 model file")
    return header


def is_model_header(header: dict[str, str]) -> bool:
    return header.get("format") == MODEL_FORMAT


def load_model_file(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str],
                    arch: ArchSpec | None = None) -> MobileNet | Segmenter | Detector:
    """Rebuild a model from an mnv3 model file; with `arch`, load its weights into that spec instead.
    A file with a head gives a `Segmenter` (segmentation) or a `Detector` (detection)."""
    try:
        spec = ArchSpec.from_json(header["spec"])
        num_classes = int(header["num_classes"])
        meta = ModelMeta.from_json(header["meta"])
        head = DenseHead.from_json(header["head"]) if "head" in header else None
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: damaged mnv3 model header ({exc}); re-save the model") from None
    if arch is not None and arch != spec:
        spec = arch
    try:
        model = build(spec, num_classes) if head is None else build_dense(spec, head)
    except SpecError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if header.get("fused") == "1":
        model.fuse()
    load_weights(model, tensors, source=str(path))
    set_meta(model, meta)
    return model.eval()


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict that must match `model` exactly; the error lists every mismatched tensor."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in tensors]
    unexpected = [k for k in tensors if k not in ours]
    shapes = [f"{k}: file {list(tensors[k].shape)} vs model {list(ours[k].shape)}"
              for k in ours if k in tensors and tensors[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        what = getattr(model, "spec", None) and model.spec.name
        if isinstance(model, (Segmenter, Detector)):
            what = f"{what} + {model.head_spec.kind}"
        lines = [f"{source}: the weights do not fit this network ({what})."]
        for title, items in (("shape mismatch", shapes), ("missing from the file", missing),
                             ("not in the network", unexpected)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in shown)
        lines.append("  Load the file without --arch (it carries its own spec), or pass the --arch "
                     "it was saved with.")
        raise WeightsError("\n".join(lines))
    model.load_state_dict({k: tensors[k].to(ours[k].dtype) for k in ours})
