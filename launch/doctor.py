"""Preflight check of a run before it starts on a cluster: one verdict (OK, WARN, FAIL, SKIP) per item.

    python launch/doctor.py --recipe recipes/NAME.yaml --ds ds_configs/zero2_bf16.json \\
        --cluster.hostfile=hostfiles/two_g7e --cluster.master_addr=10.0.0.1
    python launch/doctor.py --recipe recipes/NAME.yaml --cluster.nodes=2 --cluster.gpus_per_node=8 --cluster.gpu=H100-80GB

Checks the recipe and ds config, the hostfile, the world size against the batch sizes, this node's GPU count and
type, free disk for the checkpoints the run keeps, the master address and port, and the environment carried to the
ranks. Writes nothing, starts nothing; exit 0 when no item failed, 2 otherwise. --help lists every field.
"""

import sys

from dapt.tools.doctor import main

if __name__ == "__main__":
    sys.exit(main())
