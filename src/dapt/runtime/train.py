"""One training run, for every task: start, data, model, DeepSpeed config, engine, resume, metrics, the loop,
evaluation, checkpoints and the export of final/.

A task brings only what is its own, as a `Task` (dapt.tasks.mlm.MaskedLM, dapt.tasks.classify.Classifier): its data
and the run's length, its model and optimizer groups, one step's micro-batches, their loss sum and weight, an
`Evaluation` with its score and direction, and what it adds to final/ and the summary. `train(cfg, task)` does the
rest, the same way for each. launch/profile.py runs the same `train` with a `timer` (no checkpoints, evaluation or
export: warm-up and timed steps, then its report).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import resource
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from dapt.config.dsconfig import finalize_ds_config
from dapt.config.schema import RunConfig, save_resolved
from dapt.runtime import group
from dapt.runtime.card import TEXT_FILE, write_model_card
from dapt.runtime.checkpoint import Score, export_hf
from dapt.runtime.metrics import MetricsLogger, plot_curves
from dapt.runtime.numerics import Diverged, StepGuard
from dapt.runtime.preempt import Preempted, PreemptionWatch
from dapt.runtime.publish import publish
from dapt.runtime.runner import (
    Checkpoints,
    ExportPoint,
    Resumed,
    SampleLog,
    Step,
    TrainState,
    build_engine,
    log_choices,
    no_clock,
    open_metrics,
    optimizer_step,
    parameter_count,
    sample_log,
    start,
)
from dapt.runtime.schedule import warmup_steps

log = logging.getLogger("dapt")


# ---------------------------------------------------------------- what a task brings


@dataclass(frozen=True)
class Length:
    """How long the run is, as the task's data decide."""

    steps: int  # optimizer steps
    eval_every: int = 0  # optimizer steps between evaluations (0: at the end only)
    per_epoch: float | None = None  # optimizer steps in one epoch, where known before training
    epoch_rows: int | None = None  # training rows in one epoch, where counted
    epoch_skipped: Counter | None = None  # the records epoch 0 left out, where counted (all ranks)
    whole_epoch_counted: bool = (
        False  # epoch_skipped is the data's count whatever the run trains (a counting pass)
    )


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: every figure (logged under eval/ or test/), and the one `metric` that picks the best
    checkpoint and drives patience, with its direction."""

    metrics: dict[str, Any]
    metric: str
    higher_is_better: bool
    shown: tuple[str, ...] = ()  # the figures the log line names

    @property
    def score(self) -> float:
        return float(self.metrics[self.metric])

    def beats(self, best: float | None) -> bool:
        if best is None:
            return True
        return self.score > best if self.higher_is_better else self.score < best

    def as_score(self) -> Score:
        return Score(self.metric, self.score, self.higher_is_better)


class Task(Protocol):
    """What a task decides; `train` does everything else."""

    name: str  # "mlm", "classify": the model card's task
    auto_class: str  # the transformers Auto class final/ loads with
    tokenizer: Any  # set by prepare
    streams: (
        int  # the training data's streams: data.streams, or fewer where the data cannot fill them (prepare)
    )
    eval_skipped: Counter  # records left out of the evaluation sets (set by prepare)

    def prepare(self, cfg: RunConfig, out: Path) -> None:
        """Read the data (tokenizer, training streams, evaluation sets)."""

    def length(self, cfg: RunConfig) -> Length:
        """The run's length (not asked by a timed run, which has its own)."""

    def model(self, cfg: RunConfig) -> torch.nn.Module: ...

    def groups(self, cfg: RunConfig, model: torch.nn.Module) -> list[dict] | None:
        """The optimizer's parameter groups (None: weight decay on matrices, one learning rate)."""

    def feeder(self, cfg: RunConfig, streams: dict[int, dict], rows: int):
        """This rank's row feeder, continuing after `rows` global rows."""

    def micro_batches(self, rows: list) -> list[dict]:
        """One optimizer step's micro-batches from this rank's rows ([(index, row), ...] per micro-batch)."""

    def loss_sum(self, engine, batch: dict, device) -> torch.Tensor:
        """The sum (not the mean) of the micro-batch's per-item losses."""

    def weight(self, batch: dict) -> float:
        """What the loss sum is divided by: masked tokens, or the examples' weight."""

    def evaluate(self, engine, device, split: str) -> Evaluation | None:
        """The task's figures on split "valid" or "test" (None: the task has no such data)."""

    def evaluated(self, run: Run, evaluation: Evaluation, improved: bool) -> str | None:
        """After a validation: the task's files and checks; a reason to stop early, or None."""

    def train_values(self, loss: float) -> dict:
        """The task's own train/ figures beside the loss."""

    def final(self, run: Run, point: ExportPoint, summary: dict) -> dict:
        """Rank 0, after the export: its files in final/ and the summary's additions; returns the model card's
        results (name -> figure)."""

    def text(self, cfg: RunConfig) -> tuple[dict, str]:
        """How records became text: (final/dapt_text.json's settings, the model card's description)."""


