"""Importing peers' weights: torchvision and timm state dicts, URLs, named sets and the authors' TFLite."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import mnv3
from mnv3.data import load_image, preprocess_pixels, to_input
from mnv3.weights.sources import resolve_named

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TFLITE = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
IMAGENET = SHARED / "data" / "imagenet-sample"


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights AND batch-norm running statistics, so a wrong eps or a skipped tensor shows.

    Running variances are small (so eps 1e-3 vs 1e-5 matters) while gamma ~ sqrt(var) keeps every
    layer's scale near 1, so activations neither vanish nor explode through the network."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                var = uniform(module.running_var.shape, 0.002, 0.02)
                module.running_var.copy_(var)
                module.running_mean.copy_(torch.randn(var.shape, generator=gen) * 0.1)
                module.weight.copy_(var.sqrt() * uniform(var.shape, 0.8, 1.2))
                module.bias.copy_(torch.randn(var.shape, generator=gen) * 0.1)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


def _input(res: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _assert_same_outputs(ours: nn.Module, peer: nn.Module, res: int) -> None:
    x = _input(res)
    with torch.no_grad():
        want, got = peer.eval()(x), ours.eval()(x)
    assert want.abs().max() > 0.1, "the comparison needs outputs of a meaningful size"
    assert want.std(dim=1).min() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))


def _torchvision(name: str, seed: int) -> nn.Module:
    import torchvision

    return _randomize(getattr(torchvision.models, name)(weights=None), seed)


def _timm(name: str, seed: int) -> nn.Module:
    import timm

    return _randomize(timm.create_model(name, pretrained=False), seed)


@pytest.fixture(scope="module")
def tv_small(tmp_path_factory):
    peer = _torchvision("mobilenet_v3_small", seed=11)
    path = tmp_path_factory.mktemp("tv") / "mobilenet_v3_small.pth"
    torch.save(peer.state_dict(), path)
    return peer, path


# -- torchvision ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, res", [("mobilenet_v3_large", 96), ("mobilenet_v3_small", 64)])
def test_torchvision_state_dict(tmp_path, name, res):
    peer = _torchvision(name, seed=1)
    path = tmp_path / f"{name}.pth"
    torch.save(peer.state_dict(), path)

    recognised = mnv3.load(path)
    assert recognised.spec == mnv3.preset(name)
    assert recognised.spec.padding == "symmetric"
    assert recognised.num_classes == 1000
    assert recognised.meta.classes[0] == "n01440764" and len(recognised.meta.classes) == 1000
    assert recognised.meta.source.startswith("torchvision:")
    _assert_same_outputs(recognised, peer, res)

    named = mnv3.load(path, arch=name)
    assert named.spec == recognised.spec
    _assert_same_outputs(named, peer, res)

    # and the imported model survives a round trip through our own file
    again = mnv3.load(mnv3.save(named, tmp_path / "model.safetensors"))
    _assert_same_outputs(again, peer, res)


def test_torchvision_state_dict_in_a_checkpoint_wrapper(tmp_path, tv_small):
    peer, _ = tv_small
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in peer.state_dict().items()}}, path)
    _assert_same_outputs(mnv3.load(path), peer, 64)


def test_torchvision_with_the_wrong_arch_lists_tensors(tv_small):
    _, path = tv_small
    with pytest.raises(mnv3.WeightsError) as info:
        mnv3.load(path, arch="mobilenet_v3_large")
    message = str(info.value)
    assert "mobilenet_v3_large" in message
    assert "does not fit" in message
    assert "features." in message and "blocks." in message
    assert "--arch" in message


# -- timm -----------------------------------------------------------------------------------------

TIMM = [("mobilenetv3_large_100", 96), ("mobilenetv3_small_100", 64),
        ("tf_mobilenetv3_large_100", 72), ("tf_mobilenetv3_small_100", 80)]


def _save_state_dict(state: dict[str, torch.Tensor], path: Path) -> Path:
    """As users have them: torch.save(.pth) or a plain safetensors file (which stores keys sorted)."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name, res", TIMM)
def test_timm_state_dict(tmp_path, name, res, suffix):
    peer = _timm(name, seed=2)
    path = _save_state_dict(peer.state_dict(), tmp_path / f"{name}{suffix}")
    model = mnv3.load(path, arch=name)
    assert model.spec == mnv3.preset(name)
    assert model.spec.padding == ("same" if name.startswith("tf_") else "symmetric")
    assert model.meta.source.startswith("timm:")
    tf = name.startswith("tf_")
    assert model.meta.preprocess.mean == ((0.5,) * 3 if tf else (0.485, 0.456, 0.406))
    _assert_same_outputs(model, peer, res)


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_torchvision_safetensors_state_dict(tmp_path, name):
    peer = _torchvision(name, seed=6)
    path = _save_state_dict(peer.state_dict(), tmp_path / f"{name}.safetensors")
    model = mnv3.load(path)
    assert model.spec == mnv3.preset(name)
    _assert_same_outputs(model, peer, 64)


