"""Graceful preemption: SIGTERM (spot reclaim, scheduler time limit) or SIGINT finishes the current optimizer step,
writes a checkpoint and exits non-zero, so rerunning the same command loses nothing.

Signals may reach only some ranks (DeepSpeed's launcher forwards them one rank at a time), so every step the
ranks agree through the all-reduce they already do; all of them then stop after the same step.
"""

from __future__ import annotations

import signal
import threading


class Preempted(SystemExit):
    """Raised after the checkpoint is written; the exit code is 128 + the signal number, as a shell reports it."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(128 + signum)
        self.message = (
            f"received {name}: stopped after optimizer step {step} and wrote the checkpoint {checkpoint}; "
            "rerun the same command to continue from it"
        )


class PreemptionWatch:
    """Records the first SIGTERM/SIGINT; a second SIGINT interrupts at once (the default behaviour)."""

    def __init__(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        else:  # signals can only be caught in the main thread (e.g. a run started from a worker thread)
            self._previous = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
