"""The runtimes latency is measured on, behind one interface: PyTorch eager, ONNX Runtime (CPU) and
LiteRT (TFLite with XNNPACK, converted by litert-torch). Each turns a spec or a model into a
ready-to-call session itself; a runtime whose package is missing says how to install it."""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import platform
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mnv3.arch import ArchSpec
from mnv3.nn import MobileNet, build


class LatencyError(ValueError):
    """A latency request cannot be carried out as asked (unknown runtime, impossible thread count, ...)."""


class RuntimeUnavailable(LatencyError):
    """The runtime's package is not installed; the message names the install command."""


@dataclass(frozen=True)
class Environment:
    """Where a measurement was taken: every result carries it, and lookup tables are keyed by it."""

    cpu: str
    cores: int
    runtime: str
    runtime_version: str
    threads: int
    batch: int
    resolution: int
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        """One string naming this environment, for tables shared by several machines."""
        return (f"{self.cpu}|{self.cores}c|{self.runtime}-{self.runtime_version}|t{self.threads}"
                f"|b{self.batch}|r{self.resolution}|{self.dtype}")

    @classmethod
    def from_key(cls, key: str) -> Environment | None:
        """The environment `key()` names, or None for a string that is not one."""
        fields = key.rsplit("|", 6)
        if len(fields) != 7:
            return None
        cpu, cores, runtime, threads, batch, resolution, dtype = fields
        known = [n for n in RUNTIMES if runtime.startswith(n + "-")]      # "torch-fused-2.5.1"
        name = max(known, key=len) if known else runtime.partition("-")[0]
        version = runtime[len(name) + 1:]
        try:
            if not (cores.endswith("c") and threads[:1] == "t" and batch[:1] == "b" and resolution[:1] == "r"):
                return None
            return cls(cpu, int(cores[:-1]), name, version, int(threads[1:]), int(batch[1:]),
                       int(resolution[1:]), dtype)
        except ValueError:
            return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_threads(threads: int) -> int:
    cores = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise LatencyError(f"threads: {threads!r} is impossible on this machine; use 1 to {cores} "
                           "(1 is the paper's protocol)")
    return threads


def latency_model(spec_or_model: ArchSpec | nn.Module, batch: int = 1, num_classes: int = 1000) -> nn.Module:
    """A model whose activations look like a trained network's. Latency does not depend on the weight
    values, except through denormal numbers: an untrained network's activations shrink towards
    zero block after block, and some CPUs slow down on them. One forward pass in training mode on
    random images sets the batch-norm statistics so that every layer's output stays near unit scale."""
    if isinstance(spec_or_model, ArchSpec):
        res = spec_or_model.resolution
        # 16 images: at low resolution the last maps are 1x1, and fewer samples give wild statistics.
        return calibrate_batchnorm(build(spec_or_model, num_classes),
                                   (max(16, batch), spec_or_model.in_channels, res, res))
    return spec_or_model.eval()


def calibrate_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Batch-norm statistics from one forward pass in training mode on random images of
    `input_shape`, so that an untrained model's activations keep their scale (see latency_model)."""
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = None      # cumulative average: one batch sets the statistics
        model.train()(torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)))
    return model.eval()


def _example_input(model: nn.Module, batch: int, resolution: int | None,
                   input_shape: tuple[int, ...] | None) -> torch.Tensor:
    """The fixed input a session runs on: `input_shape` as given (a single block, say), else an
    image batch at `resolution` or the model's own."""
    if input_shape is not None:
        return torch.randn(*input_shape)
    if resolution is None and not isinstance(model, MobileNet):
        raise LatencyError("resolution: required for a model that carries no spec")
    channels = model.spec.in_channels if isinstance(model, MobileNet) else 3
    resolution = resolution or model.spec.resolution
    return torch.randn(batch, channels, resolution, resolution)


class Runtime:
    """One runtime: `session(...)` returns a function that runs one inference on a fixed input."""

    name = "?"
    package = "?"
    install = "?"

    def version(self) -> str:
        return getattr(importlib.import_module(self.package), "__version__", "unknown")

    def environment(self, threads: int, batch: int, resolution: int) -> Environment:
        return Environment(cpu_model(), os.cpu_count() or 1, self.name, self.version(), threads, batch,
                           resolution)

    def session(self, spec_or_model: ArchSpec | nn.Module, *, threads: int = 1, batch: int = 1,
                resolution: int | None = None, input_shape: tuple[int, ...] | None = None,
                num_classes: int = 1000) -> Callable[[], object]:
        """A callable that runs one inference. `num_classes` sizes the classifier of a spec (a
        module is run as it is)."""
        raise NotImplementedError


class TorchRuntime(Runtime):
    """PyTorch eager in inference mode; `fused=True` folds batch norm first."""

    package = "torch"
    install = "pip install torch"

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self.name = "torch-fused" if fused else "torch"

    def session(self, spec_or_model, *, threads=1, batch=1, resolution=None, input_shape=None, num_classes=1000):
        check_threads(threads)
        model = latency_model(spec_or_model, batch, num_classes)
        if self.fused and isinstance(model, MobileNet):
            model = copy.deepcopy(model).fuse()     # never change the caller's model
        x = _example_input(model, batch, resolution, input_shape)

        def run() -> object:
            torch.set_num_threads(threads)          # per call: sessions of other thread counts may exist
            with torch.inference_mode():
                return model(x)
        return run


