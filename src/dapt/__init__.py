"""dapt: domain-adaptive MLM pretraining and fine-tuning of Hugging Face encoders on DeepSpeed."""

import sys
from pathlib import Path

__version__ = "0.1.0"

# `python launch/<script>.py` puts launch/ first on the import path, and launch/profile.py is named like the standard
# library module that cProfile (imported by torch) loads: every launch script imports dapt first, so drop it here.
_LAUNCH = (Path(__file__).resolve().parents[2] / "launch").resolve()
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _LAUNCH]
