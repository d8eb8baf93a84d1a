"""Whole-word masking: a word (a whitespace-separated chunk of text) is never partly masked, for WordPiece and for
byte-level BPE, and all its tokens get the same replacement kind."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import byte_level_bpe

from dapt.data.corpus import generate
from dapt.data.masking import IGNORE, MLMCollator
from dapt.data.packing import pack
from dapt.model.build import train_wordpiece

TEXTS = generate(1500, seed=3)


TOKENIZERS = {"wordpiece": lambda: train_wordpiece(TEXTS, 600, 64), "bpe": lambda: byte_level_bpe(TEXTS, 600)}


def _chunks_of_tokens(tok, text: str) -> list[list[int]]:
    """Token positions (in the text's own tokenization) of each whitespace-separated chunk of `text`."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [i for i, c in enumerate(text) if c != " " and (i == 0 or text[i - 1] == " ")]
    chunk_of = (
        np.searchsorted(
            starts, [s if text[s : s + 1] != " " else s + 1 for s, _ in enc["offset_mapping"]], side="right"
        )
        - 1
    )
    chunks: dict[int, list[int]] = {}
    for pos, c in enumerate(chunk_of):
        chunks.setdefault(int(c), []).append(pos)
    return list(chunks.values())


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_no_word_is_partly_masked(name):
    tok = TOKENIZERS[name]()
    texts = TEXTS[:600]
    rows = pack("pad", tok, texts, [str(i) for i in range(len(texts))], 128, words=True)
    collate = MLMCollator(tok, 0.3, seed=1, whole_word=True)
    multi_token_words = selected_tokens = maskable = 0
    for i, (row, text) in enumerate(zip(rows, texts)):
        b = collate([{"input_ids": row.ids, "key": i, "index": i, "words": row.words}])
        labels, inputs = b["labels"][0].numpy(), b["input_ids"][0].numpy()
        chunks = _chunks_of_tokens(tok, text)
        if len(row.ids) < 127:  # not truncated: one word start per chunk, plus the two specials
            assert int(row.words.sum()) == len(chunks) + 2, (name, text)
        for chunk in chunks:
            positions = [p + 1 for p in chunk if p + 1 < len(row.ids) - 1]  # +1: the row starts with CLS/<s>
            if not positions:
                continue
            chosen = labels[positions] != IGNORE
            assert chosen.all() or not chosen.any(), (name, text, chunk)
            if chosen.all():
                as_mask = inputs[positions] == tok.mask_token_id
                assert as_mask.all() or not as_mask.any()  # one replacement kind per word
            multi_token_words += len(positions) > 1
        selected_tokens += int((labels != IGNORE).sum())
        maskable += len(row.ids) - 2
    assert multi_token_words > 500  # the property is tested on words that really have several tokens
    assert 0.25 < selected_tokens / maskable < 0.35


def test_word_starts_follow_offsets_not_wordpiece_markers():
    tok = TOKENIZERS["bpe"]()  # byte-level BPE has no ## markers at all
    row = pack("pad", tok, ["the attacker exploited"], ["d"], 64, words=True)[0]
    pieces = tok.convert_ids_to_tokens(row.ids.tolist())
    starts = [p for p, w in zip(pieces, row.words) if w]
    assert starts[0] == "<s>" and starts[-1] == "</s>" and len(starts) == 2 + 3  # specials + three words


def test_whole_word_needs_word_starts():
    tok = TOKENIZERS["wordpiece"]()
    row = pack("pad", tok, ["the attacker"], ["d"], 64)[0]
    with pytest.raises(ValueError, match="word starts"):
        MLMCollator(tok, 0.3, whole_word=True)(
            [{"input_ids": row.ids, "key": 0, "index": 0, "words": row.words}]
        )
