"""Numeric blow-ups: a NaN/Inf loss or gradient norm skips the optimizer step (counted, up to a limit), and a
loss-spike watchdog warns or stops when the loss stays above k x its running median.

A skipped step changes nothing: no weights, no optimizer moments, no learning-rate step. DeepSpeed already
discards a step whose global gradient norm is not finite (ZeRO 1-3, and bf16/fp16 at ZeRO 0); a non-finite loss
is turned into NaN gradients on purpose so that the same check discards it on every rank, since the gradient
reduction carries the NaN to all of them. Only ZeRO 0 in fp32 steps a plain torch optimizer with no such check:
there the guard takes over gradient clipping (`engine_config` hands DeepSpeed gradient_clipping 0), drops
non-finite gradients so the optimizer leaves every parameter alone, and restores the learning-rate schedule.

Under fp16 DeepSpeed's dynamic loss scaling skips overflowing steps and halves the scale; those skips are not
counted. Two cases are: a non-finite loss (made NaN on purpose, which would also lower the scale: the scaler's
state is put back), and an overflow with the scale already at its minimum, which no scale can fix (a real NaN
gradient; DeepSpeed would otherwise end the run with a bare "loss scale already at minimum" exception at ZeRO 1-3,
or skip forever at ZeRO 0).

Both the skip limit and the watchdog stop the run with exit code 4 before writing a checkpoint, so the newest one
on disk is from before the trouble.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from dapt.runtime import group

log = logging.getLogger("dapt")


class Diverged(SystemExit):
    """The run stopped on a numeric problem; exit code 4."""

    def __init__(self, reason: str, checkpoint: Path | None):
        super().__init__(4)
        where = (
            f"the last checkpoint before it is {checkpoint}: rerunning the same command resumes from the newest "
            f"checkpoint; to go back to this one, pass --resume={checkpoint}"
            if checkpoint
            else "no checkpoint was written before it"
        )
        self.message = (
            f"{reason}; stopped without writing a checkpoint ({where}). Lower train.lr, raise "
            "train.warmup_steps or look at the data of those steps (data.log_sample_ids=true lists it)"
        )


@dataclass
class StepOutcome:
    skipped: bool  # the optimizer step was discarded (a NaN/Inf loss or gradient norm, or an fp16 loss-scale overflow)
    counted: bool  # ... and it counts against numerics.max_skipped_steps (a loss-scale overflow does not)
    loss: float  # the step's loss over all ranks (NaN when some loss was not finite)


def loss_scaler(optimizer):
    """fp16's dynamic loss-scale state: ZeRO 1-3's DynamicLossScaler, or ZeRO 0's LossScaleConfig (FP16_Optimizer and
    FP16_UnfusedOptimizer); None without dynamic loss scaling (bf16, fp32, a static scale)."""
    for name in ("loss_scaler", "loss_scale_config"):
        scaler = getattr(optimizer, name, None)
        if scaler is not None and (
            getattr(scaler, "dynamic", False) or getattr(scaler, "dynamic_loss_scale", False)
        ):
            return scaler
    return None


def at_minimum(scaler) -> bool:
    """The scale cannot go lower: an overflow now is not one that a smaller scale fixes."""
    floor = getattr(scaler, "min_scale", None)
    return scaler.cur_scale <= (floor if floor is not None else scaler.min_loss_scale)


def skip_verdict(
    dropped: bool, ds_skipped: bool, bad_losses: float, fp16: bool, scale_at_min: bool
) -> tuple[bool, bool]:
    """(skipped, counted) for one optimizer step: a step is skipped when dapt dropped its gradients or DeepSpeed
    discarded it; it counts against numerics.max_skipped_steps unless it is an fp16 overflow that the loss scale
    handles (a finite loss, the scale still above its minimum)."""
    skipped = dropped or ds_skipped
    return skipped, skipped and (bad_losses > 0 or not fp16 or scale_at_min)


def plain_fp32(ds: dict) -> bool:
    """ZeRO 0 without bf16/fp16: DeepSpeed steps a plain torch optimizer and never checks the gradients."""
    return (
        ds.get("zero_optimization", {}).get("stage", 0) == 0
        and not ds.get("bf16", {}).get("enabled")
        and not ds.get("fp16", {}).get("enabled")
    )


def engine_config(ds: dict) -> dict:
    """The config for deepspeed.initialize: under plain fp32, StepGuard clips (its norm check comes first)."""
    return {**ds, "gradient_clipping": 0.0} if plain_fp32(ds) else ds


class StepGuard:
    """Wraps the backward passes and the optimizer step of one training loop; its state goes into checkpoints."""

    def __init__(self, cfg, engine, ds_config: dict, state: dict | None = None):
        self.cfg, self.engine = cfg, engine
        self.manual = plain_fp32(ds_config)
        self.clip = float(ds_config.get("gradient_clipping", 0.0))
        self.fp16 = engine.fp16_enabled()
        state = state or {}
        self.skipped = int(state.get("skipped", 0))
        self.history: deque[float] = deque(state.get("history", []), maxlen=cfg.spike_window)
        self.spike_run = int(state.get("spike_run", 0))
        self.spike_onset = state.get("spike_onset")
        self.since: int | None = None  # once check() says stop: the first optimizer step of the trouble
        self.scaler = loss_scaler(engine.optimizer) if self.fp16 else None
        if self.scaler is not None and hasattr(self.scaler, "raise_error_at_min_scale"):
            self.scaler.raise_error_at_min_scale = False  # counted here instead, ending in exit 4
        self._begin()

    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "history": list(self.history),
            "spike_run": self.spike_run,
            "spike_onset": self.spike_onset,
        }

    def _begin(self) -> None:
        self._ds_skipped = self.engine.skipped_steps
        self._loss = 0.0
        self._bad = 0
        self._dropped = False
        sched = self.engine.lr_scheduler
        self._schedule = sched.state_dict() if self.manual and sched is not None else None
        self._lrs = [g["lr"] for g in self.engine.optimizer.param_groups] if self.manual else []
        self._scale = dict(vars(self.scaler)) if self.scaler is not None else None
        # a static fp16 loss scale never lowers: every overflow under it is one no scale fixes
        self._scale_at_min = self.fp16 and (self.scaler is None or at_minimum(self.scaler))

    def backward(self, loss_sum: torch.Tensor, factor: float) -> float:
        """engine.backward(loss_sum * factor); a non-finite loss is made NaN so every gradient is NaN and the
        step is discarded on all ranks. Returns the loss value."""
        value = float(loss_sum.detach())
        if math.isfinite(value):
            self._loss += value
        else:
            self._bad += 1
            loss_sum = loss_sum * float("nan")
        self.engine.backward(loss_sum * factor)
        return value

    def grad_norm(self) -> float | None:
        """Call after the last backward and before the last engine.step() of a step. Under plain fp32: the global
        gradient norm; finite gradients are clipped, non-finite ones dropped (the optimizer then skips every
        parameter). The gradients are already averaged over ranks, so all ranks decide alike."""
        if not self.manual:
            return None
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))
            if params
            else torch.zeros(())
        )
        if not torch.isfinite(norm):
            for p in params:
                p.grad = None
            self._dropped = True
        elif self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
        return float(norm)

    def end(self, denominator: float) -> StepOutcome:
        """After the step's last engine.step(): what happened, agreed over ranks; `denominator` is the step's
        global loss weight (masked tokens, or examples)."""
        if self._dropped:  # a skipped step is not a schedule step
            if self._schedule is not None:
                self.engine.lr_scheduler.load_state_dict(self._schedule)
            for pg, lr in zip(self.engine.optimizer.param_groups, self._lrs):
                pg["lr"] = lr
        loss_sum, bad = group.all_sum(self._loss, self._bad)
        skipped, counted = skip_verdict(
            self._dropped, self.engine.skipped_steps > self._ds_skipped, bad, self.fp16, self._scale_at_min
        )
        if bad and self._scale is not None:  # the NaN was ours: it says nothing about the loss scale
            self.scaler.__dict__.update(self._scale)
        loss = float("nan") if bad else loss_sum / max(denominator, 1e-12)
        self._begin()
        return StepOutcome(skipped, counted, loss)

    def check(self, step: int, outcome: StepOutcome, grad_norm: float | None) -> str | None:
        """Count a skipped step and feed the watchdog; returns why the run must stop, or None."""
        c = self.cfg
        if outcome.counted:
            self.skipped += 1
            why = (
                " (fp16 gradients overflow with the loss scale at its minimum)"
                if self.fp16 and math.isfinite(outcome.loss)
                else ""
            )
            log.warning(
                "step %d skipped: loss %s, gradient norm %s%s (%d skipped so far, "
                "numerics.max_skipped_steps=%d)",
                step,
                f"{outcome.loss:.4g}",
                "n/a" if grad_norm is None else f"{grad_norm:.4g}",
                why,
                self.skipped,
                c.max_skipped_steps,
            )
            if self.skipped > c.max_skipped_steps:
                self.since = step
                return (
                    f"{self.skipped} optimizer steps had a NaN/Inf loss or gradient norm, more than "
                    f"numerics.max_skipped_steps={c.max_skipped_steps} (the last at step {step})"
                )
            return None
        if outcome.skipped or not c.spike_factor:
            return None
        return self._watch(step, outcome.loss)

    def _watch(self, step: int, loss: float) -> str | None:
        c = self.cfg
        median = statistics.median(self.history) if len(self.history) >= c.spike_steps else None
        self.history.append(loss)
        if median is None or loss <= c.spike_factor * median:
            if self.spike_run >= c.spike_steps:
                log.warning(
                    "step %d: the loss spike that began at step %s is over (loss %.4g)",
                    step,
                    self.spike_onset,
                    loss,
                )
            self.spike_run, self.spike_onset = 0, None
            return None
        self.spike_run += 1
        if self.spike_run == 1:
            self.spike_onset = step
        if self.spike_run != c.spike_steps:
            return None
        reason = (
            f"loss spike: the loss has been above {c.spike_factor:g} x its running median ({median:.4g}) for "
            f"{c.spike_steps} steps since step {self.spike_onset} (now {loss:.4g})"
        )
        if c.spike_action == "stop":
            self.since = self.spike_onset
            return reason
        log.warning("%s; training goes on (numerics.spike_action=stop would stop here)", reason)
        return None
