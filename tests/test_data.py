"""dapt.data.prepare, dapt.data.sources, dapt.data.formats and dapt.data.packing: reading documents in every format from every kind of
source, bad records, resume positions, the validation split, evaluation batches and packing."""

from __future__ import annotations

import bz2
import gzip
import json
import math
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dapt.config.schema import BadInput
from dapt.data.corpus import generate
from dapt.data.formats import READERS, FormatOptions
from dapt.data.packing import pack_concat, pack_packed, pack_pad, tokenize, wrappers
from dapt.data.prepare import BadRecord, Document, eval_batches, in_valid_split, read_documents
from dapt.data.sources import Position, expand
from dapt.model.build import train_wordpiece

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(generate(600, seed=0), vocab_size=300, max_len=64)


def write(path: Path, data: bytes) -> str:
    """Write raw bytes, compressed by the name's suffix (.gz, .bz2, .zst); return the path as str."""
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".bz2":
        data = bz2.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def read(paths: list[str], fmt: str, **kw) -> list[tuple[str, str]]:
    return [(d.text, d.id) for d in read_documents(paths, fmt, **kw)]


def write_parquet(path: Path, values: list, row_group_size: int = 3, **other) -> str:
    pq.write_table(
        pa.table({"text": pa.array(values, type=pa.string()), **other}), path, row_group_size=row_group_size
    )
    return str(path)


# ---------------------------------------------------------------- read_documents: formats

COMPRESSIONS = ["", ".gz", ".bz2", ".zst"]


@pytest.mark.parametrize("suffix", COMPRESSIONS)
def test_read_lines(tmp_path, suffix):
    p = write(tmp_path / f"a.txt{suffix}", b"alpha one\r\n\r\n   \n  beta two  \r\ngamma\n\n\ndelta")
    q = write(tmp_path / "b.txt", b"\nsecond file\n")
    assert read([p, q], "lines") == [
        ("alpha one", f"{p}:1"),
        ("beta two", f"{p}:4"),
        ("gamma", f"{p}:5"),
        ("delta", f"{p}:8"),
        ("second file", f"{q}:2"),
    ]


@pytest.mark.parametrize("suffix", COMPRESSIONS)
def test_read_docs(tmp_path, suffix):
    data = (
        b"\r\n"  # 1 leading blank line
        b"first a\r\n"  # 2 doc 1
        b"first b\r\n"  # 3
        b"\r\n"  # 4
        b"second a\n"  # 5 doc 2, after one blank line
        b"\n  \n\n"  # 6-8 several blank lines (one only spaces)
        b"third a\n"  # 9 doc 3
        b"  third b indented\n"  # 10
        b"third c"
    )  # 11, no final newline
    p = write(tmp_path / f"d.txt{suffix}", data)
    assert read([p], "docs") == [
        ("first a\nfirst b", f"{p}:2"),
        ("second a", f"{p}:5"),
        ("third a\n  third b indented\nthird c", f"{p}:9"),
    ]


HTTP_SAMPLE = (
    b"\r\n"  # 1 blank lines before the first request
    b"GET http://localhost:8080/a?x=1 HTTP/1.1\r\n"  # 2
    b"Host: localhost:8080\r\n"  # 3
    b"\r\n"  # 4
    b"\n"  # 5
    b"POST http://localhost:8080/b HTTP/1.1\r\n"  # 6
    b"Content-Length: 7\r\n"  # 7
    b"\r\n"  # 8
    b"a=1&b=2\n"  # 9 the body
    b"\n"  # 10
    b"DELETE /c HTTP/1.0\n"  # 11
    b"Host: x\n"  # 12
    b"PUT http://localhost:9090/d HTTP/1.1\r\n"  # 13 no blank line before it
    b"Accept:*/*\r\n"  # 14
    b"\r\n"  # 15
    b"id=4"
)  # 16 no final newline


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_http(tmp_path, suffix):
    p = write(tmp_path / f"h.txt{suffix}", HTTP_SAMPLE)
    assert read([p], "http") == [
        ("GET http://localhost:8080/a?x=1 HTTP/1.1\nHost: localhost:8080", f"{p}:2"),
        ("POST http://localhost:8080/b HTTP/1.1\nContent-Length: 7\n\na=1&b=2", f"{p}:6"),
        ("DELETE /c HTTP/1.0\nHost: x", f"{p}:11"),
        ("PUT http://localhost:9090/d HTTP/1.1\nAccept:*/*\n\nid=4", f"{p}:13"),
    ]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_jsonl(tmp_path, suffix):
    lines = [
        json.dumps({"text": "one", "other": 1}),
        "",
        json.dumps({"text": "two \u00e9\u4e2d"}),
        "   ",
        json.dumps({"text": "three", "body": "not this"}),
        json.dumps({"text": "  "}),
    ]
    p = write(tmp_path / f"r.jsonl{suffix}", "\r\n".join(lines).encode("utf-8") + b"\r\n")
    # blank lines separate records; an empty text field is a bad record (counted), never a silent drop
    skipped = Counter()
    assert read([p], "jsonl", on_error="skip", skipped=skipped) == [
        ("one", f"{p}:1"),
        ("two \u00e9\u4e2d", f"{p}:3"),
        ("three", f"{p}:5"),
    ]
    assert skipped == {"empty field 'text'": 1}


def test_read_jsonl_custom_field(tmp_path):
    p = write(tmp_path / "r.jsonl", b'{"body": "first"}\n{"body": "second", "text": "no"}\n')
    assert read([p], "jsonl", text_field="body") == [("first", f"{p}:1"), ("second", f"{p}:2")]
    opts = FormatOptions(text_field="body")
    assert read([p], "jsonl", options=opts) == [("first", f"{p}:1"), ("second", f"{p}:2")]


