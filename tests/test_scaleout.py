"""Scale-out without a cluster: hostfiles (against DeepSpeed's own parser), the jobs launch/submit.py renders (run
with hostile values under a recording stand-in for the launcher, to check they stay inert), and launch/doctor.py."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

HOSTILE = [
    "$(touch {m})",
    "`touch {m}`",
    "a; touch {m}",
    'it\'s "quoted" && touch {m}',
    "two  spaces\ttab",
    "x' ; touch {m} ; '",
    "$HOME ${{PATH}}",
    "line\\nbreak | touch {m}",
]


def _submit(argv, capsys):
    from dapt.tools.submit import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def _doctor(argv, capsys):
    from dapt.tools.doctor import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


# ---- hostfiles ----


def test_shipped_hostfiles_read_the_same_as_deepspeed_reads_them():
    from deepspeed.launcher.runner import _parse_hostfile

    from dapt.runtime.hosts import read_hostfile

    shipped = sorted((ROOT / "hostfiles").iterdir())
    assert {p.name for p in shipped} >= {"localhost", "local_two_nodes", "two_g7e", "four_a100"}
    for path in shipped:
        ours = read_hostfile(str(path))
        assert ours.problems == [], path
        assert ours.hosts == dict(_parse_hostfile(path.read_text().splitlines())), path
        assert path.read_text().startswith("#"), f"{path} has no comment saying what it is for"
    assert read_hostfile(str(ROOT / "hostfiles" / "two_g7e")).slots == 16
    assert read_hostfile(str(ROOT / "hostfiles" / "four_a100")).slots == 32


@pytest.mark.parametrize(
    "text, line, deepspeed_refuses",
    [
        ("node-1 slots=8\nnode-2 slot=8\n", 2, True),
        ("node-1 slots=8\nnode-2 slots=eight\n", 2, True),
        ("# two nodes\nnode-1 slots=8\n\nnode-1 slots=8\n", 4, True),
        ("node-1slots=8\n", 1, True),
        ("node-1 slots=8\nnode-2 slots=0\n", 2, False),  # DeepSpeed starts, then has no rank for node-2
        ("node-1 slots=8 gpus=4\n", 1, False),  # DeepSpeed ignores the rest of the line
        ("node-1 slots=8,9\n", 1, False),
    ],
)
def test_hostfile_typos_are_named_with_their_line(tmp_path, text, line, deepspeed_refuses):
    from deepspeed.launcher.runner import _parse_hostfile

    from dapt.runtime.hosts import read_hostfile

    path = tmp_path / "hostfile"
    path.write_text(text)
    problems = read_hostfile(str(path)).problems
    assert len(problems) == 1 and f"{path} line {line}:" in problems[0], problems
    if deepspeed_refuses:
        with pytest.raises(ValueError):
            _parse_hostfile(text.splitlines())


def test_an_empty_or_missing_hostfile_is_a_problem(tmp_path):
    from dapt.runtime.hosts import read_hostfile

    (tmp_path / "empty").write_text("# nothing\n\n")
    assert "no `host slots=N` line" in read_hostfile(str(tmp_path / "empty")).problems[0]
    assert "cannot read" in read_hostfile(str(tmp_path / "absent")).problems[0]


# ---- submit: rendering and inertness ----


def _fake_bin(tmp_path: Path) -> Path:
    """A bin folder whose deepspeed, srun and scontrol record their arguments; srun runs its command per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "deepspeed"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['DS_RECORD'], 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'hostfile': open(sys.argv[2]).read() if "
        "sys.argv[1] == '--hostfile' and os.path.exists(sys.argv[2]) else None, "
        "'env': {k: v for k, v in os.environ.items() if k.startswith(('WANDB_', 'HF_', 'MY_', 'NCCL_'))}"
        "}) + '\\n')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    for shim in ("srun", "scontrol"):
        (bin_dir / shim).symlink_to(ROOT / "tests" / "shims" / shim)
    return bin_dir


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _hostile_args(tmp_path: Path, marker: Path) -> list[str]:
    values = [v.format(m=marker) for v in HOSTILE]
    return [
        "--train.max_steps=3",
        f"--data.train={json.dumps(values)}",
        f"--log.run_name={values[0]}",
        f"--output_dir={tmp_path / 'run'}",
        "--cluster.nodes=2",
        "--cluster.gpus_per_node=1",
        "--cluster.env=[MY_VALUE]",
        "--submit.venv=/nonexistent/venv",
        f"--submit.workdir={tmp_path}",
    ]


