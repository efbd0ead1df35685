"""Verified export of any mnv3 model (classifier, segmentation, detection) to ONNX, TFLite, PT2
(`torch.export`) or TorchScript.

Every export folds batch norm into the convolutions first (the backbone's own `fuse`, and every
Conv2d -> BatchNorm2d pair of the heads), writes the file atomically with the model's description
in the file's metadata where the format has a place for it (ONNX `metadata_props`, a TFLite
metadata buffer named "mnv3", PT2 and TorchScript extra files "mnv3.json": the spec, the head, the
classes and the preprocessing), and then **verifies** it: the exported file is loaded by its own
runtime (ONNX Runtime, LiteRT, `torch.export.load`, `torch.jit.load`), run on real images prepared
with the model's preprocessing, and compared with the eager model; a difference above the
tolerance is an error and the file is removed. A dynamic batch is verified at a batch other than
the one it was traced with. The network's output is exported as it is: a detector's raw box
offsets and class logits (post-processing stays outside, see `mnv3.nn.ssdlite.postprocess`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMATS = ("onnx", "tflite", "pt2", "torchscript")
SUFFIXES = {".onnx": "onnx", ".tflite": "tflite", ".pt2": "pt2", ".pt": "torchscript", ".torchscript": "torchscript"}
EXPORT_FORMAT = "mnv3.export/1"


class ExportError(ValueError):
    """An export that cannot be made or does not verify; the message says why and what to do."""


@dataclass
class ExportReport:
    path: Path
    format: str
    batch: int | str
    input_shape: list[int]
    output_shape: list[int]
    images: int
    max_abs_diff: float
    max_abs_output: float
    tolerance: float
    metadata: bool
    verified_batches: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "batch": self.batch, "input_shape": self.input_shape,
                "output_shape": self.output_shape, "images": self.images, "max_abs_diff": self.max_abs_diff,
                "max_abs_output": self.max_abs_output, "tolerance": self.tolerance, "metadata": self.metadata,
                "verified_batches": self.verified_batches}


def format_of(path: str | Path, fmt: str | None) -> str:
    """`fmt`, or the format the file name's suffix stands for."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt}: unknown; expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"{path}: cannot tell the format from the suffix {suffix or '(none)'}; pass --format "
                          f"({', '.join(FORMATS)}) or name the file .onnx, .tflite, .pt2 or .pt")
    return SUFFIXES[suffix]


# -- the model as exported -----------------------------------------------------------------------------
@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every batch norm folded into the convolution before it."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "backbone") and hasattr(model.backbone, "fuse"):
        model.backbone.fuse()
    elif hasattr(model, "fuse"):
        model.fuse()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    if left:
        raise ExportError(f"{left} batch-norm layer(s) could not be folded (not after a convolution)")
    return model


DEPTHWISE_MULTIPLE = 16     # ONNX Runtime's int8 depthwise kernel is fast for multiples of 16 channels


