"""dapt.data.stream: canonical streams, blocks, exact resume, disjoint and complete epochs, and the RowFeeder's global
order, which must not depend on the world size, the number of DataLoader workers or where a run was resumed."""

from __future__ import annotations

import copy
import gzip
import random
import uuid
from itertools import islice
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dapt.data.corpus import generate, http_request
from dapt.data.formats import BadRecord, FormatOptions
from dapt.data.prepare import read_documents
from dapt.data.sources import expand
from dapt.data.stream import (
    RowFeeder,
    StreamSpec,
    count_epoch_rows,
    in_valid_split,
    stream_rows,
    usable_workers,
)
from dapt.model.build import train_wordpiece


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(generate(600, seed=0), vocab_size=300, max_len=64)


def write_lines(path: Path, texts: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(texts) + "\n")
    return str(path)


def http_corpus(n: int, seed: int) -> bytes:
    """CSIC-like raw requests: CRLF headers, LF blank lines, a body line for POST, one blank line or two after."""
    rng = random.Random(seed)
    out = b""
    for i in range(n):
        request = http_request(rng).split(" Host: ")[0]
        method = request.split(" ", 1)[0]
        lines = [
            request.replace(" /", " http://localhost:8080/", 1),
            f"Host: host{i % 3}",
            f"Cookie: JSESSIONID={i:08X}{rng.randrange(16**6):06X}",
        ]
        out += b"".join(x.encode() + b"\r\n" for x in lines)
        out += b"\n" + (f"a={i}&b={rng.randrange(999)}\n\n".encode() if method in ("POST", "PUT") else b"\n")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, list[str]]:
    """Small corpora: several text files, one text file, one with bad lines, raw HTTP, and one file per format."""
    root = tmp_path_factory.mktemp("stream_corpus")
    texts = generate(60, seed=5)
    files = {
        "many": [write_lines(root / "many" / f"part{i}.txt", texts[i * 6 : (i + 1) * 6]) for i in range(10)],
        "single": [write_lines(root / "single.txt", texts[:50])],
        "three": [write_lines(root / "three" / f"t{i}.txt", texts[i * 20 : (i + 1) * 20]) for i in range(3)],
    }
    bad = root / "bad.txt"
    raw = b""
    for i, t in enumerate(generate(40, seed=6)):
        raw += t.encode() + b"\n" + (b"bad \xff line\n" if i % 7 == 3 else b"")
    bad.write_bytes(raw + b"the last good line\n")
    files["bad"] = [str(bad)]
    http = root / "requests.txt"
    http.write_bytes(http_corpus(45, seed=1))
    files["http"] = [str(http)]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(f'{{"text": "{t}"}}\n' for t in generate(30, seed=8)))
    files["jsonl"] = [str(jsonl)]
    csv = root / "table.csv"
    csv.write_text(
        "id,text,score\n"
        + "".join(f"{i},{t.split(' ')[0]} {i},{i / 7:.4f}\n" for i, t in enumerate(generate(30, seed=9)))
    )
    files["csv"] = [str(csv)]
    parquet = root / "docs.parquet"
    pq.write_table(pa.table({"text": generate(30, seed=10)}), parquet, row_group_size=7)
    files["parquet"] = [str(parquet)]
    saved = root / "saved"  # a Hugging Face datasets folder: 3 Arrow shards and their metadata
    datasets.Dataset.from_dict({"text": generate(30, seed=12)}).save_to_disk(str(saved), num_shards=3)
    files["arrow"] = expand([str(saved)], "arrow")
    assert [Path(f).name for f in files["arrow"]] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    blank = root / "blank.txt"
    blank.write_text("\n\n".join(f"{t}\nsecond line {i}" for i, t in enumerate(generate(30, seed=11))) + "\n")
    files["docs"] = [str(blank)]
    return files


def make_spec(
    tokenizer,
    files: list[str],
    fmt: str = "lines",
    streams: int = 1,
    block_docs: int = 6,
    packing: str = "pad",
    max_len: int = 24,
    options: FormatOptions | None = None,
    **kw,
) -> StreamSpec:
    return StreamSpec(
        files=files,
        format=fmt,
        options=options or FormatOptions(),
        streams=streams,
        seed=3,
        block_docs=block_docs,
        packing=packing,
        max_len=max_len,
        tokenizer=tokenizer,
        **kw,
    )


def key(row) -> tuple:
    return tuple(row.ids.tolist()), row.doc_ids


def take(spec: StreamSpec, stream: int, n: int, state: dict | None = None) -> list[tuple[tuple, dict]]:
    return [(key(row), st) for row, st in islice(stream_rows(spec, stream, state), n)]