@pytest.mark.parametrize("scheduler", ["slurm", "nodes", "skypilot"])
def test_hostile_values_stay_inert_in_every_rendered_job(tmp_path, capsys, monkeypatch, scheduler):
    """Command substitution, quotes, ;, backticks and spaces in data paths, the run name and carried variables reach
    each rank as the same strings, and run nothing: the job is executed for real under recording stand-ins."""
    from dapt.tools.submit import job_args

    marker = tmp_path / "pwned"
    monkeypatch.setenv("WANDB_PROJECT", f"proj $(touch {marker}) `touch {marker}`")
    monkeypatch.setenv("MY_VALUE", f"a'b\"c; touch {marker}")
    monkeypatch.setenv("WANDB_API_KEY", "sk-secret-value-123456")
    argv = _hostile_args(tmp_path, marker) + [f"--submit.scheduler={scheduler}", "--cluster.gpu=RTX-4090"]
    code, out = _submit(argv, capsys)
    assert code == 0, out.err
    job = next((tmp_path / "run" / "submit").iterdir())
    text = job.read_text()
    assert "sk-secret-value-123456" not in text  # secrets are named, never written
    env = {
        **os.environ,
        "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
        "DS_RECORD": str(tmp_path / "ds"),
        "SRUN_RECORD": str(tmp_path / "srun"),
        "TMPDIR": str(tmp_path),
    }
    if scheduler == "skypilot":
        task = yaml.safe_load(text)
        script = tmp_path / "run.sh"
        script.write_text(task["run"])
        env |= {k: str(v) for k, v in task["envs"].items()} | {"SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n"}
        runs = [{"SKYPILOT_NODE_RANK": str(i)} for i in range(2)]
    elif scheduler == "slurm":
        script, runs = (
            job,
            [{"SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_NNODES": "2", "SLURM_JOB_ID": "77"}],
        )
    else:
        script, runs = job, [{"NODE_RANK": str(i), "MASTER_ADDR": "10.0.0.1"} for i in range(2)]
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for extra in runs:
        proc = subprocess.run(
            ["bash", str(script)], env=env | extra, capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
    records = _records(tmp_path / "ds")
    assert len(records) == 2 and not marker.exists()
    expected = ["launch/mlm.py", *job_args([str(a) for a in argv])]
    for node, r in enumerate(sorted(records, key=lambda r: [a for a in r["argv"] if "node_rank" in a])):
        assert r["argv"][r["argv"].index("launch/mlm.py") :] == expected
        assert f"--node_rank={node}" in r["argv"] and "--no_ssh" in r["argv"]
        assert len(r["hostfile"].splitlines()) == 2 and r["hostfile"].split()[1] == "slots=1"
        assert r["env"]["WANDB_PROJECT"] == os.environ["WANDB_PROJECT"]
        assert r["env"]["MY_VALUE"] == os.environ["MY_VALUE"]
        assert r["env"]["NCCL_P2P_DISABLE"] == "1"  # RTX 4090: no peer-to-peer
    if scheduler == "slurm":
        srun = _records(tmp_path / "srun")
        assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "--ntasks-per-node=1" in srun[0]
        assert records[0]["hostfile"] == "node-a slots=1\nnode-b slots=1\n"
        assert all("--master_addr=node-a" in r["argv"] for r in records)


def test_a_secret_missing_where_the_job_starts_stops_it_with_its_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    code, out = _submit(
        [
            "--submit.scheduler=nodes",
            f"--output_dir={tmp_path / 'run'}",
            "--cluster.nodes=2",
            "--submit.venv=/nonexistent",
        ],
        capsys,
    )
    assert code == 0, out.err
    job = tmp_path / "run" / "submit" / "node.sh"
    assert "hf_xxxx" not in job.read_text()
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {
        "NODE_RANK": "0",
        "MASTER_ADDR": "10.0.0.1",
    }
    proc = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "HF_TOKEN is not set" in proc.stderr


def test_the_per_node_script_refuses_a_node_rank_outside_the_job(tmp_path, capsys):
    code, _ = _submit(
        ["--submit.scheduler=nodes", f"--output_dir={tmp_path / 'run'}", "--cluster.nodes=2"], capsys
    )
    assert code == 0
    env = os.environ | {"NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        ["bash", str(tmp_path / "run" / "submit" / "node.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "this job has 2 nodes, ranks 0..1" in proc.stderr


def test_skypilot_task_names_the_right_accelerators(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-secret-value-123456")
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    cases = {
        ("--submit.instance=g7e.48xlarge",): ("RTXPRO6000:8", 16),
        ("--cluster.gpu=A100-40GB", "--cluster.gpus_per_node=8"): ("A100:8", 16),
        ("--cluster.gpu=H100-80GB", "--cluster.gpus_per_node=4", "--submit.use_spot=true"): ("H100:4", 8),
    }
    for extra, (accelerators, world) in cases.items():
        out_dir = tmp_path / accelerators.replace(":", "_")
        code, out = _submit(
            [
                "--submit.scheduler=skypilot",
                "--cluster.nodes=2",
                "--data.streams=16",
                f"--output_dir={out_dir}",
                "--submit.cloud=aws",
                *extra,
            ],
            capsys,
        )
        assert code == 0, out.err
        text = (out_dir / "submit" / "task.yaml").read_text()
        task = yaml.safe_load(text)
        assert task["resources"]["accelerators"] == accelerators and task["num_nodes"] == 2
        assert task["resources"]["infra"] == "aws"
        assert task["secrets"] == {"WANDB_API_KEY": None} and task["envs"]["WANDB_ENTITY"] == "lab"
        assert "sk-secret" not in text and "--secret WANDB_API_KEY" in text
        assert f"world size {world}" in text
        assert subprocess.run(["bash", "-n"], input=task["run"], text=True).returncode == 0
    assert task["resources"]["use_spot"] is True


def test_pdsh_job_writes_deepspeeds_env_file_and_refuses_values_it_would_expand(
    tmp_path, capsys, monkeypatch
):
    hostfile = ROOT / "hostfiles" / "two_g7e"
    monkeypatch.setenv("WANDB_PROJECT", "domain-adapt")
    monkeypatch.setenv("HF_HOME", "/data/hf cache")
    base = [
        "--submit.scheduler=pdsh",
        f"--cluster.hostfile={hostfile}",
        "--data.streams=16",
        f"--output_dir={tmp_path / 'run'}",
        "--cluster.gpu=RTX-4090",
    ]
    code, out = _submit(base, capsys)
    assert code == 0, out.err
    folder = tmp_path / "run" / "submit"
    env_file = folder / "deepspeed_env"
    lines = env_file.read_text().splitlines()
    assert "WANDB_PROJECT=domain-adapt" in lines and "HF_HOME=/data/hf cache" in lines
    assert "NCCL_P2P_DISABLE=1" in lines and all(
        "=" in line for line in lines
    )  # DeepSpeed's reader needs KEY=VALUE
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    launch_sh = (folder / "launch.sh").read_text()
    assert f"DS_ENV_FILE={env_file.resolve()}" in launch_sh and f"--hostfile {hostfile}" in launch_sh
    assert "world size 16" in out.out
    from deepspeed.launcher.multinode_runner import PDSHRunner  # what DeepSpeed does with each line

    runner = PDSHRunner.__new__(PDSHRunner)
    runner.exports = {}
    for line in lines:
        runner.add_export(*line.split("=", 1))
    assert runner.exports["HF_HOME"] == '"/data/hf cache"'

    assert "2 hosts of" in launch_sh and "world size 16" in launch_sh
    monkeypatch.setenv("WANDB_API_KEY", "sk-secret-value-123456")
    code, out = _submit(base + ["--dry_run", f"--output_dir={tmp_path / 'dry'}"], capsys)
    assert code == 0 and "WANDB_API_KEY=***" in out.out and "sk-secret" not in out.out  # printed masked
    assert not (tmp_path / "dry").exists()
    monkeypatch.delenv("WANDB_API_KEY")

    monkeypatch.setenv("WANDB_NOTES", "run $(touch /tmp/x)")
    code, out = _submit(base + [f"--output_dir={tmp_path / 'run2'}"], capsys)
    assert code == 2 and "WANDB_NOTES holds $" in out.err and not (tmp_path / "run2").exists()


def test_submit_reports_every_problem_at_once_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out = _submit(
        [
            "--submit.scheduler=slurm",
            "--submit.job_name=x;rm -rf ~",
            "--submit.partition=gpu a",
            "--cluster.nodes=3",
            "--cluster.gpus_per_node=4",
            "--train.micro_batch_size=0",
            "--cluster.env=[NOT-A-NAME]",
            "--submit.entry=launch/nope.py",
            "--cluster.master_port=70000",
            f"--output_dir={out_dir}",
        ],
        capsys,
    )
    assert code == 2 and not out_dir.exists()
    for expected in (
        "submit.job_name: 'x;rm -rf ~'",
        "submit.partition: 'gpu a'",
        "data.streams: 8 is not a multiple of the world size 12",
        "--data.streams=12",
        "train.micro_batch_size: 0",
        "cluster.env: 'NOT-A-NAME'",
        "submit.entry: 'launch/nope.py'",
        "cluster.master_port: 70000",
    ):
        assert expected in out.err, (expected, out.err)
    code, out = _submit(
        [
            "--submit.scheduler=skypilot",
            "--submit.instance=g7e.48xlarge",
            "--cluster.gpus_per_node=4",
            "--cluster.gpu=H100-80GB",
            f"--output_dir={out_dir}",
        ],
        capsys,
    )
    assert (
        code == 2 and "submit.instance g7e.48xlarge has 8 GPUs" in out.err and "has RTX-PRO-6000" in out.err
    )
    code, out = _submit(["--submit.scheduler=slurm", f"--output_dir={tmp_path / 'a b'}"], capsys)
    assert code == 2 and "#SBATCH --output" in out.err


def test_dry_run_prints_the_job_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out = _submit(
        [
            "--dry_run",
            "--submit.scheduler=slurm",
            "--cluster.nodes=2",
            "--cluster.gpus_per_node=4",
            f"--output_dir={out_dir}",
            "--submit.partition=a100",
            "--submit.time=2-00:00:00",
        ],
        capsys,
    )
    assert code == 0 and not out_dir.exists()
    assert "#SBATCH --nodes=2" in out.out and "#SBATCH --gpus-per-node=4" in out.out
    assert "#SBATCH --partition=a100" in out.out and "#SBATCH --time=2-00:00:00" in out.out
    assert "world size 8, global batch = 16 x 1 x 8 = 128 rows (dry run: nothing written)" in out.out


# ---- doctor ----


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _verdicts(text: str) -> dict[str, str]:
    rows = [line.split(None, 1) for line in text.splitlines() if line[:4] in ("OK  ", "WARN", "FAIL", "SKIP")]
    return {rest.split("  ")[0].strip(): verdict for verdict, rest in rows}


def test_doctor_passes_a_sound_setup_and_writes_nothing(recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    before = _tree(tmp_path)
    from conftest import free_port

    code, out = _doctor(
        [
            "--recipe",
            recipe,
            "--cluster.gpu=cpu",
            f"--cluster.hostfile={hostfile}",
            f"--output_dir={tmp_path / 'run'}",
            "--data.streams=2",
            f"--cluster.master_port={free_port()}",
        ],
        capsys,
    )
    assert code == 0, out.out
    v = _verdicts(out.out)
    assert v["recipe and ds config"] == v["world size"] == v["hostfile"] == v["disk"] == "OK", out.out
    assert v["master address"] == "OK" and "world size 2 from the hostfile" in out.out
    assert "verdict: ready" in out.out and _tree(tmp_path) == before


def test_doctor_catches_a_world_size_that_does_not_divide_the_batch_and_a_hostfile_typo(
    recipe, tmp_path, capsys
):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": 48,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 2},
            }
        )
    )
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode-1 slots=4\nnode-2 slots=4\nnode-3 slot=4\n")
    before = _tree(tmp_path)
    code, out = _doctor(
        [
            "--recipe",
            recipe,
            "--ds",
            ds,
            f"--cluster.hostfile={hostfile}",
            "--cluster.gpu=cpu",
            f"--output_dir={tmp_path / 'run'}",
            "--cluster.master_addr=127.0.0.1",
        ],
        capsys,
    )
    assert code == 2
    v = _verdicts(out.out)
    assert v["hostfile"] == "FAIL" and f"{hostfile} line 4: 'node-3 slot=4' is not `host slots=N`" in out.out
    assert (
        v["world size"] == "FAIL"
        and "ds train_batch_size = 48 is not divisible by micro batch x world size = 8 x 8" in out.out
    )
    assert "verdict: 2 failed (world size, hostfile)" in out.out and _tree(tmp_path) == before

    code, out = _doctor(
        [
            "--recipe",
            recipe,
            "--cluster.nodes=3",
            "--cluster.gpus_per_node=1",
            "--cluster.gpu=cpu",
            f"--output_dir={tmp_path / 'run'}",
        ],
        capsys,
    )
    assert code == 2 and "data.streams: 8 is not a multiple of the world size 3" in out.out


def test_doctor_checks_the_master_address_and_port(recipe, tmp_path, capsys):
    base = ["--recipe", recipe, "--cluster.gpu=cpu", f"--output_dir={tmp_path / 'run'}"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = _doctor(
            base + ["--cluster.master_addr=127.0.0.1", f"--cluster.master_port={port}"], capsys
        )
        assert code == 2 and "the port is taken" in out.out
        with (
            socket.socket() as other
        ):  # 127.0.0.2 is loopback too, but not one of this host's names: a "remote" node
            other.bind(("127.0.0.2", 0))
            other.listen()
            code, out = _doctor(
                base + ["--cluster.master_addr=127.0.0.2", f"--cluster.master_port={other.getsockname()[1]}"],
                capsys,
            )
            assert (
                code == 0 and _verdicts(out.out)["master address"] == "WARN" and "already listens" in out.out
            )
    code, out = _doctor(base + ["--cluster.master_addr=127.0.0.2", f"--cluster.master_port={port}"], capsys)
    assert code == 0 and "reachable (127.0.0.2); the port is closed" in out.out
    code, out = _doctor(base + ["--cluster.master_addr=no-such-node.invalid"], capsys)
    assert code == 2 and "no-such-node.invalid does not resolve" in out.out


def test_doctor_refuses_a_disk_too_small_for_the_checkpoints(recipe, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, out = _doctor(["--recipe", recipe, "--cluster.gpu=cpu", f"--output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and _verdicts(out.out)["disk"] == "FAIL" and "3 kept + 1 being written" in out.out


def test_doctor_and_submit_have_help(capsys):
    for run in (_doctor, _submit):
        code, out = run(["--help"], capsys)
        assert code == 0 and "--cluster.hostfile" in out.out and "--submit.scheduler" in out.out
