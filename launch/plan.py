"""Memory planner: per-GPU memory of the MLM run a recipe describes, for ZeRO 0-3 with and without offload,
micro-batch sizes and gradient checkpointing; recommends a DeepSpeed config and micro batch.

    python launch/plan.py --recipe recipes/NAME.yaml --plan.gpu=RTX-3090 --plan.gpus=1
    python launch/plan.py --model.name_or_path=answerdotai/ModernBERT-base --data.max_seq_length=1024 \\
        --plan.gpu=H100-80GB --plan.gpus=8 --plan.write_ds=ds_configs/planned.json

Builds the model on the meta device (no weights are loaded, nothing runs on a GPU) and writes output_dir/plan.json
and plan.md. --help lists every field.
"""

import sys

from dapt.cli.main import main
from dapt.tools.plan import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/plan.py"))
