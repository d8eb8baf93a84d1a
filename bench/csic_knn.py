"""How many normal requests the embedding scores are fitted on, and from where, with knn's k: issue 33's ideas for
the model's own CSIC scores, judged on validation only. The encoder is the bench's best model-only run: the +DAPT
encoder with capitals marked at scoring (bench/dapt_value.py, stage csic_adapted_marked_model).

    python bench/csic_knn.py      # after bench/dapt_value.py (its csic_dapt/final); about 20 minutes on 2 cores

Fitted on:
- the bench's 1,200 normal training requests (embed.sample=1200, as launch/anomaly.py draws them);
- those and 4,800 more normal training requests (6,000: what a larger embed.sample would fit on);
- 4,800 normal requests of the test files' test side that the bench never scores ("the test traffic's normal side":
  neither validation nor among the 1,200 sampled test requests), the reference a site would take from its own traffic.

For each: knn at k = 5, 1, 10, and Mahalanobis; then launch/anomaly.py's own choice of the fusion (mahalanobis, knn
at the k chosen on validation, mlm: the committed MLM surprise column, which no fit changes) on validation, and that
choice's test figures, read after it. Validation: recall at 5% FPR / partial AUROC up to 5% / AUROC
(runtime.fusion.separation). The split and documents are the bench's (rebuilt by dapt's own functions, the
validation and test ids and labels checked against the committed scores). Writes bench/results/csic_knn.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import RESULTS, ROOT, machine, unscored_test_normals, write_result

SCORES = RESULTS / "dapt_value_csic" / "marked_at_scoring_model_anomaly_scores.csv"
KS = [5, 1, 10]
MORE = 4800


def short(doc_id: str) -> str:
    return doc_id.split("shared/data/")[-1]


def measure(model: str) -> dict:
    import torch

    from dapt.cli.load import load_config
    from dapt.data.embedding import embed_documents, load_encoder
    from dapt.runtime.detectors import Mahalanobis, NearestNormal
    from dapt.runtime.fusion import choose_fusion, fuse, separation
    from dapt.tasks.anomaly import anomaly_splits, choose_knn, read_documents, sample

    args = [
        "--recipe=recipes/http_anomaly.yaml",
        "--embed.score=fused",
        "--embed.valid_from_test=0.2",
        "--embed.sample=1200",
        f"--model.name_or_path={model}",
        "--model.mark_capitals=true",
        "--embed.fuse=[mahalanobis, knn, mlm]",
    ]
    cfg = load_config(args, prog="launch/anomaly.py")
    e = cfg.embed
    docs = read_documents(cfg, anomaly_splits(cfg, Counter()))
    committed = {r["id"]: r for r in csv.DictReader(SCORES.open())}
    for split, part in (("valid", docs.valid), ("test", docs.test)):
        if {short(d.id): d.label for d in part} != {
            i: r["label"] for i, r in committed.items() if r["split"] == split
        }:
            raise SystemExit(f"the {split} requests or labels differ from {SCORES}'s: not the bench's split")
    fitted = {short(d.id) for d in docs.fit_docs}
    more = sample([d for d in docs.normal_train if short(d.id) not in fitted], MORE, cfg.seed + 1)
    test_side = unscored_test_normals(cfg, {d.id for d in docs.valid + docs.test})
    print(f"[csic_knn] {len(test_side)} unscored normal test-side requests; {MORE} drawn", flush=True)
    encoder, tokenizer = load_encoder(cfg, torch.device("cpu"))

    def embed(part):
        started = time.time()
        with torch.no_grad():
            out = embed_documents(
                encoder,
                tokenizer,
                part,
                cfg.data.max_seq_length,
                cfg.train.micro_batch_size,
                e.pooling,
                torch.device("cpu"),
            )
        print(f"[csic_knn] {len(part)} requests embedded in {time.time() - started:.0f} s", flush=True)
        return out

    valid, test, bench_fit = embed(docs.valid), embed(docs.test), embed(docs.fit_docs)
    fits = {
        "the bench's 1,200 normal training requests": bench_fit,
        f"those and {MORE:,} more (6,000)": np.r_[bench_fit, embed(more)],
        f"{MORE:,} unscored normal test-side requests": embed(sample(test_side, MORE, cfg.seed)),
    }
    va, ta = docs.valid_attack, docs.test_attack
    mlm = tuple(
        np.array([float(committed[short(d.id)]["mlm"]) for d in part]) for part in (docs.valid, docs.test)
    )
    out = {}
    for name, fit in fits.items():
        row = {"fitted": len(fit)}
        for k in KS:
            s = NearestNormal(k).fit(fit).score(valid)
            row[f"knn k={k}"] = separation(s[~va], s[va], e.max_fpr)
        maha = Mahalanobis(e.shrinkage).fit(fit)
        s = maha.score(valid)
        row["mahalanobis"] = separation(s[~va], s[va], e.max_fpr)
        knn, _ = choose_knn(fit, valid, va, KS, e.max_fpr)
        values = {
            "mahalanobis": (maha.score(valid), maha.score(test)),
            "knn": (knn.score(valid), knn.score(test)),
            "mlm": mlm,
        }
        names, rule, table = choose_fusion(values, va, e.fuse_rule, e.max_fpr)
        v, t = fuse(values, names, rule, va)
        chosen = f"{'+'.join(names)} by {rule}" if rule else names[0]
        row["fused"] = {
            "knn_k": knn.k,
            "chosen": chosen,
            "validation": table[chosen],
            "test (read after the choice)": separation(t[~ta], t[ta], e.max_fpr),
        }
        out[name] = row
        print(f"[csic_knn] {name}: knn k={knn.k}, fused {chosen}", flush=True)
    return out


def markdown(r: dict) -> str:
    def three(c):
        return f"{c['recall_at_max_fpr']:.3f} / {c['partial_auroc']:.3f} / {c['auroc']:.3f}"

    rows = r["validation"]
    scores = [k for k in next(iter(rows.values())) if k not in ("fitted", "fused")]
    lines = [
        "# What the model's own CSIC scores are fitted on, and knn's k (bench/csic_knn.py)",
        "",
        f"Machine: {r['machine']['cpu']} ({r['machine']['cores']} cores), {r['minutes']} min. Encoder: the +DAPT "
        "final/ with capitals marked at scoring (bench/dapt_value.py). Validation: recall at 5% FPR / partial AUROC "
        "up to 5% / AUROC on the bench's 1,200 validation requests.",
        "",
        "| fitted on | " + " | ".join(scores) + " |",
        "|---|" + "---|" * len(scores),
    ]
    lines += [f"| {name} | " + " | ".join(three(row[s]) for s in scores) + " |" for name, row in rows.items()]
    lines += [
        "",
        "launch/anomaly.py's choice on validation (knn's k, then the fusion of mahalanobis, knn and the committed mlm "
        "column), and that choice on the test requests, read after it:",
        "",
        "| fitted on | knn k | fusion chosen | validation | test: recall at exactly 5% / partial AUROC / AUROC |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        f = row["fused"]
        lines.append(
            f"| {name} | {f['knn_k']} | {f['chosen']} | {three(f['validation'])} | "
            f"{three(f['test (read after the choice)'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "dapt_value", help="bench/dapt_value.py's --work"
    )
    a = ap.parse_args()
    os.chdir(ROOT)  # the recipe names ../shared/data relative to the repository
    started = time.time()
    result = {
        "bench": "csic_knn",
        "machine": machine(),
        "encoder": "runs/dapt_value/csic_dapt/final, model.mark_capitals=true",
        "validation": measure(str(a.work / "csic_dapt" / "final")),
    }
    result["minutes"] = round((time.time() - started) / 60, 1)
    path = write_result("csic_knn", result)
    path.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
