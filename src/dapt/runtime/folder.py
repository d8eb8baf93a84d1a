"""An output folder holds one run: one task, one configuration of what it trains or computes.

A run writes `dapt_run.json` into its output folder when it starts: its task and its identity, the config values
that decide what the run produces (model, data, masking, optimiser settings, seed, ...). A later run into the same
folder is refused before any rank starts when the folder holds another task's run or another identity's: it would
overwrite final/, summary.json and the metrics, mix plots and checkpoints, or resume from checkpoints that are not
its own. What may change between the runs of one folder (a resume) is operational: where and how it runs (world
size, ZeRO stage, precision, batch split, logging, checkpoint cadence) and how long (train.max_steps, train.epochs).
Folders written by a dapt without dapt_run.json are read from their config.resolved.yaml and outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dapt.config.redact import redact
from dapt.config.schema import ConfigError

CLAIM = "dapt_run.json"

# Config keys (or whole sections) that may differ between the runs of one folder.
OPERATIONAL = (
    "output_dir",
    "resume",
    "ds",
    "log.",
    "cluster.",
    "hub.",
    "numerics.",
    "checkpoint.",
    "submit.",
    "profile.",
    "plan.",
    "fill.",
    "ablation.",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "model.trust_remote_code",
    "data.valid",
    "data.test",
    "data.valid_max_docs",
    "data.num_workers",
    "data.log_sample_ids",
    "data.streams",
    "data.on_error",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.precision",
    "train.compile",
    "train.optimizer_impl",
    "train.rebuild_schedule",
    "classify.seeds",
    "classify.patience",
    "classify.metric",
    "classify.collapse_warn",
    "classify.collapse_stop",
)


# What each task leaves in its folder, the most telling first: how a folder of an older dapt (no dapt_run.json) is told
OUTPUTS = {
    "label_mapping.json": "classify",
    "seeds_summary.json": "classify",
    "anomaly.json": "anomaly",
    "embeddings_train.npz": "embed",
    "profile.json": "profile",
    "plan.json": "plan",
    "ablation.json": "ablation",
    "predictions.jsonl": "predict",
    "checkpoints": "mlm",
}
MARKS = (*OUTPUTS, "config.resolved.yaml", "summary.json", "final", "metrics.jsonl")
# What a run has produced once it got anywhere: a folder claimed by a run that stopped before any of these (a model it
# could not load, input it refused) holds nothing to lose, and the corrected command may take it
PRODUCTS = tuple(m for m in MARKS if m != "config.resolved.yaml")


def produced(folder: Path) -> bool:
    """Whether a run in `folder` produced anything (PRODUCTS, or a classifier's seed_<s> runs)."""
    return any((folder / m).exists() for m in PRODUCTS) or any(folder.glob("seed_*"))


def default_output_dir(task: str | None) -> str:
    """runs/<task>: each entry script's runs have a folder of their own by default."""
    return f"runs/{task or 'default'}"


# Scripts whose results are computed on data.valid / data.test themselves (for a training run those only evaluate)
EVALUATES = ("predict", "anomaly", "embed")


def identity(values: dict, sections: list[str] | None, task: str | None = None) -> dict[str, Any]:
    """The dotted config values (of `sections`, and the run's own seed) that are not OPERATIONAL: for the scripts that
    compute their results on data.valid and data.test, those are the identity too."""
    flat = _flatten({k: v for k, v in values.items() if sections is None or k in sections or k == "seed"})
    evaluated = ("data.valid", "data.test") if task in EVALUATES else ()
    return {k: v for k, v in flat.items() if k in evaluated or not k.startswith(OPERATIONAL)}


def run_identity(cfg, task: str) -> dict[str, Any]:
    """This run's identity, secrets masked (it is written into the folder)."""
    return identity(redact(cfg.to_dict()), _sections(task), task)


def read_claim(folder: Path) -> dict | None:
    """The run a folder holds: {"task", "identity"}; inferred for a folder of an older dapt; None when it holds none."""
    try:
        return json.loads((folder / CLAIM).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    if not folder.is_dir() or not any((folder / m).exists() for m in MARKS):
        return None
    task = next((t for mark, t in OUTPUTS.items() if (folder / mark).exists()), None)
    try:
        resolved = yaml.safe_load((folder / "config.resolved.yaml").read_text()) or {}
        values = {k: v for k, v in resolved.items() if k != "ds_config"}
    except (OSError, yaml.YAMLError):
        values = None
    return {"task": task, "identity": identity(values, None, task) if values is not None else None}


# The entry scripts whose runs write into output_dir
WRITERS = ("mlm", "classify", "embed", "anomaly", "profile", "plan", "ablation", "predict")


def _sections(task: str) -> list[str] | None:
    from dapt.config.schema import sections_of, tool_of

    tool = tool_of(task)
    return sections_of(tool) if tool else None


def problems(cfg, task: str | None) -> list[str]:
    """Why this run may not write into cfg.output_dir (empty when it may): the folder holds another task's run, or a
    run of this task with another identity."""
    folder = Path(cfg.output_dir)
    if cfg.resume not in ("auto", "never") and task in WRITERS:  # a checkpoint named: its own run's task
        run = read_claim(Path(cfg.resume).parent.parent)
        if run and run.get("task") not in (None, task):
            return [
                f"resume: {cfg.resume} is a checkpoint of {_a(run['task'])} run; {_a(task)} run cannot continue it: "
                f"start from its weights instead (--model.name_or_path={Path(cfg.resume).parent.parent / 'final'}) "
                "with --resume=never, or name a checkpoint of this task"
            ]
    held = read_claim(folder) if task in WRITERS else None
    if held is None or not produced(folder):  # claimed by a run that stopped before producing anything
        return []
    where = f"output_dir {folder}"
    keep = f"; pass --output_dir=NEW for a new folder, or remove {folder} to start over there"
    if held.get("task") != task:
        what = f"{_a(held['task'])} run" if held.get("task") else "the outputs of another dapt run"
        return [
            f"{where} holds {what} (final/, checkpoints, metrics), which this {task} run would overwrite{keep}"
        ]
    mine, theirs = run_identity(cfg, task), held.get("identity")
    if theirs is None:
        return []
    changed = [k for k in sorted(set(mine) & set(theirs)) if mine[k] != theirs[k]]
    if not changed:
        return []
    shown = ", ".join(f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in changed[:4]) + (
        ", ..." if len(changed) > 4 else ""
    )
    return [
        f"{where} holds {_a(task)} run of another configuration ({shown}); this run would mix its outputs with that "
        f"run's or resume from its checkpoints{keep}"
    ]


def claim(cfg) -> None:
    """Write dapt_run.json into cfg.output_dir (its task: cfg.task) unless it holds one; call on one rank. A folder that
    holds another task's run is refused here too (a run configured without the entry script's check)."""
    folder, task = Path(cfg.output_dir), cfg.task
    if task not in WRITERS:
        return
    if produced(folder):  # else: nothing of the run that claimed it (if one did) to lose; this run takes it
        if (folder / CLAIM).exists():
            return
        held = read_claim(folder)
        if held and held.get("task") not in (None, task):
            raise ConfigError([problems(cfg, task)[0]])
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"task": task, "identity": run_identity(cfg, task)}
    (folder / CLAIM).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _a(task: str) -> str:
    """ "an mlm", "a classify": the article as the task's name is spoken."""
    return f"{'an' if task[:1] in 'aeiou' or task == 'mlm' else 'a'} {task}"


def _flatten(tree: dict) -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: sections one level down; a field's own mapping (model.config) whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= {f"{key}.{name}": field for name, field in value.items()}
        else:
            out[key] = value
    return out
