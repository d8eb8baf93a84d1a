"""Sequence-classification fine-tuning on the DeepSpeed engine, the way seeds 002/003 learned to do it.

Class-weighted, label-smoothed cross-entropy normalised over the whole optimizer step; a faster head without weight
decay; evaluation every N steps or epoch with the best checkpoint kept by a chosen metric; early stopping;
collapse detection; the test set evaluated with the best weights; several seeds reported as mean +- std.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dapt import dist
from dapt.checkpoint import Checkpointer, export_hf
from dapt.config import RunConfig
from dapt.data import format_options, in_valid_split
from dapt.dsconfig import finalize_ds_config
from dapt.formats import READERS, BadRecord, Document
from dapt.hub import HubError, pretrained
from dapt.load import save_resolved
from dapt.metrics import MetricsLogger
from dapt.model import compiled, grow_positions, load_tokenizer
from dapt.numerics import Diverged, StepGuard, engine_config
from dapt.packing import pack
from dapt.preempt import Preempted, PreemptionWatch
from dapt.schedule import build_scheduler, warmup_steps
from dapt.sources import Position, expand

log = logging.getLogger("dapt")


@dataclass
class Labelled:
    ids: list[np.ndarray]
    y: np.ndarray
    doc_ids: list[str]


# ---------------------------------------------------------------- data

def labelled_documents(cfg: RunConfig, sources: list[str], skipped: Counter) -> list[Document]:
    """Documents with labels, from a label field/column or from `classify.label_files` (per file)."""
    c, d = cfg.classify, cfg.data
    opts = format_options(d)
    if not c.label_files:
        opts = type(opts)(**{**opts.__dict__, "label_field": c.label_field})
    docs = []
    for url in expand(sources):
        file_label = next((label for pattern, label in c.label_files.items()
                           if fnmatch.fnmatch(url, pattern) or fnmatch.fnmatch(Path(url).name, pattern)), None)
        if c.label_files and file_label is None:
            raise ValueError(f"{url}: no entry of classify.label_files matches this file "
                             f"(patterns: {', '.join(c.label_files)})")
        for n, (item, _) in enumerate(READERS[d.format](url, Position(), opts)):
            if d.max_records_per_file and n == d.max_records_per_file:
                break
            if isinstance(item, Document) and file_label is None and item.label is None:
                item = BadRecord(item.id, None, "no label")
            if isinstance(item, BadRecord):
                if d.on_error == "raise":
                    raise item
                skipped[item.reason] += 1
                continue
            docs.append(item if file_label is None else Document(item.text, item.id, str(file_label)))
    return docs


def encode(tokenizer, docs: list[Document], label2id: dict[str, int], max_len: int, split: str,
           unseen: str = "error", skipped: Counter | None = None) -> Labelled:
    unknown = [(d.id, d.label) for d in docs if d.label not in label2id]
    if unknown and unseen == "error":
        where, label = unknown[0]
        raise ValueError(f"{where}: label {label!r} in the {split} set was never seen in training "
                         f"({len(unknown)} such records); known labels: {', '.join(label2id)}. "
                         "Set classify.unseen=skip to leave such records out (counted)")
    if unknown:
        docs = [d for d in docs if d.label in label2id]
        for _, label in unknown:
            skipped[f"unseen label in {split}: {label}"] += 1
    rows = pack("pad", tokenizer, [d.text for d in docs], [d.id for d in docs], max_len)
    return Labelled([r.ids for r in rows], np.array([label2id[d.label] for d in docs]), [d.id for d in docs])


def read_splits(cfg: RunConfig) -> tuple[list[Document], list[Document], list[Document], Counter]:
    d, skipped = cfg.data, Counter()
    train = labelled_documents(cfg, d.train, skipped)
    if d.valid:
        valid = labelled_documents(cfg, d.valid, skipped)
    else:
        valid = [doc for doc in train if in_valid_split(doc.text, d.valid_fraction)]
        train = [doc for doc in train if not in_valid_split(doc.text, d.valid_fraction)]
    test = labelled_documents(cfg, d.test, skipped) if d.test else []
    return train, valid, test, skipped


def encode_splits(cfg: RunConfig, tokenizer, train: list[Document], valid: list[Document], test: list[Document],
                  skipped: Counter) -> tuple[Labelled, Labelled | None, Labelled | None, list[str]]:
    d = cfg.data
    labels = cfg.classify.labels or sorted({doc.label for doc in train})
    label2id = {label: i for i, label in enumerate(labels)}
    sets = [encode(tokenizer, docs, label2id, d.max_seq_length, name, cfg.classify.unseen, skipped) if docs else None
            for docs, name in ((train, "training"), (valid, "validation"), (test, "test"))]
    for i, (docs, name) in enumerate(((valid, "validation"), (test, "test")), start=1):
        if docs and sets[i] is not None and len(sets[i].y) == 0:  # every record had a label never seen in training
            log.warning("the %s set has no records left once unseen labels are skipped (%d left out): not evaluated",
                        name, len(docs))
            sets[i] = None
    counts = Counter(doc.label for doc in train)
    log.info("classification data: %d train / %d valid / %d test documents; labels %s", len(train), len(valid),
             len(test), ", ".join(f"{k}={counts[k]}" for k in labels))
    return sets[0], sets[1], sets[2], labels


def class_weights(spec: str, y: np.ndarray, n: int) -> torch.Tensor | None:
    if spec == "none":
        return None
    if spec == "inverse":
        counts = np.bincount(y, minlength=n).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n, 0.0)
        return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)
    values = [float(v) for v in spec.split(",")]
    if len(values) != n:
        raise ValueError(f"classify.class_weights has {len(values)} weights for {n} labels")
    return torch.tensor(values, dtype=torch.float32)


def collate(ids: list[np.ndarray], y: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    width = -(-max(len(x) for x in ids) // 8) * 8
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)], mask[i, :len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64)), 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.from_numpy(np.asarray(y, dtype=np.int64))}


def step_indices(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Rows of optimizer step `step`: a seeded permutation per epoch, full global batches only."""
    per_epoch = n // global_batch
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[within * global_batch:(within + 1) * global_batch]


