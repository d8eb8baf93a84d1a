"""launch/anomaly.py: anomaly detection with an encoder, scored by embedding distance (to a Gaussian, or to the
nearest normal documents), MLM surprise, lexical novelty or their fusion (embed.score).

Seed 000's protocol: fit on normal training traffic, set the threshold on normal validation data for a maximum
false-positive rate (5%, held with 95% probability by default: embed.calibration), report recall, test FPR and AUROC
at it, beside the threshold set on the normal test data itself (the literature's). Every flagged document is listed
with its most surprising tokens and novel character spans (anomaly_report.jsonl, anomaly_report.md).

This module is the run: the splits, then a Scores filled step by step (read_documents, one scorer per component,
final_scores), then the result. Its parts live by name: runtime/detectors.py (Mahalanobis, NearestNormal),
data/surprise.py (MLM surprise and its choice on validation), data/novelty.py (lexical), runtime/fusion.py (the
choices on validation, the fusion), runtime/calibration.py (the thresholds), runtime/anomaly_report.py (the files).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dapt.config.schema import BadInput, EmbedConfig, RunConfig
from dapt.data.embedding import NoMLMHead, embed_documents, load_encoder, load_masked_lm, splits_of
from dapt.data.formats import Document
from dapt.data.novelty import CharNovelty
from dapt.data.stream import in_valid_split
from dapt.data.surprise import (
    Surprise,
    aggregates_for,
    choose_surprise,
    document_surprises,
    surprise_scores,
)
from dapt.runtime import group
from dapt.runtime.anomaly_report import log_result, plot_roc, write_report, write_scores
from dapt.runtime.calibration import calibrations, guarantee
from dapt.runtime.detectors import Mahalanobis, NearestNormal, by_rank
from dapt.runtime.fusion import (
    choose,
    choose_fusion,
    component_results,
    fuse,
    resampled,
    separation,
    separations,
)
from dapt.runtime.runner import start

log = logging.getLogger("dapt")


class Models(NamedTuple):
    """What the scores need loaded: an MLM for mlm, an encoder for mahalanobis and knn (the MLM's own, when there is
    one), and their tokenizer; none of them for lexical alone."""

    masked_lm: Any = None
    encoder: Any = None
    tokenizer: Any = None


@dataclass
class Scores:
    """The documents scored and each component's scores of them, filled step by step: read_documents, then one of
    SCORERS per component (values), then final_scores (fuse, fuse_rule)."""

    valid: list[Document]
    test: list[Document]
    valid_attack: np.ndarray  # which validation documents are not normal
    test_attack: np.ndarray
    normal_train: list[Document]
    fit_docs: list[
        Document
    ]  # the normal training documents the embedding detectors are fitted on (embed.sample)
    novelty: CharNovelty  # fitted on the normal training documents: lexical, and every finding's novel spans
    values: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # name -> (valid, test)
    chosen: dict = field(default_factory=dict)  # what the scores were fitted or chosen with, for anomaly.json
    embedded: tuple | None = (
        None  # the pooled embeddings of fit, valid, test (mahalanobis, knn), computed once
    )
    surprise: list[Surprise] | None = None  # the test documents' token surprises (mlm), for the report
    fuse: list[str] = field(
        default_factory=list
    )  # score=fused: the scores chosen, and their rule (None for one alone)
    fuse_rule: str | None = None


def load_models(cfg: RunConfig, device) -> tuple[Models, list[str], dict[str, str]]:
    """The models, the scores to compute (embed.score, or embed.fuse's) and those left out, with why. Called before
    any data is read, so a missing MLM head is reported before minutes of reading. A fusion over a model without a
    trained MLM head goes on without mlm, saying so; score=mlm stops."""
    e = cfg.embed
    needed = list(dict.fromkeys(e.fuse)) if e.score == "fused" else [e.score]
    not_scored: dict[str, str] = {}
    if "mlm" in needed:
        try:
            model, tokenizer = load_masked_lm(cfg, device)
            return Models(model, model.base_model, tokenizer), needed, not_scored
        except NoMLMHead as err:
            if e.score != "fused" or len(needed) < 2:
                raise
            needed.remove("mlm")
            not_scored["mlm"] = str(err)
            log.warning("embed.score=fused goes on without mlm: %s", err)
    if {"mahalanobis", "knn"} & set(needed):
        encoder, tokenizer = load_encoder(cfg, device)
        return Models(encoder=encoder, tokenizer=tokenizer), needed, not_scored
    return Models(), needed, not_scored


def read_documents(cfg: RunConfig, splits: dict) -> Scores:
    """The validation and test documents to score, which of them are attacks, and what is fitted on the normal
    training documents."""
    e = cfg.embed
    if not any(d.label == e.normal_label for d in splits["train"]) or not any(
        d.label == e.normal_label for d in splits["valid"]
    ):
        raise BadInput(f"no training or validation documents with the normal label {e.normal_label!r}")
    normal_train = [d for d in splits["train"] if d.label == e.normal_label]
    return Scores(
        valid=splits["valid"],
        test=splits["test"],
        valid_attack=np.array([d.label != e.normal_label for d in splits["valid"]]),
        test_attack=np.array([d.label != e.normal_label for d in splits["test"]]),
        normal_train=normal_train,
        fit_docs=sample(normal_train, e.sample, cfg.seed),
        novelty=CharNovelty(e.ngram, e.ngram_digits).fit(d.text for d in normal_train),
    )


def embeddings(scores: Scores, models: Models, cfg: RunConfig, device) -> tuple:
    """The pooled embeddings of the fit, validation and test documents, computed once for every embedding score."""
    if scores.embedded is None:

        def embed(docs):
            return embed_documents(
                models.encoder,
                models.tokenizer,
                docs,
                cfg.data.max_seq_length,
                cfg.train.micro_batch_size,
                cfg.embed.pooling,
                device,
            )

        scores.embedded = embed(scores.fit_docs), embed(scores.valid), embed(scores.test)
    return scores.embedded


def score_mahalanobis(
    scores: Scores, models: Models, cfg: RunConfig, device
) -> tuple[np.ndarray, np.ndarray]:
    fit, valid, test = embeddings(scores, models, cfg, device)
    detector = Mahalanobis(cfg.embed.shrinkage).fit(fit)
    scores.chosen["shrinkage"] = detector.coefficient
    return by_rank(detector.score, valid), by_rank(detector.score, test)


def score_knn(scores: Scores, models: Models, cfg: RunConfig, device) -> tuple[np.ndarray, np.ndarray]:
    fit, valid, test = embeddings(scores, models, cfg, device)
    detector, table = choose_knn(fit, valid, scores.valid_attack, cfg.embed.knn_k, cfg.embed.max_fpr)
    scores.chosen |= {"knn_k": detector.k, "knn_k_validation": table}
    return by_rank(detector.score, valid), by_rank(detector.score, test)


def choose_knn(
    fit: np.ndarray, valid: np.ndarray, valid_attack: np.ndarray, ks: list[int], max_fpr: float
) -> tuple[NearestNormal, dict]:
    """The nearest-normal detector fitted on `fit` for the k of `ks` whose validation distances separate the
    validation attacks best (the first without validation attacks, or with one k), and the table chosen by."""
    fitted = NearestNormal(ks[0]).fit(fit)  # one normalised copy of the fit set, shared by every k
    detectors = {f"k={k}": fitted.with_k(k) for k in dict.fromkeys(ks)}
    if len(detectors) == 1:
        return next(iter(detectors.values())), {}
    best, table = choose(detectors, lambda c: detectors[c].score(valid), valid_attack, max_fpr)
    detector = detectors[best or next(iter(detectors))]
    why = separations(table) or "no attacks in the validation set to choose by (embed.valid_from_test)"
    log.info("embed.score=knn takes k=%d: %s", detector.k, why)
    return detector, table


def score_lexical(scores: Scores, models: Models, cfg: RunConfig, device) -> tuple[np.ndarray, np.ndarray]:
    return scores.novelty.score(d.text for d in scores.valid), scores.novelty.score(
        d.text for d in scores.test
    )


def score_mlm(scores: Scores, models: Models, cfg: RunConfig, device) -> tuple[np.ndarray, np.ndarray]:
    """MLM surprise, by the aggregate and measure of embed.token_score and token_surprise (auto: chosen on
    validation); the test documents' token surprises are kept for the report."""
    e = cfg.embed
    aggregates = aggregates_for(e.token_score, models.tokenizer)
    novelty = scores.novelty if "novel" in aggregates else None
    valid, scores.surprise = (
        document_surprises(cfg, models.masked_lm, models.tokenizer, docs, device, novelty)
        for docs in (scores.valid, scores.test)
    )
    how, measure, table = choose_surprise(valid, scores.valid_attack, aggregates, e)
    scores.chosen |= {"token_score": how, "token_surprise": measure, "token_score_validation": table}
    return surprise_scores(valid, how, e.top_k, measure), surprise_scores(
        scores.surprise, how, e.top_k, measure
    )


# embed.score's components: each returns its (valid, test) scores, higher meaning more anomalous
SCORERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "mahalanobis": score_mahalanobis,
    "knn": score_knn,
    "mlm": score_mlm,
    "lexical": score_lexical,
}


