"""Data-parallel training under `torchrun`: process group set-up (gloo on CPU, NCCL on CUDA) and a
batch norm whose statistics span the global batch on the CPU too (torch's SyncBatchNorm is GPU-only)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

CPU = torch.device("cpu")


class TrainError(ValueError):
    """A run cannot start or resume; the message says why and what to do."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup(device: str = "auto") -> Dist:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set), else a single process."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda and local >= torch.cuda.device_count():
        raise TrainError(f"process {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                         "start at most one process per GPU (--nproc_per_node)")
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(rank, world, local, dev)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's: per-channel sums are
    all-reduced (with gradients flowing back through the reduction), so N processes with B/N
    images each normalise exactly as one process with B images does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _differentiable_all_reduce()
        dtype, x = x.dtype, x.float()        # statistics in float32, as native batch norm keeps them
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
                self.num_batches_tracked.add_(1)
        return out.to(dtype)


def _differentiable_all_reduce():
    """torch.distributed.nn.functional.all_reduce: a sum whose backward sums the gradients too.
    Deprecated in favour of a private module, so its warning is silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from torch.distributed.nn.functional import all_reduce

    def reduce(t: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return all_reduce(t)

    return reduce


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d becomes synchronised: torch's SyncBatchNorm on CUDA, ours on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            sync.weight.requires_grad_(child.weight.requires_grad)
            sync.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, sync)
        else:
            convert_sync_bn(child, device)
    return model
