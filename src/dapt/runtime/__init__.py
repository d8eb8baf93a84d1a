"""The runtime layer: the process group, checkpoints, numerics guards, preemption, the schedule, metrics and the
runner that every task trains through. Imports only dapt.config."""