def final_scores(scores: Scores, e: EmbedConfig) -> tuple[np.ndarray, np.ndarray]:
    """The score of embed.score for (valid, test): one component, or the fusion of embed.fuse by embed.fuse_rule: the
    choice (one of them alone, or a combination by a rule) that separates validation attacks best, when there are
    some; all of them, without."""
    if e.score != "fused":
        return scores.values[e.score]
    scores.fuse, scores.fuse_rule, table = choose_fusion(
        scores.values, scores.valid_attack, e.fuse_rule, e.max_fpr
    )
    scores.chosen |= {"fuse_validation": table}
    return fuse(scores.values, scores.fuse, scores.fuse_rule, scores.valid_attack)


def run(cfg: RunConfig) -> dict:
    """Score validation and test documents, threshold on normal validation ones, report on test."""
    device = start(cfg).device
    skipped: Counter = Counter()
    models, needed, not_scored = load_models(cfg, device)
    scores = read_documents(cfg, anomaly_splits(cfg, skipped))
    for name in needed:
        scores.values[name] = SCORERS[name](scores, models, cfg, device)
    valid, test = final_scores(scores, cfg.embed)
    result = result_of(cfg, scores, valid, test, not_scored, skipped)
    if group.rank() == 0:
        write_outputs(cfg, scores, models, valid, test, result)
    group.barrier()
    return result