# ---------------------------------------------------------------- model and loss

def build_classifier(cfg: RunConfig, tokenizer, labels: list[str]):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    m = cfg.model
    maps = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}
    torch.manual_seed(cfg.seed)
    if m.name_or_path:
        for impl in ("sdpa", "eager"):
            try:
                return pretrained(AutoModelForSequenceClassification.from_pretrained, m.name_or_path,
                                  attn_implementation=impl, trust_remote_code=m.trust_remote_code,
                                  dtype=torch.float32, **maps)
            except HubError:
                raise
            except ValueError:
                continue
    fields = dict(m.config) if isinstance(m.config, dict) else {}
    conf = AutoConfig.for_model(fields.pop("model_type"), **fields, **maps, vocab_size=len(tokenizer),
                                pad_token_id=tokenizer.pad_token_id)
    grow_positions(conf, cfg.data.max_seq_length)
    return AutoModelForSequenceClassification.from_config(conf, dtype=torch.float32)


def classifier_groups(model: torch.nn.Module, lr: float, weight_decay: float, head_mult: float) -> list[dict]:
    """Body matrices decay; body biases/norms and the whole new head do not; the head runs at head_mult x lr."""
    prefix = model.base_model_prefix + "."
    body_decay, body_plain, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.startswith(prefix):
            head.append(p)
        else:
            (body_decay if p.ndim >= 2 else body_plain).append(p)
    return [{"params": body_decay, "weight_decay": weight_decay, "lr": lr},
            {"params": body_plain, "weight_decay": 0.0, "lr": lr},
            {"params": head, "weight_decay": 0.0, "lr": lr * head_mult}]


def loss_sum(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    """Sum of (weighted, smoothed) per-example losses; divided by the step's total weight, it equals PyTorch's
    mean over the whole global batch."""
    w = weights.to(logits.device) if weights is not None else None
    return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=smoothing, reduction="sum")


def weight_of(y: torch.Tensor, weights: torch.Tensor | None) -> float:
    return float(weights[y].sum()) if weights is not None else float(len(y))


