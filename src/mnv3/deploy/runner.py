"""An exported file (.onnx, .tflite) used where a model is: `ExportedModel` runs the file with its own
runtime and carries the description the export wrote into it (spec, head, classes, preprocessing),
so that `mnv3 eval` and `mnv3 predict` score the deployed file itself, not the PyTorch model it came
from. A file with a fixed batch is fed in chunks of that batch (the last one padded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnv3.deploy.export import ExportError, read_metadata

RUNNABLE = {".onnx": "onnxruntime", ".tflite": "litert"}


def is_exported(path: str | Path) -> bool:
    """An .onnx file, or a .tflite file that carries an mnv3 description (the authors' TFLite
    releases are weights to import instead)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    if path.suffix.lower() == ".tflite" and path.is_file():
        try:
            return read_metadata(path) is not None
        except (ValueError, IndexError, TypeError, OSError, struct.error, UnicodeDecodeError):
            return False        # not a flatbuffer this reader understands: left to the importer
    return False


class ExportedModel(nn.Module):
    def __init__(self, path: str | Path, threads: int = 1) -> None:
        super().__init__()
        from mnv3.arch import ArchSpec
        from mnv3.heads import DenseHead
        from mnv3.weights.model_file import ModelMeta

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such file")
        info = read_metadata(self.path)
        if info is None:
            raise ExportError(f"{self.path}: no mnv3 description in this file; export it with `mnv3 export`")
        self.spec = ArchSpec.from_dict(info["spec"])
        if info.get("head") is not None:
            self.head_spec = DenseHead.from_dict(info["head"])
        self.num_classes = int(info["num_classes"])
        self.meta = ModelMeta.from_json(json.dumps(info["meta"]))
        self.batch = info["input"].get("batch", 1)
        self.runtime = RUNNABLE[self.path.suffix.lower()]
        self._run = self._onnx(threads) if self.runtime == "onnxruntime" else self._tflite(threads)

    def _onnx(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]

    def _tflite(self, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        from mnv3.deploy.tflite_int8 import dequantize_output, io_quantization, quantize_input

        interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        interpreter.allocate_tensors()
        detail = interpreter.get_input_details()[0]
        inp, out = detail["index"], interpreter.get_output_details()[0]["index"]
        qin, qout = io_quantization(interpreter)      # an int8 file takes and gives int8

        def run(x):
            interpreter.set_tensor(inp, quantize_input(x, qin, detail["dtype"]))
            interpreter.invoke()
            return dequantize_output(interpreter.get_tensor(out).copy(), qout)
        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.batch == "dynamic":
            return torch.from_numpy(self._run(x))
        b, outs = int(self.batch), []
        for start in range(0, len(x), b):
            chunk = x[start:start + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), np.float32)])
            outs.append(self._run(chunk)[:n])
        return torch.from_numpy(np.concatenate(outs))

    # what a Detector offers beside its forward
    def anchors(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        from mnv3.nn.ssdlite import default_boxes, feature_grids

        size = tuple(size or self.head_spec.resolution)
        return default_boxes(self.head_spec, feature_grids(self.head_spec, size), size)

    def detect(self, x: torch.Tensor, **options) -> list[dict[str, torch.Tensor]]:
        from mnv3.nn.ssdlite import postprocess

        size = (x.shape[-2], x.shape[-1])
        return postprocess(self(x), self.anchors(size), size, **options)
