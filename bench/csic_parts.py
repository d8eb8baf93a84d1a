"""Scoring a CSIC request's parts: the embedding scores on the request line and body only (headers left out), against
the whole request, measured on validation only (issue 33's "scores of the request's parts").

    python bench/csic_parts.py      # after bench/dapt_value.py (its base and adapted encoders); a few minutes each

The split, the 1,200 fit requests and the 1,200 validation requests are the bench's own (bench/dapt_value.py's
anomaly command, rebuilt here by dapt's own functions; its validation ids and labels checked against the committed
scores'; the encoder in --work is taken to be the one that made them); the whole-request figures are the committed
raw `knn` and `mahalanobis` columns of bench/results/dapt_value_csic/*_scores.csv. Recall at the validation 5%
threshold, partial AUROC up to 5% and AUROC (runtime.fusion.separation). Writes
bench/results/csic_parts.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, machine, minilm_tokenizer, write_result

SCORES = RESULTS / "dapt_value_csic"


def line_and_body(doc):
    """The request line and the body (the text after the first blank line), without the headers."""
    line, _, rest = doc.text.partition("\n")
    body = rest.split("\n\n", 1)[1] if "\n\n" in rest else ""
    return replace(doc, text=(line + "\n" + body).strip())


def measure(model: str, scores_csv: Path) -> dict:
    import torch

    from dapt.cli.load import load_config
    from dapt.data.embedding import embed_documents, load_encoder
    from dapt.runtime.detectors import Mahalanobis, NearestNormal
    from dapt.runtime.fusion import separation
    from dapt.tasks.anomaly import anomaly_splits, read_documents

    cfg = load_config(
        [
            "--recipe=recipes/http_anomaly.yaml",
            "--embed.valid_from_test=0.2",
            "--embed.sample=1200",
            f"--model.name_or_path={model}",
            "--embed.score=knn",
        ],
        prog="launch/anomaly.py",
    )
    docs = read_documents(cfg, anomaly_splits(cfg, Counter()))
    committed = {r["id"]: r for r in csv.DictReader(scores_csv.open()) if r["split"] == "valid"}
    ids = [d.id.split("shared/data/")[-1] for d in docs.valid]
    labels = {i: d.label for i, d in zip(ids, docs.valid)}
    if labels != {i: r["label"] for i, r in committed.items()}:
        raise SystemExit(
            f"the validation requests or labels differ from {scores_csv}'s: not the bench's split"
        )
    attack, cpu = docs.valid_attack, torch.device("cpu")
    encoder, tokenizer = load_encoder(cfg, cpu)
    out = {}
    with torch.no_grad():
        fit, valid = (
            embed_documents(
                encoder,
                tokenizer,
                [line_and_body(d) for d in part],
                cfg.data.max_seq_length,
                cfg.train.micro_batch_size,
                cfg.embed.pooling,
                cpu,
            )
            for part in (docs.fit_docs, docs.valid)
        )
    for name, detector in (
        ("knn", NearestNormal(cfg.embed.knn_k)),
        ("mahalanobis", Mahalanobis(cfg.embed.shrinkage)),
    ):
        parts = detector.fit(fit).score(valid)
        whole = np.array([float(committed[i][name]) for i in ids])
        out[name] = {
            "whole request": separation(whole[~attack], whole[attack], cfg.embed.max_fpr),
            "request line + body": separation(parts[~attack], parts[attack], cfg.embed.max_fpr),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "dapt_value", help="bench/dapt_value.py's --work"
    )
    a = ap.parse_args()
    os.chdir(ROOT)  # the recipe names ../shared/data relative to the repository
    started = time.time()
    encoders = {
        "base": (minilm_tokenizer(), "base"),
        "+DAPT": (str(a.work / "csic_dapt" / "final"), "adapted"),
    }
    result = {
        "bench": "csic_parts",
        "machine": machine(),
        "validation": {
            row: measure(model, SCORES / f"{stem}_anomaly_scores.csv")
            for row, (model, stem) in encoders.items()
        },
    }
    result["minutes"] = round((time.time() - started) / 60, 1)
    path = write_result("csic_parts", result)
    lines = [
        "# Scoring a CSIC request's parts (bench/csic_parts.py)",
        "",
        "Validation only (the bench's 1,200 fit and 1,200 validation requests): recall at 5% FPR / partial AUROC / AUROC.",
        "",
        "| encoder | score | whole request | request line + body |",
        "|---|---|---|---|",
    ]
    for row, by_score in result["validation"].items():
        for score, cells in by_score.items():
            shown = [" / ".join(f"{v:.3f}" for v in c.values()) for c in cells.values()]
            lines.append(f"| {row} | {score} | {' | '.join(shown)} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
