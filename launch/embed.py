"""Embeddings of a dataset with an encoder (a hub id, a folder, or a dapt run's final/), CLS or mean pooling.

    python launch/embed.py --model.name_or_path=runs/dapt/final --data.train=requests.txt --data.format=http
    deepspeed --num_gpus 4 launch/embed.py --recipe recipes/NAME.yaml       # each rank embeds its share

Writes output_dir/embeddings_<split>.npz (embeddings, ids, labels) for data.train, the validation split and
data.test. --help lists every field.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.embed import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/embed.py"))
