"""Pack a block of tokenized documents into rows: concat, pad, or packed (best-fit decreasing, padding-free).

Blocks are packed independently, so a stream can rebuild any block from its start and resume exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Row:
    """One training row: token ids, the documents that start in it, and its segments (one per packed document)."""

    ids: np.ndarray
    doc_ids: tuple[str, ...]
    lengths: tuple[int, ...]


def wrappers(tokenizer) -> tuple[list[int], list[int]]:
    """The tokens that open and close a sequence (CLS/SEP, or BOS/EOS, or nothing)."""
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []), ([last] if last is not None else [])


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                     verbose=False)["input_ids"]


def pack_concat(ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int], tail: list[int]) -> list[Row]:
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
        ids_i = np.concatenate([head, flat[i * body:(i + 1) * body], tail]).astype(np.int64)
        rows.append(Row(ids_i, tuple(owners[i]), (len(ids_i),)))
    return rows


def _segments(ids: list[list[int]], max_len: int, head: list[int], tail: list[int]) -> list[np.ndarray]:
    body = max_len - len(head) - len(tail)
    return [np.asarray(head + x[:body] + tail, dtype=np.int64) for x in ids]


def pack_pad(ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int], tail: list[int]) -> list[Row]:
    """One document per row, truncated to max_len; the collator pads each micro-batch."""
    return [Row(seg, (doc,), (len(seg),)) for seg, doc in zip(_segments(ids, max_len, head, tail), doc_ids)]


def pack_packed(ids: list[list[int]], doc_ids: list[str], max_len: int, head: list[int],
                tail: list[int]) -> list[Row]:
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
    return [Row(np.concatenate([segs[i] for i in members]), tuple(doc_ids[i] for i in members),
                tuple(len(segs[i]) for i in members)) for members in bins]


PACKERS = {"concat": pack_concat, "pad": pack_pad, "packed": pack_packed}