@dataclass
class Progress:
    """The evaluations so far (in every checkpoint): the best score, evaluations since it improved, why the run
    stopped early."""

    best: float | None = None
    stale: int = 0
    stopped: str | None = None

    @classmethod
    def resumed(cls, saved: dict, state: TrainState) -> Progress:
        if "best" not in saved and state.best_eval_loss is not None:  # an MLM checkpoint of dapt 0.2
            return cls(best=state.best_eval_loss)
        return cls(**{k: saved[k] for k in ("best", "stale", "stopped") if k in saved})


class Timer(Protocol):
    """launch/profile.py's clock over the same loop: how many steps, and what to do around each."""

    def steps(self) -> tuple[int, int]:
        """(steps the loop runs, steps the schedule is built for)."""

    def before_engine(self, cfg: RunConfig, out: Path, ds: dict) -> dict:
        """The engine's DeepSpeed config, with what the timer adds."""

    def begin(self, step: int) -> tuple:
        """Before a step: (clock, around) for optimizer_step."""

    def record(self, step: Step, micro: list[dict]) -> None: ...

    def report(self, run: Run) -> dict: ...


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """One run's moving parts, built by `setup`."""

    cfg: RunConfig
    task: Task
    out: Path
    accelerator: str
    device: torch.device
    length: Length
    engine: Any
    guard: StepGuard
    feeder: Any
    state: TrainState
    progress: Progress
    ckpts: Checkpoints | None  # None in a timed run
    metrics: MetricsLogger | None
    samples: SampleLog | None
    watch: PreemptionWatch | None
    started: float  # wall clock at the start of the first run this one continues
    holds: Path | None = None  # the checkpoint whose weights the engine holds
    window: Counter = field(default_factory=Counter)  # the log window's sums
    uncounted: Counter = field(
        default_factory=Counter
    )  # this rank's tokens, slots, samples not yet in `state`
    window_start: float = field(default_factory=time.time)


def train(cfg: RunConfig, task: Task, timer: Timer | None = None) -> dict:
    """Train `task` as `cfg` says; resume if a checkpoint exists; export final/; return the summary. With `timer`:
    its steps, timed, and its report."""
    run = setup(cfg, task, timer)
    try:
        loop(run, timer)
    finally:
        if run.watch:
            run.watch.close()
    return timer.report(run) if timer else finish(run)


