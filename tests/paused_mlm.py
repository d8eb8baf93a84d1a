"""launch/mlm.py that pauses inside one chosen write, so a test can SIGKILL it there for certain (a kill aimed by
polling for the write's temporary folder misses a write of a few milliseconds).

    PAUSE_IN=startup         in start-up, once config.resolved.yaml is written, before the engine and any step
    PAUSE_IN=checkpoint:12   inside the write of checkpoint step_00000012, before its manifest and rename
    PAUSE_IN=export          inside the export of final/, after writing .tmp-final and before it is verified
    PAUSE_MARKER=<file>      written when the pause begins
"""

import os
import sys
import time
from pathlib import Path

import dapt.runtime.checkpoint as checkpoint
import dapt.runtime.train as train
from dapt.cli.main import main
from dapt.tasks import mlm


def _pause_before(fn, aimed):
    def wrapped(folder, *args, **kwargs):
        if aimed(Path(folder)):
            Path(os.environ["PAUSE_MARKER"]).write_text(str(folder))
            time.sleep(120)  # the test kills the process group here
        return fn(folder, *args, **kwargs)

    return wrapped


if __name__ == "__main__":
    where = os.environ["PAUSE_IN"]
    if where == "startup":

        def resolved_then_pause(cfg, path, ds=None):
            save_resolved(cfg, path, ds)
            _pause_before(lambda folder: None, lambda folder: True)(path)

        save_resolved = train.save_resolved
        train.save_resolved = resolved_then_pause
    elif where.startswith("checkpoint:"):
        tag = f".tmp-step_{int(where.split(':')[1]):08d}"
        checkpoint.write_manifest = _pause_before(checkpoint.write_manifest, lambda f: f.name == tag)
    else:
        checkpoint.verify_export = _pause_before(checkpoint.verify_export, lambda f: f.name == ".tmp-final")
    sys.exit(main(mlm.run, prog="paused_mlm.py"))
