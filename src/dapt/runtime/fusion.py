"""launch/anomaly.py's choices on validation, and the fusion of several scores into one.

Every choice (the aggregate and measure of MLM surprise, which scores embed.score=fused combines and by which rule) is
made on the validation documents, by how well each candidate separates the validation attacks from the normal
validation documents (separation: partial AUROC up to embed.max_fpr, then AUROC); never on the test documents. Fused
scores are each first put on one scale, the -log tail probability among the normal validation scores (tail_scores),
then combined by a sum (Fisher's method) or a max (Tippett's).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable

import numpy as np

from dapt.config.schema import CHOICES
from dapt.runtime.calibration import calibrations, observed_within, threshold_for
from dapt.runtime.detectors import evaluate_detector

FUSE_RULES = tuple(r for r in CHOICES["embed.fuse_rule"] if r != "auto")  # declared with the field

log = logging.getLogger("dapt")


def tail_scores(normal_valid: np.ndarray, x: np.ndarray, own: np.ndarray | None = None) -> np.ndarray:
    """-log of x's tail probability among the normal validation scores, (1 + #{v >= x}) / (n + 1): every score on
    one scale, where fused scores add up (Fisher's method). The `own` entries of x are those normal validation
    scores themselves: each is counted among the OTHER n - 1, (1 + #{others >= x}) / (n + 1), never more unusual
    than a new document of its value would be, so that the threshold their fused scores set is conservative for new
    documents (counting itself made each look one rank less unusual, and the threshold flagged 6.1% of new normal
    documents for 5.3% expected)."""
    ranked = np.sort(normal_valid)
    above = (len(ranked) - np.searchsorted(ranked, x, side="left")).astype(float)
    if own is not None:
        above[own] -= 1
    return -np.log((1.0 + above) / (len(ranked) + 1.0))


def combine(tails: list[np.ndarray], rule: str, n_normal: int) -> np.ndarray:
    """Several components' tail scores (each tail_scores' against n_normal documents) as one. sum: Fisher's method,
    evidence adds up; max: Tippett's, the strongest component decides (ties broken by the sum), so what one score
    alone sees is not diluted by the others."""
    stacked = np.vstack(tails)
    total = stacked.sum(axis=0)
    if rule == "sum":
        return total
    # distinct tail scores (one grid, (1 + m) / (n + 1), for validation and test) differ by at least
    # log((n + 1) / n) > 1 / (n + 1), and no sum exceeds
    # components x log(n + 1): the tie-break below never reorders two different maxima
    scale = 0.5 / ((n_normal + 1) * len(tails) * np.log(n_normal + 2))
    return stacked.max(axis=0) + scale * total


def separation(normal: np.ndarray, attack: np.ndarray, max_fpr: float) -> dict:
    """How well a score separates attacks from normal documents of one set: recall at its own max_fpr threshold, the
    partial AUROC up to max_fpr (sklearn's standardized one: 0.5 random, 1 perfect; what choices are made by, being
    the recall averaged over every false-positive rate up to max_fpr, steadier than the recall at one threshold) and
    AUROC (the tie-break)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(normal), bool), np.ones(len(attack), bool)]
    r = evaluate_detector(np.r_[normal, attack], labels, threshold_for(normal, max_fpr), curve=False)
    partial = roc_auc_score(labels, np.r_[normal, attack], max_fpr=max_fpr)
    return {"recall_at_max_fpr": r["recall_at_max_fpr"], "partial_auroc": float(partial), "auroc": r["auroc"]}


def best_of(table: dict) -> str | None:
    """The entry of a table of separations with the best validation partial AUROC (then AUROC); None for an empty
    one."""
    return max(table, key=lambda c: (table[c]["partial_auroc"], table[c]["auroc"])) if table else None


def fused_choice(names: list[str], rule: str | None) -> str:
    """What embed.score=fused takes, as the log and the report say it: `lexical alone`, `mahalanobis, lexical by max`."""
    return f"{names[0]} alone" if len(names) == 1 else f"{', '.join(names)} by {rule}"


def separations(table: dict) -> str:
    """A table of validation separations in words, for the log."""
    return "; ".join(
        f"{c} recall {r['recall_at_max_fpr']:.3f} partial AUROC {r['partial_auroc']:.3f} AUROC {r['auroc']:.3f}"
        for c, r in table.items()
    )


def choose(
    labels: Iterable[str], validation: Callable[[str], np.ndarray], attack: np.ndarray, max_fpr: float
) -> tuple[str | None, dict]:
    """The choice on validation: each candidate's separation (validation(label) gives its validation scores; `attack`
    says which validation documents are attacks) and the best of them; (None, {}) without validation attacks."""
    if not attack.any():
        return None, {}
    table = {}
    for label in labels:
        valid = validation(label)
        table[label] = separation(valid[~attack], valid[attack], max_fpr)
    return best_of(table), table


