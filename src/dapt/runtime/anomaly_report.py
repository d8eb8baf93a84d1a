"""What launch/anomaly.py writes besides anomaly.json: anomaly_report.jsonl (every test document flagged at the
deployable threshold, with why), anomaly_report.md (the top embed.report_top of them, and both calibrations),
anomaly_scores.csv (every validation and test score, raw) and plots/roc.png (the ROC curve, both operating points).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from dapt.config.schema import EmbedConfig
from dapt.runtime.fusion import fused_choice
from dapt.runtime.plots import pyplot, save

log = logging.getLogger("dapt")


def surprise_phrase(how: str, measure: str) -> str:
    """embed.token_score and token_surprise in words, for the log and the report."""
    if how == "novel":
        return f"each token's {measure} surprise summed over the tokens in novel n-grams, per masked token"
    return f"the {how} of each token's {measure} surprise"


def write_report(findings: list[dict], test_docs: list, result: dict, e: EmbedConfig, out: Path) -> None:
    """anomaly_report.jsonl: every finding (a flagged test document, highest score first, with why); anomaly_report.md:
    the top embed.report_top."""
    with (out / "anomaly_report.jsonl").open("w") as f:
        for finding in findings:
            f.write(json.dumps(finding) + "\n")
    (out / "anomaly_report.md").write_text(report_markdown(findings, test_docs, result, e))


def write_scores(
    path: Path, docs: tuple[list, list], final: tuple[np.ndarray, np.ndarray], values: dict[str, tuple]
) -> None:
    """anomaly_scores.csv: every validation and test document's score and components (raw, before calibration), to
    set another threshold or try another fusion without scoring again. docs, final and each of values: (valid, test)."""
    names = list(values)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "id", "label", "score", *names])
        for at, split in enumerate(("valid", "test")):
            for i, doc in enumerate(docs[at]):
                parts = [repr(float(values[n][at][i])) for n in names]  # exact: ties at the threshold
                out.writerow([split, doc.id, doc.label, repr(float(final[at][i])), *parts])


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _cell(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def calibration_sentence(g: dict, max_fpr: float) -> str:
    """What the deployable threshold promises for new normal traffic, in words (calibration.guarantee's figures)."""
    low, high = g["fpr_interval_95"]
    head = (
        f"Deployable threshold (embed.calibration={g['method']}): {g['above_threshold']} of the "
        f"{g['normal_validation']} normal validation documents above it; "
    )
    if not g["enough"]:
        return head + (
            f"too few for its promise ({g['normal_needed']} needed), so the threshold is their maximum: the FPR on "
            f"new normal traffic lies in [{low:.4f}, {high:.4f}] with probability 0.95, and may exceed {max_fpr:g}."
        )
    promise = {
        "bound": f"the FPR on new normal traffic is at most {max_fpr:g} with probability at least "
        f"{g['p_fpr_at_most_max']:.3f} (asked: {g['confidence']:g})",
        "conformal": f"the expected FPR on new normal traffic is at most {g['expected_fpr']:.4f} (asked: {max_fpr:g})",
        "quantile": f"the expected FPR on new normal traffic is about {g['expected_fpr']:.4f}; it exceeds {max_fpr:g} "
        f"with probability about {1 - g['p_fpr_at_most_max']:.2f}",
    }[g["method"]]
    return head + (
        f"{promise}, for new traffic drawn as the validation documents were. With this many validation documents the "
        f"FPR on new normal traffic lies in [{low:.4f}, {high:.4f}] with probability 0.95."
    )


def report_markdown(findings: list[dict], test_docs: list, result: dict, e: EmbedConfig) -> str:
    """anomaly_report.md: the score, both calibrations and the top embed.report_top findings."""
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
    lines += ["", calibration_sentence(result["calibration"], result["max_fpr"])]
    lines += [
        "",
        f"{len(findings)} test documents are flagged at the deployable threshold ({attacks} labelled attacks, "
        f"{len(findings) - attacks} normal). The top {min(e.report_top, len(findings))}, highest score first "
        "(every one is in anomaly_report.jsonl):",
        "",
        "| # | score | label | document | first line | most surprising tokens | novel spans |",
        "|---|---|---|---|---|---|---|",
    ]
    by_id = {d.id: d for d in test_docs}
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


def log_result(result: dict, e: EmbedConfig, path: Path) -> None:
    """The run's result in one line: the deployable recall and FPR, the literature's recall, AUROC."""
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
        path,
    )
