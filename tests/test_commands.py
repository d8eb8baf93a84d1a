"""`dapt <command>` and `python -m dapt <command>`: the launch/ scripts, installed with the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

from dapt.tools.commands import COMMANDS


def _dapt(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dapt", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=child_env())  # fmt: skip


def test_every_launch_script_is_a_command():
    assert {p.stem for p in (ROOT / "launch").glob("*.py")} == set(COMMANDS)


def test_python_m_dapt_lists_the_commands_and_each_command_its_own_fields(tmp_path):
    """Outside the checkout (no launch/ at hand): the commands, and a command's --help with its sections only."""
    listing = _dapt("--help", cwd=tmp_path)
    assert listing.returncode == 0 and all(f"  {name}" in listing.stdout for name in COMMANDS)
    help_ = _dapt("classify", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "usage: dapt classify" in help_.stdout and "[classify]" in help_.stdout
    assert "--submit." not in help_.stdout and "--plan." not in help_.stdout
    wrong = _dapt("classfy", cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown command 'classfy'" in wrong.stderr


def test_python_m_dapt_mlm_trains_like_launch_mlm(recipe, tmp_path):
    """A tiny run through `python -m dapt mlm`, with DeepSpeed's --local_rank before the command as its launcher
    puts it (deepspeed --module dapt mlm ...)."""
    out = tmp_path / "run"
    proc = _dapt("--local_rank=0", "mlm", "--recipe", str(recipe), "--train.max_steps=2", "--output_dir", str(out),
                 "--log.progress=false", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "config.json").exists() and (out / "summary.json").exists()


def test_the_installed_console_script():
    """pip install puts a `dapt` script beside the interpreter (setup.cfg's console_scripts)."""
    script = shutil.which("dapt", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no `dapt` script beside this interpreter: the package is not pip-installed here")
    proc = subprocess.run(
        [script, "plan", "--help"], capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert proc.returncode == 0 and "[plan]" in proc.stdout
