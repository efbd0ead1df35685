"""int8 TFLite for LiteRT: static post-training quantization of the float file with the AI Edge
quantizer (int8 weights per channel, int8 activations per tensor, every op it knows), then hard-swish
rewritten as operations XNNPACK runs in int8.

Why the rewrite: LiteRT's XNNPACK delegate takes HARD_SWISH in float only, so in a fully int8 graph
each hard-swish falls back to the built-in kernel and cuts the delegated graph into pieces
(MobileNetV3-Small at 0.35: 19 hard-swish ops, 20 delegate partitions). Here each int8 HARD_SWISH
y = x * relu6(x + 3) / 6 becomes

    t = MUL(x, 1/6)        t holds x / 6: the same integers as x, at 1/6 of its scale (when
                           XNNPACK accepts that scale against h's; else a scale it accepts)
    h = ADD(t, 1/2)        h's int8 range is [0, 1]: the saturation is the clip of the hard sigmoid
    y = MUL(x, h)          y keeps the quantization the quantizer chose for the hard-swish output

three int8 ops XNNPACK delegates, so the whole network runs as one delegated graph.

The stem (first convolution and its hard-swish) is left float by default: XNNPACK's int8
convolution handles its 3 input channels poorly (MobileNetV3-Small at 224: 0.62 ms int8 against
0.26 float on an AVX-512 VNNI Xeon), and XNNPACK runs the float HARD_SWISH; one QUANTIZE follows.
Block 0 stays float with it when it has no expansion (`float_scope_tflite`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _opcode_index(model, code: int) -> int:
    schema = _schema()
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, 127)
    oc.version = 2
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _quant(scale: float, zero: int):
    q = _schema().QuantizationParametersT()
    q.scale, q.zeroPoint = [float(scale)], [int(zero)]
    return q


def _tensor(model, sub, name: str, shape, scale: float, zero: int, data: np.ndarray | None = None) -> int:
    schema = _schema()
    t = schema.TensorT()
    t.name, t.shape, t.type = name.encode(), list(shape), schema.TensorType.INT8
    t.quantization = _quant(scale, zero)
    buf = schema.BufferT()
    if data is not None:
        buf.data = np.asarray(data, dtype=np.int8).view(np.uint8)
    model.buffers.append(buf)
    t.buffer = len(model.buffers) - 1
    sub.tensors.append(t)
    return len(sub.tensors) - 1


def _op(model, code: int, inputs: list[int], outputs: list[int], options_type: int, options) -> object:
    schema = _schema()
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, code)
    op.inputs, op.outputs = inputs, outputs
    op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def decompose_hard_swish(model) -> int:
    """Rewrite every int8 HARD_SWISH of `model` (a schema ModelT) as MUL, ADD, MUL; returns how many."""
    schema = _schema()
    hs = schema.BuiltinOperator.HARD_SWISH
    count = 0
    for sub in model.subgraphs:
        ops = []
        for op in sub.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            x, y = (sub.tensors[op.inputs[0]], sub.tensors[op.outputs[0]]) if len(op.inputs) else (None, None)
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) != hs or x is None or x.type != schema.TensorType.INT8:
                ops.append(op)
                continue
            sx, zx = float(x.quantization.scale[0]), int(x.quantization.zeroPoint[0])
            base = (y.name or b"hswish").decode()
            sixth = _tensor(model, sub, f"{base}/sixth", [1] * len(x.shape), 1 / (6 * 127), 0, np.array(127))
            half = _tensor(model, sub, f"{base}/half", [1] * len(x.shape), 0.5 / 127, 0, np.array(127))
            # t = x / 6 keeps x's integers at 1/6 of its scale, unless that scale is out of what XNNPACK's
            # int8 ADD accepts against h's (input / output scale in [2^-10, 2^8)): then t takes a scale
            # in range, zero point 0; only t in [-0.5, 0.5] matters (h saturates outside), and 2/255
            # still covers [-1, 1]
            st, zt = sx / 6, zx
            if not 2 ** -9 / 255 <= st <= 2 / 255:
                st, zt = min(max(st, 2 ** -9 / 255), 2 / 255), 0
            t = _tensor(model, sub, f"{base}/x_div_6", x.shape, st, zt)
            h = _tensor(model, sub, f"{base}/hard_sigmoid", x.shape, 1 / 255, -128)
            mul, add = schema.MulOptionsT(), schema.AddOptionsT()
            ops.append(_op(model, schema.BuiltinOperator.MUL, [op.inputs[0], sixth], [t],
                           schema.BuiltinOptions.MulOptions, mul))
            ops.append(_op(model, schema.BuiltinOperator.ADD, [t, half], [h],
                           schema.BuiltinOptions.AddOptions, add))
            ops.append(_op(model, schema.BuiltinOperator.MUL, [op.inputs[0], h], [op.outputs[0]],
                           schema.BuiltinOptions.MulOptions, schema.MulOptionsT()))
            count += 1
        sub.operators = ops
    return count


def float_input(model) -> int:
    """Where the graph's first op dequantizes a graph input (the quantizer quantizes the input even
    when the op that reads it stays float), read the float tensor directly instead: the caller
    feeds float images and one pass over the input is saved. Returns how many inputs changed."""
    schema = _schema()
    changed = 0
    for sub in model.subgraphs:
        keep = []
        readers = Counter(int(i) for op in sub.operators for i in set(op.inputs if op.inputs is not None else ()))
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            src = op.inputs[0] if len(op.inputs) else -1
            if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.DEQUANTIZE \
                    and src in list(sub.inputs) and readers[int(src)] == 1:
                new = op.outputs[0]
                sub.inputs = [new if i == src else i for i in sub.inputs]
                for sig in model.signatureDefs or []:
                    for t in sig.inputs or []:
                        if t.tensorIndex == src:
                            t.tensorIndex = new
                sub.tensors[new].name = sub.tensors[src].name
                sub.tensors[src].name = sub.tensors[src].name + b"/int8"
                changed += 1
                continue
            keep.append(op)
        sub.operators = keep
    return changed


def read_model(path: str | Path):
    """The file as a schema ModelT; buffers stored after the flatbuffer (offset and size, as the
    AI Edge quantizer writes them) are read into the model, so that it can be packed again."""
    raw = bytearray(Path(path).read_bytes())
    model = _schema().ModelT.InitFromPackedBuf(raw, 0)
    for buf in model.buffers or []:
        if getattr(buf, "offset", 0) and buf.offset > 1:
            buf.data = np.frombuffer(bytes(raw[buf.offset:buf.offset + buf.size]), dtype=np.uint8)
            buf.offset, buf.size = 0, 0
    return model


def write_model(model, path: str | Path) -> None:
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    Path(path).write_bytes(bytes(builder.Output()))


# The stem's ops, by the module path litert-torch writes into tensor names: left float (see
# export.quantize_onnx for why), unless float_stem=False. A fused op's tensor name lists every
# location folded into it, joined by ';': the op's own comes first. Block 0's project conv of
# MobileNetV3-Large names the stem's batch norm later in its list, so the stem's scope must be in the
# first location (matched anywhere, it kept Large's block 0 float too).
STEM_SCOPE = r"^[^;]*ConvBNAct_stem/"
# Block 0 stays float with the stem when it has no expansion (see export.float_scope for the
# measurements); its residual add is named after the block itself, without a child module.
FIRST_BLOCK_SCOPE = r"^[^;]*Sequential_blocks/mnv3\.nn\.layers\.InvertedResidual_0(/|;|$)"


def float_scope_tflite(names: list[str], float_stem: bool = True) -> str | None:
    """The quantizer's regex for the ops of a float TFLite graph (by output tensor name) that stay
    float: none, the stem, or the stem and block 0 (`export.float_scope`'s rule)."""
    if not float_stem:
        return None
    first = [n.split(";")[0] for n in names if re.search(FIRST_BLOCK_SCOPE, n)]
    if first and not any("InvertedResidual_0/mnv3.nn.layers.ConvBNAct_expand" in n for n in first):
        return f"{STEM_SCOPE}|{FIRST_BLOCK_SCOPE}"
    return STEM_SCOPE


def quantize_tflite(path: Path, calibration: np.ndarray, *, decompose: bool = True, float_stem: bool = True) -> dict:
    """Quantize the float TFLite file at `path` in place, calibrated on `calibration` (N, C, H, W float
    images, fed at the file's batch); returns what was done. The output is int8; the stem stays
    float and the input with it (`float_stem`), else the input is int8 too."""
    import contextlib
    import io
    import tempfile

    import ai_edge_quantizer as aq
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    signatures = interpreter.get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    batch = int(interpreter.get_input_details()[0]["shape"][0])
    samples = [{name: np.ascontiguousarray(calibration[i:i + batch], dtype=np.float32)}
               for i in range(0, len(calibration) - batch + 1, batch)]
    quantizer = aq.Quantizer(str(path))
    recipe = aq.recipe.static_wi8_ai8()
    scope = float_scope_tflite([(t.name or b"").decode(errors="replace") for t in read_model(path).subgraphs[0].tensors], float_stem)
    if scope:
        recipe.append({**recipe[0], "regex": scope, "algorithm_key": "no_quantize"})
    quantizer.load_quantization_recipe(recipe)
    with tempfile.TemporaryDirectory(prefix="mnv3-tflite-int8-") as tmp, \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # min/max over all calibration images, not the quantizer's default moving average of each
        # image's min/max: that clips outliers, and a clipped logit moved by 3 on a digits model
        from ai_edge_quantizer import calibrator
        from ai_edge_quantizer.utils import qsv_utils

        calib = calibrator.Calibrator(quantizer._float_model_buffer, num_threads=1,
                                      qsv_update_func=qsv_utils.min_max_update)
        calib.calibrate({key: samples}, quantizer._recipe_manager)
        result = quantizer.quantize(calib.get_model_qsvs(), enable_progress_bar=False, enable_progress_report=False)
        out = Path(tmp) / "int8.tflite"
        result.export_model(str(out), overwrite=True)
        model = read_model(out)
    rewritten = decompose_hard_swish(model) if decompose else 0
    inputs = float_input(model) if float_stem else 0
    write_model(model, path)
    return {"hard_swish_rewritten": rewritten, "calibration_batches": len(samples), "float_inputs": inputs}


def op_report_tflite(path: str | Path, threads: int = 1) -> dict:
    """The ops of a TFLite file by type and output dtype (integer, float, quantize/dequantize), and
    how many partitions XNNPACK's delegate takes (1: the whole graph runs delegated)."""
    schema = _schema()
    model = read_model(path)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    integer: Counter = Counter()
    other: Counter = Counter()
    q = dq = 0
    for sub in model.subgraphs[:1]:
        for op in sub.operators:
            oc = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM")
            if name == "QUANTIZE":
                q += 1
                continue
            if name == "DEQUANTIZE":
                dq += 1
                continue
            out = sub.tensors[op.outputs[0]].type
            (integer if out in (schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT32)
             else other)[name] += 1
    return {"integer": dict(integer), "float": dict(other), "quantize": q, "dequantize": dq,
            "delegate_partitions": delegate_partitions(path, threads)}


def delegate_partitions(path: str | Path, threads: int = 1) -> int:
    """How many delegate nodes XNNPACK makes of the graph (each boundary between delegated and
    non-delegated ops costs a hand-over)."""
    from ai_edge_litert.interpreter import Interpreter

    saved = os.dup(2)                     # the runtime's INFO line goes to the C stderr
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return sum(1 for op in interpreter._get_ops_details() if op["op_name"] == "DELEGATE")


def io_quantization(interpreter) -> tuple[tuple[float, int] | None, tuple[float, int] | None]:
    """(scale, zero point) of the input and output when they are int8, else None."""
    def params(detail):
        if detail["dtype"] in (np.int8, np.uint8):
            scale, zero = detail["quantization"]
            return float(scale), int(zero)
        return None
    return params(interpreter.get_input_details()[0]), params(interpreter.get_output_details()[0])


def quantize_input(x: np.ndarray, params: tuple[float, int] | None, dtype) -> np.ndarray:
    if params is None:
        return x
    scale, zero = params
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def dequantize_output(y: np.ndarray, params: tuple[float, int] | None) -> np.ndarray:
    if params is None:
        return y
    scale, zero = params
    return (y.astype(np.float32) - zero) * scale
