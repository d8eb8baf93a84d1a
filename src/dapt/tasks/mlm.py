"""launch/mlm.py: masked-language-model training through the runner: the MLM data, model and loss, the loop,
evaluation and the end of a run."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dapt.config.dsconfig import finalize_ds_config
from dapt.config.schema import RunConfig, save_resolved
from dapt.data.masking import IGNORE, MLMCollator
from dapt.data.packing import Row
from dapt.data.prepare import (
    TEXT_FILE,
    Corpus,
    RowDataset,
    eval_batches,
    prepare_data,
    text_description,
    text_settings,
)
from dapt.data.prepare import feeder as data_feeder
from dapt.data.stream import RowFeeder, epoch_pass, rows_for_passes
from dapt.model.attention import forward
from dapt.model.build import build_model, parameter_count
from dapt.model.sparse import SparsePrediction, supports_sparse
from dapt.runtime import group
from dapt.runtime.card import write_model_card
from dapt.runtime.checkpoint import export_hf
from dapt.runtime.metrics import plot_curves, read_metrics
from dapt.runtime.numerics import Diverged, StepGuard
from dapt.runtime.preempt import Preempted, PreemptionWatch
from dapt.runtime.publish import publish
from dapt.runtime.runner import (
    Checkpoints,
    Step,
    TrainState,
    build_engine,
    log_choices,
    no_clock,
    open_metrics,
    optimizer_step,
    sample_log,
    start,
)
from dapt.runtime.schedule import warmup_steps

log = logging.getLogger("dapt")


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
    mine = [c for c in range(streams) if c % group.world() == group.rank()]
    counted, skipped = epoch_pass(corpus.spec, mine)
    per_stream: dict[int, int] = {}
    total: Counter = Counter()
    for rows_of_rank, skipped_of_rank in group.gather((counted, dict(skipped))):
        per_stream |= rows_of_rank
        total.update(skipped_of_rank)
    rows = sum(per_stream.values())
    per_step = t.micro_batch_size * t.grad_accum * group.world()
    needed = rows_for_passes(per_stream, streams, t.epochs)
    steps = max(1, -(-needed // per_step))
    log.info(
        "one epoch is %d rows in %d streams (%d to %d each; counted in %.1f s, set train.max_steps to skip the "
        "count); %g epoch(s): every row trained after %d global rows = %d optimizer steps of %d rows (%d rows "
        "beyond %g x %d come from the next pass)",
        rows,
        streams,
        min(per_stream.values(), default=0),
        max(per_stream.values(), default=0),
        time.time() - started,
        t.epochs,
        needed,
        steps,
        per_step,
        steps * per_step - round(t.epochs * rows),
        t.epochs,
        rows,
    )
    return steps, EpochPass(int(rows), total)


# ---------------------------------------------------------------- the loop


def make_collator(cfg: RunConfig, tokenizer, model_config, rate: float, seed: int) -> MLMCollator:
    k = cfg.masking
    return MLMCollator(
        tokenizer,
        rate,
        k.mask_prob,
        k.random_prob,
        seed=seed,
        whole_word=k.whole_word,
        mask_token_id=k.mask_token_id,
        label_vocab=getattr(model_config, "char_vocab", None),
    )


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of cross-entropy over masked positions, in fp32."""
    where = labels != IGNORE
    return F.cross_entropy(logits[where].float(), labels[where], reduction="sum")


