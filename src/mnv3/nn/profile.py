"""Parameters and multiply-adds of a built module at a given input size, counted from its
convolutions and linear layers as it runs on the meta device (no memory, no arithmetic). Used for
the dense-prediction models, whose heads and non-square inputs the spec-only count
(`mnv3.complexity.count`) does not describe; for a classifier both counts agree (tested)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn


def module_cost(build: Callable[[], nn.Module], size: tuple[int, int], in_channels: int = 3,
                group: Callable[[str], str] | None = None) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """(params, MACs, {part: (params, MACs)}) of the module `build()` returns, for one image of
    `size` (height, width). `group` maps a module's name to its part (default: the first name)."""
    with torch.device("meta"):
        model = build()
    model.eval()
    macs: dict[str, int] = defaultdict(int)

    def part(name: str) -> str:
        return (group(name) if group is not None else name.split(".")[0]) or "model"

    def hook(name: str):
        def count(module: nn.Module, inputs, output) -> None:
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                macs[part(name)] += output.shape[1] * output.shape[2] * output.shape[3] * k
            else:
                macs[part(name)] += output.numel() // output.shape[0] * module.in_features
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, *size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    params: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        params[part(name.rpartition(".")[0])] += p.numel()
    parts = {k: (params[k], macs[k]) for k in dict.fromkeys([*params, *macs])}
    return sum(params.values()), sum(macs.values()), parts
