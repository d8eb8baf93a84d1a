"""Learning-rate schedules counted in optimizer steps: linear, cosine, warmup-stable-decay, constant."""

from __future__ import annotations

import math
from functools import partial

import torch


def warmup_steps(train, total_steps: int) -> int:
    """Warmup in optimizer steps: train.warmup_steps, else train.warmup_ratio of all steps."""
    return train.warmup_steps or int(round(train.warmup_ratio * total_steps))


def lr_factor(
    step: int, *, kind: str, warmup: int, total: int, decay_ratio: float, min_ratio: float
) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_start = total - int(round(decay_ratio * total))
        if step < max(decay_start, warmup):
            return 1.0
        progress = (step - max(decay_start, warmup)) / max(1, total - max(decay_start, warmup))
        return min_ratio + (1 - min_ratio) * max(0.0, 1 - progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(
        lr_factor,
        kind=train.lr_schedule,
        warmup=warmup_steps(train, total_steps),
        total=total_steps,
        decay_ratio=train.decay_ratio,
        min_ratio=train.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
