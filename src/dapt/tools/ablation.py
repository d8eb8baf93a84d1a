"""Base -> +DAPT -> +DAPT+TAPT in one command, each checkpoint evaluated by the same protocol (seed 001).

Every stage is an ordinary dapt run (launch/mlm.py or launch/classify.py / launch/anomaly.py) configured from its
recipe, with the model it starts from and its output folder set here; stage folders sit under output_dir:
dapt/, tapt/, eval_base/, eval_dapt/, eval_dapt_tapt/ (eval_base_mlm/, ... with ablation.score=mlm). A stage whose final/ or result file exists is not run again, so
rerunning the command after a crash continues (and each run resumes from its own checkpoints).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dapt.cli.load import load_config
from dapt.config.schema import RunConfig
from dapt.data.embedding import NoMLMHead
from dapt.runtime import group

log = logging.getLogger("dapt")

METRICS = {
    "classify": ["accuracy", "macro_f1", "weighted_f1", "roc_auc"],
    "anomaly": ["recall_at_max_fpr", "test_fpr", "recall_test_calibrated", "auroc"],
}


def _stage_config(recipe: str, extra: list[str], overrides: list[str]) -> RunConfig:
    return load_config(["--recipe", recipe, *extra, *overrides])


def _mlm(recipe: str, start: str, out: Path, overrides: list[str]) -> str:
    from dapt.tasks.mlm import run

    final = out / "final"
    if not (final / "config.json").exists():
        log.info("ablation: MLM stage %s from %s", out.name, start)
        run(_stage_config(recipe, ["--model.name_or_path", start, "--output_dir", str(out)], overrides))
    return str(final)


def _evaluate(a, model: str, out: Path, overrides: list[str]) -> dict:
    from dapt.tasks.anomaly import run as run_anomaly
    from dapt.tasks.classify import run as classify

    if _result(out, a.protocol) is None:
        log.info("ablation: evaluating %s (%s)", model, a.protocol)
        score = ["--embed.score", a.score] if a.protocol == "anomaly" and a.score else []
        cfg = _stage_config(
            a.eval_recipe, ["--model.name_or_path", model, "--output_dir", str(out), *score], overrides
        )
        try:
            (classify if a.protocol == "classify" else run_anomaly)(cfg)
        except NoMLMHead as e:  # the base encoder, usually: the row says why it has no numbers
            log.warning("ablation: %s is not scored: %s", model, e)
            if group.rank() == 0:
                out.mkdir(parents=True, exist_ok=True)
                (out / "anomaly.json").write_text(json.dumps({"not_scored": str(e)}))
    group.barrier()
    return _result(out, a.protocol)


def _eval_folder(row: str, a) -> str:
    """eval_base, eval_dapt, eval_dapt_tapt; with ablation.score, eval_base_mlm etc., so a rerun by another score
    does not reuse the first one's results."""
    name = "eval_" + row.strip("+").replace("+", "_").lower()
    return f"{name}_{a.score}" if a.protocol == "anomaly" and a.score else name


def _result(out: Path, protocol: str) -> dict | None:
    """What an evaluation left in `out`: the anomaly result; for classifiers the mean over classify.seeds, else the
    test set, else the best validation result. None: not run yet."""
    if protocol == "anomaly":
        path = out / "anomaly.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        literature = result.get("calibrations", {}).get("test_calibrated", {})
        return result | {"recall_test_calibrated": literature.get("recall_at_max_fpr")}
    if (out / "seeds_summary.json").exists():
        summary = json.loads((out / "seeds_summary.json").read_text())
        return {k: v["mean"] for k, v in summary[summary.get("split", "test")].items()}
    for name in ("eval_test.json", "eval_valid.json"):
        if (out / name).exists() and (out / "summary.json").exists():  # summary.json: the run finished
            return json.loads((out / name).read_text())
    return None


def run(cfg: RunConfig) -> dict:
    a, out = cfg.ablation, Path(cfg.output_dir)  # its base and recipes: checked by RunConfig.problems
    group.init()
    rows = {"base": a.base}
    rows["+DAPT"] = _mlm(a.dapt_recipe, a.base, out / "dapt", a.overrides)
    if a.tapt_recipe:
        rows["+DAPT+TAPT"] = _mlm(a.tapt_recipe, rows["+DAPT"], out / "tapt", a.overrides)
    results = {
        name: _evaluate(a, model, out / _eval_folder(name, a), a.overrides) for name, model in rows.items()
    }
    table = ablation_table(results, METRICS[a.protocol])
    stem = "ablation" + _eval_folder("", a).removeprefix("eval_")  # ablation.md, ablation_mlm.md, ...
    keep = [*METRICS[a.protocol], "score", "not_scored"]
    if group.rank() == 0:
        (out / f"{stem}.md").write_text(table)
        (out / f"{stem}.json").write_text(
            json.dumps(
                {
                    "models": rows,
                    "results": {k: {m: v.get(m) for m in keep if m in v} for k, v in results.items()},
                },
                indent=1,
            )
        )
        log.info("ablation:\n%s", table)
    return {"models": rows, "results": results}


def ablation_table(results: dict[str, dict], metrics: list[str]) -> str:
    shown = [m for m in metrics if any(r.get(m) is not None for r in results.values())]
    lines = ["| model | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for name, r in results.items():
        cells = [f"{r[m]:.4f}" if isinstance(r.get(m), float) else "n/a" for m in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [f"\n{name}: not scored: {r['not_scored']}" for name, r in results.items() if "not_scored" in r]
    return "\n".join(lines) + "\n"
