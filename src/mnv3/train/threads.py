"""How many intra-op threads a computing command uses, so that this run's processes and their
data-loading workers never ask for more cores than the machine has free.

Why it matters (bench/train_threads.py, `mnv3 train --data digits` on 2 cores): torch's OpenMP
threads wait for each other at every operator, spinning. When another process takes one of the
cores they run on, every operator waits for the thread that lost its core: with one core kept busy,
2 threads trained at 32 img/s and 1 thread at 180 (idle: 2 threads 298, 1 thread 182). One thread
fewer than the free cores costs far less than one thread too many, so the default:

- counts the cores this process may use (affinity, cgroup quota);
- leaves out the cores other processes keep busy now: their CPU time over 0.25 s from /proc/stat,
  a core counting as taken above BUSY_THRESHOLD of it (the 1-minute load average lags, and counts
  this user's own runs that just ended: it read 2.0 on the idle machine between measurements);
- shares the rest among torchrun's local processes (LOCAL_WORLD_SIZE);
- leaves one core per data-loading worker (each runs 1 thread): a worker decoding photographs is
  busy much of the time; with light data (digits, CIFAR) `--workers 0` is the fastest choice.

The load is looked at once, at start. Thread counts round sums differently, so two runs with
different counts differ in their last digits: pass --threads N to make runs repeatable.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

# A core counts as taken when other processes keep it busy more than this fraction of the time.
BUSY_THRESHOLD = 0.25
SAMPLE_SECONDS = 0.25       # how long the machine's load is looked at before choosing


class ThreadsError(ValueError):
    """A --threads value cannot be used."""


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (which containers and taskset restrict),
    and the cgroup's CPU quota where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` (quota / period), or None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over `cpus` (all when None), from /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        v = [float(x) for x in values[:8]]          # user nice system idle iowait irq softirq steal
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        total += sum(v)
    return (busy, total) if total else None


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores kept busy by other processes now: the non-idle time of this process's cores over
    `seconds`, less this process's own. 0.0 where /proc/stat cannot be read (not Linux)."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except AttributeError:
        cpus = None
    before, own_before = _cpu_times(cpus), _own_seconds()
    if before is None:
        return 0.0
    time.sleep(seconds)
    after, own_after = _cpu_times(cpus), _own_seconds()
    if after is None or after[1] <= before[1]:
        return 0.0
    ncpu = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    fraction = (after[0] - before[0]) / (after[1] - before[1])
    elapsed = max(seconds, 1e-3)
    return max(0.0, fraction * ncpu - (own_after - own_before) / elapsed)


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def local_processes() -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def choose_threads(requested: int | None = None, *, workers: int = 0,
                   busy: float | None = None) -> tuple[int, str]:
    """(threads, why). An explicit `requested` wins. Otherwise: the cores this process may use,
    less those other processes keep busy (`busy`, measured now when None; a core counts as taken
    above BUSY_THRESHOLD), shared among this run's local processes, less each process's
    `workers` loader processes; at least 1."""
    if requested is not None:
        if requested < 1:
            raise ThreadsError(f"--threads: expected at least 1, got {requested}")
        return requested, "--threads"
    cores, procs = available_cores(), local_processes()
    if busy is None:
        busy = busy_cores() if cores > 1 else 0.0
    taken = min(cores - 1, math.floor(busy + 1 - BUSY_THRESHOLD))
    free = cores - max(0, taken)
    threads = max(1, free // procs - workers)
    parts = [f"{cores} core(s)"]
    if taken > 0:
        parts.append(f"{taken} busy with other processes ({busy:.1f} cores' worth)")
    if procs > 1:
        parts.append(f"{procs} processes")
    if workers:
        parts.append(f"{workers} loader worker(s) each")
    return threads, ", ".join(parts)


def apply_threads(requested: int | None = None, *, workers: int = 0, announce: bool = True) -> int:
    """Set torch's intra-op threads for this process and print the choice once (on stderr)."""
    threads, why = choose_threads(requested, workers=workers)
    torch.set_num_threads(threads)
    if announce and os.environ.get("RANK", "0") == "0":
        print(f"threads: {threads} per process ({why}); --threads N to choose", file=sys.stderr)
    return threads