def test_timm_without_arch_asks_for_it(tmp_path):
    peer = _timm("mobilenetv3_small_100", seed=3)
    for suffix in (".pth", ".safetensors"):
        path = _save_state_dict(peer.state_dict(), tmp_path / f"w{suffix}")
        with pytest.raises(mnv3.WeightsError, match="--arch"):
            mnv3.load(path)


def test_timm_padding_and_eps_matter(tmp_path):
    """Loading a tf_ state dict as the plain timm model (other padding and eps) must not match."""
    peer = _timm("tf_mobilenetv3_small_100", seed=4)
    path = tmp_path / "w.pth"
    torch.save(peer.state_dict(), path)
    wrong = mnv3.load(path, arch="mobilenetv3_small_100")
    x = _input(80)
    with torch.no_grad():
        assert not torch.allclose(wrong(x), peer(x), atol=1e-3)


# -- URLs -----------------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www; yields its base URL. No internet is used."""
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MNV3_CACHE", str(cache))
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, cache
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*")) if cache.exists() else []


def test_url_with_hub_hash(server, tv_small):
    base, root, cache = server
    peer, path = tv_small
    name = f"mobilenet_v3_small-{_sha256(path)[:8]}.pth"
    shutil.copy(path, root / name)

    model = mnv3.load(f"{base}/{name}", progress=False)
    _assert_same_outputs(model, peer, 64)
    assert _cached_files(cache) == [name]
    assert _sha256(cache / name) == _sha256(path)

    # the second time it comes from the cache: the server no longer has it
    (root / name).unlink()
    again = mnv3.load(f"{base}/{name}", arch="mobilenet_v3_small", progress=False)
    _assert_same_outputs(again, peer, 64)


def test_url_with_pinned_sha256_fragment(server, tv_small):
    base, root, cache = server
    peer, path = tv_small
    shutil.copy(path, root / "weights.pth")
    model = mnv3.load(f"{base}/weights.pth#sha256={_sha256(path)}", progress=False)
    _assert_same_outputs(model, peer, 64)
    assert _cached_files(cache) == ["weights.pth"]


def test_url_without_checksum_prints_it(server, tv_small, capsys):
    base, root, _ = server
    peer, path = tv_small
    shutil.copy(path, root / "plain.pth")
    model = mnv3.load(f"{base}/plain.pth", progress=False)
    _assert_same_outputs(model, peer, 64)
    assert _sha256(path) in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["hub_name", "fragment"])
def test_url_with_wrong_checksum(server, tv_small, kind):
    base, root, cache = server
    _, path = tv_small
    if kind == "hub_name":
        name = "mobilenet_v3_small-deadbeef.pth"
        url = f"{base}/{name}"
    else:
        name = "weights.pth"
        url = f"{base}/{name}#sha256={'0' * 64}"
    shutil.copy(path, root / name)
    with pytest.raises(mnv3.WeightsError, match="checksum") as info:
        mnv3.load(url, progress=False)
    assert "deadbeef" in str(info.value) or "0000" in str(info.value)
    assert _cached_files(cache) == []


def test_url_wrong_checksum_does_not_trust_a_stale_cache(server, tv_small):
    """A file already in the cache under that name, but with other content, is fetched again and checked."""
    base, root, cache = server
    _, path = tv_small
    cache.mkdir()
    (cache / "weights.pth").write_bytes(b"stale")
    shutil.copy(path, root / "weights.pth")
    with pytest.raises(mnv3.WeightsError, match="checksum"):
        mnv3.load(f"{base}/weights.pth#sha256={'1' * 64}", progress=False)
    assert _cached_files(cache) == ["weights.pth"]
    assert (cache / "weights.pth").read_bytes() == b"stale"


def test_url_not_found(server):
    base, _, cache = server
    with pytest.raises(mnv3.WeightsError, match="could not download"):
        mnv3.load(f"{base}/missing-0123abcd.pth", progress=False)
    assert _cached_files(cache) == []


