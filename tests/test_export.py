"""checkpoint.export (issue 15): final/ holds the best evaluation's weights by default, or the last; summary.json
names the checkpoint and its step. Evaluation reports masked-token accuracy and top-5 accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_inprocess
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from dapt.runtime.checkpoint import safe_load


def _evals(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]


def test_final_is_the_best_evaluation_and_accuracy_rises_as_loss_falls(recipe, tmp_path):
    """An lr that first helps and then hurts (constant 0.3): the best evaluation is not the last one. Every
    evaluation is saved; final/ equals the best one's weights, and summary.json names it."""
    out = tmp_path / "run"
    summary = run_inprocess(["--recipe", recipe, "--output_dir", out, "--train.max_steps=24", "--train.eval_every=3",
                             "--checkpoint.every=0", "--train.lr=0.3", "--train.lr_schedule=constant",
                             "--data.valid_fraction=0.1"])  # fmt: skip
    evals = _evals(out)
    assert [r["step"] for r in evals] == list(range(3, 25, 3))
    best = min(evals, key=lambda r: r["eval/loss"])
    assert best["step"] != 24, "the best evaluation is the last one here: the checks below could not tell"
    assert summary["final_step"] == best["step"] and summary["final_checkpoint"] == f"step_{best['step']:08d}"
    final = load_file(out / "final" / "model.safetensors")
    weights = safe_load(out / "checkpoints" / summary["final_checkpoint"] / "mp_rank_00_model_states.pt")[
        "module"
    ]
    last = safe_load(out / "checkpoints" / "step_00000024" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(final[k], weights[k].float()) for k in final)
    assert any(not torch.equal(final[k], last[k].float()) for k in final)
    for r in evals:
        assert 0 <= r["eval/accuracy"] <= r["eval/top5_accuracy"] <= 1
    first = evals[0]
    assert best["eval/accuracy"] > first["eval/accuracy"] and best["eval/loss"] < first["eval/loss"]
    assert summary["final_eval_accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    card = ModelCard.load(out / "final" / "README.md")  # the model card, in the Hub's format
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "fill-mask"
    assert f"| eval loss | {best['eval/loss']:.4f} |" in card.text and "step_000000" in card.text
    assert "capital" not in card.text  # model.mark_capitals is off: the card says nothing of marks
    # the tokenizer trained for this run's rows says how long a row the model takes (a classifier's may be longer)
    positions = AutoConfig.from_pretrained(out / "final").max_position_embeddings
    assert AutoTokenizer.from_pretrained(out / "final").model_max_length == positions


def test_export_last_keeps_the_old_behaviour(recipe, tmp_path):
    out = tmp_path / "run"
    summary = run_inprocess(["--recipe", recipe, "--output_dir", out, "--train.max_steps=6",
                             "--checkpoint.export=last", "--data.valid_fraction=0.1"])  # fmt: skip
    assert (
        summary["final_checkpoint"] == "step_00000006" and summary["final_from"] == "checkpoint.export=last"
    )
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]


def test_the_model_card_names_a_hub_base_model_and_hub_datasets(tmp_path):
    from dapt.config.schema import RunConfig
    from dapt.runtime.card import write_model_card

    cfg = RunConfig(output_dir=str(tmp_path / "secbert_http"))
    cfg.model.name_or_path = "jackaduma/SecBERT"
    cfg.data.train = ["hf://datasets/humbleworth/registered-domains/data/part-0.parquet", "local.txt"]
    cfg.ds_config = {"train_batch_size": 64, "zero_optimization": {"stage": 2}}
    summary = {"steps": 300, "tokens_seen": 2_200_000, "world_size": 8, "final_checkpoint": "step_00000300",
               "final_from": "checkpoint.export=best: the best evaluation"}  # fmt: skip
    (tmp_path / "final").mkdir()
    path = write_model_card(
        tmp_path / "final", cfg, "mlm", summary, results={"eval loss": 1.25, "test loss": None}
    )
    card = ModelCard.load(path)
    assert card.data.base_model == "jackaduma/SecBERT"
    assert card.data.datasets == ["humbleworth/registered-domains"]
    assert "`jackaduma/SecBERT`" in card.text and "tokens seen: 2200000" in card.text
    assert "| eval loss | 1.2500 |" in card.text and "test loss" not in card.text
