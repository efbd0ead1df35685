"""Training throughput of `mnv3 train --data digits` (the `cifar` recipe, MobileNetV3-Small at
32 px, total stride 8) against intra-op threads and loader workers, on this machine idle and with
other processes keeping cores busy, and under `torchrun --nproc_per_node 2`; then, idle, a folder of
photographs (../shared/data/hymenoptera, `finetune` recipe at 224 px: JPEG decoding and random
resized crops keep a loader worker far busier than digits do). The measured busy cores before each run
are printed and written beside the numbers: "idle" is only idle when nothing else runs.

Every measurement is a fresh process (so `threads: default` is the choice `mnv3 train` makes at
start, seeing the load as it is then) that trains for a few seconds through the engine's own
`Trainer.benchmark` (data loading included). Busy cores are `python -c "while True: pass"`
processes. In each condition the configurations run in rounds, in a rotated order, and img/s is
the median over rounds; ratios compare configurations of the same condition. Writes
bench/results/train_threads.csv.

    python bench/train_threads.py [--rounds 2] [--seconds 3] [--busy 0 1 2] [--no-torchrun] [--no-photos]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, write_csv

# (label, --threads or None for the default choice, loader workers)
CONFIGS = [("default", None, 0), ("default", None, 1), ("1", 1, 0), ("1", 1, 1), ("2", 2, 0), ("2", 2, 1)]
# torchrun x2 on 2 cores: the default is 1 thread per process; 2 threads each only idle (4 on 2 cores)
TORCHRUN_CONFIGS = {0: [("default", None, 0), ("2", 2, 0)], 1: [("default", None, 0)]}
PHOTO_CONFIGS = [("default", None, 1), ("1", 1, 1), ("2", 2, 1), ("2", 2, 0)]
PHOTOS = SHARED / "data" / "hymenoptera"
FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return (f"{model}; {', '.join(f for f in FLAGS if f in flags) or 'flags unknown'}; torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()})")


# -- one measurement (a child process; under torchrun, one per rank) ---------------------------------
def child(args: argparse.Namespace) -> None:
    import torch

    from mnv3.data.datasets import open_data
    from mnv3.train.classify import prepare_model
    from mnv3.train.distributed import setup, teardown
    from mnv3.train.engine import ClassificationTask, RunOptions, Trainer
    from mnv3.train.recipe import load_recipe
    from mnv3.train.threads import apply_threads, choose_threads

    threads = apply_threads(args.threads, workers=args.workers, announce=False)
    why = choose_threads(threads, workers=args.workers)[1] if args.threads else None
    d = setup("cpu")
    try:
        data, recipe = open_data(args.data), load_recipe(args.recipe)
        model, pre = prepare_model(data, recipe, "mobilenet_v3_small", progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(model, data, recipe, RunOptions(Path(tmp), workers=args.workers, progress=False,
                                                              tensorboard=False),
                              ClassificationTask(recipe.label_smoothing), d, pre, {}, None)
            probe = trainer.benchmark(2, warmup=1)             # allocates, picks kernels
            wanted = max(3, min(trainer.steps_per_epoch - 1, round(args.seconds * probe / recipe.batch_size)))
            steps = int(d.sum([float(wanted)])[0]) // d.world   # the same on every rank
            img_s = trainer.benchmark(steps, warmup=1)
        if d.main:
            print(json.dumps({"img_s": img_s, "threads": threads, "steps": steps, "why": why,
                              "torch_threads": torch.get_num_threads()}))
    finally:
        teardown(d)


def measure(threads: int | None, workers: int, seconds: float, torchrun: bool,
            data: str = "digits", recipe: str = "cifar") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--workers", str(workers),
           "--seconds", str(seconds), "--data", data, "--recipe", recipe]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spin(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per condition (default 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed training per measurement")
    parser.add_argument("--busy", type=int, nargs="*", default=[0, 1, 2], help="busy cores per condition")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the torchrun rows")
    parser.add_argument("--no-photos", action="store_true", help="skip the photographs (idle) part")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", default="digits", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="cifar", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from mnv3.train.threads import available_cores, busy_cores

    cpu = cpu_description()
    cores = available_cores()
    print(f"CPU: {cpu}; {cores} core(s) available")
    print(f"background before the run: {busy_cores(1.0):.2f} cores busy, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    rows, start = [], time.perf_counter()
    parts = []
    for busy in args.busy:
        configs = [(c, False) for c in CONFIGS]
        if not args.no_torchrun:
            configs += [(c, True) for c in TORCHRUN_CONFIGS.get(busy, [])]
        parts.append((f"digits, {busy} core(s) kept busy by spinning processes", busy, "digits", "cifar", configs))
    if not args.no_photos:
        parts.append(("photographs (hymenoptera, finetune recipe, 224 px), no spinning process", 0, str(PHOTOS), "finetune",
                      [(c, False) for c in PHOTO_CONFIGS]))
    for title, busy, data, recipe, configs in parts:
        spinners = spin(busy)
        try:
            time.sleep(1.0)
            samples: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
            background = []
            for r in range(args.rounds):
                order = list(range(len(configs)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    (label, threads, workers), torchrun = configs[i]
                    background.append(busy_cores(0.5))
                    samples[i].append(measure(threads, workers, args.seconds, torchrun, data, recipe))
        finally:
            for p in spinners:
                p.kill()
                p.wait()
        seen = statistics.median(background)
        print(f"== {title} (measured busy before each run: median {seen:.2f}, load average "
              f"{os.getloadavg()[0]:.2f})")
        group = []
        for i, ((label, threads, workers), torchrun) in enumerate(configs):
            runs = samples[i]
            used = sorted({s["threads"] for s in runs})
            group.append({"data": Path(data).name, "busy_cores": busy, "measured_busy": round(seen, 2),
                          "launcher": "torchrun x2" if torchrun else "single",
                          "threads": label, "threads_used": "/".join(map(str, used)), "workers": workers,
                          "img_s": round(statistics.median(s["img_s"] for s in runs), 1),
                          "img_s_runs": " ".join(f"{s['img_s']:.0f}" for s in runs), "cpu": cpu})
        best = max(g["img_s"] for g in group)
        default = {(g["launcher"], g["workers"]): g["img_s"] for g in group if g["threads"] == "default"}
        for g in group:
            g["vs_best"] = round(g["img_s"] / best, 3)
            same = default.get((g["launcher"], g["workers"])) or default.get((g["launcher"], 1 - g["workers"]))
            g["vs_default"] = round(g["img_s"] / same, 3)
            print(f"  {g['launcher']:<12} threads {g['threads']:<7} (used {g['threads_used']:<3}) workers "
                  f"{g['workers']}: {g['img_s']:7.1f} img/s  x{g['vs_best']:.2f} of the best, "
                  f"x{g['vs_default']:.2f} of default  [runs: {g['img_s_runs']}]")
        rows += group
        print()
    path = write_csv("train_threads.csv", rows)
    print(f"{len(rows)} rows in {(time.perf_counter() - start) / 60:.1f} min; written {path}")
    print(f"CPU: {cpu}")


if __name__ == "__main__":
    main()
