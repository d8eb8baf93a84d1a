"""The runner: the pieces every task trains through, so what one task honours all tasks honour.

- `start`: process group, device, output folder.
- `build_engine`: DeepSpeed engine from the task's optimizer groups, with dapt's schedule and torch.compile.
- `Checkpoints`: the disk check, the checkpointer (cadence, keep, keep_best), the resume point (the latest complete
  checkpoint, or an explicit path verified first) and one client-state layout for every task.
- `open_metrics`: metrics.jsonl, W&B when log.wandb, cut back to the resumed step.
- `optimizer_step`: one optimizer step over the micro-batches: the all-reduce of the step's loss weight (masked
  tokens or examples) that also carries the stop votes, backward at the step's normalisation, grad norm, StepGuard.
- `SampleLog`: data.log_sample_ids.

The tasks (MLM, classifier) and launch/profile.py call these; none of them writes its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch

from dapt.config.dsconfig import bf16_in_hardware, describe_optimizer
from dapt.config.redact import redact
from dapt.config.schema import BadInput, ConfigError, RunConfig
from dapt.runtime import elastic, folder, group, zero3
from dapt.runtime.checkpoint import Checkpointer, Score, check_disk, step_in, verify
from dapt.runtime.metrics import MetricsLogger
from dapt.runtime.numerics import StepGuard, StepOutcome, engine_config
from dapt.runtime.schedule import build_scheduler, continuation_problem, schedule_of, warmup_steps

log = logging.getLogger("dapt")

LAYOUT = (
    2  # the client-state layout of checkpoints (1: dapt 0.1's classifier checkpoints, refused with a message)
)


# ---------------------------------------------------------------- start and engine


@dataclass
class Start:
    out: Path
    accelerator: str  # "cuda" or "cpu"
    device: torch.device


def start(cfg: RunConfig) -> Start:
    """Process group up, this rank's device, the output folder made (by rank 0, seen by all)."""
    out = Path(cfg.output_dir)
    missing = missing_model_folder(cfg.model.name_or_path)
    if missing:  # before the folder is claimed: the corrected command must not find it taken
        raise BadInput(missing)
    group.init()
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = (
        torch.device("cuda", torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    )
    if group.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        folder.claim(cfg)  # dapt_run.json: this folder holds this task's run
    group.barrier()
    log.info("%s", group.describe(cfg.cluster.env))
    return Start(out, accelerator, device)


def missing_model_folder(name: str | None) -> str | None:
    """Why model.name_or_path names a local folder that is not there, or None. The config check lets such a path
    through (a recipe's later stage reads an earlier stage's final/, written by then); a run cannot."""
    if not name or Path(name).expanduser().exists():
        return None
    if name.count("/") > 1 or name.startswith((".", "/", "~")):  # a hub id is NAME or OWNER/NAME
        return (
            f"model.name_or_path: {name} is not a folder (a path, not a hub id: those have at most one '/'); check "
            "the path (a typo?) or run the stage that writes it first"
        )
    return None


def decays(p: torch.nn.Parameter) -> bool:
    """Whether weight decay applies: to matrices, not to biases and norm weights (1-D). Read from the parameter's
    real shape: zero.Init leaves every ZeRO-3 parameter a 1-D empty tensor and keeps the shape in ds_shape."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of `model`, also when ZeRO-3 has partitioned it (zero.Init leaves p.numel() == 0 and keeps the real
    count in ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm weights (1-D) get none."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decays(p) else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(
    cfg: RunConfig,
    model: torch.nn.Module,
    steps: int,
    ds: dict,
    *,
    groups: list[dict] | None = None,
    resuming: bool = False,
):
    """The DeepSpeed engine under DeepSpeed config `ds` (finalize_ds_config's) over `groups` (the task's optimizer
    parameter groups; default: param_groups with train.weight_decay): dapt's schedule unless `ds` names one,
    torch.compile as train.compile says; under ZeRO-3 from a pretrained folder, fp32 masters from the folder unless
    `resuming` (the checkpoint brings its own)."""
    groups = groups or param_groups(model, cfg.train.weight_decay)
    scheduler = None
    if "scheduler" not in ds:

        def scheduler(optimizer):
            return build_scheduler(optimizer, cfg.train, steps)

    # ZeRO-3 from a pretrained folder: masters not rounded to bf16 (a resume loads its own masters instead)
    exact = {} if resuming else zero3.fp32_partitions(cfg, model, ds)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=engine_config(ds), lr_scheduler=scheduler
    )
    zero3.set_masters(engine, exact)
    backend = cfg.train.compile
    if backend != "off":
        # the sparse MLM head keeps the masked positions, a count known only from the data (a nonzero): traced into
        # the graph rather than breaking it at every forward (on CPU, inductor: 3 graph breaks and 6 graphs -> none
        # and 1, step 379 -> 356 ms; docs/training-and-resume.md)
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        engine.compile(backend=backend)
        log.info("model compiled with torch.compile, backend %s (the first steps include compiling)", backend)
    return engine


def log_choices(cfg: RunConfig, accelerator: str, steps: int) -> None:
    """What was chosen and why: the config's notes, the global batch, ZeRO, precision, optimizer and schedule."""
    t, ds = cfg.train, cfg.ds_config
    for note in cfg.notes:
        log.info("%s", note)
    log.info(
        "global batch = micro x accumulation x world size = %d x %d x %d = %d rows of up to %d tokens",
        t.micro_batch_size,
        t.grad_accum,
        group.world(),
        ds["train_batch_size"],
        cfg.data.max_seq_length,
    )
    log.info(
        "ZeRO stage %d, precision %s, optimizer %s, lr %g, schedule %s (warmup %d of %d optimizer steps)",
        ds.get("zero_optimization", {}).get("stage", 0),
        t.precision,
        describe_optimizer(ds, accelerator),
        t.lr,
        ds["scheduler"]["type"] if "scheduler" in ds else t.lr_schedule,
        warmup_steps(t, steps),
        steps,
    )
    if t.precision == "bf16" and not bf16_in_hardware(accelerator):
        log.warning(
            "bf16 runs without hardware support on this %s: it is emulated and about 10x slower than fp32",
            accelerator.upper(),
        )


# ---------------------------------------------------------------- checkpoints and resume


@dataclass
class TrainState:
    """Counters saved in every checkpoint, for every task; optimizer steps and micro-steps are kept apart."""

    step: int = 0
    micro_step: int = 0
    tokens_seen: int = 0
    slots_seen: int = (
        0  # token positions, padding included: tokens_seen / slots_seen is the packing efficiency
    )
    rows: int = (
        0  # global training rows consumed (all ranks): where the data continues, whatever the world size
    )
    samples_seen: int = 0
    best_eval_loss: float | None = None  # read only from dapt 0.2's checkpoints (Progress.best since)
    elapsed: float = 0.0


@dataclass
class Resumed:
    """What a checkpoint gives back: the counters, the streams' positions, this rank's sample-log length, the
    numerics guard's state and the task's own state (the classifier's best score and patience)."""

    state: TrainState = field(default_factory=TrainState)
    streams: dict[int, dict] = field(default_factory=dict)
    sample_lines: int = 0
    numerics: dict | None = None
    task: dict = field(default_factory=dict)
    point: Path | None = None


@dataclass(frozen=True)
class ExportPoint:
    """The checkpoint final/ is made from: where, its optimizer step, why, and its index entry when it is the best
    evaluation (metric, score, direction)."""

    path: Path
    step: int
    why: str
    best: dict | None = None


class Checkpoints:
    """Checkpoint policy from the `checkpoint` section, the same for every task."""

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        keep_best: bool | None = None,
        steps: int = 0,
        streams: int | None = None,
    ):
        """`steps`: the run's optimizer steps; its schedule is saved with every checkpoint, and a resume whose
        learning rate would jump under this run's schedule is refused (continuation_problem). `streams`: the run's
        data streams (default data.streams), which a resumed checkpoint must have been written with."""
        c = cfg.checkpoint
        self.cfg, self.streams = cfg, streams or cfg.data.streams
        own = steps and "scheduler" not in cfg.ds_config  # a DeepSpeed scheduler keeps its own state
        self.schedule = schedule_of(cfg.train, steps) if own else None
        self.keep_best = c.keep_best if keep_best is None else keep_best
        self.store = Checkpointer(out / "checkpoints", c.keep, self.keep_best)
        self.carried_lines: dict[int, int] = {}  # sample-log lengths of ranks beyond this run's world size
        self.resumed_elapsed = 0.0  # training seconds of the runs this one continues
        self._point: tuple[Path | None] | None = None  # the resume point, once found

    def check_disk(self, parameters: int) -> None:
        c = self.cfg.checkpoint
        check_disk(
            self.store.root, parameters, self.cfg.train.precision, c.keep + int(self.keep_best), c.disk_check
        )

    @property
    def saves_evaluations(self) -> bool:
        """checkpoint.export=best with keep_best: every evaluation is saved, so the best one can be exported."""
        return self.keep_best and self.cfg.checkpoint.export == "best"

    def due(self, step: int, steps: int, evaluated: bool = False) -> bool:
        """checkpoint.every's cadence, the last step, and evaluations when they are saved."""
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or step == steps or (evaluated and self.saves_evaluations)

    def export_point(self) -> ExportPoint:
        """The checkpoint final/ is made from, and why (checkpoint.export)."""
        index = self.store.index()
        best = index["best"] if self.saves_evaluations else None
        if best:
            point = self.store.root / best["tag"]
            return ExportPoint(
                point, step_in(index, point), "checkpoint.export=best: the best evaluation", best
            )
        latest = self.store.latest()
        if self.cfg.checkpoint.export == "best":
            why = "no evaluation" if self.keep_best else "checkpoint.keep_best=false, the best is not kept"
            return ExportPoint(latest, step_in(index, latest), f"the last checkpoint ({why})")
        return ExportPoint(latest, step_in(index, latest), "checkpoint.export=last")

    def resume_point(self) -> Path | None:
        """resume=never: none; auto: the latest complete checkpoint; a path: that checkpoint, verified first. Found
        once (verifying reads every file) and kept."""
        if self._point is None:
            self._point = (self._find_resume_point(),)
        return self._point[0]

    def _find_resume_point(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume != "auto":
            problem = verify(Path(resume))
            if problem:
                raise BadInput(f"resume: checkpoint {resume} is damaged: {problem}")
            return Path(resume)
        return self.store.latest_complete()

    def resume(self, engine) -> Resumed:
        point = self.resume_point()
        if point is None:
            return Resumed()
        client, mine = self.load(engine, point)
        if "train_state" not in client:
            raise BadInput(
                f"resume: checkpoint {point} was written by an older dapt (a classifier checkpoint without the shared "
                "client-state layout) and cannot be continued; start over with --resume=never (or a new output_dir)"
            )
        _check_same_data(client, self.cfg, self.streams)
        lines = {int(r): n for r, n in client.get("samples", {}).items()}  # every rank's, when it was saved
        if lines and self.cfg.data.log_sample_ids and group.rank() == 0:
            trim_sample_logs(Path(self.cfg.output_dir), lines, group.world())
        # the logs of ranks this run lacks keep their length, and the next checkpoints carry it forward
        self.carried_lines = {r: n for r, n in lines.items() if r >= group.world()}
        resumed = Resumed(
            TrainState(**client["train_state"]),
            {int(c): st for c, st in client.get("data", {}).get("streams", {}).items()},
            lines.get(group.rank(), 0) if lines else mine.get("sample_lines", 0),
            client.get("numerics"),
            client.get("task", {}),
            point,
        )
        self.resumed_elapsed = resumed.state.elapsed
        log.info(
            "resumed from %s at optimizer step %d (%d rows trained)",
            point,
            resumed.state.step,
            resumed.state.rows,
        )
        return resumed

    def check_continuation(self) -> None:
        """Before anything is written: continuing a run with another length is refused where its learning rate would
        jump (ConfigError), and said where not (continuation). With train.max_steps the config check has refused it
        already, before any rank started; with train.epochs the length is known only now, the data counted."""
        point = self.resume_point()  # verified (a damaged one raises, as the resume itself would)
        problem = continuation(self.cfg, point, self.schedule) if point and self.schedule else None
        if problem:
            raise ConfigError([problem])

    def load(self, engine, point: Path) -> tuple[dict, dict]:
        """Load checkpoint `point` (a resume, or the weights to export): through its universal conversion when it was
        written on another world size or ZeRO stage (made once, then reused). Returns (client state, this rank's
        own state)."""
        info, stage = elastic.read_info(point), engine.zero_optimization_stage()
        if not elastic.needs_conversion(info, group.world(), stage):
            return self.store.load(engine, point)
        problem = elastic.convertible(info, stage, point)
        if problem:
            raise BadInput(problem)
        elastic.check_same_model(point, engine)
        folder = elastic.universal(point)
        with elastic.universal_load(engine):
            client, mine = self.store.load(engine, folder, ranks=point)
        elastic.repair_universal_load(engine, folder)
        return client, mine

    def save(
        self,
        engine,
        state: TrainState,
        *,
        feeder,
        guard: StepGuard,
        task: dict,
        samples: SampleLog | None,
        score: Score | None,
    ) -> Path:
        """Save a checkpoint (all ranks); `score`: the evaluation at this step, for the best-checkpoint index."""
        extra = {"sample_lines": samples.lines if samples else 0}
        client = client_state(self.cfg, state, feeder, guard, task, extra["sample_lines"])
        client["samples"] = self.carried_lines | client["samples"]
        info = elastic.checkpoint_info(engine, self.cfg) | {"schedule": self.schedule, "step": state.step}
        return self.store.save(engine, state.step, client, extra, score, info)


def continuation(cfg: RunConfig, point: Path, schedule: dict) -> str | None:
    """Why the run cannot continue checkpoint `point` under `schedule` (another length, where the learning rate would
    jump), or None, having said what happens where it can. The schedule and step come from the checkpoint's
    dapt_checkpoint.json; the config check and the run both ask this."""
    info = elastic.read_info(point) or {}
    saved, step = info.get("schedule"), info.get("step")
    if not saved or saved == schedule or step is None:
        return None
    problem = continuation_problem(saved, schedule, step, cfg.train.lr)
    if problem and cfg.train.rebuild_schedule:
        log.warning(
            "resume: %s; train.rebuild_schedule=true: the schedule is rebuilt over the new length", problem
        )
        return None
    if problem:
        return (
            f"resume: {point}: {problem}. To finish it as planned, keep --train.max_steps={saved['total']} (or its "
            f"train.epochs); to train on from its weights with a schedule of their own, start a new run from them once "
            f"it has finished: --model.name_or_path={point.parent.parent / 'final'} --output_dir=NEW; to go on with the "
            "schedule rebuilt over the new length, the rate jumping there, --train.rebuild_schedule=true. A constant "
            "schedule is lengthened as it is"
        )
    log.info(
        "resume: the run goes on to %d optimizer steps (it was planned for %d); the learning rate goes on without a "
        "jump",
        schedule["total"],
        saved["total"],
    )
    return None


def client_state(
    cfg: RunConfig, state: TrainState, feeder, guard: StepGuard, task: dict, sample_lines: int = 0
) -> dict:
    """The checkpoint's client state, one layout for every task: counters, the config, the numerics guard, every
    stream's position and every rank's sample-log length (gathered from all ranks), and the task's own state."""
    streams: dict[int, dict] = {}
    for part in group.gather(feeder.states):
        streams |= part
    data = {
        "streams": streams,
        "num_streams": feeder.spec.streams,
        "files": redact(feeder.spec.files),
        "rows_per_step": cfg.ds_config["train_batch_size"],
    }
    return {
        "layout": LAYOUT,
        "train_state": vars(state).copy(),
        "config": redact(cfg.to_dict()),
        "numerics": guard.state_dict(),
        "data": data,
        "samples": dict(enumerate(group.gather(sample_lines))),
        "task": task,
    }


def _check_same_data(client: dict, cfg: RunConfig, streams: int) -> None:
    """`streams`: the run's data streams (data.streams, or fewer where the data cannot fill them)."""
    saved = client.get("data", {})
    marked = client.get("config", {}).get("model", {}).get("mark_capitals", False)
    if marked != cfg.model.mark_capitals:
        raise BadInput(
            f"the checkpoint was written with model.mark_capitals={str(marked).lower()}, this run has "
            f"{str(cfg.model.mark_capitals).lower()}: the same text would become other tokens; keep the setting"
        )
    if saved.get("num_streams") != streams:
        raise BadInput(
            f"the checkpoint was written with data.streams={saved.get('num_streams')}, this run has "
            f"{streams}: the streams' positions would not match; keep data.streams"
        )
    if saved.get("rows_per_step") != cfg.ds_config["train_batch_size"]:
        log.warning(
            "the global batch changed (%s -> %d rows): the data continues where it was, but the steps are cut "
            "differently",
            saved.get("rows_per_step"),
            cfg.ds_config["train_batch_size"],
        )


# ---------------------------------------------------------------- metrics and sample logs


def open_metrics(cfg: RunConfig, out: Path, step: int) -> MetricsLogger:
    """metrics.jsonl (rank 0), a W&B run when log.wandb (the same run again on resume) and TensorBoard event files
    when log.tensorboard; cut back to `step`."""
    wandb = None
    if cfg.log.wandb:
        wandb = {"project": cfg.log.wandb_project, "name": cfg.log.run_name or out.name, "id": wandb_id(out)}
    metrics = MetricsLogger(out, group.rank() == 0, wandb, cfg.to_dict(), cfg.log.tensorboard, step)
    metrics.truncate_after(step)
    return metrics


def wandb_id(out: Path) -> str:
    """A stable run id per output_dir, so a resumed run continues the same W&B run."""
    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]


