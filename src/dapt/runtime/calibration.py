"""launch/anomaly.py's threshold: the deployable one is set on the NORMAL VALIDATION documents, for at most
embed.max_fpr of them flagged, and the test documents are judged at it. The threshold set on the normal test documents
themselves (what the literature reports, not deployable: it needs the test labels) is reported beside it.
"""

from __future__ import annotations

import numpy as np

from dapt.runtime.detectors import evaluate_detector


def threshold_for(normal_scores: np.ndarray, max_fpr: float) -> float:
    """The smallest threshold that flags at most max_fpr of the given normal scores (score > threshold = anomaly)."""
    ranked = np.sort(normal_scores)
    allowed = int(np.floor(max_fpr * len(ranked)))  # how many normal points may score above the threshold
    return float(ranked[len(ranked) - allowed - 1])


def calibrations(
    valid: np.ndarray, test: np.ndarray, valid_attack: np.ndarray, test_attack: np.ndarray, max_fpr: float
) -> dict:
    """The test result at the threshold from the normal validation documents (deployable) and at the one from the
    normal test documents themselves (what the literature reports; empty without normal test documents)."""
    deployable = evaluate_detector(test, test_attack, threshold_for(valid[~valid_attack], max_fpr))
    literature = (
        evaluate_detector(test, test_attack, threshold_for(test[~test_attack], max_fpr))
        if (~test_attack).any()
        else {}
    )
    literature.pop("roc_curve", None)
    return {"deployable": deployable, "test_calibrated": literature}