def result_of(
    cfg: RunConfig, scores: Scores, valid: np.ndarray, test: np.ndarray, not_scored: dict, skipped: Counter
) -> dict:
    """anomaly.json: the test result at the deployable threshold (from normal validation documents), both
    calibrations, each fused component's own, the choices made and the documents counted."""
    e = cfg.embed
    how = (e.max_fpr, e.calibration, e.confidence)  # the deployable threshold's
    cal = calibrations(valid, test, scores.valid_attack, scores.test_attack, *how)
    result = dict(cal["deployable"])
    result |= {
        "score": e.score,
        "fuse": scores.fuse,
        "fuse_rule": scores.fuse_rule,
        "unscored": not_scored,
        "calibrations": {
            name: {k: r.get(k) for k in ("recall_at_max_fpr", "test_fpr", "threshold")}
            for name, r in cal.items()
        },
        "components": (
            component_results(scores.values, scores.valid_attack, scores.test_attack, *how)
            if e.score == "fused"
            else {}
        ),
        "max_fpr": e.max_fpr,
        "calibration": guarantee(valid[~scores.valid_attack], *how),
        "pooling": e.pooling,
        **scores.chosen,
        "train_normal": len(scores.normal_train),
        "fit_normal": len(scores.fit_docs),
        "valid_normal": int((~scores.valid_attack).sum()),
        "valid_attack": int(scores.valid_attack.sum()),
        "valid_from_test": e.valid_from_test,
        "test": len(scores.test),
        "test_attack": int(scores.test_attack.sum()),
        "skipped_records": dict(skipped),
        "model": cfg.model.name_or_path,
    }
    if scores.valid_attack.any():
        result["validation"] = separation(valid[~scores.valid_attack], valid[scores.valid_attack], e.max_fpr)
    if e.valid_from_test and scores.test_attack.any():  # validation and test: one traffic, split again
        fused = {name: scores.values[name] for name in scores.fuse} if e.score == "fused" else {}
        result["resampled"] = resampled(
            fused or {e.score: (valid, test)}, scores.fuse_rule, scores, e, cfg.seed
        )
    return result


