"""Masked-language-model pretraining (DAPT/TAPT) of a Hugging Face encoder on a DeepSpeed engine.

    python launch/mlm.py                                          # embedded default: tiny BERT, CPU, minutes
    python launch/mlm.py --ds ds_configs/zero2_bf16.json --recipe recipes/NAME.yaml   # one process, one GPU
    deepspeed --num_gpus 8 launch/mlm.py --ds ds_configs/zero2_bf16.json --recipe recipes/NAME.yaml
    deepspeed --hostfile hostfiles/NAME launch/mlm.py --ds ds_configs/zero3_bf16.json --recipe recipes/NAME.yaml

Any field can be overridden as --section.field=value (e.g. --train.max_steps=50); --help lists them all.
Rerunning the same command after a crash resumes from the latest complete checkpoint.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.mlm import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/mlm.py"))
