"""dapt: domain-adaptive MLM pretraining and fine-tuning of Hugging Face encoders on DeepSpeed."""

import os
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


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed opens every command, --help included, with "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it." where there is no GPU: its accelerator is named for it instead (what
    it would pick anyway). An accelerator set in the environment is kept."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


_quiet_deepspeed_on_cpu()
