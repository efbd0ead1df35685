"""What every command owes its user, tested over every command the parser has, so that the next
command added inherits it: an unwritable output path is one error line before any work; a model
file is accepted wherever a network is; `--json` stdout is exactly one JSON document; files are
written with the umask's mode; default output names never replace an earlier result."""

from __future__ import annotations

import argparse
import csv
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import mnv3
from mnv3.cli import build_parser, main
from mnv3.files import atomic_write_text, check_writable, unused_path
from mnv3.weights import ModelMeta, Preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera"
UNWRITABLE = "/proc/mnv3-nope/out"       # /proc takes no new files, even for root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command and sub-command ("lut build") with its parser."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                        walk(sub, f"{prefix}{name} ")
                    else:
                        found[f"{prefix}{name}"] = sub

    walk(build_parser(), "")
    return found


def output_flags() -> list[tuple[str, str, str]]:
    """(command, flag, kind) for every output path a command declares."""
    rows = []
    for name, parser in commands().items():
        for dest, flag, kind in parser.get_default("outputs") or ():
            rows.append((name, flag, kind))
    return rows


# The least each command needs to parse; an output check runs before anything is read.
MINIMAL = {
    "info": ["mobilenet_v3_small"],
    "convert": ["some.pth", "-o", "x.safetensors"],
    "bench": ["mobilenet_v3_small", "--runtime", "onnxruntime"],
    "lut space": [],
    "lut build": ["--runtime", "onnxruntime"],
    "lut validate": ["--runtime", "onnxruntime", "--n", "2"],
    "train": ["--data", "digits"],
    "search": [],
    "adapt": ["--weights", "m.safetensors", "--data", "digits", "--target-ratio", "0.8"],
    "eval": ["--weights", "m.safetensors", "--data", "folder"],
    "predict": ["--weights", "m.safetensors", "image.jpg"],
    "export": ["m.safetensors", "-o", "m.onnx"],
    "supernet train": [],
    "supernet estimate": ["runs/supernet"],
    "supernet extract": ["runs/supernet", "--largest", "--output", "m.safetensors"],
}


def argv_with(command: str, flag: str, value: str) -> list[str]:
    base = list(MINIMAL[command])
    if flag in base:
        base[base.index(flag) + 1] = value
    else:
        base += [flag, value]
    return [*command.split(), *base]


def test_every_command_has_a_minimal_invocation():
    assert set(commands()) == set(MINIMAL), "add the new command to MINIMAL (and to JSON_RUNS if it has --json)"
    assert {c for c, _, _ in output_flags()} >= {"info", "convert", "bench", "lut space", "lut validate", "train"}