class SampleLog:
    """output_dir/samples.rank<R>.txt: the documents this rank trained on, cut back to the checkpoint on resume."""

    def __init__(self, out: Path, rank: int, lines: int):
        self.path = out / f"samples.rank{rank}.txt"
        kept = self.path.read_text().splitlines()[:lines] if self.path.exists() else []
        self.path.write_text("".join(x + "\n" for x in kept))
        self.lines = len(kept)

    def write(self, ids: list[str]) -> None:
        with self.path.open("a") as f:
            f.writelines(x + "\n" for x in ids)
        self.lines += len(ids)


def trim_sample_logs(out: Path, lines: dict[int, int], world: int) -> None:
    """Resuming on fewer ranks: the sample logs of the ranks this run lacks are cut back to the checkpoint too (each
    rank cuts its own), so every samples.rank<R>.txt ends where the checkpoint does."""
    for rank, n in lines.items():
        path = out / f"samples.rank{rank}.txt"
        if rank >= world and path.exists():
            path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:n]))


def sample_log(cfg: RunConfig, out: Path, lines: int) -> SampleLog | None:
    return SampleLog(out, group.rank(), lines) if cfg.data.log_sample_ids else None


# ---------------------------------------------------------------- the optimizer step


@dataclass
class Step:
    outcome: StepOutcome
    grad_norm: float  # nan when the engine reports none
    weight: float  # the step's loss denominator over all ranks (masked tokens, or example weight)
    stop_votes: int  # ranks that received a stop signal before this step