def through_epoch(spec: StreamSpec, stream: int, epochs: int, extra: int = 3) -> list[tuple[tuple, dict]]:
    """Rows from the start until `extra` rows into epoch `epochs`."""
    out = []
    for row, st in stream_rows(spec, stream):
        out.append((key(row), st))
        if st["epoch"] >= epochs and len([1 for _, s in out if s["epoch"] >= epochs]) >= extra:
            return out
    raise AssertionError("unreachable")


def boundaries(states: list[dict]) -> list[int]:
    """Indices k whose row starts a new block, split or epoch."""
    where = ("epoch", "split", "block")
    return [k for k in range(1, len(states)) if any(states[k][w] != states[k - 1][w] for w in where)]


def resume_points(states: list[dict]) -> list[int]:
    """k (rows taken before the restart): around the first block boundaries, every split and epoch boundary,
    and a few inside blocks."""
    b = boundaries(states)
    epochs = [k for k in b if states[k]["epoch"] != states[k - 1]["epoch"]]
    splits = [k for k in b if states[k]["split"] != states[k - 1]["split"]]
    ks = {1, 2, len(states) - 1} | {k + d for k in b[:2] + splits + epochs for d in (-1, 0, 1)}
    ks |= set(random.Random(len(states)).sample(range(1, len(states)), 4))
    return sorted(k for k in ks if 0 < k < len(states))


def check_resume(spec: StreamSpec, stream: int, epochs: int = 2) -> list[tuple[tuple, dict]]:
    full = through_epoch(spec, stream, epochs)
    states = [st for _, st in full]
    epoch_starts = [k for k in boundaries(states) if states[k]["epoch"] != states[k - 1]["epoch"]]
    assert len(epoch_starts) == epochs
    assert len(boundaries(states)) > len(epoch_starts)  # several blocks per epoch
    for k in resume_points(states):
        rest = take(spec, stream, len(full) - k, full[k - 1][1])
        assert [r for r, _ in rest] == [r for r, _ in full[k:]], k
        assert [s for _, s in rest] == states[k:], k  # states too: positions, counts and "seen"
    return full


