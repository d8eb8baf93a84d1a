"""Which CSIC attacks the anomaly scores miss, from the scores bench/dapt_value.py committed (no model is run).

    python bench/csic_misses.py     # reads bench/results/dapt_value_csic/*_scores.csv and ../shared/data/csic2010

An attack is "a tampered parameter name" when one of its query or body parameter names was never seen in the normal
training requests and is a seen name with one upper-case letter appended (`nombreA=` where `nombre=` is normal; which
letters were appended is counted). Per split (validation, where choices may be made, and test), each score's misses
at that split's own 5% threshold (runtime.calibration.threshold_for's quantile: at most 5% of the split's normal
requests above it, as anomaly.json's test-calibrated figures) are counted by kind: the model's own scores fused (adapted_model), character 3-grams
and the recipe's fusion. Writes bench/results/csic_misses.json and .md.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from common import RESULTS, ROOT, http_line_and_body, machine, write_result

from dapt.data.formats import FormatOptions, read_http
from dapt.data.sources import Position
from dapt.runtime.calibration import threshold_for

SHARED = ROOT.parent / "shared" / "data"
SCORES = RESULTS / "dapt_value_csic"
MAX_FPR = 0.05


def requests(name: str) -> dict[str, str]:
    """Every request of one CSIC file, by the id the scores carry (file:line, relative to shared/data)."""
    path = SHARED / "csic2010" / name
    return {
        doc.id.replace(f"{path}:", f"csic2010/{name}:"): doc.text
        for doc, _ in read_http(str(path), Position(), FormatOptions())
        if hasattr(doc, "text")
    }


def parameter_names(request: str) -> list[str]:
    """The query's and the form body's parameter names (the body: the text after the first blank line)."""
    line, body = http_line_and_body(request)
    parts = line.split(" ")
    query = urlsplit(parts[1]).query if len(parts) > 1 else ""
    pairs = parse_qsl(query, keep_blank_values=True) + parse_qsl(body.strip(), keep_blank_values=True)
    return [name for name, _ in pairs]


def appended(request: str, known: set[str]) -> list[str]:
    """The upper-case letters appended to known parameter names in this request."""
    names = parameter_names(request)
    return [n[-1] for n in names if len(n) > 1 and n not in known and n[:-1] in known and n[-1].isupper()]


def misses(rows: list[dict], column: str) -> set[str]:
    normal = np.array([float(r[column]) for r in rows if r["label"] == "normal"])
    threshold = threshold_for(normal, MAX_FPR)
    return {r["id"] for r in rows if r["label"] != "normal" and float(r[column]) <= threshold}


def main() -> int:
    if not SHARED.is_dir():
        raise SystemExit(f"this analysis reads the CSIC requests from {SHARED}, which is absent")
    known = {n for text in requests("normalTrafficTraining.txt.gz").values() for n in parameter_names(text)}
    texts = {**requests("normalTrafficTest.txt.gz"), **requests("anomalousTrafficTest.txt.gz")}
    table = {
        name: list(csv.DictReader((SCORES / f"{name}_anomaly_scores.csv").open()))
        for name in ("adapted", "adapted_model")
    }
    result = {
        "bench": "csic_misses",
        "machine": machine(),
        "known_parameter_names": len(known),
        "max_fpr": MAX_FPR,
    }
    for split in ("valid", "test"):
        rows = {name: [r for r in t if r["split"] == split] for name, t in table.items()}
        letters = {r["id"]: appended(texts[r["id"]], known) for r in rows["adapted"]}
        attacks = [r["id"] for r in rows["adapted"] if r["label"] != "normal"]
        kinds = {i: "tampered name" if letters[i] else "other" for i in attacks}
        normal_tampered = sum(bool(letters[r["id"]]) for r in rows["adapted"] if r["label"] == "normal")
        missed = {
            "model scores fused": misses(rows["adapted_model"], "score"),
            "character 3-grams": misses(rows["adapted"], "lexical"),
            "every score fused (the recipe)": misses(rows["adapted"], "score"),
        }
        result[split] = {
            "attacks": {k: sum(v == k for v in kinds.values()) for k in ("tampered name", "other")},
            "normal_with_a_tampered_name": normal_tampered,
            "appended_letters": dict(Counter(c for i in attacks for c in letters[i])),
            "missed": {
                score: {k: sum(kinds[i] == k for i in ids) for k in ("tampered name", "other")}
                for score, ids in missed.items()
            },
        }
    path = write_result("csic_misses", result)
    path.with_suffix(".md").write_text(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Which CSIC attacks the scores miss (bench/csic_misses.py)",
        "",
        f"From bench/results/dapt_value_csic's scores (the adapted encoder); each split's own {r['max_fpr']:.0%} "
        f"threshold. A tampered name: a parameter name unseen in normal training traffic that is one of its "
        f"{r['known_parameter_names']} known names with an upper-case letter appended.",
    ]
    for split, label in (("valid", "validation"), ("test", "test")):
        s = r[split]
        a = s["attacks"]
        lines += [
            "",
            f"## {label}: {a['tampered name']} attacks with a tampered name, {a['other']} other "
            f"({s['normal_with_a_tampered_name']} normal requests with one)",
            "",
            "| score | missed, tampered name | missed, other | recall, tampered name | recall, other |",
            "|---|---|---|---|---|",
        ]
        for score, m in s["missed"].items():
            lines.append(
                f"| {score} | {m['tampered name']} | {m['other']} | "
                f"{1 - m['tampered name'] / max(a['tampered name'], 1):.2f} | {1 - m['other'] / max(a['other'], 1):.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
