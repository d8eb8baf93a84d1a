"""Full-scale estimates for the seed recipes: memory plan and training time on the GPUs the seeds name, offline.

For each recipe and set-up (1 x RTX 3090, 1 x A100 40 GB, 2 x g7e.48xlarge = 16 x RTX PRO 6000) this runs
launch/plan.py's planner from dapt's architecture table (no hub access): the recommended ZeRO stage and micro batch,
and the hours for the recipe's epochs from analytic FLOPs at an assumed MFU. These are estimates, not measurements;
seed 001's own report (13.5 h for 500M tokens on an RTX 3090) is printed beside the estimate for the same work.

    python bench/recipe_estimates.py          # writes bench/results/recipe_estimates.json and .md
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import machine, write_result  # noqa: E402

RECIPES = {  # recipe: (the hub model it starts from when the recipe starts from an earlier stage, runs: seeds)
    "secbert_http_mlm": (None, 1), "modernbert_dapt": (None, 1),
    "modernbert_tapt": ("answerdotai/ModernBERT-large", 1), "capec_severity": (None, 3),
    "vuln_classifier": (None, 3), "ids_distilbert": (None, 1), "canine_domains_mlm": (None, 1),
    "dga_classifier": ("google/canine-c", 1),
}
CLASSIFIERS = {"capec_severity", "vuln_classifier", "ids_distilbert", "dga_classifier"}  # a truncated row per text
SETUPS = {"1 x RTX 3090": ("RTX-3090", 1), "1 x A100 40GB": ("A100-40GB", 1), "2 x g7e.48xlarge": ("RTX-PRO-6000", 16)}


def plan(recipe: str, start: str | None, gpu: str, gpus: int, extra: list[str] = ()) -> dict:
    from dapt.load import load_config
    from dapt.plan import run_plan

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--recipe", f"recipes/{recipe}.yaml", f"--output_dir={tmp}", f"--plan.gpu={gpu}",
                f"--plan.gpus={gpus}", "--plan.measure=false", "--data.streams=16", *extra]
        if start:
            argv.append(f"--model.name_or_path={start}")
        return run_plan(load_config(argv, world_size=gpus, accelerator="cpu"))


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{max(hours * 60, 1):.0f} min" if hours * 60 >= 0.5 else "< 1 min"


def main() -> None:
    from dapt.dist import setup_logging

    os.chdir(ROOT)
    setup_logging("warning")
    rows = {}
    for recipe, (start, runs) in RECIPES.items():
        rows[recipe] = {}
        for name, (gpu, gpus) in SETUPS.items():
            r = plan(recipe, start, gpu, gpus, ["--data.packing=pad"] if recipe in CLASSIFIERS else [])
            c = r["recommendation"]
            rows[recipe][name] = {
                "hours": round(r["time"]["hours"] * runs, 3), "runs": runs, "tokens_per_epoch": r["time"]["tokens_per_epoch"],
                "epochs": r["time"]["epochs"], "fits": c is not None,
                "setup": c and f"ZeRO {c['stage']}, offload {c['offload']}, micro {c['micro_batch']}"
                               f"{', ckpt' if c['checkpointing'] else ''} ({c['total_gb']:.1f} GB)"}
    seed001 = plan("modernbert_dapt", None, "RTX-3090", 1, ["--plan.tokens=500000000"])["time"]["hours"]
    result = {"machine": machine(), "mfu_assumed": 0.35, "estimates": rows,
              "check_against_seed_001": {"work": "ModernBERT-large DAPT, 500M tokens at 8192, 1 x RTX 3090",
                                         "seed_reported_hours": 13.5, "estimated_hours": round(seed001, 2)}}
    lines = ["Estimated training time (analytic FLOPs at an assumed 35% MFU; 2 x g7e assumes perfect scaling over 16 "
             "GPUs; classifier seeds counted, early stopping not) and the planner's set-up (memory per GPU).", "",
             "| recipe | " + " | ".join(SETUPS) + " |", "|---|" + "---|" * len(SETUPS)]
    for recipe, by_setup in rows.items():
        cells = [f"{_duration(v['hours'])}: {v['setup']}" if v["fits"] else "does not fit" for v in by_setup.values()]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines += ["", f"Seed 001's report for ModernBERT-large DAPT on 500M tokens on one RTX 3090: 13.5 h; this "
              f"estimate for the same work: {seed001:.1f} h (assumed MFU 35%)."]
    (ROOT / "bench" / "results" / "recipe_estimates.md").write_text("\n".join(lines) + "\n")
    write_result("recipe_estimates", result)


if __name__ == "__main__":
    main()