CSV_SAMPLE = (
    b"id,text,score,flag\r\n"
    b'1,"hello, world",0.123456,yes\r\n'
    b"2,plain,3,no\r\n"
    b"\r\n"
    b"3, spaced ,2.5,x.y\r\n"
    b'4,"say ""hi""",1.999,\r\n'
)


def test_read_csv_with_header_all_columns(tmp_path):
    p = write(tmp_path / "t.csv", CSV_SAMPLE)
    assert read([p], "csv") == [
        ("id:1 text:hello, world score:0.123456 flag:yes", f"{p}:2"),
        ("id:2 text:plain score:3 flag:no", f"{p}:3"),
        ("id:3 text:spaced score:2.5 flag:x.y", f"{p}:5"),
        ('id:4 text:say "hi" score:1.999 flag:', f"{p}:6"),
    ]


def test_read_csv_selected_columns_and_rounding(tmp_path):
    p = write(tmp_path / "t.csv", CSV_SAMPLE)
    opts = FormatOptions(columns=("score", "text", "flag"), round_digits=2)
    assert [t for t, _ in read([p], "csv", options=opts)] == [
        "score:0.12 text:hello, world flag:yes",
        "score:3 text:plain flag:no",  # no decimal point: kept as it is
        "score:2.5 text:spaced flag:x.y",  # not a number: kept as it is
        'score:2 text:say "hi" flag:',
    ]


def test_read_csv_without_header(tmp_path):
    p = write(tmp_path / "kdd.csv.gz", b"0,tcp,http,0.00,normal,21\n2,udp,private,0.063,neptune,17\n")
    opts = FormatOptions(
        column_names=("duration", "protocol", "service", "rate", "label", "level"),
        columns=("protocol", "rate", "label"),
        round_digits=1,
    )
    assert read([p], "csv", options=opts) == [
        ("protocol:tcp rate:0 label:normal", f"{p}:1"),
        ("protocol:udp rate:0.1 label:neptune", f"{p}:2"),
    ]
    every = read([p], "csv", options=FormatOptions(column_names=("a", "b", "c", "d", "e", "f")))
    assert every[0] == ("a:0 b:tcp c:http d:0.00 e:normal f:21", f"{p}:1") and len(every) == 2


def test_read_csv_omitting_zeros(tmp_path):
    p = write(tmp_path / "kdd.csv", b"0,tcp,0.001,0.50,12,normal\n3,udp,0.00,-0.0,0,neptune\n")
    opts = FormatOptions(column_names=("dur", "proto", "rate", "other", "n", "label"), round_digits=2)
    omitted = FormatOptions(**{**opts.__dict__, "omit_zeros": True})
    assert [t for t, _ in read([p], "csv", options=opts)] == [
        "dur:0 proto:tcp rate:0 other:0.5 n:12 label:normal",
        "dur:3 proto:udp rate:0 other:-0 n:0 label:neptune",
    ]
    # 0.001 rounds to 0 and goes; a text value, and a one-column record, are never left out
    assert [t for t, _ in read([p], "csv", options=omitted)] == [
        "proto:tcp other:0.5 n:12 label:normal",
        "dur:3 proto:udp label:neptune",
    ]
    one = FormatOptions(column_names=opts.column_names, columns=("n",), omit_zeros=True)
    assert [t for t, _ in read([p], "csv", options=one)] == ["12", "0"]


def test_read_tsv(tmp_path):
    p = write(tmp_path / "t.tsv", b"name\tvalue\tnote\na b\t0.555\tx, y\nc\t10\tz\n")
    assert read([p], "tsv") == [
        ("name:a b value:0.555 note:x, y", f"{p}:2"),
        ("name:c value:10 note:z", f"{p}:3"),
    ]
    opts = FormatOptions(columns=("value",), round_digits=1)
    assert [t for t, _ in read([p], "tsv", options=opts)] == ["0.6", "10"]  # one column: the value alone


def test_read_tsv_empty_edge_fields(tmp_path):
    p = write(tmp_path / "t.tsv", b"a\tb\tc\n1\t2\t\n\t5\t6\n")
    assert read([p], "tsv") == [("a:1 b:2 c:", f"{p}:2"), ("a: b:5 c:6", f"{p}:3")]


def test_read_parquet(tmp_path):
    p = write_parquet(
        tmp_path / "t.parquet",
        ["first", "", "second doc", "   ", "third", "4th", "5th"],
        other=pa.array(range(7)),
    )
    assert pq.ParquetFile(p).num_row_groups == 3
    skipped = Counter()
    assert read([p], "parquet", on_error="skip", skipped=skipped) == [
        ("first", f"{p}:1"),
        ("second doc", f"{p}:3"),
        ("third", f"{p}:5"),
        ("4th", f"{p}:6"),
        ("5th", f"{p}:7"),
    ]
    assert skipped == {"empty field 'text'": 2}
    q = str(tmp_path / "body.parquet")
    pq.write_table(pa.table({"body": ["x", "y"], "text": ["no", "no"]}), q)
    assert read([q], "parquet", text_field="body") == [("x", f"{q}:1"), ("y", f"{q}:2")]


def test_documents_are_document_objects(tmp_path):
    p = write(tmp_path / "a.txt", b"x\n")
    assert list(read_documents([p], "lines")) == [Document("x", f"{p}:1")]


