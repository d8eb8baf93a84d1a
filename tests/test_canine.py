"""Character-level MLM for CANINE: code-point masking, the head transformers lacks, export and reload."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from conftest import DS, run_inprocess, series
from transformers import AutoModelForMaskedLM, AutoTokenizer, CanineTokenizer

import dapt.model.canine  # noqa: F401  (registers the class with AutoModelForMaskedLM)
from dapt.data.masking import IGNORE, MLMCollator

CANINE = (
    "{model_type: canine, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64,"
    " num_hash_buckets: 512, num_hash_functions: 4, max_position_embeddings: 256}"
)


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    rng = random.Random(0)
    words = [
        "google",
        "mail",
        "shop",
        "bank",
        "secure",
        "login",
        "cloud",
        "api",
        "cdn",
        "news",
        "tech",
        "data",
    ]
    lines = [
        rng.choice(["", "www.", "api."])
        + rng.choice(words)
        + rng.choice(words)
        + "."
        + rng.choice(["com", "net"])
        if i % 3
        else "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12)) + ".com"
        for i in range(2400)
    ]
    path = tmp_path_factory.mktemp("domains") / "domains.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_character_masking_uses_code_points_and_head_classes():
    tok = CanineTokenizer()
    text = "secure-login.example.com" * 40 + "\u00e9\u4e2d"  # two characters above the head's range
    ids = np.asarray(
        [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    )
    batch = MLMCollator(tok, 0.5, seed=0, mask_token_id=0xE000, label_vocab=128)(
        [{"input_ids": ids, "key": 1, "index": 0}]
    )
    n = len(ids)
    inputs, labels = batch["input_ids"][0, :n].numpy(), batch["labels"][0, :n].numpy()
    chosen = labels != IGNORE
    assert chosen[0] == chosen[-1] == False  # noqa: E712  (CLS and SEP never)
    assert set(labels[chosen]) <= set(range(128)) and (labels[chosen] < 127).any()
    assert (inputs == 0xE000).sum() > 0.3 * chosen.sum()  # seed 004's mask code point
    swapped = chosen & (inputs != ids) & (inputs != 0xE000)
    assert swapped.any() and (inputs[swapped] < 127).all()  # random replacements stay within the head's range
    if chosen[-2] or chosen[-3]:  # a character above the range is labelled with the shared last class
        assert 127 in labels[-3:-1]


def test_canine_trains_exports_and_reloads(domains, tmp_path):
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--data.train",
            domains,
            "--output_dir",
            out,
            "--model.config",
            CANINE,
            "--model.char_vocab=128",
            "--data.packing=pad",
            "--data.max_seq_length=64",
            "--train.max_steps=40",
            "--train.lr=2e-3",
            "--masking.mask_token_id=57344",
            "--ds",
            DS / "zero2_bf16.json",
            "--train.precision=bf16",
            "--log.progress=false",
        ]
    )
    losses = [v for _, v in series(out, "train/loss")]
    assert (
        summary["steps"] == 40 and losses[-1] < losses[0] - 0.5 and math.isfinite(summary["best_eval_loss"])
    )
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert type(model).__name__ == "CanineForMaskedLM" and model.config.char_vocab == 128
    enc = tok(["secure\ue000ogin.com"], return_tensors="pt")
    logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 128)


def test_canine_refuses_packed_rows(domains, tmp_path):
    with pytest.raises(ValueError, match="packed does not work with CANINE"):
        run_inprocess(
            [
                "--data.train",
                domains,
                "--output_dir",
                tmp_path / "r",
                "--model.config",
                CANINE,
                "--data.packing=packed",
                "--train.max_steps=1",
            ]
        )


def test_whole_word_needs_a_fast_tokenizer():
    from dapt.data.packing import tokenize

    with pytest.raises(ValueError, match="fast tokenizer"):
        tokenize(CanineTokenizer(), ["a.com"], words=True)
