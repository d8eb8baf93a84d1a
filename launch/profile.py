"""Profiling run: the MLM loop of launch/mlm.py, warm-up then profile.steps timed optimizer steps.

    python launch/profile.py --recipe recipes/NAME.yaml --profile.steps=20
    deepspeed --num_gpus 8 launch/profile.py --ds ds_configs/zero2_bf16.json --recipe recipes/NAME.yaml

Reports step time and its parts (data, forward, backward, optimizer step), real tokens/s and token slots/s,
samples/s, achieved TFLOPS from analytic encoder FLOPs, MFU and peak memory in output_dir/profile.json and
profile.md; --profile.trace=true adds a torch.profiler trace. --help lists every field.
"""

import sys

# importing dapt takes launch/ off the import path: this file's name shadows the standard library's `profile`
from dapt.cli.main import main
from dapt.tools.profile import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/profile.py"))
