"""The weight-sharing supernet: sub-networks sliced out equal the supernet's, channel sorting keeps the
largest network's function, batch-norm recalibration touches BN buffers only, training through the
engine (sandwich and progressive), kill -9 and resume, extraction to a model file, and the search with
`--oracle supernet:DIR`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import mnv3
from mnv3.cli import main
from mnv3.search.supernet import Supernet
from mnv3.search.supernet_train import SandwichModel, SupernetTask, calibrate_bn
from mnv3.space import SearchSpace
from mnv3.train.recipe import load_recipe

CHOICES = {"kernels": (3, 5, 7), "expansion_ratios": (3.0, 6.0), "se": (False, True),
           "activations": ("relu", "hswish"), "widths": (0.75, 1.0), "depth_deltas": (-1, 0)}


def space(**changes) -> SearchSpace:
    seed = mnv3.with_total_stride(mnv3.preset("mobilenet_v3_small", width=0.35, resolution=32), 8)
    return SearchSpace(seed, **{**CHOICES, **changes})


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def supernet_random():
    """A supernet with random weights, batch-norm statistics and kernel transformations."""
    torch.manual_seed(0)
    net = Supernet(space(), 10)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for name, p in net.named_parameters():
            if "transforms" in name or "se_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_extracted_networks_equal_the_supernets_sub_networks(supernet_random):
    net, x = supernet_random, torch.randn(3, 3, 32, 32)
    rng = random.Random(0)
    genomes = [net.largest(), net.smallest()] + [net.genomes.random(rng) for _ in range(12)]
    seen = set()
    with torch.no_grad():
        for g in genomes:
            spec = net.set_genome(g)
            seen.add(spec.name)
            alone = net.extract(g).eval()
            assert alone.spec == spec and isinstance(alone, mnv3.MobileNet)
            assert (net(x) - alone(x)).abs().max() < 1e-4, spec.name
            assert sum(p.numel() for p in alone.parameters()) <= sum(p.numel() for p in net.parameters())
    assert len(seen) == len(genomes)           # all different networks
    big, small = net.genomes.decode(net.largest()), net.genomes.decode(net.smallest())
    assert max(b.kernel for b in small.blocks) == 3 and min(b.kernel for b in big.blocks) == 7
    assert all(b.se for b in big.blocks) and not any(b.se for b in small.blocks)
    assert len(big.blocks) > len(small.blocks)


def test_sorting_channels_keeps_the_largest_network_and_is_stable(supernet_random):
    import copy

    net = copy.deepcopy(supernet_random)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net.set_genome(net.largest())
        before = net(x)
        moves = net.sort_channels()
        assert (net(x) - before).abs().max() < 1e-4
        # the first expansion channels are now the ones the projection weights read most
        importance = net.blocks[0].project.conv.weight.abs().sum((0, 2, 3))
        assert (importance[:-1] >= importance[1:]).all()
        # a second sort finds the order made: nothing moves (stable)
        for _, _, perm in net.sort_channels():
            assert torch.equal(perm, torch.arange(len(perm)))
    # the moves replay on a copy of the weights (what an EMA or the optimizer state follows)
    copied = {k: v.clone() for k, v in supernet_random.state_dict().items()}
    from mnv3.search.supernet import apply_moves

    apply_moves(copied, moves)
    assert all(torch.equal(copied[k], v) for k, v in net.state_dict().items() if k in copied)


def test_bn_recalibration_changes_only_bn_buffers(supernet_random):
    alone = supernet_random.extract(supernet_random.smallest())
    before = {k: v.clone() for k, v in alone.state_dict().items()}
    calibrate_bn(alone, torch.randn(40, 3, 32, 32), batch=16)
    bn_buffers = {f"{n}.{b}" for n, m in alone.named_modules() if isinstance(m, nn.BatchNorm2d)
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    changed = {k for k, v in alone.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= bn_buffers
    assert not alone.training and all(m.momentum == 0.1 or m.momentum == 0.01 for m in alone.modules()
                                      if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("rule", ["sandwich", "progressive"])
def test_smallest_and_largest_train_a_step(rule):
    torch.manual_seed(0)
    net = Supernet(space(), 4)
    model = SandwichModel(net).train()
    recipe = load_recipe("supernet").override({"supernet_rule": rule})
    task = SupernetTask(recipe, torch.randn(8, 3, 32, 32))
    model.plan = [net.largest(), net.smallest(), net.genomes.random(random.Random(1))]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = model(x)
    assert out.shape == (3, 4, 4)
    loss = task.loss(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.blocks[0].expand.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())       # every weight in the graph (DDP)
    transforms = [p for b in net.blocks for p in b.transforms.values()]
    assert any(p.grad.abs().sum() > 0 for p in transforms)          # the smallest uses the 7->5->3 path


# -- the command end to end ----------------------------------------------------------------------------
TRAIN = ["--data", "digits", "--proxy-subset", "192", "--epochs", "2", "--batch-size", "32", "--calibration",
         "64", "--checkpoint-steps", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def space_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("supernet-space") / "space.json"
    space().save(path)
    return path


@pytest.fixture(scope="module")
def trained(space_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet") / "run"
    code = main(["supernet", "train", "--space", str(space_file), *TRAIN, "--out", str(out), "--json"])
    assert code == 0
    return out


def test_supernet_train_writes_a_supernet_and_resumes_after_sigkill(trained, space_file, tmp_path, capsys):
    from test_train import kill_in_second_epoch, metrics

    for name in ("supernet.safetensors", "space.json", "metrics.csv", "curves.png", "checkpoint.pt"):
        assert (trained / name).is_file(), name
    rows = metrics(trained)
    assert len(rows) == 2 and {"val_top1", "val_top1_smallest"} <= set(rows[0])
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mnv3", "supernet", "train", "--space", str(space_file), *TRAIN,
                             "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_in_second_epoch(proc, killed, lambda p: os.kill(p.pid, signal.SIGKILL))
    assert not (killed / "supernet.safetensors").exists()
    code, out, err = run(capsys, "supernet", "train", "--out", killed, "--resume", "--threads", "1", "--no-progress",
                         "--json")
    assert code == 0, err
    assert "resuming" in err
    doc = json.loads(out)       # stdout is the one JSON document, everything else went to stderr
    assert doc["supernet"] == str(killed / "supernet.safetensors") and 0 <= doc["top1_largest"] <= 1
    for a, b in zip(rows, metrics(killed)):
        for key in ("train_loss", "val_loss", "val_top1", "val_top1_smallest"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-5), key


def test_estimate_extract_eval_and_search_with_the_supernet(trained, space_file, tmp_path, capsys):
    code, out, err = run(capsys, "supernet", "estimate", trained, "--random", "3", "--threads", "1", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 3 and all(0 <= r["top1"] <= 1 and r["seconds"] > 0 for r in rows)
    # extract a network given as a spec of the space: a model file every command takes
    spec = Supernet(space(), 10).genomes.decode(Supernet(space(), 10).smallest(), "small_one")
    spec_path = spec.save(tmp_path / "small.json")
    model_path = tmp_path / "small.safetensors"
    code, out, err = run(capsys, "supernet", "extract", trained, "--spec", spec_path, "-o", model_path, "--json")
    assert code == 0, err
    doc = json.loads(out)
    model = mnv3.load(model_path)
    assert model.spec.blocks == spec.blocks and model.meta.classes is not None
    code, out, err = run(capsys, "eval", "--weights", model_path, "--data", "digits", "--no-progress", "--json")
    assert code == 0, err and 0 <= json.loads(out)["top1"] <= 1
    # the estimate equals the extracted model's own score on the held-out split
    from mnv3.search.supernet_train import SupernetOracle

    oracle = SupernetOracle(trained)
    assert oracle.top1(model) == pytest.approx(doc["top1"])
    assert oracle.accuracy(spec) == pytest.approx(doc["top1"])
    # a search with the supernet as its oracle (its own space when --space is left out)
    out_dir = tmp_path / "search"
    code, out, err = run(capsys, "search", "--oracle", f"supernet:{trained}", "--latency", "measure", "--trials", "6",
                         "--target-ms", "100", "--final-k", "2", "--out", out_dir, "--no-progress", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["trials"] == 6 and (out_dir / "best.json").is_file()
    best = mnv3.ArchSpec.load(out_dir / "best.json")
    assert oracle.accuracy(best) == pytest.approx(doc["accuracy"])


def test_supernet_errors_are_one_line(trained, space_file, tmp_path, capsys):
    other = space(kernels=(3, 5)).save(tmp_path / "other.json")
    cases = [
        (["search", "--oracle", f"supernet:{trained}", "--space", other, "--latency", "measure", "--target-ms", "100",
          "--out", tmp_path / "s"], "kernels [3, 5] vs [3, 5, 7]"),
        (["search", "--oracle", "supernet:", "--out", tmp_path / "s2"], "expected proxy or supernet:DIR"),
        (["supernet", "estimate", tmp_path], "no supernet.safetensors"),
        (["supernet", "extract", trained, "--genome", "[1, 2]", "-o", tmp_path / "m.safetensors"], "genes, got 2"),
        (["supernet", "train", "--space", space_file, *TRAIN, "--out", trained], "already holds a supernet run"),
        (["supernet", "train", "--space", space_file, *TRAIN, "--supernet-rule", "bigger", "--out", tmp_path / "r"],
         "expected sandwich or progressive"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error:") and message in last and "Traceback" not in err, (argv, last)


def test_supernet_trains_under_torchrun(space_file, tmp_path):
    # every process draws the same sub-networks; batch norm stays per process (sliced layers)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mnv3", "supernet", "train", "--space", str(space_file), "--data", "digits",
                           "--proxy-subset", "128", "--epochs", "1", "--batch-size", "32", "--calibration", "32",
                           "--no-progress", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "supernet.safetensors").is_file()
    assert json.loads((out / "recipe.json").read_text())["sync_bn"] is False


def test_progressive_shrinking_sorts_channels_when_width_turns_elastic(space_file, tmp_path, capsys):
    code, _, err = run(capsys, "supernet", "train", "--space", space_file, "--data", "digits", "--proxy-subset", "64",
                       "--epochs", "4", "--batch-size", "32", "--calibration", "32", "--supernet-rule", "progressive",
                       "--ema-decay", "0.9", "--threads", "1", "--no-progress", "--out", tmp_path / "ps")
    assert code == 0, err
    assert "step 6: channels sorted by importance" in err          # 2 steps an epoch, the last quarter
    from mnv3.search.supernet_train import load_supernet

    net, info = load_supernet(tmp_path / "ps")
    assert info.training["rule"] == "progressive"
    # saved after the sort (and EMA-averaged with weights that followed it): still in importance order
    w = net.blocks[0].project.conv.weight.abs().sum((0, 2, 3))
    assert (w[:-1] >= w[1:]).float().mean() > 0.6
