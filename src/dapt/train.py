"""Masked-language-model training on a DeepSpeed engine: set-up, the loop, evaluation and the end of a run."""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dapt import dist
from dapt.attention import forward
from dapt.checkpoint import Checkpointer, check_disk, export_hf, verify
from dapt.config import RunConfig
from dapt.data import Corpus, RowDataset, eval_batches, prepare_data
from dapt.dsconfig import bf16_in_hardware, describe_optimizer, finalize_ds_config
from dapt.load import save_resolved
from dapt.masking import IGNORE, MLMCollator
from dapt.metrics import MetricsLogger, plot_curves, read_metrics
from dapt.model import build_model, compiled, param_groups, parameter_count
from dapt.numerics import Diverged, StepGuard, engine_config
from dapt.packing import Row
from dapt.preempt import Preempted, PreemptionWatch
from dapt.redact import redact
from dapt.schedule import build_scheduler, warmup_steps
from dapt.sparse import SparsePrediction, supports_sparse
from dapt.stream import RowFeeder, epoch_pass, rows_for_passes

log = logging.getLogger("dapt")


@dataclass
class TrainState:
    """Counters saved in every checkpoint; optimizer steps and micro-steps are kept apart."""

    step: int = 0
    micro_step: int = 0
    tokens_seen: int = 0
    slots_seen: int = 0  # token positions, padding included: tokens_seen / slots_seen is the packing efficiency
    rows: int = 0  # global training rows consumed (all ranks): where the data continues, whatever the world size
    samples_seen: int = 0
    best_eval_loss: float | None = None
    elapsed: float = 0.0


# ---------------------------------------------------------------- set-up

@dataclass
class EpochPass:
    """What one pass over epoch 0 found, all ranks together (only when train.epochs sets the length)."""

    rows: int
    skipped: Counter  # every bad or filtered record of the epoch, by reason


def total_steps(cfg: RunConfig, corpus: Corpus) -> tuple[int, EpochPass | None]:
    """train.max_steps, else enough optimizer steps for every row of the corpus to be trained train.epochs times
    (its rows counted once, each rank its own streams). The last step is not dropped when it is short of a full
    global batch: it is completed with rows of the next pass."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps, None
    started = time.time()
    streams = corpus.spec.streams
    mine = [c for c in range(streams) if c % dist.world() == dist.rank()]
    counted, skipped = epoch_pass(corpus.spec, mine)
    per_stream: dict[int, int] = {}
    total: Counter = Counter()
    for rows_of_rank, skipped_of_rank in dist.gather((counted, dict(skipped))):
        per_stream |= rows_of_rank
        total.update(skipped_of_rank)
    rows = sum(per_stream.values())
    per_step = t.micro_batch_size * t.grad_accum * dist.world()
    needed = rows_for_passes(per_stream, streams, t.epochs)
    steps = max(1, -(-needed // per_step))
    log.info("one epoch is %d rows in %d streams (%d to %d each; counted in %.1f s, set train.max_steps to skip the "
             "count); %g epoch(s): every row trained after %d global rows = %d optimizer steps of %d rows (%d rows "
             "beyond %g x %d come from the next pass)", rows, streams, min(per_stream.values(), default=0),
             max(per_stream.values(), default=0), time.time() - started, t.epochs, needed, steps, per_step,
             steps * per_step - round(t.epochs * rows), t.epochs, rows)
    return steps, EpochPass(int(rows), total)


def build_engine(cfg: RunConfig, model: torch.nn.Module, steps: int):
    ds = cfg.ds_config
    scheduler = None
    if "scheduler" not in ds:
        def scheduler(optimizer):
            return build_scheduler(optimizer, cfg.train, steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
                                           config=engine_config(ds), lr_scheduler=scheduler)
    return compiled(engine, cfg.train.compile)


def log_choices(cfg: RunConfig, accelerator: str, steps: int) -> None:
    t, ds = cfg.train, cfg.ds_config
    for note in cfg.notes:
        log.info("%s", note)
    log.info("global batch = micro x accumulation x world size = %d x %d x %d = %d rows of %d tokens",
             t.micro_batch_size, t.grad_accum, dist.world(), ds["train_batch_size"], cfg.data.max_seq_length)
    log.info("ZeRO stage %d, precision %s, optimizer %s, lr %g, schedule %s (warmup %d of %d optimizer steps)",
             ds.get("zero_optimization", {}).get("stage", 0), t.precision, describe_optimizer(ds, accelerator),
             t.lr, ds["scheduler"]["type"] if "scheduler" in ds else t.lr_schedule, warmup_steps(t, steps), steps)
    if t.precision == "bf16" and not bf16_in_hardware(accelerator):
        log.warning("bf16 runs without hardware support on this %s: it is emulated and about 10x slower than fp32",
                    accelerator.upper())


# ---------------------------------------------------------------- the loop

def make_collator(cfg: RunConfig, tokenizer, model_config, rate: float, seed: int) -> MLMCollator:
    k = cfg.masking
    return MLMCollator(tokenizer, rate, k.mask_prob, k.random_prob, seed=seed, whole_word=k.whole_word,
                       mask_token_id=k.mask_token_id, label_vocab=getattr(model_config, "char_vocab", None))


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of cross-entropy over masked positions, in fp32."""
    where = labels != IGNORE
    return F.cross_entropy(logits[where].float(), labels[where], reduction="sum")