def test_read_limit(tmp_path):
    p = write(tmp_path / "a.txt", "".join(f"line {i}\n" for i in range(10)).encode())
    q = write(tmp_path / "b.txt", b"other\n")
    assert [t for t, _ in read([p, q], "lines", limit=3)] == ["line 0", "line 1", "line 2"]
    assert len(read([p, q], "lines", limit=11)) == 11


# ---------------------------------------------------------------- sources: folders, globs, URLs, compression


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "b.txt", b"b1\nb2\n")
    write(root / "a.txt", b"a1\n")
    write(root / "sub" / "c.txt.gz", b"c1\n")
    write(root / "sub" / "d.txt.bz2", b"d1\n")
    write(root / "sub" / "e.txt.zst", b"e1\n\ne3\n")
    write(root / ".hidden.txt", b"hidden\n")
    write(root / ".git" / "x.txt", b"git\n")
    return root


def test_folder_source_is_searched_recursively_in_sorted_order(folder):
    files = expand([str(folder)])
    names = ["a.txt", "b.txt", "sub/c.txt.gz", "sub/d.txt.bz2", "sub/e.txt.zst"]
    assert files == [str(folder / n) for n in names]
    got = read([str(folder)], "lines")
    assert got == [
        ("a1", f"{folder}/a.txt:1"),
        ("b1", f"{folder}/b.txt:1"),
        ("b2", f"{folder}/b.txt:2"),
        ("c1", f"{folder}/sub/c.txt.gz:1"),
        ("d1", f"{folder}/sub/d.txt.bz2:1"),
        ("e1", f"{folder}/sub/e.txt.zst:1"),
        ("e3", f"{folder}/sub/e.txt.zst:3"),
    ]


def test_glob_source_and_source_order(folder):
    assert expand([str(folder / "?.txt")]) == [str(folder / "a.txt"), str(folder / "b.txt")]
    assert read([str(folder / "sub" / "*.txt.*"), str(folder / "a.txt")], "lines") == [
        ("c1", f"{folder}/sub/c.txt.gz:1"),
        ("d1", f"{folder}/sub/d.txt.bz2:1"),
        ("e1", f"{folder}/sub/e.txt.zst:1"),
        ("e3", f"{folder}/sub/e.txt.zst:3"),
        ("a1", f"{folder}/a.txt:1"),
    ]


def test_glob_skips_hidden_files_like_folders_do(folder):
    assert expand([str(folder / "*.txt")]) == [str(folder / "a.txt"), str(folder / "b.txt")]


def test_missing_source_raises(folder):
    with pytest.raises(BadInput, match="matches no file"):
        expand([str(folder / "nothing.txt")])
    with pytest.raises(BadInput, match="matches no file"):
        list(read_documents([str(folder / "*.jsonl")], "jsonl"))


def test_folder_inside_a_dot_directory(tmp_path):
    write(tmp_path / ".cache" / "corpus" / "a.txt", b"a1\n")
    assert read([str(tmp_path / ".cache" / "corpus")], "lines") == [
        ("a1", f"{tmp_path}/.cache/corpus/a.txt:1")
    ]


@pytest.fixture
def memory_root():
    root = f"memory://dapt-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_source(memory_root):
    with fsspec.open(f"{memory_root}/y.txt", "w") as f:
        f.write("one\n\ntwo\n")
    with fsspec.open(f"{memory_root}/sub/z.jsonl", "w") as f:
        f.write('{"text": "three"}\n')
    direct = f"{memory_root}/y.txt"
    assert read([direct], "lines") == [("one", f"{direct}:1"), ("two", f"{direct}:3")]
    files = expand([memory_root])
    assert len(files) == 2 and all(f.startswith("memory://") for f in files)
    assert files[0].endswith("/sub/z.jsonl") and files[1].endswith("/y.txt")  # sorted paths
    assert read([memory_root], "lines") == [
        ('{"text": "three"}', f"{files[0]}:1"),
        ("one", f"{files[1]}:1"),
        ("two", f"{files[1]}:3"),
    ]
    assert read([f"{memory_root}/sub/*.jsonl"], "jsonl") == [("three", f"{files[0]}:1")]


# ---------------------------------------------------------------- http on the real CSIC 2010 files

CSIC = {
    "normalTrafficTraining.txt.gz": 36000,
    "normalTrafficTest.txt.gz": 28800,
    "anomalousTrafficTest.txt.gz": 20052,
}


@pytest.fixture(scope="module")
def csic() -> dict[str, list[Document]]:
    folder = SHARED / "csic2010"
    if not all((folder / name).exists() for name in CSIC):
        pytest.skip(f"the CSIC 2010 files are not in {folder} (shared data absent)")
    return {name: list(read_documents([str(folder / name)], "http")) for name in CSIC}


def test_csic_request_counts_and_ids(csic):
    for name, count in CSIC.items():
        docs = csic[name]
        assert len(docs) == count, name
        lines = [int(d.id.rsplit(":", 1)[1]) for d in docs]
        assert lines[0] == 1 and lines == sorted(set(lines)), name
    methods = Counter(d.text.split(" ", 1)[0] for d in csic["normalTrafficTraining.txt.gz"])
    assert methods == Counter({"GET": 28000, "POST": 8000})


def test_csic_texts_are_clean_requests(csic):
    for name, docs in csic.items():
        assert not any("\r" in d.text for d in docs), name
        assert all(d.text.startswith(("GET http", "POST http", "PUT http")) for d in docs), name
        assert all(d.text == d.text.strip() for d in docs), name
        for d in docs:
            if d.text.startswith(("POST", "PUT")):
                lines = d.text.split("\n")
                length = int(next(x for x in lines if x.startswith("Content-Length:")).split(":")[1])
                assert lines[-2] == "" and len(lines[-1]) == length > 0, d.id  # the body line is kept whole
            else:
                assert d.text.split("\n")[-1].startswith("Connection:"), d.id
    puts = [d for docs in csic.values() for d in docs if d.text.startswith("PUT")]
    assert puts and all(
        d.id.startswith(str(SHARED / "csic2010" / "anomalousTrafficTest.txt.gz")) for d in puts
    )
    assert all("Host: localhost:9090" in d.text for d in puts)


