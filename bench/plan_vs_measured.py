"""The memory planner's estimate against the peak memory of a real training step, side by side in one run.

    python bench/plan_vs_measured.py [--cases minilm128,minilm512,modernbert1024]

For each case, launch/plan.py estimates the per-GPU memory of one set-up (ZeRO 0, no offload, the case's micro
batch and gradient checkpointing) and launch/profile.py runs that set-up for real through DeepSpeed, on the
embedded default corpus, and measures the peak memory of one training step. On CPU the run is fp32 and the peak
comes from torch's MemTracker (every tensor alive: parameters, gradients, Adam states, activations,
temporaries); on a GPU it is bf16 and torch.cuda.max_memory_allocated. Attention dropout is 0, as the planner
assumes: with dropout, CPU SDPA keeps the attention probabilities, which the fused GPU kernels do not. Models are
built from configs (MiniLM-size BERT with the all-MiniLM-L6-v2 tokenizer; a small ModernBERT whose 1024-token rows
the planner measures at 256 tokens and scales; BERT-base and ModernBERT-base sizes on a GPU). The target is an
estimate within 15% of the measured peak.

Writes bench/results/plan_vs_measured.json (plan_vs_measured_<gpu>.json on a GPU) and prints it on one line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, TINY, child_env, machine, minilm_tokenizer, write_result

from dapt.tools.plan import estimate_for

MINILM = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "attention_probs_dropout_prob": 0.0,
}
BERT_BASE = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 1024,
    "attention_probs_dropout_prob": 0.0,
}
# the all-MiniLM-L6-v2 tokenizer's special ids, which ModernBERT's config must name
SPECIAL = {
    "pad_token_id": 0,
    "cls_token_id": 101,
    "sep_token_id": 102,
    "bos_token_id": 101,
    "eos_token_id": 102,
}
MODERNBERT_SMALL = {
    "model_type": "modernbert",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 1024,
    "local_attention": 128,
    "global_attn_every_n_layers": 2,
    **SPECIAL,
}
MODERNBERT_BASE = {
    "model_type": "modernbert",
    "hidden_size": 768,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "intermediate_size": 1152,
    "max_position_embeddings": 8192,
    "local_attention": 128,
    "global_attn_every_n_layers": 3,
    **SPECIAL,
}


# name: (model, tokens, micro batch, cases of (sparse prediction, gradient checkpointing), plan.measure_tokens);
# "tiny" is the plumbing (bench/gpu_check.py --tiny), on either table
TINY_CASES = {"tiny": (TINY | {"attention_probs_dropout_prob": 0.0}, 64, 2, [(True, False)], 64)}
CPU_CASES = {
    "minilm128": (MINILM, 128, 16, [(True, False), (False, False), (True, True), (False, True)], 2048),
    "minilm512": (MINILM, 512, 4, [(True, False), (True, True)], 2048),
    "modernbert1024": (MODERNBERT_SMALL, 1024, 2, [(True, False), (True, True)], 256),
}
GPU_CASES = {
    "bert_base512": (BERT_BASE, 512, 32, [(True, False), (False, False), (True, True)], 2048),
    "bert_base1024": (BERT_BASE, 1024, 16, [(True, False), (True, True)], 2048),
    "modernbert_base512": (MODERNBERT_BASE, 512, 32, [(True, False), (True, True)], 2048),
    "modernbert_base1024": (MODERNBERT_BASE, 1024, 16, [(True, False), (True, True)], 256),
}


def _run(script: str, args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / script), *args],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if proc.returncode:
        raise SystemExit(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def one_case(
    work: Path, model: dict, seq: int, micro: int, sparse: bool, checkpointing: bool, longest: int, cuda: bool
) -> dict:
    common = [
        "--model.config",
        json.dumps(model),
        "--model.tokenizer",
        minilm_tokenizer(),
        f"--data.max_seq_length={seq}",
        f"--train.micro_batch_size={micro}",
        f"--train.precision={'bf16' if cuda else 'fp32'}",
        f"--train.sparse_prediction={str(sparse).lower()}",
        f"--model.gradient_checkpointing={str(checkpointing).lower()}",
        "--log.progress=false",
    ]
    tag = f"{model['model_type']}_{seq}_{micro}_{int(sparse)}{int(checkpointing)}"
    _run(
        "profile.py",
        [*common, "--profile.warmup=1", "--profile.steps=1", "--output_dir", str(work / f"prof_{tag}")],
    )
    _run(
        "plan.py",
        [
            *common,
            f"--plan.micro_batches=[{micro}]",
            f"--plan.measure_tokens={longest}",
            "--plan.gpu=H100-80GB",
            "--plan.tokens=1",
            "--output_dir",
            str(work / f"plan_{tag}"),
        ],
    )
    measured = json.loads((work / f"prof_{tag}" / "profile.json").read_text())
    plan = json.loads((work / f"plan_{tag}" / "plan.json").read_text())
    row = estimate_for(plan, checkpointing)
    peak = measured["peak_memory_gb"]
    return {
        "model": f"{model['model_type']} {model['num_hidden_layers']} x {model['hidden_size']}",
        "tokens": seq,
        "micro_batch": micro,
        "sparse_prediction": sparse,
        "gradient_checkpointing": checkpointing,
        "precision": plan["precision"],
        "attention": measured["model"]["attention"],
        "planned_gb": row["total_gb"],
        "planned_parts_gb": {k: row[k] for k in ("model_states_gb", "activations_gb", "buffers_gb")},
        "plan_activations": plan["activations"],
        "measured_gb": round(peak, 4),
        "measured_parts_gb": measured["peak_memory"].get("parts_gb"),
        "measured_how": measured["peak_memory"]["how"],
        "planned_over_measured": round(row["total_gb"] / peak, 3),
    }


def main() -> int:
    import torch

    cuda = torch.cuda.is_available()
    default = GPU_CASES if cuda else CPU_CASES
    table = {**default, **TINY_CASES}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(default), help=f"comma-separated, of: {', '.join(table)}")
    args = ap.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in table]
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)}; the cases here are: {', '.join(table)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            model, seq, micro, variants, longest = table[name]
            for sparse, checkpointing in variants:
                r = one_case(Path(tmp), model, seq, micro, sparse, checkpointing, longest, cuda)
                rows.append({"case": name, **r})
                print(
                    f"{name:>20} sparse={sparse!s:5} ckpt={checkpointing!s:5}: planned {1024 * r['planned_gb']:8.1f} "
                    f"MB, measured {1024 * r['measured_gb']:8.1f} MB, ratio {r['planned_over_measured']:.3f}",
                    flush=True,
                )
    ratios = [r["planned_over_measured"] for r in rows]
    result = {
        "machine": machine(),
        "target": "planned within 15% of measured",
        "cases": rows,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "within_15_percent": sum(abs(x - 1) <= 0.15 for x in ratios),
        "of": len(ratios),
    }
    print(
        f"planned / measured: {min(ratios):.3f} .. {max(ratios):.3f}; within 15%: "
        f"{result['within_15_percent']} of {len(ratios)}"
    )
    write_result("plan_vs_measured", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
