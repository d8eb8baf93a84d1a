"""Base -> +DAPT -> +DAPT+TAPT, each evaluated with the same classifier or anomaly protocol (seed 001).

    python launch/ablation.py --ablation.base=answerdotai/ModernBERT-large \
        --ablation.dapt_recipe=recipes/modernbert_dapt.yaml --ablation.tapt_recipe=recipes/modernbert_tapt.yaml \
        --ablation.eval_recipe=recipes/NAME_classifier.yaml --output_dir=runs/ablation

Writes output_dir/ablation.md (the table) and ablation.json; each stage's run sits in its own folder below, and
rerunning the command continues where it stopped.
"""

import sys

from dapt.cli.main import main
from dapt.tools.ablation import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/ablation.py"))
