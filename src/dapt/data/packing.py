"""Pack a block of tokenized documents into rows: concat, pad, or packed (best-fit decreasing, padding-free).

Blocks are packed independently, so a stream can rebuild any block from its start and resume exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from dapt.config.schema import BadInput

# Whole-word masking: the packers only cut and join token sequences, so a word-start flag rides along in a high bit
# of each id and is split off after packing (ids stay far below 2**40).
WORD_START = 1 << 40


@dataclass
class Row:
    """One training row: token ids, the documents that start in it, its segments (one per packed document), and for
    whole-word masking which tokens start a word; a classifier's row carries its document's label."""

    ids: np.ndarray
    doc_ids: tuple[str, ...]
    lengths: tuple[int, ...]
    words: np.ndarray | None = None
    label: str | None = None  # a classifier's row: its document's label


def wrappers(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens that open and close a sequence (CLS/SEP, or BOS/EOS, or nothing)."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []), ([last] if last is not None else [])


def tokenize(tokenizer, texts: list[str], words: bool = False) -> list[list[int]]:
    """Token ids of each text; with `words`, ids that start a word carry WORD_START. A word starts where a token
    does not touch the previous one in the text, or where its span begins with a space (byte-level BPE without
    trimmed offsets): offsets, so WordPiece and byte-level BPE alike, no `##` rules."""
    if not texts:
        return []
    if words and not getattr(tokenizer, "is_fast", False):
        raise BadInput(
            f"whole-word masking needs a fast tokenizer (offsets); {type(tokenizer).__name__} is not"
        )
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        return_offsets_mapping=words,
        verbose=False,
    )
    if not words:
        return enc["input_ids"]
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        prev_end = -1
        flagged = []
        for token, (start, end) in zip(ids, offsets):
            new = prev_end < 0 or start > prev_end or (start < end and text[start].isspace())
            flagged.append(token | WORD_START if new else token)
            prev_end = max(prev_end, end)
        out.append(flagged)
    return out


def pack(
    packing: str, tokenizer, texts: list[str], doc_ids: list[str], max_len: int, words: bool = False
) -> list[Row]:
    """Tokenize and pack documents; with `words`, rows carry word starts (special tokens are words of their own)."""
    head, tail = wrappers(tokenizer)
    if words:
        head, tail = [t | WORD_START for t in head], [t | WORD_START for t in tail]
    rows = PACKERS[packing](tokenize(tokenizer, texts, words), doc_ids, max_len, head, tail)
    if words:
        for row in rows:
            row.words, row.ids = row.ids >= WORD_START, row.ids % WORD_START
    return rows


def pack_concat(
    ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int], tail: list[int]
) -> list[Row]:
    """Join documents (each closed by `tail`) and cut rows of max_len; the block's last row may be shorter."""
    body = max_len - len(head) - len(tail)
    pieces = [np.asarray(x + tail, dtype=np.int64) for x in ids]
    if not pieces:
        return []
    flat = np.concatenate(pieces)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    n = -(-len(flat) // body)
    owners: list[list[str]] = [[] for _ in range(n)]
    for doc, start in zip(doc_ids, starts):
        owners[start // body].append(doc)
    rows = []
    for i in range(n):
        ids_i = np.concatenate([head, flat[i * body : (i + 1) * body], tail]).astype(np.int64)
        rows.append(Row(ids_i, tuple(owners[i]), (len(ids_i),)))
    return rows


def _segments(ids: list[list[int]], max_len: int, head: list[int], tail: list[int]) -> list[np.ndarray]:
    body = max_len - len(head) - len(tail)
    return [np.asarray(head + x[:body] + tail, dtype=np.int64) for x in ids]


def pack_pad(
    ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int], tail: list[int]
) -> list[Row]:
    """One document per row, truncated to max_len; the collator pads each micro-batch."""
    return [Row(seg, (doc,), (len(seg),)) for seg, doc in zip(_segments(ids, max_len, head, tail), doc_ids)]


def pack_packed(
    ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int], tail: list[int]
) -> list[Row]:
    """Whole documents (truncated to max_len) placed by best-fit decreasing: longest first, each into the open row
    with the least room that still fits it. Each document keeps its own segment; attention never crosses one."""
    segs = _segments(ids, max_len, head, tail)
    order = sorted(range(len(segs)), key=lambda i: (-len(segs[i]), i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, bin index)
    for i in order:
        need = len(segs[i])
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            bins.append([i])
            free, b = max_len - need, len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= need
        if free > 0:
            bisect.insort(room, (free, b))
    return [
        Row(
            np.concatenate([segs[i] for i in members]),
            tuple(doc_ids[i] for i in members),
            tuple(len(segs[i]) for i in members),
        )
        for members in bins
    ]


PACKERS = {"concat": pack_concat, "pad": pack_pad, "packed": pack_packed}