def _grown(conv: nn.Conv2d, out: int = 0, inp: int = 0) -> nn.Conv2d:
    """`conv` with `out` more output and `inp` more input channels, all of whose weights are zero
    (a depthwise conv grows by `out` groups)."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    cin, cout = conv.in_channels + (out if depthwise else inp), conv.out_channels + out
    grown = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, dilation=conv.dilation,
                      groups=cout if depthwise else conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[:conv.out_channels, :conv.weight.shape[1]] = conv.weight
        if conv.bias is not None:
            grown.bias.zero_()
            grown.bias[:conv.out_channels] = conv.bias
    return grown


def pad_depthwise(model: nn.Module, multiple: int = DEPTHWISE_MULTIPLE) -> int:
    """Round the expansion width of every block of a batch-norm-folded classifier up to a multiple
    of `multiple`, in place, with channels that are zero throughout: the expansion conv gets zero
    filters (hard-swish and ReLU of 0 are 0), the depthwise conv zero filters, SE's reduce conv
    zero weights on them (its expand conv gives them a gate that multiplies 0), and the projection
    zero weights on them, so the network computes exactly what it did. ONNX Runtime's int8
    depthwise convolution (MLAS) is 1.5-4.6x slower per channel at 72, 88 or 120 channels than at 64,
    80, 96 or 128 (AMD EPYC with AVX-512 VNNI, one thread), and MobileNetV3-Small's expansions are
    72, 88 and 120 wide. Blocks without an expansion conv (their width is the residual's) are left
    alone. Returns how many blocks were padded."""
    from mnv3.nn.layers import InvertedResidual

    count = 0
    for block in model.modules():
        if not isinstance(block, InvertedResidual) or block.expand is None or block.expand.bn is not None:
            continue
        extra = -block.dw.conv.in_channels % multiple
        if not extra:
            continue
        block.expand.conv = _grown(block.expand.conv, out=extra)
        block.dw.conv = _grown(block.dw.conv, out=extra)
        if block.se is not None:
            block.se.reduce = _grown(block.se.reduce, inp=extra)
            block.se.expand = _grown(block.se.expand, out=extra)
        block.project.conv = _grown(block.project.conv, inp=extra)
        count += 1
    return count


def input_size(model) -> tuple[int, int]:
    head = getattr(model, "head_spec", None)
    if head is not None:
        return tuple(head.resolution)
    return model.spec.resolution, model.spec.resolution


def description(model) -> dict:
    """What the exported file records about the model (JSON-ready)."""
    from mnv3.weights import model_meta

    head = getattr(model, "head_spec", None)
    meta = model_meta(model)
    h, w = input_size(model)
    return {"format": EXPORT_FORMAT, "task": head.task if head is not None else "classify",
            "spec": json.loads(model.spec.to_json(indent=None)),
            "head": head.to_dict() if head is not None else None, "num_classes": model.num_classes,
            "meta": json.loads(meta.to_json()),
            "input": {"layout": "NCHW", "height": h, "width": w, "dtype": "float32",
                      "pixels": "RGB / 255, minus mean, divided by std (meta.preprocess)"}}


# -- verification images -------------------------------------------------------------------------------
def verification_batch(model, images: str | Path | None, count: int, flag: str = "--images") -> torch.Tensor:
    """`count` real images prepared as the model expects: from the folder `images` (its image files,
    sorted), or scikit-learn's handwritten digits (offline) when None."""
    from PIL import Image

    from mnv3.weights import model_meta

    pre = model_meta(model).preprocess
    h, w = input_size(model)
    if images is None:
        from sklearn.datasets import load_digits

        digits = load_digits().images[:count]
        pictures = [Image.fromarray((d * 255 / 16).astype(np.uint8)).convert("RGB") for d in digits]
    else:
        from mnv3.data.images import IMAGE_SUFFIXES, load_image

        folder = Path(images)
        if not folder.is_dir():
            raise ExportError(f"{flag} {folder}: no such folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ExportError(f"{flag} {folder}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)})")
        pictures = [load_image(p) for p in files[:count]]
    while len(pictures) < count:
        pictures = pictures + pictures
    pixels = np.stack([np.asarray(p.resize((w, h), Image.BILINEAR), dtype=np.float32) for p in pictures[:count]])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).div_(255.0)
    return (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)


# -- writers and runners per format ---------------------------------------------------------------------
def _write_onnx(model, x, tmp: Path, dynamic: bool, info: dict) -> None:
    import onnx

    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes=axes)
        except (TypeError, ImportError):
            shapes = ({"x": {0: torch.export.Dim("batch", min=1, max=1024)}},) if dynamic else None
            torch.onnx.export(model, (x,), str(tmp), dynamo=True, external_data=False, input_names=["input"],
                              output_names=["output"], dynamic_shapes=shapes)
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mnv3", json.dumps(info)
    onnx.save(proto, str(tmp))


def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _write_tflite(model, x, tmp: Path, dynamic: bool, info: dict) -> None:
    from mnv3.latency.runtimes import export_tflite

    if dynamic:
        raise ExportError("--dynamic-batch: the TFLite export has a fixed batch; pass --batch N instead")
    export_tflite(model, x, tmp)
    add_tflite_metadata(tmp, "mnv3", json.dumps(info).encode())