def fuse(
    values: dict[str, tuple[np.ndarray, np.ndarray]], names, rule: str | None, valid_attack: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The named components' (valid, test) tail scores, each calibrated on the normal validation documents, combined
    by `rule`; one component alone is its own values (any calibration keeps its order)."""
    if len(names) == 1:
        return values[names[0]]
    tails = []
    for name in names:
        valid, test = values[name]
        normal = valid[~valid_attack]
        tails.append((tail_scores(normal, valid, own=~valid_attack), tail_scores(normal, test)))
    n = int((~valid_attack).sum())
    return combine([v for v, _ in tails], rule, n), combine([t for _, t in tails], rule, n)


def choose_fusion(
    values: dict[str, tuple[np.ndarray, np.ndarray]], valid_attack: np.ndarray, fuse_rule: str, max_fpr: float
) -> tuple[list[str], str | None, dict]:
    """embed.score=fused over the scored components (`values`, in embed.fuse's order): the choice (one of them alone,
    or a combination by a rule of embed.fuse_rule) that separates the validation attacks best; all of them by the
    first rule without validation attacks. Returns the names chosen, their rule (None for one alone) and the table of
    validation separations the choice was made by."""
    scored = list(values)
    rules = FUSE_RULES if fuse_rule == "auto" else (fuse_rule,)
    # one score alone needs no rule: weighed once, first (a tie goes to the simpler choice)
    choices = {name: ((name,), rules[0]) for name in scored} if len(scored) > 1 else {}
    choices |= {
        f"{'+'.join(names)} by {rule}": (names, rule)
        for n in range(2, len(scored) + 1)
        for names in itertools.combinations(scored, n)
        for rule in rules
    }
    best, table = choose(choices, lambda c: fuse(values, *choices[c], valid_attack)[0], valid_attack, max_fpr)
    names, rule = choices[best] if best else (tuple(scored), rules[0])
    if len(choices) > 1:
        why = f"best on validation: {separations(table)}" if table else "no validation attacks to choose by"
        log.info("embed.score=fused: %s (%s)", fused_choice(names, rule), why)
    return list(names), (rule if len(names) > 1 else None), table


def component_results(
    values: dict[str, tuple[np.ndarray, np.ndarray]],
    valid_attack: np.ndarray,
    test_attack: np.ndarray,
    max_fpr: float,
    method: str = "quantile",
    confidence: float = 0.95,
) -> dict:
    """Each fused component's own test result (both calibrations, the deployable by `method`) and validation
    separation, beside the fused score's."""
    out = {}
    for name, (valid, test) in values.items():
        cal = calibrations(valid, test, valid_attack, test_attack, max_fpr, method, confidence)
        out[name] = {
            "auroc": cal["deployable"].get("auroc"),
            "recall_at_max_fpr": cal["deployable"]["recall_at_max_fpr"],
            "test_fpr": cal["deployable"]["test_fpr"],
            "recall_test_calibrated": cal["test_calibrated"].get("recall_at_max_fpr"),
        }
        if valid_attack.any():
            out[name]["validation"] = separation(valid[~valid_attack], valid[valid_attack], max_fpr)
    return out


def resampled(
    values: dict[str, tuple[np.ndarray, np.ndarray]], rule: str | None, split, e, seed: int = 0
) -> dict:
    """Does the deployable threshold hold on other draws of the same traffic? The validation and test documents
    pooled and split again 20 times (as many normal and attack documents in each part as `split`, the run's, had:
    its valid_attack and test_attack), the fusion's tails and the threshold set again on each new validation part by
    embed.calibration (`values`: the scores fused, by `rule`, as chosen; one: used as it is), the test part judged at
    it: its FPR and recall, and the recall at exactly embed.max_fpr (the threshold from its own normal documents).
    promised_at_most_max: the rounds whose test FPR the law of calibration.observed_within expects at most max_fpr
    (a finite test part's FPR scatters: the bound's 95% is about 90% on 700 normal test documents)."""
    rng = np.random.default_rng(seed)
    names = list(values)
    pooled = {name: np.r_[valid, test] for name, (valid, test) in values.items()}
    attack = np.r_[split.valid_attack, split.test_attack]
    out: dict = {"rounds": 20, "test_fpr": [], "recall": [], "recall_at_exactly_max_fpr": []}
    promised = 0.0
    for _ in range(out["rounds"]):
        in_valid = np.zeros(len(attack), bool)
        for is_attack in (False, True):
            pool = np.flatnonzero(attack == is_attack)
            in_valid[rng.choice(pool, int((split.valid_attack == is_attack).sum()), replace=False)] = True
        parts = {name: (v[in_valid], v[~in_valid]) for name, v in pooled.items()}
        valid, test = fuse(parts, names, rule, attack[in_valid])
        cal = calibrations(
            valid, test, attack[in_valid], attack[~in_valid], e.max_fpr, e.calibration, e.confidence
        )
        out["test_fpr"].append(cal["deployable"]["test_fpr"])
        out["recall"].append(cal["deployable"]["recall_at_max_fpr"])
        out["recall_at_exactly_max_fpr"].append(cal["test_calibrated"].get("recall_at_max_fpr"))
        normal = valid[~attack[in_valid]]
        above = int((normal > threshold_for(normal, e.max_fpr, e.calibration, e.confidence)).sum())
        promised += observed_within(len(normal), above, int((~attack[~in_valid]).sum()), e.max_fpr)
    out["fpr_at_most_max"] = int(sum(f <= e.max_fpr for f in out["test_fpr"]))
    # how many of the rounds the calibration's law expects at most max_fpr, for test parts of this size
    out["promised_at_most_max"] = round(promised, 2)
    return out
