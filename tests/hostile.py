"""Hostile input files for tests/test_hostile.py: each case writes files under a folder and says how dapt must
answer them (strict: a clear error naming the file; lenient: a counted skip, or a clear error when nothing of the
file can be read at all)."""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

GOOD = "GET /index.html HTTP/1.1 host example.org accept text/html user agent curl"


@dataclass
class Case:
    name: str
    fmt: str
    write: object  # (folder: Path) -> Path: the source given to data.train (a file or a folder)
    lenient: str = (
        "counted"  # with data.on_error=skip: counted (a counted skip) | error (a clear error) | clean
    )
    args: list[str] = field(default_factory=list)
    names_line: bool = True  # a strict error names file:line (not for whole-file problems)
    warns: str = ""  # clean cases: what the log must say (nothing is dropped without a word)
    docs: tuple[int, ...] | None = (
        None  # clean cases: the lines (records) of the file that are trained, exactly
    )


def _file(name: str, data: bytes | str):
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    return write


def _good_lines(n: int = 40) -> str:
    return "".join(f"{GOOD} {i}\n" for i in range(n))


def _jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _good_json(n: int = 30) -> list:
    return [{"text": f"{GOOD} {i}", "label": "a" if i % 2 else "b"} for i in range(n)]


def _symlink_loop(folder: Path) -> Path:
    data = folder / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "part.txt").write_text(_good_lines())
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)  # data/sub/loop -> data: a cycle
    (data / "a").symlink_to(data / "b")
    (data / "b").symlink_to(data / "a")  # a -> b -> a: a file link cycle
    return data


