"""`load(SOURCE, arch=...)`: one entry point for every kind of weights a user has.

SOURCE is an mnv3 model file, a torchvision or timm state dict (.pth/.pt/.bin/.safetensors), a TFLite
file, a URL (downloaded into the cache with a checksum check) or a named pretrained set such as
`torchvision:IMAGENET1K_V2`. State dicts are read with `torch.load(weights_only=True)` or
safetensors: nothing is unpickled unsafely.
"""

from __future__ import annotations

import hashlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

from mnv3.arch import ArchSpec
from mnv3.files import atomic_write, cache_dir
from mnv3.imagenet import imagenet_classes
from mnv3.nn import MobileNet, build
from mnv3.nn.lraspp import Segmenter
from mnv3.presets import COMMON_WIDTHS, PRESETS, candidates, resolve_arch
from mnv3.weights.detect_import import import_torchvision_ssdlite, is_torchvision_ssdlite
from mnv3.weights.model_file import (
    ModelMeta,
    Preprocess,
    WeightsError,
    is_model_header,
    load_model_file,
    load_weights,
    read_safetensors,
    set_meta,
)
from mnv3.weights.segment_import import import_torchvision_lraspp, is_torchvision_lraspp
from mnv3.weights.state_dicts import detect_format, map_state_dict, matches, module_order, num_classes_of
from mnv3.weights.tflite_import import load_tflite

_HUB_HASH = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")
_TORCHVISION_BASE = "https://download.pytorch.org/models/"
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")

# Named pretrained sets: (library, preset) -> {name: (file, resize used for evaluation)}.
NAMED_WEIGHTS: dict[tuple[str, str], dict[str, tuple[str, int]]] = {
    ("torchvision", "mobilenet_v3_large"): {
        "IMAGENET1K_V1": ("mobilenet_v3_large-8738ca79.pth", 256),
        "IMAGENET1K_V2": ("mobilenet_v3_large-5c1a4163.pth", 232),
    },
    ("torchvision", "mobilenet_v3_small"): {
        "IMAGENET1K_V1": ("mobilenet_v3_small-047dcff4.pth", 256),
    },
    ("torchvision", "mobilenet_v2"): {
        "IMAGENET1K_V1": ("mobilenet_v2-b0353104.pth", 256),
        "IMAGENET1K_V2": ("mobilenet_v2-7ebf99e0.pth", 232),
    },
}


def resolve_named(source: str, arch: ArchSpec | None) -> tuple[str, int, ArchSpec]:
    """(URL, resize, spec) of a named set like `torchvision:IMAGENET1K_V2` for the given arch."""
    library, _, name = source.partition(":")
    base = None if arch is None else re.sub(r"_\d{3}(_\d+)?$", "", arch.name)
    choices = {f"{lib}:{n} (--arch {preset})": None
               for (lib, preset), names in NAMED_WEIGHTS.items() for n in names}
    if base is None or (library, base) not in NAMED_WEIGHTS or name not in NAMED_WEIGHTS[(library, base)]:
        hint = "" if arch is not None else " (pass --arch to say which network)"
        raise WeightsError(f"unknown pretrained set {source!r} for "
                           f"{arch.name if arch else 'no --arch'}{hint}; known: {', '.join(choices)}")
    filename, resize = NAMED_WEIGHTS[(library, base)][name]
    return _TORCHVISION_BASE + filename, resize, PRESETS[base]()


def expected_hash(url: str) -> str | None:
    """The sha256 (or its prefix) a URL promises: a `#sha256=` fragment, or torch hub's `name-<hex>.ext`."""
    parsed = urllib.parse.urlparse(url)
    if parsed.fragment.startswith("sha256="):
        return parsed.fragment.split("=", 1)[1].lower()
    match = _HUB_HASH.search(Path(parsed.path).name)
    return match.group(1) if match else None


