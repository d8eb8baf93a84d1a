"""launch/anomaly.py's threshold: the deployable one is set on the NORMAL VALIDATION documents, for at most
embed.max_fpr of new normal traffic flagged, and the test documents are judged at it. The threshold set on the normal
test documents themselves (what the literature reports, not deployable: it needs the test labels) is reported beside
it.

How the validation threshold is set (embed.calibration). With n normal validation scores and the threshold at the
one that leaves k of them above it, the share of NEW normal documents above it (their false-positive rate) is a
random variable, Beta(k + 1, n - k) distributed for continuous scores when validation and new documents are
exchangeable (drawn alike); with tied scores fewer than k may lie above and the law bounds the FPR from above. So:
- quantile: k = floor(max_fpr * n), the empirical quantile: the FPR on new traffic scatters around max_fpr and exceeds
  it about half the time, more often with few documents (what dapt did before 0.3);
- conformal: k = n - ceil((n + 1)(1 - max_fpr)), the split-conformal quantile: the EXPECTED FPR is at most max_fpr
  (it needs n >= 1 / max_fpr - 1 normal validation documents: 19 for 5%);
- bound: the largest k with P(FPR <= max_fpr) >= embed.confidence: the FPR on new traffic is at most max_fpr with
  that probability (from the Beta law). It needs n >= log(1 - confidence) / log(1 - max_fpr) normal validation
  documents (59 for 5% at 95%), and costs recall: the threshold sits above the quantile's.
Not covered: traffic that drifts away from the validation documents, and the choices (fusion, token score) made on
the same validation documents, a mild selection the promise does not count.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import stats

from dapt.runtime.detectors import evaluate_detector

log = logging.getLogger("dapt")
METHODS = ("quantile", "conformal", "bound")


def normal_needed(max_fpr: float, confidence: float, method: str = "bound") -> int:
    """The fewest normal validation documents with which `method` can keep its promise at all (k = 0: nothing above
    the threshold, which is then their maximum)."""
    if method == "quantile":
        return 1
    if method == "conformal":
        return math.ceil(1 / max_fpr - 1 - 1e-9)
    return math.ceil(math.log(1 - confidence) / math.log(1 - max_fpr))


def allowed_above(n: int, max_fpr: float, method: str = "quantile", confidence: float = 0.95) -> int:
    """k: how many of n normal validation scores the threshold leaves above it (-1: even their maximum does not give
    the guarantee: too few documents)."""
    if method == "quantile":
        return int(np.floor(max_fpr * n))
    if method == "conformal":
        return n - math.ceil((n + 1) * (1 - max_fpr))
    # P(FPR <= max_fpr) = P(Binomial(n, max_fpr) >= k + 1), falling in k: the largest k that keeps it >= confidence
    held = stats.binom.sf(np.arange(n), n, max_fpr) >= confidence
    return int(np.flatnonzero(held)[-1]) if held.any() else -1


_WARNED: set[tuple] = set()  # the too-few-documents cases already said


def threshold_for(
    normal_scores: np.ndarray, max_fpr: float, method: str = "quantile", confidence: float = 0.95
) -> float:
    """The threshold from normal scores (score > threshold = anomaly) by `method`: at the score that leaves
    allowed_above of them above it; with too few documents for the method, their maximum (said in the log)."""
    ranked = np.sort(np.asarray(normal_scores, dtype=float))
    k = allowed_above(len(ranked), max_fpr, method, confidence)
    if k < 0:
        if (method, len(ranked), max_fpr) in _WARNED:  # once per run: fusion and the re-splits ask again
            return float(ranked[-1])
        _WARNED.add((method, len(ranked), max_fpr))
        log.warning(
            "embed.calibration=%s: %d normal validation documents cannot keep the FPR at %g (%d needed); the threshold "
            "is their maximum",
            method,
            len(ranked),
            max_fpr,
            normal_needed(max_fpr, confidence, method),
        )
        k = 0
    return float(ranked[len(ranked) - k - 1])


def fpr_interval(n: int, k: int, level: float = 0.95) -> list[float]:
    """The central `level` interval of the FPR on new normal documents of a threshold that leaves k of n normal
    validation scores above it (Beta(k + 1, n - k))."""
    law = stats.beta(k + 1, max(n - k, 1))
    return [float(law.ppf((1 - level) / 2)), float(law.ppf((1 + level) / 2))]


def observed_within(n: int, k: int, m: int, max_fpr: float) -> float:
    """The probability that at most max_fpr of m new normal documents lie above a threshold that leaves k of n normal
    validation scores above it: the FPR a finite test set shows scatters around the FPR on all new traffic
    (Beta-binomial(m, k + 1, n - k)), so on 700 test documents the bound's 95% becomes about 90%."""
    return float(stats.betabinom(m, k + 1, max(n - k, 1)).cdf(math.floor(max_fpr * m + 1e-9)))


def guarantee(normal_scores: np.ndarray, max_fpr: float, method: str, confidence: float) -> dict:
    """What the deployable threshold promises for new normal traffic, from the normal validation scores: how many lie
    above it (fewer than planned with ties: the promise then holds with room), the probability that the FPR stays
    at most max_fpr (at least), the expected FPR (at most) and the central 95% interval of the FPR."""
    normal = np.asarray(normal_scores, dtype=float)
    n, planned = len(normal), allowed_above(len(normal), max_fpr, method, confidence)
    k = int((normal > threshold_for(normal, max_fpr, method, confidence)).sum()) if n else 0
    law = stats.beta(k + 1, max(n - k, 1))
    return {
        "method": method,
        "normal_validation": n,
        "above_threshold": k,
        "planned_above": max(planned, 0),
        "normal_needed": normal_needed(max_fpr, confidence, method),
        "enough": planned >= 0,
        "expected_fpr": float(law.mean()),
        "p_fpr_at_most_max": float(law.cdf(max_fpr)),
        "fpr_interval_95": fpr_interval(n, k),
        "confidence": confidence if method == "bound" else None,
    }


def calibrations(
    valid: np.ndarray,
    test: np.ndarray,
    valid_attack: np.ndarray,
    test_attack: np.ndarray,
    max_fpr: float,
    method: str = "quantile",
    confidence: float = 0.95,
) -> dict:
    """The test result at the threshold from the normal validation documents (deployable, by `method`) and at the
    one from the normal test documents themselves (what the literature reports; empty without normal test
    documents)."""
    deployable = evaluate_detector(
        test, test_attack, threshold_for(valid[~valid_attack], max_fpr, method, confidence)
    )
    literature = (
        evaluate_detector(test, test_attack, threshold_for(test[~test_attack], max_fpr))
        if (~test_attack).any()
        else {}
    )
    literature.pop("roc_curve", None)
    return {"deployable": deployable, "test_calibrated": literature}
