"""Anomaly detection with an encoder (seed 000's protocol), scored by embed.score: Mahalanobis or nearest-neighbour
distance of pooled embeddings, MLM surprise, character n-gram novelty, or their fusion.

    python launch/anomaly.py --model.name_or_path=runs/secbert_dapt/final \
        --data.format=http --data.train=normalTrafficTraining.txt.gz \
        --data.test=[normalTrafficTest.txt.gz,anomalousTrafficTest.txt.gz] \
        --classify.label_files="{'normal*': normal, 'anomalous*': attack}"

Fits each score on normal training documents, sets the threshold on normal validation data (data.valid, the hash
split of data.train, or embed.valid_from_test) for embed.max_fpr (5%), and writes output_dir/anomaly.json
(recall_at_max_fpr, max_fpr, test_fpr, threshold, auroc, both calibrations, each fused component), plots/roc.png,
anomaly_report.jsonl and .md (why each flagged document was flagged) and anomaly_scores.csv.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.anomaly import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/anomaly.py"))
