"""dapt.data: reading documents, bad records, validation split, packing, step sampling and evaluation batches."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from dapt.corpus import generate
from dapt.data import (
    BadRecord,
    Document,
    StepSampler,
    eval_batches,
    in_valid_split,
    pack_concat,
    pack_pad,
    read_documents,
)
from dapt.model import train_wordpiece


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(generate(2000, seed=0), vocab_size=1000, max_len=64)


def write(path: Path, data: bytes) -> str:
    """Write raw bytes, gzip-compressed when the name ends in .gz; return the path as str."""
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def read(paths: list[str], fmt: str, **kw) -> list[tuple[str, str]]:
    return [(d.text, d.id) for d in read_documents(paths, fmt, **kw)]


# ---------------------------------------------------------------- read_documents: formats

@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
def test_read_lines(tmp_path, name):
    p = write(tmp_path / name, b"alpha one\r\n\r\n   \n  beta two  \r\ngamma\n\n\ndelta")
    q = write(tmp_path / "b.txt", b"\nsecond file\n")
    assert read([p, q], "lines") == [("alpha one", f"{p}:1"), ("beta two", f"{p}:4"), ("gamma", f"{p}:5"),
                                      ("delta", f"{p}:8"), ("second file", f"{q}:2")]


@pytest.mark.parametrize("name", ["d.txt", "d.txt.gz"])
def test_read_docs(tmp_path, name):
    data = (b"\r\n"                      # 1 leading blank line
            b"first a\r\n"              # 2 doc 1
            b"first b\r\n"              # 3
            b"\r\n"                     # 4
            b"second a\n"               # 5 doc 2, after one blank line
            b"\n  \n\n"                 # 6-8 several blank lines (one only spaces)
            b"third a\n"                # 9 doc 3
            b"  third b indented\n"     # 10
            b"third c")                 # 11, no final newline
    p = write(tmp_path / name, data)
    assert read([p], "docs") == [("first a\nfirst b", f"{p}:2"), ("second a", f"{p}:5"),
                                 ("third a\n  third b indented\nthird c", f"{p}:9")]


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_read_jsonl(tmp_path, name):
    lines = [json.dumps({"text": "one", "other": 1}), "", json.dumps({"text": "two \u00e9\u4e2d"}),
             "   ", json.dumps({"text": "three", "body": "not this"})]
    p = write(tmp_path / name, "\r\n".join(lines).encode("utf-8") + b"\r\n")
    assert read([p], "jsonl") == [("one", f"{p}:1"), ("two \u00e9\u4e2d", f"{p}:3"), ("three", f"{p}:5")]


def test_read_jsonl_custom_field(tmp_path):
    p = write(tmp_path / "r.jsonl", b'{"body": "first"}\n{"body": "second", "text": "no"}\n')
    assert read([p], "jsonl", text_field="body") == [("first", f"{p}:1"), ("second", f"{p}:2")]


def test_documents_are_document_objects(tmp_path):
    p = write(tmp_path / "a.txt", b"x\n")
    assert list(read_documents([p], "lines")) == [Document("x", f"{p}:1")]


# ---------------------------------------------------------------- read_documents: bad records

BAD_CASES = [  # (format, file bytes, bad line, words the message must contain)
    ("lines", b"good\nbad \xff\xfe byte\ngood too\n", 2, ["invalid UTF-8"]),
    ("docs", b"good\n\nbad \xff byte\n\ngood too\n", 3, ["invalid UTF-8"]),
    ("jsonl", b'{"text": "good"}\n{"text": "bad \xc3\x28"}\n', 2, ["invalid UTF-8"]),
    ("jsonl", b'{"text": "good"}\n\n{"text": "unterminated\n', 3, ["malformed JSON"]),
    ("jsonl", b'{"text": "good"}\n{"body": "no text"}\n', 2, ["missing field", "'text'"]),
    ("jsonl", b'{"text": "good"}\n["a", "list"]\n', 2, ["missing field", "'text'"]),
    ("jsonl", b'{"text": "good"}\n{"text": 5}\n', 2, ["'text'", "not text", "int"]),
    ("jsonl", b'{"text": "good"}\n{"text": null}\n', 2, ["'text'", "not text"]),
]


@pytest.mark.parametrize(("fmt", "data", "line", "words"), BAD_CASES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_bad_record_raises_with_file_and_line(tmp_path, fmt, data, line, words, suffix):
    p = write(tmp_path / f"bad.{fmt}{suffix}", data)
    with pytest.raises(BadRecord) as info:
        list(read_documents([p], fmt, on_error="raise"))
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == (p, line)
    assert str(err).startswith(f"{p}:{line}: ")
    for word in words:
        assert word in str(err)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_skip_jsonl_keeps_good_records_and_counts_reasons(tmp_path, suffix):
    lines = [b'{"text": "g1"}',          # 1
             b'{"text": "g2"',           # 2 malformed
             b'{"text": "g3"}',          # 3
             b'{"body": "x"}',           # 4 missing field
             b'{"text": ["x"]}',         # 5 not text
             b'{"text": "bad \xff"}',    # 6 invalid UTF-8
             b'',                        # 7
             b'{"text": "g8"}',          # 8
             b'not json at all',         # 9 malformed
             b'{"text": "g10"}']         # 10
    p = write(tmp_path / f"mixed.jsonl{suffix}", b"\n".join(lines) + b"\n")
    q = write(tmp_path / "clean.jsonl", b'{"text": "other file"}\n')
    skipped: Counter = Counter()
    got = read([p, q], "jsonl", on_error="skip", skipped=skipped)
    assert got == [("g1", f"{p}:1"), ("g3", f"{p}:3"), ("g8", f"{p}:8"), ("g10", f"{p}:10"),
                   ("other file", f"{q}:1")]
    assert skipped == Counter({"malformed JSON": 2, "missing field 'text'": 1, "field 'text' is not text": 1,
                               "invalid UTF-8": 1})


def test_skip_lines_keeps_good_records_and_counts_reasons(tmp_path):
    p = write(tmp_path / "l.txt", b"one\n\xff\ntwo\nbad \xc3\x28\n\nthree\n\xe2\x82\n")
    skipped: Counter = Counter()
    assert read([p], "lines", on_error="skip", skipped=skipped) == [("one", f"{p}:1"), ("two", f"{p}:3"),
                                                                      ("three", f"{p}:6")]
    assert skipped == Counter({"invalid UTF-8": 3})


def test_skip_docs_between_documents(tmp_path):
    p = write(tmp_path / "d.txt", b"one a\none b\n\n\xff\n\ntwo a\n")
    skipped: Counter = Counter()
    assert read([p], "docs", on_error="skip", skipped=skipped) == [("one a\none b", f"{p}:1"),
                                                                     ("two a", f"{p}:6")]
    assert skipped == Counter({"invalid UTF-8": 1})


def test_skip_docs_drops_the_whole_bad_document(tmp_path):
    p = write(tmp_path / "d.txt", b"one a\n\ntwo a\ntwo \xff b\ntwo c\n\nthree a\n")
    skipped: Counter = Counter()
    got = read([p], "docs", on_error="skip", skipped=skipped)
    assert skipped == Counter({"invalid UTF-8": 1})
    assert got == [("one a", f"{p}:1"), ("three a", f"{p}:7")]


# ---------------------------------------------------------------- in_valid_split

def test_valid_split_is_deterministic_and_near_the_fraction():
    texts = [f"document number {i} about {i * 7919 % 104729}" for i in range(5000)]
    assert len(set(texts)) == 5000
    fraction = 0.1
    first = [in_valid_split(t, fraction) for t in texts]
    assert first == [in_valid_split(t, fraction) for t in texts]
    assert first[::-1] == [in_valid_split(t, fraction) for t in reversed(texts)]  # order does not matter
    # binomial(5000, 0.1): standard deviation ~21; allow four of them
    assert abs(sum(first) - 500) <= 4 * (5000 * 0.1 * 0.9) ** 0.5
    # membership is monotone in the fraction: a larger fraction keeps every member of a smaller one
    larger = [in_valid_split(t, 0.3) for t in texts]
    assert all(b for a, b in zip(first, larger, strict=True) if a)
    assert abs(sum(larger) - 1500) <= 4 * (5000 * 0.3 * 0.7) ** 0.5


def test_valid_split_fraction_zero_and_one():
    texts = [f"text {i}" for i in range(2000)] + [""]
    assert not any(in_valid_split(t, 0.0) for t in texts)
    assert all(in_valid_split(t, 1.0) for t in texts)


# ---------------------------------------------------------------- packing

@pytest.fixture(scope="module")
def docs():
    texts = generate(300, seed=2) + ["short", "a b c"]
    return [Document(t, f"corpus.txt:{i + 1}") for i, t in enumerate(texts)]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_len", [16, 64])
def test_pack_concat(tokenizer, docs, max_len):
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    packed = pack_concat(tokenizer, docs, max_len)
    body = max_len - 2
    assert len(packed) > 10 and len(packed.doc_ids) == len(packed)
    for row in packed.rows:
        assert len(row) == max_len
        assert row[0] == cls and row[-1] == sep
    assert packed.real_tokens == len(packed) * max_len

    pieces = [encode(tokenizer, d.text) + [sep] for d in docs]
    stream = [t for p in pieces for t in p]
    bodies = [t for row in packed.rows for t in row[1:-1].tolist()]
    assert bodies == stream[:len(bodies)]
    assert len(stream) - len(bodies) < body  # only an incomplete last row is dropped

    # each document is listed in the row where its first token lands, at most once, in corpus order
    listed = [i for ids in packed.doc_ids for i in ids]
    assert len(listed) == len(set(listed))
    order = {d.id: i for i, d in enumerate(docs)}
    assert [order[i] for i in listed] == sorted(order[i] for i in listed)
    offset = 0
    for d, piece in zip(docs, pieces, strict=True):
        row = offset // body
        if row < len(packed):
            assert d.id in packed.doc_ids[row]
        else:
            assert d.id not in listed
        offset += len(piece)


def test_pack_concat_too_little_text(tokenizer):
    packed = pack_concat(tokenizer, [Document("short", "x:1")], 64)
    assert len(packed) == 0 and packed.doc_ids == [] and packed.real_tokens == 0
    assert len(pack_concat(tokenizer, [], 64)) == 0


def test_pack_pad(tokenizer, docs):
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    max_len = 24
    packed = pack_pad(tokenizer, docs, max_len)
    assert len(packed) == len(docs)
    assert packed.doc_ids == [[d.id] for d in docs]
    truncated = 0
    for d, row in zip(docs, packed.rows, strict=True):
        ids = encode(tokenizer, d.text)
        truncated += len(ids) > max_len - 2
        assert row.tolist() == [cls] + ids[:max_len - 2] + [sep]
        assert len(row) <= max_len
    assert 0 < truncated < len(docs)  # both cases occur
    assert packed.real_tokens == sum(len(r) for r in packed.rows)


# ---------------------------------------------------------------- StepSampler

N, SEED, STEPS = 100, 11, 30  # 12 steps per epoch at a global batch of 8: 30 steps cross two epoch boundaries


def per_step(micro: int, accum: int, world: int, start_step: int = 0, n: int = N) -> list[list[tuple[int, int]]]:
    """For each optimizer step, the (row, key) pairs of all ranks' micro-batches, in rank-then-micro order."""
    steps: list[list[tuple[int, int]]] = [[] for _ in range(STEPS - start_step)]
    for rank in range(world):
        sampler = StepSampler(n, micro, accum, world, rank, SEED, STEPS, start_step)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (STEPS - start_step) * accum
        assert all(len(b) == micro for b in batches)
        for i, b in enumerate(batches):
            steps[i // accum] += b
    return steps


LAYOUTS = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2)]


