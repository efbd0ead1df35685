"""Calibration models side by side, offline, on a table `bench/lut_accuracy.py` built: each model is
fitted on the table's calibration networks (scored leave-one-out) and applied to the validation
networks of that run (its CSV), without measuring anything again. Models: a*sum (the predictor's),
a*sum+b, separate scales for 7x7 blocks and the rest, and one scale per kernel size.

    python bench/lut_calibration_models.py --db sqlite:///lut-accuracy.sqlite \
        --csv bench/results/lut_accuracy_litert.csv [--runtime litert]
"""
import argparse
import csv
import random

import numpy as np

from mnv3.latency import get_runtime
from mnv3.latency.lut import _environment_key, network_parts
from mnv3.latency.table import LatencyTable
from mnv3.presets import resolve_arch
from mnv3.space import SearchSpace

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--db", required=True, help="the table database bench/lut_accuracy.py used")
parser.add_argument("--csv", help="its validation CSV (bench/results/lut_accuracy_RUNTIME.csv)")
parser.add_argument("--runtime", default="litert")
parser.add_argument("--space", default="mobilenet_v3_large")
args = parser.parse_args()
space = SearchSpace(resolve_arch(args.space, resolution=224))
rt = get_runtime(args.runtime)
table = LatencyTable(args.db)
env = _environment_key(rt, 1, 1, space)
entries = table.get(env)
cal = table.calibration(env, space.key())
print("calibration", {k: cal[k] for k in ("model", "a", "b", "c", "loo_mape", "reference_ms")})

def feats(spec):
    f = {"k3": 0.0, "k5": 0.0, "k7": 0.0, "other": 0.0, "n": 0}
    for p in network_parts(spec):
        v = entries[p.key].median_ms
        if p.key.startswith("block:"):
            k = int(p.key.split(":k")[1].split(":")[0])
            f[f"k{k}"] += v
        else:
            f["other"] += v
        f["n"] += 1
    return f

rng = random.Random(cal["seed"])
cspecs = [space.sample(rng) for _ in range(cal["n"])]
cmeas = np.array([n["measured_ms"] for n in cal["networks"]])
cf = [feats(s) for s in cspecs]
assert np.allclose([sum(f[k] for k in ("k3","k5","k7","other")) for f in cf], [n["sum_ms"] for n in cal["networks"]])

vmeas = None
if args.csv:
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(7)                     # validate()'s default seed draws the same networks
    vspecs = [space.sample(rng) for _ in range(len(rows))]
    vmeas = np.array([float(r["measured_ms"]) for r in rows])
    vf = [feats(s) for s in vspecs]

MODELS = {
    "a*sum": lambda f: [f["k3"] + f["k5"] + f["k7"] + f["other"]],
    "a*sum+b": lambda f: [f["k3"] + f["k5"] + f["k7"] + f["other"], 1.0],
    "a*rest+b*k7": lambda f: [f["k3"] + f["k5"] + f["other"], f["k7"]],
    "per-kernel": lambda f: [f["k3"], f["k5"], f["k7"], f["other"]],
}
for name, fx in MODELS.items():
    X = np.array([fx(f) for f in cf]); w = 1 / cmeas
    def solve(rows, X=X, w=w):
        return np.linalg.lstsq(X[rows] * w[rows, None], cmeas[rows] * w[rows], rcond=None)[0]
    idx = np.arange(len(cmeas))
    loo = [abs(X[i] @ solve(idx[idx != i]) / cmeas[i] - 1) for i in idx]
    coef = solve(idx)
    line = f"{name:14} coef {np.round(coef, 3)} LOO MAPE {np.mean(loo):.3%} LOO within10 {np.mean(np.array(loo) <= 0.1):.0%}"
    if vmeas is not None:
        pred = np.array([fx(f) for f in vf]) @ coef
        err = pred / vmeas - 1
        line += f" | validation MAPE {np.mean(abs(err)):.2%} within10 {np.mean(abs(err) <= 0.1):.0%} within5 {np.mean(abs(err) <= 0.05):.0%} worst {err.min():+.1%}/{err.max():+.1%}"
    print(line)
