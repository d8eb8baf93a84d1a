"""What a new user meets first, off the GPU: crashes that end in one message, launchers, the first runs of a
small corpus (issue "Run where users run", items 10-19)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT, child_env


def test_a_crash_while_readers_are_open_prints_no_shutdown_tracebacks(tmp_path):
    """A reader suspended in a crashing frame is closed at interpreter shutdown, when nothing can be imported: its
    GeneratorExit must not print "Exception ignored in: <generator ...>" screens under the real error."""
    data = tmp_path / "docs.txt"
    data.write_text("one\ntwo\nthree\n" * 20)
    script = textwrap.dedent("""
        from dapt.data.formats import READERS, FormatOptions
        from dapt.data.sources import Position

        def run():
            readers = [READERS[f](%r, Position(), FormatOptions()) for f in ("lines", "docs", "lines")]
            for r in readers:
                next(r)
            raise RuntimeError("the real error")

        run()
    """) % str(data)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=120
    )
    assert proc.returncode == 1
    assert "RuntimeError: the real error" in proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------- the config a first command gives


def test_epochs_on_the_command_line_beat_the_defaults_max_steps(recipe):
    from dapt.cli.load import load_config

    default = load_config(["--train.epochs=1"], world_size=1, accelerator="cpu")
    assert default.train.max_steps == 0 and default.train.epochs == 1
    assert any("replaces the train.max_steps=300 of the embedded default" in n for n in default.notes)
    assert (
        load_config([], world_size=1, accelerator="cpu").train.max_steps == 300
    )  # the default keeps its length
    from_recipe = load_config(["--recipe", str(recipe), "--train.epochs=2"], world_size=1, accelerator="cpu")
    assert from_recipe.train.max_steps == 0 and from_recipe.train.epochs == 2
    both = load_config(
        ["--recipe", str(recipe), "--train.epochs=2", "--train.max_steps=4"], world_size=1, accelerator="cpu"
    )
    assert both.train.max_steps == 4 and not [
        n for n in both.notes if "replaces" in n
    ]  # both typed: max_steps


def test_a_hub_id_that_cannot_be_fetched_is_one_line_before_any_rank_starts(tmp_path):
    from conftest import launch

    proc = launch(
        ["--model.name_or_path=nobody-here/no-such-encoder", "--output_dir", tmp_path / "r"],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    line = next(x for x in proc.stderr.splitlines() if "no-such-encoder" in x)
    assert (
        "model.name_or_path 'nobody-here/no-such-encoder' cannot be loaded" in line
        and "HF_HUB_OFFLINE" in line
    )
    assert not (tmp_path / "r").exists()  # nothing started


def test_rows_longer_than_a_pretrained_models_positions_are_a_config_error(tmp_path, corpus_file):
    from conftest import TINY_MODEL
    from transformers import AutoConfig, AutoModelForMaskedLM

    from dapt.cli.load import collect_config
    from dapt.model.build import train_wordpiece

    folder = tmp_path / "pretrained"
    fields = dict(TINY_MODEL)
    AutoModelForMaskedLM.from_config(
        AutoConfig.for_model(fields.pop("model_type"), vocab_size=300, **fields)
    ).save_pretrained(folder)
    train_wordpiece(["a small corpus"], 300, 64).save_pretrained(folder)
    _, problems = collect_config(
        ["--model.name_or_path", str(folder), "--data.train", str(corpus_file), "--data.max_seq_length=128"],
        world_size=1,
        accelerator="cpu",
    )
    assert problems == [
        f"data.max_seq_length: 128 is longer than {folder} has position embeddings for (64 tokens); "
        "set --data.max_seq_length=64 or less"
    ]
    _, fits = collect_config(
        ["--model.name_or_path", str(folder), "--data.train", str(corpus_file), "--data.max_seq_length=64"],
        world_size=1,
        accelerator="cpu",
    )
    assert fits == []


def test_a_from_scratch_model_gets_positions_for_its_rows(tmp_path, recipe):
    """The tiny recipe's model has 64 positions; rows of 96 tokens grow the table instead of crashing inside the
    embeddings (RoBERTa counts from pad_token_id + 1, so it needs two more)."""
    from conftest import run_inprocess

    out = tmp_path / "r"
    run_inprocess(
        ["--recipe", recipe, "--output_dir", out, "--data.max_seq_length=96", "--train.max_steps=2"]
    )
    saved = __import__("json").loads((out / "final" / "config.json").read_text())
    assert saved["max_position_embeddings"] == 96

    from transformers import AutoConfig

    from dapt.model.archs import position_limit
    from dapt.model.build import grow_positions

    roberta = AutoConfig.for_model("roberta", max_position_embeddings=64, pad_token_id=1)
    grow_positions(roberta, 96)
    assert roberta.max_position_embeddings == 98 and position_limit(roberta) == 96
    # no table of absolute positions to outgrow: rotary ModernBERT, DeBERTa-v3's relative positions
    assert position_limit(AutoConfig.for_model("modernbert")) is None
    assert position_limit(AutoConfig.for_model("deberta-v2", position_biased_input=False)) is None


# ---------------------------------------------------------------- a first corpus


def test_one_epoch_trains_every_document(recipe, tmp_path):
    """Streams of unequal length finish their pass at different global rows, and the last global batch is rarely
    full: stopping at floor(rows / batch) steps left documents untrained without a word (29 of ~5,000 CSIC requests).
    One epoch now runs until every stream's rows are trained; the last step is completed from the next pass."""
    import json

    from conftest import run_inprocess

    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"request {i} asks for page {i % 7} of the shop\n" for i in range(203)))
    out = tmp_path / "r"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--data.train",
            docs,
            "--data.packing=pad",
            "--train.epochs=1",
            "--data.valid_fraction=0",
            "--data.log_sample_ids=true",
            "--train.micro_batch_size=8",
            "--train.eval_every=0",
            "--checkpoint.every=0",
        ]
    )
    trained = {line.rsplit(":", 1)[1] for line in (out / "samples.rank0.txt").read_text().split()}
    assert trained == {str(i) for i in range(1, 204)}  # every line of the file, by line number
    assert summary["epoch_rows"] == 203 and summary["rows_trained"] == summary["steps"] * 8 >= 203
    assert summary["steps"] == 26  # ceil(203 / 8) with 8 streams of 25-26 rows: the pass ends at row 203
    assert json.loads((out / "summary.json").read_text())["rows_trained"] == 208


