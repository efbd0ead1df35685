"""mnv3 model files: save/load round trips, the file format, atomic writes and bad inputs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mnv3
from mnv3.weights import model_file

RES = 64


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including batch-norm running statistics (so fusing matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


def _input(seed: int = 1, res: int = RES) -> torch.Tensor:
    return torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


@pytest.fixture(scope="module")
def large_file(tmp_path_factory) -> Path:
    model = _randomize(mnv3.build(mnv3.preset("mobilenet_v3_large", resolution=RES)))
    return mnv3.save(model, tmp_path_factory.mktemp("large") / "large.safetensors")


# -- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, num_classes", [
    ("mobilenet_v3_small", 1000),
    ("mobilenet_v3_large", 10),
    ("tf_mobilenetv3_small_100", 7),     # TF "same" padding and eps 1e-3 must survive the file
    ("mnasnet_a1", 5),                   # sigmoid SE gate
])
def test_save_load_round_trip(tmp_path, arch, num_classes):
    spec = mnv3.preset(arch, resolution=RES)
    model = _randomize(mnv3.build(spec, num_classes), seed=3)
    path = tmp_path / "model.safetensors"
    assert mnv3.save(model, path) == path

    loaded = mnv3.load(path)
    assert isinstance(loaded, mnv3.MobileNet)
    assert loaded.spec == spec
    assert loaded.num_classes == num_classes
    assert not loaded.training and not loaded.fused
    x = _input()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert _leftovers(tmp_path) == []


def test_fused_model_round_trip(tmp_path):
    spec = mnv3.preset("mobilenet_v3_large", resolution=RES)
    model = _randomize(mnv3.build(spec), seed=5)
    x = _input()
    with torch.no_grad():
        before = model(x)
        model.fuse()
        fused_out = model(x)
    torch.testing.assert_close(fused_out, before, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    path = mnv3.save(model, tmp_path / "fused.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["fused"] == "1"
        assert not any("bn." in k for k in f.keys())  # noqa: SIM118 - safe_open is not iterable
    loaded = mnv3.load(path)
    assert loaded.fused
    assert loaded.spec == spec
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), fused_out)


def test_metadata_round_trip(tmp_path):
    spec = mnv3.preset("mobilenet_v3_small", 0.75, resolution=RES)
    model = _randomize(mnv3.build(spec, 3), seed=7)
    meta = mnv3.ModelMeta(
        classes=("n001", "n002", "n003"),
        class_names=("ant", "bee", "wasp with ünïcode"),
        preprocess=mnv3.Preprocess(resolution=RES, resize=80, mean=(0.5, 0.4, 0.3),
                                   std=(0.2, 0.25, 0.3), interpolation="bicubic"),
        source="unit-test")
    path = mnv3.save(model, tmp_path / "meta.safetensors", meta)
    loaded = mnv3.load(path)
    assert loaded.meta == meta
    assert mnv3.weights.model_meta(loaded) == meta
    assert loaded.meta.label(2) == "wasp with ünïcode (n003)"
    assert loaded.spec == spec
    with torch.no_grad():
        assert torch.equal(loaded(_input()), model(_input()))


def test_metadata_of_wrong_length_is_refused(tmp_path):
    model = mnv3.build(mnv3.preset("mobilenet_v3_small", resolution=RES), 3)
    with pytest.raises(mnv3.WeightsError, match="classes"):
        mnv3.save(model, tmp_path / "bad.safetensors", mnv3.ModelMeta(classes=("a", "b")))
    assert list(tmp_path.iterdir()) == []


def test_default_metadata_of_a_bare_model(tmp_path):
    model = mnv3.build(mnv3.preset("mobilenet_v3_small", resolution=96), 4)
    loaded = mnv3.load(mnv3.save(model, tmp_path / "m.safetensors"))
    assert loaded.meta.classes is None and loaded.meta.class_names is None
    assert loaded.meta.preprocess.resolution == 96
    assert loaded.meta.label(1) == "1"


# -- the file format ------------------------------------------------------------------------------

def test_file_is_plain_safetensors_with_spec_header(large_file):
    with safe_open(str(large_file), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
        stem = f.get_tensor("stem.conv.weight")
    assert header["format"] == "mnv3.model/1"
    spec = mnv3.ArchSpec.from_json(header["spec"])
    assert spec == mnv3.preset("mobilenet_v3_large", resolution=RES)
    assert json.loads(header["spec"])["name"] == spec.name
    assert header["num_classes"] == "1000"
    assert header["fused"] == "0"
    meta = json.loads(header["meta"])
    assert meta["preprocess"]["resolution"] == RES
    model = mnv3.build(spec)
    assert keys == set(model.state_dict())
    assert stem.shape == model.stem.conv.weight.shape


def test_save_refuses_a_foreign_module(tmp_path):
    with pytest.raises(mnv3.WeightsError, match="mnv3 model"):
        mnv3.save(nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    model = mnv3.build(mnv3.preset("mobilenet_v3_small", resolution=RES), 2)
    path = mnv3.save(model, tmp_path / "sub" / "m.safetensors")    # creates the folder
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    good = path.read_bytes()

    # Overwriting: a writer that dies half-way leaves the old file intact and no temporary file.
    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_file, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        mnv3.save(model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    assert path.read_bytes() == good
    monkeypatch.undo()

    mnv3.save(_randomize(model), path)        # overwriting succeeds and still leaves one file
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    assert path.read_bytes() != good


# -- loading into another spec --------------------------------------------------------------------

def test_load_into_a_different_spec_lists_the_tensors(large_file):
    with pytest.raises(mnv3.WeightsError) as info:
        mnv3.load(large_file, arch="mobilenet_v3_small")
    message = str(info.value)
    assert str(large_file) in message
    assert "mobilenet_v3_small" in message
    assert "shape mismatch" in message
    assert "not in the network" in message
    assert "missing from the file" in message
    assert "blocks.1.expand.conv.weight: file [64, 16, 1, 1] vs model [72, 16, 1, 1]" in message
    assert "blocks.0.se.reduce.weight" in message      # Small's first block has SE, Large's not
    assert "blocks.11." in message                     # Large has 15 blocks, Small 11
    assert "more" in message                           # long lists are cut, with a count


def test_load_with_its_own_arch_is_fine(large_file):
    model = mnv3.load(large_file, arch=mnv3.preset("mobilenet_v3_large", resolution=RES))
    assert model.spec.name == "mobilenet_v3_large_100_64"


# -- bad files ------------------------------------------------------------------------------------

class Payload:
    """Unpickling this would create a marker file: loading must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_missing_file(tmp_path):
    with pytest.raises(mnv3.WeightsError, match="no such file"):
        mnv3.load(tmp_path / "nope.safetensors")
    with pytest.raises(mnv3.WeightsError, match="no such file"):
        mnv3.load(tmp_path)      # a folder is not a weights file


