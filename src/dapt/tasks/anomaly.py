"""launch/anomaly.py: Mahalanobis anomaly detection on an encoder's embeddings.

Seed 000's protocol: fit a Gaussian (mean, shrinkage covariance) on embeddings of normal training traffic, set the
threshold on normal validation data for a maximum false-positive rate (5% by default), and report the recall of
attacks at that threshold, the false-positive rate reached on normal test data, and AUROC.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from dapt.config.schema import RunConfig
from dapt.data.embedding import embed_documents, load_encoder, splits_of
from dapt.runtime import group
from dapt.runtime.plots import pyplot, save
from dapt.runtime.runner import start

log = logging.getLogger("dapt")


class Mahalanobis:
    """Squared Mahalanobis distance to a Gaussian fitted with a shrunk covariance."""

    def __init__(self, shrinkage: str = "ledoit_wolf"):
        self.shrinkage = shrinkage

    def fit(self, x: np.ndarray) -> Mahalanobis:
        from sklearn.covariance import LedoitWolf, ShrunkCovariance

        x = x.astype(np.float64)
        est = (
            LedoitWolf()
            if self.shrinkage == "ledoit_wolf"
            else ShrunkCovariance(shrinkage=float(self.shrinkage))
        )
        est.fit(x)
        self.mean, self.precision = est.location_, est.precision_
        self.coefficient = float(getattr(est, "shrinkage_", self.shrinkage))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        centred = x.astype(np.float64) - self.mean
        return np.einsum("ij,jk,ik->i", centred, self.precision, centred)


def threshold_for(normal_scores: np.ndarray, max_fpr: float) -> float:
    """The smallest threshold that flags at most max_fpr of the given normal scores (score > threshold = anomaly)."""
    ranked = np.sort(normal_scores)
    allowed = int(np.floor(max_fpr * len(ranked)))  # how many normal points may score above the threshold
    return float(ranked[len(ranked) - allowed - 1])


def evaluate_detector(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    flagged = scores > threshold
    result = {
        "recall_at_max_fpr": float(flagged[is_anomaly].mean()) if is_anomaly.any() else None,
        "test_fpr": float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else None,
        "threshold": threshold,
    }
    if is_anomaly.any() and (~is_anomaly).any():
        result["auroc"] = float(roc_auc_score(is_anomaly, scores))
        fpr, tpr, _ = roc_curve(is_anomaly, scores)
        result["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return result


def plot_roc(result: dict, max_fpr: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(result["roc_curve"]["fpr"], result["roc_curve"]["tpr"], label=f"AUROC {result['auroc']:.3f}")
    ax.axvline(max_fpr, color="grey", linestyle="--", label=f"max FPR {max_fpr:g}")
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("recall (true-positive rate)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    save(fig, path)


def run(cfg: RunConfig) -> dict:
    """Embed, fit on normal training documents, threshold on normal validation ones, report on test."""
    e = cfg.embed
    device = start(cfg).device
    model, tokenizer = load_encoder(cfg, device)
    skipped: Counter = Counter()
    splits = splits_of(cfg, skipped, labelled=True)
    for name in ("valid", "test"):
        if name not in splits:
            raise ValueError(
                f"anomaly detection needs {name} data (data.{name}, or data.valid_fraction for valid)"
            )
    normal = {k: [d for d in v if d.label == e.normal_label] for k, v in splits.items()}
    if not normal["train"] or not normal["valid"]:
        raise ValueError(f"no training or validation documents with the normal label {e.normal_label!r}")

    def emb(docs):
        return embed_documents(
            model, tokenizer, docs, cfg.data.max_seq_length, cfg.train.micro_batch_size, e.pooling, device
        )

    detector = Mahalanobis(e.shrinkage).fit(emb(normal["train"]))
    threshold = threshold_for(detector.score(emb(normal["valid"])), e.max_fpr)
    test = splits["test"]
    result = evaluate_detector(
        detector.score(emb(test)), np.array([d.label != e.normal_label for d in test]), threshold
    )
    result |= {
        "max_fpr": e.max_fpr,
        "pooling": e.pooling,
        "shrinkage": detector.coefficient,
        "train_normal": len(normal["train"]),
        "valid_normal": len(normal["valid"]),
        "test": len(test),
        "skipped_records": dict(skipped),
        "model": cfg.model.name_or_path,
    }
    if group.rank() == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "anomaly.json").write_text(json.dumps(result, indent=1))
        if "auroc" in result:
            plot_roc(result, e.max_fpr, out / "plots" / "roc.png")
        log.info(
            "anomaly detection: recall %.4f at max FPR %g (test FPR %.4f), AUROC %s -> %s",
            result["recall_at_max_fpr"] or 0.0,
            e.max_fpr,
            result["test_fpr"] or 0.0,
            f"{result['auroc']:.4f}" if "auroc" in result else "n/a",
            out / "anomaly.json",
        )
    group.barrier()
    return result
