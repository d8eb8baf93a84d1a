"""ZeRO-3 with a pretrained model in bf16/fp16: fp32 master weights that are the folder's own fp32 weights.

transformers runs zero.Init without a dtype, so the partitions of a pretrained model are made in the DeepSpeed
config's precision, and DeepSpeed takes its fp32 masters from those partitions: the folder's fp32 weights would start
training rounded to bf16. `fp32_partitions` loads the folder once more under an fp32 zero.Init (partitioned the same
way, one rank's share each) and `set_masters` makes this rank's share of those the masters of the engine.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("dapt")


def fp32_partitions(cfg, model: torch.nn.Module, ds: dict) -> dict[str, torch.Tensor]:
    """This rank's fp32 partition of every parameter the pretrained folder holds, by name; empty unless the run is
    ZeRO-3 in bf16/fp16 from a pretrained model. Parameters the folder lacks (a classifier's new head) are left out:
    their masters are their bf16 initialisation, as good as any."""
    m, zero = cfg.model, ds.get("zero_optimization", {})
    if not m.name_or_path or zero.get("stage") != 3 or cfg.train.precision not in ("bf16", "fp16"):
        return {}
    from transformers.integrations import HfDeepSpeedConfig

    fp32 = {**ds, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    keep_alive = HfDeepSpeedConfig(fp32)  # zero.Init takes its precision from this config while it lives
    try:
        extra = {"revision": m.revision} if m.revision else {}
        twin, info = type(model).from_pretrained(
            m.name_or_path,
            config=model.config,  # the same architecture, labels and attention as the model being trained
            dtype=torch.float32,
            trust_remote_code=m.trust_remote_code,
            output_loading_info=True,
            **extra,
        )
    finally:
        del keep_alive
    missing = set(info["missing_keys"])
    return {name: p.ds_tensor.detach() for name, p in twin.named_parameters() if name not in missing}


def set_masters(engine, partitions: dict[str, torch.Tensor]) -> None:
    """This rank's fp32 master partition of each named parameter of the engine set from `partitions`."""
    if not partitions:
        return
    from deepspeed.utils import safe_set_local_fp32_param

    for name, p in engine.module.named_parameters():
        if name in partitions:
            safe_set_local_fp32_param(p, partitions[name])
    log.info(
        "ZeRO-3: the fp32 master weights of %d parameters set from the pretrained folder's own fp32 weights "
        "(zero.Init made the partitions in half precision)",
        len(partitions),
    )