def test_unreachable_url(tmp_path, monkeypatch):
    monkeypatch.setenv("MNV3_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:        # a port that nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(mnv3.WeightsError, match="could not download"):
        mnv3.load(f"http://127.0.0.1:{port}/mobilenet_v3_small-01234567.pth", progress=False)
    assert _cached_files(tmp_path / "cache") == []


# -- named sets (resolved only; nothing is downloaded) ----------------------------------------------

def test_named_set_resolves_to_torchvision_url():
    url, resize, spec = resolve_named("torchvision:IMAGENET1K_V2", mnv3.preset("mobilenet_v3_large"))
    assert url.startswith("https://download.pytorch.org/models/")
    assert url.endswith("mobilenet_v3_large-5c1a4163.pth")
    assert resize == 232
    assert spec == mnv3.preset("mobilenet_v3_large")
    url, resize, spec = resolve_named("torchvision:IMAGENET1K_V1", mnv3.preset("mobilenet_v3_small"))
    assert url.endswith("mobilenet_v3_small-047dcff4.pth") and spec.name == "mobilenet_v3_small_100"


def test_unknown_named_set_lists_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("MNV3_CACHE", str(tmp_path / "cache"))
    with pytest.raises(mnv3.WeightsError) as info:
        resolve_named("torchvision:IMAGENET9K", mnv3.preset("mobilenet_v3_large"))
    assert "IMAGENET9K" in str(info.value)
    assert "torchvision:IMAGENET1K_V2" in str(info.value)
    with pytest.raises(mnv3.WeightsError, match="known:.*IMAGENET1K_V1"):
        resolve_named("torchvision:IMAGENET1K_V1", mnv3.preset("mnasnet_a1"))   # no set for that network
    with pytest.raises(mnv3.WeightsError, match="--arch"):
        mnv3.load("torchvision:IMAGENET1K_V2")      # which network? (refused before any download)
    with pytest.raises(mnv3.WeightsError, match="known"):
        mnv3.load("timm:IMAGENET1K_V2", arch="mobilenet_v3_large")
    assert _cached_files(tmp_path / "cache") == []


def test_named_set_downloads_with_its_checksum(server, tv_small, monkeypatch):
    """The named-set path end to end against a local server: the registry's file name carries the
    checksum, a file with other content is refused, the right one loads with the set's preprocessing."""
    from mnv3.weights import sources

    base, root, cache = server
    peer, path = tv_small
    monkeypatch.setattr(sources, "_TORCHVISION_BASE", base + "/")
    shutil.copy(path, root / "mobilenet_v3_small-047dcff4.pth")      # the real name, other content
    with pytest.raises(mnv3.WeightsError, match="checksum"):
        mnv3.load("torchvision:IMAGENET1K_V1", arch="mobilenet_v3_small", progress=False)
    assert _cached_files(cache) == []

    good = f"mobilenet_v3_small-{_sha256(path)[:8]}.pth"
    shutil.copy(path, root / good)
    monkeypatch.setitem(sources.NAMED_WEIGHTS, ("torchvision", "mobilenet_v3_small"),
                        {"IMAGENET1K_V1": (good, 256), "TEST": (good, 232)})
    model = mnv3.load("torchvision:TEST", arch="mobilenet_v3_small", progress=False)
    _assert_same_outputs(model, peer, 64)
    assert model.meta.preprocess.resize == 232
    assert _cached_files(cache) == [good]


# -- the authors' TFLite file -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tflite_model():
    if not TFLITE.is_file():
        pytest.fail(f"shared weights missing: {TFLITE}")
    return mnv3.load(TFLITE)


def test_tflite_is_recognised(tflite_model):
    model = tflite_model
    assert model.spec.name == "mobilenet_v3_large_minimal_100"
    assert model.spec.padding == "same"
    assert model.spec.resolution == 224
    assert model.num_classes == 1000
    assert len(model.meta.classes) == 1000
    wnids = [line.split("\t")[0] for line in (IMAGENET / "classes.tsv").read_text().splitlines()]
    assert list(model.meta.classes) == wnids
    assert all(c.startswith("n") and len(c) == 9 for c in model.meta.classes)
    pre = model.meta.preprocess
    assert (pre.resolution, pre.resize, pre.interpolation) == (224, 256, "bilinear")
    low, high = [(v - pre.mean[0]) / pre.std[0] for v in (0.0, 1.0)]
    assert (low, high) == pytest.approx((-1.0, 1.0), abs=0.02)   # uint8 pixels mapped to [-1, 1]
    assert model.meta.source == f"tflite:{TFLITE.name}"


def test_tflite_matches_the_litert_interpreter(tflite_model):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(TFLITE))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and list(inp["shape"]) == [1, 224, 224, 3]

    pre = tflite_model.meta.preprocess
    folders = sorted(p for p in IMAGENET.iterdir() if p.is_dir())[::20][:10]
    assert len(folders) == 10
    agree = correct = 0
    for folder in folders:
        image = next(folder.glob("*.JPEG"))
        pixels = preprocess_pixels(load_image(image), pre)
        assert pixels.dtype == np.uint8 and pixels.shape == (224, 224, 3)
        interpreter.set_tensor(inp["index"], pixels[None])
        interpreter.invoke()
        theirs = int(np.argmax(interpreter.get_tensor(out["index"])[0])) - 1
        with torch.no_grad():
            ours = int(tflite_model(to_input(pixels, pre)).argmax(1))
        agree += ours == theirs
        correct += tflite_model.meta.classes[ours] == folder.name
    print(f"LiteRT agreement {agree}/10, correct {correct}/10")
    assert agree >= 8, f"top-1 agrees with LiteRT on {agree} of 10 images"
    assert correct >= 5, f"only {correct} of 10 images classified correctly"


def test_tflite_with_wrong_arch(tflite_model):
    with pytest.raises(mnv3.WeightsError, match="do not fit --arch mobilenet_v3_small"):
        mnv3.load(TFLITE, arch="mobilenet_v3_small")


def test_tflite_converts_to_a_model_file(tflite_model, tmp_path):
    loaded = mnv3.load(mnv3.save(tflite_model, tmp_path / "minimal.safetensors"))
    assert loaded.spec == tflite_model.spec
    assert loaded.meta == tflite_model.meta
    x = _input(224)
    with torch.no_grad():
        assert torch.equal(loaded(x), tflite_model(x))
