"""The code is formatted by `ruff format` at the project's line length (ruff.toml) and passes `ruff check`; CI runs
this test, so an unformatted change fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

PATHS = ["src", "tests", "launch", "bench"]


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    if found:
        return [found]
    pytest.importorskip("ruff", reason="ruff is part of the test extra: pip install -e '.[test]'")
    return [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
    proc = subprocess.run([*_ruff(), *command, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
