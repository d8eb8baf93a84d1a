"""launch/classify.py: sequence-classification fine-tuning through the runner, the way seeds 002/003 learned to do it.

Class-weighted, label-smoothed cross-entropy normalised over the whole optimizer step; a faster head without weight
decay; evaluation every N steps or epoch with the best checkpoint kept by a chosen metric; early stopping;
collapse detection; the test set evaluated with the best weights; several seeds reported as mean +- std. Training
data streams (dapt.data.labelled): exact resume, the same order on any world size, bounded memory.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dapt.config.dsconfig import finalize_ds_config
from dapt.config.schema import BadInput, RunConfig, save_resolved
from dapt.data.labelled import Labelled, LabelledCorpus, collate, prepare_labelled
from dapt.data.prepare import TEXT_FILE, text_description, text_settings
from dapt.data.prepare import feeder as data_feeder
from dapt.data.stream import RowFeeder
from dapt.model.attention import forward
from dapt.model.build import build_model, parameter_count
from dapt.runtime import folder, group
from dapt.runtime.card import write_model_card
from dapt.runtime.checkpoint import export_hf
from dapt.runtime.evaluation import classification_metrics, plot_confusion, write_predictions
from dapt.runtime.metrics import plot_curves
from dapt.runtime.numerics import Diverged, StepGuard
from dapt.runtime.preempt import Preempted, PreemptionWatch
from dapt.runtime.publish import publish
from dapt.runtime.runner import (
    Checkpoints,
    TrainState,
    build_engine,
    decays,
    log_choices,
    open_metrics,
    optimizer_step,
    sample_log,
    start,
)
from dapt.runtime.schedule import warmup_steps

log = logging.getLogger("dapt")


# ---------------------------------------------------------------- model and loss


def class_weights(spec: str, counts: list[int], n: int) -> torch.Tensor | None:
    """classify.class_weights: none, inverse (to the training rows per label, from the counting pass) or a list."""
    if spec == "none":
        return None
    if spec == "inverse":
        c = np.asarray(counts, dtype=np.float64)
        w = np.where(c > 0, c.sum() / np.maximum(c, 1) / n, 0.0)
        return torch.tensor(w / w[c > 0].mean(), dtype=torch.float32)
    values = [float(v) for v in spec.split(",")]
    if len(values) != n:
        raise BadInput(f"classify.class_weights has {len(values)} weights for {n} labels")
    return torch.tensor(values, dtype=torch.float32)


def classifier_groups(model: torch.nn.Module, lr: float, weight_decay: float, head_mult: float) -> list[dict]:
    """Body matrices decay; body biases/norms and the whole new head do not; the head runs at head_mult x lr (matrices
    told by their real shape, also when ZeRO-3 has partitioned them)."""
    prefix = model.base_model_prefix + "."
    body_decay, body_plain, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.startswith(prefix):
            head.append(p)
        else:
            (body_decay if decays(p) else body_plain).append(p)
    return [
        {"params": body_decay, "weight_decay": weight_decay, "lr": lr},
        {"params": body_plain, "weight_decay": 0.0, "lr": lr},
        {"params": head, "weight_decay": 0.0, "lr": lr * head_mult},
    ]


def loss_sum(
    logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, smoothing: float
) -> torch.Tensor:
    """Sum of (weighted, smoothed) per-example losses; divided by the step's total weight, it equals PyTorch's
    mean over the whole global batch."""
    w = weights.to(logits.device) if weights is not None else None
    return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=smoothing, reduction="sum")


def weight_of(y: torch.Tensor, weights: torch.Tensor | None) -> float:
    return float(weights[y].sum()) if weights is not None else float(len(y))


def logits_of(engine, batch: dict, device) -> torch.Tensor:
    """The classifier's logits for a padded batch (through the attention fallback of dapt.model.attention)."""
    return forward(engine, batch, device, lambda inputs, keep: engine(**inputs).logits)


# ---------------------------------------------------------------- metrics