def add_tflite_metadata(path: Path, name: str, data: bytes) -> None:
    """Add a metadata entry (a named buffer) to a TFLite flatbuffer, in place."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers = list(model.buffers or []) + [buffer]
    entry = schema.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != name.encode()] + [entry]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def read_tflite_metadata(path: str | Path, name: str = "mnv3") -> bytes | None:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(Path(path).read_bytes()), 0)
    for entry in model.metadata or []:
        if entry.name in (name, name.encode()):
            return bytes(np.asarray(model.buffers[entry.buffer].data, dtype=np.uint8))
    return None


def _run_tflite(path: Path, x: torch.Tensor) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    from mnv3.deploy.tflite_int8 import dequantize_output, io_quantization, quantize_input

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    if list(detail["shape"]) != list(x.shape):
        raise ExportError(f"{path}: the TFLite input is {list(detail['shape'])}, not NCHW {list(x.shape)}")
    qin, qout = io_quantization(interpreter)        # an int8 file takes and gives int8
    interpreter.set_tensor(detail["index"], quantize_input(x.numpy(), qin, detail["dtype"]))
    interpreter.invoke()
    return dequantize_output(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), qout)


def _write_pt2(model, x, tmp: Path, dynamic: bool, info: dict) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    torch.export.save(program, str(tmp), extra_files={"mnv3.json": json.dumps(info)})


def _run_pt2(path: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.export.load(str(path)).module()(x).numpy()


def _write_torchscript(model, x, tmp: Path, dynamic: bool, info: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # torch.jit.save's deprecation notice
        torch.jit.save(traced, str(tmp), _extra_files={"mnv3.json": json.dumps(info)})


def _run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")             # torch.jit.load's deprecation notice
        return torch.jit.load(str(path))(x).numpy()


WRITERS = {"onnx": (_write_onnx, _run_onnx), "tflite": (_write_tflite, _run_tflite),
           "pt2": (_write_pt2, _run_pt2), "torchscript": (_write_torchscript, _run_torchscript)}


# -- export ---------------------------------------------------------------------------------------------
def export(model, path: str | Path, fmt: str | None = None, *, batch: int = 1, dynamic: bool = False,
           images: str | Path | None = None, tolerance: float | None = None, force: bool = False,
           int8: bool = False, calibration: str | Path | None = None, calibration_images: int = 64,
           int8_stem: bool = False) -> ExportReport:
    """Export `model` to `path` (format from `fmt` or the suffix) and verify it (see the module doc).
    `tolerance` is relative to the largest eager output: the file fails when max |file - eager| >
    tolerance x max(1, max |eager|) (default 1e-3; 0.25 for int8). `int8` (ONNX and TFLite):
    static post-training quantization, see `quantize_onnx` and `tflite_int8.quantize_tflite`; the stem
    (and block 0 when it has no expansion, `float_scope`) stays float unless `int8_stem`."""
    from mnv3.files import atomic_write

    fmt = format_of(path, fmt)
    tolerance = (0.25 if int8 else 1e-3) if tolerance is None else tolerance
    if int8 and fmt not in ("onnx", "tflite"):
        raise ExportError(f"--int8 --format {fmt}: int8 export is for ONNX Runtime and LiteRT; use -o FILE.onnx "
                          "or FILE.tflite")
    path = Path(path)
    if path.exists() and not force:
        raise ExportError(f"{path} exists; pass --force to overwrite it")
    if batch < 1:
        raise ExportError(f"--batch: expected at least 1, got {batch}")
    if not tolerance >= 0:
        raise ExportError(f"--tolerance: expected a number >= 0, got {tolerance}")
    write, run = WRITERS[fmt]
    if fmt == "tflite" and dynamic:
        raise ExportError("--dynamic-batch: the TFLite export has a fixed batch; pass --batch N instead")
    images_flag = "--images"
    if int8 and images is None:
        images, images_flag = calibration, "--calibration"     # checked on the kind of images it was calibrated for
    folded = fold_batchnorm(model)
    info = description(model)
    info["input"]["batch"] = "dynamic" if dynamic else batch
    trace_batch = 2 if dynamic else batch
    x = verification_batch(model, images, max(trace_batch, 3 if dynamic else batch), images_flag)
    if int8:
        net = getattr(model, "backbone", model)
        block0 = not int8_stem and getattr(getattr(net, "blocks", [None])[0], "expand", 1) is None
        stem = "stem int8, int8 input" if int8_stem else (
            "stem (first convolution and activation) " + ("and block 0 (no expansion) " if block0 else "")
            + "float, float input")
        pad = fmt == "onnx" and not hasattr(model, "backbone")     # a dense head may tap an expansion
        padded = "; expansions padded to multiples of 16 channels" if pad else ""
        scheme = (f"static QDQ, activations uint8 per tensor, weights int8 per channel; {stem}; hard-swish "
                  f"gates as one table lookup (QLinearLeakyRelu){padded}" if fmt == "onnx" else
                  "static, AI Edge quantizer: activations int8 per tensor, weights int8 per channel, int8 output; "
                  f"{stem}; hard-swish as MUL, ADD, MUL (all delegated to XNNPACK)")
        info["int8"] = {"scheme": scheme, "calibration": str(calibration or "digits"),
                        "calibration_images": calibration_images, "stem": "int8" if int8_stem else "float",
                        "block0": "float" if block0 else "int8"}
        calib = verification_batch(model, calibration, calibration_images, "--calibration")

        def write_int8(tmp: Path) -> None:
            if fmt == "onnx":
                if pad:
                    pad_depthwise(folded)
                write(folded, x[:trace_batch], tmp, dynamic, info)
                quantize_onnx(tmp, calib, float_stem=not int8_stem)
                return
            from mnv3.deploy.tflite_int8 import quantize_tflite
            from mnv3.latency.runtimes import export_tflite

            export_tflite(folded, x[:trace_batch], tmp)
            quantize_tflite(tmp, calib.numpy(), float_stem=not int8_stem)
            add_tflite_metadata(tmp, "mnv3", json.dumps(info).encode())
        atomic_write(path, write_int8)
    else:
        atomic_write(path, lambda tmp: write(folded, x[:trace_batch], tmp, dynamic, info))
    batches = [1, 3] if dynamic else [batch]
    worst, scale = 0.0, 0.0
    try:
        with torch.no_grad():
            for b in batches:
                eager = model.eval()(x[:b]).numpy()
                got = run(path, x[:b])
                if got.shape != eager.shape:
                    raise ExportError(f"{path}: output shape {list(got.shape)} at batch {b}, eager {list(eager.shape)}")
                worst = max(worst, float(np.abs(got - eager).max()))
                scale = max(scale, float(np.abs(eager).max()))
        if not worst <= tolerance * max(1.0, scale):
            raise ExportError(f"{path}: verification failed: max |{fmt} - eager| = {worst:.3g} on "
                              f"{max(batches)} real image(s), above {tolerance:g} x {max(1.0, scale):.3g}; the "
                              "file was removed")
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return ExportReport(path, fmt, "dynamic" if dynamic else batch, list(x[:trace_batch].shape),
                        list(eager.shape), max(batches), worst, scale, tolerance, True, batches)


# -- int8 ---------------------------------------------------------------------------------------------
STEM = re.compile(r"(^|/)stem/")    # the stem's nodes in torch's ONNX names (/stem/conv/Conv)
FIRST_BLOCK = re.compile(r"(^|/)blocks\.0/")   # block 0's (/blocks/blocks.0/dw/conv/Conv, /blocks/blocks.0/Add)


def float_scope(names: list[str], float_stem: bool = True) -> re.Pattern | None:
    """Which nodes of a float ONNX graph stay float in its int8 file: none (`float_stem` off), the
    stem, and with it block 0 when block 0 has no expansion (MobileNetV3-Large's and -Small's, and
    MobileNetV2's): a depthwise convolution on 16 channels at the stem's resolution, where the int8
    kernels of both runtimes are slower than float (measured on a 2-core Xeon with AVX-512 VNNI and
    AMX, `bench/int8.py`: ONNX Runtime V3-Small 0.91x float with block 0 int8, 0.83x with it float;
    Large 0.73x and 0.69x; keeping block 1 float as well was slower again, 0.885x)."""
    if not float_stem:
        return None
    first = [n for n in names if FIRST_BLOCK.search(n)]
    if first and not any(re.search(r"(^|/)blocks\.0/expand/", n) for n in first):
        return re.compile(r"(^|/)(stem|blocks\.0)/")
    return STEM


def quantize_onnx(path: Path, calibration: torch.Tensor, float_stem: bool = True, lookup: bool = True) -> None:
    """Static post-training quantization of the float ONNX file at `path`, in place: ONNX Runtime's
    QDQ format, activations uint8 with one scale per tensor from min/max over the calibration
    images, weights int8 with one scale per output channel (per-tensor weight scales lose most of
    MobileNet's accuracy: its depthwise filters differ in range by orders of magnitude). U8S8 is ONNX
    Runtime's fast path on x86 (S8S8 falls back to slow kernels on AVX2). Ops without an int8 kernel
    are rewritten first (`integer_friendly`), the hard-swish gates after (`lookup_gates`).

    The stem (the first convolution and its hard-swish) stays float: the int8 convolution kernels of
    ONNX Runtime and XNNPACK handle its 3 input channels poorly (measured, not explained: on
    MobileNetV3-Small at 224 the int8 stem took 2.1x (ONNX Runtime) and 2.4x (LiteRT) the float
    one's time, `bench/int8_profile.py`); float pixels also keep their precision. Block 0 stays
    float with it when it has no expansion (`float_scope`)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = calibration.numpy()
    original = onnx.load(str(path))
    name = original.graph.input[0].name
    metadata = list(original.metadata_props)
    scope = float_scope([n.name for n in original.graph.node], float_stem)
    stem_nodes = [n for n in original.graph.node if scope.search(n.name)] if scope else []
    stem = [n.name for n in stem_nodes]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(data):
                return None
            self.i += 1
            return {name: data[self.i - 1:self.i]}

    with tempfile.TemporaryDirectory(prefix="mnv3-int8-") as tmp:
        rewritten = Path(tmp) / "rewritten.onnx"
        proto = copy.deepcopy(original)
        integer_friendly(proto, keep=set(stem))
        onnx.save(proto, str(rewritten))
        path_in, path = path, rewritten
        source = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                quant_pre_process(str(path), str(source))     # shape inference and graph clean-up
            except Exception:                                   # noqa: BLE001 - optional step: quantize as is
                source = path
            folded = onnx.load(str(source))
            if fold_pads(folded):
                source = Path(tmp) / "folded.onnx"
                onnx.save(folded, str(source))
            quantize_static(str(source), str(Path(tmp) / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=stem)
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
    if stem:        # the float part's output: that of its last node (/stem/act/HardSwish, /blocks/blocks.0/Add)
        source = copy.deepcopy(original)
        fold_pads(source)       # TensorFlow's "same" padding folded into the float part's convs too
        restore_float_stem(proto, source, stem_nodes[-1].output[0])
    if lookup:
        lookup_gates(proto)
    del proto.metadata_props[:]
    proto.metadata_props.extend(metadata)
    onnx.save(proto, str(path_in))


def _constants(proto):
    """A function giving the value of a tensor of `proto` that does not depend on the input's values
    (None for one that does): an initializer, or one computed from constants and from static shapes
    (a Shape of a tensor whose shape shape inference fixes), evaluated by ONNX's reference runtime;
    and the set of ids of the nodes such evaluations went through. torch's exporter writes
    TensorFlow's "same" padding as pads computed in the graph from the input's shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = proto.graph
    init = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    order = {id(n): k for k, n in enumerate(g.node)}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:                       # noqa: BLE001 - no static shapes: constants alone
        inferred = g
    shapes = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.HasField("shape") and None not in dims:
            shapes[vi.name] = dims
    computed: set[int] = set()

    def constant(name: str):
        if not name:
            return None
        if name in init:
            return numpy_helper.to_array(init[name])
        nodes, fixed, todo, seen = [], [], [name], set()
        while todo:
            n = producer.get(todo.pop())
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Shape" and n.input[0] in shapes:
                attrs = {a.name: a.i for a in n.attribute}
                dims = shapes[n.input[0]][attrs.get("start", 0):attrs.get("end", None)]
                fixed.append(helper.make_node("Constant", [], [n.output[0]], value=numpy_helper.from_array(
                    np.array(dims, dtype=np.int64), n.output[0])))
                nodes.append(n)
                continue
            if any(i and i not in init and i not in producer for i in n.input):     # a graph input
                return None
            nodes.append(n)
            todo.extend(n.input)
        chain = fixed + sorted((n for n in nodes if n.op_type != "Shape" or n.input[0] not in shapes),
                               key=lambda n: order[id(n)])
        used = {i for n in chain for i in n.input if i in init}
        model = helper.make_model(helper.make_graph(
            chain, "constant", [], [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)],
            initializer=[init[i] for i in used]), opset_imports=proto.opset_import)
        try:
            value = ReferenceEvaluator(model).run(None, {})[0]
        except Exception:                          # noqa: BLE001 - not foldable: left as it is
            return None
        computed.update(id(n) for n in nodes)
        return value

    return constant, computed


def fold_pads(proto) -> int:
    """Fold, in place, each zero constant Pad of the height and width whose one reader is a Conv
    into that Conv's own pads: the same function. TensorFlow's "same" padding of a strided conv is
    asymmetric, so the authors' networks (imported with `same=True`) export it as a Pad before the
    conv; left alone, ONNX Runtime has no int8 Pad and each one became a float island behind a
    dequantize/quantize pair (5 in V3-Large-minimalistic). The pads must be constants: initializers, as
    the quantizer's pre-processing leaves them, or computed from constants and static shapes, as
    torch's exporter writes them (`_constants`; for the float part the int8 file keeps,
    `restore_float_stem`); the nodes that computed them are removed once nothing reads them. Returns
    how many were folded. Folding goes round by round: a Pad whose amounts come from the shape of a
    tensor behind an earlier Pad becomes computable once that one is folded."""
    total = 0
    while True:
        folded = _fold_pads_once(proto)
        total += folded
        if not folded:
            return total


def _fold_pads_once(proto) -> int:
    """One round of `fold_pads`: every Pad foldable now."""
    from onnx import helper

    g = proto.graph
    if not any(n.op_type == "Pad" for n in g.node):
        return 0            # nothing to fold: no shape inference
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    constant, computed = _constants(proto)

    drop = set()
    for pad in g.node:
        amounts = constant(pad.input[1]) if pad.op_type == "Pad" and len(pad.input) >= 2 else None
        if amounts is None:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        fill_name = pad.input[2] if len(pad.input) > 2 else ""
        fill = constant(fill_name) if fill_name else None
        users = readers.get(pad.output[0], [])
        if mode != b"constant" or (fill_name and (fill is None or fill.any())) \
                or len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        amounts = amounts.astype(int).tolist()
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if len(amounts) != 8 or any(amounts[i] for i in (0, 1, 4, 5)) or min(amounts) < 0 \
                or attrs.get("auto_pad", helper.make_attribute("auto_pad", "NOTSET")).s not in (b"NOTSET", b""):
            continue
        before = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        pads = [before[0] + amounts[2], before[1] + amounts[3], before[2] + amounts[6], before[3] + amounts[7]]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", pads)])
        conv.input[0] = pad.input[0]
        drop.add(id(pad))
    folded = len(drop)
    while True:         # the nodes that computed the folded pads' amounts, now read by nothing
        read = {i for n in g.node if id(n) not in drop for i in n.input} | {o.name for o in g.output}
        dead = {id(n) for n in g.node if id(n) not in drop and id(n) in computed
                and not any(o in read for o in n.output)}
        if not dead:
            break
        drop |= dead
    nodes = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(nodes)
    if folded:          # and the constants only they read (ONNX Runtime warns of each one left)
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        kept = [i for i in g.initializer if i.name in read]
        del g.initializer[:]
        g.initializer.extend(kept)
    return folded


def _ancestors(graph, tensor: str) -> list:
    """The nodes that `tensor` is computed from, back to the graph's inputs and constants, in graph order."""
    producer = {o: n for n in graph.node for o in n.output}
    wanted, todo = set(), [tensor]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in wanted:
            wanted.add(id(n))
            todo.extend(n.input)
    return [n for n in graph.node if id(n) in wanted]


def restore_float_stem(proto, original, output: str) -> int:
    """Put the float model's own stem back into the quantized graph `proto`, in place: every node
    that computes the stem's `output` (the first convolution and its hard-swish, and block 0 when it
    stays float too, `float_scope`) is replaced by the float graph's nodes and constants, renamed so that nothing is shared with the quantized blocks,
    and `output` keeps the QuantizeLinear that feeds the first block. Left to the quantizer, the
    float stem was not float: its hard-swish reaches the quantizer as an inlined HardSigmoid and Mul
    with new names that no exclusion list matched, so the tensors inside the stem got quantize and
    dequantize pairs, and a bias constant the exporter shares with another convolution (equal
    values are stored once) reached the stem through a DequantizeLinear. ONNX Runtime then ran the
    stem as a plain NCHW convolution plus four ops (0.39 ms on MobileNetV3-Small at 224, AMD EPYC)
    where the float model fuses convolution and hard-swish into one NCHWc kernel (0.14 ms).
    Returns how many quantized nodes were removed."""
    from onnx import numpy_helper

    g = proto.graph
    removed = _ancestors(g, output)
    kept = [n for n in g.node if id(n) not in {id(r) for r in removed}]
    still_read = {i for n in kept for i in n.input} | {o.name for o in g.output}
    # what the blocks still read of the stem's nodes (a dequantized constant shared with a block) stays
    shared = {id(a) for n in removed for o in n.output if o in still_read and o != output
              for a in _ancestors(g, o)}
    saved = [n for n in removed if id(n) in shared]
    constants = {i.name: i for i in original.graph.initializer}
    inputs = {i.name for i in original.graph.input}
    stem = copy.deepcopy(_ancestors(original.graph, output))
    rename = {}
    for n in stem:
        for i in n.input:
            if i in constants and i not in rename:
                rename[i] = f"mnv3_float_stem/{i}"
                array = numpy_helper.to_array(constants[i])
                g.initializer.append(numpy_helper.from_array(array, rename[i]))
        for o in n.output:
            if o != output:
                rename[o] = f"mnv3_float_stem/{o}"
    for n in stem:
        n.input[:] = [rename.get(i, i) if i not in inputs else i for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
        n.name = f"mnv3_float_stem/{n.name or n.output[0]}"
    del g.node[:]
    g.node.extend(stem + saved + kept)
    used = {i for n in g.node for i in n.input}
    initializers = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(initializers)
    return len(removed) - len(saved)


def integer_friendly(proto, keep: set[str] = frozenset()) -> int:
    """Rewrite, in place, the float ops ONNX Runtime has no int8 kernel for into ones it has, so that
    they stay in the integer graph after QDQ fusion: HardSigmoid(x) (the SE gates and hard-swish, as
    torch exports them) as Clip(Add(Mul(x, alpha), beta), 0, 1), which becomes QLinearMul and
    QLinearAdd with the clip folded into the output range; HardSwish(x) likewise times x; and the SE
    pooling ReduceMean over H, W (keepdims) as GlobalAveragePool (QLinearGlobalAveragePool).
    Nodes named in `keep` stay as they are. Returns how many nodes were rewritten."""
    from onnx import helper, numpy_helper

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return list(a.ints) if a.type == a.INTS else (a.f if a.type == a.FLOAT else a.i)
        return default

    graph, nodes, count = proto.graph, [], 0
    for n in graph.node:
        if n.name in keep:
            nodes.append(n)
        elif n.op_type in ("HardSigmoid", "HardSwish"):
            count += 1
            pre = f"mnv3_hs{count}"
            alpha = attr(n, "alpha", 0.2 if n.op_type == "HardSigmoid" else 1 / 6)
            beta = attr(n, "beta", 0.5)
            for name, value in (("alpha", alpha), ("beta", beta), ("lo", 0.0), ("hi", 1.0)):
                graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), f"{pre}_{name}"))
            gate = n.output[0] if n.op_type == "HardSigmoid" else f"{pre}_gate"
            nodes += [helper.make_node("Mul", [n.input[0], f"{pre}_alpha"], [f"{pre}_scaled"], name=f"{n.name}/scale"),
                      helper.make_node("Add", [f"{pre}_scaled", f"{pre}_beta"], [f"{pre}_shifted"],
                                       name=f"{n.name}/shift"),
                      helper.make_node("Clip", [f"{pre}_shifted", f"{pre}_lo", f"{pre}_hi"], [gate],
                                       name=f"{n.name}/clip")]
            if n.op_type == "HardSwish":
                nodes.append(helper.make_node("Mul", [n.input[0], gate], [n.output[0]], name=f"{n.name}/times"))
        elif (n.op_type == "ReduceMean" and attr(n, "keepdims", 1) == 1 and attr(n, "axes", []) == [2, 3]
              and len(n.input) == 1):
            count += 1
            nodes.append(helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]]))
        else:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def lookup_gates(proto) -> int:
    """Rewrite, in place, each quantized hard-sigmoid `integer_friendly` left as Mul(x, alpha), Add(beta)
    (clip in the output range) into one table lookup: a QLinearLeakyRelu with slope 1 (ONNX Runtime
    runs it as a 256-entry table) that requantizes x to the scale s / alpha and zero point
    z + beta / s, read by the next op at scale s and zero point z. That integer is alpha * x + beta at
    scale s, saturated to the gate's range [0, 1] by the integer type: the hard-sigmoid, in one pass
    over the tensor instead of two (QLinearMul and QLinearAdd). s is 1/255, the type's whole range;
    beta / s is rounded to a whole step (for beta = 1/2 the gate is half a step, 0.002, high before
    it saturates). The graph stays a valid float graph (a quantize and dequantize pair with different
    parameters). Hard-sigmoids whose multiply was folded into a convolution (the SE gates) are left
    as they are: their Add runs on one value per channel. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    g = proto.graph
    init = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def constant(name: str) -> float | None:
        n = producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in init:
            q = numpy_helper.to_array(init[n.input[0]]).astype(np.float64)
            scale = numpy_helper.to_array(init[n.input[1]]).astype(np.float64)
            zero = numpy_helper.to_array(init[n.input[2]]).astype(np.float64) if len(n.input) > 2 else 0.0
            value = (q - zero) * scale
        elif name in init:
            value = numpy_helper.to_array(init[name]).astype(np.float64)
        else:
            return None
        return float(value) if value.size == 1 else None

    def only_user(name: str, op: str):
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    drop: set[int] = set()
    before: dict[int, list] = {}
    count = 0
    for add in g.node:
        if add.op_type != "Add" or (beta := constant(add.input[1])) is None:
            continue
        dq = producer.get(add.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        mul = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        if mul is None or mul.op_type != "Mul" or (alpha := constant(mul.input[1])) is None or alpha <= 0:
            continue
        out_q = only_user(add.output[0], "QuantizeLinear")
        if not (out_q and only_user(mul.output[0], "QuantizeLinear") and only_user(q.output[0], "DequantizeLinear")
                and only_user(dq.output[0], "Add")):
            continue
        readers = users.get(out_q.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers) or len(out_q.input) < 3:
            continue
        dtype = numpy_helper.to_array(init[out_q.input[2]]).dtype
        lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
        steps = hi - lo                         # the gate's [0, 1] over the type's whole range
        count += 1
        pre = f"mnv3_gate{count}"
        scale, zero = 1.0 / steps, lo           # the gate: scale * (q - zero), q in [lo, hi]
        g.initializer.extend([
            numpy_helper.from_array(np.array(scale / alpha, np.float32), f"{pre}_in_scale"),
            numpy_helper.from_array(np.array(zero + round(beta * steps), dtype), f"{pre}_in_zero"),
            numpy_helper.from_array(np.array(scale, np.float32), f"{pre}_scale"),
            numpy_helper.from_array(np.array(zero, dtype), f"{pre}_zero")])
        before[id(mul)] = [
            helper.make_node("LeakyRelu", [mul.input[0]], [f"{pre}_x"], alpha=1.0, name=f"{pre}/requantize"),
            helper.make_node("QuantizeLinear", [f"{pre}_x", f"{pre}_in_scale", f"{pre}_in_zero"],
                             [out_q.output[0]], name=f"{pre}/quantize")]
        for r in readers:
            r.input[1], r.input[2] = f"{pre}_scale", f"{pre}_zero"
        drop.update(id(n) for n in (mul, q, dq, add, out_q))
    nodes = []
    for n in g.node:
        nodes += before.get(id(n), [])
        if id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return count


INTEGER_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "QAttention", "QEmbed")


def op_report(path: str | Path) -> dict:
    """What ONNX Runtime runs in integer and what in float: the graph after its own optimisations
    (the QDQ fusions that turn DequantizeLinear -> op -> QuantizeLinear into QLinearConv, QLinearMul,
    ...), counted per op type. An op left between a DequantizeLinear and a QuantizeLinear has no
    integer kernel (HardSigmoid, ReduceMean in MobileNetV3): it runs in float, and each such island
    costs a dequantize/quantize pair."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mnv3-ops-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    integer: dict[str, int] = {}
    other: dict[str, int] = {}
    where: dict[str, dict[str, int]] = {"before": {}, "inside": {}, "after": {}}
    q = dq = 0
    nodes = list(graph.node)
    for n, side in zip(nodes, _float_sides(nodes)):
        if n.op_type == "QuantizeLinear":
            q += 1
        elif n.op_type == "DequantizeLinear":
            dq += 1
        else:
            table = integer if n.op_type.startswith(INTEGER_OPS) else other
            table[n.op_type] = table.get(n.op_type, 0) + 1
            if table is other:
                place = where[side]
                place[n.op_type] = place.get(n.op_type, 0) + 1
    return {"integer": integer, "float": other, "float_before_int8": where["before"],
            "float_inside_int8": where["inside"], "float_after_int8": where["after"], "quantize": q, "dequantize": dq}


