"""Corpus selection: weighted mixing, exact deduplication, the newest-tokens budget."""

from __future__ import annotations

from collections import Counter

import pytest

from dapt.data.corpus import generate
from dapt.data.formats import FormatOptions
from dapt.data.selection import budget_start, duplicate_records, stream_counts
from dapt.data.stream import RowFeeder, StreamSpec, stream_rows
from dapt.model.build import train_wordpiece


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(generate(500, seed=1), 300, 64)


def _spec(tok, files, **kw) -> StreamSpec:
    args = dict(
        files=files,
        format="lines",
        options=FormatOptions(),
        streams=8,
        seed=0,
        block_docs=16,
        packing="pad",
        max_len=64,
        tokenizer=tok,
    )
    return StreamSpec(**(args | kw))


def _epoch_docs(spec: StreamSpec) -> list[str]:
    docs = []
    for stream in range(spec.streams):
        for row, st in stream_rows(spec, stream):
            if st["epoch"] > 0:
                break
            docs += row.doc_ids
    return docs


@pytest.mark.parametrize(
    "weights, expected", [([3, 1], [6, 2]), ([1, 1], [4, 4]), ([10, 1, 1], [6, 1, 1]), ([0.7, 0.3], [6, 2])]
)
def test_stream_counts_follow_weights(weights, expected):
    assert stream_counts(weights, 8) == expected


def test_mixing_gives_each_source_its_share_of_rows(tok, tmp_path):
    domain, general = tmp_path / "domain.txt", tmp_path / "general.txt"
    domain.write_text("\n".join(f"domain document {i} secure login" for i in range(300)) + "\n")
    general.write_text("\n".join(f"general text {i} about the weather" for i in range(40)) + "\n")
    spec = _spec(tok, [str(domain), str(general)], groups=[[str(domain)], [str(general)]], weights=[3, 1])
    feeder = RowFeeder(spec, rank=0, world=1, num_workers=0, states={}, consumed=0)
    rows = feeder.take(400)
    share = Counter("domain" in doc for _, row in rows for doc in row.doc_ids)
    assert share[True] == 300 and share[False] == 100  # 6 of 8 streams: exactly 75% of the rows
    # the small general corpus repeats (its epochs run faster); the domain one is read once
    assert len({d for _, r in rows for d in r.doc_ids if "general" in d}) == 40


def test_dedupe_keeps_first_occurrences_across_files(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha one\nbeta two\nalpha one\ngamma three\n")
    b.write_text("beta two\ndelta four\nalpha one\n")
    skip = duplicate_records([str(a), str(b)], "lines", FormatOptions())
    assert {k: v.tolist() for k, v in skip.items()} == {str(a): [2], str(b): [0, 2]}
    spec = _spec(tok, [str(a), str(b)], streams=2, skip=skip)
    docs = sorted(_epoch_docs(spec))
    assert docs == sorted([f"{a}:1", f"{a}:2", f"{a}:4", f"{b}:2"])
    counts = Counter()
    for stream in range(2):
        for _, st in stream_rows(spec, stream):
            if st["epoch"] > 0:
                break
            last = st
        counts.update(last["seen"])
    assert counts["filtered/duplicate"] == 3


def test_budget_keeps_the_newest_tail(tok, tmp_path):
    files = []
    for k in range(4):  # four "years", oldest first, each 100 documents of similar length
        path = tmp_path / f"year{k}.txt"
        path.write_text(
            "\n".join(f"filing {k} {i} the attacker used a weak password" for i in range(100)) + "\n"
        )
        files.append(str(path))
    per_doc = len(tok("filing 0 0 the attacker used a weak password", add_special_tokens=False)["input_ids"])
    kept, starts = budget_start(files, "lines", FormatOptions(), tok, max_tokens=150 * per_doc)
    assert kept == files[2:] and set(starts) == {
        files[2]
    }  # 1.5 years of tokens: half of year 2, all of year 3
    spec = _spec(tok, kept, starts=starts, streams=4)
    docs = _epoch_docs(spec)
    lines = sorted(int(d.rsplit(":", 1)[1]) for d in docs if d.startswith(files[2]))
    assert sum(d.startswith(files[3]) for d in docs) == 100
    # a contiguous tail of year 2, about half of it (the token count is estimated from characters: within 5%)
    assert abs(len(lines) - 50) <= 8 and lines == list(range(lines[0], 101))
    whole, none = budget_start(files, "lines", FormatOptions(), tok, max_tokens=10**9)
    assert whole == files and none == {}


def test_mixing_and_dedupe_through_a_run(recipe, tmp_path, corpus_file):
    from conftest import run_inprocess

    other = tmp_path / "other.txt"
    other.write_text(
        "\n".join(["the same line again"] * 50 + [f"general line {i} about nothing" for i in range(200)])
    )
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            f"--data.train=[{corpus_file}, {other}]",
            "--data.train_weights=[3, 1]",
            "--data.dedupe=true",
            "--train.epochs=1",
            "--train.micro_batch_size=32",
        ]
    )
    lines = [x.strip() for f in (corpus_file, other) for x in f.read_text().splitlines() if x.strip()]
    expected = len(lines) - len(
        set(lines)
    )  # "the same line again" x 49, and the generated corpus's own repeats
    assert expected >= 49
    # one epoch reads every record, so the count is exact
    assert summary["skipped_records"].get("filtered/duplicate", 0) == expected, (summary, expected)