def test_a_corpus_smaller_than_the_stream_count_trains_with_fewer_streams(recipe, tmp_path):
    """Five documents and data.streams=8 stopped with "data stream 5 of 8 gets no documents": the stream count is now
    derived from the data (the largest divisor of data.streams with a record run for each), the same on any world
    size, and logged."""
    from conftest import run_inprocess, series

    docs = tmp_path / "five.txt"
    docs.write_text("".join(f"document {i} says the attacker used the login form\n" for i in range(5)))
    args = [
        "--recipe",
        recipe,
        "--data.train",
        docs,
        "--data.valid_fraction=0",
        "--train.max_steps=3",
        "--train.eval_every=0",
        "--checkpoint.every=0",
        "--train.micro_batch_size=2",
    ]
    run_inprocess(args + ["--output_dir", tmp_path / "derived"])
    run_inprocess(args + ["--output_dir", tmp_path / "explicit", "--data.streams=4"])
    assert series(tmp_path / "derived", "train/loss") == series(tmp_path / "explicit", "train/loss")
    import yaml

    resolved = yaml.safe_load((tmp_path / "derived" / "config.resolved.yaml").read_text())
    assert resolved["data"]["streams"] == 4
    # the checkpoint records the streams the run read, and the same command again resumes from it (not refused)
    from dapt.runtime.checkpoint import safe_load

    (point,) = (tmp_path / "derived" / "checkpoints").glob("step_*")
    assert safe_load(point / "mp_rank_00_model_states.pt")["data"]["num_streams"] == 4
    assert run_inprocess(args + ["--output_dir", tmp_path / "derived"])["steps"] == 3


# ---------------------------------------------------------------- launchers