@pytest.mark.parametrize("keep", [0.5, 0.999, 40, 7])
def test_truncated_model_file(large_file, tmp_path, keep):
    data = large_file.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:size])
    with pytest.raises(mnv3.WeightsError, match="truncated.safetensors"):
        mnv3.load(bad)


def test_random_bytes_named_safetensors(tmp_path):
    bad = tmp_path / "noise.safetensors"
    bad.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(mnv3.WeightsError, match="noise.safetensors"):
        mnv3.load(bad)
    # the same with a header length that is plausible but a header that is not JSON
    bad.write_bytes((64).to_bytes(8, "little") + b"{" + b"\xff" * 63 + b"\0" * 128)
    with pytest.raises(mnv3.WeightsError):
        mnv3.load(bad)


def test_random_bytes_named_pth(tmp_path):
    bad = tmp_path / "noise.pth"
    bad.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(mnv3.WeightsError, match="noise.pth"):
        mnv3.load(bad)


@pytest.mark.parametrize("what", ["payload", "module", "payload_in_state_dict"])
def test_pickled_objects_are_refused_and_never_run(tmp_path, what):
    marker = tmp_path / "EXECUTED"
    if what == "payload":
        obj = {"weights": torch.zeros(3), "evil": Payload(marker)}
    elif what == "module":
        obj = mnv3.build(mnv3.preset("mobilenet_v3_small", resolution=RES), 2)
    else:
        obj = {"state_dict": {"features.0.0.weight": torch.zeros(1)}, "hook": Payload(marker)}
    path = tmp_path / "model.pth"
    torch.save(obj, path)
    assert not marker.exists()
    with pytest.raises(mnv3.WeightsError, match="pickled models are never loaded"):
        mnv3.load(path)
    with pytest.raises(mnv3.WeightsError):
        mnv3.load(path, arch="mobilenet_v3_small")
    assert not marker.exists()


def test_plain_state_dict_of_unknown_layout(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(mnv3.WeightsError, match="unrecognised state dict"):
        mnv3.load(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(mnv3.WeightsError, match="state dict"):
        mnv3.load(path)


def test_text_file_named_tflite(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_text("this is not a flatbuffer, just some text\n" * 4)
    with pytest.raises(mnv3.WeightsError, match="TFLite"):
        mnv3.load(bad)


def test_damaged_model_header(large_file, tmp_path):
    with safe_open(str(large_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        header = dict(f.metadata())
    from safetensors.torch import save_file

    header["spec"] = '{"name": "broken"'
    bad = tmp_path / "damaged.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(mnv3.WeightsError, match="damaged"):
        mnv3.load(bad)


def test_no_temporary_files_anywhere(tmp_path):
    model = mnv3.build(mnv3.preset("mobilenet_v3_small", resolution=RES), 2)
    for i in range(3):
        mnv3.save(model, tmp_path / f"m{i}.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
