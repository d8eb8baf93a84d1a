"""launch/mlm.py with a numeric fault on one rank (see faults.from_env); for the 2-rank numerics test."""

import sys

import faults

from dapt.cli.main import main
from dapt.tasks import mlm

if __name__ == "__main__":
    faults.from_env()
    sys.exit(main(mlm.run, prog="faulty_mlm.py"))
