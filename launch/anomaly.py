"""Mahalanobis anomaly detection on encoder embeddings (seed 000's protocol).

    python launch/anomaly.py --model.name_or_path=runs/secbert_dapt/final \
        --data.format=http --data.train=normalTrafficTraining.txt.gz \
        --data.test=[normalTrafficTest.txt.gz,anomalousTrafficTest.txt.gz] \
        --classify.label_files="{'normal*': normal, 'anomalous*': attack}"

Fits mean and shrinkage covariance on normal training embeddings, sets the threshold on normal validation data
(data.valid, or the hash split of data.train) for embed.max_fpr (5%), and writes output_dir/anomaly.json
(recall_at_max_fpr, max_fpr, test_fpr, threshold, auroc) and plots/roc.png.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.anomaly import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/anomaly.py"))
