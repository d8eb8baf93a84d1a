"""Render (or print) the job that runs a recipe on several nodes; the recipe is checked for that world size first.

    python launch/submit.py --recipe recipes/NAME.yaml --ds ds_configs/zero2_bf16.json \\
        --submit.scheduler=slurm --cluster.nodes=2 --cluster.gpus_per_node=8 --submit.partition=gpu   # sbatch script
    python launch/submit.py ... --submit.scheduler=skypilot --cluster.nodes=2 --submit.instance=g7e.48xlarge
    python launch/submit.py ... --submit.scheduler=nodes --cluster.nodes=4 --cluster.gpus_per_node=8   # any scheduler
    python launch/submit.py ... --submit.scheduler=pdsh --cluster.hostfile=hostfiles/four_a100          # ssh launch
    python launch/submit.py ... --dry_run                                        # print instead of writing

Every other argument (--recipe, --ds, --train.max_steps=..., ...) goes to each rank of the job unchanged.
Writes output_dir/submit/ (or submit.out); --help lists every field.
"""

import sys

from dapt.tools.submit import main

if __name__ == "__main__":
    sys.exit(main())