def test_step_rows_are_independent_of_the_layout():
    reference = [set(s) for s in per_step(*LAYOUTS[0])]
    assert all(len(s) == 8 for s in reference)
    assert len(set().union(*reference)) > N  # keys change across epochs, so there are more pairs than rows
    for layout in LAYOUTS[1:]:
        steps = per_step(*layout)
        assert all(len(s) == len(set(s)) == 8 for s in steps), layout
        assert [set(s) for s in steps] == reference, layout


@pytest.mark.parametrize(("micro", "accum", "world"), [(8, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("start", [1, 11, 12, 13, 29])
def test_resume_yields_exactly_the_tail(micro, accum, world, start):
    for rank in range(world):
        full = list(StepSampler(N, micro, accum, world, rank, SEED, STEPS))
        resumed = StepSampler(N, micro, accum, world, rank, SEED, STEPS, start_step=start)
        assert len(resumed) == (STEPS - start) * accum
        assert list(resumed) == full[start * accum:]


def test_epochs():
    steps = per_step(2, 2, 2)
    per_epoch = N // 8
    epochs = [[p for s in steps[e * per_epoch:(e + 1) * per_epoch] for p in s] for e in range(2)]
    for pairs in epochs:
        rows = [r for r, _ in pairs]
        assert len(rows) == per_epoch * 8 == len(set(rows))  # no row twice within an epoch
        assert len({k for _, k in pairs}) == len(pairs)
        assert len({r for r, _ in pairs}) == len({k for _, k in pairs})
    rows0, rows1 = ([r for r, _ in pairs] for pairs in epochs)
    assert rows0 != rows1  # reshuffled
    key0, key1 = dict(epochs[0]), dict(epochs[1])
    common = key0.keys() & key1.keys()
    assert len(common) > 50
    assert all(key0[r] != key1[r] for r in common)  # new masks for the same row in the next epoch
    assert not set(key0.values()) & set(key1.values())


def test_same_seed_same_order_other_seed_other_order():
    a = list(StepSampler(N, 4, 1, 1, 0, seed=1, total_steps=5))
    assert a == list(StepSampler(N, 4, 1, 1, 0, seed=1, total_steps=5))
    assert a != list(StepSampler(N, 4, 1, 1, 0, seed=2, total_steps=5))


@pytest.mark.parametrize(("n", "micro", "accum", "world"), [(7, 8, 1, 1), (15, 2, 4, 2), (0, 1, 1, 1)])
def test_too_few_rows_for_one_global_batch(n, micro, accum, world):
    with pytest.raises(ValueError, match=rf"{n} rows, fewer than one global batch of {micro * accum * world}"):
        StepSampler(n, micro, accum, world, 0, SEED, 10)


def test_exactly_one_global_batch_is_enough():
    batches = list(StepSampler(8, 2, 2, 2, 1, SEED, 3))
    assert len(batches) == 6


# ---------------------------------------------------------------- eval_batches

@pytest.mark.parametrize(("n", "micro", "world"), [(10, 3, 3), (10, 2, 4), (2, 3, 4), (12, 3, 2), (1, 1, 1)])
def test_eval_batches_cover_each_row_once(n, micro, world):
    per_rank = [eval_batches(n, micro, world, rank) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    pairs = [p for batches in per_rank for b in batches for p in b]
    assert sorted(r for r, _ in pairs) == list(range(n))  # every row, none twice
    assert all(r == k for r, k in pairs)  # fixed masking key per row
    assert all(len(b) <= micro for batches in per_rank for b in batches)


def test_eval_batches_ten_rows_three_ranks():
    per_rank = [eval_batches(10, 3, 3, rank) for rank in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    rows = [r for batches in per_rank for b in batches for r, _ in b]
    assert len(rows) == len(set(rows)) == 10


def test_eval_batches_max_batches():
    per_rank = [eval_batches(100, 4, 2, rank, max_batches=3) for rank in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    rows = [r for batches in per_rank for b in batches for r, _ in b]
    assert len(rows) == len(set(rows)) == 24