def setup(cfg: RunConfig, task: Task, timer: Timer | None = None) -> Run:
    """Process group, data, length, model, the DeepSpeed config, the engine and the resumed state."""
    s = start(cfg)
    task.prepare(cfg, s.out)
    if timer:
        steps, scheduled = timer.steps()
        length = Length(steps)
    else:
        length = task.length(cfg)
        steps = scheduled = length.steps
    ckpts = None if timer else Checkpoints(cfg, s.out, steps=steps, streams=task.streams)
    if ckpts:
        ckpts.check_continuation()
    model = task.model(cfg)
    hidden = getattr(model.config, "hidden_size", None)
    ds = finalize_ds_config(cfg.ds_config, scheduled, warmup_steps(cfg.train, steps), hidden)
    if timer:
        ds = timer.before_engine(cfg, s.out, ds)
    if group.rank() == 0:  # as the run reads it: with the stream count the data could fill
        data = dataclasses.replace(cfg.data, streams=task.streams)
        save_resolved(dataclasses.replace(cfg, data=data), s.out / "config.resolved.yaml", ds)
    log_choices(cfg, s.accelerator, scheduled)
    if ckpts:
        ckpts.check_disk(parameter_count(model))
    resuming = bool(ckpts and ckpts.resume_point())
    engine = build_engine(cfg, model, scheduled, ds, groups=task.groups(cfg, model), resuming=resuming)
    resumed = ckpts.resume(engine) if ckpts else Resumed()
    state = resumed.state
    metrics = None if timer else open_metrics(cfg, s.out, state.step)
    if metrics and task.eval_skipped and state.step == 0:
        metrics.log(0, {f"data/eval_skipped/{reason}": n for reason, n in task.eval_skipped.items()})
    return Run(
        cfg=cfg,
        task=task,
        out=s.out,
        accelerator=s.accelerator,
        device=s.device,
        length=length,
        engine=engine,
        guard=StepGuard(cfg.numerics, engine, ds, resumed.numerics),
        feeder=task.feeder(cfg, resumed.streams, state.rows),
        state=state,
        progress=Progress.resumed(resumed.task, state),
        ckpts=ckpts,
        metrics=metrics,
        samples=None if timer else sample_log(cfg, s.out, resumed.sample_lines),
        watch=None if timer else PreemptionWatch(),
        started=time.time() - state.elapsed,
        holds=resumed.point,
    )


# ---------------------------------------------------------------- the loop


def loop(run: Run, timer: Timer | None = None) -> None:
    """Optimizer steps to the end (or an early stop): each step accounted and guarded, logged, evaluated and saved
    as the config's cadences say."""
    cfg, state, steps = run.cfg, run.state, run.length.steps
    quiet = group.rank() != 0 or not cfg.log.progress or timer is not None or run.progress.stopped is not None
    with tqdm(total=steps, initial=state.step, desc="train", disable=quiet) as bar:
        while state.step < steps and run.progress.stopped is None:
            step, micro, rows = take_step(run, *(timer.begin(state.step) if timer else ()))
            account(run, step, micro, rows)
            bar.update(1)
            reason = run.guard.check(state.step, step.outcome, step.grad_norm)
            if reason:
                raise Diverged(reason, run.ckpts.store.before(run.guard.since) if run.ckpts else None)
            if timer:
                timer.record(step, micro)
                continue
            if state.step % cfg.train.log_every == 0 or state.step in (1, steps):  # the first: warmup shows
                log_train(run, bar)
            evaluation = validate(run) if evaluation_due(run) else None
            if (
                run.ckpts.due(state.step, steps, evaluation is not None)
                or step.stop_votes
                or run.progress.stopped
            ):
                saved = save(run, evaluation)
                if step.stop_votes and state.step < steps and not run.progress.stopped:
                    # a rank the signal did not reach stops because another one got it: report SIGTERM there
                    raise Preempted(run.watch.signum or signal.SIGTERM, state.step, str(saved))
    if run.progress.stopped:
        log.warning("stopped at step %d: %s", state.step, run.progress.stopped)


def take_step(run: Run, clock=no_clock, around=None) -> tuple[Step, list[dict], list]:
    """Take this rank's rows of one optimizer step, make its micro-batches and run the step: (the step, its
    micro-batches, its rows)."""
    t, task, engine = run.cfg.train, run.task, run.engine
    rows = [run.feeder.take(t.micro_batch_size) for _ in range(t.grad_accum)]
    micro = task.micro_batches(rows)
    step = optimizer_step(
        engine,
        run.guard,
        micro,
        lambda b: task.loss_sum(engine, b, run.device),
        task.weight,
        signum=run.watch.signum if run.watch else 0,
        clock=clock,
        around=around or contextlib.nullcontext,
    )
    return step, micro, rows