@pytest.mark.parametrize("command, flag, kind", output_flags())
def test_unwritable_output_path_fails_before_any_work(command, flag, kind, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for value, why in ((UNWRITABLE, "cannot write"), (str(a_file / "below"), "is a file")):
        code, out, err = run(capsys, *argv_with(command, flag, value))
        assert code == 2, (command, flag, err)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error:") and flag in lines[-1] and why in lines[-1], lines
        assert "Traceback" not in err and out == ""
    assert sorted(os.listdir(tmp_path)) == ["a_file"]       # nothing was measured, trained or written


def test_check_writable_cases(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper" / "f.csv") == tmp_path / "new" / "deeper" / "f.csv"
    assert not (tmp_path / "new").exists()                  # checking creates nothing
    with pytest.raises(ValueError, match="is a folder"):
        check_writable(tmp_path, kind="file", flag="--csv")
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(tmp_path / "f", kind="dir", flag="--out")


# -- model files wherever a network is accepted -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    spec = mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32)
    torch.manual_seed(0)
    model = mnv3.build(spec, 2)
    meta = ModelMeta(classes=("ants", "bees"), class_names=("ant", "bee"), preprocess=Preprocess.for_resolution(32))
    return mnv3.save(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", meta)


def network_arguments() -> set[tuple[str, str]]:
    """(command, argument) for every argument that names a network or a search space's seed."""
    found = set()
    for name, parser in commands().items():
        for action in parser._actions:
            if action.dest in ("arch", "archs", "space") and name not in ("eval", "predict", "convert", "export"):
                found.add((name, action.option_strings[-1] if action.option_strings else action.dest))
    return found


MODEL_FILE_RUNS = {
    ("info", "arch"): ["info", "{model}"],
    ("bench", "archs"): ["bench", "{model}", "--runtime", "torch", "--runs", "50", "--no-progress",
                         "--csv", "{tmp}/b.csv"],
    ("train", "--arch"): ["train", "--data", "digits", "--arch", "{model}", "--epochs", "1", "--batch-size", "64",
                          "--no-progress", "--out", "{tmp}/run"],
    ("lut space", "--space"): ["lut", "space", "--space", "{model}"],
    ("lut build", "--space"): None,        # the same space_from_args as lut space
    ("lut validate", "--space"): None,
    ("search", "--space"): None,           # a seed read by resolve_arch, as info's ARCH
    ("supernet train", "--space"): None,   # the search's resolve_space
}


def test_every_network_argument_is_covered():
    assert network_arguments() == set(MODEL_FILE_RUNS)


@pytest.mark.parametrize("key", [k for k, v in MODEL_FILE_RUNS.items() if v])
def test_a_model_file_is_accepted_wherever_a_network_is(key, tiny_model, capsys, tmp_path):
    argv = [a.format(model=tiny_model, tmp=tmp_path) for a in MODEL_FILE_RUNS[key]]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    if key[0] == "train":                # trained from scratch with the file's network
        trained = mnv3.load(tmp_path / "run" / "model.safetensors").spec
        file_spec = mnv3.ArchSpec.load(tiny_model)
        assert [b.out for b in trained.blocks] == [b.out for b in file_spec.blocks]
    else:
        assert "mobilenet_v3_small_035" in out + err
    if key[0] == "info":
        assert "ant (ants)" in out and "preprocess: resize 37, crop 32" in out
    binary = tmp_path / "random.bin"
    binary.write_bytes(os.urandom(4096))
    bad = [str(binary) if a == str(tiny_model) else a.replace(f"{tmp_path}/run", f"{tmp_path}/other")
           for a in argv]
    code, out, err = run(capsys, *bad)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "binary file" in last and "Traceback" not in err


def test_info_json_of_a_model_file(tiny_model, capsys):
    code, out, err = run(capsys, "info", tiny_model, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["num_classes"] == 2 and doc["classes"] == ["ants", "bees"]
    assert doc["preprocess"]["resolution"] == 32 and doc["params"] == mnv3.count(
        mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32), 2).params


def test_a_safetensors_file_without_a_spec(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    code, _, err = run(capsys, "info", path)
    assert code == 2 and "not an mnv3 model file" in err and "mnv3 convert" in err


# -- --json: one document on stdout, for every command ------------------------------------------------
JSON_RUNS = {
    "info": [["info", "mobilenet_v3_small", "--resolution", "32"]],
    "convert": [["convert", "{model}", "-o", "{tmp}/c.safetensors"]],
    "bench": [["bench", "mobilenet_v3_small", "{model}", "--runtime", "torch", "--resolution", "32",
               "--no-progress", "--csv", "{tmp}/b.csv"]],
    "lut space": [["lut", "space", "--space", "mobilenet_v3_small", "--resolution", "32"]],
    "lut build": [],
    "lut validate": [],
    "search": [],
    "adapt": [],
    "train": [["train", "--data", "digits", "--arch", "mobilenet_v3_small", "--width", "0.35", "--epochs", "1",
               "--batch-size", "64", "--no-progress", "--out", "{tmp}/run"]],
    "eval": [["eval", "--weights", "{model}", "--data", str(HYMENOPTERA / "val"), "--no-progress"]],
    "predict": [["predict", "--weights", "{model}", str(HYMENOPTERA / "val" / "ants")]],
    "export": [["export", "{model}", "-o", "{tmp}/e.onnx"]],
    "supernet train": [],
    "supernet estimate": [],
    "supernet extract": [],
}
# lut build and validate measure a table (a minute even for a tiny space), search trains networks:
# their --json is parsed as one document in tests/test_lut.py (test_lut_build_kill_resume_and_validate_cli),
# tests/test_search.py (test_search_measure_end_to_end_then_train_the_winner) and tests/test_adapt.py
# (test_adapt_end_to_end_cli); the supernet's train, estimate and extract in tests/test_supernet.py.
COVERED_ELSEWHERE = {"lut build", "lut validate", "search", "adapt", "supernet train", "supernet estimate",
                     "supernet extract"}


def json_commands() -> set[str]:
    return {name for name, parser in commands().items()
            if any(a.dest == "json" for a in parser._actions)}


def test_every_json_command_is_covered():
    assert json_commands() == set(JSON_RUNS)


@pytest.mark.parametrize("command", sorted(set(JSON_RUNS) - COVERED_ELSEWHERE))
def test_json_stdout_is_one_document(command, tiny_model, capsys, tmp_path):
    for argv in JSON_RUNS[command]:
        argv = [a.format(model=tiny_model, tmp=tmp_path) for a in argv] + ["--json"]
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        doc = json.loads(out)             # the whole of stdout, nothing else
        assert isinstance(doc, dict) and doc
        assert err.strip(), "human output still goes somewhere (stderr)"


# -- file modes and default names ----------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(umask, mode, tmp_path, tiny_model, capsys):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert run(capsys, "info", tiny_model, "--save", tmp_path / "spec.json")[0] == 0
        assert run(capsys, "convert", tiny_model, "-o", tmp_path / "m.safetensors")[0] == 0
    finally:
        os.umask(old)
    for name in ("a.txt", "spec.json", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_bench_adds_rows_and_never_replaces_a_foreign_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "mobilenet_v3_small", "--width", "0.35", "--resolution", "32", "--runtime", "torch",
            "--no-progress"]
    code, out, err = run(capsys, *args)
    assert code == 0, err and "written mnv3-bench.csv" in out
    code, out, err = run(capsys, *args)
    assert code == 0 and "1 row(s) appended to mnv3-bench.csv" in out
    with open(tmp_path / "mnv3-bench.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    code, out, err = run(capsys, *args, "--csv", "other.csv")
    assert code == 0 and "other.csv has other columns and was kept; written other-2.csv" in out
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"


def test_unused_path(tmp_path):
    p = tmp_path / "plot.png"
    assert unused_path(p) == p
    p.write_text("")
    assert unused_path(p) == tmp_path / "plot-2.png"
    (tmp_path / "plot-2.png").write_text("")
    assert unused_path(p) == tmp_path / "plot-3.png"