def masked_logits(
    engine, batch: dict, device, sparse: SparsePrediction | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (logits at the masked positions, their labels). With `sparse`, the head sees the
    masked positions only."""

    def call(inputs: dict, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if keep is not None:  # flash attention's packed rows, flattened to their real tokens
            labels = labels[keep][None]
        labels = labels.to(device)
        where = labels != IGNORE
        if sparse is None:
            return engine(**inputs).logits[where], labels[where]
        with sparse.select(where):
            logits = engine(**inputs).logits
        return logits[0], labels[where]

    return forward(engine, batch, device, call)


def mlm_loss_sum(engine, batch: dict, device, sparse: SparsePrediction | None) -> torch.Tensor:
    """Forward one micro-batch; the sum (not mean) of cross-entropy over its masked tokens, in fp32."""
    logits, labels = masked_logits(engine, batch, device, sparse)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def mlm_model(cfg: RunConfig, tokenizer) -> tuple[torch.nn.Module, SparsePrediction | None]:
    model = build_model(cfg, tokenizer, cfg.train.precision, cfg.ds_config, task="mlm")
    sparse = SparsePrediction(model) if cfg.train.sparse_prediction and supports_sparse(model) else None
    log.info("MLM head: %s", "sparse (vocabulary projection at masked positions only)" if sparse else "dense")
    return model, sparse


@dataclass
class Loop:
    """What an MLM optimizer step needs (launch/profile.py runs the same steps through it)."""

    cfg: RunConfig
    engine: object
    guard: StepGuard
    feeder: RowFeeder
    collate: MLMCollator
    device: torch.device
    sparse: SparsePrediction | None
    watch: PreemptionWatch | None = None


def mlm_step(loop: Loop, clock=no_clock, around=contextlib.nullcontext) -> tuple[Step, list[dict], list]:
    """Take this rank's rows of one optimizer step, collate them and run the step: (the step, its micro-batches,
    its rows)."""
    t, engine = loop.cfg.train, loop.engine
    rows = [loop.feeder.take(t.micro_batch_size) for _ in range(t.grad_accum)]
    micro = [loop.collate([row_item(g, row) for g, row in part]) for part in rows]
    step = optimizer_step(
        engine,
        loop.guard,
        micro,
        lambda b: mlm_loss_sum(engine, b, loop.device, loop.sparse),
        masked_count,
        loop.watch.signum if loop.watch else 0,
        clock,
        around,
    )
    return step, micro, rows


def masked_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


def run(cfg: RunConfig) -> dict:
    """Train an MLM as `cfg` says; resume if a checkpoint exists; export final/; return the summary."""
    s = start(cfg)
    corpus = prepare_data(cfg, s.out)
    steps, epoch = total_steps(cfg, corpus)
    model, sparse = mlm_model(cfg, corpus.tokenizer)
    finalize_ds_config(
        cfg.ds_config, steps, warmup_steps(cfg.train, steps), getattr(model.config, "hidden_size", None)
    )
    ckpts = Checkpoints(cfg, s.out, steps=steps)
    ckpts.check_continuation()
    if group.rank() == 0:
        save_resolved(cfg, s.out / "config.resolved.yaml")
    log_choices(cfg, s.accelerator, steps)
    ckpts.check_disk(parameter_count(model))
    engine = build_engine(cfg, model, steps, resuming=ckpts.resume_point() is not None)
    resumed = ckpts.resume(engine)
    state = resumed.state
    metrics = open_metrics(cfg, s.out, state.step)
    if corpus.skipped and state.step == 0:
        metrics.log(0, {f"data/eval_skipped/{reason}": n for reason, n in corpus.skipped.items()})
    feeder = data_feeder(corpus.spec, cfg, resumed.streams, state.rows)
    k = cfg.masking
    loop = Loop(
        cfg,
        engine,
        StepGuard(cfg.numerics, engine, cfg.ds_config, resumed.numerics),
        feeder,
        make_collator(cfg, corpus.tokenizer, model.config, k.rate, cfg.seed),
        s.device,
        sparse,
        PreemptionWatch(),
    )
    started = time.time() - state.elapsed
    try:
        train_loop(
            loop, state, steps, corpus, ckpts, metrics, sample_log(cfg, s.out, resumed.sample_lines), started
        )
    finally:
        loop.watch.close()
    return finish(
        cfg, engine, corpus, state, ckpts, metrics, time.time() - started, s.device, feeder, epoch, sparse
    )


def train_loop(
    loop: Loop,
    state: TrainState,
    steps: int,
    corpus: Corpus,
    ckpts: Checkpoints,
    metrics,
    samples,
    started: float,
) -> None:
    cfg, engine, t = loop.cfg, loop.engine, loop.cfg.train
    k = cfg.masking
    eval_collate = make_collator(
        cfg, corpus.tokenizer, engine.module.config, k.eval_rate or k.rate, cfg.seed + 1
    )
    window, window_start = Counter(), time.time()
    bar = tqdm(
        total=steps, initial=state.step, desc="train", disable=group.rank() != 0 or not cfg.log.progress
    )
    with bar:
        while state.step < steps:
            step, micro, rows = mlm_step(loop)
            _account(state, window, step, micro, rows, samples)
            bar.update(1)
            stop = loop.guard.check(state.step, step.outcome, step.grad_norm)
            if stop:
                raise Diverged(stop, ckpts.store.before(loop.guard.since))
            if state.step % t.log_every == 0 or state.step in (1, steps):  # the first: warmup shows
                _log_train(
                    engine,
                    state,
                    window,
                    time.time() - window_start,
                    metrics,
                    bar,
                    steps,
                    loop.feeder,
                    loop.guard.skipped,
                )
                window, window_start = Counter(), time.time()
            eval_loss = None
            if corpus.valid and ((t.eval_every and state.step % t.eval_every == 0) or state.step == steps):
                result = evaluate(engine, corpus.valid, eval_collate, t, loop.device, loop.sparse)
                _log_eval(state, result, metrics, "eval")
                eval_loss = result["loss"]
            if ckpts.due(state.step, steps, eval_loss is not None) or step.stop_votes:
                state.elapsed = time.time() - started
                saved = ckpts.save(engine, state, loop.feeder, loop.guard, {}, samples, eval_loss)
                if step.stop_votes and state.step < steps:
                    # a rank the signal did not reach stops because another one got it: report SIGTERM there
                    raise Preempted(loop.watch.signum or signal.SIGTERM, state.step, str(saved))


def _account(state: TrainState, window: Counter, step, micro: list[dict], rows: list, samples) -> None:
    """After a step: the log window's tokens, slots, samples and loss; the counters; the sample log."""
    for b in micro:
        window["tokens"] += int(b["attention_mask"].sum())
        window["slots"] += b["attention_mask"].numel()
        window["samples"] += len(b["input_ids"])
    window["grad_norm"] = step.grad_norm
    if not step.outcome.skipped:
        window["loss_sum"] += step.outcome.loss * step.weight
        window["masked"] += step.weight
    state.micro_step += len(micro)
    state.step += 1
    state.rows += sum(len(part) for part in rows) * group.world()
    if samples:
        samples.write([doc for part in rows for _, row in part for doc in row.doc_ids])


