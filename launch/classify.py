"""Sequence-classification fine-tuning of an encoder (a hub id, a folder, or a dapt MLM output's final/).

    python launch/classify.py --recipe recipes/NAME.yaml
    deepspeed --num_gpus 8 launch/classify.py --ds ds_configs/zero2_bf16.json --recipe recipes/NAME.yaml
    python launch/classify.py --recipe recipes/NAME.yaml --classify.seeds=[42,123,456]   # mean +- std

Writes eval_test.json (accuracy, macro/micro/weighted F1, per class, confusion matrix; ROC-AUC and PR-AUC when
binary), plots/confusion_matrix.png, label_mapping.json and final/ (a Hugging Face folder with id2label).
Any field can be overridden as --section.field=value; --help lists them all.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.classify import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/classify.py"))