# ---------------------------------------------------------------- metrics

def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y_pred = probs.argmax(1)
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out = {"accuracy": float(accuracy_score(y_true, y_pred)),
           "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
           "micro_f1": float(f1_score(y_true, y_pred, labels=ids, average="micro", zero_division=0)),
           "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
           "per_class": {label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                 "support": int(s[i])} for i, label in enumerate(labels)},
           "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(), "labels": labels,
           "predicted": np.bincount(y_pred, minlength=len(labels)).tolist()}
    if len(labels) == 2 and len(set(y_true.tolist())) == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        out["pr_auc"] = float(average_precision_score(y_true, probs[:, 1]))
    return out


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


def plot_confusion(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm, labels = np.array(result["confusion_matrix"]), result["labels"]
    size = max(4, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def predict(engine, data: Labelled, micro: int, pad_id: int, device) -> np.ndarray:
    """Class probabilities for every row of `data`, gathered from all ranks (each rank runs the same count)."""
    engine.eval()
    rank, world = dist.rank(), dist.world()
    mine = list(range(rank, len(data.y), world))
    per_rank = -(-len(data.y) // world)
    batches = -(-per_rank // micro)
    out: list[tuple[int, np.ndarray]] = []
    for b in range(batches):
        idx = mine[b * micro:(b + 1) * micro]
        batch = collate([data.ids[i] for i in (idx or [0])], data.y[idx or [0]], pad_id)
        logits = engine(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device)).logits.float()
        if idx:
            out += list(zip(idx, torch.softmax(logits, -1).cpu().numpy()))
    engine.train()
    probs = np.zeros((len(data.y), engine.module.config.num_labels))
    for part in dist.gather(out):
        for i, p in part:
            probs[i] = p
    return probs


# ---------------------------------------------------------------- the run

def run(cfg: RunConfig) -> dict:
    """Fine-tune once, or once per `classify.seeds` (output_dir/seed_<s>) with mean +- std over the seeds."""
    seeds = cfg.classify.seeds
    if not seeds:
        return run_one(cfg)
    results = {}
    for seed in seeds:
        one = copy.deepcopy(cfg)
        one.seed, one.output_dir = seed, str(Path(cfg.output_dir) / f"seed_{seed}")
        results[seed] = run_one(one)
    return summarise_seeds(cfg, results)


def summarise_seeds(cfg: RunConfig, results: dict[int, dict]) -> dict:
    keys = ["accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc", "pr_auc"]
    split = "test" if all(r.get("test") for r in results.values()) else "valid"  # valid: the best checkpoints'
    table = {}
    for key in keys:
        values = [r[split][key] for r in results.values() if r.get(split) and key in r[split]]
        if values:
            table[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    if dist.rank() == 0:
        out = Path(cfg.output_dir)
        (out / "seeds_summary.json").write_text(json.dumps({"seeds": list(results), "split": split, split: table},
                                                           indent=1))
        lines = [f"{split} set, best checkpoint of each seed", "",
                 "| metric | mean | std | " + " | ".join(f"seed {s}" for s in results) + " |",
                 "|---|---|---|" + "---|" * len(results)]
        lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | " + " | ".join(f"{x:.4f}" for x in v["values"]) + " |"
                  for k, v in table.items()]
        (out / "seeds_summary.md").write_text("\n".join(lines) + "\n")
        log.info("over seeds %s: %s", list(results),
                 ", ".join(f"{k} {v['mean']:.4f} +- {v['std']:.4f}" for k, v in table.items()))
    return {"seeds": results, "split": split, split: table}


def run_one(cfg: RunConfig) -> dict:
    out = Path(cfg.output_dir)
    dist.init()
    rank, world = dist.rank(), dist.world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    docs = read_splits(cfg)
    if rank == 0:  # a from-scratch model learns its tokenizer from the training texts first
        load_tokenizer(cfg, out / "tokenizer", (d.text for d in docs[0][:cfg.data.tokenizer_docs]))
    dist.barrier()
    tokenizer = load_tokenizer(cfg, out / "tokenizer")
    skipped = docs[3]
    train, valid, test, labels = encode_splits(cfg, tokenizer, *docs[:3], skipped)
    t, c = cfg.train, cfg.classify
    per_step = t.micro_batch_size * t.grad_accum * world
    if len(train.y) < per_step:
        raise ValueError(f"{len(train.y)} training examples are fewer than one global batch of {per_step}")
    steps_per_epoch = len(train.y) // per_step
    steps = t.max_steps or max(1, int(t.epochs * steps_per_epoch))
    model = build_classifier(cfg, tokenizer, labels)
    finalize_ds_config(cfg.ds_config, steps, warmup_steps(t, steps), getattr(model.config, "hidden_size", None))
    if rank == 0:
        save_resolved(cfg, out / "config.resolved.yaml")
        (out / "label_mapping.json").write_text(json.dumps({"id2label": dict(enumerate(labels)),
                                                            "label2id": {v: i for i, v in enumerate(labels)}}))
    weights = class_weights(c.class_weights, train.y, len(labels))
    for note in cfg.notes:
        log.info("%s", note)
    log.info("classifier %s, %d labels, %d optimizer steps (%d per epoch); head lr x%g; class weights %s; "
             "label smoothing %g; global batch = %d x %d x %d", type(model).__name__, len(labels), steps,
             steps_per_epoch, c.head_lr_mult, None if weights is None else [round(float(w), 3) for w in weights],
             c.label_smoothing, t.micro_batch_size, t.grad_accum, world)
    groups = classifier_groups(model, t.lr, t.weight_decay, c.head_lr_mult)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=engine_config(cfg.ds_config),
                                           lr_scheduler=lambda opt: build_scheduler(opt, t, steps))
    engine = compiled(engine, t.compile)
    ckpt = Checkpointer(out / "checkpoints", cfg.checkpoint.keep, keep_best=True)
    metrics = MetricsLogger(out, rank == 0)
    pad_id = tokenizer.pad_token_id or 0
    eval_every = t.eval_every or steps_per_epoch
    best, stale, stop, window, start, numerics = None, 0, None, Counter(), 0, None
    point = None if cfg.resume == "never" else Path(cfg.resume) if cfg.resume != "auto" else ckpt.latest_complete()
    if point:  # the data order is a function of the step: resuming needs only the counters
        client, _ = ckpt.load(engine, point)
        start, best, stale, stop = client["step"], client.get("best"), client.get("stale", 0), client.get("stopped")
        numerics = client.get("numerics")
        log.info("resumed from %s at optimizer step %d", point, start)
    metrics.truncate_after(start)
    guard = StepGuard(cfg.numerics, engine, cfg.ds_config, numerics)
    watch = PreemptionWatch()
    started, done = time.time(), start
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="train",
                     disable=rank != 0 or not cfg.log.progress or stop is not None):
        if stop is not None:
            break
        rows = step_indices(len(train.y), per_step, cfg.seed, step)
        parts = [rows[(m * world + rank) * t.micro_batch_size:][:t.micro_batch_size] for m in range(t.grad_accum)]
        batches = [collate([train.ids[i] for i in part], train.y[part], pad_id) for part in parts]
        # the step's all-reduce also carries any rank's stop signal, so all ranks stop after the same step
        total_weight, stop_votes = dist.all_sum(sum(weight_of(b["labels"], weights) for b in batches), watch.signum)
        grad_norm = None
        for i, b in enumerate(batches):
            logits = engine(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
            guard.backward(loss_sum(logits, b["labels"].to(device), weights, c.label_smoothing),
                           t.grad_accum * world / total_weight)
            if i == len(batches) - 1:
                grad_norm = guard.grad_norm()
            engine.step()
        outcome = guard.end(total_weight)
        if not outcome.skipped:
            window["loss"] += outcome.loss * total_weight
            window["weight"] += total_weight
        done = step + 1
        reason = guard.check(done, outcome, grad_norm if grad_norm is not None else engine.get_global_grad_norm())
        if reason:
            watch.close()
            raise Diverged(reason, ckpt.before(guard.since))
        if done % t.log_every == 0 or done == steps:
            metrics.log(done, {"train/loss": window["loss"] / window["weight"] if window["weight"] else float("nan"),
                               "train/learning_rate": engine.get_lr()[0], "train/epoch": done / steps_per_epoch,
                               "train/skipped_steps": guard.skipped})
            window = Counter()
        if valid is not None and (done % eval_every == 0 or done == steps):
            result = classification_metrics(valid.y, predict(engine, valid, t.micro_batch_size, pad_id, device),
                                             labels)
            score = result.get(c.metric, result["macro_f1"])
            metrics.log(done, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)})
            log.info("step %d eval %s %.4f accuracy %.4f macro_f1 %.4f", done, c.metric, score, result["accuracy"],
                     result["macro_f1"])
            improved = best is None or score > best
            best, stale = (score, 0) if improved else (best, stale + 1)
            if improved and rank == 0:
                (out / "eval_valid.json").write_text(json.dumps({"step": done, **result}, indent=1))
            stop = _should_stop(c, result, stale, done, steps_per_epoch)
            ckpt.save(engine, done, {"step": done, "eval": result, "best": best, "stale": stale, "stopped": stop,
                                     "numerics": guard.state_dict()}, {}, -score)  # lower is better in the index
            if stop:
                log.warning("stopping at step %d: %s", done, stop)
                break
        if stop_votes and done < steps:
            saved = ckpt.save(engine, done, {"step": done, "best": best, "stale": stale,
                                             "numerics": guard.state_dict()}, {}, None)
            watch.close()
            raise Preempted(watch.signum or signal.SIGTERM, done, str(saved))
    watch.close()
    if valid is None:
        ckpt.save(engine, done, {"step": done}, {}, None)
    return _finish(cfg, engine, tokenizer, ckpt, test, labels, skipped, pad_id, device, time.time() - started, stop)