def row_item(g: int, row: Row) -> dict:
    return {"input_ids": row.ids, "key": g, "index": g, "lengths": row.lengths, "words": row.words}


def _log_train(
    engine,
    state: TrainState,
    window: Counter,
    seconds: float,
    metrics,
    bar,
    steps: int,
    feeder: RowFeeder,
    skipped: int,
) -> None:
    tokens, slots, samples = group.all_sum(window["tokens"], window["slots"], window["samples"])
    state.tokens_seen += int(tokens)
    state.slots_seen += int(slots)
    state.samples_seen += int(samples)
    loss = (
        window["loss_sum"] / window["masked"] if window["masked"] else float("nan")
    )  # nan: all steps skipped
    values = {
        "train/loss": loss,
        "train/perplexity": math.exp(min(loss, 50)),
        "train/learning_rate": engine.get_lr()[0],
        "train/grad_norm": window["grad_norm"],
        "train/tokens_per_second": tokens / max(seconds, 1e-9),
        "train/samples_per_second": samples / max(seconds, 1e-9),
        "train/packing_efficiency": tokens / max(slots, 1),
        "train/epoch": feeder.epoch(),
        "train/tokens_seen": state.tokens_seen,
        "train/peak_memory_gb": peak_memory_gb(),
        "train/skipped_steps": skipped,
    }
    values |= {f"data/{k}": v for k, v in _gathered_counts(feeder).items()}
    metrics.log(state.step, values)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{values['train/learning_rate']:.2e}")
    log.info(
        "step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f",
        state.step,
        steps,
        loss,
        values["train/learning_rate"],
        window["grad_norm"],
        values["train/tokens_per_second"],
    )


def _gathered_counts(feeder: RowFeeder) -> Counter:
    """Skipped and filtered records so far, over all ranks' streams."""
    total: Counter = Counter()
    for counts in group.gather(dict(feeder.counts())):
        total.update(counts)
    return total


def _log_eval(state: TrainState, result: dict, metrics, prefix: str) -> None:
    loss = result["loss"]
    if prefix == "eval" and (state.best_eval_loss is None or loss < state.best_eval_loss):
        state.best_eval_loss = loss
    metrics.log(state.step, {f"{prefix}/{k}": v for k, v in result.items()})
    log.info("step %d %s loss %.4f perplexity %.2f accuracy %.4f top-5 %.4f", state.step, prefix, loss,
             result["perplexity"], result["accuracy"], result["top5_accuracy"])  # fmt: skip


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@torch.no_grad()
def evaluate(
    engine, rows: list[Row], collate: MLMCollator, t, device, sparse: SparsePrediction | None = None
) -> dict:
    """Over `rows` with fixed masks, all ranks together: the masked-token loss and perplexity, `accuracy` (masked
    tokens predicted exactly) and `top5_accuracy` (the true token among the five most likely). Every rank runs the
    same number of forwards."""
    engine.eval()
    dataset = RowDataset(rows)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, masked tokens, exact, in the top 5
    for items in eval_batches(len(rows), t.micro_batch_size, group.world(), group.rank(), t.eval_batches):
        weight = 1.0 if items else 0.0  # a rank with no rows left still joins the forward (ZeRO-3 gathers)
        logits, labels = masked_logits(
            engine, collate([dataset[i] for i in (items or [(0, 0)])]), device, sparse
        )
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        sums += weight * torch.tensor([float(F.cross_entropy(logits.float(), labels, reduction="sum")),
                                       len(labels), int((top[:, 0] == labels).sum()),
                                       int((top == labels[:, None]).any(-1).sum())], dtype=torch.float64)  # fmt: skip
    engine.train()
    loss, n, exact, top5 = group.all_sum(*sums.tolist())
    n = max(n, 1.0)
    return {"loss": loss / n, "perplexity": math.exp(min(loss / n, 50)), "accuracy": exact / n,
            "top5_accuracy": top5 / n}  # fmt: skip