def write_outputs(
    cfg: RunConfig, scores: Scores, models: Models, valid: np.ndarray, test: np.ndarray, result: dict
) -> None:
    """Rank 0: the report, the raw scores, anomaly.json and the ROC curve."""
    e = cfg.embed
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_report(findings(scores, models, test, result["threshold"], e), scores.test, result, e, out)
    write_scores(out / "anomaly_scores.csv", (scores.valid, scores.test), (valid, test), scores.values)
    (out / "anomaly.json").write_text(json.dumps(result, indent=1))
    if "auroc" in result:
        plot_roc(result, e.max_fpr, out / "plots" / "roc.png")
    log_result(result, e, out / "anomaly.json")


def findings(
    scores: Scores, models: Models, test: np.ndarray, threshold: float, e: EmbedConfig
) -> list[dict]:
    """Every test document scoring above the threshold, highest score first, with why: its components, its novel
    character spans and, when MLM surprise was computed, its most surprising tokens."""
    flagged = np.flatnonzero(test > threshold)
    flagged = flagged[np.argsort(-test[flagged], kind="stable")]
    found = []
    for i in flagged:
        doc = scores.test[i]
        finding = {
            "id": doc.id,
            "label": doc.label,
            "score": round(float(test[i]), 4),
            "components": {n: round(float(t[i]), 4) for n, (_, t) in scores.values.items()},
            "novel_spans": scores.novelty.spans(doc.text, e.top_k),
        }
        if scores.surprise is not None:
            finding["surprising_tokens"] = scores.surprise[i].top(
                models.tokenizer,
                e.top_k,
                scores.chosen["token_surprise"],
                novel_only=scores.chosen["token_score"] == "novel",
            )
        found.append(finding)
    return found


def sample(docs: list, n: int, seed: int) -> list:
    """At most n of `docs`, drawn without replacement by the run's seed (the same on every run), in their order.
    Drawn by position, not by a hash of the text: CSIC repeats requests, and a text hash keeps repeats together."""
    if not n or len(docs) <= n:
        return docs
    keep = set(np.random.default_rng(seed).choice(len(docs), n, replace=False).tolist())
    return [d for i, d in enumerate(docs) if i in keep]


def valid_key(doc, normal_label: str) -> str:
    """What embed.valid_from_test hashes: a normal document's record (file name and line, wherever the file lies), so
    repeated normal requests fall on both sides and the threshold sees the traffic mix the test has (one request
    repeated a hundred times, all on one side, skews a text split's quantiles); an attack's text, so no copy of a test
    attack chooses a score."""
    return doc.id.rsplit("/", 1)[-1] if doc.label == normal_label else doc.text


def anomaly_splits(cfg: RunConfig, skipped: Counter) -> dict:
    """train / valid / test; with embed.valid_from_test the validation set is that share of the test documents (by
    valid_key) and the training documents are all of data.train."""
    splits = splits_of(cfg, skipped, labelled=True)
    share = cfg.embed.valid_from_test
    if "test" not in splits:
        raise BadInput("anomaly detection needs test data (data.test)")
    if share:
        splits["train"] += splits.pop("valid", [])
        test = splits["test"]
        valid = [in_valid_split(valid_key(d, cfg.embed.normal_label), share) for d in test]
        splits["valid"] = [d for d, v in zip(test, valid) if v]
        splits["test"] = [d for d, v in zip(test, valid) if not v]
    splits["valid"], splits["test"] = (
        sample(splits[k], cfg.embed.sample, cfg.seed) for k in ("valid", "test")
    )
    if not splits.get("valid"):
        raise BadInput(
            "anomaly detection needs validation data (data.valid, data.valid_fraction or embed.valid_from_test)"
        )
    return splits
