"""Training: recipes, data sets, the engine on real photographs, resume after SIGKILL, torchrun DDP,
fine-tuning from the authors' TFLite weights, and every bad argument giving a clear error."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mnv3
from mnv3.cli import main
from mnv3.data.datasets import EpochBatches, TrainSet, open_data
from mnv3.train.engine import read_checkpoint
from mnv3.train.recipe import RecipeError, builtin_recipes, load_recipe

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera"
CIFAR = SHARED / "data" / "cifar10"
TFLITE = SHARED / "weights" / "v3-large-minimalistic_224_1.0_uint8.tflite"
# A tiny but real run: width 0.35 at 32 px, a handful of real photographs.
TINY = ["--arch", "mobilenet_v3_small", "--width", "0.35", "--resolution", "32", "--batch-size", "4",
        "--no-progress", "--workers", "0"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(text: str) -> dict:
    """With --json, stdout is exactly one JSON document (human output goes to stderr)."""
    return json.loads(text)


def subset(root: Path, dest: Path, per_class: int, splits=("train", "val")) -> Path:
    """A small image folder of symlinks to real images (the shared data are never copied)."""
    for split in splits:
        for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            out = dest / split / cls.name
            out.mkdir(parents=True)
            for img in sorted(cls.iterdir())[:per_class]:
                (out / img.name).symlink_to(img)
    return dest


@pytest.fixture
def ants_bees(tmp_path: Path) -> Path:
    return subset(HYMENOPTERA, tmp_path / "ants_bees", 6)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def kill_in_second_epoch(proc: subprocess.Popen, out: Path, kill) -> None:
    """Wait until `out` holds a checkpoint taken mid-way through epoch 2, then `kill(proc)`."""
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                ckpt = read_checkpoint(out / "checkpoint.pt") if (out / "checkpoint.pt").exists() else {}
            except Exception:          # noqa: BLE001 - caught between rename and read
                ckpt = {}
            # at or past the first mid-epoch-2 checkpoint: a later one counts too, since a fast run can
            # write the next one (or finish the epoch) between two polls
            if (ckpt.get("epoch", 0), ckpt.get("batch", 0)) >= (1, 1):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        kill(proc)
        proc.wait()
    finally:
        if proc.poll() is None:
            kill(proc)
            proc.wait()


# -- recipes -----------------------------------------------------------------------------------------
def test_builtin_recipes_hold_the_papers_values():
    assert {"paper", "finetune", "cifar"} <= set(builtin_recipes())
    paper = load_recipe("paper")
    assert (paper.optimizer, paper.momentum, paper.lr, paper.lr_batch) == ("rmsprop", 0.9, 0.1, 4096)
    assert (paper.weight_decay, paper.dropout, paper.ema_decay) == (1e-5, 0.2, 0.9999)
    assert paper.schedule == "step" and paper.decay_rate == 0.99 and paper.decay_epochs == 3
    assert paper.warmup_epochs > 0
    # lr 0.1 at batch 4096, scaled linearly; x0.99 every 3 epochs after the warm-up
    r = paper.override({"batch_size": "1024", "warmup_epochs": "0"})
    assert r.scaled_lr() == pytest.approx(0.025)
    assert r.lr_at(0, 100) == pytest.approx(0.025)
    assert r.lr_at(299, 100) == pytest.approx(0.025)
    assert r.lr_at(300, 100) == pytest.approx(0.025 * 0.99)
    assert r.lr_at(905, 100) == pytest.approx(0.025 * 0.99**3)
    warm = paper.override({"batch_size": "4096"})
    assert warm.lr_at(0, 10) < warm.lr_at(25, 10) < warm.lr_at(49, 10) == pytest.approx(0.1)
    fine = load_recipe("finetune")
    assert fine.schedule == "cosine" and fine.label_smoothing > 0 and fine.augment == "rrc"
    assert fine.lr_at(fine.epochs * 10 - 1, 10) < 0.01 * fine.lr_at(0, 10)


def test_warmup_is_at_most_a_tenth_of_the_run():
    cifar = load_recipe("cifar")
    assert cifar.warmup_epochs == 1 and cifar.warmup == 1          # 30 epochs: the recipe's warm-up
    short = cifar.override({"epochs": "3"})
    assert short.warmup == pytest.approx(0.3)
    peak = short.scaled_lr()
    rates = [short.lr_at(step, 45) for step in range(135)]
    assert rates[0] < rates[6] < rates[13] <= peak                   # warm-up: 0.3 x 45 = 13.5 steps
    assert rates[14] == pytest.approx(peak, rel=0.01) and rates[-1] < 0.01 * peak


def test_recipe_overrides_and_files(tmp_path):
    r = load_recipe("finetune").override({"lr": "0.5", "dropout": "none", "channels-last": "true", "epochs": "2"})
    assert (r.lr, r.dropout, r.channels_last, r.epochs) == (0.5, None, True, 2)
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("optimizer: rmsprop\nlr: 0.02\nepochs: 3\nema_decay: 0.99\n")
    mine = load_recipe(yaml_file)
    assert (mine.name, mine.optimizer, mine.lr, mine.epochs, mine.ema_decay) == ("mine", "rmsprop", 0.02, 3, 0.99)
    json_file = tmp_path / "j.json"
    json_file.write_text(json.dumps(load_recipe("paper").to_dict()))
    assert load_recipe(json_file) == load_recipe("paper")


@pytest.mark.parametrize("change, message", [
    ({"lr": "fast"}, "lr: expected float"),
    ({"optimizer": "lion"}, "optimizer: expected one of sgd, rmsprop, adamw"),
    ({"learning_rate": "0.1"}, "unknown recipe key 'learning_rate'"),
    ({"momentum": "1.5"}, "momentum: expected a number in [0, 1)"),
    ({"epochs": "0"}, "epochs: expected an integer >= 1"),
    ({"channels_last": "maybe"}, "channels_last: expected bool"),
])
def test_bad_recipe_values_name_the_key(change, message):
    with pytest.raises(RecipeError) as err:
        load_recipe("paper").override(change)
    assert message in str(err.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="not a built-in recipe"):
        load_recipe("nonexistent")
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1, "colour": "blue"}')
    with pytest.raises(RecipeError, match="unknown key.*colour"):
        load_recipe(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1\n")
    with pytest.raises(RecipeError, match="not valid YAML|not a valid recipe"):
        load_recipe(broken)


# -- threads -------------------------------------------------------------------------------------------
def test_threads_leave_out_busy_cores_processes_and_workers(monkeypatch, tmp_path, capsys):
    from mnv3.train.threads import ThreadsError, available_cores, busy_cores, choose_threads

    cores = available_cores()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert choose_threads(3) == (3, "--threads")
    with pytest.raises(ThreadsError, match="at least 1"):
        choose_threads(0)
    assert choose_threads(busy=0.0)[0] == cores
    assert choose_threads(busy=0.1)[0] == cores                 # a little background is not a core
    assert choose_threads(busy=float(cores))[0] == 1
    assert choose_threads(busy=0.0, workers=1)[0] == max(1, cores - 1)
    if cores > 1:
        threads, why = choose_threads(busy=0.9)
        assert threads == cores - 1 and "1 busy with other processes" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")                 # torchrun's two local processes
    assert choose_threads(busy=0.0)[0] == max(1, cores // 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    # a real competing process is seen
    spinner = subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores() >= 0.7
    finally:
        spinner.kill()
        spinner.wait()
    code, _, err = run(capsys, "train", "--data", "digits", "--out", tmp_path / "t", "--threads", "0")
    assert code == 2 and "--threads: expected at least 1, got 0" in err


# -- data ----------------------------------------------------------------------------------------------
def test_folder_errors_come_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    code, _, err = run(capsys, "train", "--data", empty, "--out", tmp_path / "o1", *TINY)
    assert code == 2 and "no images found" in err
    mismatched = subset(HYMENOPTERA, tmp_path / "mm", 2)
    (mismatched / "val" / "bees").rename(mismatched / "val" / "wasps")
    code, _, err = run(capsys, "train", "--data", mismatched, "--out", tmp_path / "o2", *TINY)
    assert code == 2 and "different classes" in err and "wasps" in err
    no_val = tmp_path / "noval"
    (no_val / "train" / "a").mkdir(parents=True)
    code, _, err = run(capsys, "train", "--data", no_val, "--out", tmp_path / "o3", *TINY)
    assert code == 2 and "val/" in err
    code, _, err = run(capsys, "train", "--data", tmp_path / "missing", "--out", tmp_path / "o4", *TINY)
    assert code == 2 and "no such folder" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_digits_and_cifar_folders_open_offline():
    digits = open_data("digits")
    assert len(digits.classes) == 10 and len(digits.train) + len(digits.val) == 1797
    assert 0.15 < len(digits.val) / 1797 < 0.25 and digits.resolution == 32
    assert digits.train.image(0).size == (8, 8)
    cifar = open_data(CIFAR)
    assert cifar.classes[0] == "airplane" and len(cifar.train) == 50000 and len(cifar.val) == 10000
    assert cifar.resolution == 32 and cifar.total_stride == 8


def test_augmentation_is_seeded_per_sample_and_epoch():
    data = open_data(HYMENOPTERA)
    pre = mnv3.Preprocess(resolution=32, resize=37)
    a, b = TrainSet(data.train, pre, seed=1), TrainSet(data.train, pre, seed=1)
    torch.manual_seed(0)
    x1 = a[3][0]
    torch.manual_seed(123)        # the global RNG does not matter, and is left as it was
    state = torch.get_rng_state()
    assert torch.equal(x1, b[3][0]) and torch.equal(state, torch.get_rng_state())
    b.epoch = 1
    assert not torch.equal(x1, b[3][0])
    # process r of 2 gets its half of every global batch; together they are the single-process batches
    one = list(EpochBatches(10, 4, seed=5, epoch=2))
    halves = [list(EpochBatches(10, 4, seed=5, epoch=2, rank=r, world=2)) for r in (0, 1)]
    assert [h0 + h1 for h0, h1 in zip(*halves)] == one and len(one) == 2
    assert list(EpochBatches(10, 4, seed=5, epoch=2, start=1)) == one[1:]


# -- the engine on real images -------------------------------------------------------------------------
def test_train_writes_a_run_that_eval_and_predict_accept(ants_bees, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "2",
                            "--recipe", "finetune", "--json", "--ema-decay", "0.9", *TINY)
    assert code == 0, err
    result = last_json(stdout)
    assert 0 <= result["top1"] <= result["top5"] <= 1 and result["model"] == str(out / "model.safetensors")
    for name in ("recipe.json", "run.json", "metrics.csv", "curves.png", "checkpoint.pt", "result.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["name"] == "finetune" and saved["ema_decay"] == 0.9 and saved["resolution"] == 32
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[-1]["val_top1"]) == pytest.approx(result["top1"])
    model = mnv3.load(out / "model.safetensors")
    assert model.meta.classes == ("ants", "bees") and model.meta.preprocess.resolution == 32
    assert model.meta.training["recipe"] == "finetune" and model.spec.head.dropout == 0.2
    code, stdout, _ = run(capsys, "eval", "--weights", out / "model.safetensors", "--data", ants_bees / "val",
                          "--json", "--no-progress")
    assert code == 0 and last_json(stdout)["top1"] == pytest.approx(result["top1"])
    code, stdout, _ = run(capsys, "predict", "--weights", out / "model.safetensors",
                          next((ants_bees / "val" / "bees").iterdir()))
    assert code == 0 and ("ants" in stdout or "bees" in stdout)


def test_corrupt_images_are_skipped_counted_and_reported(ants_bees, tmp_path, capsys):
    (ants_bees / "train" / "ants" / "zz_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (ants_bees / "train" / "bees" / "zz_empty.png").write_bytes(b"")
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "1", "--json",
                            "--batch-size", "2", *TINY)
    assert code == 0, err
    assert last_json(stdout)["skipped_images"] == 2
    assert "skipped 2 unreadable image(s)" in err and "zz_broken.jpg" in err
    assert metrics(out)[0]["skipped"] == "2"
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", tmp_path / "strict", "--epochs", "1",
                       "--strict", *TINY)
    assert code == 2 and "--strict" in err and ("zz_broken.jpg" in err or "zz_empty.png" in err)


def test_bad_arguments_give_clear_errors(ants_bees, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--resume", *TINY)
    assert code == 2 and f"{out}: no such run folder to resume" in err
    out.mkdir()
    code, _, err = run(capsys, "train", "--out", out, "--resume", *TINY)
    assert code == 2 and "no checkpoint to resume from" in err
    out.rmdir()
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--batch-size", "64",
                       *TINY[:-5], "--no-progress")
    assert code == 2 and "larger than the 12 training images" in err
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--amp", "fp16", *TINY)
    assert code == 2 and "fp16 needs a CUDA device" in err
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--set", "lr", *TINY)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--recipe", "nope", *TINY)
    assert code == 2 and "not a built-in recipe" in err
    code, _, err = run(capsys, "train", "--out", out, *TINY)
    assert code == 2 and "--data is required" in err
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--arch", "resnet50", *TINY[2:])
    assert code == 2 and "resnet50" in err
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "1", *TINY)
    assert code == 0
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "1", *TINY)
    assert code == 2 and "already holds a run" in err
    # resuming must continue the same run: another network, data set or recipe is refused
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--resume", "--epochs", "1",
                       *TINY[:3], "0.5", *TINY[4:])
    assert code == 2 and "different network spec" in err
    other = subset(HYMENOPTERA, tmp_path / "other", 5)
    code, _, err = run(capsys, "train", "--data", other, "--out", out, "--resume", "--epochs", "1", *TINY)
    assert code == 2 and "different data set" in err and str(ants_bees) in err and str(other) in err
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--lr", "0.5", "--no-progress")
    assert code == 2 and "changed recipe" in err and "lr" in err
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (tmp_path / "foreign.pt").rename(bad / "checkpoint.pt")
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", bad, "--resume", *TINY)
    assert code == 2 and "not an mnv3 training checkpoint" in err


def test_resume_with_more_epochs_extends_the_run(ants_bees, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "2", "--recipe", "finetune",
                       *TINY)
    assert code == 0, err
    # a finished run continues for the added epochs, on the longer run's schedule (and says when it
    # uses another thread count than the run did: results then differ in the last digits)
    used = read_checkpoint(out / "checkpoint.pt")["threads"]
    code, stdout, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "4", "--no-progress", "--json",
                            "--threads", used + 1)
    assert code == 0, err
    assert f"the run so far used {used} thread(s) per process, now {used + 1}" in err
    assert f"resuming {out} at epoch 3 of 4 (step 6)" in err
    assert "extending the run from 2 to 4 epochs at step 6" in err
    assert last_json(stdout)["epochs"] == 4
    rows = metrics(out)
    assert [(r["epoch"], r["epochs"], r["step"]) for r in rows] == [
        ("1", "2", "3"), ("2", "2", "6"), ("3", "4", "9"), ("4", "4", "12")]
    longer = load_recipe("finetune").override({"epochs": 4, "batch_size": 4, "resolution": 32})
    assert float(rows[2]["lr"]) == pytest.approx(longer.lr_at(8, 3))
    assert float(rows[1]["lr"]) == pytest.approx(longer.override({"epochs": 2}).lr_at(5, 3))
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["epochs"] == 4
    assert saved["extended"] == [{"at_epoch": 2, "at_step": 6, "from_epochs": 2, "to_epochs": 4}]
    assert load_recipe(out / "recipe.json").epochs == 4          # the record is not a recipe key
    assert mnv3.load(out / "model.safetensors").meta.training["epochs"] == 4
    # extended twice: both records kept; a plain --resume of the finished run changes nothing
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "5", "--no-progress", "--threads", used)
    assert code == 0, err
    assert [r["epochs"] for r in metrics(out)] == ["2", "2", "4", "4", "5"]
    assert [e["to_epochs"] for e in json.loads((out / "recipe.json").read_text())["extended"]] == [4, 5]
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert code == 0 and len(metrics(out)) == 5 and "extending" not in err and "at the end of its 5 epochs" in err
    # other recipe changes, and fewer epochs, are still refused
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "6", "--lr", "0.5", "--no-progress")
    assert code == 2 and "changed recipe (lr: run" in err and "epochs" not in err.split("changed recipe")[1]
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--epochs", "3", "--no-progress")
    assert code == 2 and "fewer epochs than the run plans (3 < 5)" in err


def test_eval_every_validates_the_first_every_nth_and_last_epoch(ants_bees, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", out, "--epochs", "4", "--eval-every", "3",
                       "--recipe", "finetune", *TINY)
    assert code == 0, err
    rows = metrics(out)
    assert [r["val_top1"] != "nan" for r in rows] == [True, False, True, True]
    assert all(r["train_loss"] != "nan" for r in rows)
    assert json.loads((out / "result.json").read_text())["top1"] == pytest.approx(float(rows[-1]["val_top1"]))
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", tmp_path / "bad", "--eval-every", "0", *TINY)
    assert code == 2 and "--eval-every 0: must be 1 or more" in err


def test_resume_after_sigkill_ends_with_the_same_metrics(ants_bees, tmp_path, capsys):
    # one thread throughout: the default follows the machine's load, and thread counts round sums differently
    args = ["train", "--data", ants_bees, "--epochs", "3", "--recipe", "finetune", "--ema-decay", "0.5",
            "--checkpoint-steps", "1", "--threads", "1", *TINY]
    code, _, err = run(capsys, *args, "--out", tmp_path / "whole")
    assert code == 0, err
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mnv3", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_in_second_epoch(proc, out, lambda p: os.kill(p.pid, signal.SIGKILL))
    # Killed after a checkpoint taken mid-way through epoch 2: epoch 2's row may already be written
    # (outputs come before the epoch's checkpoint), but the run did not finish.
    assert not (out / "model.safetensors").exists() and len(metrics(out)) in (1, 2)
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--no-progress", "--threads", "1")
    assert code == 0, err
    whole, resumed = metrics(tmp_path / "whole"), metrics(out)
    assert len(resumed) == 3
    for a, b in zip(whole, resumed):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key
    w1 = mnv3.load(tmp_path / "whole" / "model.safetensors").state_dict()
    w2 = mnv3.load(out / "model.safetensors").state_dict()
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1)


def test_torchrun_two_processes_match_one_process(ants_bees, tmp_path, capsys):
    # A high learning rate so the weights move; without synchronised batch norm they end far apart.
    args = ["train", "--data", ants_bees, "--epochs", "2", "--recipe", "finetune", "--dropout", "0",
            "--label-smoothing", "0", "--lr", "0.3", *TINY]
    code, _, err = run(capsys, *args, "--out", tmp_path / "single")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", "-m", "mnv3", *map(str, args), "--out", str(tmp_path / "ddp"),
                           "--json"], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"top1"') == 1          # one process reports
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_loss", "val_top1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3, abs=1e-4), key
    w1 = mnv3.load(tmp_path / "single" / "model.safetensors").state_dict()
    w2 = mnv3.load(tmp_path / "ddp" / "model.safetensors").state_dict()
    # Tiny per-process batches (2 images) amplify float rounding a little, most in the running
    # variances; without synchronised batch norm the weights differ by ~100.
    assert all(torch.allclose(w1[k], w2[k], atol=1e-3) for k in w1 if "running" not in k and w1[k].is_floating_point())
    assert all(torch.allclose(w1[k], w2[k], rtol=5e-2, atol=1e-3) for k in w1 if "running" in k)
    assert any(not torch.allclose(w1[k].float(), mnv3.build(mnv3.preset("mobilenet_v3_small", 0.35, 32), 2)
                                  .state_dict()[k].float(), atol=1e-2) for k in w1 if "classifier" not in k)


# -- fine-tuning ---------------------------------------------------------------------------------------
def test_finetune_from_the_authors_tflite_replaces_the_classifier(ants_bees, tmp_path, capsys):
    out = tmp_path / "ft"
    code, stdout, err = run(capsys, "train", "--data", ants_bees, "--weights", TFLITE, "--out", out,
                            "--epochs", "1", "--resolution", "64", "--batch-size", "4", "--no-progress",
                            "--json")
    assert code == 0, err
    model = mnv3.load(last_json(stdout)["model"])
    assert model.num_classes == 2 and model.classifier.weight.shape == (2, 1280)
    assert model.spec.name.startswith("mobilenet_v3_large_minimal") and model.spec.padding == "same"
    assert model.meta.preprocess.mean == pytest.approx((0.5, 0.5, 0.5), abs=0.01)   # TF: [-1, 1] input
    assert model.meta.source == str(TFLITE)


def test_freeze_backbone_trains_the_head_only(ants_bees, tmp_path, capsys):
    from mnv3.train.classify import train

    start = mnv3.build(mnv3.preset("mobilenet_v3_small", 0.35, 32), 2)
    torch.manual_seed(0)
    start.reset_classifier(2)
    mnv3.save(start, tmp_path / "start.safetensors", mnv3.ModelMeta(classes=("x", "y")))
    recipe = load_recipe("finetune").override({"epochs": 1, "batch_size": 4, "resolution": 32,
                                               "freeze_backbone": True, "lr": 0.5})
    result = train(ants_bees, tmp_path / "frozen", weights=str(tmp_path / "start.safetensors"),
                   recipe=recipe, progress=False)
    before, after = mnv3.load(tmp_path / "start.safetensors"), mnv3.load(result.model_path)
    b, a = before.state_dict(), after.state_dict()
    backbone = [k for k in b if k.startswith(("stem.", "blocks.", "last_conv."))]
    head = [k for k in b if k.startswith(("pre_logits.", "classifier."))]
    assert backbone and head
    assert all(torch.equal(b[k], a[k]) for k in backbone)      # BN statistics included
    assert any(not torch.equal(b[k], a[k]) for k in head)


def test_recipe_defaults_follow_the_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "train", "--data", "digits", "--epochs", "1", "--width", "0.35",
                       "--batch-size", "256", "--no-progress")
    assert code == 0, err
    assert "recipe cifar" in err and (tmp_path / "runs" / "digits-mobilenet_v3_small_035" / "model.safetensors").is_file()
    model = mnv3.load(tmp_path / "runs" / "digits-mobilenet_v3_small_035" / "model.safetensors")
    assert model.spec.total_stride() == 8 and model.meta.preprocess.resolution == 32
    assert model.meta.preprocess.resize == 32        # crop_pct 1.0: small images are not cropped



def test_three_epochs_of_digits_learn(tmp_path, capsys):
    # A short run learns: the warm-up is at most a tenth of the run, and the cifar recipe's batch
    # of 32 gives 45 steps per epoch of digits' 1442 training images.
    code, stdout, err = run(capsys, "train", "--data", "digits", "--epochs", "3", "--out", tmp_path / "d",
                            "--no-progress", "--json")
    assert code == 0, err
    assert last_json(stdout)["top1"] > 0.5                       # chance is 0.1
    assert err.count("threads: ") == 1 and " per process (" in err      # the choice, printed once


def test_finetune_from_a_torchvision_state_dict(ants_bees, tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    peer = torchvision.models.mobilenet_v3_small()     # 1000 ImageNet-shaped outputs
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    code, stdout, err = run(capsys, "train", "--data", ants_bees, "--weights", tmp_path / "tv.pth",
                            "--out", tmp_path / "ft",
                            "--epochs", "1", "--resolution", "32", "--batch-size", "4", "--no-progress", "--json")
    assert code == 0, err
    model = mnv3.load(last_json(stdout)["model"])
    assert model.num_classes == 2
    assert model.spec.blocks == mnv3.preset("mobilenet_v3_small").blocks and model.spec.bn_momentum == 0.1
    # the backbone starts from the peer's weights (a few small steps later, still close to them)
    theirs = peer.state_dict()
    assert torch.allclose(model.stem.conv.weight, theirs["features.0.0.weight"], atol=1e-2)
    assert not torch.allclose(model.stem.conv.weight, mnv3.build(model.spec, 2).stem.conv.weight, atol=1e-2)


def test_bf16_channels_last_clipping_and_ema(ants_bees, tmp_path, capsys):
    code, stdout, err = run(capsys, "train", "--data", ants_bees, "--out", tmp_path / "run", "--epochs", "1",
                            "--amp", "bf16", "--channels-last", "--clip-grad", "1.0", "--ema-decay", "0.9",
                            "--optimizer", "adamw", "--lr", "0.001", "--json", *TINY)
    assert code == 0, err
    row = metrics(tmp_path / "run")[0]
    assert float(row["train_loss"]) == pytest.approx(float(row["train_loss"]))    # finite, not NaN
    assert 0 <= last_json(stdout)["top1"] <= 1


def test_compiled_training(ants_bees, tmp_path, capsys):
    # compile time grows with the graph: two blocks keep this test short
    small = mnv3.preset("mobilenet_v3_small", 0.35, 32)
    small.replace(blocks=small.blocks[:2]).save(tmp_path / "two_blocks.json")
    code, _, err = run(capsys, "train", "--data", ants_bees, "--out", tmp_path / "run", "--epochs", "1",
                       "--compile", *TINY[4:], "--arch", tmp_path / "two_blocks.json")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["compile"] is True


def _torchrun(args: list, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "mnv3", *map(str, args), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def test_torchrun_resume_after_sigkill_matches_an_uninterrupted_run(ants_bees, tmp_path):
    # dropout on: each process's random stream must be restored, and the epoch's partial sums of
    # both processes carried over
    args = ["train", "--data", ants_bees, "--epochs", "2", "--recipe", "finetune", "--lr", "0.3",
            "--checkpoint-steps", "1", *TINY]
    whole = _torchrun(args, tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    out = tmp_path / "killed"
    proc = _torchrun(args, out, start_new_session=True)
    kill_in_second_epoch(proc, out, lambda p: os.killpg(p.pid, signal.SIGKILL))   # launcher and workers
    assert not (out / "model.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "mnv3", "train", "--out", str(out), "--resume", "--no-progress"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "whole"), metrics(out), strict=True):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key


def test_resume_compares_what_the_recipe_computes_not_its_description(tmp_path):
    import dataclasses

    from mnv3.train.engine import TrainError, check_resume

    recipe = load_recipe("detect")
    saved = {k: v for k, v in recipe.to_dict().items() if k != "det_augment"}       # a run from before the key
    saved["about"] = "an older description"
    ckpt = {"identity": {"task": "detect"}, "recipe": saved, "epoch": 1, "step": 8}
    # the missing key counts as its default (ssd); the description does not count
    assert check_resume(ckpt, {"task": "detect"}, dataclasses.replace(recipe, det_augment="ssd"), tmp_path) is None
    with pytest.raises(TrainError, match="det_augment: run 'ssd' vs now 'ssdlite'"):
        check_resume(ckpt, {"task": "detect"}, recipe, tmp_path)


# -- quantization-aware training ---------------------------------------------------------------------------
def test_qat_simulates_int8_and_leaves_a_float_model(tmp_path, ants_bees, capsys):
    import copy

    from mnv3.latency.runtimes import calibrate_batchnorm
    from mnv3.train.qat import is_qat, prepare_qat, strip_qat

    torch.manual_seed(0)
    model = calibrate_batchnorm(mnv3.build(mnv3.preset("mobilenet_v3_small", 0.35, 32), 2), (8, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        simulated = copy.deepcopy(model)
        points = prepare_qat(simulated)
        assert is_qat(simulated) and points > 20
        # the stem and block 0 (no expansion) stay float, as `mnv3 export --int8` leaves them, their
        # outputs not quantized but block 0's; --int8-stem's simulation quantizes them too
        from torch.nn.utils import parametrize

        assert not parametrize.is_parametrized(simulated.stem.conv, "weight")
        assert not parametrize.is_parametrized(simulated.blocks[0].project.conv, "weight")
        assert parametrize.is_parametrized(simulated.blocks[1].project.conv, "weight")
        assert hasattr(simulated.blocks[0], "qat_out") and not hasattr(simulated.stem, "qat_out")
        assert not hasattr(simulated.blocks[0].dw, "qat_out") and hasattr(simulated.blocks[1].dw, "qat_out")
        whole = copy.deepcopy(model)
        # and block 0's depthwise, SE and projection outputs, the stem's output, the input
        assert prepare_qat(whole, float_stem=False) == points + 5
        assert parametrize.is_parametrized(whole.stem.conv, "weight")
        simulated.eval()                   # (training mode would move batch-norm statistics)
        simulated(x)                       # the observers see the ranges
        rounded = simulated(x)
    assert not torch.equal(rounded, plain)                            # int8 rounding is simulated
    assert float((rounded - plain).abs().max()) < 0.25 * max(1.0, float(plain.abs().max()))
    stripped = strip_qat(simulated)
    assert not is_qat(stripped) and set(stripped.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        assert torch.equal(stripped(x), plain)                        # the float network again
    # through the engine from a float model file, then exported int8 as any model
    start = mnv3.save(model, tmp_path / "float.safetensors")
    code, out, err = run(capsys, "train", "--data", ants_bees, "--weights", start, "--recipe", "qat", "--epochs", "1",
                         "--resolution", "32", "--batch-size", "4", "--no-progress", "--out", tmp_path / "qat", "--json")
    assert code == 0, err
    assert "quantization-aware training" in err
    tuned = mnv3.load(last_json(out)["model"])
    assert tuned.meta.training["qat"] is True and set(tuned.state_dict()) == set(model.state_dict())
    code, _, err = run(capsys, "export", last_json(out)["model"], "-o", tmp_path / "qat.onnx", "--int8",
                       "--calibration-images", "8")
    assert code == 0, err
