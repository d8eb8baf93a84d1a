"""Tools around the tasks: plan, profile, doctor, submit, ablation. The top layer: may import anything below."""
