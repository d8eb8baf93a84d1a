"""dapt: domain-adaptive MLM pretraining and fine-tuning of Hugging Face encoders on DeepSpeed."""

import sys
from pathlib import Path

__version__ = "0.1.0"


def _is_launch_folder(entry: str) -> bool:
    folder = Path(entry or ".")
    return (folder / "profile.py").is_file() and (folder / "mlm.py").is_file()


# `python launch/<script>.py` puts launch/ first on the import path, and launch/profile.py is named like the standard
# library module that cProfile (imported by torch) loads. Every launch script imports dapt first, so its folder is
# dropped here: wherever it is (a checkout, or a copy of launch/ beside a non-editable install of dapt), it is the
# folder that holds both profile.py and mlm.py.
sys.path[:] = [p for p in sys.path if not _is_launch_folder(p)]
