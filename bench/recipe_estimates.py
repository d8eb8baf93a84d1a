"""Full-scale estimates for the seed recipes: memory plan and training time on the GPUs the seeds name, offline.

For each recipe and set-up (1 x RTX 3090, 1 x A100 40 GB, 2 x g7e.48xlarge = 16 x RTX PRO 6000) this runs
launch/plan.py's planner from dapt's architecture table (no hub access): the recommended ZeRO stage and micro batch,
and the hours for the recipe's epochs from analytic FLOPs at an assumed MFU. Activations are measured on one real row
of at most 512 tokens on this CPU and scaled to the recipe's length (plan.measure_tokens=512). These are estimates,
not measurements; seed 001's own report (13.5 h for 500M tokens on an RTX 3090, and the GPU memory it saw at micro
batch 4) is printed beside the estimate for the same work.

    python bench/recipe_estimates.py          # writes bench/results/recipe_estimates.json and .md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import child_env, machine, write_result  # noqa: E402

from dapt.tools.plan import estimate_for  # noqa: E402

RECIPES = {  # recipe: (the hub model it starts from when the recipe starts from an earlier stage, runs: seeds)
    "secbert_http_mlm": (None, 1),
    "modernbert_dapt": (None, 1),
    "modernbert_tapt": ("answerdotai/ModernBERT-large", 1),
    "capec_severity": (None, 3),
    "vuln_classifier": (None, 3),
    "ids_distilbert": (None, 1),
    "canine_domains_mlm": (None, 1),
    "dga_classifier": ("google/canine-c", 1),
}
CLASSIFIERS = {
    "capec_severity",
    "vuln_classifier",
    "ids_distilbert",
    "dga_classifier",
}  # a truncated row per text
SETUPS = {
    "1 x RTX 3090": ("RTX-3090", 1),
    "1 x A100 40GB": ("A100-40GB", 1),
    "2 x g7e.48xlarge": ("RTX-PRO-6000", 16),
}


def plan(recipe: str, start: str | None, gpu: str, gpus: int, extra: list[str] = ()) -> dict:
    """launch/plan.py in its own process, as a user runs it: each measurement starts with this machine's memory free
    (in one long process, freed memory is not always returned, and a later plan would fall back to the formula)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--recipe",
            f"recipes/{recipe}.yaml",
            f"--output_dir={tmp}",
            f"--plan.gpu={gpu}",
            f"--plan.gpus={gpus}",
            "--plan.measure_tokens=512",
            "--data.streams=16",
            *extra,
        ]
        if start:
            argv.append(f"--model.name_or_path={start}")
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "plan.py"), *argv],
            capture_output=True,
            text=True,
            env=child_env(WORLD_SIZE=str(gpus)),
            cwd=ROOT,
        )
        if proc.returncode:
            raise SystemExit(f"plan for {recipe} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "plan.json").read_text())


def _duration(hours: float) -> str:
    return (
        f"{hours:.1f} h"
        if hours >= 1
        else f"{max(hours * 60, 1):.0f} min"
        if hours * 60 >= 0.5
        else "< 1 min"
    )


def main() -> None:
    from dapt.runtime.group import setup_logging

    os.chdir(ROOT)
    setup_logging("warning")
    rows = {}
    for recipe, (start, runs) in RECIPES.items():
        rows[recipe] = {}
        for name, (gpu, gpus) in SETUPS.items():
            r = plan(recipe, start, gpu, gpus, ["--data.packing=pad"] if recipe in CLASSIFIERS else [])
            c = r["recommendation"]
            rows[recipe][name] = {
                "hours": round(r["time"]["hours"] * runs, 3),
                "runs": runs,
                "tokens_per_epoch": r["time"]["tokens_per_epoch"],
                "epochs": r["time"]["epochs"],
                "fits": c is not None,
                "setup": c
                and f"ZeRO {c['stage']}, offload {c['offload']}, micro {c['micro_batch']}"
                f"{', ckpt' if c['checkpointing'] else ''} ({c['total_gb']:.1f} GB)",
            }
    seed001 = plan("modernbert_dapt", None, "RTX-3090", 1, ["--plan.tokens=500000000"])["time"]["hours"]
    # seed 001's own set-up: HF Trainer's dense MLM head, micro batch 4, gradient checkpointing
    dense = plan(
        "modernbert_dapt",
        None,
        "RTX-3090",
        1,
        ["--plan.tokens=1", "--train.sparse_prediction=false", "--plan.micro_batches=[4]"],
    )
    seed001_gb = estimate_for(dense, checkpointing=True)["total_gb"]
    result = {
        "machine": machine(),
        "mfu_assumed": 0.35,
        "estimates": rows,
        "check_against_seed_001": {
            "work": "ModernBERT-large DAPT, 500M tokens at 8192, 1 x RTX 3090",
            "seed_reported_hours": 13.5,
            "estimated_hours": round(seed001, 2),
            "seed_reported_gb_micro_4": 18.5,
            "estimated_gb_micro_4_dense_head": round(seed001_gb, 2),
            "memory_note": "seed 001 ran HF Trainer (AMP, "
            "torch.compile, flash attention) and reports GPU memory in use; the plan "
            "is DeepSpeed ZeRO 0 bf16, SDPA, allocated bytes",
        },
    }
    lines = [
        "Estimated training time (analytic FLOPs at an assumed 35% MFU; 2 x g7e assumes perfect scaling over 16 "
        "GPUs; classifier seeds counted, early stopping not) and the planner's set-up (memory per GPU).",
        "",
        "| recipe | " + " | ".join(SETUPS) + " |",
        "|---|" + "---|" * len(SETUPS),
    ]
    for recipe, by_setup in rows.items():
        cells = [
            f"{_duration(v['hours'])}: {v['setup']}" if v["fits"] else "does not fit"
            for v in by_setup.values()
        ]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Seed 001's report for ModernBERT-large DAPT on 500M tokens on one RTX 3090: 13.5 h; this "
        f"estimate for the same work: {seed001:.1f} h (assumed MFU 35%). Its GPU memory at micro batch 4 with "
        f"gradient checkpointing and the dense head: about 18.5 GB reported (HF Trainer, torch.compile, flash "
        f"attention); the plan for that set-up under DeepSpeed ZeRO 0 in bf16: {seed001_gb:.1f} GB.",
    ]
    (ROOT / "bench" / "results" / "recipe_estimates.md").write_text("\n".join(lines) + "\n")
    write_result("recipe_estimates", result)


if __name__ == "__main__":
    main()