def collapse(result: dict, warn_share: float) -> tuple[list[str], list[str]]:
    """(classes predicted < warn_share x as often as they occur, classes that occur but are never predicted).

    Only classes with real support count (at least 10 examples and 1% of the evaluation set): a class seen once or
    twice says nothing about collapse, and NSL-KDD has several.
    """
    total = sum(v["support"] for v in result["per_class"].values())
    rare, never = [], []
    for i, label in enumerate(result["labels"]):
        support, predicted = result["per_class"][label]["support"], result["predicted"][i]
        if support < max(10, 0.01 * total):
            continue
        if predicted == 0:
            never.append(label)
        elif predicted < warn_share * support:
            rare.append(label)
    return rare, never


@torch.no_grad()
def predict(engine, data: Labelled, micro: int, pad_id: int, device) -> np.ndarray:
    """Class probabilities for every row of `data`, gathered from all ranks (each rank runs the same count)."""
    engine.eval()
    rank, world = group.rank(), group.world()
    mine = list(range(rank, len(data.y), world))
    per_rank = -(-len(data.y) // world)
    batches = -(-per_rank // micro)
    out: list[tuple[int, np.ndarray]] = []
    for b in range(batches):
        idx = mine[b * micro : (b + 1) * micro]
        batch = collate([data.ids[i] for i in (idx or [0])], data.y[idx or [0]], pad_id)
        logits = logits_of(engine, batch, device).float()
        if idx:
            out += list(zip(idx, torch.softmax(logits, -1).cpu().numpy()))
    engine.train()
    probs = np.zeros((len(data.y), engine.module.config.num_labels))
    for part in group.gather(out):
        for i, p in part:
            probs[i] = p
    return probs


# ---------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict:
    """Fine-tune once, or once per `classify.seeds` (output_dir/seed_<s>) with mean +- std over the seeds."""
    seeds = cfg.classify.seeds
    if not seeds:
        return run_one(cfg)
    if group.rank() == 0:
        folder.claim(cfg)  # the seeds' parent folder holds this classifier's runs
    results = {}
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.seed, one.output_dir = seed, str(Path(cfg.output_dir) / f"seed_{seed}")
        results[seed] = run_one(one)
    return summarise_seeds(cfg, results)


def summarise_seeds(cfg: RunConfig, results: dict[int, dict]) -> dict:
    keys = ["accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc", "pr_auc"]
    split = (
        "test" if all(r.get("test") for r in results.values()) else "valid"
    )  # valid: the best checkpoints'
    table = {}
    for key in keys:
        values = [r[split][key] for r in results.values() if r.get(split) and key in r[split]]
        if values:
            table[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    if group.rank() == 0:
        out = Path(cfg.output_dir)
        (out / "seeds_summary.json").write_text(
            json.dumps({"seeds": list(results), "split": split, split: table}, indent=1)
        )
        lines = [
            f"{split} set, {'best' if cfg.checkpoint.keep_best else 'last'} checkpoint of each seed",
            "",
            "| metric | mean | std | " + " | ".join(f"seed {s}" for s in results) + " |",
            "|---|---|---|" + "---|" * len(results),
        ]
        lines += [
            f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | "
            + " | ".join(f"{x:.4f}" for x in v["values"])
            + " |"
            for k, v in table.items()
        ]
        (out / "seeds_summary.md").write_text("\n".join(lines) + "\n")
        log.info(
            "over seeds %s: %s",
            list(results),
            ", ".join(f"{k} {v['mean']:.4f} +- {v['std']:.4f}" for k, v in table.items()),
        )
    return {"seeds": results, "split": split, split: table}


@dataclass
class Loop:
    """What a classifier optimizer step needs."""

    cfg: RunConfig
    engine: object
    guard: StepGuard
    feeder: RowFeeder
    corpus: LabelledCorpus
    weights: torch.Tensor | None
    device: torch.device
    watch: PreemptionWatch

    @property
    def pad_id(self) -> int:
        return self.corpus.tokenizer.pad_token_id or 0


def run_one(cfg: RunConfig) -> dict:
    s = start(cfg)
    corpus = prepare_labelled(cfg, s.out)
    t, c = cfg.train, cfg.classify
    steps, steps_per_epoch = _length(cfg, corpus)
    ckpts = Checkpoints(cfg, s.out, steps=steps)
    ckpts.check_continuation()
    labels = corpus.labels
    model = build_model(cfg, corpus.tokenizer, t.precision, cfg.ds_config, task="classify", labels=labels)
    finalize_ds_config(
        cfg.ds_config, steps, warmup_steps(t, steps), getattr(model.config, "hidden_size", None)
    )
    if group.rank() == 0:
        save_resolved(cfg, s.out / "config.resolved.yaml")
        (s.out / "label_mapping.json").write_text(
            json.dumps({"id2label": dict(enumerate(labels)), "label2id": corpus.label2id})
        )
    weights = class_weights(c.class_weights, [corpus.counts[label] for label in labels], len(labels))
    log_choices(cfg, s.accelerator, steps)
    _log_classifier(cfg, model, labels, weights, steps, steps_per_epoch)
    ckpts.check_disk(parameter_count(model))
    groups = classifier_groups(model, t.lr, t.weight_decay, c.head_lr_mult)
    engine = build_engine(cfg, model, steps, groups, resuming=ckpts.resume_point() is not None)
    resumed = ckpts.resume(engine)
    state, task = resumed.state, {"best": None, "stale": 0, "stopped": None} | resumed.task
    metrics = open_metrics(cfg, s.out, state.step)
    loop = Loop(
        cfg,
        engine,
        StepGuard(cfg.numerics, engine, cfg.ds_config, resumed.numerics),
        data_feeder(corpus.spec, cfg, resumed.streams, state.rows),
        corpus,
        weights,
        s.device,
        PreemptionWatch(),
    )
    started = time.time() - state.elapsed
    try:
        train_loop(
            loop,
            state,
            task,
            steps,
            steps_per_epoch,
            ckpts,
            metrics,
            sample_log(cfg, s.out, resumed.sample_lines),
            started,
        )
    finally:
        loop.watch.close()
    return _finish(loop, ckpts, state, task, metrics, time.time() - started)


def _log_classifier(
    cfg: RunConfig, model, labels: list[str], weights, steps: int, steps_per_epoch: int
) -> None:
    c = cfg.classify
    log.info(
        "classifier %s, %d labels, %d optimizer steps (%d per epoch); head lr x%g; class weights %s; "
        "label smoothing %g",
        type(model).__name__,
        len(labels),
        steps,
        steps_per_epoch,
        c.head_lr_mult,
        None if weights is None else [round(float(w), 3) for w in weights],
        c.label_smoothing,
    )


def _length(cfg: RunConfig, corpus: LabelledCorpus) -> tuple[int, int]:
    """(optimizer steps, steps per epoch): train.max_steps, or train.epochs of full global batches."""
    t = cfg.train
    per_step = t.micro_batch_size * t.grad_accum * group.world()
    if corpus.rows < per_step:
        raise BadInput(f"{corpus.rows} training examples are fewer than one global batch of {per_step}")
    steps_per_epoch = corpus.rows // per_step
    return t.max_steps or max(1, int(t.epochs * steps_per_epoch)), steps_per_epoch


def classifier_step(loop: Loop):
    """Take this rank's rows of one optimizer step and run the step: (the step, its rows)."""
    t, engine, c = loop.cfg.train, loop.engine, loop.cfg.classify
    rows = [loop.feeder.take(t.micro_batch_size) for _ in range(t.grad_accum)]
    label2id = loop.corpus.label2id
    micro = [
        collate([row.ids for _, row in part], [label2id[row.label] for _, row in part], loop.pad_id)
        for part in rows
    ]

    def loss(b: dict) -> torch.Tensor:
        return loss_sum(
            logits_of(engine, b, loop.device), b["labels"].to(loop.device), loop.weights, c.label_smoothing
        )

    step = optimizer_step(
        engine, loop.guard, micro, loss, lambda b: weight_of(b["labels"], loop.weights), loop.watch.signum
    )
    return step, rows


def train_loop(
    loop: Loop,
    state: TrainState,
    task: dict,
    steps: int,
    steps_per_epoch: int,
    ckpts: Checkpoints,
    metrics,
    samples,
    started: float,
) -> None:
    cfg, engine, t = loop.cfg, loop.engine, loop.cfg.train
    eval_every = t.eval_every or steps_per_epoch
    window = Counter()
    bar = tqdm(
        total=steps,
        initial=state.step,
        desc="train",
        disable=group.rank() != 0 or not cfg.log.progress or task["stopped"] is not None,
    )
    with bar:
        while state.step < steps and task["stopped"] is None:
            step, rows = classifier_step(loop)
            _account(state, window, step, rows, samples)
            bar.update(1)
            reason = loop.guard.check(state.step, step.outcome, step.grad_norm)
            if reason:
                raise Diverged(reason, ckpts.store.before(loop.guard.since))
            if state.step % t.log_every == 0 or state.step in (1, steps):  # the first: warmup shows
                _log_train(loop, state, window, step, steps_per_epoch, metrics)
                window = Counter()
            score = None
            if loop.corpus.valid is not None and (state.step % eval_every == 0 or state.step == steps):
                score = _evaluate(loop, state.step, task, steps_per_epoch, metrics)
            if (
                ckpts.due(state.step, steps)
                or (score is not None and ckpts.saves_evaluations)
                or step.stop_votes
                or task["stopped"]
            ):
                state.elapsed = time.time() - started
                saved = ckpts.save(
                    engine,
                    state,
                    loop.feeder,
                    loop.guard,
                    dict(task),
                    samples,
                    None if score is None else -score,
                )  # lower is better in the index
                if step.stop_votes and state.step < steps and not task["stopped"]:
                    raise Preempted(loop.watch.signum or signal.SIGTERM, state.step, str(saved))
    if task["stopped"]:
        log.warning("stopped at step %d: %s", state.step, task["stopped"])


def _account(state: TrainState, window: Counter, step, rows: list, samples) -> None:
    """After a step: the counters, the log window's loss, the sample log."""
    trained = sum(len(part) for part in rows) * group.world()
    state.step += 1
    state.micro_step += len(rows)
    state.rows += trained
    state.samples_seen += trained
    if not step.outcome.skipped:
        window["loss"] += step.outcome.loss * step.weight
        window["weight"] += step.weight
    if samples:
        samples.write([doc for part in rows for _, row in part for doc in row.doc_ids])


def _log_train(loop: Loop, state: TrainState, window: Counter, step, steps_per_epoch: int, metrics) -> None:
    metrics.log(
        state.step,
        {
            "train/loss": window["loss"] / window["weight"] if window["weight"] else float("nan"),
            "train/learning_rate": loop.engine.get_lr()[0],
            "train/grad_norm": step.grad_norm,
            "train/epoch": state.step / steps_per_epoch,
            "train/skipped_steps": loop.guard.skipped,
        },
    )


def _evaluate(loop: Loop, step: int, task: dict, steps_per_epoch: int, metrics) -> float:
    """Validation metrics at `step`; the best score, patience and stop reason kept in `task`."""
    cfg, c = loop.cfg, loop.cfg.classify
    valid = loop.corpus.valid
    result = classification_metrics(
        valid.y,
        predict(loop.engine, valid, cfg.train.micro_batch_size, loop.pad_id, loop.device),
        loop.corpus.labels,
    )
    score = result.get(c.metric, result["macro_f1"])
    metrics.log(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
    shown = {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]} | {c.metric: score}
    log.info("step %d eval %s", step, " ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    improved = task["best"] is None or score > task["best"]
    task["best"], task["stale"] = (score, 0) if improved else (task["best"], task["stale"] + 1)
    if group.rank() == 0:  # eval_valid.json: the best evaluation; eval_valid_last.json: the latest
        text = json.dumps({"step": step, **result}, indent=1)
        for name in ("eval_valid.json", "eval_valid_last.json") if improved else ("eval_valid_last.json",):
            (Path(cfg.output_dir) / name).write_text(text)
    task["stopped"] = _should_stop(c, result, task["stale"], step, steps_per_epoch)
    return score


def _test(loop: Loop, out: Path) -> dict:
    """The test set with the weights loaded: eval_test.json, predictions_test.jsonl, the confusion matrix."""
    cfg, corpus = loop.cfg, loop.corpus
    probs = predict(loop.engine, corpus.test, cfg.train.micro_batch_size, loop.pad_id, loop.device)
    result = classification_metrics(corpus.test.y, probs, corpus.labels)
    if group.rank() == 0:
        (out / "eval_test.json").write_text(json.dumps(result, indent=1))
        write_predictions(
            out / "predictions_test.jsonl", corpus.test.doc_ids, probs, corpus.labels, corpus.test.y
        )
        plot_confusion(result, out / "plots" / "confusion_matrix.png")
        log.info(
            "test: accuracy %.4f macro_f1 %.4f weighted_f1 %.4f%s",
            result["accuracy"],
            result["macro_f1"],
            result["weighted_f1"],
            f" roc_auc {result['roc_auc']:.4f}" if "roc_auc" in result else "",
        )
    return result


def _log_done(out: Path, summary: dict, wall: float, plots: list) -> None:
    """The closing line: where everything is, and the test set's figures."""
    tested = summary.get("test") or {}
    scores = f"test accuracy {tested['accuracy']:.4f} macro_f1 {tested['macro_f1']:.4f} | " if tested else ""
    log.info(
        "done in %.0f s: model %s | %smetrics %s | plots %s | summary %s",
        wall,
        out / "final",
        scores,
        out / "metrics.jsonl",
        ", ".join(str(p) for p in plots) or "off",
        out / "summary.json",
    )


def _should_stop(c, result: dict, stale: int, done: int, steps_per_epoch: int) -> str | None:
    rare, never = collapse(result, c.collapse_warn)
    if rare:
        log.warning("classes predicted under %d%% as often as they occur: %s", 100 * c.collapse_warn, rare)
    if never:
        log.warning("classes that occur but are never predicted: %s", never)
    if never and c.collapse_stop and done >= steps_per_epoch:
        return f"collapse: classes never predicted after the first epoch: {never}"
    if c.patience and stale >= c.patience:
        return f"early stopping: no improvement of classify.metric in {stale} evaluations"
    return None


def _finish(loop: Loop, ckpts: Checkpoints, state: TrainState, task: dict, metrics, wall: float) -> dict:
    """The chosen weights (checkpoint.export: the best checkpoint by classify.metric, or the last) for the test set
    and final/; summary.json."""
    cfg, engine, corpus = loop.cfg, loop.engine, loop.corpus
    out = Path(cfg.output_dir)
    chosen, why = ckpts.export_point()
    best = ckpts.store.index()["best"] if why.startswith("checkpoint.export=best") else None
    log.info(
        "final/ and the test set use %s (%s%s)", chosen.name, why, f", {cfg.classify.metric}" if best else ""
    )
    ckpts.load(engine, chosen)
    summary = {
        "best_checkpoint": chosen.name,  # kept for 0.1's readers: the checkpoint final/ is made from
        "final_checkpoint": chosen.name,
        "final_step": int(chosen.name.rsplit("_", 1)[-1]),
        "final_from": why,
        "best_metric": -best["eval_loss"] if best else None,
        "metric": cfg.classify.metric,
        "stopped": task["stopped"],
        "steps": state.step,
        "rows_trained": state.rows,
        "epoch_rows": corpus.rows,
        "world_size": group.world(),
        "wall_seconds": round(wall, 1),
        "skipped_records": dict(corpus.epoch_skipped + corpus.skipped),
    }
    if corpus.test is not None:
        summary["test"] = _test(loop, out)
    evaluated = out / ("eval_valid.json" if best else "eval_valid_last.json")
    if evaluated.exists():  # the validation result of the weights chosen
        summary["valid"] = {k: v for k, v in json.loads(evaluated.read_text()).items() if k != "step"}
    export_hf(
        engine, corpus.tokenizer, chosen, out / "final", auto_class="AutoModelForSequenceClassification"
    )
    if group.rank() == 0:
        (out / "final" / "label_mapping.json").write_text((out / "label_mapping.json").read_text())
        results = {f"{split} {k}": summary[split].get(k) for split in ("valid", "test") if summary.get(split)
                   for k in ("accuracy", "macro_f1", "weighted_f1", "roc_auc")}  # fmt: skip
        settings = text_settings(cfg)
        (out / "final" / TEXT_FILE).write_text(json.dumps(settings, indent=1))
        write_model_card(
            out / "final", cfg, "classify", summary, results, text_description(settings), settings
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        plots = plot_curves(out / "metrics.jsonl", out / "plots") if cfg.log.plots else []
        metrics.finish(summary)
        _log_done(out, summary, wall, plots)
    group.barrier()
    publish(cfg, out, summary)  # hub.push, after the last collective
    return summary
