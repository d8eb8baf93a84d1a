"""Resume a checkpoint exactly as launch/mlm.py does (converting it when it was written on another world size), then
write every parameter's fp32 master weights and Adam moments, gathered whole, and the optimizer's step counts to the
file DUMP_TO (rank 0), and stop before any training step. Run under the launcher for several ranks:

    DUMP_TO=state.pt python -m deepspeed.launcher.runner --num_gpus 2 tests/dump_state.py --recipe ... --resume=PATH
"""

import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from dapt.cli.load import load_config
from dapt.runtime import group
from dapt.runtime.group import setup_logging
from dapt.runtime.train import setup
from dapt.tasks.mlm import MaskedLM


def main(argv: list[str]) -> None:
    argv = [a for a in argv if not a.startswith("--local_rank")]
    cfg = load_config(argv)
    setup_logging("info")
    engine = setup(cfg, MaskedLM()).engine
    if hasattr(
        engine.optimizer, "_lazy_init_hp_params_optimizer_state"
    ):  # ZeRO 1/2: link the loaded moments to
        engine.optimizer._hp_optimizer_states_linked = (
            False  # the parameters, as the optimizer's next step would
        )
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {
        name: {
            "fp32": safe_get_full_fp32_param(p).cpu(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").cpu(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").cpu(),
        }
        for name, p in engine.module.named_parameters()
    }
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    steps_taken = sorted({float(st["step"]) for st in optimizer.state.values() if "step" in st})
    # where torch's fused AdamW needs each step: on its parameter's device, a tensor of its own (ZeRO-3 empties the
    # groups' parameter lists between steps, so the state is read by its keys)
    fused = optimizer.defaults.get("fused")
    placed = [(st["step"], p.device) for p, st in optimizer.state.items() if fused and "step" in st]
    if group.rank() == 0:
        torch.save(
            {
                "params": state,
                "steps": steps_taken,
                "fused_steps": len(placed),
                "steps_on_param_device": all(step.device == device for step, device in placed),
                "steps_distinct": len({id(step) for step, _ in placed}) == len(placed),
            },
            os.environ["DUMP_TO"],
        )
    group.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