class OnnxRuntime(Runtime):
    """ONNX Runtime, CPU execution provider, all graph optimisations, fixed intra-op threads."""

    name = package = "onnxruntime"
    install = "pip install onnxruntime onnx"

    def session(self, spec_or_model, *, threads=1, batch=1, resolution=None, input_shape=None, num_classes=1000):
        model = latency_model(spec_or_model, batch, num_classes)
        x = _example_input(model, batch, resolution, input_shape)
        with tempfile.TemporaryDirectory(prefix="mnv3-onnx-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, x, path)
            return self.session_from_onnx(path.read_bytes(), x.numpy(), threads)

    def session_from_onnx(self, onnx_bytes: bytes, x, threads: int = 1) -> Callable[[], object]:
        """A session on an ONNX model already exported (the lookup-table builder exports many blocks
        at once and cuts them apart)."""
        import numpy as np
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = check_threads(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}

        def run() -> object:
            return sess.run(None, feed)
        return run


NEEDS_LITERT_TORCH = "the litert runtime converts models with litert-torch: pip install litert-torch"


class LiteRtRuntime(Runtime):
    """TFLite through ai-edge-litert's interpreter (XNNPACK delegate), converted by litert-torch."""

    name = "litert"
    package = "ai_edge_litert"
    install = "pip install ai-edge-litert litert-torch"

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ai-edge-litert")
        except PackageNotFoundError:
            return "unknown"

    def session(self, spec_or_model, *, threads=1, batch=1, resolution=None, input_shape=None, num_classes=1000):
        from ai_edge_litert.interpreter import Interpreter

        check_threads(threads)
        if isinstance(spec_or_model, ArchSpec) and input_shape is None:
            # A spec converts the same way every time: keep its conversion (about 30 s) in the cache.
            path = self.converted(spec_or_model, batch, resolution, num_classes)
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            shape = interpreter.get_input_details()[0]["shape"]
            return self._ready(interpreter, torch.randn(*shape).numpy())
        model = latency_model(spec_or_model, batch, num_classes)
        x = _example_input(model, batch, resolution, input_shape)
        with tempfile.TemporaryDirectory(prefix="mnv3-litert-") as tmp:
            path = Path(tmp) / "model.tflite"
            export_tflite(model, x, path)
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
        return self._ready(interpreter, x.numpy())

    @staticmethod
    def converted(spec: ArchSpec, batch: int = 1, resolution: int | None = None, num_classes: int = 1000) -> Path:
        """The TFLite file litert-torch makes of `spec` (random weights, for timing) with a
        `num_classes` classifier, converted once and then kept in $MNV3_CACHE/litert under a name
        that hashes the spec, the input shape, the class count and the converter's version."""
        import hashlib
        from importlib.metadata import PackageNotFoundError, version

        from mnv3.files import atomic_write, cache_dir

        try:
            converter = version("litert-torch")
        except PackageNotFoundError:
            raise RuntimeUnavailable(NEEDS_LITERT_TORCH) from None
        resolution = resolution or spec.resolution
        classes = f"|n{num_classes}" if num_classes != 1000 else ""       # 1000: the names cached before
        digest = hashlib.sha256(f"{spec.to_json(None)}|b{batch}|r{resolution}{classes}|litert-torch-{converter}"
                                .encode()).hexdigest()[:16]
        path = cache_dir() / "litert" / f"{spec.name}-{digest}.tflite"
        if not path.is_file():
            model = latency_model(spec, batch, num_classes)
            atomic_write(path, lambda tmp: export_tflite(model, _example_input(model, batch, resolution, None), tmp))
        return path

    def session_from_tflite(self, data: bytes, threads: int = 1) -> Callable[[], object]:
        """A session on a TFLite graph given as bytes, fed random input of its own shape."""
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=data, num_threads=check_threads(threads))
        shape = interpreter.get_input_details()[0]["shape"]
        return self._ready(interpreter, np.random.default_rng(0).standard_normal(shape).astype(np.float32))

    @staticmethod
    def _ready(interpreter, x) -> Callable[[], object]:
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)

        def run() -> object:
            interpreter.invoke()
        return run


def export_onnx(model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
                input_names: list[str] | None = None, output_names: list[str] | None = None) -> Path:
    """ONNX file of `model` at the input shape(s) of `x` (TorchScript exporter: fast and lean graphs;
    the dynamo exporter when that one is gone)."""
    args = x if isinstance(x, tuple) else (x,)
    names = {"input_names": input_names, "output_names": output_names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, **names)
        except (TypeError, ImportError):     # the TorchScript exporter is gone from this torch
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, **names)
    return path


def export_tflite(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    try:
        import litert_torch
    except ImportError:
        raise RuntimeUnavailable(NEEDS_LITERT_TORCH) from None
    # litert-torch reports its conversion stages on stdout; keep our command's output clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        litert_torch.convert(model.eval(), (x,)).export(str(path))
    return path


RUNTIMES: dict[str, Callable[[], Runtime]] = {
    "torch": TorchRuntime,
    "torch-fused": lambda: TorchRuntime(fused=True),
    "onnxruntime": OnnxRuntime,
    "litert": LiteRtRuntime,
}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`, checked to be installed."""
    if name not in RUNTIMES:
        raise LatencyError(f"unknown runtime {name!r}; expected one of {sorted(RUNTIMES)}")
    runtime = RUNTIMES[name]()
    try:
        importlib.import_module(runtime.package)
    except ImportError:
        raise RuntimeUnavailable(f"runtime {name!r} needs the {runtime.package} package: "
                                 f"{runtime.install}") from None
    return runtime
