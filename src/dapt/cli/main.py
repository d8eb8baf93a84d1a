"""Shared entry-point logic: parse and validate the config (all problems at once), then run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from dapt.cli.load import load_config, parse_argv
from dapt.config.redact import redact_text
from dapt.config.schema import BadInput, ConfigError, RunConfig, help_text
from dapt.data.prepare import BadRecord
from dapt.runtime.group import LaunchError, adopt_scheduler_env
from dapt.runtime.numerics import Diverged
from dapt.runtime.preempt import Preempted
from dapt.runtime.publish import PushFailed

T = TypeVar("T")


def front_door(argv: list[str], prog: str, load: Callable[[], T]) -> tuple[T | None, int | None]:
    """What every entry script does first: --help printed (exit 0), or `load()` (the config read and checked). A
    configuration or launch error is printed once (rank 0), with secrets masked (exit 2). Returns (loaded, None) to
    go on, or (None, exit code)."""
    try:
        if parse_argv(argv)[2]:
            print(help_text(prog))
            return None, 0
        return load(), None
    except (ConfigError, LaunchError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(redact_text(f"{prog}: {e}"), file=sys.stderr)
        return None, 2


def main(run: Callable[[RunConfig], dict], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run `run` (a task's or tool's run(cfg)) on the config of `argv`. `prog` defaults to the entry script named
    after run's module (dapt.tasks.classify.run -> launch/classify.py).

    Exit codes: 0 done, 1 a bug (any other exception, with its traceback), 2 configuration error (nothing started),
    3 bad input data (a BadInput, raised where the data, model or checkpoint proved unusable), 4 numeric blow-up
    (NaN/Inf steps over the limit, or a loss spike with numerics.spike_action=stop), 5 trained and exported but the
    hub.push upload failed (final/ kept), 128 + N stopped by signal N. The code is chosen by the error's type, which
    the code that found the error chose: a plain ValueError is not bad input."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or f"launch/{run.__module__.rsplit('.', 1)[-1]}.py"

    def load() -> RunConfig:
        adopt_scheduler_env()  # ranks started by srun/mpirun: the world size must be known to check the config
        return load_config(argv, prog=prog)

    cfg, code = front_door(argv, prog, load)
    if cfg is None:
        return code
    first = os.environ.get("RANK", "0") == "0"
    from dapt.runtime.group import setup_logging

    setup_logging(cfg.log.level, cfg.log.all_ranks)
    try:
        run(cfg)
    except ConfigError as e:  # one that only the data or a checkpoint shows (a resume that cannot go on)
        if first:
            print(redact_text(f"{prog}: {e}"), file=sys.stderr)
        return 2
    except (Preempted, Diverged, PushFailed) as e:
        if first:
            print(redact_text(f"{prog}: {e.message}"), file=sys.stderr)
        return e.code
    except BadRecord as e:
        print(
            redact_text(f"{prog}: bad input: {e} (set --data.on_error=skip to skip and count such records)"),
            file=sys.stderr,
        )
        return 3
    except BadInput as e:  # raised where the data, model or checkpoint named by the config proved unusable
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
