"""launch/anomaly.py: anomaly detection with an encoder, scored by embedding distance (to a Gaussian, or to the
nearest normal documents), MLM surprise, lexical novelty or their fusion (embed.score).

Seed 000's protocol: fit on normal training traffic (a Gaussian of pooled embeddings, the character n-grams seen),
set the threshold on normal validation data for a maximum false-positive rate (5% by default), and report the
recall of attacks at that threshold, the false-positive rate reached on normal test data, and AUROC. The threshold
set on the normal test data itself (what the literature reports) is reported beside it. Every flagged document is
listed with its most surprising tokens and novel character spans (anomaly_report.jsonl, anomaly_report.md).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dapt.config.schema import BadInput, RunConfig
from dapt.data.embedding import NoMLMHead, embed_documents, load_encoder, load_masked_lm, splits_of
from dapt.data.novelty import CharNovelty
from dapt.data.stream import in_valid_split
from dapt.data.surprise import AGGREGATES, MEASURES, run_surprise
from dapt.runtime import group
from dapt.runtime.plots import pyplot, save
from dapt.runtime.runner import start

FUSE_RULES = ("sum", "max")  # embed.fuse_rule's choices besides auto

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
        self.k = min(self.requested, len(x))  # the k used, for anomaly.json
        if self.k < self.requested:
            log.warning(
                "embed.knn_k=%d, but %d normal documents were embedded: k=%d", self.requested, len(x), self.k
            )
        return self

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


def threshold_for(normal_scores: np.ndarray, max_fpr: float) -> float:
    """The smallest threshold that flags at most max_fpr of the given normal scores (score > threshold = anomaly)."""
    ranked = np.sort(normal_scores)
    allowed = int(np.floor(max_fpr * len(ranked)))  # how many normal points may score above the threshold
    return float(ranked[len(ranked) - allowed - 1])


def evaluate_detector(
    scores: np.ndarray, is_anomaly: np.ndarray, threshold: float, curve: bool = True
) -> dict:
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


def tail_scores(normal_valid: np.ndarray, x: np.ndarray) -> np.ndarray:
    """-log of x's tail probability among the normal validation scores, (1 + #{v >= x}) / (n + 1): every score on
    one scale, where fused scores add up (Fisher's method)."""
    ranked = np.sort(normal_valid)
    above = len(ranked) - np.searchsorted(ranked, x, side="left")
    return -np.log((1.0 + above) / (len(ranked) + 1.0))


def combine(tails: list[np.ndarray], rule: str, n_normal: int) -> np.ndarray:
    """Several components' tail scores (each tail_scores' against n_normal documents) as one. sum: Fisher's method,
    evidence adds up; max: Tippett's, the strongest component decides (ties broken by the sum), so what one score
    alone sees is not diluted by the others."""
    stacked = np.vstack(tails)
    total = stacked.sum(axis=0)
    if rule == "sum":
        return total
    # distinct tail scores differ by at least log((n + 1) / n) > 1 / (n + 1), and no sum exceeds
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
    """What `fused` takes, as the log and the report say it: `lexical alone`, `mahalanobis, lexical by max`."""
    return f"{names[0]} alone" if len(names) == 1 else f"{', '.join(names)} by {rule}"


def surprise_phrase(how: str, measure: str) -> str:
    """embed.token_score and token_surprise in words, for the log and the report."""
    if how == "novel":
        return f"each token's {measure} surprise summed over the tokens in novel n-grams, per masked token"
    return f"the {how} of each token's {measure} surprise"


def separations(table: dict) -> str:
    return "; ".join(
        f"{c} recall {r['recall_at_max_fpr']:.3f} partial AUROC {r['partial_auroc']:.3f} AUROC {r['auroc']:.3f}"
        for c, r in table.items()
    )


class Scores:
    """Every component score (mahalanobis, knn, mlm, lexical) of the validation and test documents, computed once."""

    def __init__(self, cfg: RunConfig, read_splits: Callable[[], dict], device):
        """Loads the model first (a missing MLM head is reported before minutes of reading), then the splits."""
        self.cfg, self.e, self.device = cfg, cfg.embed, device
        e = self.e
        self.needed = list(dict.fromkeys(e.fuse)) if e.score == "fused" else [e.score]
        self.not_scored: dict[str, str] = {}
        model, self.tokenizer = self._load(cfg, device)
        splits = read_splits()
        if not any(d.label == e.normal_label for d in splits["train"]) or not any(
            d.label == e.normal_label for d in splits["valid"]
        ):
            raise BadInput(f"no training or validation documents with the normal label {e.normal_label!r}")
        self.valid, self.test = splits["valid"], splits["test"]
        self.valid_attack = np.array([d.label != e.normal_label for d in self.valid])
        self.test_attack = np.array([d.label != e.normal_label for d in self.test])
        self.normal_train = [d for d in splits["train"] if d.label == e.normal_label]
        self.fit_docs = sample(self.normal_train, e.sample, cfg.seed)
        self.values: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (valid, test)
        self.surprise: list | None = None  # the test documents' token surprises (mlm)
        self.embedded: tuple | None = None  # the pooled embeddings of fit, valid, test (mahalanobis, knn)
        self.chosen: dict = {}
        self.fuse: list[str] = []  # score=fused: the scores chosen, and their rule (None for one alone)
        self.fuse_rule: str | None = None
        self.novelty = CharNovelty(e.ngram, e.ngram_digits).fit(d.text for d in self.normal_train)
        for name in self.needed:
            self.values[name] = getattr(self, "_" + name)(model)

    def _load(self, cfg: RunConfig, device):
        """The model the scores need (an MLM for mlm, else the encoder for mahalanobis or knn, none for lexical
        alone). A fusion over a model without a trained MLM head goes on without mlm, saying so; score=mlm stops."""
        if "mlm" in self.needed:
            try:
                return load_masked_lm(cfg, device)
            except NoMLMHead as e:
                if cfg.embed.score != "fused" or len(self.needed) < 2:
                    raise
                self.needed.remove("mlm")
                self.not_scored["mlm"] = str(e)
                log.warning("embed.score=fused goes on without mlm: %s", e)
        if {"mahalanobis", "knn"} & set(self.needed):
            return load_encoder(cfg, device)
        return None, None

    def _embeddings(self, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pooled embeddings of the fit, validation and test documents, computed once for every embedding score."""
        if self.embedded is None:
            cfg = self.cfg
            encoder = model.base_model if "mlm" in self.needed else model

            def emb(docs):
                return embed_documents(
                    encoder,
                    self.tokenizer,
                    docs,
                    cfg.data.max_seq_length,
                    cfg.train.micro_batch_size,
                    self.e.pooling,
                    self.device,
                )

            self.embedded = emb(self.fit_docs), emb(self.valid), emb(self.test)
        return self.embedded

    def _mahalanobis(self, model) -> tuple[np.ndarray, np.ndarray]:
        fit, valid, test = self._embeddings(model)
        detector = Mahalanobis(self.e.shrinkage).fit(fit)
        self.chosen["shrinkage"] = detector.coefficient
        return by_rank(detector.score, valid), by_rank(detector.score, test)

    def _knn(self, model) -> tuple[np.ndarray, np.ndarray]:
        fit, valid, test = self._embeddings(model)
        detector = NearestNormal(self.e.knn_k).fit(fit)
        self.chosen["knn_k"] = detector.k
        return by_rank(detector.score, valid), by_rank(detector.score, test)

    def _lexical(self, model) -> tuple[np.ndarray, np.ndarray]:
        return self.novelty.score(d.text for d in self.valid), self.novelty.score(d.text for d in self.test)

    def _mlm(self, model) -> tuple[np.ndarray, np.ndarray]:
        cfg, e = self.cfg, self.e
        aggregates = AGGREGATES if e.token_score == "auto" else (e.token_score,)
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: no token's novelty
            if e.token_score == "novel":
                raise BadInput(
                    f"embed.token_score=novel needs token offsets, which {type(self.tokenizer).__name__} "
                    "(not a fast tokenizer) lacks: choose mean, max, topk or auto"
                )
            aggregates = tuple(a for a in aggregates if a != "novel")

        def surprise(docs):
            found = run_surprise(cfg, model, self.tokenizer, docs, self.device)
            if "novel" in aggregates:
                texts = [d.text for d in docs]
                for s, flags in zip(
                    found, self.novelty.novel_tokens(self.tokenizer, texts, cfg.data.max_seq_length)
                ):
                    if len(flags) != len(s.ids):
                        raise RuntimeError(f"{len(flags)} novelty flags for the {len(s.ids)} tokens scored")
                    s.novel = flags
            return found

        valid, self.surprise = surprise(self.valid), surprise(self.test)
        measures = MEASURES if e.token_surprise == "auto" else (e.token_surprise,)
        table = {}
        if self.valid_attack.any():
            for measure in measures:
                for agg in aggregates:
                    v = np.array([s.score(agg, e.top_k, measure) for s in valid])
                    table[f"{agg} of {measure}"] = separation(
                        v[~self.valid_attack], v[self.valid_attack], e.max_fpr
                    )
        best = best_of(table)
        how, measure = (
            best.split(" of ") if best else ("topk" if len(aggregates) > 1 else aggregates[0], measures[0])
        )
        if len(aggregates) * len(measures) > 1:
            why = (
                separations(table) or "no attacks in the validation set to choose by (embed.valid_from_test)"
            )
            log.info("embed.score=mlm takes %s: %s", surprise_phrase(how, measure), why)
        self.chosen |= {"token_score": how, "token_surprise": measure, "token_score_validation": table}
        return (
            np.array([s.score(how, e.top_k, measure) for s in valid]),
            np.array([s.score(how, e.top_k, measure) for s in self.surprise]),
        )

    def fused(self, names, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """The components' tail scores, each calibrated on the normal validation documents, combined by `rule`; one
        component alone is its own values (any calibration keeps its order)."""
        if len(names) == 1:
            return self.values[names[0]]
        tails = []
        for name in names:
            valid, test = self.values[name]
            normal = valid[~self.valid_attack]
            tails.append((tail_scores(normal, valid), tail_scores(normal, test)))
        n = int((~self.valid_attack).sum())
        return combine([v for v, _ in tails], rule, n), combine([t for _, t in tails], rule, n)

    def final(self) -> tuple[np.ndarray, np.ndarray]:
        """The score of embed.score for (valid, test): one component, or the fusion of embed.fuse by
        embed.fuse_rule: the choice (one of them alone, or a combination by a rule) that separates validation
        attacks best, when there are some; all of them, without."""
        e = self.e
        if e.score != "fused":
            return self.values[e.score]
        rules = FUSE_RULES if e.fuse_rule == "auto" else (e.fuse_rule,)
        # one score alone needs no rule: weighed once, first (a tie goes to the simpler choice)
        choices = {name: ((name,), rules[0]) for name in self.needed} if len(self.needed) > 1 else {}
        choices |= {
            f"{'+'.join(names)} by {rule}": (names, rule)
            for n in range(2, len(self.needed) + 1)
            for names in itertools.combinations(self.needed, n)
            for rule in rules
        }
        table = {}
        if self.valid_attack.any():
            for label, (names, rule) in choices.items():
                valid = self.fused(names, rule)[0]
                table[label] = separation(valid[~self.valid_attack], valid[self.valid_attack], e.max_fpr)
        best = best_of(table)
        names, rule = choices[best] if best else (tuple(self.needed), rules[0])
        if len(choices) > 1:
            why = (
                f"best on validation: {separations(table)}" if table else "no validation attacks to choose by"
            )
            log.info("embed.score=fused: %s (%s)", fused_choice(names, rule), why)
        self.chosen |= {"fuse_validation": table}
        self.fuse, self.fuse_rule = list(names), (rule if len(names) > 1 else None)
        return self.fused(names, rule)


def calibrations(scores: Scores, valid: np.ndarray, test: np.ndarray, max_fpr: float) -> dict:
    """The test result at the threshold from normal validation documents (deployable) and at the one from the normal
    test documents themselves (what the literature reports)."""
    attack = scores.test_attack
    deployable = evaluate_detector(test, attack, threshold_for(valid[~scores.valid_attack], max_fpr))
    literature = (
        evaluate_detector(test, attack, threshold_for(test[~attack], max_fpr)) if (~attack).any() else {}
    )
    literature.pop("roc_curve", None)
    return {"deployable": deployable, "test_calibrated": literature}


def run(cfg: RunConfig) -> dict:
    """Score validation and test documents, threshold on normal validation ones, report on test."""
    e = cfg.embed
    device = start(cfg).device
    skipped: Counter = Counter()
    scores = Scores(cfg, lambda: anomaly_splits(cfg, skipped), device)
    valid, test = scores.final()
    cal = calibrations(scores, valid, test, e.max_fpr)
    result = dict(cal["deployable"])
    result |= {
        "score": e.score,
        "fuse": scores.fuse,
        "fuse_rule": scores.fuse_rule,
        "unscored": scores.not_scored,
        "calibrations": {
            name: {k: r.get(k) for k in ("recall_at_max_fpr", "test_fpr", "threshold")}
            for name, r in cal.items()
        },
        "components": _components(scores, e.max_fpr),
        "max_fpr": e.max_fpr,
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
    if group.rank() == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_report(scores, test, result, out)
        write_scores(scores, valid, test, out / "anomaly_scores.csv")
        (out / "anomaly.json").write_text(json.dumps(result, indent=1))
        if "auroc" in result:
            plot_roc(result, e.max_fpr, out / "plots" / "roc.png")
        lit = result["calibrations"]["test_calibrated"]
        log.info(
            "anomaly detection (%s): recall %.4f at max FPR %g from normal validation data (test FPR %.4f); "
            "recall %.4f with the threshold set on the normal test data; AUROC %s -> %s",
            e.score,
            result["recall_at_max_fpr"] or 0.0,
            e.max_fpr,
            result["test_fpr"] or 0.0,
            lit.get("recall_at_max_fpr") or 0.0,
            f"{result['auroc']:.4f}" if "auroc" in result else "n/a",
            out / "anomaly.json",
        )
    group.barrier()
    return result


def _components(scores: Scores, max_fpr: float) -> dict:
    """Each component's own test result (both calibrations) and validation separation, beside the fused score."""
    if scores.e.score != "fused":
        return {}
    out = {}
    for name, (valid, test) in scores.values.items():
        cal = calibrations(scores, valid, test, max_fpr)
        out[name] = {
            "auroc": cal["deployable"].get("auroc"),
            "recall_at_max_fpr": cal["deployable"]["recall_at_max_fpr"],
            "test_fpr": cal["deployable"]["test_fpr"],
            "recall_test_calibrated": cal["test_calibrated"].get("recall_at_max_fpr"),
        }
        if scores.valid_attack.any():
            out[name]["validation"] = separation(
                valid[~scores.valid_attack], valid[scores.valid_attack], max_fpr
            )
    return out


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


def write_report(scores: Scores, test: np.ndarray, result: dict, out: Path) -> None:
    """anomaly_report.jsonl: every flagged test document, highest score first, with why (its most surprising tokens
    when MLM surprise was computed, its novel character spans); anomaly_report.md: the top embed.report_top."""
    e = scores.e
    flagged = np.flatnonzero(test > result["threshold"])
    flagged = flagged[np.argsort(-test[flagged], kind="stable")]
    findings = []
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
                scores.tokenizer,
                e.top_k,
                scores.chosen["token_surprise"],
                novel_only=scores.chosen["token_score"] == "novel",
            )
        findings.append(finding)
    with (out / "anomaly_report.jsonl").open("w") as f:
        for finding in findings:
            f.write(json.dumps(finding) + "\n")
    (out / "anomaly_report.md").write_text(report_markdown(scores, findings, result))


def write_scores(scores: Scores, valid: np.ndarray, test: np.ndarray, path: Path) -> None:
    """anomaly_scores.csv: every validation and test document's score and components (raw, before calibration), to
    set another threshold or try another fusion without scoring again."""
    names = list(scores.values)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "id", "label", "score", *names])
        for split, docs, final, at in (("valid", scores.valid, valid, 0), ("test", scores.test, test, 1)):
            for i, doc in enumerate(docs):
                parts = [repr(float(scores.values[n][at][i])) for n in names]  # exact: ties at the threshold
                out.writerow([split, doc.id, doc.label, repr(float(final[i])), *parts])


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _cell(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def report_markdown(scores: Scores, findings: list[dict], result: dict) -> str:
    e = scores.e
    cal = result["calibrations"]
    attacks = sum(f["label"] != e.normal_label for f in findings)
    lines = [
        f"# Anomaly report: {result['model']}",
        "",
        f"Score: **{e.score}**"
        + (f" ({fused_choice(result['fuse'], result['fuse_rule'])})" if result["fuse"] else "")
        + (
            f"; MLM surprise: {surprise_phrase(result['token_score'], result['token_surprise'])}"
            if result.get("token_surprise")
            else ""
        )
        + f"; {result['test']} test documents, AUROC {_number(result.get('auroc'))}.",
        "",
        "| threshold set on | threshold | recall | test FPR |",
        "|---|---|---|---|",
    ]
    for name, where in (("deployable", "normal validation data"), ("test_calibrated", "normal test data")):
        r = cal[name]
        if r.get("threshold") is not None:
            lines.append(
                f"| {where} | {r['threshold']:.4g} | {_number(r['recall_at_max_fpr'])} | {_number(r['test_fpr'])} |"
            )
    lines += [
        "",
        f"{len(findings)} test documents are flagged at the deployable threshold ({attacks} labelled attacks, "
        f"{len(findings) - attacks} normal). The top {min(e.report_top, len(findings))}, highest score first "
        "(every one is in anomaly_report.jsonl):",
        "",
        "| # | score | label | document | first line | most surprising tokens | novel spans |",
        "|---|---|---|---|---|---|---|",
    ]
    by_id = {d.id: d for d in scores.test}
    for n, f in enumerate(findings[: e.report_top], 1):
        first = by_id[f["id"]].text.split("\n", 1)[0]
        tokens = ", ".join(f"`{_cell(t, 20)}` {v:.1f}" for t, v in f.get("surprising_tokens", []))
        spans = ", ".join(f"`{_cell(s, 24)}`" for s in f["novel_spans"])
        lines.append(
            f"| {n} | {f['score']:.3f} | {f['label']} | {_cell(f['id'].rsplit('/', 1)[-1], 60)} | {_cell(first)} | {tokens or '-'} | "
            f"{spans or '-'} |"
        )
    return "\n".join(lines) + "\n"


def plot_roc(result: dict, max_fpr: float, path: Path) -> None:
    """The ROC curve with both operating points: the threshold from normal validation data and from normal test
    data."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot(
        result["roc_curve"]["fpr"],
        result["roc_curve"]["tpr"],
        label=f"{result['score']}: AUROC {result['auroc']:.3f}",
    )
    ax.axvline(max_fpr, color="grey", linestyle="--", linewidth=0.8, label=f"max FPR {max_fpr:g}")
    for name, marker, where in (
        ("deployable", "o", "normal validation"),
        ("test_calibrated", "s", "normal test"),
    ):
        r = result["calibrations"][name]
        if r.get("recall_at_max_fpr") is not None:
            ax.plot(
                r["test_fpr"],
                r["recall_at_max_fpr"],
                marker,
                markersize=7,
                label=f"threshold from {where}: recall {r['recall_at_max_fpr']:.3f} at FPR {r['test_fpr']:.3f}",
            )
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set_xlabel("false-positive rate (normal test data)")
    ax.set_ylabel("recall (attacks)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save(fig, path)
