"""Import the TensorFlow authors' released MobileNetV3 TFLite files (float or uint8).

The file is parsed with the `tflite` flatbuffer schema; nothing is executed. Its convolutions come
in the network's order with batch norm already folded in, so each one becomes a conv whose batch
norm is set to the identity (bias kept there), which keeps the model trainable. Quantized weights are
dequantized ((q - zero_point) * scale). The network is recognised from the weight shapes (or checked
against `arch` when given); the padding mode is read from the strided convolutions (TF "same" in the
authors' files; explicit symmetric padding in files converted from PyTorch). 1001 outputs (index 0 = background) become the
1000 ImageNet classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnv3.arch import ArchSpec
from mnv3.imagenet import imagenet_classes
from mnv3.nn import MobileNet, build
from mnv3.nn.layers import ConvBNAct
from mnv3.presets import COMMON_WIDTHS, candidates
from mnv3.weights.model_file import ModelMeta, Preprocess, WeightsError, set_meta

_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


class _Graph:
    """The first subgraph of a TFLite model, read with the flatbuffer schema."""

    def __init__(self, path: Path) -> None:
        try:
            import tflite
        except ImportError:  # pragma: no cover - tflite is a declared dependency
            raise WeightsError("importing TFLite files needs the 'tflite' package: "
                               "pip install tflite") from None
        self.schema = tflite
        data = path.read_bytes()
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise WeightsError(f"{path}: not a TFLite file (no TFL3 identifier)")
        try:
            self.model = tflite.Model.GetRootAsModel(data, 0)
            self.graph = self.model.Subgraphs(0)
            names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
            self.ops, self.conv_options, self.fused_relu6 = [], [], {}
            for i in range(self.graph.OperatorsLength()):
                op = self.graph.Operators(i)
                code = self.model.OperatorCodes(op.OpcodeIndex())
                kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
                inputs = [op.Inputs(j) for j in range(op.InputsLength())]
                outputs = [op.Outputs(j) for j in range(op.OutputsLength())]
                self.ops.append((kind, inputs, outputs))
                if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                    options = (tflite.Conv2DOptions() if kind == "CONV_2D"
                               else tflite.DepthwiseConv2DOptions())
                    table = op.BuiltinOptions()
                    options.Init(table.Bytes, table.Pos)
                    self.conv_options.append((options.StrideH(), options.Padding(), inputs[0]))
                    self.fused_relu6[outputs[0]] = (options.FusedActivationFunction()
                                                    == tflite.ActivationFunctionType.RELU6)
        except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer raises anything from struct to IndexError
            raise WeightsError(f"{path}: damaged TFLite file ({type(exc).__name__}: {exc})") from None
        self.path = path
        self.producer = {o: (kind, ins) for kind, ins, outs in self.ops for o in outs}
        self.consumers: dict[int, list[str]] = {}
        for kind, ins, _ in self.ops:
            for i in ins:
                self.consumers.setdefault(i, []).append(kind)

    def shape(self, index: int) -> list[int]:
        return self.graph.Tensors(index).ShapeAsNumpy().tolist()

    def constant(self, index: int) -> np.ndarray:
        """The float value of a constant tensor (dequantized; through a DEQUANTIZE op if needed)."""
        tensor = self.graph.Tensors(index)
        raw = self.model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(raw, int) or raw is None or len(raw) == 0:
            kind, ins = self.producer.get(index, (None, []))
            if kind == "DEQUANTIZE":
                return self.constant(ins[0])
            raise WeightsError(f"{self.path}: tensor {tensor.Name().decode()} has no constant data")
        dtype = _NUMPY_TYPES.get(tensor.Type())
        if dtype is None:
            raise WeightsError(f"{self.path}: unsupported tensor type {tensor.Type()}")
        values = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(self.shape(index))
        values = values.astype(np.float64)
        quant = tensor.Quantization()
        if quant is not None and quant.ScaleLength() > 0:
            scale, zero = quant.ScaleAsNumpy(), quant.ZeroPointAsNumpy()
            axis = quant.QuantizedDimension()
            if len(scale) > 1:
                bshape = [1] * values.ndim
                bshape[axis] = -1
                scale, zero = scale.reshape(bshape), np.asarray(zero).reshape(bshape)
            values = (values - zero) * scale
        return values.astype(np.float32)

    def padding(self) -> str:
        """"same" when the strided convolutions pad like TensorFlow: SAME padding (the authors'
        files) or an explicit asymmetric PAD before them (a PyTorch model with TF padding,
        converted); "symmetric" when an explicit PAD pads both sides alike."""
        votes = set()
        for stride, pad, source in self.conv_options:
            if stride == 1:
                continue
            if pad == self.schema.Padding.SAME:
                votes.add("same")
                continue
            kind, ins = self.producer.get(source, (None, []))
            while kind == "TRANSPOSE":      # a converter may pad in NCHW, then change layout
                kind, ins = self.producer.get(ins[0], (None, []))
            if kind in ("PAD", "PADV2"):
                amounts = self.constant(ins[1]).reshape(-1, 2)
                votes.add("same" if any(a != b for a, b in amounts) else "symmetric")
            else:
                votes.add("symmetric")
        return "same" if votes == {"same"} else "symmetric"

    def input_quantization(self) -> tuple[float, float] | None:
        tensor = self.graph.Tensors(self.graph.Inputs(0))
        quant = tensor.Quantization()
        if tensor.Type() in (3, 9) and quant is not None and quant.ScaleLength() > 0:
            return float(quant.ScaleAsNumpy()[0]), float(quant.ZeroPointAsNumpy()[0])
        return None

    def weighted_layers(self) -> list[tuple[np.ndarray, np.ndarray | None, bool]]:
        """(weight in PyTorch layout, bias, whether a ReLU6 follows) of every conv and fully
        connected op, in order. 1x1 convs and fully connected layers both come as (out, in, 1, 1)."""
        layers = []
        for kind, ins, outs in self.ops:
            if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                continue
            w = self.constant(ins[1])
            b = self.constant(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
            if kind == "CONV_2D":        # OHWI -> OIHW
                w = w.transpose(0, 3, 1, 2)
            elif kind == "DEPTHWISE_CONV_2D":   # 1HWC -> C1HW
                w = w.transpose(3, 0, 1, 2)
            else:                        # (out, in) -> (out, in, 1, 1), like the 1x1 convs TF uses
                w = w.reshape(*w.shape, 1, 1)
            relu6 = self.fused_relu6.get(outs[0], False) or self.consumers.get(outs[0]) == ["RELU6"]
            layers.append((w, b, relu6))
        return layers


def _our_layers(model: MobileNet) -> list[tuple[str, nn.Module]]:
    """Our weighted layers in the order the TFLite graph has them."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, ConvBNAct) or isinstance(module, (nn.Conv2d, nn.Linear)) and not name.endswith(".conv"):
            layers.append((name, module))
    return layers


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    weight = module.conv.weight if isinstance(module, ConvBNAct) else module.weight
    shape = tuple(weight.shape)
    return shape + (1, 1) if isinstance(module, nn.Linear) else shape


