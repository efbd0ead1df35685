"""The `mnv3` command: info, convert, predict and eval, in-process (plus two real subprocess runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mnv3
from mnv3.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TFLITE = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
IMAGENET = SHARED / "data" / "imagenet-sample"
HYMENOPTERA = SHARED / "data" / "hymenoptera"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`mnv3 ARGV` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def is_error(err: str) -> bool:
    """One `error:` line: the last line of stderr (an informational line such as the thread
    choice may come before it)."""
    lines = err.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1


def last_json(text: str) -> dict:
    """With --json, stdout is exactly one JSON document (human output goes to stderr)."""
    return json.loads(text)


def _image(i: int = 0) -> Path:
    folders = sorted(p for p in IMAGENET.iterdir() if p.is_dir())
    return next(folders[i].glob("*.JPEG"))


def _class_folders(n: int, step: int = 10) -> list[Path]:
    return sorted(p for p in IMAGENET.iterdir() if p.is_dir())[::step][:n]


def _link_folders(root: Path, folders: list[Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def tv_small(tmp_path_factory) -> Path:
    """A torchvision mobilenet_v3_small state dict with random weights."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "tv_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).eval().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def minimal_file(tmp_path_factory) -> Path:
    """The authors' TFLite file converted to an mnv3 model file with `mnv3 convert`."""
    out = tmp_path_factory.mktemp("minimal") / "minimal.safetensors"
    assert main(["convert", str(TFLITE), "-o", str(out)]) == 0
    return out


# -- info -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, params", [("mobilenet_v3_large", 5_483_032),
                                          ("mobilenet_v3_small", 2_542_856)])
def test_info_json(capsys, arch, params):
    code, out, err = run(capsys, "info", arch, "--json")
    assert code == 0, err
    info = last_json(out)
    assert info["params"] == params
    assert info["arch"] == f"{arch}_100"
    assert info["resolution"] == 224 and info["num_classes"] == 1000
    assert info["macs"] > 0
    assert f"{params:,} parameters" in err           # the human-readable total agrees, on stderr
    assert "block1" in err or "layer" in err


def test_info_save_then_info_of_the_spec_file(capsys, tmp_path):
    spec_file = tmp_path / "spec.json"
    code, out, err = run(capsys, "info", "mobilenet_v3_large", "--save", spec_file, "--json")
    assert code == 0, err
    assert f"spec written to {spec_file}" in err
    first = last_json(out)
    assert sorted(os.listdir(tmp_path)) == ["spec.json"]
    assert mnv3.ArchSpec.load(spec_file) == mnv3.preset("mobilenet_v3_large")

    code, out, err = run(capsys, "info", spec_file, "--json")
    assert code == 0, err
    assert last_json(out) == first
    assert first["params"] == 5_483_032


def test_info_options_change_the_numbers(capsys):
    code, out, _ = run(capsys, "info", "mobilenet_v3_small", "--num-classes", "10", "--resolution", "160",
                       "--json")
    assert code == 0
    info = last_json(out)
    assert info["num_classes"] == 10 and info["resolution"] == 160
    assert info["params"] == 2_542_856 - 990 * 1025    # a 10-way classifier instead of 1000


def test_info_unknown_arch(capsys):
    code, out, err = run(capsys, "info", "mobilenet_v9_huge")
    assert code == 2
    assert is_error(err)
    assert "mobilenet_v9_huge" in err
    for name in ("mobilenet_v3_large", "mobilenet_v3_small", "mnasnet_a1"):
        assert name in err
    assert "Traceback" not in out + err


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2
    assert "info" in out and "convert" in out


# -- convert and predict --------------------------------------------------------------------------

def _ranked_lines(out: str, image: Path) -> list[str]:
    lines = out.splitlines()
    start = lines.index(str(image))
    return lines[start + 1:start + 6]


def test_convert_then_predict(capsys, tmp_path, tv_small):
    model_file = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "convert", tv_small, "--arch", "mobilenet_v3_small", "-o", model_file)
    assert code == 0, err
    assert "mobilenet_v3_small_100" in out
    assert "ImageNet ids and names" in out
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    loaded = mnv3.load(model_file)
    assert loaded.spec == mnv3.preset("mobilenet_v3_small")

    image = _image(0)
    code, out, err = run(capsys, "predict", "--weights", model_file, image, "--json")
    assert code == 0, err
    ranked = _ranked_lines(err, image)
    probs = []
    for rank, line in enumerate(ranked, start=1):
        assert line.strip().startswith(f"{rank}.")
        assert "(n0" in line or "(n1" in line          # "name (wnid)"
        probs.append(float(line.split("%")[0].split()[-1]))
    assert probs == sorted(probs, reverse=True)
    result = last_json(out)
    assert result["failed"] == 0
    top = result["results"][0]["top"]
    assert len(top) == 5 and all(0 <= t["prob"] <= 1 for t in top)
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)


