"""launch/predict.py: a trained model on new files.

A classifier's final/ gives each record's class probabilities and, when the files carry the label, the metrics
training reports for its test set: an evaluation-only run. An MLM's final/ gives each record's MLM surprise (the
mean negative log-likelihood of its masked tokens under fixed masks, as launch/anomaly.py scores it) and its most
surprising tokens. Records become text exactly as in training: the data settings saved with the model
(final/dapt_text.json: format, columns, rounding, label field, row length) are the defaults, and the readers and
the column serialisation (dapt.data.formats.record_text) are training's own. Batched, on the GPU where there is
one, in plain torch (no optimizer, no DeepSpeed engine); with several ranks each scores its share.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dapt.config.schema import BadInput, RunConfig
from dapt.data.embedding import read_unlabelled
from dapt.data.formats import READERS, BadRecord, Document
from dapt.data.labelled import encode, labelled_options, padded, read_labelled, say_what_is_cut
from dapt.data.packing import pack
from dapt.data.sources import Position, expand
from dapt.runtime import group
from dapt.runtime.evaluation import classification_metrics, plot_confusion, write_predictions
from dapt.runtime.runner import start

log = logging.getLogger("dapt")


def is_classifier(folder: str) -> bool:
    """Whether the model folder (or hub id, through its config) holds a sequence classifier rather than an MLM."""
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(folder)
    return any(a.endswith("ForSequenceClassification") for a in (getattr(conf, "architectures", None) or []))


def run(cfg: RunConfig) -> dict:
    started = time.time()
    s = start(cfg)
    skipped: Counter = Counter()
    docs, labelled = read_inputs(cfg, skipped)
    if not docs:
        raise BadInput(f"data.test: no record to predict ({dict(skipped) or 'the files are empty'})")
    folder = cfg.model.name_or_path
    if is_classifier(folder):
        summary = classify_records(cfg, docs, labelled, s.device, skipped)
    else:
        summary = score_surprise(cfg, docs, s.device)
    summary |= {"model": folder, "records": len(docs), "skipped_records": dict(skipped)}
    summary["wall_seconds"] = round(time.time() - started, 1)
    out = Path(cfg.output_dir)
    if group.rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info(
            "done in %.0f s: %d records | predictions %s%s | summary %s",
            summary["wall_seconds"],
            len(docs),
            out / "predictions.jsonl",
            f" | metrics {out / 'eval.json'}" if "metrics" in summary else "",
            out / "summary.json",
        )
    group.barrier()
    return summary


def read_inputs(cfg: RunConfig, skipped: Counter) -> tuple[list[Document], bool]:
    """The records of data.test, and whether they carry labels (the label field of training, or classify.label_files):
    with labels when the first record has one, else without (the label field absent)."""
    d, c = cfg.data, cfg.classify
    if (c.label_field or c.label_files) and _first_has_label(cfg):
        return list(read_labelled(cfg, d.test, skipped)), True
    return read_unlabelled(cfg, d.test, skipped), False


def _first_has_label(cfg: RunConfig) -> bool:
    if cfg.classify.label_files:
        return True
    d, opts = cfg.data, labelled_options(cfg)
    for url in expand(d.test, d.format):
        for item, _ in READERS[d.format](url, Position(), opts):
            if isinstance(item, BadRecord):  # the label missing here means it is missing from the files
                return "label" not in item.reason and "column" not in item.reason
            return item.label is not None
    return False


def _mine(n: int) -> list[int]:
    return list(range(group.rank(), n, group.world()))


def classify_records(cfg: RunConfig, docs: list[Document], labelled: bool, device, skipped: Counter) -> dict:
    """Class probabilities of every record (predictions.jsonl) and, with labels, the metrics (eval.json) and the
    confusion matrix."""
    from transformers import AutoModelForSequenceClassification

    from dapt.model.build import TRAINED_FOR, pretrained_tokenizer
    from dapt.model.hub import from_config

    m = cfg.model
    model = from_config(AutoModelForSequenceClassification.from_pretrained, m, dtype=torch.float32)
    model = model.to(device).eval()
    tokenizer = pretrained_tokenizer(m, trained_for=TRAINED_FOR["predict"])
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    label2id = {label: i for i, label in enumerate(labels)}
    max_len = cfg.data.max_seq_length
    if group.rank() == 0:
        say_what_is_cut(tokenizer, [x.text for x in docs[:200]], max_len, "records")
    if labelled:
        data = encode(tokenizer, docs, label2id, max_len, "prediction", cfg.classify.unseen, skipped)
        ids, doc_ids, truth = data.ids, data.doc_ids, data.y
    else:
        rows = pack("pad", tokenizer, [x.text for x in docs], [x.id for x in docs], max_len)
        ids, doc_ids, truth = [r.ids for r in rows], [x.id for x in docs], None
    probs = _probabilities(model, ids, tokenizer.pad_token_id or 0, cfg.train.micro_batch_size, device)
    out = Path(cfg.output_dir)
    summary: dict = {"kind": "classifier", "labels": labels, "predicted": _counts(probs, labels)}
    if group.rank() == 0:
        write_predictions(out / "predictions.jsonl", doc_ids, probs, labels, truth)
    if truth is not None and len(truth):
        result = classification_metrics(truth, probs, labels)
        summary["metrics"] = result
        if group.rank() == 0:
            (out / "eval.json").write_text(json.dumps(result, indent=1))
            plot_confusion(result, out / "plots" / "confusion_matrix.png")
            log.info(
                "%d labelled records: accuracy %.4f macro_f1 %.4f weighted_f1 %.4f",
                len(truth),
                result["accuracy"],
                result["macro_f1"],
                result["weighted_f1"],
            )
    return summary


@torch.no_grad()
def _probabilities(model, ids: list[np.ndarray], pad_id: int, batch: int, device) -> np.ndarray:
    """Softmax over the classes for every row, each rank its share in batches, gathered on every rank."""
    mine, out = _mine(len(ids)), []
    for at in range(0, len(mine), batch):
        chunk = mine[at : at + batch]
        input_ids, mask = padded([ids[i] for i in chunk], pad_id, multiple=8)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        out += list(zip(chunk, torch.softmax(logits, -1).cpu().numpy()))
    probs = np.zeros((len(ids), model.config.num_labels))
    for part in group.gather(out):
        for i, p in part:
            probs[i] = p
    return probs


def _counts(probs: np.ndarray, labels: list[str]) -> dict[str, int]:
    counts = np.bincount(probs.argmax(1), minlength=len(labels))
    return {label: int(n) for label, n in zip(labels, counts)}


def score_surprise(cfg: RunConfig, docs: list[Document], device) -> dict:
    """Each record's MLM surprise (mean NLL of its masked tokens under embed.mask_patterns fixed masks) and its most
    surprising tokens, in predictions.jsonl."""
    from dapt.data.embedding import load_masked_lm
    from dapt.data.surprise import run_surprise

    e = cfg.embed
    model, tokenizer = load_masked_lm(cfg, device)
    scored = run_surprise(cfg, model, tokenizer, docs, device)
    values = [s.score("mean", e.top_k) for s in scored]
    if group.rank() == 0:
        with (Path(cfg.output_dir) / "predictions.jsonl").open("w") as f:
            for doc, s, value in zip(docs, scored, values):
                row = {"id": doc.id, "surprise": value, "most_surprising": s.top(tokenizer, e.report_top)}
                f.write(json.dumps(row) + "\n")
    return {
        "kind": "masked language model: surprise in nats per masked token",
        "surprise_mean": float(np.mean(values)),
        "surprise_median": float(np.median(values)),
    }
