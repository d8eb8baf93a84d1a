"""Shared entry-point logic: parse and validate the config (all problems at once), then run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from dapt.config import ConfigError, RunConfig, help_text
from dapt.data import BadRecord
from dapt.dist import LaunchError, adopt_scheduler_env
from dapt.load import load_config, parse_argv
from dapt.numerics import Diverged
from dapt.preempt import Preempted
from dapt.redact import redact_text


def main(run: Callable[[RunConfig], dict], argv: list[str] | None = None, prog: str = "launch/mlm.py") -> int:
    """Exit codes: 0 done, 2 configuration error (nothing started), 3 bad input data, 4 numeric blow-up (NaN/Inf
    steps over the limit, or a loss spike with numerics.spike_action=stop), 128 + N stopped by signal N."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if parse_argv(argv)[2]:
            print(help_text(prog))
            return 0
        adopt_scheduler_env()  # ranks started by srun/mpirun: the world size must be known to check the config
        cfg = load_config(argv)
    except (ConfigError, LaunchError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(redact_text(f"{prog}: {e}"), file=sys.stderr)
        return 2
    first = os.environ.get("RANK", "0") == "0"
    from dapt.dist import setup_logging

    setup_logging(cfg.log.level, cfg.log.all_ranks)
    try:
        run(cfg)
    except (Preempted, Diverged) as e:
        if first:
            print(redact_text(f"{prog}: {e.message}"), file=sys.stderr)
        return e.code
    except BadRecord as e:
        print(redact_text(f"{prog}: bad input: {e} (set --data.on_error=skip to skip and count such records)"),
              file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:  # problems with the data or model named by the config
        if cfg.log.level == "debug":
            raise
        print(redact_text(f"{prog}: error: {e}"), file=sys.stderr)
        return 3
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
