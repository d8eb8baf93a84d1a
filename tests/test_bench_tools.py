"""The bench scripts' helpers that decide what a measurement reads and what its committed results keep."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))


def test_characters_copy_reads_each_character_with_the_base_weights(bench, tmp_path):
    """bench/classify_tune.py's `characters` encoder: the base's weights, its tokenizer splitting every character
    before WordPiece, saved so that a classifier run (and its final/) reads names that way."""
    from common import characters_copy
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from dapt.model.build import train_wordpiece

    base = tmp_path / "base"
    trained = train_wordpiece(["api-global.netflix.com xjkq9wz.ru google.com"] * 50, 300, 64)
    trained.save_pretrained(base)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(BertConfig(vocab_size=len(trained), **small)).save_pretrained(base)
    assert trained.tokenize("netflix.com")[0] == "netflix"  # the base reads words as pieces

    folder = characters_copy(str(base), tmp_path / "chars")
    chars = AutoTokenizer.from_pretrained(folder)
    assert chars.tokenize("netflix.com") == list("netflix.com")
    ids = chars("xjkq9wz.ru")["input_ids"]
    assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id and len(ids) == 12
    assert trained.unk_token_id not in ids
    assert (tmp_path / "chars" / "model.safetensors").read_bytes() == (
        base / "model.safetensors"
    ).read_bytes()
    assert (
        characters_copy(str(base), tmp_path / "chars") == folder
    )  # made once: a rerun's stages read the same


def test_classify_tune_keeps_the_committed_candidates_it_did_not_rerun(bench, tmp_path, monkeypatch):
    from classify_tune import kept

    committed = {
        "tasks": {"dga": {"1000 steps": {"best_step": 1000}}, "nsl_kdd_categories": {"600 steps": {"a": 1}}},
        "commands": {"dga_1000_steps": "old", "nsl_kdd_categories_600_steps": "old"},
        "minutes": {"dga_1000_steps": 17.8},
    }
    (tmp_path / "classify_tune.json").write_text(json.dumps(committed))
    monkeypatch.setenv("DAPT_BENCH_RESULTS", str(tmp_path))
    this_run = {
        "tasks": {"dga": {"1000 steps, characters": {"best_step": 800}, "1000 steps": {"best_step": 600}}},
        "commands": {"dga_1000_steps_characters": "new", "dga_1000_steps": "rerun"},
        "minutes": {"dga_1000_steps_characters": 20.0},
    }
    merged = kept(this_run)
    assert merged["tasks"]["dga"] == {
        "1000 steps": {"best_step": 600},
        "1000 steps, characters": {"best_step": 800},
    }
    assert merged["tasks"]["nsl_kdd_categories"] == {"600 steps": {"a": 1}}
    assert (
        merged["commands"]["dga_1000_steps"] == "rerun"
        and merged["commands"]["dga_1000_steps_characters"] == "new"
    )
    assert merged["minutes"] == {"dga_1000_steps": 17.8, "dga_1000_steps_characters": 20.0}


def test_attack_level_scores_name_each_categorys_recall(bench):
    """NSL-KDD at attack level: besides each attack's recall, the share of a category's rows predicted as any attack
    of that category (a guess_passwd row called warezmaster is an r2l caught)."""
    from classify_value import scores

    labels = ["guess_passwd", "neptune", "normal", "warezmaster"]
    categories = {"guess_passwd": "r2l", "warezmaster": "r2l", "neptune": "dos", "normal": "normal"}
    cm = [[1, 0, 2, 1], [0, 5, 0, 0], [0, 1, 9, 0], [0, 0, 0, 0]]  # rows: true; warezmaster has no test row
    out = scores(labels, cm, categories)
    assert out["recall"] == {"guess_passwd": 0.25, "neptune": 1.0, "normal": 0.9}
    assert out["category_recall"] == {"dos": 1.0, "normal": 0.9, "r2l": 0.5}
    assert out["accuracy"] == 15 / 19 and "category_recall" not in scores(labels, cm)
