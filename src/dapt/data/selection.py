"""Corpus selection passes run once before training: exact deduplication and the newest-tokens budget.

Both read the corpus once without tokenizing it (parsing only), and turn their answer into data the streams use
without any state of their own: records to skip, and where the corpus starts. So streaming stays stateless and
resume stays exact.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

from dapt.config.schema import BadInput
from dapt.data.formats import READERS, Document, FormatOptions
from dapt.data.packing import tokenize
from dapt.data.sources import Position

log = logging.getLogger("dapt")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def duplicate_records(files: list[str], fmt: str, options: FormatOptions) -> dict[str, np.ndarray]:
    """For each file, the record indices (sorted) of documents whose exact text came earlier in the corpus."""
    seen: set[int] = set()
    dups: dict[str, list[int]] = {}
    for url in files:
        for item, after in READERS[fmt](url, Position(), options):
            if not isinstance(item, Document):
                continue
            h = _digest(item.text)
            if h in seen:
                dups.setdefault(url, []).append(after.record - 1)
            else:
                seen.add(h)
    total = sum(len(v) for v in dups.values())
    log.info("deduplication: %d exact duplicate documents will be skipped (first occurrences kept)", total)
    return {url: np.asarray(v, dtype=np.int64) for url, v in dups.items()}


def budget_start(
    files: list[str], fmt: str, options: FormatOptions, tokenizer, max_tokens: int, sample_docs: int = 2000
) -> tuple[list[str], dict[str, Position]]:
    """Keep about the newest `max_tokens` tokens of an ordered corpus (files in order, records in order).

    Tokens are estimated from characters with the characters-per-token ratio of the first `sample_docs`
    documents, so the pass only parses. Returns the files kept and where the first of them starts.
    """
    sample, sample_chars = [], 0
    marks: list[
        tuple[str, Position, int]
    ] = []  # (file, position before the record, characters of the record)
    for url in files:
        before = Position()
        for item, after in READERS[fmt](url, Position(), options):
            if isinstance(item, Document):
                marks.append((url, before, len(item.text)))
                if len(sample) < sample_docs:
                    sample.append(item.text)
                    sample_chars += len(item.text)
            before = after
    tokens_in_sample = sum(len(x) for x in tokenize(tokenizer, sample)) or 1
    chars_per_token = sample_chars / tokens_in_sample
    budget_chars = max_tokens * chars_per_token
    kept_chars, cut = 0, len(marks)
    while cut > 0 and kept_chars + marks[cut - 1][2] <= budget_chars:
        cut -= 1
        kept_chars += marks[cut][2]
    if cut == 0:
        log.info(
            "token budget %d: the whole corpus (~%d tokens) fits", max_tokens, kept_chars / chars_per_token
        )
        return files, {}
    if cut == len(marks):
        raise BadInput(f"data.max_tokens={max_tokens} keeps no document (the newest one is longer)")
    url, start, _ = marks[cut]
    kept = files[files.index(url) :]
    log.info(
        "token budget %d: keeping the newest ~%d tokens, from %s line %d on (%d of %d files; %.2f characters "
        "per token measured on %d documents)",
        max_tokens,
        kept_chars / chars_per_token,
        url,
        start.line,
        len(kept),
        len(files),
        chars_per_token,
        len(sample),
    )
    return kept, {url: start}


def stream_counts(weights: list[float], streams: int) -> list[int]:
    """Streams per source, proportional to `weights` (largest remainder), at least one each."""
    if len(weights) > streams:
        raise ValueError(
            f"{len(weights)} weighted sources need at least as many data.streams (have {streams})"
        )
    total = sum(weights)
    exact = [w / total * streams for w in weights]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) < streams:
        counts[max(range(len(exact)), key=lambda i: exact[i] - counts[i])] += 1
    while sum(counts) > streams:
        counts[max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - exact[i])] -= 1
    return counts