def mlm_loss_sum(engine, batch: dict, device, sparse: SparsePrediction | None) -> torch.Tensor:
    """Forward one micro-batch; the masked-token loss sum. With `sparse`, the head sees the masked positions only."""
    def call(inputs: dict, keep: torch.Tensor | None) -> torch.Tensor:
        labels = batch["labels"]
        if keep is not None:  # flash attention's packed rows, flattened to their real tokens
            labels = labels[keep][None]
        labels = labels.to(device)
        if sparse is None:
            return masked_loss_sum(engine(**inputs).logits, labels)
        where = labels != IGNORE
        with sparse.select(where):
            logits = engine(**inputs).logits
        return F.cross_entropy(logits[0].float(), labels[where], reduction="sum")

    return forward(engine, batch, device, call)


def start(cfg: RunConfig) -> tuple[Path, str, torch.device]:
    """Process group up, output folder made (by rank 0, seen by all): (output_dir, accelerator, device)."""
    out = Path(cfg.output_dir)
    dist.init()
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(accelerator, torch.cuda.current_device()) if accelerator == "cuda" else torch.device("cpu")
    if dist.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    log.info("%s", dist.describe(cfg.cluster.env))
    return out, accelerator, device


def mlm_model(cfg: RunConfig, tokenizer) -> tuple[torch.nn.Module, SparsePrediction | None]:
    model = build_model(cfg, tokenizer, cfg.train.precision, cfg.ds_config)
    sparse = SparsePrediction(model) if cfg.train.sparse_prediction and supports_sparse(model) else None
    log.info("MLM head: %s", "sparse (vocabulary projection at masked positions only)" if sparse else "dense")
    return model, sparse


