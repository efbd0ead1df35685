"""How many intra-op threads a computing command uses, so that this run's processes and their
data-loading workers never ask for more cores than the machine has free."""

from __future__ import annotations

import os
import sys

import torch


class ThreadsError(ValueError):
    """A --threads value cannot be used."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))


def choose_threads(requested: int | None = None, *, workers: int = 0) -> tuple[int, str]:
    """(threads, why). An explicit `requested` wins; otherwise the cores are shared among this
    run's local processes, each of which also keeps `workers` loader processes busy."""
    if requested is not None:
        if requested < 1:
            raise ThreadsError(f"--threads: expected at least 1, got {requested}")
        return requested, "--threads"
    cores, procs = available_cores(), local_processes()
    per_process = max(1, cores // procs)
    threads = max(1, per_process - workers)
    parts = [f"{cores} core(s)"]
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
        print(f"threads: {threads} per process ({why})", file=sys.stderr)
    return threads
