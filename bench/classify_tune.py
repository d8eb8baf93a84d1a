"""Choosing bench/classify_value.py's CPU budget on validation only: one seed of each candidate fine-tuning, its
validation curve recorded, the test set never given to the run (--data.test=[]).

    pip install -e ".[bench]"
    python bench/classify_tune.py                     # every task's candidates (about 1 hour on 2 cores)
    python bench/classify_tune.py --tasks dga         # one task

Each candidate is bench/classify_value.py's base-encoder command for the task with the changes it names, seed 42,
validation enlarged to --valid documents (a hashed share of the training data, as the recipe chooses it) and evaluated
every --eval-every steps, so one run shows what more steps would buy. What is tried and why:
- nsl_kdd_categories: the step budget (100 -> --kdd-steps), and classify.class_weights=sqrt_inverse against the
  rare r2l and u2r rows (inverse weights would put u2r 1,500x above normal).
- dga: the step budget (200 -> --dga-steps): 200 steps of 64 names see 15% of one epoch; at that budget, the names
  read character by character (the base's weights, its tokenizer splitting every character before WordPiece:
  common.characters_copy), and +DAPT (bench/classify_value.py's MLM stage on the andrewaeva domain lists, 100 steps).
Candidates that have run are kept in the results: a run of some (--candidates) replaces only theirs.
Devign is left out at this budget: 100 steps from the base stayed at the chance loss (0.69), and a code model at
512 tokens (the recipe, on a GPU) is the lever, not a CPU sweep. Writes bench/results/classify_tune.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from classify_value import adapted, plan
from common import (
    RESULTS,
    ROOT,
    Stages,
    characters_copy,
    commands_section,
    machine,
    minilm_tokenizer,
    write_result,
)

TASKS = ["nsl_kdd_categories", "dga"]


def candidates(a) -> dict[str, dict[str, tuple[list[str], str, str]]]:
    """Per task: candidate name -> (arguments over the base command, why it is tried, the encoder: base, characters
    (the base reading each character) or an MLM row of bench/classify_value.py's plan, +DAPT)."""
    kdd, dga = a.kdd_steps, a.dga_steps
    return {
        "nsl_kdd_categories": {
            f"{kdd} steps": (
                [f"--train.max_steps={kdd}"],
                "the committed 100 steps saw 1,600 of 125,973 rows",
                "base",
            ),
            f"{kdd} steps, sqrt_inverse": (
                [f"--train.max_steps={kdd}", "--classify.class_weights=sqrt_inverse"],
                "r2l and u2r are 0.8% and 0.04% of the training rows",
                "base",
            ),
        },
        "dga": {
            f"{dga} steps": (
                [f"--train.max_steps={dga}"],
                "the committed 200 steps saw 15% of one epoch",
                "base",
            ),
            f"{dga} steps, characters": (
                [f"--train.max_steps={dga}"],
                "WordPiece reads a random name as a few odd pieces (xjkq9wz: x ##jk ##q ##9 ##w ##z); the n-gram "
                "baseline reads characters",
                "characters",
            ),
            f"{dga} steps, +DAPT": (
                [f"--train.max_steps={dga}"],
                "+DAPT gained 0.005 at 200 steps (classify_value.md): does it hold at the chosen budget?",
                "+DAPT",
            ),
        },
    }


def encoder(kind: str, task: str, stages: Stages, work: Path, budget) -> str:
    """The folder of a candidate's encoder (see candidates)."""
    base = minilm_tokenizer()
    if kind == "base":
        return base
    if kind == "characters":
        return characters_copy(base, work / "minilm_chars")
    return adapted(task, plan(task, work, budget), stages, budget, until=kind)[kind]


def kept(result: dict) -> dict:
    """`result` with the committed results' candidates that this run did not run (their commands and minutes too)."""
    path = Path(os.environ.get("DAPT_BENCH_RESULTS") or RESULTS) / "classify_tune.json"
    if not path.exists():
        return result
    old = json.loads(path.read_text())
    for task, rows in old["tasks"].items():
        result["tasks"][task] = {**rows, **result["tasks"].get(task, {})}
    result["commands"] = {**old["commands"], **result["commands"]}
    result["minutes"] = {**old["minutes"], **result["minutes"]}
    return result


def selected(task: str, rows: dict, chosen: str) -> list[tuple[str, str, tuple]]:
    """(stage name, candidate name, candidate) of each candidate of `task` to run: those whose stage name (the task
    and the candidate's name in lower case, `_` between words: dga_1000_steps_characters) the comma-separated
    `chosen` lists; every one when it is empty."""
    names = {c.strip() for c in chosen.split(",") if c.strip()}
    staged = [
        (f"{task}_{re.sub(r'[^a-z0-9]+', '_', n.lower()).strip('_')}", n, row) for n, row in rows.items()
    ]
    return [x for x in staged if not names or x[0] in names]


def without(args: list[str], *keys: str) -> list[str]:
    return [x for x in args if not x.startswith(tuple(f"--{k}=" for k in keys))]


def curve(folder: Path, metric: str) -> dict:
    """The run's validation evaluations (step -> accuracy, macro-F1) and the best by the recipe's metric."""
    evals = [
        json.loads(line)
        for line in (folder / "metrics.jsonl").read_text().splitlines()
        if '"eval/accuracy"' in line
    ]
    points = {e["step"]: {"accuracy": e["eval/accuracy"], "macro_f1": e["eval/macro_f1"]} for e in evals}
    best = max(points, key=lambda s: points[s][metric])
    return {"validation": points, "best_step": best, "best": points[best]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "classify_tune", help="stage outputs (kept)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--kdd-steps", type=int, default=600, help="NSL-KDD candidates' steps (16 rows each)")
    ap.add_argument("--dga-steps", type=int, default=1000, help="DGA candidates' steps (64 names each)")
    ap.add_argument("--valid", type=int, default=3000, help="validation documents (data.valid_max_docs)")
    ap.add_argument("--eval-every", type=int, default=200, help="steps between validation evaluations")
    ap.add_argument(
        "--candidates",
        default="",
        help="comma-separated stage names of the candidates to run (dga_1000_steps_characters); empty: all",
    )
    a = ap.parse_args()
    # classify_value's CPU plan, as its own options would give it (the steps replaced per candidate)
    budget = argparse.Namespace(full=False, kdd_steps=100, dga_steps=200, devign_steps=100, mlm_steps=100)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if set(tasks) - set(TASKS):
        raise SystemExit(
            f"--tasks: {', '.join(sorted(set(tasks) - set(TASKS)))} unknown (tasks: {', '.join(TASKS)})"
        )
    known = {stage for task in tasks for stage, _, _ in selected(task, candidates(a)[task], "")}
    unknown = sorted({c.strip() for c in a.candidates.split(",") if c.strip()} - known)
    if unknown:  # else a misspelt name would run nothing and say nothing
        raise SystemExit(
            f"--candidates: {', '.join(unknown)} unknown (candidates: {', '.join(sorted(known))})"
        )
    stages = Stages(a.work, "classify_tune", minilm_tokenizer())
    started, results = time.time(), {}
    for task in tasks:
        p = plan(task, a.work, budget)
        common = without(
            p["classify"], "data.test", "data.valid_max_docs", "train.max_steps", "train.eval_every"
        )
        metric = "accuracy" if task == "dga" else "macro_f1"  # the recipes' classify.metric
        results[task] = {}
        for stage, name, (args, why, kind) in selected(task, candidates(a)[task], a.candidates):
            out = stages.run(
                stage,
                "classify.py",
                [
                    f"--recipe={p['recipe']}",
                    f"--model.name_or_path={encoder(kind, task, stages, a.work, budget)}",
                    *common,
                    "--data.test=[]",
                    f"--data.valid_max_docs={a.valid}",
                    f"--train.eval_every={a.eval_every}",
                    *args,
                ],
                "summary.json",  # written at the end (eval_valid.json: at each better evaluation)
            )
            results[task][name] = {"why": why, "arguments": args, "encoder": kind, **curve(out, metric)}
    result = {
        "bench": "classify_tune",
        "machine": machine(),
        "seed": 42,
        "valid_documents": a.valid,
        "candidates": a.candidates or "all",
        "minutes": {k: round(v / 60, 1) for k, v in stages.seconds.items()},
        "this_run_minutes": round((time.time() - started) / 60, 1),
        "commands": stages.commands,
        "tasks": results,
    }
    result = kept(
        json.loads(json.dumps(result))
    )  # steps as the JSON keeps them (strings), like the kept rows
    path = write_result("classify_tune", result)
    path.with_suffix(".md").write_text(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Choosing the classifiers' CPU budget on validation (bench/classify_tune.py)",
        "",
        f"Machine: {r['machine'].get('gpu') or r['machine']['cpu']} ({r['machine']['cores']} cores). Seed "
        f"{r['seed']}, all-MiniLM-L6-v2 (the candidate names another encoder where it starts elsewhere), up to {r['valid_documents']} validation documents (a hashed share "
        "of the training data); no test set was given to these runs.",
    ]
    for task, rows in r["tasks"].items():
        steps = sorted({s for row in rows.values() for s in row["validation"]}, key=int)
        lines += [
            "",
            f"## {task}: validation accuracy / macro-F1 by step",
            "",
            "| candidate | why | " + " | ".join(f"step {s}" for s in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for name, row in rows.items():
            cells = [
                f"{v['accuracy']:.3f} / {v['macro_f1']:.3f}" if (v := row["validation"].get(s)) else ""
                for s in steps
            ]
            lines.append(f"| {name} | {row['why']} | " + " | ".join(cells) + " |")
    made = [
        "",
        "`$WORK/minilm_chars` (the characters candidates): all-MiniLM-L6-v2 with its tokenizer splitting every character "
        "before WordPiece, made by the bench (bench/common.py, characters_copy). One candidate's rerun: `python "
        "bench/classify_tune.py --tasks dga --candidates dga_1000_steps_characters` (the others' rows are kept).",
    ]
    return "\n".join(lines + made + commands_section(r)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
