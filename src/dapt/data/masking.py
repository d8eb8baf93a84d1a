"""Dynamic MLM masking with 80/10/10 replacement, deterministic per (seed, row key).

Seeding each row by its key, not by a shared stream, makes the masks independent of worker count, rank
layout and resume point: the same row in the same epoch gets the same masks in every run.
"""

from __future__ import annotations

import numpy as np
import torch

from dapt.config.schema import BadInput
from dapt.model.attention import segment_inputs
from dapt.model.canine import char_classes

IGNORE = -100


class MLMCollator:
    """Pads rows and masks them: `rate` of the maskable tokens become targets; of those, `mask_prob` turn into
    the mask token, `random_prob` into a random non-special token, and the rest stay as they are."""

    def __init__(
        self,
        tokenizer,
        rate: float,
        *,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        seed: int = 0,
        pad_to_multiple_of: int = 8,
        whole_word: bool = False,
        mask_token_id: int | None = None,
        label_vocab: int | None = None,
    ):
        """`label_vocab` (character models): labels become head classes, and random replacements are drawn from
        the ids below it rather than from the whole (Unicode-sized) vocabulary."""
        self.whole_word, self.label_vocab = whole_word, label_vocab
        self.multiple = pad_to_multiple_of  # tensor-core friendly shapes, in bf16 as well as fp16
        if tokenizer.mask_token_id is None and mask_token_id is None:
            raise BadInput(f"tokenizer {type(tokenizer).__name__} has no mask token, so it cannot do MLM")
        self.rate, self.mask_prob, self.random_prob, self.seed = rate, mask_prob, random_prob, seed
        self.mask_id = tokenizer.mask_token_id if mask_token_id is None else mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.special = np.array(sorted(set(tokenizer.all_special_ids) | {self.pad_id}), dtype=np.int64)
        vocab = np.arange(label_vocab - 1 if label_vocab else len(tokenizer), dtype=np.int64)
        self.random_pool = vocab[~np.isin(vocab, self.special)]

    def mask(
        self, ids: np.ndarray, key: int, words: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masked inputs and labels for one row. With `words` (word-start flags), the draws are made per word and
        shared by its tokens, so a word is either wholly selected, with one replacement kind, or not at all."""
        rng = np.random.default_rng([self.seed, key])
        if words is None:
            draw, how = rng.random(len(ids)), rng.random(len(ids))
        else:
            word = np.cumsum(words) - 1
            draw, how = rng.random(word[-1] + 1)[word], rng.random(word[-1] + 1)[word]
        selected = (draw < self.rate) & ~np.isin(ids, self.special)
        labels = np.where(selected, ids, IGNORE)
        inputs = ids.copy()
        inputs[selected & (how < self.mask_prob)] = self.mask_id
        swap = selected & (how >= self.mask_prob) & (how < self.mask_prob + self.random_prob)
        inputs[swap] = self.random_pool[rng.integers(0, len(self.random_pool), int(swap.sum()))]
        return inputs, labels

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        width = -(-width // self.multiple) * self.multiple
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(items), width), IGNORE, dtype=np.int64)
        attention = np.zeros((len(items), width), dtype=np.int64)
        for row, it in enumerate(items):
            ids = np.asarray(it["input_ids"], dtype=np.int64)
            words = it.get("words") if self.whole_word else None
            if self.whole_word and words is None:
                raise ValueError(
                    "whole-word masking needs rows with word starts (masking.whole_word at packing)"
                )
            inputs, lab = self.mask(ids, it["key"], words)
            if self.label_vocab:
                lab = char_classes(lab, self.label_vocab)
            input_ids[row, : len(ids)], labels[row, : len(ids)], attention[row, : len(ids)] = inputs, lab, 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels),
            "index": torch.tensor([it["index"] for it in items]),
        }
        lengths = [tuple(it.get("lengths", (len(it["input_ids"]),))) for it in items]
        if any(len(parts) > 1 for parts in lengths):  # packed rows: the model must keep documents apart
            batch["segment_ids"], batch["position_ids"] = segment_inputs(lengths, width)
        return batch