def test_a_non_editable_install_runs_the_first_command_from_a_copy_of_launch(tmp_path):
    """pip install . (not -e) puts dapt in site-packages, away from launch/: the guard that keeps launch/profile.py
    from shadowing the standard library's profile must find the launch folder wherever it is; and the installed
    `dapt` command runs without launch/."""
    import shutil

    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    shutil.copytree(ROOT / "launch", tmp_path / "launch")
    env = {**child_env(), "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import dapt; print(dapt.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert where.stdout.strip().startswith(str(site))  # the installed copy, not this checkout
    proc = subprocess.run(
        [
            sys.executable,
            "launch/mlm.py",
            "--train.max_steps=2",
            "--output_dir",
            "run",
            "--log.progress=false",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    # the installed console script (setup.cfg's entry point), from the same non-editable install (issue 15)
    console = subprocess.run(
        [sys.executable, str(site / "bin" / "dapt"), "mlm", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path / "run",
        timeout=120,
    )
    assert console.returncode == 0 and "usage: dapt mlm" in console.stdout and "[masking]" in console.stdout


def _two_rank_run(tmp_path, recipe, cmd_prefix: list[str], envs: list[dict], name: str) -> list[str]:
    """Run launch/mlm.py on two CPU ranks as `cmd_prefix` starts it (one command, or one process per env in `envs`),
    and return the logs; the run must be one world of 2."""
    import json

    out = tmp_path / name
    args = [
        str(ROOT / "launch" / "mlm.py"),
        "--recipe",
        str(recipe),
        "--output_dir",
        str(out),
        "--train.max_steps=3",
        "--train.eval_every=0",
        "--checkpoint.every=0",
    ]
    procs = [
        subprocess.Popen(
            cmd_prefix + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**child_env(), **env},
            cwd=tmp_path,
        )
        for env in envs
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert (out / "final" / "model.safetensors").exists()
    return logs


def test_torchrun_makes_one_two_rank_run(tmp_path, recipe):
    from conftest import free_port

    logs = _two_rank_run(
        tmp_path,
        recipe,
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ],
        [{}],
        "torchrun",
    )
    assert "rank 0 of 2" in logs[0] and "started by torchrun" in logs[0]


def test_srun_and_mpirun_style_ranks_find_each_other(tmp_path, recipe):
    """One plain `python launch/mlm.py` per rank, as `srun` or `mpirun -np 2` start them (no torch launcher): the
    scheduler's variables give rank, world size, local rank and the first node; before, each process made itself
    rank 0 of 1 and two runs wrote one output_dir."""
    from conftest import free_port

    slurm = [
        {
            "SLURM_PROCID": str(r),
            "SLURM_LOCALID": str(r),
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NODELIST": "localhost",
            "MASTER_PORT": str(free_port()),
        }
        for r in range(2)
    ]
    slurm[1]["MASTER_PORT"] = slurm[0]["MASTER_PORT"]
    logs = _two_rank_run(tmp_path, recipe, [sys.executable], slurm, "srun")
    assert "rank 0 of 2" in logs[0] and "started by srun" in logs[0] and "rendezvous localhost:" in logs[0]
    port = str(free_port())
    ompi = [
        {
            "OMPI_COMM_WORLD_RANK": str(r),
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_PORT": port,
        }
        for r in range(2)
    ]
    logs = _two_rank_run(tmp_path, recipe, [sys.executable], ompi, "mpirun")
    assert "started by mpirun (Open MPI)" in logs[0] and "rendezvous 127.0.0.1:" in logs[0]


def test_scheduler_variables_map_to_ranks_or_a_clear_refusal():
    import pytest

    from dapt.runtime.group import LaunchError, first_host, scheduler_env

    assert first_host("gpu-[03-05,9],cpu1") == "gpu-03" and first_host("node7") == "node7"
    assert first_host("node[01-04]-ib") == "node01-ib" and first_host("rack[1-2]-n[01-04],x") == "rack1-n01"
    # srun --gpus-per-task=1: each task sees one GPU, whatever its local rank
    assert (
        scheduler_env(
            {
                "SLURM_PROCID": "3",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_LOCALID": "3",
                "SLURM_STEP_NODELIST": "n1",
            },
            devices=1,
        )[1]["LOCAL_RANK"]
        == "0"
    )
    # mpirun inside a SLURM allocation: its ranks also carry the srun step's variables, which are not theirs
    inside = scheduler_env(
        {
            "SLURM_PROCID": "1",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_LOCALID": "0",
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
            "MASTER_ADDR": "n1",
        }
    )
    assert inside[0] == "mpirun (Open MPI)" and inside[1]["RANK"] == "5" and inside[1]["WORLD_SIZE"] == "8"
    name, env = scheduler_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_LOCALID": "5",
            "SLURM_STEP_NODELIST": "a100-[12-13]",
            "SLURM_JOB_ID": "987654",
        }
    )
    assert name == "srun" and env == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "a100-12",
        "MASTER_PORT": str(20000 + 987654 % 20000),
    }
    # an sbatch script's own body (no srun step) and launcher-started ranks are left alone
    assert scheduler_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None
    assert (
        scheduler_env({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"})
        is None
    )
    with pytest.raises(
        LaunchError, match="export MASTER_ADDR"
    ):  # mpirun over two nodes, nothing names the first
        scheduler_env(
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
        )
    assert (
        scheduler_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})[1][
            "MASTER_ADDR"
        ]
        == "127.0.0.1"
    )


