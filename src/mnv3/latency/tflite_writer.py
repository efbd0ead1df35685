"""Write small float TFLite graphs (one stem, block or head) straight from a spec, in milliseconds.

Converting each lookup-table entry with litert-torch costs seconds (tracing, lowering); a table has
thousands of entries. The ops of a MobileNet block are few and plain, so this module writes them as
TFLite flatbuffers itself, in NHWC with SAME padding, the way TFLite converters lay these layers out
(h-swish as HARD_SWISH, the hard-sigmoid of SE as a ReLU6-fused conv then a 1/6 multiply). Weights
are random: latency does not depend on their values.
"""

from __future__ import annotations

import numpy as np

from mnv3.arch import ArchSpec, BlockSpec


class _Graph:
    def __init__(self, seed: int = 0) -> None:
        import flatbuffers  # noqa: F401 - checked early: tflite's builders need it
        import tflite

        self.t = tflite
        self.rng = np.random.default_rng(seed)
        self.tensors: list[tuple[list[int], int, int]] = []     # shape, type, buffer
        self.buffers: list[bytes] = [b""]
        self.ops: list[tuple[int, list[int], list[int], int, object]] = []
        self.codes: dict[int, int] = {}

    def tensor(self, shape: list[int], data: np.ndarray | None = None) -> int:
        buffer, kind = 0, self.t.TensorType.FLOAT32
        if data is not None:
            kind = self.t.TensorType.INT32 if data.dtype == np.int32 else self.t.TensorType.FLOAT32
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buffer = len(self.buffers) - 1
        self.tensors.append((list(shape), kind, buffer))
        return len(self.tensors) - 1

    def weight(self, *shape: int) -> int:
        fan_in = int(np.prod(shape[1:])) or 1
        return self.tensor(list(shape), (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))

    def bias(self, n: int, shift: float = 0.0) -> int:
        return self.tensor([n], (self.rng.standard_normal(n) * 0.1 + shift).astype(np.float32))

    def op(self, name: str, inputs: list[int], outputs: list[int], options: str | None = None,
           **fields: int) -> None:
        code = getattr(self.t.BuiltinOperator, name)
        self.codes.setdefault(code, len(self.codes))
        self.ops.append((self.codes[code], inputs, outputs, options, fields))

    # -- layers (x: tensor index, shape NHWC) ----------------------------------------------------
    def _act(self, act: str) -> int:
        f = self.t.ActivationFunctionType
        return {"relu": f.RELU, "relu6": f.RELU6}.get(act, f.NONE)

    def conv(self, x: int, shape: list[int], cout: int, k: int, stride: int, act: str,
             depthwise: bool = False, dilation: int = 1, bias_shift: float = 0.0) -> tuple[int, list[int]]:
        n, h, w, c = shape
        out_shape = [n, -(-h // stride), -(-w // stride), c if depthwise else cout]
        y = self.tensor(out_shape)
        if depthwise:
            weights = self.weight(1, k, k, c)
            self.op("DEPTHWISE_CONV_2D", [x, weights, self.bias(c, bias_shift)], [y], "DepthwiseConv2DOptions",
                    Padding=self.t.Padding.SAME, StrideW=stride, StrideH=stride, DepthMultiplier=1,
                    FusedActivationFunction=self._act(act), DilationWFactor=dilation, DilationHFactor=dilation)
        else:
            weights = self.weight(cout, k, k, c)
            self.op("CONV_2D", [x, weights, self.bias(cout, bias_shift)], [y], "Conv2DOptions",
                    Padding=self.t.Padding.SAME, StrideW=stride, StrideH=stride,
                    FusedActivationFunction=self._act(act), DilationWFactor=dilation, DilationHFactor=dilation)
        if act == "hswish":
            z = self.tensor(out_shape)
            self.op("HARD_SWISH", [y], [z])
            y = z
        return y, out_shape

    def binary(self, name: str, a: int, b: int, shape: list[int]) -> int:
        y = self.tensor(shape)
        self.op(name, [a, b], [y], f"{name.capitalize()}Options", FusedActivationFunction=0)
        return y

    def mean(self, x: int, shape: list[int], keep: bool = True) -> tuple[int, list[int]]:
        out_shape = [shape[0], 1, 1, shape[3]] if keep else [shape[0], shape[3]]
        y = self.tensor(out_shape)
        self.op("MEAN", [x, self.tensor([2], np.array([1, 2], np.int32))], [y], "ReducerOptions",
                KeepDims=int(keep))
        return y, out_shape

    def dense(self, x: int, cin: int, cout: int, act: str) -> int:
        y = self.tensor([1, cout])
        self.op("FULLY_CONNECTED", [x, self.weight(cout, cin), self.bias(cout)], [y], "FullyConnectedOptions",
                FusedActivationFunction=self._act(act))
        if act == "hswish":
            z = self.tensor([1, cout])
            self.op("HARD_SWISH", [y], [z])
            y = z
        return y

    # -- serialisation ---------------------------------------------------------------------------
    def serialize(self, inputs: list[int], outputs: list[int]) -> bytes:
        import flatbuffers

        t, b = self.t, flatbuffers.Builder(1 << 16)

        def ints(start, values, kind="Int32"):
            start(b, len(values))
            for v in reversed(values):
                getattr(b, f"Prepend{kind}")(v)
            return b.EndVector()

        def table_vector(start, offsets):
            start(b, len(offsets))
            for o in reversed(offsets):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        buffers = []
        for data in self.buffers:
            vec = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
            t.BufferStart(b)
            if vec is not None:
                t.BufferAddData(b, vec)
            buffers.append(t.BufferEnd(b))
        tensors = []
        for i, (shape, kind, buffer) in enumerate(self.tensors):
            name = b.CreateString(f"t{i}")
            dims = ints(t.TensorStartShapeVector, shape)
            t.TensorStart(b)
            t.TensorAddShape(b, dims)
            t.TensorAddType(b, kind)
            t.TensorAddBuffer(b, buffer)
            t.TensorAddName(b, name)
            tensors.append(t.TensorEnd(b))
        ops = []
        for opcode, ins, outs, options, fields in self.ops:
            opts = None
            if options:
                getattr(t, f"{options}Start")(b)
                for field, value in fields.items():
                    getattr(t, f"{options}Add{field}")(b, value)
                opts = getattr(t, f"{options}End")(b)
            vin = ints(t.OperatorStartInputsVector, ins)
            vout = ints(t.OperatorStartOutputsVector, outs)
            t.OperatorStart(b)
            t.OperatorAddOpcodeIndex(b, opcode)
            t.OperatorAddInputs(b, vin)
            t.OperatorAddOutputs(b, vout)
            if opts is not None:
                t.OperatorAddBuiltinOptionsType(b, getattr(t.BuiltinOptions, options))
                t.OperatorAddBuiltinOptions(b, opts)
            ops.append(t.OperatorEnd(b))
        v_tensors = table_vector(t.SubGraphStartTensorsVector, tensors)
        v_ops = table_vector(t.SubGraphStartOperatorsVector, ops)
        v_in = ints(t.SubGraphStartInputsVector, inputs)
        v_out = ints(t.SubGraphStartOutputsVector, outputs)
        name = b.CreateString("main")
        t.SubGraphStart(b)
        t.SubGraphAddTensors(b, v_tensors)
        t.SubGraphAddInputs(b, v_in)
        t.SubGraphAddOutputs(b, v_out)
        t.SubGraphAddOperators(b, v_ops)
        t.SubGraphAddName(b, name)
        subgraph = t.SubGraphEnd(b)
        codes = []
        for code in sorted(self.codes, key=self.codes.get):
            t.OperatorCodeStart(b)
            t.OperatorCodeAddBuiltinCode(b, code)
            t.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            t.OperatorCodeAddVersion(b, 1)
            codes.append(t.OperatorCodeEnd(b))
        v_codes = table_vector(t.ModelStartOperatorCodesVector, codes)
        v_subgraphs = table_vector(t.ModelStartSubgraphsVector, [subgraph])
        v_buffers = table_vector(t.ModelStartBuffersVector, buffers)
        desc = b.CreateString("mnv3 latency entry")
        t.ModelStart(b)
        t.ModelAddVersion(b, 3)
        t.ModelAddOperatorCodes(b, v_codes)
        t.ModelAddSubgraphs(b, v_subgraphs)
        t.ModelAddDescription(b, desc)
        t.ModelAddBuffers(b, v_buffers)
        b.Finish(t.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _block(g: _Graph, x: int, shape: list[int], block: BlockSpec, se_gate: str) -> tuple[int, list[int]]:
    cin = shape[3]
    y = x
    if block.expansion != cin:
        y, shape = g.conv(y, shape, block.expansion, 1, 1, block.activation)
    y, shape = g.conv(y, shape, block.expansion, block.kernel, block.stride, block.activation, depthwise=True,
                      dilation=block.dilation)
    if block.se is not None:
        s, s_shape = g.mean(y, shape)
        s, s_shape = g.conv(s, s_shape, block.se, 1, 1, "relu")
        hard = se_gate == "hard_sigmoid"
        s, s_shape = g.conv(s, s_shape, block.expansion, 1, 1, "relu6" if hard else "none",
                            bias_shift=3.0 if hard else 0.0)
        if hard:
            s = g.binary("MUL", s, g.tensor([1], np.array([1 / 6], np.float32)), s_shape)
        else:
            z = g.tensor(s_shape)
            g.op("LOGISTIC", [s], [z])
            s = z
        y = g.binary("MUL", y, s, shape)
    y, shape = g.conv(y, shape, block.out, 1, 1, "none")
    if block.stride == 1 and cin == block.out:
        y = g.binary("ADD", y, x, shape)
    return y, shape


def _stem(g: _Graph, spec: ArchSpec) -> tuple[int, int, list[int]]:
    shape = [1, spec.resolution, spec.resolution, spec.in_channels]
    x = g.tensor(shape)
    y, shape = g.conv(x, shape, spec.stem.out, spec.stem.kernel, spec.stem.stride, spec.stem.activation)
    return x, y, shape


def _head(g: _Graph, spec: ArchSpec, x: int, shape: list[int], num_classes: int) -> int:
    h = spec.head
    y, shape = g.conv(x, shape, h.last_conv, 1, 1, h.activation)
    y, _ = g.mean(y, shape, keep=False)
    features = h.last_conv
    if h.pre_logits:
        y = g.dense(y, h.last_conv, h.pre_logits, h.activation)
        features = h.pre_logits
    return g.dense(y, features, num_classes, "none")


def block_tflite(cin: int, size: int, block: BlockSpec, se_gate: str = "hard_sigmoid") -> bytes:
    g = _Graph()
    x = g.tensor([1, size, size, cin])
    y, _ = _block(g, x, [1, size, size, cin], block, se_gate)
    return g.serialize([x], [y])


def stem_tflite(spec: ArchSpec) -> bytes:
    g = _Graph()
    x, y, _ = _stem(g, spec)
    return g.serialize([x], [y])


def head_tflite(spec: ArchSpec, cin: int, size: int, num_classes: int) -> bytes:
    g = _Graph()
    x = g.tensor([1, size, size, cin])
    return g.serialize([x], [_head(g, spec, x, [1, size, size, cin], num_classes)])


def network_tflite(spec: ArchSpec, num_classes: int = 1000) -> bytes:
    """The whole network as one graph, written the way its parts are."""
    g = _Graph()
    x, y, shape = _stem(g, spec)
    for block in spec.blocks:
        y, shape = _block(g, y, shape, block, spec.se_gate)
    return g.serialize([x], [_head(g, spec, y, shape, num_classes)])