# ---------------------------------------------------------------- the end of a run


def finish(
    cfg: RunConfig,
    engine,
    corpus: Corpus,
    state: TrainState,
    ckpts: Checkpoints,
    metrics,
    wall: float,
    device,
    feeder: RowFeeder,
    epoch: EpochPass | None,
    sparse: SparsePrediction | None = None,
) -> dict:
    out = Path(cfg.output_dir)
    skipped = _gathered_counts(feeder)
    if epoch and state.rows >= epoch.rows:
        skipped = epoch.skipped  # epoch 0 was read to its end: its pass saw every record
    chosen, why = ckpts.export_point()
    if chosen != ckpts.store.latest():
        ckpts.load(engine, chosen)  # final/ and the test set use the exported weights
    log.info("final/ from %s (%s)", chosen.name, why)
    final = export_hf(engine, corpus.tokenizer, chosen, out / "final")
    summary = {
        "steps": state.step,
        "micro_steps": state.micro_step,
        "tokens_seen": state.tokens_seen,
        "samples_seen": state.samples_seen,
        "rows_trained": state.rows,
        "epoch_rows": epoch.rows if epoch else None,
        "best_eval_loss": state.best_eval_loss,
        "final_checkpoint": chosen.name,
        "final_step": int(chosen.name.rsplit("_", 1)[-1]),
        "final_from": why,
        "wall_seconds": round(wall, 1),  # every run's training time, over resumes
        "this_run_seconds": round(wall - ckpts.resumed_elapsed, 1),
        "world_size": group.world(),
        "packing_efficiency": state.tokens_seen / max(1, state.slots_seen),
        "skipped_records": dict(skipped),
        "eval_skipped_records": dict(corpus.skipped),
    }
    if corpus.test:
        k = cfg.masking
        test_collate = make_collator(
            cfg, corpus.tokenizer, engine.module.config, k.eval_rate or k.rate, cfg.seed + 2
        )
        result = evaluate(engine, corpus.test, test_collate, cfg.train, device, sparse)
        summary |= {f"test_{k}": v for k, v in result.items() if k != "perplexity"}
        _log_eval(state, result, metrics, "test")
    if group.rank() == 0:
        _write_results(cfg, summary, metrics, final, wall)
    group.barrier()
    publish(cfg, out, summary)  # hub.push, after the last collective
    return summary


def _write_results(cfg: RunConfig, summary: dict, metrics, final, wall: float) -> None:
    """Rank 0: the evaluation figures in summary.json and the model card, the plots, the closing log line."""
    out = Path(cfg.output_dir)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    for key in ("loss", "accuracy", "top5_accuracy"):
        summary[f"final_eval_{key}"] = evals[-1].get(f"eval/{key}") if evals else None
    exported = next((r for r in evals if r["step"] == summary["final_step"]), evals[-1] if evals else {})
    results = {
        f"eval {k.replace('_', ' ')}": exported.get(f"eval/{k}")
        for k in ("loss", "accuracy", "top5_accuracy")
    }
    results |= {f"test {k}": summary.get(f"test_{k}") for k in ("loss", "accuracy")}
    settings = text_settings(cfg)
    (out / "final" / TEXT_FILE).write_text(json.dumps(settings, indent=1))
    write_model_card(out / "final", cfg, "mlm", summary, results, text_description(settings), settings)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = plot_curves(out / "metrics.jsonl", out / "plots") if cfg.log.plots else []
    metrics.finish(summary)
    earlier = (
        f" ({wall:.0f} s with the runs it continued)" if summary["this_run_seconds"] < round(wall, 1) else ""
    )
    log.info("done in %.0f s%s: model %s | metrics %s | plots %s | summary %s", summary["this_run_seconds"], earlier,
             final, out / "metrics.jsonl", ", ".join(str(p) for p in plots) or "off", out / "summary.json")  # fmt: skip