def _dangling(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    (data / "ok.txt").write_text(_good_lines())
    (data / "gone.txt").symlink_to(folder / "nowhere.txt")
    return data


def _fifo(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir()
    (data / "ok.txt").write_text(_good_lines())
    os.mkfifo(data / "pipe.txt")  # opening it would block forever
    return data


def _truncated_gzip(folder: Path) -> Path:
    path = folder / "cut.txt.gz"
    path.write_bytes(gzip.compress(_good_lines(400).encode())[:300])
    return path


def _parquet(rows: dict, name: str = "t.parquet"):
    def write(folder: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / name
        pq.write_table(pa.table(rows), path)
        return path

    return write


def _truncated_arrow(folder: Path) -> Path:
    """A `datasets` folder whose one shard was cut short (a copy that did not finish)."""
    import datasets

    saved = folder / "saved"
    datasets.Dataset.from_dict({"text": [f"{GOOD} {i}" for i in range(300)]}).save_to_disk(str(saved))
    shard = saved / "data-00000-of-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return saved


def _truncated_parquet(folder: Path) -> Path:
    full = _parquet({"text": [f"{GOOD} {i}" for i in range(200)]}, "full.parquet")(folder)
    path = folder / "cut.parquet"
    path.write_bytes(full.read_bytes()[:-40])
    full.unlink()
    return path


def _huge_line(folder: Path) -> Path:
    path = folder / "huge.txt"
    with path.open("wb") as f:
        f.write(_good_lines(5).encode())
        chunk = b"A" * (1 << 20)
        for _ in range(100):  # one 100 MB line
            f.write(chunk)
        f.write(b"\n" + _good_lines(5).encode())
    return path


def _binary(folder: Path) -> Path:
    path = folder / "junk.txt"
    path.write_bytes(random.Random(3).randbytes(200_000))
    return path


def cases() -> list[Case]:
    bad_utf8 = _good_lines(3).encode() + b"caf\xe9 \xff\xfe broken\n" + _good_lines(3).encode()
    deep = "[" * 200_000 + "]" * 200_000
    return [
        Case("empty file", "lines", _file("empty.txt", b""), lenient="clean", warns="empty.txt is empty"),
        Case("only blank lines", "lines", _file("blank.txt", "\n\n  \n\t\n"), lenient="clean", docs=()),
        Case("invalid UTF-8", "lines", _file("latin1.txt", bad_utf8)),
        Case("binary junk", "lines", _binary),
        Case("UTF-16 with BOM", "lines", _file("utf16.txt", _good_lines(5).encode("utf-16"))),
        Case(
            "NUL bytes in lines",
            "lines",
            _file("nul.txt", _good_lines(3) + "GET /\x00\x00 x\n" + _good_lines(3)),
            lenient="clean",
            docs=(1, 2, 3, 4, 5, 6, 7),
        ),
        Case("100 MB single line", "lines", _huge_line),
        Case("a .gz that is not gzip", "lines", _file("plain.txt.gz", _good_lines())),
        Case("truncated gzip", "lines", _truncated_gzip),
        Case("a .zst of junk", "lines", _file("junk.txt.zst", b"\x00\x01junk" * 50)),
        Case(
            "symlink loop in a data folder", "lines", _symlink_loop, lenient="clean", warns="a symlink loop"
        ),
        Case(
            "dangling symlink in a data folder",
            "lines",
            _dangling,
            lenient="clean",
            warns="gone.txt (a dangling symlink)",
        ),
        Case(
            "a FIFO in a data folder",
            "lines",
            _fifo,
            lenient="clean",
            warns="pipe.txt (a FIFO, not a regular file)",
        ),
        Case("newline in the file name", "lines", _file("bad\nname.txt", bad_utf8)),
        Case(
            "lone carriage returns",
            "lines",
            _file("cr.txt", _good_lines(5).replace("\n", "\r") + "caf\xe9"),
            lenient="clean",
            docs=(1, 2, 3, 4, 5, 6),
        ),  # a lone CR ends a line (classic Mac line ends): six documents, all of them trained
        Case(
            "malformed JSON",
            "jsonl",
            _file("bad.jsonl", _jsonl(_good_json(5) + ['{"text": "cut', *_good_json(5)])),
        ),
        Case(
            "a JSON array per line",
            "jsonl",
            _file("arr.jsonl", _jsonl(_good_json(5) + [[1, 2]] + _good_json(5))),
        ),
        Case("missing text field", "jsonl", _file("nofield.jsonl", _jsonl(_good_json(5) + [{"body": "x"}]))),
        Case(
            "text is a number",
            "jsonl",
            _file("num.jsonl", _jsonl(_good_json(5) + [{"text": 5}] + _good_json(3))),
        ),
        Case(
            "text is null",
            "jsonl",
            _file("null.jsonl", _jsonl(_good_json(5) + [{"text": None}] + _good_json(3))),
        ),
        Case(
            "deeply nested JSON", "jsonl", _file("deep.jsonl", _jsonl(_good_json(5) + [deep] + _good_json(3)))
        ),
        Case(
            "NaN and huge numbers",
            "jsonl",
            _file("nan.jsonl", _jsonl(_good_json(5) + ['{"text": NaN}', '{"text": 1e999}'])),
        ),
        Case(
            "JSON with a BOM",
            "jsonl",
            _file("bom.jsonl", "\ufeff" + _jsonl(_good_json(5))),
            lenient="clean",
            docs=(1, 2, 3, 4, 5),
        ),
        Case("unbalanced CSV quote", "csv", _file("quote.csv", 'a,b\n1,2\n"3,4\n' + "5,6\n" * 20)),
        Case("CSV rows of the wrong width", "csv", _file("width.csv", "a,b\n1,2\n1,2,3,4\n1\n5,6\n")),
        Case("CSV header only", "csv", _file("header.csv", "a,b\n"), lenient="clean", docs=()),
        Case(
            "NUL byte in CSV",
            "csv",
            _file("nul.csv", "a,b\n1,2\n3,\x004\n5,6\n"),
            lenient="clean",
            docs=(2, 3, 4),
        ),
        Case(
            "CSV header of other names",
            "csv",
            _file("cols.csv", "x,y\n1,2\n3,4\n"),
            args=["--data.columns=[a, b]"],
        ),
        Case(
            "TSV read as CSV", "csv", _file("tabs.csv", "a\tb\n1\t2\n3\t4\n"), args=["--data.columns=[a, b]"]
        ),
        Case("not a parquet file", "parquet", _file("fake.parquet", _good_lines()), names_line=False),
        Case("parquet without the text column", "parquet", _parquet({"body": ["x", "y"]}), names_line=False),
        Case("parquet with null texts", "parquet", _parquet({"text": [f"{GOOD} 1", None, f"{GOOD} 2"]})),
        Case("truncated parquet", "parquet", _truncated_parquet, names_line=False),
        Case("not an Arrow file", "arrow", _file("fake.arrow", _good_lines()), names_line=False),
        Case("truncated Arrow shard", "arrow", _truncated_arrow, names_line=False),
        Case(
            "a CSV field over the csv module's limit",
            "csv",
            _file("wide.csv", "a,b\n1,2\n3," + "x" * 300_000 + "\n5,6\n"),
            lenient="clean",
            docs=(2, 3, 4),
        ),
        Case("a bare CR inside a CSV row", "csv", _file("cr.csv", "a,b\n1,2\n3,4\r5\n6,7\n")),
        Case(
            "documents that tokenize to nothing",
            "lines",
            _file("blank.txt", "\u200b\u200b\n\x01\x02\n\ufeff\n" + _good_lines(2)),
            lenient="clean",
            docs=(1, 2, 3, 4, 5),
        ),
        Case(
            "one 1 MB word",
            "lines",
            _file("word.txt", _good_lines(2) + "A" * (1 << 20) + "\n"),
            lenient="clean",
            docs=(1, 2, 3),
        ),
        Case(
            "HTTP without a request line",
            "http",
            _file("junk.http", "hello there\nfoo: bar\n\n" + GOOD + "\n"),
        ),
        Case(
            "HTTP header without a colon",
            "http",
            _file("hdr.http", "GET / HTTP/1.1\nHost example\n\n"),
            lenient="clean",
            docs=(1,),
        ),
    ]
