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


def schedule_of(train, total_steps: int) -> dict:
    """The schedule of a run of `total_steps` optimizer steps: lr_factor's keyword arguments (saved in checkpoints)."""
    return {
        "kind": train.lr_schedule,
        "warmup": warmup_steps(train, total_steps),
        "total": total_steps,
        "decay_ratio": train.decay_ratio,
        "min_ratio": train.min_lr_ratio,
    }


def build_scheduler(
    optimizer: torch.optim.Optimizer, train, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, **schedule_of(train, total_steps)))


def continuation_problem(saved: dict, now: dict, step: int, lr: float) -> str | None:
    """Why a run trained `step` steps on the `saved` schedule cannot go on under `now` (another length, usually):
    the learning rate of its next step would jump (a finished linear decay back up to most of the peak). None when
    both give the same rate there: the same schedule, a constant one, or a warmup-stable-decay still before its
    decay."""
    before, after = lr_factor(step, **saved), lr_factor(step, **now)
    if math.isclose(before, after, rel_tol=1e-6, abs_tol=1e-12):
        return None
    return (
        f"it was trained {step} optimizer steps of a {saved['kind']} schedule over {saved['total']} steps, where the "
        f"learning rate after step {step} is {lr * before:.3g}; over {now['total']} steps it would be "
        f"{lr * after:.3g} there, a jump in the middle of the run"
    )
