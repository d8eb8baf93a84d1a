"""launch/classify.py: sequence-classification fine-tuning through the runner, the way seeds 002/003 learned to do it.

Class-weighted, label-smoothed cross-entropy normalised over the whole optimizer step; a faster head without weight
decay; evaluation every N steps or epoch with the best checkpoint kept by a chosen metric; early stopping;
collapse detection; the test set evaluated with the best weights; several seeds reported as mean +- std. Training
data streams (dapt.data.labelled): exact resume, the same order on any world size, bounded memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dapt.config.schema import BadInput, RunConfig, freeze
from dapt.data.labelled import Labelled, collate, prepare_labelled
from dapt.data.prepare import feeder as data_feeder
from dapt.data.prepare import text_description, text_settings
from dapt.model.attention import forward
from dapt.model.build import build_model
from dapt.runtime import folder, group
from dapt.runtime.evaluation import classification_metrics, plot_confusion, write_predictions
from dapt.runtime.runner import ExportPoint, decays
from dapt.runtime.train import Evaluation, Length, Run, train

log = logging.getLogger("dapt")


# ---------------------------------------------------------------- model and loss


def class_weights(spec: str, counts: list[int], n: int) -> torch.Tensor | None:
    """classify.class_weights: none, inverse or sqrt_inverse (to the training rows per label, from the counting pass;
    normalised to mean 1 over the labels that have rows) or a list."""
    if spec == "none":
        return None
    if spec in ("inverse", "sqrt_inverse"):
        c = np.asarray(counts, dtype=np.float64)
        w = np.where(c > 0, c.sum() / np.maximum(c, 1) / n, 0.0) ** (0.5 if spec == "sqrt_inverse" else 1.0)
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
        one = freeze(
            dataclasses.replace(cfg, seed=seed, output_dir=str(Path(cfg.output_dir) / f"seed_{seed}"))
        )
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


class Classifier:
    """The classifier task for dapt.runtime.train: labelled rows, padded; class-weighted, label-smoothed
    cross-entropy; a faster head without weight decay; validation by classify.metric with collapse detection and
    early stopping; the test set's predictions and confusion matrix."""

    name, auto_class = "classify", "AutoModelForSequenceClassification"

    def prepare(self, cfg: RunConfig, out: Path) -> None:
        self.cfg = cfg
        corpus = self.corpus = prepare_labelled(cfg, out)
        self.tokenizer, self.eval_skipped = corpus.tokenizer, corpus.skipped
        self.streams = corpus.spec.streams
        self.pad_id = corpus.tokenizer.pad_token_id or 0
        counts = [corpus.counts[label] for label in corpus.labels]
        self.weights = class_weights(cfg.classify.class_weights, counts, len(corpus.labels))
        if group.rank() == 0:
            (out / "label_mapping.json").write_text(
                json.dumps({"id2label": dict(enumerate(corpus.labels)), "label2id": corpus.label2id})
            )
        t = cfg.train
        per_step = t.micro_batch_size * t.grad_accum * group.world()
        if corpus.rows < per_step:
            raise BadInput(f"{corpus.rows} training examples are fewer than one global batch of {per_step}")
        per_epoch = corpus.rows // per_step  # full global batches
        self.length_ = Length(
            t.max_steps or max(1, int(t.epochs * per_epoch)),
            eval_every=t.eval_every or per_epoch,
            per_epoch=per_epoch,
            epoch_rows=corpus.rows,
            epoch_skipped=corpus.epoch_skipped,
            whole_epoch_counted=True,  # the counting pass the class weights and the epoch length come from
        )

    def length(self, cfg: RunConfig) -> Length:
        """train.max_steps, or train.epochs of full global batches (from prepare's counting pass)."""
        return self.length_

    def model(self, cfg: RunConfig) -> torch.nn.Module:
        labels = self.corpus.labels
        model = build_model(
            cfg, self.tokenizer, cfg.train.precision, cfg.ds_config, task="classify", labels=labels
        )
        c = cfg.classify
        weights = None if self.weights is None else [round(float(w), 3) for w in self.weights]
        log.info(
            "classifier %s, %d labels, %d optimizer steps (%d per epoch); head lr x%g; class weights %s; label "
            "smoothing %g",
            *(type(model).__name__, len(labels), self.length_.steps, self.length_.per_epoch),
            *(c.head_lr_mult, weights, c.label_smoothing),
        )
        return model

    def groups(self, cfg: RunConfig, model) -> list[dict]:
        return classifier_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.classify.head_lr_mult)

    def feeder(self, cfg: RunConfig, streams: dict, rows: int):
        return data_feeder(self.corpus.spec, cfg, streams, rows)

    def micro_batches(self, rows: list) -> list[dict]:
        label2id = self.corpus.label2id
        return [
            collate([row.ids for _, row in part], [label2id[row.label] for _, row in part], self.pad_id)
            for part in rows
        ]

    def loss_sum(self, engine, batch: dict, device) -> torch.Tensor:
        logits = logits_of(engine, batch, device)
        return loss_sum(logits, batch["labels"].to(device), self.weights, self.cfg.classify.label_smoothing)

    def weight(self, batch: dict) -> float:
        return weight_of(batch["labels"], self.weights)

    def evaluate(self, engine, device, split: str) -> Evaluation | None:
        data = self.corpus.valid if split == "valid" else self.corpus.test
        if data is None:
            return None
        probs = predict(engine, data, self.cfg.train.micro_batch_size, self.pad_id, device)
        result = classification_metrics(data.y, probs, self.corpus.labels)
        if split == "test" and group.rank() == 0:
            self._write_test(result, probs)
        metric = self.cfg.classify.metric if self.cfg.classify.metric in result else "macro_f1"
        shown = tuple(dict.fromkeys(("accuracy", "macro_f1", metric)))
        return Evaluation(result, metric, higher_is_better=True, shown=shown)

    def _write_test(self, result: dict, probs: np.ndarray) -> None:
        """eval_test.json, predictions_test.jsonl, the confusion matrix."""
        out, test = Path(self.cfg.output_dir), self.corpus.test
        (out / "eval_test.json").write_text(json.dumps(result, indent=1))
        write_predictions(out / "predictions_test.jsonl", test.doc_ids, probs, self.corpus.labels, test.y)
        plot_confusion(result, out / "plots" / "confusion_matrix.png")

    def evaluated(self, run: Run, evaluation: Evaluation, improved: bool) -> str | None:
        """eval_valid.json (the best evaluation) and eval_valid_last.json (the latest); collapse and patience."""
        step = run.state.step
        if group.rank() == 0:
            text = json.dumps({"step": step, **evaluation.metrics}, indent=1)
            for name in (
                ("eval_valid.json", "eval_valid_last.json") if improved else ("eval_valid_last.json",)
            ):
                (run.out / name).write_text(text)
        return _should_stop(
            self.cfg.classify, evaluation.metrics, run.progress.stale, step, run.length.per_epoch
        )

    def train_values(self, loss: float) -> dict:
        return {}

    def final(self, run: Run, point: ExportPoint, summary: dict) -> dict:
        """final/label_mapping.json; the summary's choice, stop and validation figures; the card's results."""
        out = run.out
        (out / "final" / "label_mapping.json").write_text((out / "label_mapping.json").read_text())
        best = point.best
        summary |= {
            "best_checkpoint": point.path.name,  # kept for 0.1's readers: the checkpoint final/ is made from
            "best_metric": best["score"] if best else None,
            "metric": self.cfg.classify.metric,
            "stopped": run.progress.stopped,
        }
        evaluated = out / ("eval_valid.json" if best else "eval_valid_last.json")
        if evaluated.exists():  # the validation result of the weights chosen
            summary["valid"] = {k: v for k, v in json.loads(evaluated.read_text()).items() if k != "step"}
        splits = [split for split in ("valid", "test") if summary.get(split)]
        figures = ("accuracy", "macro_f1", "weighted_f1", "roc_auc")
        return {f"{split} {k}": summary[split].get(k) for split in splits for k in figures}

    def text(self, cfg: RunConfig) -> tuple[dict, str]:
        settings = text_settings(cfg)
        return settings, text_description(settings)


def run_one(cfg: RunConfig) -> dict:
    """One fine-tuning run."""
    return train(cfg, Classifier())


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