def test_http_mixed_line_endings(tmp_path):
    rng = np.random.default_rng(0)
    requests = []
    for i in range(40):
        lines = [
            f"{'POST' if i % 3 == 0 else 'GET'} http://localhost:8080/p{i} HTTP/1.1",
            f"Host: h{i}",
            f"Cookie: id={i}",
        ]
        if i % 3 == 0:
            lines += ["Content-Length: 3", "", f"a={i % 10}"]
        requests.append(lines)
    crlf = b""
    for lines in requests:
        for line in lines + [""] * int(rng.integers(0, 3)):
            crlf += line.encode() + (b"\r\n" if rng.random() < 0.5 else b"\n")
    p = write(tmp_path / "mixed.txt", crlf)
    assert b"\r\n" in crlf and b"\n\n" in crlf
    got = read([p], "http")
    assert [t for t, _ in got] == ["\n".join(lines) for lines in requests]
    assert not any("\r" in t for t, _ in got)


# ---------------------------------------------------------------- the NSL-KDD csv files (no header)


def test_nsl_kdd_csv_without_header():
    folder = SHARED / "nsl_kdd"
    if not (folder / "KDDTest+.txt.gz").exists() or not (folder / "Field_Names.csv.gz").exists():
        pytest.skip(f"the NSL-KDD files are not in {folder} (shared data absent)")
    fields = read_documents(
        [str(folder / "Field_Names.csv.gz")],
        "csv",
        options=FormatOptions(column_names=("name", "kind"), columns=("name",)),
    )
    names = tuple(d.text.removeprefix("name:") for d in fields)
    assert len(names) == 41 and names[:4] == ("duration", "protocol_type", "service", "flag")
    opts = FormatOptions(column_names=names + ("label", "difficulty"), round_digits=1)
    docs = list(read_documents([str(folder / "KDDTest+.txt.gz")], "csv", options=opts))
    assert len(docs) == 18037
    assert all(len(d.text.split(" ")) == 43 for d in docs)
    assert all(d.text.startswith("duration:") for d in docs)
    labels = Counter(d.text.split(" label:")[1].split(" ")[0] for d in docs)
    assert labels["normal"] > 5000 and "neptune" in labels
    rates = [
        float(tok.split(":")[1])
        for d in docs[:200]
        for tok in d.text.split(" ")
        if tok.startswith("same_srv_rate:")
    ]
    assert len(rates) == 200 and all(round(r, 1) == r for r in rates)


# ---------------------------------------------------------------- read_documents: bad records

BAD_CASES = [  # (format, file bytes, options, bad line, words the message must contain)
    ("lines", b"good\nbad \xff\xfe byte\ngood too\n", None, 2, ["invalid UTF-8"]),
    ("docs", b"good\n\nbad \xff byte\n\ngood too\n", None, 3, ["invalid UTF-8"]),
    ("http", b"GET /a HTTP/1.1\nHost: a\n\nGET /b HTTP/1.1\nHost: \xff\n", None, 5, ["invalid UTF-8"]),
    (
        "http",
        b"\n\nstray text\nGET /a HTTP/1.1\nHost: a\n",
        None,
        3,
        ["text before the first HTTP request line"],
    ),
    ("jsonl", b'{"text": "good"}\n{"text": "bad \xc3\x28"}\n', None, 2, ["invalid UTF-8"]),
    ("jsonl", b'{"text": "good"}\n\n{"text": "unterminated\n', None, 3, ["malformed JSON"]),
    ("jsonl", b'{"text": "good"}\n{"body": "no text"}\n', None, 2, ["missing field", "'text'"]),
    ("jsonl", b'{"text": "good"}\n["a", "list"]\n', None, 2, ["missing field", "'text'"]),
    ("jsonl", b'{"text": "good"}\n{"text": 5}\n', None, 2, ["'text'", "not text", "int"]),
    ("jsonl", b'{"text": "good"}\n{"text": null}\n', None, 2, ["'text'", "not text"]),
    ("jsonl", b'{"body": 1}\n', FormatOptions(text_field="body"), 1, ["'body'", "not text"]),
    ("csv", b"a,b\n1,2\n3,4,5\n", None, 3, ["wrong number of fields", "3", "header has 2"]),
    ("csv", b"a,b\n1,2\n\xff,4\n", None, 3, ["invalid UTF-8"]),
    ("csv", b"1,2\n3\n", FormatOptions(column_names=("a", "b")), 2, ["wrong number of fields"]),
    ("csv", b"a,b\n1,2\n", FormatOptions(columns=("a", "nope")), 1, ["missing column", "nope"]),
    ("tsv", b"a\tb\n1\t2\n3\n", None, 3, ["wrong number of fields"]),
]


@pytest.mark.parametrize(("fmt", "data", "opts", "line", "words"), BAD_CASES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_bad_record_raises_with_file_and_line(tmp_path, fmt, data, opts, line, words, suffix):
    p = write(tmp_path / f"bad.{fmt}{suffix}", data)
    with pytest.raises(BadRecord) as info:
        list(read_documents([p], fmt, on_error="raise", options=opts))
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line) == (p, line)
    assert str(err).startswith(f"{p}:{line}: ")
    for word in words:
        assert word in str(err)


