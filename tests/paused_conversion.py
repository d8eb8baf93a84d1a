"""launch/mlm.py that pauses inside the universal conversion of a checkpoint (its files written under the temporary
name, before the manifest and the rename), so a test can SIGKILL it there for certain: a marker file PAUSED in
the temporary folder says the pause has begun."""

import sys
import time

import dapt.runtime.elastic as elastic
from dapt.cli.main import main
from dapt.tasks import mlm

convert = elastic._convert


def convert_then_pause(point, out):
    convert(point, out)
    (out / "PAUSED").write_text("killed here by the test")
    time.sleep(120)


if __name__ == "__main__":
    elastic._convert = convert_then_pause
    sys.exit(main(mlm.run, prog="paused_conversion.py"))
