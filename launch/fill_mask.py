"""Masked prediction with a trained MLM (seed 004's inference script), for token and character models.

    python launch/fill_mask.py --model.name_or_path=runs/secbert_http_mlm/final --fill.text='["GET /tienda1/[MASK].jsp"]'
    python launch/fill_mask.py --recipe recipes/canine_domains_mlm.yaml --model.name_or_path=runs/canine_domains_mlm/final
        # interactive: type domains with [MASK] for unknown characters, e.g. goo[MASK]le.com

Each [MASK] (fill.placeholder) is one masked token, or for CANINE one masked character; --masking.mask_token_id
(from the training recipe) says which id stands for it. Prints the top fill.top_k candidates per position; writes
nothing. --help lists every field.
"""

import sys

from dapt.cli.main import main
from dapt.tasks.fill_mask import run

if __name__ == "__main__":
    sys.exit(main(run, prog="launch/fill_mask.py"))