def account(run: Run, step: Step, micro: list[dict], rows: list) -> None:
    """After a step: the counters, the log window's tokens, slots, samples and loss, the sample log."""
    state, window = run.state, run.window
    for b in micro:
        seen = Counter(
            tokens=int(b["attention_mask"].sum()),
            slots=b["attention_mask"].numel(),
            samples=len(b["input_ids"]),
        )
        window.update(seen)
        run.uncounted.update(seen)
    window["grad_norm"] = step.grad_norm
    if not step.outcome.skipped:
        window["loss_sum"] += step.outcome.loss * step.weight
        window["weight"] += step.weight
    state.step += 1
    state.micro_step += len(micro)
    state.rows += sum(len(part) for part in rows) * group.world()
    if run.samples:
        run.samples.write([doc for part in rows for _, row in part for doc in row.doc_ids])


def log_train(run: Run, bar) -> None:
    """The log window's figures (all ranks' tokens and samples) to metrics.jsonl, the bar and the log; the window
    starts again."""
    state, window, engine = run.state, run.window, run.engine
    seconds = max(time.time() - run.window_start, 1e-9)
    tokens, slots, samples, *seen = group.all_sum(
        *(window[k] for k in SEEN), *(run.uncounted[k] for k in SEEN)
    )
    add_seen(run, seen)
    loss = window["loss_sum"] / window["weight"] if window["weight"] else float("nan")  # nan: all skipped
    values = {
        "train/loss": loss,
        "train/learning_rate": engine.get_lr()[0],
        "train/grad_norm": window["grad_norm"],
        "train/tokens_per_second": tokens / seconds,
        "train/samples_per_second": samples / seconds,
        "train/packing_efficiency": tokens / max(slots, 1),
        "train/epoch": run.feeder.epoch(),
        "train/tokens_seen": state.tokens_seen,
        "train/peak_memory_gb": peak_memory_gb(),
        "train/skipped_steps": run.guard.skipped,
    }
    values |= run.task.train_values(loss)
    values |= {f"data/{k}": v for k, v in gathered_counts(run.feeder).items()}
    run.metrics.log(state.step, values)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{values['train/learning_rate']:.2e}")
    shown = (loss, values["train/learning_rate"], window["grad_norm"], values["train/tokens_per_second"])
    log.info(
        "step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", state.step, run.length.steps, *shown
    )
    run.window, run.window_start = Counter(), time.time()


SEEN = ("tokens", "slots", "samples")


def add_seen(run: Run, seen: list[float] | None = None) -> None:
    """All ranks' tokens, slots and samples since they were last counted (`seen`: summed already) into the counters
    a checkpoint saves, so a run stopped between two log lines loses none."""
    tokens, slots, samples = seen if seen is not None else group.all_sum(*(run.uncounted[k] for k in SEEN))
    run.state.tokens_seen += int(tokens)
    run.state.slots_seen += int(slots)
    run.state.samples_seen += int(samples)
    run.uncounted.clear()


def gathered_counts(feeder) -> Counter:
    """Skipped and filtered records so far, over all ranks' streams."""
    total: Counter = Counter()
    for counts in group.gather(dict(feeder.counts())):
        total.update(counts)
    return total


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def evaluation_due(run: Run) -> bool:
    every, step = run.length.eval_every, run.state.step
    return (bool(every) and step % every == 0) or step == run.length.steps


def validate(run: Run) -> Evaluation | None:
    """The validation set at this step: logged, the best score and patience kept, the task's checks (which may stop
    the run)."""
    evaluation = run.task.evaluate(run.engine, run.device, "valid")
    if evaluation is None:
        return None
    log_evaluation(run, evaluation, "eval")
    p = run.progress
    improved = evaluation.beats(p.best)
    p.best, p.stale = (evaluation.score, 0) if improved else (p.best, p.stale + 1)
    p.stopped = run.task.evaluated(run, evaluation, improved)
    return evaluation


def log_evaluation(run: Run, evaluation: Evaluation, prefix: str, weights: str | None = None) -> None:
    """One evaluation into metrics.jsonl (at the run's step) and the log; `weights`: the checkpoint evaluated, when it
    is not the run's last step (the test set, on the exported checkpoint)."""
    figures = {k: v for k, v in evaluation.metrics.items() if isinstance(v, float | int)}
    run.metrics.log(run.state.step, {f"{prefix}/{k}": v for k, v in figures.items()})
    shown = evaluation.shown or (evaluation.metric,)
    at = f"{weights}'s weights" if weights else f"step {run.state.step}"
    log.info("%s %s %s", at, prefix, " ".join(f"{k} {figures[k]:.4f}" for k in shown))