def no_clock(part: str) -> None:
    """The default clock of optimizer_step: nothing is timed."""


def optimizer_step(
    engine,
    guard: StepGuard,
    micro: list[dict],
    loss_sum: Callable[[dict], torch.Tensor],
    weight: Callable[[dict], float],
    *,
    signum: int = 0,
    clock: Callable[[str], None] = no_clock,
    around=contextlib.nullcontext,
) -> Step:
    """One optimizer step over this rank's micro-batches.

    The step's loss is the sum of per-item losses over the whole step (every micro-batch of every rank) divided by
    the step's total weight; DeepSpeed divides each micro-batch's loss by the accumulation steps and averages
    gradients over ranks, so the sums are multiplied back by accumulation x world / weight. The same all-reduce that
    finds the weight carries the stop votes (`signum`: a signal this rank received), so every rank stops after the
    same step. `clock(part)` is called after the step's set-up ("data") and after each micro-batch's "forward",
    "backward" and "optimizer"; `around()` wraps each micro-batch (launch/profile.py's timings and memory tracker).
    """
    total, votes = group.all_sum(sum(weight(b) for b in micro), signum)
    scale = len(micro) * group.world() / (total or 1.0)
    clock("data")
    grad_norm = None
    for i, b in enumerate(micro):
        with around():
            loss = loss_sum(b)
            clock("forward")
            guard.backward(loss, scale)
            if i == len(micro) - 1:
                grad_norm = guard.grad_norm()
            clock("backward")
            engine.step()
            clock("optimizer")
    outcome = guard.end(total)
    clock("optimizer")  # the step's end: the guard's verdict, agreed over ranks
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    return Step(outcome, float(grad_norm) if grad_norm is not None else float("nan"), total, int(votes))


class Clock:
    """Times the parts of optimizer steps (synchronizing a GPU at each mark, so the parts add up)."""

    def __init__(self, accelerator: str):
        self.sync = torch.cuda.synchronize if accelerator == "cuda" else (lambda: None)
        self.parts: dict[str, float] = {}
        self.last = 0.0

    def begin(self) -> None:
        self.sync()
        self.parts = {}
        self.last = time.perf_counter()

    def __call__(self, part: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now
