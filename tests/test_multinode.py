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
    from dapt.tools.submit import FILES, main

    code = main(
        [
            "--recipe",
            str(recipe),
            f"--output_dir={out}",
            "--train.max_steps=6",
            "--log.all_ranks=true",
            f"--submit.scheduler={scheduler}",
            "--cluster.nodes=2",
            "--cluster.gpus_per_node=1",
            "--cluster.gpu=cpu",
            f"--cluster.master_port={port}",
            f"--submit.venv={sys.prefix}",
        ]
    )
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
    for r in (0, 1):  # each rank says where it runs and what environment reached it
        assert re.search(
            rf"rank{r}\] INFO rank {r} of 2 on .*rendezvous \S+:\d+; NCCL: .*carried: .*WANDB_MODE", text
        ), text[-3000:]


def test_two_local_nodes_run_the_rendered_per_node_script(recipe, tmp_path):
    from conftest import free_port

    out = tmp_path / "run"
    script = _render(recipe, out, "nodes", free_port())
    procs = [
        subprocess.Popen(
            ["bash", str(script)],
            env=child_env() | {"NODE_RANK": str(i), "MASTER_ADDR": "127.0.0.1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    texts = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(t[-3000:] for t in texts)
    _check_run(out, "\n".join(texts))


def test_the_rendered_sbatch_script_runs_two_nodes_under_a_recorded_srun(recipe, tmp_path):
    from conftest import free_port

    out = tmp_path / "run"
    script = _render(recipe, out, "slurm", free_port())
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    record = tmp_path / "srun.jsonl"
    env = child_env() | {
        "PATH": f"{ROOT / 'tests' / 'shims'}:{child_env()['PATH']}",
        "SRUN_RECORD": str(record),
        "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
    }
    proc = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(out, proc.stdout + proc.stderr)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert (out / "submit" / "hostfile.4242").read_text() == "localhost slots=1\n127.0.0.1 slots=1\n"


SLURM_CONF = """ClusterName=dapttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm(tmp_path):
    """A real two-node SLURM cluster on this machine (Debian's slurm-wlm: one slurmctld, two slurmd), for root."""
    import os
    import shutil
    import socket
    import time

    from conftest import free_port

    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "sinfo") if not shutil.which(b)]
    if missing or os.geteuid() != 0:
        pytest.skip(
            f"a real SLURM needs Debian's slurm-wlm ({', '.join(missing)} not installed: apt-get install "
            "slurm-wlm) and root"
            if missing
            else "a real SLURM cluster is started as root only"
        )
    root = tmp_path / "slurm"
    for d in ("state", "spool/n1", "spool/n2"):
        (root / d).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=socket.gethostname(), root=root, ctld_port=free_port(), port1=free_port(), port2=free_port()
        )
    )
    env = child_env() | {"SLURM_CONF": str(conf)}
    daemons = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cmd in (["slurmctld", "-D"], ["slurmd", "-D", "-N", "n1"], ["slurmd", "-D", "-N", "n2"])
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%D %T"], env=env, capture_output=True, text=True
            ).stdout
            if state.split() == ["2", "idle"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"SLURM did not come up: {state!r}\n{(root / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.wait(timeout=30)


def test_the_rendered_sbatch_script_runs_two_nodes_under_a_real_slurm(recipe, tmp_path, slurm):
    """sbatch reads the #SBATCH lines, srun starts the launcher on both nodes, scontrol lists them. The node names
    n1/n2 do not resolve here, so the master address is given; everything else comes from the allocation."""
    from conftest import free_port

    from dapt.tools.submit import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "--recipe",
                str(recipe),
                f"--output_dir={out}",
                "--train.max_steps=6",
                "--log.all_ranks=true",
                "--submit.scheduler=slurm",
                "--cluster.nodes=2",
                "--cluster.gpu=cpu",
                "--cluster.master_addr=127.0.0.1",
                f"--cluster.master_port={free_port()}",
                f"--submit.venv={sys.prefix}",
                "--submit.time=0:10:00",
                "--submit.partition=debug",
            ]
        )
        == 0
    )
    proc = subprocess.run(
        ["sbatch", "--wait", str(out / "submit" / "job.sbatch")],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    job_id = proc.stdout.split()[-1]
    log = out / "submit" / f"slurm-{job_id}.out"
    assert proc.returncode == 0, proc.stderr + (log.read_text()[-4000:] if log.exists() else "")
    _check_run(out, log.read_text())
    assert (out / "submit" / f"hostfile.{job_id}").read_text() == "n1 slots=1\nn2 slots=1\n"