def write_predictions(path: Path, data: Labelled, probs: np.ndarray, labels: list[str]) -> None:
    """One JSON line per example: its id (file:line), true and predicted label, and every class probability."""
    with path.open("w") as f:
        for doc_id, y, p in zip(data.doc_ids, data.y, probs):
            f.write(json.dumps({"id": doc_id, "label": labels[y], "predicted": labels[int(p.argmax())],
                                "probabilities": {label: float(q) for label, q in zip(labels, p)}}) + "\n")


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


def _finish(cfg: RunConfig, engine, tokenizer, ckpt: Checkpointer, test: Labelled | None, labels: list[str],
            skipped: Counter, pad_id: int, device, wall: float, stop: str | None) -> dict:
    out = Path(cfg.output_dir)
    best = ckpt.index()["best"]
    chosen = ckpt.root / best["tag"] if best else ckpt.latest()
    ckpt.load(engine, chosen)  # the test set and final/ use the best weights
    summary = {"best_checkpoint": chosen.name, "best_metric": -best["eval_loss"] if best else None,
               "metric": cfg.classify.metric, "stopped": stop, "wall_seconds": round(wall, 1),
               "skipped_records": dict(skipped)}
    if test is not None:
        probs = predict(engine, test, cfg.train.micro_batch_size, pad_id, device)
        result = classification_metrics(test.y, probs, labels)
        summary["test"] = result
        if dist.rank() == 0:
            (out / "eval_test.json").write_text(json.dumps(result, indent=1))
            write_predictions(out / "predictions_test.jsonl", test, probs, labels)
            plot_confusion(result, out / "plots" / "confusion_matrix.png")
            log.info("test: accuracy %.4f macro_f1 %.4f weighted_f1 %.4f%s", result["accuracy"], result["macro_f1"],
                     result["weighted_f1"], f" roc_auc {result['roc_auc']:.4f}" if "roc_auc" in result else "")
    if (out / "eval_valid.json").exists():  # the validation result of the best checkpoint
        summary["valid"] = {k: v for k, v in json.loads((out / "eval_valid.json").read_text()).items() if k != "step"}
    export_hf(engine, tokenizer, chosen, out / "final", auto_class="AutoModelForSequenceClassification")
    if dist.rank() == 0:
        (out / "final" / "label_mapping.json").write_text((out / "label_mapping.json").read_text())
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    return summary