def test_accelerate_launch_is_honoured(tmp_path, recipe):
    """accelerate launch's DeepSpeed config file and mixed precision, or its ZeRO flags without a file, reach the run
    (it starts the ranks through torchrun); contradictions with the command line are config errors."""
    from conftest import free_port

    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "--use_deepspeed",
    ]
    logs = _two_rank_run(
        tmp_path,
        recipe,
        accelerate + ["--deepspeed_config_file", str(ROOT / "ds_configs" / "zero2_bf16.json")],
        [{}],
        "file",
    )
    assert "ds config from accelerate launch --deepspeed_config_file" in logs[0]
    assert "ZeRO stage 2, precision bf16" in logs[0] and "started by accelerate launch" in logs[0]
    logs = _two_rank_run(
        tmp_path,
        recipe,
        accelerate + ["--zero_stage", "3", "--gradient_accumulation_steps", "2", "--mixed_precision", "no"],
        [{}],
        "flags",
    )
    assert "ZeRO stage 3, precision fp32" in logs[0] and "= 8 x 2 x 2 = 32" in logs[0]

    from dapt.config.accelerate import accelerate_settings

    _, _, _, problems = accelerate_settings(
        {
            "ACCELERATE_USE_DEEPSPEED": "true",
            "ACCELERATE_MIXED_PRECISION": "fp8",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE": "a.json",
        },
        {"ds": "b.json"},
    )
    assert problems == [
        "contradiction: --ds b.json but accelerate launch --deepspeed_config_file a.json; give one",
        "accelerate launch --mixed_precision fp8: dapt trains in bf16, fp16 or fp32 (no)",
    ]


def test_accelerate_settings_meet_the_recipe(recipe, monkeypatch):
    """What accelerate launch sets fills what the recipe and command line leave open; a disagreement is a config
    error, not a silent override either way. Its default mixed_precision 'no' is not taken as a choice."""
    import pytest

    from dapt.cli.load import load_config
    from dapt.config.schema import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    cfg = load_config(["--recipe", str(recipe)], world_size=1, accelerator="cpu")
    assert cfg.train.grad_accum == 2 and cfg.ds_config["zero_optimization"]["stage"] == 3
    assert cfg.ds_config["gradient_accumulation_steps"] == 2
    assert any("mixed_precision is 'no' (its default)" in n for n in cfg.notes)
    with pytest.raises(
        ConfigError, match="train.grad_accum = 3 in the recipe or command line, but accelerate"
    ):
        load_config(["--recipe", str(recipe), "--train.grad_accum=3"], world_size=1, accelerator="cpu")
    with pytest.raises(
        ConfigError, match=r"zero3_bf16.json has zero_optimization.stage = 3, accelerate launch says 2"
    ):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        load_config(
            ["--recipe", str(recipe), "--ds", str(ROOT / "ds_configs" / "zero3_bf16.json")],
            world_size=1,
            accelerator="cpu",
        )