def run(cfg: RunConfig) -> dict:
    """Train an MLM as `cfg` says; resume if a checkpoint exists; export final/; return the summary."""
    out, accelerator, device = start(cfg)
    rank, world = dist.rank(), dist.world()
    corpus = prepare_data(cfg, out)
    steps, epoch = total_steps(cfg, corpus)
    model, sparse = mlm_model(cfg, corpus.tokenizer)
    finalize_ds_config(cfg.ds_config, steps, warmup_steps(cfg.train, steps), getattr(model.config, "hidden_size", None))
    if rank == 0:
        save_resolved(cfg, out / "config.resolved.yaml")
    log_choices(cfg, accelerator, steps)
    check_disk(out / "checkpoints", parameter_count(model), cfg.train.precision,
               cfg.checkpoint.keep + int(cfg.checkpoint.keep_best), cfg.checkpoint.disk_check)
    engine = build_engine(cfg, model, steps)

    state, streams, sample_lines, numerics = TrainState(), {}, 0, None
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.keep_best)
    resume_from = _resume_point(cfg, ckpt)
    if resume_from:
        client, mine = ckpt.load(engine, resume_from)
        state = TrainState(**client["train_state"])
        streams = {int(c): st for c, st in client["data"]["streams"].items()}
        sample_lines = mine.get("sample_lines", 0)
        numerics = client.get("numerics")
        _check_same_data(client, cfg)
        log.info("resumed from %s at optimizer step %d (%d tokens seen)", resume_from, state.step, state.tokens_seen)
    metrics = MetricsLogger(out, rank == 0,
                            {"project": cfg.log.wandb_project, "name": cfg.log.run_name or out.name,
                             "id": _wandb_id(out)} if cfg.log.wandb else None, cfg.to_dict())
    metrics.truncate_after(state.step)
    if corpus.skipped and state.step == 0:
        metrics.log(0, {f"data/eval_skipped/{reason}": n for reason, n in corpus.skipped.items()})
    samples = _SampleLog(out, rank, sample_lines) if cfg.data.log_sample_ids else None

    t, k = cfg.train, cfg.masking
    collate = make_collator(cfg, corpus.tokenizer, model.config, k.rate, cfg.seed)
    eval_collate = make_collator(cfg, corpus.tokenizer, model.config, k.eval_rate or k.rate, cfg.seed + 1)
    if state.rows % world:
        raise ValueError(f"the checkpoint consumed {state.rows} rows, which {world} ranks cannot continue evenly; "
                         "resume on a world size that divides it")
    feeder = RowFeeder(corpus.spec, rank, world, cfg.data.num_workers, streams, consumed=state.rows // world)
    guard = StepGuard(cfg.numerics, engine, cfg.ds_config, numerics)
    window = Counter()
    watch = PreemptionWatch()
    started = time.time() - state.elapsed
    bar = tqdm(total=steps, initial=state.step, desc="train", disable=rank != 0 or not cfg.log.progress)
    window_start = time.time()
    while state.step < steps:
        rows = [feeder.take(t.micro_batch_size) for _ in range(t.grad_accum)]
        micro = [collate([row_item(g, row) for g, row in part]) for part in rows]
        # Loss of the step = sum of masked-token losses / masked tokens of the whole step (all micro-batches, all
        # ranks). DeepSpeed divides by accumulation steps and averages over ranks, so multiply those back.
        # The same all-reduce carries any rank's stop signal, so all ranks stop after this same step.
        masked, stop_votes = dist.all_sum(sum(int((b["labels"] != IGNORE).sum()) for b in micro), watch.signum)
        scale = t.grad_accum * world / max(masked, 1.0)
        grad_norm = None
        for i, b in enumerate(micro):
            guard.backward(mlm_loss_sum(engine, b, device, sparse), scale)
            if i == t.grad_accum - 1:
                grad_norm = guard.grad_norm()
            engine.step()
            window["tokens"] += int(b["attention_mask"].sum())
            window["slots"] += b["attention_mask"].numel()
            window["samples"] += len(b["input_ids"])
            state.micro_step += 1
        outcome = guard.end(masked)
        if samples:
            samples.write([doc for part in rows for _, row in part for doc in row.doc_ids])
        state.step += 1
        state.rows += t.micro_batch_size * t.grad_accum * world
        bar.update(1)
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        window["grad_norm"] = grad_norm
        if not outcome.skipped:
            window["loss_sum"] += outcome.loss * masked
            window["masked"] += masked
        stop = guard.check(state.step, outcome, grad_norm)
        if stop:
            bar.close()
            watch.close()
            raise Diverged(stop, ckpt.before(guard.since))

        if state.step % t.log_every == 0 or state.step == steps:
            _log_train(engine, state, window, time.time() - window_start, metrics, bar, steps, feeder, guard.skipped)
            window, window_start = Counter(), time.time()
        eval_loss = None
        if corpus.valid and ((t.eval_every and state.step % t.eval_every == 0) or state.step == steps):
            eval_loss = evaluate(engine, corpus.valid, eval_collate, t, device, sparse)
            _log_eval(state, eval_loss, metrics, "eval")
        if (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0) or state.step == steps or stop_votes:
            state.elapsed = time.time() - started
            saved = ckpt.save(engine, state.step, _client_state(cfg, state, feeder, guard),
                              {"sample_lines": samples.lines if samples else 0}, eval_loss)
            if stop_votes and state.step < steps:
                bar.close()
                watch.close()
                # a rank the signal did not reach stops because another one got it: report SIGTERM there
                raise Preempted(watch.signum or signal.SIGTERM, state.step, str(saved))
    bar.close()
    watch.close()
    return finish(cfg, engine, corpus, state, ckpt, metrics, time.time() - started, device, feeder, epoch, sparse)


def row_item(g: int, row: Row) -> dict:
    return {"input_ids": row.ids, "key": g, "index": g, "lengths": row.lengths, "words": row.words}


def _log_train(engine, state: TrainState, window: Counter, seconds: float, metrics, bar, steps: int,
               feeder: RowFeeder, skipped: int) -> None:
    tokens, slots, samples = dist.all_sum(window["tokens"], window["slots"], window["samples"])
    state.tokens_seen += int(tokens)
    state.slots_seen += int(slots)
    state.samples_seen += int(samples)
    loss = window["loss_sum"] / window["masked"] if window["masked"] else float("nan")  # nan: all steps skipped
    values = {
        "train/loss": loss, "train/perplexity": math.exp(min(loss, 50)),
        "train/learning_rate": engine.get_lr()[0], "train/grad_norm": window["grad_norm"],
        "train/tokens_per_second": tokens / max(seconds, 1e-9), "train/samples_per_second": samples / max(seconds, 1e-9),
        "train/packing_efficiency": tokens / max(slots, 1), "train/epoch": feeder.epoch(),
        "train/tokens_seen": state.tokens_seen, "train/peak_memory_gb": peak_memory_gb(),
        "train/skipped_steps": skipped,
    }
    values |= {f"data/{k}": v for k, v in _gathered_counts(feeder).items()}
    metrics.log(state.step, values)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{values['train/learning_rate']:.2e}")
    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f", state.step, steps, loss,
             values["train/learning_rate"], window["grad_norm"], values["train/tokens_per_second"])