def test_bad_parquet_records(tmp_path):
    p = write_parquet(tmp_path / "t.parquet", ["good", None, "also good"])
    with pytest.raises(BadRecord, match=r"t\.parquet:2: field 'text' is not text") as info:
        list(read_documents([p], "parquet"))
    assert (info.value.path, info.value.line) == (p, 2)
    skipped: Counter = Counter()
    assert read([p], "parquet", on_error="skip", skipped=skipped) == [
        ("good", f"{p}:1"),
        ("also good", f"{p}:3"),
    ]
    assert skipped == Counter({"field 'text' is not text": 1})
    with pytest.raises(BadRecord, match="missing column 'body'"):
        list(read_documents([p], "parquet", text_field="body"))


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_skip_jsonl_keeps_good_records_and_counts_reasons(tmp_path, suffix):
    lines = [
        b'{"text": "g1"}',  # 1
        b'{"text": "g2"',  # 2 malformed
        b'{"text": "g3"}',  # 3
        b'{"body": "x"}',  # 4 missing field
        b'{"text": ["x"]}',  # 5 not text
        b'{"text": "bad \xff"}',  # 6 invalid UTF-8
        b"",  # 7
        b'{"text": "g8"}',  # 8
        b"not json at all",  # 9 malformed
        b'{"text": "g10"}',
    ]  # 10
    p = write(tmp_path / f"mixed.jsonl{suffix}", b"\n".join(lines) + b"\n")
    q = write(tmp_path / "clean.jsonl", b'{"text": "other file"}\n')
    skipped: Counter = Counter()
    got = read([p, q], "jsonl", on_error="skip", skipped=skipped)
    assert got == [
        ("g1", f"{p}:1"),
        ("g3", f"{p}:3"),
        ("g8", f"{p}:8"),
        ("g10", f"{p}:10"),
        ("other file", f"{q}:1"),
    ]
    assert skipped == Counter(
        {"malformed JSON": 2, "missing field 'text'": 1, "field 'text' is not text": 1, "invalid UTF-8": 1}
    )


def test_skip_lines_keeps_good_records_and_counts_reasons(tmp_path):
    p = write(tmp_path / "l.txt", b"one\n\xff\ntwo\nbad \xc3\x28\n\nthree\n\xe2\x82\n")
    skipped: Counter = Counter()
    assert read([p], "lines", on_error="skip", skipped=skipped) == [
        ("one", f"{p}:1"),
        ("two", f"{p}:3"),
        ("three", f"{p}:6"),
    ]
    assert skipped == Counter({"invalid UTF-8": 3})


def test_skip_docs_drops_only_the_bad_document(tmp_path):
    p = write(
        tmp_path / "d.txt", b"one a\n\ntwo a\ntwo \xff b\ntwo c\n\n\xff\n\nthree a\nthree b\n\nfour \xfe\n"
    )
    skipped: Counter = Counter()
    got = read([p], "docs", on_error="skip", skipped=skipped)
    assert got == [("one a", f"{p}:1"), ("three a\nthree b", f"{p}:9")]
    assert skipped == Counter({"invalid UTF-8": 3})


def test_skip_http(tmp_path):
    data = (
        b"stray\nmore stray\n"
        b"GET /a HTTP/1.1\nHost: a\n\n"
        b"GET /b HTTP/1.1\nHost: \xff\nCookie: b\n\n"
        b"POST /c HTTP/1.1\nHost: c\n\nbody=\xfe\n\n"
        b"GET /d HTTP/1.1\nHost: d\n"
    )
    p = write(tmp_path / "h.txt", data)
    skipped: Counter = Counter()
    got = read([p], "http", on_error="skip", skipped=skipped)
    assert got == [("GET /a HTTP/1.1\nHost: a", f"{p}:3"), ("GET /d HTTP/1.1\nHost: d", f"{p}:15")]
    assert skipped == Counter({"invalid UTF-8": 2, "text before the first HTTP request line": 1})


def test_skip_http_bad_request_line_keeps_the_previous_request(tmp_path):
    p = write(
        tmp_path / "h.txt", b"GET /a HTTP/1.1\nHost: a\n\nGET /b\xff HTTP/1.1\nHost: b\n\nGET /c HTTP/1.1\n"
    )
    skipped: Counter = Counter()
    got = read([p], "http", on_error="skip", skipped=skipped)
    assert got == [("GET /a HTTP/1.1\nHost: a", f"{p}:1"), ("GET /c HTTP/1.1", f"{p}:7")]
    assert skipped == Counter({"invalid UTF-8": 1})


def test_skip_csv(tmp_path):
    p = write(tmp_path / "a.csv", b"a,b\n1,2\n3,4,5\n\xff,6\n7,8\n9\n")
    q = write(
        tmp_path / "b.csv", b"x,y\n1,2\n"
    )  # lacks the selected column: the whole file is one bad record
    r = write(tmp_path / "c.csv", b"b,a\n10,20\n")
    skipped: Counter = Counter()
    got = read([p, q, r], "csv", on_error="skip", skipped=skipped, options=FormatOptions(columns=("a",)))
    # one column: the value alone; "9" lacks only the unused trailing field b, so it is kept
    assert got == [("1", f"{p}:2"), ("7", f"{p}:5"), ("9", f"{p}:6"), ("20", f"{r}:2")]
    assert skipped == Counter({"wrong number of fields": 1, "invalid UTF-8": 1, "missing column(s) a": 1})


# ---------------------------------------------------------------- resume positions


def norm(item) -> tuple:
    if isinstance(item, BadRecord):
        return ("bad", item.path, item.line, item.reason)
    return ("doc", item.text, item.id, item.label)


