"""Two "nodes" on one machine, run from the jobs launch/submit.py writes: the per-node script started twice
(NODE_RANK 0 and 1, loopback master, no ssh), and the sbatch script under a recorded srun stand-in that starts its
command once per node. Each node runs the real DeepSpeed launcher with one CPU rank; training completes and both
nodes log the same loss at every step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env, series

pytestmark = pytest.mark.slow

STEP = re.compile(r"rank(\d)\] INFO step (\d+)/\d+ loss ([0-9.]+)")


def _render(recipe: Path, out: Path, scheduler: str, port: int) -> Path:
    from dapt.submit import FILES, main

    code = main(["--recipe", str(recipe), f"--output_dir={out}", "--train.max_steps=6", "--log.all_ranks=true",
                 f"--submit.scheduler={scheduler}", "--cluster.nodes=2", "--cluster.gpus_per_node=1",
                 "--cluster.gpu=cpu", f"--cluster.master_port={port}", f"--submit.venv={sys.prefix}"])
    assert code == 0
    return out / "submit" / FILES[scheduler]


def _losses(text: str) -> dict[int, dict[int, str]]:
    """{rank: {step: loss as logged}}."""
    found: dict[int, dict[int, str]] = {}
    for rank, step, loss in STEP.findall(text):
        found.setdefault(int(rank), {})[int(step)] = loss
    return found


def _check_run(out: Path, text: str) -> None:
    losses = _losses(text)
    assert set(losses) == {0, 1}, text[-3000:]
    assert losses[0] == losses[1] and set(losses[0]) == set(range(1, 7)), losses
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    logged = {s: f"{v:.4f}" for s, v in series(out, "train/loss")}
    assert logged == losses[0]


def test_two_local_nodes_run_the_rendered_per_node_script(recipe, tmp_path):
    from dapt.dist import free_port

    out = tmp_path / "run"
    script = _render(recipe, out, "nodes", free_port())
    procs = [subprocess.Popen(["bash", str(script)], env=child_env() | {"NODE_RANK": str(i),
                                                                        "MASTER_ADDR": "127.0.0.1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for i in range(2)]
    texts = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(t[-3000:] for t in texts)
    _check_run(out, "\n".join(texts))


def test_the_rendered_sbatch_script_runs_two_nodes_under_a_recorded_srun(recipe, tmp_path):
    from dapt.dist import free_port

    out = tmp_path / "run"
    script = _render(recipe, out, "slurm", free_port())
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    record = tmp_path / "srun.jsonl"
    env = child_env() | {"PATH": f"{ROOT / 'tests' / 'shims'}:{child_env()['PATH']}", "SRUN_RECORD": str(record),
                         "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(out, proc.stdout + proc.stderr)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert (out / "submit" / "hostfile.4242").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"
