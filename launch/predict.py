"""A trained model on new files: a classifier's class probabilities (and, when the files carry the label, the metrics
its training reports: an evaluation-only run), or an MLM's surprise per record.

    python launch/predict.py --model.name_or_path=runs/classify/final --data.test=new_requests.csv
    python launch/predict.py --model.name_or_path=runs/classify/final --data.test=test.csv --output_dir=runs/eval
    python launch/predict.py --model.name_or_path=runs/mlm/final --data.test=requests.txt    # MLM surprise

Records become text as the model's training records did: the data settings saved with it (final/dapt_text.json:
format, columns, rounding, label field, row length) are the defaults, and --data.* overrides them. Writes
output_dir/predictions.jsonl (one line per record: its id file:line, the predicted label and every class
probability, the true label when known), eval.json and plots/confusion_matrix.png with labels, and summary.json.
--help lists every field.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.predict import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/predict.py"))
