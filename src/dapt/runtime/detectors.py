"""launch/anomaly.py's embedding detectors, plain numpy: each is fitted on normal training embeddings and scores a
document by how far its embedding lies from them (higher: more anomalous). Mahalanobis (seed 000's) measures the
distance to one Gaussian; NearestNormal the cosine distance to the k-th nearest normal document. evaluate_detector
says what a score achieves on labelled documents at a given threshold.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np

from dapt.runtime import group

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


class NearestNormal:
    """Cosine distance to the k-th nearest normal training embedding, every embedding first centred on the normal
    training mean: the direction all of an encoder's embeddings share otherwise dominates their cosine similarity. No
    Gaussian is assumed, so normal traffic of several kinds (pages, forms, methods) is not one blurred cloud. Being a
    cosine, it does not see how far from the mean an embedding lies, only in which direction (Mahalanobis sees both)."""

    def __init__(self, k: int = 5, chunk: int = 1024):
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        self.requested, self.chunk = k, chunk

    def fit(self, x: np.ndarray) -> NearestNormal:
        self.mean = x.mean(axis=0, dtype=np.float64)
        self.normal = self._unit(x)
        return self.with_k(self.requested)

    def with_k(self, k: int) -> NearestNormal:
        """This fitted detector at another k, sharing its normal embeddings (no second copy)."""
        other = copy.copy(self)
        other.requested, other.k = k, min(k, len(self.normal))  # the k used, for anomaly.json
        if other.k < k:
            log.warning(
                "embed.knn_k=%d, but %d normal documents were embedded: k=%d", k, len(self.normal), other.k
            )
        return other

    def _unit(self, x: np.ndarray) -> np.ndarray:
        centred = x.astype(np.float64) - self.mean
        return (centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)).astype(
            np.float32
        )

    def score(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.float64)
        for at in range(0, len(x), self.chunk):  # a chunk x fit-documents block of similarities at a time
            sims = self._unit(x[at : at + self.chunk]) @ self.normal.T
            kth = np.partition(sims, -self.k, axis=1)[:, -self.k]  # the k-th largest similarity
            out[at : at + len(sims)] = 1.0 - kth
        return np.clip(out, 0.0, 2.0)  # float32 rounding: a copy of a normal document is never below 0


def by_rank(score: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """score(x), each rank scoring rows r, r+W, ... of x; every rank returns the whole (as embed_documents does)."""
    if group.world() == 1:
        return score(x)
    mine = np.arange(group.rank(), len(x), group.world())
    out = np.empty(len(x), dtype=np.float64)
    for rows, part in group.gather((mine, score(x[mine]))):
        out[rows] = part
    return out


def evaluate_detector(
    scores: np.ndarray, is_anomaly: np.ndarray, threshold: float, curve: bool = True
) -> dict:
    """What `scores` achieve at `threshold` (score > threshold flags a document): the recall of the anomalies, the
    false-positive rate on the normal documents and, when both are present, AUROC (and the ROC curve with `curve`)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    flagged = scores > threshold
    result = {
        "recall_at_max_fpr": float(flagged[is_anomaly].mean()) if is_anomaly.any() else None,
        "test_fpr": float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else None,
        "threshold": threshold,
    }
    if is_anomaly.any() and (~is_anomaly).any():
        result["auroc"] = float(roc_auc_score(is_anomaly, scores))
        if curve:
            fpr, tpr, _ = roc_curve(is_anomaly, scores)
            result["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return result