RESUME_FILES = {  # format -> (file name, bytes, options)
    "lines": ("a.txt", b"one\r\n\r\ntwo\n\xff bad\nthree\n  \nfour", None),
    "docs": ("d.txt", b"\n\na1\na2\n\n\nb1\n\xffb2\n\nc1\r\n\r\nd1\n\n\n", None),
    "http": (
        "h.txt",
        b"junk\nGET /a HTTP/1.1\r\nH: 1\r\n\r\n\nPOST /b HTTP/1.1\nH: 2\n\nbody=1\n\n"
        b"GET /c HTTP/1.1\nH: \xff\n\nPUT /d HTTP/1.1\r\n\r\nx=1",
        None,
    ),
    "jsonl": (
        "j.jsonl",
        b'{"text": "a"}\n\n{"text": 1}\n{"text": "b"}\nnope\n{"text": "c"}\n{"text": " "}\n',
        None,
    ),
    "csv": ("c.csv", b'h1,h2\n1,"x, y"\n\n2,3,4\n5,6\n\xff,7\n8,9', FormatOptions(round_digits=0)),
    "csv-names": ("n.csv", b"1,2\n3\n\n5,6\n7,8\n", FormatOptions(column_names=("p", "q"))),
    "tsv": ("t.tsv", b"h1\th2\n1\t2\n3\n4\t5\n6\t7", None),
}


def check_resume(url: str, fmt: str, opts: FormatOptions) -> int:
    full = [(norm(item), pos) for item, pos in READERS[fmt](url, Position(), opts)]
    for k, (_, pos) in enumerate(full):
        rest = [(norm(item), p) for item, p in READERS[fmt](url, pos, opts)]
        assert rest == full[k + 1 :], (fmt, k, pos)
    return len(full)


@pytest.mark.parametrize("fmt", sorted(RESUME_FILES))
@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2"])
def test_resume_from_every_position(tmp_path, fmt, suffix):
    name, data, opts = RESUME_FILES[fmt]
    url = write(tmp_path / f"{name}{suffix}", data)
    n = check_resume(url, fmt.split("-")[0], opts or FormatOptions())
    assert n >= 4
    assert any(
        kind == "bad"
        for kind, *_ in (
            norm(i) for i, _ in READERS[fmt.split("-")[0]](url, Position(), opts or FormatOptions())
        )
    )


def test_resume_parquet(tmp_path):
    url = write_parquet(
        tmp_path / "t.parquet", ["a", None, "b", "", "c", "d", "e", None, "f", "g"], row_group_size=3
    )
    assert check_resume(url, "parquet", FormatOptions()) == 10  # nulls and empty texts are (bad) records too


def test_resume_zstd(tmp_path):
    url = write(tmp_path / "a.txt.zst", b"one\ntwo\nthree\n")
    assert check_resume(url, "lines", FormatOptions()) == 3


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


# ---------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def token_docs(tokenizer) -> tuple[list[list[int]], list[str]]:
    texts = generate(200, seed=2) + ["short", "a b c"]
    return tokenize(tokenizer, texts), [f"corpus.txt:{i + 1}" for i in range(len(texts))]


def test_wrappers(tokenizer):
    assert wrappers(tokenizer) == ([tokenizer.cls_token_id], [tokenizer.sep_token_id])


