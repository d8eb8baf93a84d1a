"""Runs started by `accelerate launch`: its settings arrive as ACCELERATE_* environment variables, which dapt honours
as if they were given on the command line, or refuses with a message, never ignores.

    accelerate launch --use_deepspeed --deepspeed_config_file ds_configs/zero2_bf16.json --num_processes 8 launch/mlm.py
    accelerate launch --use_deepspeed --zero_stage 3 --mixed_precision bf16 --num_processes 8 launch/mlm.py

accelerate starts the ranks with torchrun, so RANK, WORLD_SIZE and the rendezvous come as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
PLUGIN = {  # accelerate's DeepSpeed plugin flags (without a config file) -> where they go in the ds config
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("zero_optimization", "stage"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("zero_optimization", "offload_optimizer", "device"),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("zero_optimization", "offload_param", "device"),
}
TRAIN = {
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "train.grad_accum",
    "ACCELERATE_GRADIENT_CLIPPING": "train.grad_clip",
}


def accelerate_settings(
    env: dict[str, str], overrides: dict[str, Any]
) -> tuple[dict, dict, list[str], list[str]]:
    """(settings to add, ds config entries to set, notes for the log, problems) from accelerate's variables; all
    empty when accelerate did not start this process. `overrides` are the command line's. The settings must agree
    with what the recipe and the command line say (dapt.cli.load checks: a disagreement is a config error), and the ds
    entries with a --ds file."""
    add: dict[str, Any] = {}
    ds_set: dict[tuple, Any] = {}
    notes: list[str] = []
    problems: list[str] = []
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if deepspeed else None
    if config_file:
        given = overrides.get("ds")
        if given and Path(str(given)).resolve() != Path(config_file).resolve():
            problems.append(
                f"contradiction: --ds {given} but accelerate launch --deepspeed_config_file {config_file}; "
                "give one"
            )
        else:
            add["ds"] = config_file
            notes.append(f"ds config from accelerate launch --deepspeed_config_file {config_file}")
    _precision(env.get("ACCELERATE_MIXED_PRECISION"), bool(config_file), overrides, add, notes, problems)
    if not deepspeed:
        return add, ds_set, notes, problems
    for name, path in PLUGIN.items():
        if name in env:
            if config_file:
                problems.append(
                    f"accelerate launch set {name}={env[name]} and a DeepSpeed config file: put that "
                    "setting in the file"
                )
            else:
                ds_set[path] = int(env[name]) if path[-1] == "stage" else env[name]
                notes.append(f"ds {'.'.join(path)} = {env[name]} from accelerate launch")
    for name, key in TRAIN.items():
        if name in env and not config_file:
            add[key] = float(env[name]) if key == "train.grad_clip" else int(env[name])
            notes.append(f"{key} = {env[name]} from accelerate launch")
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() == "false":
        notes.append(
            "accelerate launch --zero3_init_flag false: dapt still loads a pretrained model partitioned under "
            "ZeRO-3 (zero.Init), so that a model larger than one GPU loads"
        )
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower() == "true":
        notes.append(
            "accelerate launch --zero3_save_16bit_model true: dapt's final/ holds the fp32 master weights, "
            "gathered from the ZeRO-3 partitions"
        )
    if env.get("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"):
        problems.append(
            "accelerate launch --deepspeed_moe_layer_cls_names: dapt trains dense encoders, not "
            "mixture-of-experts models"
        )
    return add, ds_set, notes, problems


def _precision(
    mixed: str | None, config_file: bool, overrides: dict, add: dict, notes: list[str], problems: list[str]
) -> None:
    if mixed is None:
        return
    mixed = mixed.lower()
    if mixed not in PRECISION:
        problems.append(
            f"accelerate launch --mixed_precision {mixed}: dapt trains in bf16, fp16 or fp32 (no)"
        )
        return
    if mixed == "no":  # accelerate's default, set whether or not --mixed_precision was given: not a choice
        notes.append(
            "accelerate launch's mixed_precision is 'no' (its default): train.precision and the ds config "
            "decide"
        )
        return
    precision = PRECISION[mixed]
    given = overrides.get("train.precision")
    if given not in (None, "auto", precision):
        problems.append(
            f"contradiction: --train.precision={given} but accelerate launch --mixed_precision {mixed}"
        )
    elif given in (None, "auto"):
        add["train.precision"] = precision
        notes.append(f"train.precision = {precision} from accelerate launch --mixed_precision {mixed}")