def _float_sides(nodes: list) -> list[str]:
    """Where each of `nodes` (a graph's, in order) sits against the integer graph: `before` it (no
    QuantizeLinear upstream: the float input side, the stem when it stays float), `after` it (no
    QuantizeLinear downstream), or `inside` (a float island between a dequantize and a quantize,
    paying for both). ONNX keeps nodes in topological order, so one pass each way decides it."""
    quantized: set[str] = set()          # tensors with a QuantizeLinear upstream (or made by one)
    upstream = []
    for n in nodes:
        upstream.append(any(t in quantized for t in n.input))
        if upstream[-1] or n.op_type == "QuantizeLinear":
            quantized.update(n.output)
    feeds: set[str] = set()              # tensors read by a QuantizeLinear, directly or further down
    downstream = [False] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        n = nodes[i]
        downstream[i] = any(t in feeds for t in n.output)
        if downstream[i] or n.op_type == "QuantizeLinear":
            feeds.update(n.input)
    return ["before" if not up else "after" if not down else "inside" for up, down in zip(upstream, downstream)]


def read_metadata(path: str | Path) -> dict | None:
    """The mnv3 description an exported file carries (see `description`), or None."""
    path = Path(path)
    fmt = format_of(path, None)
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        text = props.get("mnv3")
    elif fmt == "tflite":
        data = read_tflite_metadata(path)
        text = data.decode() if data else None
    elif fmt == "pt2":
        import zipfile

        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/mnv3.json")]
            text = z.read(names[0]).decode() if names else None
    else:
        files = {"mnv3.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), _extra_files=files)
        text = files["mnv3.json"] or None
    return json.loads(text) if text else None