@pytest.mark.parametrize("max_len", [16, 64])
def test_pack_concat(tokenizer, token_docs, max_len):
    ids, doc_ids = token_docs
    head, tail = wrappers(tokenizer)
    rows = pack_concat(ids, doc_ids, max_len, head, tail)
    body = max_len - 2
    assert len(rows) > 10
    assert all(len(r.ids) == max_len for r in rows[:-1]) and 2 < len(rows[-1].ids) <= max_len
    assert all(r.ids[0] == head[0] and r.ids[-1] == tail[0] and r.ids.dtype == np.int64 for r in rows)
    assert all(r.lengths == (len(r.ids),) for r in rows)
    stream = [t for x in ids for t in x + tail]
    assert [t for r in rows for t in r.ids[1:-1].tolist()] == stream  # nothing lost, nothing added
    # each document is listed once, in the row where its first token lands
    offset = 0
    for doc, x in zip(doc_ids, ids, strict=True):
        assert doc in rows[offset // body].doc_ids
        offset += len(x) + 1
    listed = [d for r in rows for d in r.doc_ids]
    assert listed == doc_ids


def test_pack_concat_small_inputs():
    assert pack_concat([], [], 8, [1], [2]) == []
    rows = pack_concat([[5, 6]], ["x:1"], 8, [1], [2])
    assert len(rows) == 1 and rows[0].ids.tolist() == [1, 5, 6, 2, 2] and rows[0].doc_ids == ("x:1",)
    rows = pack_concat([[5, 6, 7], [8]], ["x:1", "x:2"], 3, [], [])  # no wrapper tokens
    assert [r.ids.tolist() for r in rows] == [[5, 6, 7], [8]]
    assert [r.doc_ids for r in rows] == [("x:1",), ("x:2",)]


def test_pack_pad(tokenizer, token_docs):
    ids, doc_ids = token_docs
    head, tail = wrappers(tokenizer)
    max_len = 40
    rows = pack_pad(ids, doc_ids, max_len, head, tail)
    assert [r.doc_ids for r in rows] == [(d,) for d in doc_ids]
    truncated = 0
    for x, r in zip(ids, rows, strict=True):
        truncated += len(x) > max_len - 2
        assert r.ids.tolist() == head + x[: max_len - 2] + tail
        assert r.lengths == (len(r.ids),) and len(r.ids) <= max_len
    assert 0 < truncated < len(ids)  # both cases occur


def first_fit_rows(lengths: list[int], max_len: int) -> int:
    bins: list[int] = []
    for n in lengths:
        for i, used in enumerate(bins):
            if used + n <= max_len:
                bins[i] += n
                break
        else:
            bins.append(n)
    return len(bins)


def check_packed(rows, ids, doc_ids, max_len, head, tail):
    body = max_len - len(head) - len(tail)
    expected = {d: head + x[:body] + tail for x, d in zip(ids, doc_ids)}
    seen = [d for r in rows for d in r.doc_ids]
    assert sorted(seen) == sorted(doc_ids)  # every document exactly once
    for r in rows:
        assert len(r.doc_ids) == len(r.lengths) and sum(r.lengths) == len(r.ids) <= max_len
        starts = np.cumsum((0,) + r.lengths[:-1])
        for d, start, n in zip(r.doc_ids, starts, r.lengths):
            assert r.ids[start : start + n].tolist() == expected[d]


def test_pack_packed_real_documents(tokenizer, token_docs):
    ids, doc_ids = token_docs
    head, tail = wrappers(tokenizer)
    max_len = 128
    rows = pack_packed(ids, doc_ids, max_len, head, tail)
    check_packed(rows, ids, doc_ids, max_len, head, tail)
    assert any(len(r.doc_ids) > 1 for r in rows)
    assert len(rows) <= first_fit_rows([min(len(x), max_len - 2) + 2 for x in ids], max_len)


@pytest.mark.parametrize("lengths", ["uniform", "lognormal", "short"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_packed_efficiency(lengths, seed):
    rng = np.random.default_rng(seed)
    max_len, n = 128, 400
    if lengths == "uniform":
        sizes = rng.integers(1, max_len + 20, n)
    elif lengths == "lognormal":
        sizes = np.clip(rng.lognormal(3.3, 0.8, n).astype(int), 1, 300)
    else:
        sizes = rng.integers(1, 40, n)
    ids = [rng.integers(10, 1000, int(s)).tolist() for s in sizes]
    doc_ids = [f"d:{i}" for i in range(n)]
    rows = pack_packed(ids, doc_ids, max_len, [1], [2])
    check_packed(rows, ids, doc_ids, max_len, [1], [2])
    segments = [min(len(x), max_len - 2) + 2 for x in ids]
    total = sum(segments)
    assert sum(len(r.ids) for r in rows) == total
    efficiency = total / (len(rows) * max_len)
    assert efficiency >= total / (first_fit_rows(segments, max_len) * max_len)
    if (
        lengths != "uniform"
    ):  # (uniform sizes up to max_len cannot reach the bound: big items need rows of their own)
        assert efficiency >= total / (math.ceil(total / max_len) * max_len) - 0.02


def test_pack_packed_small_inputs():
    assert pack_packed([], [], 8, [1], [2]) == []
    rows = pack_packed([[5] * 6, [6], [7] * 20], ["a", "b", "c"], 8, [1], [2])
    check_packed(rows, [[5] * 6, [6], [7] * 20], ["a", "b", "c"], 8, [1], [2])
    assert sorted(r.lengths for r in rows) == [(3,), (8,), (8,)]  # c truncated; b fits in no row of 8 tokens


def test_a_100mb_single_line_is_an_oversize_record_not_a_memory_spike(tmp_path):
    """The peak is what Python allocated while reading (tracemalloc), not the process's lifetime peak RSS, which
    earlier tests in this process have already raised past anything one line could add."""
    import tracemalloc

    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        f.write(b"first document\n")
        for _ in range(100):
            f.write(b"x" * (1 << 20))  # one line of 100 MiB
        f.write(b"\nlast document\n")
    tracemalloc.start()
    opts = FormatOptions(max_line_bytes=1 << 20)
    with pytest.raises(BadRecord, match=r"huge.txt:2: oversize record \(104857601 bytes"):
        list(read_documents([str(path)], "lines", options=opts))
    skipped = Counter()
    docs = list(read_documents([str(path)], "lines", on_error="skip", skipped=skipped, options=opts))
    assert [d.text for d in docs] == ["first document", "last document"] and docs[1].id.endswith(":3")
    assert skipped == {"oversize record": 1}
    peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert peak_mib < 20, peak_mib  # the 100 MiB line was never held (reading it whole allocates > 100 MiB)


def test_empty_text_fields_are_bad_records_not_silent_drops(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "kept"}\n{"text": "   "}\n{"text": "also kept"}\n')
    with pytest.raises(BadRecord, match="e.jsonl:2: empty field 'text'"):
        list(read_documents([str(path)], "jsonl"))
    skipped = Counter()
    assert [d.text for d in read_documents([str(path)], "jsonl", on_error="skip", skipped=skipped)] == [
        "kept",
        "also kept",
    ]
    assert skipped == {"empty field 'text'": 1}


def test_one_selected_column_is_the_raw_text(tmp_path):
    p = write(tmp_path / "benign.csv", b"domain,\ngoogle.com,\nmail.example.org,\n")  # the DGA files' layout
    assert read([p], "csv", options=FormatOptions(columns=("domain",))) == [
        ("google.com", f"{p}:2"),
        ("mail.example.org", f"{p}:3"),
    ]


def test_rows_missing_only_unused_trailing_fields_are_padded(tmp_path):
    p = write(tmp_path / "dga.csv", b"domain,\nabc.com,\nxyz.net\n")  # the last row lost its trailing comma
    assert [t for t, _ in read([p], "csv", options=FormatOptions(columns=("domain",)))] == [
        "abc.com",
        "xyz.net",
    ]
    q = write(tmp_path / "two.csv", b"a,b\n1,2\n3\n")
    with pytest.raises(BadRecord, match="wrong number of fields"):  # a used field is missing: still an error
        read([q], "csv")


# ---- json: a document holding a list of records (STIX bundles such as MITRE ATT&CK) ----


def _bundle(tmp_path: Path, objects, name: str = "bundle.json.gz") -> Path:
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        json.dump({"type": "bundle", "objects": objects}, f)
    return path


def test_json_records_are_read_from_the_named_field_with_counted_skips(tmp_path):
    objects = [
        {"type": "attack-pattern", "description": "Adversaries may inject code."},
        {"type": "relationship"},  # no description
        {"type": "malware", "description": "   "},
        {"type": "tool", "description": "A remote access tool.", "sev": "High"},
    ]
    path = _bundle(tmp_path, objects)
    skipped = Counter()
    opts = FormatOptions(text_field="description", records_field="objects")
    docs = list(read_documents([str(path)], "json", on_error="skip", skipped=skipped, options=opts))
    assert [d.text for d in docs] == ["Adversaries may inject code.", "A remote access tool."]
    assert docs[1].id == f"{path}:objects[3]"
    assert skipped == Counter({"missing field 'description'": 1, "empty field 'description'": 1})
    with pytest.raises(BadRecord, match=r"bundle.json.gz:objects\[1\]: missing field 'description'"):
        list(read_documents([str(path)], "json", options=opts))
    labelled = [
        d
        for d, _ in READERS["json"](
            str(path),
            Position(),
            FormatOptions(text_field="description", records_field="objects", label_field="sev"),
        )
        if isinstance(d, Document)
    ]
    assert [(d.text, d.label) for d in labelled] == [("A remote access tool.", "High")]


def test_json_positions_resume_at_the_next_record(tmp_path):
    path = _bundle(tmp_path, [{"description": f"text {i}"} for i in range(5)])
    opts = FormatOptions(text_field="description", records_field="objects")
    items = list(READERS["json"](str(path), Position(), opts))
    resumed = list(READERS["json"](str(path), items[1][1], opts))
    assert [d.text for d, _ in resumed] == ["text 2", "text 3", "text 4"]


def test_json_that_is_not_a_list_of_records_is_one_clear_bad_record(tmp_path):
    good = _bundle(tmp_path, [{"description": "x"}])
    broken = tmp_path / "broken.json"
    broken.write_text('{"objects": [{"description": "x"}')
    opts = FormatOptions(text_field="description", records_field="objects")
    for path, message in ((broken, "malformed JSON"), (good, "no list of records at the document")):
        options = opts if path == broken else FormatOptions(text_field="description")
        items = [item for item, _ in READERS["json"](str(path), Position(), options)]
        assert len(items) == 1 and isinstance(items[0], BadRecord) and message in str(items[0])
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"objects": [{"description": "y" * 2000}]}))
    items = [
        item
        for item, _ in READERS["json"](
            str(big),
            Position(),
            FormatOptions(text_field="description", records_field="objects", max_line_bytes=1000),
        )
    ]
    assert len(items) == 1 and "oversize" in str(items[0]) and "data.max_record_bytes" in str(items[0])


