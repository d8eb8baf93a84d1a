"""Secrets (WANDB_API_KEY, HF_TOKEN, any *_SECRET / *_API_KEY variable, URL passwords, hf_ tokens) never reach logs,
error messages, config.resolved.yaml, checkpoints or the W&B run files."""

from __future__ import annotations

from pathlib import Path

import dapt.cli.main
from dapt.cli.main import main
from dapt.config.redact import MASK, redact, redact_text
from dapt.tasks.mlm import run

WANDB_KEY = "wandb-key-0123456789abcdef"
HF = "hf_" + "Zq9" * 12
SERVICE_SECRET = "svc-secret-4f7a9c2e"  # a generic *_SECRET variable
OPENAI_KEY = "sk-proj-a1b2c3d4e5f6"  # a generic *_API_KEY variable


def _everything_written(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_secrets_stay_out_of_logs_config_checkpoints_and_wandb(
    recipe, corpus_file, tmp_path, monkeypatch, capsys
):
    """Each secret is pasted where the run prints and writes it (a user puts a token where a name or a path goes):
    the run uses it, and shows it nowhere; the masked places prove that the probe reached the output."""
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("MY_SERVICE_SECRET", SERVICE_SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    data = tmp_path / f"corpus-{OPENAI_KEY}.txt"
    data.write_text(corpus_file.read_text())
    monkeypatch.setattr(
        dapt.cli.main, "_close_process_group", lambda: None
    )  # DeepSpeed keeps it for later tests
    assert (
        main(
            run,
            [
                str(a)
                for a in [
                    "--recipe",
                    recipe,
                    "--output_dir",
                    out,
                    "--train.max_steps=3",
                    "--log.wandb=true",
                    f"--log.run_name=run-{HF}-{WANDB_KEY}",
                    f"--log.wandb_project=proj-{SERVICE_SECRET}",
                    "--data.train",
                    data,
                    "--log.level=debug",
                ]
            ],
        )
        == 0
    )
    text = capsys.readouterr()
    written = _everything_written(out)
    assert (out / "wandb").is_dir() and (out / "checkpoints").is_dir()
    for secret in (WANDB_KEY, HF, SERVICE_SECRET, OPENAI_KEY):
        assert secret not in text.out and secret not in text.err, secret
        assert secret.encode() not in written, secret
    resolved = (out / "config.resolved.yaml").read_text()
    assert f"run_name: run-{MASK}-{MASK}" in resolved and f"wandb_project: proj-{MASK}" in resolved
    assert f"corpus-{MASK}.txt" in resolved
    assert f"W&B run run-{MASK}-{MASK}" in text.out  # the log line is there, with the secrets masked
    checkpoint = (out / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt").read_bytes()
    assert f"corpus-{MASK}.txt".encode() in checkpoint  # the data files a checkpoint records, masked


def test_an_error_message_with_a_secret_is_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", HF)
    missing = tmp_path / f"data-{HF}.txt"
    code = main(run, ["--data.train", str(missing), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and HF not in err and f"data-{MASK}.txt" in err


def test_redaction_rules():
    assert (
        redact_text("s3 at https://alice:pa55word@example.org/data.txt")
        == f"s3 at https://alice:{MASK}@example.org/data.txt"
    )
    tree = redact(
        {
            "model": {"tokenizer": "bert-base", "hub_token": "abcdefgh"},
            "data": {"tokenizer_docs": 5},
            "storage": {"secret": "", "key_list": ["x"]},
        }
    )
    assert tree == {
        "model": {"tokenizer": "bert-base", "hub_token": MASK},
        "data": {"tokenizer_docs": 5},
        "storage": {"secret": "", "key_list": ["x"]},
    }