def test_convert_recognises_torchvision_without_arch(capsys, tmp_path, tv_small):
    code, out, err = run(capsys, "convert", tv_small, "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "mobilenet_v3_small_100" in out


def test_convert_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "convert", tmp_path / "missing.pth", "-o", tmp_path / "m.safetensors")
    assert code == 2
    assert is_error(err) and "no such file" in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "m.safetensors").exists()


def test_predict_with_a_corrupt_image(capsys, tmp_path, minimal_file):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(os.urandom(2048))
    good = _image(3)
    code, out, err = run(capsys, "predict", "--weights", minimal_file, bad, good, tmp_path / "gone.png",
                         "--top", "3")
    assert code == 2
    assert "x.jpg" in err and "cannot read image" in err
    assert "gone.png" in err and "no such image file" in err
    assert "2 of 3 image(s) could not be read" in err
    assert str(bad) not in out
    lines = out.splitlines()
    start = lines.index(str(good))
    assert [line.strip()[:2] for line in lines[start + 1:start + 4]] == ["1.", "2.", "3."]
    assert good.parent.name in "".join(lines[start + 1:start + 4])   # the ImageNet model knows this photo


# -- eval -----------------------------------------------------------------------------------------

def test_eval_imported_tflite_on_imagenet_sample(capsys, tmp_path, minimal_file):
    data = _link_folders(tmp_path / "data", _class_folders(20))
    code, out, err = run(capsys, "eval", "--weights", minimal_file, "--data", data, "--json",
                         "--no-progress", "--batch-size", "8")
    assert code == 0, err
    result = last_json(out)
    assert result["images"] == 20 and result["skipped"] == 0
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["top1"] >= 0.5, result
    assert "mobilenet_v3_large_minimal_100" in err


def test_eval_skips_a_corrupt_image(capsys, tmp_path, minimal_file):
    folders = _class_folders(3, step=37)
    data = _link_folders(tmp_path / "data", folders[1:])
    own = data / folders[0].name                    # a real folder: one good photo, one broken file
    own.mkdir()
    photo = next(folders[0].glob("*.JPEG"))
    (own / photo.name).symlink_to(photo)
    (own / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + os.urandom(512))
    code, out, err = run(capsys, "eval", "--weights", minimal_file, "--data", data, "--json",
                         "--no-progress")
    assert code == 0, err
    result = last_json(out)
    assert result["skipped"] == 1
    assert result["images"] == 3
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert "skipped 1 unreadable image(s)" in err and "broken.JPEG" in err


def test_eval_with_foreign_class_folders(capsys, tmp_path, minimal_file):
    data = _link_folders(tmp_path / "data", [HYMENOPTERA / "val" / "ants", HYMENOPTERA / "val" / "bees"])
    code, out, err = run(capsys, "eval", "--weights", minimal_file, "--data", data, "--no-progress")
    assert code == 2
    assert is_error(err)
    assert "ants" in err and "bees" in err and "not classes of this model" in err
    assert "n01440764" in err                          # it says what the names should look like
    assert "Traceback" not in out + err


def test_eval_on_an_empty_folder(capsys, tmp_path, minimal_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "eval", "--weights", minimal_file, "--data", empty, "--no-progress")
    assert code == 2
    assert is_error(err) and "no class folders" in err
    assert "top-1" not in out
    (empty / "n01440764").mkdir()                      # a class folder without images
    code, _, err = run(capsys, "eval", "--weights", minimal_file, "--data", empty, "--no-progress")
    assert code == 2
    assert "no images found" in err
    code, _, err = run(capsys, "eval", "--weights", minimal_file, "--data", tmp_path / "nowhere")
    assert code == 2 and "no such folder" in err


# -- real processes -------------------------------------------------------------------------------

def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "mnv3", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for command in ("info", "convert", "predict", "eval"):
        assert command in proc.stdout


def test_console_script_exit_code():
    exe = shutil.which("mnv3", path=str(Path(sys.executable).parent)) or shutil.which("mnv3")
    assert exe, "the mnv3 console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "info", "not_a_network"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert is_error(proc.stderr) and "mobilenet_v3_large" in proc.stderr
    assert "Traceback" not in proc.stderr