def download(url: str, progress: bool = True) -> Path:
    """Fetch `url` into the cache (once), verifying its checksum when the URL carries one."""
    parsed = urllib.parse.urlparse(url)
    name = Path(parsed.path).name or "download"
    target = cache_dir() / name
    want = expected_hash(url)
    if target.is_file() and (want is None or _sha256(target).startswith(want)):
        return target
    try:
        response = urllib.request.urlopen(url.split("#", 1)[0], timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise WeightsError(f"could not download {url}: {exc}. Check the address and your "
                           "connection, or download the file yourself and pass its path") from None

    def write(tmp: Path) -> None:
        total = int(response.headers.get("Content-Length") or 0) or None
        from tqdm import tqdm

        with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=name,
                                          disable=not progress, file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        got = _sha256(tmp)
        if want is not None and not got.startswith(want):
            raise WeightsError(f"checksum mismatch for {url}: expected sha256 {want}..., got {got}; "
                               "the download is damaged or the file changed: nothing was kept")
        if want is None:
            print(f"note: {url} carries no checksum; its sha256 is {got} "
                  f"(append #sha256={got} to the URL to pin it)", file=sys.stderr)

    with response:
        return atomic_write(target, write)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt/.bin file, unpickling only tensors and plain containers."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file (UnpicklingError, RuntimeError, ...)
        raise WeightsError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}). Only plain state dicts are accepted; "
                           "pickled models are never loaded") from None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _recognise(state: dict[str, torch.Tensor], num_classes: int, fmt: str) -> ArchSpec:
    for spec in candidates():
        if matches(module_order(state, fmt), spec, num_classes):
            return spec
    raise WeightsError(f"these {fmt} weights match no preset at widths {COMMON_WIDTHS}; pass --arch")


def import_state_dict(state: dict[str, torch.Tensor], arch: ArchSpec | None, source: str,
                      resize: int | None = None) -> MobileNet | Segmenter:
    """Build the network and copy a torchvision, timm or bare mnv3 state dict into it (torchvision's
    LR-ASPP segmentation weights give a Segmenter, its SSDLite weights a Detector)."""
    if is_torchvision_lraspp(state):
        return import_torchvision_lraspp(state, arch, source)
    if is_torchvision_ssdlite(state):
        return import_torchvision_ssdlite(state, arch, source)
    try:
        fmt = detect_format(state)
    except ValueError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    num_classes = num_classes_of(module_order(state, fmt))
    if arch is None:
        if fmt == "timm":
            raise WeightsError(f"{source}: timm weights need --arch with the timm model name "
                               "(e.g. mobilenetv3_large_100 or tf_mobilenetv3_large_100): padding "
                               "and batch-norm eps cannot be read from the weights")
        arch = _recognise(state, num_classes, fmt)
    model = build(arch, num_classes)
    if fmt == "mnv3":
        load_weights(model, state, source)
    else:
        mapped, problems = map_state_dict(module_order(state, fmt), model)
        if problems:
            shown = "\n  ".join(problems[:20])
            raise WeightsError(f"{source}: the {fmt} weights do not fit {arch.name}:\n  {shown}\n"
                               "Pass the --arch these weights were trained with.")
        model.load_state_dict(mapped, strict=False)
    tf_trained = arch.padding == "same"
    mean, std = ((0.5,) * 3, (0.5,) * 3) if tf_trained else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    interpolation = "bicubic" if fmt == "timm" and not tf_trained else "bilinear"
    preprocess = Preprocess(resolution=arch.resolution,
                            resize=resize or round(arch.resolution / 0.875),
                            mean=mean, std=std, interpolation=interpolation)
    classes, names = imagenet_classes() if num_classes == 1000 else (None, None)
    set_meta(model, ModelMeta(classes=classes, class_names=names, preprocess=preprocess,
                              source=f"{fmt}:{source}"))
    return model.eval()


def load(source: str | Path, arch: str | ArchSpec | None = None, *, progress: bool = True) -> MobileNet:
    """Load any supported weights (see the module docstring) as an mnv3 model in eval mode."""
    spec = None if arch is None else resolve_arch(arch)
    source = str(source)
    resize = None
    if re.fullmatch(r"[a-z]+:[A-Za-z0-9_]+", source) and not Path(source).exists():
        url, resize, named_spec = resolve_named(source, spec)
        spec = spec or named_spec
        path = download(url, progress)
    elif re.match(r"^(https?|ftp|file)://", source):
        path = download(source, progress)
    else:
        path = Path(source)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file. Pass a model file, a state dict, a TFLite file, "
                           "a URL or a named set such as torchvision:IMAGENET1K_V2")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".tflite" or head[4:8] == b"TFL3":
        return load_tflite(path, spec)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        tensors, header = read_safetensors(path)
        if is_model_header(header):
            return load_model_file(path, tensors, header, spec)
        return import_state_dict(tensors, spec, str(path), resize)
    return import_state_dict(read_state_dict(path), spec, str(path), resize)