RESUME_CASES = {  # name -> (corpus, make_spec arguments, stream)
    "lines-pad-files": ("three", {"streams": 2}, 1),
    "lines-concat-stride": ("single", {"streams": 2, "packing": "concat", "max_len": 16}, 0),
    "lines-packed": ("three", {"packing": "packed", "max_len": 64}, 0),
    "http-pad": ("http", {"max_len": 32}, 0),
    "http-concat": ("http", {"packing": "concat", "max_len": 48, "block_docs": 5}, 0),
    "http-packed-stride": ("http", {"streams": 2, "packing": "packed", "max_len": 64, "block_docs": 5}, 1),
    "lines-filters": ("three", {"streams": 2, "num_samples": 20, "min_chars": 120, "max_chars": 300}, 0),
    "lines-skip": ("bad", {"on_error": "skip", "packing": "concat", "max_len": 32}, 0),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_gives_exactly_the_rest(tokenizer, corpus, case):
    name, kw, stream = RESUME_CASES[case]
    spec = make_spec(tokenizer, corpus[name], **kw)
    full = check_resume(spec, stream)
    blocks: dict[tuple, list[int]] = {}
    for (ids, docs), st in full:
        assert len(ids) <= spec.max_len
        blocks.setdefault((st["epoch"], st["split"], st["block"]), []).append(len(ids))
        assert len(docs) == 1 or spec.packing != "pad"
    if spec.packing == "concat":  # rows are full but for one a block
        assert all(sum(n < spec.max_len for n in lengths) <= 1 for lengths in blocks.values())
        assert sum(len(lengths) for lengths in blocks.values()) > 2 * len(blocks)
    if "num_samples" in kw:  # at most ceil(num_samples / streams) documents a stream per epoch
        cap = -(-kw["num_samples"] // spec.streams)
        for epoch in range(2):
            files = [f for f, _, _ in spec.epoch_splits(epoch, stream)]
            usable = [
                d for d in read_documents(files, "lines") if kw["min_chars"] <= len(d.text) <= kw["max_chars"]
            ]
            rows = [docs for (_, docs), st in full if st["epoch"] == epoch]
            assert len(rows) == min(cap, len(usable)) and {d for (d,) in rows} <= {d.id for d in usable}
        assert full[-1][1]["seen"].get("filtered/length", 0) > 0


def test_skip_counts_after_resume(tokenizer, corpus):
    spec = make_spec(tokenizer, corpus["bad"], on_error="skip", block_docs=4)
    full = through_epoch(spec, 0, 1, extra=1)
    end_of_epoch0 = [st for _, st in full if st["epoch"] == 0][-1]
    assert end_of_epoch0["seen"] == {"skipped/invalid UTF-8": 6}
    assert len([1 for _, st in full if st["epoch"] == 0]) == 41  # every good line once
    for k in (3, 4, 5, 17, 40):
        rest = take(spec, 0, len(full) - k, full[k - 1][1])
        assert rest[-1][1]["seen"] == full[-1][1]["seen"]
        assert [s["counts"] for _, s in rest] == [s["counts"] for _, s in full[k:]]
    raising = make_spec(tokenizer, corpus["bad"], block_docs=4)
    with pytest.raises(BadRecord, match=r"bad\.txt:5: invalid UTF-8"):
        take(raising, 0, 10)


def test_skip_counts_include_bad_records_at_the_end_of_a_split(tokenizer, tmp_path):
    path = tmp_path / "tail.txt"
    path.write_bytes(b"good one\ngood two\n\xff\ngood three\ngood four\n\xfe\n")
    spec = make_spec(tokenizer, [str(path)], on_error="skip", block_docs=2)
    rows = take(spec, 0, 5)
    assert [st["epoch"] for _, st in rows] == [0, 0, 0, 0, 1]
    assert rows[4][1]["counts"] == {"skipped/invalid UTF-8": 2}  # both bad lines of epoch 0


@pytest.mark.parametrize("fmt", ["docs", "jsonl", "csv", "parquet", "arrow"])
def test_resume_other_formats(tokenizer, corpus, fmt):
    spec = make_spec(tokenizer, corpus[fmt], fmt=fmt, streams=2, block_docs=4, packing="packed", max_len=48)
    check_resume(spec, 1, epochs=1)


# ---------------------------------------------------------------- disjoint and complete streams


def epoch_docs(spec: StreamSpec, stream: int, epoch: int = 0) -> list[str]:
    """The documents of one stream in one epoch, in order (pad packing: one document a row)."""
    out = []
    for row, st in stream_rows(spec, stream):
        if st["epoch"] > epoch:
            return out
        if st["epoch"] == epoch:
            assert len(row.doc_ids) == 1
            out += row.doc_ids
    raise AssertionError("unreachable")


@pytest.mark.parametrize("name", ["many", "single"])
@pytest.mark.parametrize("valid_fraction", [0.0, 0.3])
def test_streams_are_disjoint_and_complete(tokenizer, corpus, name, valid_fraction):
    streams = 4
    spec = make_spec(tokenizer, corpus[name], streams=streams, block_docs=4, valid_fraction=valid_fraction)
    if name == "many":
        assert len(spec.splits) == 10
    else:  # one file: 4 contiguous runs of records, each ending where the next starts
        assert len(spec.splits) == 4 and {url for url, _, _ in spec.splits} == {corpus[name][0]}
        starts = [start.record for _, start, _ in spec.splits]
        assert starts[0] == 0 and starts == sorted(starts)
        assert [end for _, _, end in spec.splits] == starts[1:] + [None]
    docs = list(read_documents(corpus[name], "lines"))
    train = [d.id for d in docs if not in_valid_split(d.text, valid_fraction)]
    if valid_fraction:
        assert 5 < len(docs) - len(train) < len(docs) / 2
    per_stream = [epoch_docs(spec, c) for c in range(streams)]
    assert all(per_stream)
    got = [d for ids in per_stream for d in ids]
    assert len(got) == len(set(got)) and sorted(got) == sorted(train)
    assert count_epoch_rows(spec, list(range(streams))) == len(train)


@pytest.mark.parametrize("name", ["many", "single"])
def test_epochs_reshuffle(tokenizer, corpus, name):
    """Every epoch covers the corpus once, in a new order: each stream's sequence changes, and so does the order of
    the documents of each file (splits are dealt to the streams anew every epoch, blocks are reshuffled)."""
    streams = 2
    spec = make_spec(tokenizer, corpus[name], streams=streams, block_docs=5)
    epochs = [[epoch_docs(spec, c, e) for c in range(streams)] for e in range(2)]
    for c in range(streams):
        assert epochs[0][c] != epochs[1][c]
    everything = [sorted(d for docs in per_stream for d in docs) for per_stream in epochs]
    assert everything[0] == everything[1] == sorted(d.id for d in read_documents(corpus[name], "lines"))

    def by_file(per_stream: list[list[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for docs in per_stream:
            for d in docs:
                out.setdefault(d.rsplit(":", 1)[0], []).append(d)
        return out

    first, second = by_file(epochs[0]), by_file(epochs[1])
    assert first.keys() == second.keys()
    assert all(sorted(first[f]) == sorted(second[f]) for f in first)
    assert sum(first[f] != second[f] for f in first) >= len(first) / 2
    one = make_spec(
        tokenizer, corpus["single"], block_docs=5
    )  # one stream, one split: only the blocks reshuffle
    assert epoch_docs(one, 0, 0) != epoch_docs(one, 0, 1)
    same_seed = make_spec(tokenizer, corpus[name], streams=streams, block_docs=5)
    assert epoch_docs(same_seed, 1, 1) == epochs[1][1]  # reproducible


# ---------------------------------------------------------------- RowFeeder: the global order

C = 8


@pytest.fixture(scope="module")
def feeder_spec(tokenizer, corpus) -> StreamSpec:
    return make_spec(tokenizer, corpus["many"], streams=C, block_docs=3, packing="packed", max_len=48)


def global_rows(
    spec: StreamSpec,
    world: int,
    per_rank: int,
    states: dict | None = None,
    consumed: int = 0,
    num_workers: int = 0,
) -> tuple[list[tuple[int, tuple]], dict]:
    """The rows of all ranks of a world in global order, and their merged stream states."""
    out, merged = [], {}
    for rank in range(world):
        feeder = RowFeeder(spec, rank, world, num_workers, copy.deepcopy(states or {}), consumed)
        rows = feeder.take(per_rank)
        assert [g for g, _ in rows] == [rank + (consumed + i) * world for i in range(per_rank)]
        out += [(g, key(row)) for g, row in rows]
        merged |= copy.deepcopy(feeder.states)
    return sorted(out), merged


K, M = 48, 32


@pytest.fixture(scope="module")
def reference(feeder_spec) -> list[tuple[int, tuple]]:
    rows, _ = global_rows(feeder_spec, 1, K + M)
    assert [g for g, _ in rows] == list(range(K + M))
    assert len({docs for _, (_, docs) in rows}) > 20
    return rows


@pytest.mark.parametrize("world", [2, 4])
def test_global_order_does_not_depend_on_the_world_size(feeder_spec, reference, world):
    rows, _ = global_rows(feeder_spec, world, (K + M) // world)
    assert rows == reference


def test_workers_give_the_same_rows(feeder_spec, reference):
    feeder = RowFeeder(feeder_spec, 0, 1, 2, {}, 0)
    assert feeder.workers == 2
    assert [(g, key(row)) for g, row in feeder.take(K + M)] == reference


def test_feeder_resume_same_world(feeder_spec, reference):
    feeder = RowFeeder(feeder_spec, 0, 1, 0, {}, 0)
    feeder.take(K)
    states = copy.deepcopy(feeder.states)
    assert sorted(states) == list(range(C))
    assert feeder.epoch() >= 0 and not feeder.counts()
    continued = [(g, key(row)) for g, row in feeder.take(M)]
    assert continued == reference[K:]
    resumed = RowFeeder(feeder_spec, 0, 1, 0, states, consumed=K)
    assert [(g, key(row)) for g, row in resumed.take(M)] == continued
    with_workers = RowFeeder(feeder_spec, 0, 1, 2, states, consumed=K)
    assert [(g, key(row)) for g, row in with_workers.take(M)] == continued


@pytest.mark.parametrize(("before", "after"), [(2, 4), (4, 2), (2, 1)])
def test_feeder_resume_on_another_world_size(feeder_spec, reference, before, after):
    _, states = global_rows(feeder_spec, before, K // before)
    assert sorted(states) == list(range(C))
    rows, _ = global_rows(feeder_spec, after, M // after, states=states, consumed=K // after)
    assert rows == reference[K:]


def test_usable_workers():
    assert usable_workers(8, 2) == 2
    assert usable_workers(8, 3) == 2
    assert usable_workers(6, 4) == 3
    assert usable_workers(5, 2) == 1
    assert usable_workers(1, 8) == 1
    assert usable_workers(4, 0) == 0
    assert usable_workers(0, 2) == 0


def test_feeder_uses_the_usable_worker_count(feeder_spec):
    feeder = RowFeeder(feeder_spec, 1, 2, 3, {}, 0)  # 4 streams a rank: 3 workers would split them unevenly
    assert feeder.streams == [1, 3, 5, 7] and feeder.workers == 2
    assert RowFeeder(feeder_spec, 0, 4, 0, {}, 0).streams == [0, 4]


def test_too_small_corpus_for_the_streams(tokenizer, tmp_path):
    one = write_lines(tmp_path / "one.txt", ["the only document in this corpus"])
    spec = make_spec(tokenizer, [one], streams=8)
    with pytest.raises(ValueError, match=r"data\.streams"):
        RowFeeder(spec, 0, 1, 0, {}, 0).take(8)
    empty_streams = 0
    for c in range(8):
        try:
            next(stream_rows(spec, c))
        except ValueError as e:
            assert "data.streams" in str(e) and f"stream {c} of 8" in str(e)
            empty_streams += 1
    assert empty_streams >= 1


# ---------------------------------------------------------------- other sources through stream_rows


@pytest.fixture
def memory_url():
    url = f"memory://dapt-stream-{uuid.uuid4().hex}/corpus.txt"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url)


@pytest.mark.parametrize(
    "source",
    [
        "memory",
        "gz",
        "zst",
    ],
)
def test_other_sources(tokenizer, corpus, tmp_path, memory_url, source):
    plain = corpus["single"][0]
    data = Path(plain).read_bytes()
    if source == "memory":
        with fsspec.open(memory_url, "wb") as f:
            f.write(data)
        url = memory_url
    elif source == "gz":
        url = str(tmp_path / "corpus.txt.gz")
        Path(url).write_bytes(gzip.compress(data))
    else:
        url = str(tmp_path / "corpus.txt.zst")
        Path(url).write_bytes(zstandard.ZstdCompressor().compress(data))
    kw = {"streams": 2, "packing": "concat", "max_len": 20}
    reference = take(make_spec(tokenizer, [plain], **kw), 1, 40)
    spec = make_spec(tokenizer, [url], **kw)
    rows = take(spec, 1, 40)
    strip = len(url) + 1
    assert [(ids, tuple(d[strip:] for d in docs)) for (ids, docs), _ in rows] == [
        (ids, tuple(d[len(plain) + 1 :] for d in docs)) for (ids, docs), _ in reference
    ]
    assert all(d.startswith(url + ":") for (_, docs), _ in rows for d in docs)
    later = [k for k in range(1, 40) if rows[k - 1][1]["offset"] > 0]  # resume points inside the file
    assert len(later) > 5
    for k in (later[0], later[len(later) // 2]):
        assert take(spec, 1, 40 - k, rows[k - 1][1]) == rows[k:]


def test_file_splits_of_a_large_file_are_contiguous_and_balanced(tmp_path):
    from dapt.data.formats import READERS
    from dapt.data.stream import file_splits

    path = tmp_path / "big.txt"
    path.write_text(
        "".join(f"line {i}\n" for i in range(10000))
    )  # more records than the marks kept: thinning
    splits = file_splits(str(path), "lines", FormatOptions(), 8, keep=500)
    assert len(splits) == 8
    seen = []
    for url, start, end in splits:
        part = [
            doc.text
            for doc, after in READERS["lines"](url, start, FormatOptions())
            if end is None or after.record <= end
        ]
        assert 10000 / 8 * 0.8 < len(part) < 10000 / 8 * 1.2
        seen += part
    assert seen == [f"line {i}" for i in range(10000)]


def test_resume_reads_at_most_one_block_whatever_the_position(tokenizer, tmp_path, monkeypatch):
    """Resume cost does not grow with position: the records read to hand out the next row after a resume are the
    same few (one block) early and late in a large file."""
    import dapt.data.stream as stream_mod

    path = tmp_path / "big.txt"
    path.write_text("".join(f"document number {i} about the login form\n" for i in range(20000)))
    spec = StreamSpec(
        files=[str(path)],
        format="lines",
        options=FormatOptions(),
        streams=1,
        seed=0,
        block_docs=64,
        packing="pad",
        max_len=32,
        tokenizer=tokenizer,
    )
    states = {}
    for n, (_, st) in enumerate(stream_rows(spec, 0), start=1):
        if n in (100, 18000):
            states[n] = st
        if n == 18000:
            break
    reads = {}
    real = stream_mod.READERS["lines"]
    for n, st in states.items():
        count = [0]

        def counting(url, start, opts, _count=count):
            for item in real(url, start, opts):
                _count[0] += 1
                yield item

        monkeypatch.setitem(stream_mod.READERS, "lines", counting)
        next(stream_rows(spec, 0, st))
        reads[n] = count[0]
    assert reads[100] <= 64 and reads[18000] <= 64, reads  # one block, not the 18000 records before it