def test_lone_carriage_returns_end_lines_and_resume_inside_them(tmp_path):
    """A file saved with classic Mac line endings (a lone \\r) is lines, not one line; \\r\\n stays one line end; a
    position taken after any of them resumes at the next line."""
    from dapt.data.formats import FormatOptions, read_lines
    from dapt.data.sources import Position

    path = tmp_path / "cr.txt"
    path.write_bytes(b"first\rsecond\r\nthird\rfourth")
    items = list(read_lines(str(path), Position(), FormatOptions()))
    assert [doc.text for doc, _ in items] == ["first", "second", "third", "fourth"]
    assert [doc.id.rsplit(":", 1)[1] for doc, _ in items] == ["1", "2", "3", "4"]
    after_second = items[1][1]
    rest = list(read_lines(str(path), after_second, FormatOptions()))
    assert [doc.text for doc, _ in rest] == ["third", "fourth"] and rest[0][0].id.endswith(":3")


@pytest.mark.parametrize(
    "name, content, fmt",
    [
        ("one_document.txt", "\n".join(f"line {i} of one long document" for i in range(400)), "docs"),
        ("no_newline.txt", "the attacker used a crafted request " * 20000, "lines"),
        ("carriage_returns.txt", "\r".join(f"GET /index.php?id={i} HTTP/1.1" for i in range(200)), "lines"),
    ],
)
def test_a_corpus_of_one_document_or_of_lone_carriage_returns_trains(name, content, fmt, tmp_path):
    """One record cannot fill data.streams (8): the corpus gets the streams it can fill (one), found from the data,
    instead of an empty stream stopping the run after the engine started; a \\r file is its lines."""
    from conftest import run_inprocess

    path = tmp_path / name
    path.write_bytes(content.encode())
    model = '{"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}'
    summary = run_inprocess(
        [
            "--data.train",
            path,
            f"--data.format={fmt}",
            "--model.config",
            model,
            "--model.tokenizer_vocab_size=200",
        ]
        + [
            "--data.max_seq_length=32",
            "--train.max_steps=3",
            "--train.micro_batch_size=4",
            "--output_dir",
            tmp_path / "run",
        ]
        + ["--log.progress=false", "--data.valid_fraction=0"]
    )
    assert summary["steps"] == 3 and summary["tokens_seen"] > 0
    resolved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    expected_streams = 8 if name == "carriage_returns.txt" else 1
    assert f"streams: {expected_streams}\n" in resolved
