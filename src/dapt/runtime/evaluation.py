"""Classification results, written the same by launch/classify.py (validation and test sets) and launch/predict.py
(new files): the metrics, each example's prediction (predictions.jsonl) and the confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dapt.runtime.plots import pyplot, save


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
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(y_true, y_pred, labels=ids, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": labels,
        "predicted": np.bincount(y_pred, minlength=len(labels)).tolist(),
    }
    if len(labels) == 2 and len(set(y_true.tolist())) == 2:
        out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
        out["pr_auc"] = float(average_precision_score(y_true, probs[:, 1]))
    return out


def plot_confusion(result: dict, path: Path) -> None:
    plt = pyplot()
    cm, labels = np.array(result["confusion_matrix"]), result["labels"]
    size = max(4, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black"
        )
    fig.tight_layout()
    save(fig, path)


def write_predictions(
    path: Path, doc_ids: list[str], probs: np.ndarray, labels: list[str], truth: np.ndarray | None = None
) -> None:
    """One JSON line per example: its id (file:line), its true label (when `truth` gives label ids), the predicted
    label and every class probability."""
    with path.open("w") as f:
        for i, (doc_id, p) in enumerate(zip(doc_ids, probs)):
            row = {"id": doc_id} | ({"label": labels[truth[i]]} if truth is not None else {})
            row |= {
                "predicted": labels[int(p.argmax())],
                "probabilities": {k: float(q) for k, q in zip(labels, p)},
            }
            f.write(json.dumps(row) + "\n")
