"""Other views of a CSIC request for the embedding scores, against the whole request as it is, measured on validation
only (issue 33's ideas): the request line and body alone (headers left out: "scores of the request's parts"), and
the whole request with each capital letter marked (`X` -> `^x`: an uncased tokenizer otherwise folds `idA=` into the
word `ida`, bench/csic_misses.py).

    python bench/csic_views.py      # after bench/dapt_value.py (its base and adapted encoders); --views to pick

The split, the 1,200 fit requests and the 1,200 validation requests are the bench's own (bench/dapt_value.py's
anomaly command, rebuilt here by dapt's own functions; its validation ids and labels checked against the committed
scores'; the encoder in --work is taken to be the one that made them); the whole-request figures are the committed
raw `knn` and `mahalanobis` columns of bench/results/dapt_value_csic/*_scores.csv. Recall at the validation 5%
threshold, partial AUROC up to 5% and AUROC (runtime.fusion.separation). Writes
bench/results/csic_views.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, http_line_and_body, machine, minilm_tokenizer, write_result

SCORES = RESULTS / "dapt_value_csic"


def line_and_body(doc):
    """The request line and the body (the text after the first blank line), without the headers."""
    line, body = http_line_and_body(doc.text)
    return replace(doc, text=(line + "\n" + body).strip())


def capitals_marked(doc):
    """The whole request with each capital letter written as ^ and its lower case (an uncased tokenizer keeps ^)."""
    return replace(doc, text=re.sub(r"[A-Z]", lambda m: "^" + m.group(0).lower(), doc.text))


VIEWS = {"request line + body": line_and_body, "capitals marked": capitals_marked}


def measure(model: str, scores_csv: Path, views: list[str]) -> dict:
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
    detectors = {
        "knn": lambda: NearestNormal(cfg.embed.knn_k[0]),  # the committed scores' k (5)
        "mahalanobis": lambda: Mahalanobis(cfg.embed.shrinkage),
    }
    out = {}
    for name in detectors:
        whole = np.array([float(committed[i][name]) for i in ids])
        out[name] = {"whole request": separation(whole[~attack], whole[attack], cfg.embed.max_fpr)}
    for view in views:
        with torch.no_grad():
            fit, valid = (
                embed_documents(
                    encoder,
                    tokenizer,
                    [VIEWS[view](d) for d in part],
                    cfg.data.max_seq_length,
                    cfg.train.micro_batch_size,
                    cfg.embed.pooling,
                    cpu,
                )
                for part in (docs.fit_docs, docs.valid)
            )
        for name, detector in detectors.items():
            scored = detector().fit(fit).score(valid)
            out[name][view] = separation(scored[~attack], scored[attack], cfg.embed.max_fpr)
        print(f"[csic_views] {model}: {view} done", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "dapt_value", help="bench/dapt_value.py's --work"
    )
    ap.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, of: {', '.join(VIEWS)}")
    a = ap.parse_args()
    views = [v.strip() for v in a.views.split(",") if v.strip()]
    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        raise SystemExit(f"--views: {', '.join(unknown)} unknown (views: {', '.join(VIEWS)})")
    os.chdir(ROOT)  # the recipe names ../shared/data relative to the repository
    started = time.time()
    encoders = {
        "base": (minilm_tokenizer(), "base"),
        "+DAPT": (str(a.work / "csic_dapt" / "final"), "adapted"),
    }
    result = {
        "bench": "csic_views",
        "machine": machine(),
        "validation": {
            row: measure(model, SCORES / f"{stem}_anomaly_scores.csv", views)
            for row, (model, stem) in encoders.items()
        },
    }
    result["minutes"] = round((time.time() - started) / 60, 1)
    path = write_result("csic_views", result)
    lines = [
        "# Other views of a CSIC request for the embedding scores (bench/csic_views.py)",
        "",
        "Validation only (the bench's 1,200 fit and 1,200 validation requests): recall at 5% FPR / partial AUROC / AUROC.",
        "",
        "| encoder | score | whole request | " + " | ".join(views) + " |",
        "|---|---|---|" + "---|" * len(views),
    ]
    for row, by_score in result["validation"].items():
        for score, cells in by_score.items():
            shown = [" / ".join(f"{v:.3f}" for v in c.values()) for c in cells.values()]
            lines.append(f"| {row} | {score} | {' | '.join(shown)} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