def _gathered_counts(feeder: RowFeeder) -> Counter:
    """Skipped and filtered records so far, over all ranks' streams."""
    total: Counter = Counter()
    for counts in dist.gather(dict(feeder.counts())):
        total.update(counts)
    return total


def _log_eval(state: TrainState, loss: float, metrics, prefix: str) -> None:
    if prefix == "eval" and (state.best_eval_loss is None or loss < state.best_eval_loss):
        state.best_eval_loss = loss
    metrics.log(state.step, {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(min(loss, 50))})
    log.info("step %d %s loss %.4f perplexity %.2f", state.step, prefix, loss, math.exp(min(loss, 50)))


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.no_grad()
def evaluate(engine, rows: list[Row], collate: MLMCollator, t, device, sparse: SparsePrediction | None = None) -> float:
    """Masked-token loss over `rows` (fixed masks), summed over ranks. Every rank runs the same number of forwards."""
    engine.eval()
    dataset = RowDataset(rows)
    loss_sum = count = 0.0
    for items in eval_batches(len(rows), t.micro_batch_size, dist.world(), dist.rank(), t.eval_batches):
        weight = 1.0 if items else 0.0  # a rank with no rows left still joins the forward (ZeRO-3 gathers)
        b = collate([dataset[i] for i in (items or [(0, 0)])])
        loss_sum += weight * float(mlm_loss_sum(engine, b, device, sparse))
        count += weight * int((b["labels"] != IGNORE).sum())
    engine.train()
    total, n = dist.all_sum(loss_sum, count)
    return total / max(n, 1.0)


