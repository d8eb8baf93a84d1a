"""MLMCollator: masking statistics, special tokens, labels and padding, determinism, missing mask token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from dapt.data.corpus import generate
from dapt.data.masking import IGNORE, MLMCollator
from dapt.model.build import train_wordpiece

MAX_LEN = 64


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(generate(2000, seed=0), vocab_size=1000, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def rows(tokenizer):
    """About 4000 real rows, [CLS] ... [SEP], of varying length, from text the tokenizer was not trained on."""
    enc = tokenizer(
        generate(4000, seed=1),
        add_special_tokens=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in enc]


def specials(tokenizer) -> np.ndarray:
    return np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


def collate_all(collator: MLMCollator, rows: list[np.ndarray], keys: list[int], chunk: int = 512) -> dict:
    """Collate `rows` in chunks; return the flat arrays of the real (unpadded) positions and the originals."""
    out = {"orig": [], "inputs": [], "labels": []}
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        items = [
            {"input_ids": r, "key": k, "index": i}
            for i, (r, k) in enumerate(zip(part, keys[start : start + chunk], strict=True), start=start)
        ]
        b = collator(items)
        real = b["attention_mask"].numpy().astype(bool)
        out["inputs"].append(b["input_ids"].numpy()[real])
        out["labels"].append(b["labels"].numpy()[real])
        out["orig"].append(np.concatenate(part))  # row-major order, like the boolean index above
    return {name: np.concatenate(parts) for name, parts in out.items()}


def tolerance(p: float, n: int) -> float:
    """Four standard errors of a binomial share p over n trials (two-sided, about 6e-5 chance of a false alarm
    for a truly random stream; the streams here are seeded, so the test is also fully reproducible)."""
    return 4 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masking_statistics(tokenizer, rows, rate):
    collator = MLMCollator(tokenizer, rate, mask_prob=0.8, random_prob=0.1, seed=0)
    out = collate_all(collator, rows, keys=list(range(len(rows))))
    orig, inputs, labels = out["orig"], out["inputs"], out["labels"]
    special = specials(tokenizer)

    maskable = ~np.isin(orig, special)
    selected = labels != IGNORE
    n_maskable, n_selected = int(maskable.sum()), int(selected.sum())
    assert n_maskable >= 100_000
    assert not (selected & ~maskable).any()

    share = n_selected / n_maskable
    assert abs(share - rate) <= tolerance(rate, n_maskable), f"selected share {share:.4f}, expected {rate}"

    # A random replacement draws uniformly from the non-special vocabulary, so with probability 1/pool it draws
    # the original id again and then counts as "unchanged". With pool ~ 500 that moves the shares by ~0.0002,
    # far below the tolerance, but the expectations below include it anyway.
    pool = len(tokenizer) - len(special)
    masked = selected & (inputs == collator.mask_id)
    swapped = selected & (inputs != orig) & (inputs != collator.mask_id)
    kept = selected & (inputs == orig)
    assert (masked.sum() + swapped.sum() + kept.sum()) == n_selected
    expected = {"mask": 0.8, "random": 0.1 * (1 - 1 / pool), "kept": 0.1 + 0.1 / pool}
    for name, hits in (("mask", masked), ("random", swapped), ("kept", kept)):
        got = hits.sum() / n_selected
        assert abs(got - expected[name]) <= tolerance(expected[name], n_selected), (
            f"{name}: {got:.4f} of selected tokens, expected {expected[name]:.4f}"
        )

    # random replacements are spread over the vocabulary, not stuck on a few ids
    assert len(np.unique(inputs[swapped])) > pool / 2
    # unselected tokens are never touched
    assert np.array_equal(inputs[~selected], orig[~selected])


# ---------------------------------------------------------------- special tokens


@pytest.mark.parametrize(
    ("rate", "mask_prob", "random_prob"), [(0.15, 0.8, 0.1), (1.0, 0.8, 0.1), (1.0, 0.0, 1.0)]
)
def test_special_tokens_never_selected_or_replaced(tokenizer, rows, rate, mask_prob, random_prob):
    special = specials(tokenizer)
    assert {
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.pad_token_id,
        tokenizer.mask_token_id,
        tokenizer.unk_token_id,
    } <= set(special.tolist())
    # scatter every special id (PAD, UNK and MASK too) into the rows, not only CLS at the start and SEP at the end
    rng = np.random.default_rng(7)
    salted = []
    for r in rows[:1500]:
        r = r.copy()
        where = rng.random(len(r)) < 0.2
        r[where] = rng.choice(special, int(where.sum()))
        salted.append(r)
    collator = MLMCollator(tokenizer, rate, mask_prob=mask_prob, random_prob=random_prob, seed=3)
    out = collate_all(collator, salted, keys=list(range(len(salted))))
    orig, inputs, labels = out["orig"], out["inputs"], out["labels"]

    at_special = np.isin(orig, special)
    assert at_special.sum() > 5000
    assert (labels[at_special] == IGNORE).all()
    assert np.array_equal(inputs[at_special], orig[at_special])

    swapped = (inputs != orig) & (inputs != collator.mask_id)
    if random_prob == 1.0:
        assert swapped.sum() > 10_000
    assert swapped.any()
    assert not np.isin(inputs[swapped], special).any()


# ---------------------------------------------------------------- labels and padding


def test_labels_and_padding(tokenizer, rows):
    collator = MLMCollator(tokenizer, 0.3, seed=0)
    batch_rows = [rows[0][:5], rows[1], rows[2][:20], rows[3][:1]]
    lengths = [len(r) for r in batch_rows]
    assert len(set(lengths)) == len(lengths)
    items = [{"input_ids": r, "key": 100 + i, "index": 10 + i} for i, r in enumerate(batch_rows)]
    b = collator(items)

    width = -(-max(lengths) // 8) * 8  # padded to a multiple of 8 (tensor-core friendly shapes)
    for name in ("input_ids", "attention_mask", "labels"):
        assert b[name].shape == (len(batch_rows), width)
        assert b[name].dtype == torch.int64
    assert b["index"].tolist() == [10, 11, 12, 13]

    ids, att, lab = b["input_ids"].numpy(), b["attention_mask"].numpy(), b["labels"].numpy()
    n_selected = 0
    for i, (r, n) in enumerate(zip(batch_rows, lengths, strict=True)):
        assert (att[i, :n] == 1).all() and (att[i, n:] == 0).all()
        assert (lab[i, n:] == IGNORE).all()
        assert (ids[i, n:] == tokenizer.pad_token_id).all()
        sel = lab[i, :n] != IGNORE
        n_selected += int(sel.sum())
        assert np.array_equal(lab[i, :n][sel], r[sel])  # the target is the original token
        assert np.array_equal(ids[i, :n][~sel], r[~sel])  # unselected positions keep their token
    assert n_selected > 0


def test_pad_to_multiple_can_be_turned_off(tokenizer, rows):
    b = MLMCollator(tokenizer, 0.3, seed=0, pad_to_multiple_of=1)(
        [{"input_ids": rows[0][:13], "key": 1, "index": 0}]
    )
    assert b["input_ids"].shape == (1, 13)


def test_input_rows_are_not_modified(tokenizer, rows):
    row = rows[5].copy()
    MLMCollator(tokenizer, 1.0, seed=0)([{"input_ids": row, "key": 1, "index": 0}])
    assert np.array_equal(row, rows[5])


# ---------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def long_row(rows):
    return np.concatenate(rows[:10])  # a few hundred tokens: distinct masks differ with near certainty


def masks(collator: MLMCollator, row: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    b = collator([{"input_ids": row, "key": key, "index": 0}])
    return b["input_ids"][0].numpy(), b["labels"][0].numpy()


def test_same_seed_and_key_give_same_masks(tokenizer, long_row):
    first = masks(MLMCollator(tokenizer, 0.15, seed=5), long_row, key=42)
    again = masks(MLMCollator(tokenizer, 0.15, seed=5), long_row, key=42)
    assert (first[1] != IGNORE).sum() > 20
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


@pytest.mark.parametrize(("seed", "key"), [(5, 43), (6, 42)])
def test_other_seed_or_key_gives_other_masks(tokenizer, long_row, seed, key):
    base = masks(MLMCollator(tokenizer, 0.15, seed=5), long_row, key=42)
    other = masks(MLMCollator(tokenizer, 0.15, seed=seed), long_row, key=key)
    assert not np.array_equal(base[1], other[1])
    assert not np.array_equal(base[0], other[0])


def test_masks_do_not_depend_on_batch_composition(tokenizer, rows):
    collator = MLMCollator(tokenizer, 0.15, seed=0)
    target = {"input_ids": rows[7], "key": 77, "index": 7}
    alone = collator([target])
    n = len(rows[7])
    neighbours = [
        {"input_ids": np.concatenate(rows[20:23]), "key": 1, "index": 20},
        {"input_ids": rows[30][:3], "key": 2, "index": 30},
    ]
    for batch, row in (
        ([neighbours[0], target, neighbours[1]], 1),
        ([target, *neighbours], 0),
        ([*neighbours, target], 2),
    ):
        b = collator(batch)
        assert b["index"][row] == 7
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(b[name][row, :n], alone[name][0, :n]), name


# ---------------------------------------------------------------- tokenizer without a mask token


def test_tokenizer_without_mask_token_is_rejected(tokenizer):
    no_mask = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    assert no_mask.mask_token_id is None
    with pytest.raises(ValueError, match="no mask token"):
        MLMCollator(no_mask, 0.15)
