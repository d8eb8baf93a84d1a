"""Secrets (WANDB_API_KEY, HF_TOKEN, URL passwords) never reach logs, error messages, config.resolved.yaml,
checkpoints or the W&B run files."""

from __future__ import annotations

from pathlib import Path

import dapt.cli
from dapt.cli import main
from dapt.redact import MASK, redact, redact_text
from dapt.train import run

WANDB_KEY = "wandb-key-0123456789abcdef"
HF = "hf_" + "Zq9" * 12


def _everything_written(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_secrets_stay_out_of_logs_config_checkpoints_and_wandb(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    # a user pastes a token where a name goes: it is used, but shown nowhere
    monkeypatch.setattr(dapt.cli, "_close_process_group", lambda: None)  # DeepSpeed keeps it for later tests
    assert main(run, [str(a) for a in ["--recipe", recipe, "--output_dir", out, "--train.max_steps=3",
                                       "--log.wandb=true", f"--log.run_name=run-{HF}", "--log.level=debug"]]) == 0
    text = capsys.readouterr()
    written = _everything_written(out)
    assert (out / "wandb").is_dir() and (out / "checkpoints").is_dir()
    for secret in (WANDB_KEY, HF):
        assert secret not in text.out and secret not in text.err
        assert secret.encode() not in written
    assert f"run_name: run-{MASK}" in (out / "config.resolved.yaml").read_text()
    assert f"W&B run run-{MASK}" in text.out  # the log line is there, with the token masked


def test_an_error_message_with_a_secret_is_masked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", HF)
    missing = tmp_path / f"data-{HF}.txt"
    code = main(run, ["--data.train", str(missing), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and HF not in err and f"data-{MASK}.txt" in err


def test_redaction_rules():
    assert redact_text("s3 at https://alice:pa55word@example.org/data.txt") == \
        f"s3 at https://alice:{MASK}@example.org/data.txt"
    tree = redact({"model": {"tokenizer": "bert-base", "hub_token": "abcdefgh"}, "data": {"tokenizer_docs": 5},
                   "storage": {"secret": "", "key_list": ["x"]}})
    assert tree == {"model": {"tokenizer": "bert-base", "hub_token": MASK}, "data": {"tokenizer_docs": 5},
                    "storage": {"secret": "", "key_list": ["x"]}}
