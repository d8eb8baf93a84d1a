"""What a new user meets first: --help that says what a script does and which DeepSpeed configs exist, shipped configs
by name from any folder, one clear error for one mistake, `dapt --version`, a plan that keeps to the ZeRO stage asked
for, a job that says what it takes from this shell. Fast: config loading and the tools' own functions."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from dapt.cli.load import collect_config, load_config
from dapt.config.schema import ConfigError, help_text


def test_help_opens_with_what_the_script_does_and_names_the_shipped_configs():
    text = help_text("launch/classify.py")
    first = text.splitlines()[0]
    assert (
        first
        == "launch/classify.py: sequence-classification fine-tuning, optionally over several seeds (mean +- std)"
    )
    shipped = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
    assert f"a shipped one by name, {', '.join(shipped)}, or a JSON file of your own" in text
    assert "secbert_http_mlm" in text and "--output_dir" in text  # the recipes, and the fields after
    assert help_text("dapt predict").startswith("dapt predict: a trained classifier (or MLM) on new files")


def test_a_shipped_ds_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: ds_configs/ is not here
    cfg = load_config(["--ds", "zero3_bf16", "--train.max_steps=2"], world_size=1, accelerator="cpu")
    assert cfg.ds_config["zero_optimization"]["stage"] == 3
    same = load_config(["--ds", "ds_configs/zero2_bf16.json"], world_size=1, accelerator="cpu")
    assert same.ds_config["zero_optimization"]["stage"] == 2
    recipe, problems = collect_config(
        ["--recipe", "recipes/smoke/secbert_http_mlm.yaml"], 1, "cpu", check_files=False
    )
    assert (
        recipe.data.format == "http" and not problems
    )  # its data paths are the checkout's: not checked here


def test_one_mistake_is_one_clear_error():
    with pytest.raises(ConfigError) as stage:
        load_config(["--ds.zero_optimization.stage=2"], world_size=1, accelerator="cpu")
    assert len(stage.value.problems) == 1 and "the DeepSpeed config is a file" in stage.value.problems[0]
    assert "zero2_bf16" in stage.value.problems[0]
    with pytest.raises(
        ConfigError
    ) as missing:  # no knock-on "give model.name_or_path" from the missing recipe
        load_config(["--recipe", "recipes/no_such_recipe.yaml"], world_size=1, accelerator="cpu")
    assert len(missing.value.problems) == 1 and "cannot read" in missing.value.problems[0]
    assert "secbert_http_mlm" in missing.value.problems[0]


def test_data_format_follows_the_files_extension_unless_given(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nGET / HTTP/1.1,http\n")
    cfg, _ = collect_config(["--data.train", str(train)], 1, "cpu", prog="launch/classify.py")
    assert cfg.data.format == "csv" and any("from the data files' extension" in n for n in cfg.notes)
    given, _ = collect_config(["--data.train", str(train), "--data.format=lines"], 1, "cpu")
    assert given.data.format == "lines"
    mixed, _ = collect_config(
        ["--data.train", str(train), "--data.test", str(tmp_path / "t.jsonl")], 1, "cpu"
    )
    assert mixed.data.format == "lines"


def test_each_script_has_its_default_folder():
    for prog, folder in (
        ("launch/mlm.py", "runs/mlm"),
        ("dapt classify", "runs/classify"),
        ("launch/predict.py", "runs/predict"),
    ):
        argv = ["--model.name_or_path=x", "--data.test=y"] if "predict" in prog else []
        cfg, _ = collect_config(argv, 1, "cpu", check_files=False, prog=prog)
        assert cfg.output_dir == folder, prog


def test_dapt_version(capsys):
    from dapt.tools.commands import console

    assert console(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dapt 0.") and "deepspeed 0." in out and "transformers" in out


def test_plan_keeps_to_the_zero_stage_asked_for_and_says_a_short_run_is_short(tmp_path):
    from dapt.tools.plan import duration
    from dapt.tools.plan import run as plan

    cfg = load_config(["--ds", "zero2_bf16", "--output_dir", str(tmp_path)], world_size=1, accelerator="cpu")
    result = plan(cfg)
    assert result["asked"]["stage"] == 2 and result["recommendation"]["stage"] == 2
    assert "kept to ZeRO 2 of --ds zero2_bf16" in (tmp_path / "plan.md").read_text()
    assert "0.00 h" not in (tmp_path / "plan.md").read_text()
    assert [duration(h) for h in (12.34, 0.5, 1 / 120, 1e-5)] == ["12.3 h", "30 min", "30 s", "under 1 s"]


def test_a_job_says_what_it_takes_from_this_shell(monkeypatch, tmp_path):
    from dapt.tools.submit import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "jobs"
    code = main(
        ["--submit.out", str(out), "--cluster.gpu=A100-80GB", "--submit.venv", str(tmp_path / "no_venv")]
    )
    assert code == 0
    job = (out / "job.sbatch").read_text()
    assert "no virtual environment at" in job  # the job says so on the node, instead of running any python3
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--dry_run", "--cluster.gpu=A100-80GB", "--submit.venv", str(tmp_path / "no_venv")])
    said = printed.getvalue()
    assert "HF_HUB_OFFLINE=1 goes with the job: its nodes will not download" in said
    assert f"no virtual environment at {tmp_path / 'no_venv'}" in said


def test_the_first_step_is_logged_so_warmup_shows(recipe, tmp_path):
    from conftest import run_inprocess, series

    run_inprocess(["--recipe", recipe, "--output_dir", tmp_path, "--train.log_every=4", "--train.max_steps=8",
                   "--train.warmup_steps=3"])  # fmt: skip
    steps = [s for s, _ in series(tmp_path, "train/learning_rate")]
    assert steps == [1, 4, 8]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["train/learning_rate"] < 2e-3  # inside the warmup


def test_a_resumed_run_says_its_own_time(recipe, tmp_path):
    from conftest import run_inprocess

    run_inprocess(["--recipe", recipe, "--output_dir", tmp_path, "--train.max_steps=4"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["this_run_seconds"] == pytest.approx(summary["wall_seconds"], abs=0.2)
    again = run_inprocess(["--recipe", recipe, "--output_dir", tmp_path, "--train.max_steps=4"])
    assert again["this_run_seconds"] < again["wall_seconds"]  # a no-op rerun: not the first run's time


def test_records_longer_than_the_rows_are_said_to_be_cut(caplog):
    """A classifier's records cut at data.max_seq_length lose what follows: said with the share and the lengths."""
    import logging

    from dapt.data.labelled import say_what_is_cut
    from dapt.model.build import train_wordpiece

    tok = train_wordpiece(["duration:0 protocol_type:tcp service:http flag:SF src_bytes:181"], 200, 64)
    long = [" ".join(f"field{i}:{i}" for i in range(40))] * 8 + ["short:1"] * 2
    with caplog.at_level(logging.INFO, logger="dapt"):
        share = say_what_is_cut(tok, long, 64, "training records")
    assert share == 0.8
    said = [r for r in caplog.records if "are cut to their first 64 tokens" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "80% of 10 training records" in said[0].getMessage()
    assert say_what_is_cut(tok, ["short:1"], 64, "records") == 0.0


def test_a_classifier_without_a_recipe_keeps_the_schemas_row_length():
    cfg, _ = collect_config(["--data.train=x.csv"], 1, "cpu", check_files=False, prog="launch/classify.py")
    assert (
        cfg.data.max_seq_length == 128 and cfg.train.lr == 5e-4 and cfg.model.config["model_type"] == "bert"
    )
    mlm, _ = collect_config([], 1, "cpu", check_files=False, prog="launch/mlm.py")
    assert mlm.data.max_seq_length == 64  # the README's first command: the demo's own settings


def test_the_exit_code_is_chosen_by_the_error_raised_where_the_problem_is_found(
    tmp_path, monkeypatch, capsys
):
    """Input found unusable where it is read (a BadInput) ends the run with one line and exit 3; a plain ValueError
    is a bug, not bad input: it keeps its traceback (a launcher's sys.exit(main(...)) then exits 1)."""
    import dapt.cli.main
    from dapt.cli.main import main
    from dapt.config.schema import BadInput

    monkeypatch.setattr(dapt.cli.main, "_close_process_group", lambda: None)
    argv = [f"--output_dir={tmp_path / 'run'}"]

    def unusable_data(cfg):
        raise BadInput("data.train: x.jsonl:3 has no field 'text'")

    def bug(cfg):
        raise ValueError("too many values to unpack")

    assert main(unusable_data, argv, prog="launch/mlm.py") == 3
    assert "error: data.train: x.jsonl:3 has no field 'text'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="too many values to unpack"):
        main(bug, argv, prog="launch/mlm.py")
    assert "error:" not in capsys.readouterr().err  # not reported as bad input
