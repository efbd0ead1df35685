"""Float TFLite files: our network converted with litert-torch, imported back, gives the same outputs
as the PyTorch model and as the LiteRT interpreter on the converted file. Covers the importer's float
path (the authors' uint8 file is tested in test_import.py) and both padding modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mnv3

litert_torch = pytest.importorskip("litert_torch", reason="litert-torch is part of the dev install")
RES = 64


def _calibrated(spec: mnv3.ArchSpec) -> mnv3.MobileNet:
    """Random weights with batch-norm statistics measured on random images, so that outputs depend
    on the input (an untrained network's outputs otherwise vanish)."""
    torch.manual_seed(0)
    model = mnv3.build(spec)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.weight.uniform_(0.75, 1.25)
            bn.bias.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)
        model.train()(torch.randn(8, 3, RES, RES))
    return model.eval()


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_converted_float_tflite_imports_back(tmp_path, padding):
    from ai_edge_litert.interpreter import Interpreter

    spec = mnv3.preset("mobilenet_v3_small", resolution=RES).replace(padding=padding)
    model = _calibrated(spec)
    x = torch.randn(1, 3, RES, RES)
    path = tmp_path / "small.tflite"
    litert_torch.convert(model, (x,)).export(str(path))

    imported = mnv3.load(path)
    assert imported.spec.padding == padding
    assert imported.spec.blocks == spec.blocks and imported.spec.head == spec.head
    assert imported.num_classes == 1000

    with torch.inference_mode():
        want = model(x)
        got = imported(x)
    scale = want.abs().max().item()
    assert want.std().item() > 1e-3 * scale          # outputs really depend on the network
    torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=0)

    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.set_tensor(inp["index"], x.numpy())
    interpreter.invoke()
    lite = interpreter.get_tensor(out["index"])
    np.testing.assert_allclose(got.numpy(), lite, atol=1e-4 * scale, rtol=0)