def _fits(spec: ArchSpec, shapes: list[tuple[int, ...]], num_classes: int) -> bool:
    with torch.device("meta"):
        model = build(spec, num_classes)
    ours = [_weight_shape(m) for _, m in _our_layers(model)]
    return len(ours) == len(shapes) and all(a == b for a, b in zip(ours, shapes))


def _recognise(shapes: list[tuple[int, ...]], resolution: int, num_classes: int,
               padding: str) -> ArchSpec:
    for spec in candidates(resolution):
        spec = spec.replace(padding=padding)
        if _fits(spec, shapes, num_classes):
            return spec
    raise WeightsError("the TFLite file's layers match no preset at widths "
                       f"{COMMON_WIDTHS}; pass --arch with a spec JSON that describes it")


def load_tflite(path: str | Path, arch: ArchSpec | None = None) -> MobileNet:
    """A float model with the TFLite file's weights (see the module docstring)."""
    path = Path(path)
    graph = _Graph(path)
    layers = graph.weighted_layers()
    if not layers:
        raise WeightsError(f"{path}: no convolution layers found; is this an image classifier?")
    input_shape = graph.shape(graph.graph.Inputs(0))
    if len(input_shape) == 4 and input_shape[3] == 3 and input_shape[1] == input_shape[2]:
        resolution = input_shape[1]           # NHWC, as TensorFlow writes
    elif len(input_shape) == 4 and input_shape[1] == 3 and input_shape[2] == input_shape[3]:
        resolution = input_shape[2]           # NCHW, as PyTorch converters write
    else:
        raise WeightsError(f"{path}: expected a square RGB image input, got {input_shape}")
    outputs = layers[-1][0].shape[0]
    padding = graph.padding()
    background = outputs == 1001
    num_classes = outputs - 1 if background else outputs
    shapes = [tuple(w.shape) for w, _, _ in layers]
    shapes[-1] = (num_classes,) + shapes[-1][1:]
    if arch is None:
        spec = _recognise(shapes, resolution, num_classes, padding)
    else:
        spec = arch.replace(padding=padding, resolution=resolution)
        if not _fits(spec, shapes, num_classes):
            raise WeightsError(f"{path}: its layers do not fit --arch {arch.name}; leave --arch out "
                               "to recognise the network from the file")
    model = build(spec, num_classes)
    with torch.no_grad():
        for (name, module), (w, b, relu6) in zip(_our_layers(model), layers):
            weight, bias = torch.from_numpy(w), None if b is None else torch.from_numpy(b)
            if name.endswith(".se.expand") and spec.se_gate == "hard_sigmoid" and relu6:
                # hard_sigmoid(x) = relu6(x + 3) / 6: converters fold the + 3 into this bias.
                bias = bias - 3.0
            if module is model.classifier and background:
                weight, bias = weight[1:], bias[1:]
            if isinstance(module, ConvBNAct):
                module.conv.weight.copy_(weight)
                bn = module.bn
                bn.weight.fill_(1.0)
                bn.bias.copy_(bias if bias is not None else torch.zeros_like(bn.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)    # sqrt(var + eps) == 1: the identity
            else:
                module.weight.copy_(weight.reshape(module.weight.shape))
                if bias is not None:
                    module.bias.copy_(bias)
    quant = graph.input_quantization()
    if quant is not None:   # real = (q - zero) * scale  ==  (q/255 - mean) / std
        scale, zero = quant
        mean, std = (zero / 255.0,) * 3, (1.0 / (255.0 * scale),) * 3
    else:                   # the authors' float files take [-1, 1]
        mean, std = (0.5,) * 3, (0.5,) * 3
    preprocess = Preprocess.for_resolution(resolution, mean=mean, std=std, interpolation="bilinear")
    classes, names = imagenet_classes() if num_classes == 1000 else (None, None)
    set_meta(model, ModelMeta(classes=classes, class_names=names, preprocess=preprocess,
                              source=f"tflite:{path.name}"))
    return model.eval()
