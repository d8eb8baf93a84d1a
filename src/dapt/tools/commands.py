"""`dapt <command> [args]` and `python -m dapt <command> [args]`: the entry scripts of launch/, installed with the
package. `dapt mlm --recipe R.yaml` is `python launch/mlm.py --recipe R.yaml`; under DeepSpeed's launcher use
`deepspeed --module dapt mlm ...` or the script in launch/."""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it holds: a task's or tool's run(cfg), or a tool's own main(argv)); one per launch/ script
COMMANDS = {
    "mlm": ("dapt.tasks.mlm", "run", "masked-language-model pretraining (DAPT, TAPT)"),
    "classify": ("dapt.tasks.classify", "run", "sequence-classification fine-tuning"),
    "embed": ("dapt.tasks.embed", "run", "embeddings of a dataset to .npz"),
    "anomaly": (
        "dapt.tasks.anomaly",
        "run",
        "anomaly detection: embedding distance, MLM surprise, n-gram novelty",
    ),
    "fill_mask": ("dapt.tasks.fill_mask", "run", "masked prediction with a trained MLM"),
    "predict": (
        "dapt.tasks.predict",
        "run",
        "a trained classifier (or MLM) on new files: predictions.jsonl, metrics with labels",
    ),
    "profile": ("dapt.tools.profile", "run", "timed optimizer steps of the MLM loop, FLOPs and MFU"),
    "plan": ("dapt.tools.plan", "run", "memory and time plan for a recipe on a GPU type"),
    "ablation": ("dapt.tools.ablation", "run", "DAPT ablation: base vs adapted checkpoints, evaluated"),
    "doctor": ("dapt.tools.doctor", "main", "preflight check of a run before it starts"),
    "submit": ("dapt.tools.submit", "main", "render a multi-node job (SLURM, SkyPilot, nodes, pdsh)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: dapt <command> [--recipe RECIPE.yaml] [--ds DS.json] [--section.field=value ...]",
        "",
        "commands (each is launch/<command>.py; `dapt <command> --help` lists its fields):",
    ]
    lines += [f"  {name:<{width}}  {about}" for name, (_, _, about) in COMMANDS.items()]
    return "\n".join(lines)


def console(argv: list[str] | None = None) -> int:
    """The `dapt` console script: the command's entry point with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher (deepspeed --module dapt mlm ...) puts --local_rank=N before the command
    at = next((i for i, a in enumerate(argv) if not a.startswith("--local_rank")), len(argv))
    if at == len(argv) or argv[at] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[at].replace("-", "_"), argv[:at] + argv[at + 1 :]
    if name not in COMMANDS:
        print(f"dapt: unknown command {argv[at]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, entry, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module), entry)
    if entry == "main":
        return target(rest)
    from dapt.cli.main import main

    return main(target, rest, prog=f"dapt {name}")
