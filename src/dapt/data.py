"""Local corpora for MLM: read documents, split by hash, tokenize, pack into rows, and hand each rank its rows.

The order of rows is a pure function of (seed, epoch, global step), so a resumed run starts at any step
without reading through the skipped data, and the rows of one optimizer step are the same whatever the
split into ranks and micro-batches.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


class BadRecord(ValueError):
    """A record that cannot be read; the message names file, line and field."""

    def __init__(self, path: str, line: int, reason: str, detail: str = ""):
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}{detail}")


@dataclass(frozen=True)
class Document:
    text: str
    id: str  # file:line of the document's first line


def _open_text_lines(path: str) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from enumerate(io.BufferedReader(f) if opener is gzip.open else f, start=1)


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise BadRecord(path, lineno, "invalid UTF-8", f" at byte {e.start}") from None


def read_documents(paths: list[str], fmt: str, text_field: str = "text", on_error: str = "raise",
                   skipped: Counter | None = None) -> Iterator[Document]:
    """Yield documents from files in `fmt` (lines | docs | jsonl).

    Bad records raise BadRecord (file:line and field) or, with on_error="skip", are counted in `skipped`.
    """
    skipped = skipped if skipped is not None else Counter()
    reader = {"lines": _lines, "docs": _docs, "jsonl": _jsonl}[fmt]
    for path in paths:
        records = reader(path, text_field)
        while True:
            try:
                doc = next(records)
            except StopIteration:
                break
            except BadRecord as e:
                if on_error == "raise":
                    raise
                skipped[e.reason] += 1
                records = reader(path, text_field, resume_after=e.line)
                continue
            yield doc


def _lines(path: str, _field: str, resume_after: int = 0) -> Iterator[Document]:
    for lineno, raw in _open_text_lines(path):
        if lineno <= resume_after:
            continue
        text = _decode(raw, path, lineno).strip()
        if text:
            yield Document(text, f"{path}:{lineno}")


def _docs(path: str, _field: str, resume_after: int = 0) -> Iterator[Document]:
    buf: list[str] = []
    start = 0
    skipping = resume_after > 0  # after a bad line, the rest of its document is dropped with it
    for lineno, raw in _open_text_lines(path):
        if lineno <= resume_after:
            continue
        line = _decode(raw, path, lineno)
        if skipping:
            skipping = bool(line.strip())
            continue
        if line.strip():
            start = start or lineno
            buf.append(line)
        elif buf:
            yield Document("\n".join(buf), f"{path}:{start}")
            buf, start = [], 0
    if buf:
        yield Document("\n".join(buf), f"{path}:{start}")


def _jsonl(path: str, field: str, resume_after: int = 0) -> Iterator[Document]:
    for lineno, raw in _open_text_lines(path):
        if lineno <= resume_after:
            continue
        line = _decode(raw, path, lineno).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecord(path, lineno, "malformed JSON", f" ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or field not in record:
            raise BadRecord(path, lineno, f"missing field {field!r}")
        text = record[field]
        if not isinstance(text, str):
            raise BadRecord(path, lineno, f"field {field!r} is not text", f" ({type(text).__name__})")
        if text.strip():
            yield Document(text, f"{path}:{lineno}")


def in_valid_split(text: str, fraction: float) -> bool:
    """Stable validation membership: a hash of the text, independent of order, rank and resume."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class Rows:
    """Packed token rows and, for each row, the ids of the documents that start in it."""

    rows: list[np.ndarray]
    doc_ids: list[list[str]]
    real_tokens: int

    def __len__(self) -> int:
        return len(self.rows)


def _wrappers(tokenizer) -> tuple[list[int], list[int]]:
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    return ([first] if first is not None else []), ([last] if last is not None else [])


def tokenize(tokenizer, docs: list[Document], batch: int = 1000) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(docs), batch):
        enc = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        out += enc["input_ids"]
    return out


def pack_concat(tokenizer, docs: list[Document], max_len: int) -> Rows:
    """Join documents (each closed by the separator) and cut full rows of max_len, dropping the remainder."""
    head, tail = _wrappers(tokenizer)
    body = max_len - len(head) - len(tail)
    ids = tokenize(tokenizer, docs)
    pieces = [np.asarray(x + tail, dtype=np.int64) for x in ids]
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    n = len(flat) // body
    rows = [np.concatenate([head, flat[i * body:(i + 1) * body], tail]).astype(np.int64) for i in range(n)]
    doc_ids: list[list[str]] = [[] for _ in range(n)]
    for doc, start in zip(docs, starts):
        if start // body < n:
            doc_ids[start // body].append(doc.id)
    return Rows(rows, doc_ids, real_tokens=n * max_len)


def pack_pad(tokenizer, docs: list[Document], max_len: int) -> Rows:
    """One document per row, truncated to max_len; the collator pads."""
    head, tail = _wrappers(tokenizer)
    body = max_len - len(head) - len(tail)
    rows = [np.asarray(head + x[:body] + tail, dtype=np.int64) for x in tokenize(tokenizer, docs)]
    return Rows(rows, [[d.id] for d in docs], real_tokens=sum(len(r) for r in rows))


PACKERS = {"concat": pack_concat, "pad": pack_pad}


class RowDataset(torch.utils.data.Dataset):
    """Rows addressed by (row index, masking key)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, key = item
        return {"input_ids": self.rows.rows[index], "key": key, "index": index}


class StepSampler:
    """Yields this rank's micro-batches of (row, masking key) from optimizer step `start_step` on.

    Step s takes the global batch order_e[w*G:(w+1)*G] of epoch e = s // steps_per_epoch, where order_e is a
    seeded permutation and G = micro x accumulation x world; micro-batch m of rank r is its slice
    [(m*world + r)*micro, +micro). The masking key, epoch*n + row, gives each row new masks every epoch.
    """

    def __init__(self, n: int, micro: int, accum: int, world: int, rank: int, seed: int,
                 total_steps: int, start_step: int = 0):
        self.n, self.micro, self.accum, self.world, self.rank, self.seed = n, micro, accum, world, rank, seed
        self.global_batch = micro * accum * world
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set has {n} rows, fewer than one global batch of {self.global_batch} "
                             f"(micro {micro} x accumulation {accum} x world {world}): add data or lower the batch")
        self.total_steps, self.start_step = total_steps, start_step

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def step_rows(self, step: int) -> tuple[int, np.ndarray]:
        epoch, within = divmod(step, self.steps_per_epoch)
        g = self.global_batch
        return epoch, self.order(epoch)[within * g:(within + 1) * g]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            epoch, rows = self.step_rows(step)
            for m in range(self.accum):
                part = rows[(m * self.world + self.rank) * self.micro:][:self.micro]
                yield [(int(i), epoch * self.n + int(i)) for i in part]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum


def eval_batches(n: int, micro: int, world: int, rank: int, max_batches: int = 0) -> list[list[tuple[int, int]]]:
    """This rank's evaluation batches; every rank gets the same count (ZeRO-3 forwards are collective)."""
    per_rank = -(-n // world)
    count = -(-per_rank // micro)
    if max_batches:
        count = min(count, max_batches)
    mine = list(range(rank, n, world))
    return [[(i, i) for i in mine[b * micro:(b + 1) * micro]] for b in range(count)]