# ---------------------------------------------------------------- checkpoint helpers

def _client_state(cfg: RunConfig, state: TrainState, feeder: RowFeeder, guard: StepGuard) -> dict:
    streams: dict[int, dict] = {}
    for part in dist.gather(feeder.states):
        streams |= part
    return {"train_state": vars(state).copy(), "config": redact(cfg.to_dict()), "numerics": guard.state_dict(),
            "data": {"streams": streams, "num_streams": cfg.data.streams, "files": redact(feeder.spec.files),
                     "rows_per_step": cfg.ds_config["train_batch_size"]}}


def _resume_point(cfg: RunConfig, ckpt: Checkpointer) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        problem = verify(Path(cfg.resume))
        if problem:
            raise ValueError(f"resume: checkpoint {cfg.resume} is damaged: {problem}")
        return Path(cfg.resume)
    return ckpt.latest_complete()


def _check_same_data(client: dict, cfg: RunConfig) -> None:
    saved = client.get("data", {})
    if saved.get("num_streams") != cfg.data.streams:
        raise ValueError(f"the checkpoint was written with data.streams={saved.get('num_streams')}, this run has "
                         f"{cfg.data.streams}: the streams' positions would not match; keep data.streams")
    if saved.get("rows_per_step") != cfg.ds_config["train_batch_size"]:
        log.warning("the global batch changed (%s -> %d rows): the data continues where it was, but the steps are "
                    "cut differently", saved.get("rows_per_step"), cfg.ds_config["train_batch_size"])


def _wandb_id(out: Path) -> str:
    """A stable run id per output_dir, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]


class _SampleLog:
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


# ---------------------------------------------------------------- the end of a run

def finish(cfg: RunConfig, engine, corpus: Corpus, state: TrainState, ckpt: Checkpointer, metrics, wall: float,
           device, feeder: RowFeeder, epoch: EpochPass | None, sparse: SparsePrediction | None = None) -> dict:
    out = Path(cfg.output_dir)
    skipped = _gathered_counts(feeder)
    if epoch and state.rows >= epoch.rows:
        skipped = epoch.skipped  # epoch 0 was read to its end: its pass saw every record
    final = export_hf(engine, corpus.tokenizer, ckpt.latest(), out / "final")
    summary = {"steps": state.step, "micro_steps": state.micro_step, "tokens_seen": state.tokens_seen,
               "samples_seen": state.samples_seen, "rows_trained": state.rows,
               "epoch_rows": epoch.rows if epoch else None, "best_eval_loss": state.best_eval_loss,
               "wall_seconds": round(wall, 1), "world_size": dist.world(), "packing_efficiency": state.tokens_seen / max(1, state.slots_seen),
               "skipped_records": dict(skipped),
               "eval_skipped_records": dict(corpus.skipped)}
    if corpus.test:
        k = cfg.masking
        test_collate = make_collator(cfg, corpus.tokenizer, engine.module.config, k.eval_rate or k.rate, cfg.seed + 2)
        summary["test_loss"] = evaluate(engine, corpus.test, test_collate, cfg.train, device, sparse)
        _log_eval(state, summary["test_loss"], metrics, "test")
    if dist.rank() == 0:
        evals = [r["eval/loss"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
        summary["final_eval_loss"] = evals[-1] if evals else None
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plots = plot_curves(out / "metrics.jsonl", out / "plots") if cfg.log.plots else []
        metrics.finish(summary)
        log.info("done in %.0f s: model %s | metrics %s | plots %s | summary %s", wall, final,
                 out / "metrics.jsonl", ", ".join(str(p) for p in plots) or "off", out / "summary.json")
    dist.barrier()
    return summary
