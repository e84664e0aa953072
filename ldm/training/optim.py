"""The optimizer and learning-rate schedule that every training here steps."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def adamw(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as every training loop here steps it: the fused kernel, one call over all tensors.

    PyTorch's default on CPUs is a Python loop of about ten small ops per tensor, which took 7% of a default
    UNet training step (bench/training_throughput.py); fused runs on CPUs and CUDA alike.
    """
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the optimizer's lr over `warmup_steps`, then cosine decay towards zero at `total_steps`."""

    def factor(done: int) -> float:  # done: optimizer steps taken before this one
        if done < warmup_steps:
            return (done + 1) / warmup_steps
        progress = (done - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)