def save(run: Run, evaluation: Evaluation | None) -> Path:
    add_seen(run)
    run.state.elapsed = time.time() - run.started
    score = evaluation.as_score() if evaluation else None
    progress = asdict(run.progress)
    run.holds = run.ckpts.save(
        run.engine,
        run.state,
        feeder=run.feeder,
        guard=run.guard,
        task=progress,
        samples=run.samples,
        score=score,
    )
    return run.holds


# ---------------------------------------------------------------- the end of a run


def finish(run: Run) -> dict:
    """The chosen checkpoint's weights (checkpoint.export) loaded for final/ and the test set; summary.json, the
    model card, plots; hub.push last."""
    cfg, state, out = run.cfg, run.state, run.out
    wall = time.time() - run.started
    add_seen(run)
    point = run.ckpts.export_point()
    if point.path != run.holds:
        run.ckpts.load(run.engine, point.path)  # final/ and the test set use the exported weights
        run.holds = point.path
    log.info("final/ and the test set use %s (%s)", point.path.name, point.why)
    skipped = gathered_counts(run.feeder)
    epoch = run.length
    if epoch.epoch_skipped is not None and (
        epoch.whole_epoch_counted or state.rows >= (epoch.epoch_rows or 0)
    ):
        skipped = epoch.epoch_skipped  # a pass over all of epoch 0 saw every record
    summary = {
        "steps": state.step,
        "micro_steps": state.micro_step,
        "tokens_seen": state.tokens_seen,
        "samples_seen": state.samples_seen,
        "rows_trained": state.rows,
        "epoch_rows": run.length.epoch_rows,
        "final_checkpoint": point.path.name,
        "final_step": point.step,
        "final_from": point.why,
        "wall_seconds": round(wall, 1),  # every run's training time, over resumes
        "this_run_seconds": round(wall - run.ckpts.resumed_elapsed, 1),
        "world_size": group.world(),
        "packing_efficiency": state.tokens_seen / max(1, state.slots_seen),
        "skipped_records": dict(skipped),
        "eval_skipped_records": dict(run.task.eval_skipped),
    }
    test = run.task.evaluate(run.engine, run.device, "test")
    if test is not None:
        summary["test"] = test.metrics
        summary["test_checkpoint"] = point.path.name  # the weights the test set saw: final/'s
        log_evaluation(run, test, "test", point.path.name)
    final = export_hf(
        run.engine, run.task.tokenizer, point.path, out / "final", auto_class=run.task.auto_class
    )
    if group.rank() == 0:
        _write_results(run, point, summary, final)
    group.barrier()
    publish(cfg, out, summary)  # hub.push, after the last collective
    return summary


def _write_results(run: Run, point: ExportPoint, summary: dict, final: Path) -> None:
    """Rank 0: the task's files, final/dapt_text.json and the model card, summary.json, the plots, the closing
    line."""
    cfg, out = run.cfg, run.out
    results = run.task.final(run, point, summary)
    settings, description = run.task.text(cfg)
    (final / TEXT_FILE).write_text(json.dumps(settings, indent=1))
    write_model_card(final, cfg, run.task.name, summary, results=results, text=description, settings=settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = plot_curves(out / "metrics.jsonl", out / "plots") if cfg.log.plots else []
    run.metrics.finish(summary)
    wall = summary["wall_seconds"]
    earlier = f" ({wall:.0f} s with the runs it continued)" if summary["this_run_seconds"] < wall else ""
    tested = summary.get("test") or {}
    shown = " ".join(f"test {k} {tested[k]:.4f}" for k in ("accuracy", "macro_f1") if k in tested)
    where = f"model {final} | {shown + ' | ' if shown else ''}metrics {out / 'metrics.jsonl'} | plots "
    where += f"{', '.join(str(p) for p in plots) or 'off'} | summary {out / 'summary.json'}"
    log.info("done in %.0f s%s: %s", summary["this_run_seconds"], earlier, where)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50))
