"""Record formats: lines, docs, http, jsonl, json, csv, tsv, parquet, arrow (`datasets` save_to_disk folders).

Each reader yields (Document or BadRecord, position of the next record). Yielding bad records instead of raising
lets `data.on_error=skip` count them and go on in the same pass; the caller decides.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from dapt.config.schema import BadInput
from dapt.data.sources import COMPRESSED, Oversize, Position, lines_from, open_binary
from dapt.data.volatile import normaliser

# Matched on raw bytes, so a request line that is not valid UTF-8 still starts a (bad) record of its own.
HTTP_REQUEST = re.compile(rb"^(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|TRACE|CONNECT) \S+ HTTP/\d")


class BadRecord(BadInput):
    """A record that cannot be read; the message names file, line and field."""

    def __init__(self, path: str, line: int | None = None, reason: str = "bad record", detail: str = ""):
        self.path, self.line, self.reason = path, line, reason
        # One argument: an already formatted message (how DataLoader workers re-raise exceptions).
        if line is None and reason == "bad record" and not detail:
            super().__init__(path)
        else:
            super().__init__(f"{path}{'' if line is None else f':{line}'}: {reason}{detail}")


@dataclass(frozen=True)
class Document:
    text: str
    id: str  # file:line of the record's first line
    label: str | None = None


@dataclass(frozen=True)
class FormatOptions:
    text_field: str = "text"
    columns: tuple[str, ...] = ()  # csv/tsv: columns serialised as key:value (default: all)
    column_names: tuple[str, ...] = ()  # csv/tsv without a header line
    round_digits: int | None = None  # csv/tsv: round float values
    omit_zeros: bool = False  # csv/tsv: leave out the columns whose value is zero
    max_line_bytes: int = 64 << 20  # longer lines are bad records ("oversize"), never read into memory
    label_field: str = ""  # classification: the jsonl field / csv column / parquet column holding the label
    records_field: str = ""  # json: the field of the document that holds the list of records
    volatile: tuple[
        str, ...
    ] = ()  # data.volatile: rules of data/volatile.py applied to every document's text


Item = tuple["Document | BadRecord", Position]


def _decode(raw: bytes, url: str, lineno: int) -> str | BadRecord:
    if isinstance(raw, Oversize):
        return BadRecord(url, lineno, "oversize record", f" ({len(raw)} bytes; data.max_record_bytes)")
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return BadRecord(url, lineno, "invalid UTF-8", f" at byte {e.start}")
    return text.removeprefix("\ufeff") if lineno == 1 else text  # a byte-order mark (files saved on Windows)


def read_lines(url: str, start: Position, opts: FormatOptions, strip: bool = True) -> Iterator[Item]:
    record = start.record
    for lineno, raw, offset in lines_from(url, start, opts.max_line_bytes):
        text = _decode(raw, url, lineno)
        after = Position(offset + len(raw), lineno + 1, record + 1)
        if isinstance(text, BadRecord):
            record += 1
            yield text, after
        elif text.strip():
            record += 1
            yield Document(text.strip() if strip else text, f"{url}:{lineno}"), after


def read_docs(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    """Documents separated by one or more blank lines; a bad line drops its whole document."""
    buf: list[str] = []
    first, bad, record, end = 0, None, start.record, start
    for lineno, raw, offset in lines_from(url, start, opts.max_line_bytes):
        text = _decode(raw, url, lineno)
        end = Position(offset + len(raw), lineno + 1, record)
        if isinstance(text, str) and not text.strip():
            if buf or bad:
                record += 1
                yield (
                    bad or Document("\n".join(buf), f"{url}:{first}"),
                    Position(end.offset, end.line, record),
                )
                buf, bad = [], None
            continue
        first = first if buf or bad else lineno
        if isinstance(text, BadRecord):
            bad = bad or text
        else:
            buf.append(text)
    if buf or bad:
        yield bad or Document("\n".join(buf), f"{url}:{first}"), Position(end.offset, end.line, record + 1)


def read_http(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    """Raw HTTP request logs (CSIC 2010): a request starts at each request line, never at a blank line; headers and
    body are kept and \\r is stripped (CSIC's test files mix line endings, which would otherwise leak the label)."""
    buf: list[str] = []
    first, bad, record, end = 0, None, start.record, start
    for lineno, raw, offset in lines_from(url, start, opts.max_line_bytes):
        text = _decode(raw, url, lineno)
        end = Position(offset + len(raw), lineno + 1, record)
        if HTTP_REQUEST.match(raw):
            if buf or bad:
                record += 1
                yield (
                    bad or Document("\n".join(buf).strip(), f"{url}:{first}"),
                    Position(offset, lineno, record),
                )
            buf, bad, first = ([], text, lineno) if isinstance(text, BadRecord) else ([text], None, lineno)
        elif buf or bad:
            if isinstance(text, BadRecord):
                bad = bad or text
            else:
                buf.append(text)
        elif isinstance(text, BadRecord) or text.strip():
            bad, first = (
                (
                    text
                    if isinstance(text, BadRecord)
                    else BadRecord(url, lineno, "text before the first HTTP request line")
                ),
                lineno,
            )
    if buf or bad:
        yield (
            bad or Document("\n".join(buf).strip(), f"{url}:{first}"),
            Position(end.offset, end.line, record + 1),
        )


def read_jsonl(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    for item, after in read_lines(url, start, opts):
        if isinstance(item, BadRecord):
            yield item, after
            continue
        line = int(item.id.rsplit(":", 1)[1])
        try:
            obj = json.loads(item.text)
        except json.JSONDecodeError as e:
            yield BadRecord(url, line, "malformed JSON", f" ({e.msg} at column {e.colno})"), after
            continue
        except RecursionError:
            yield BadRecord(url, line, "malformed JSON", " (nested too deeply)"), after
            continue
        doc = _record(obj, opts, item.id)
        yield (doc if isinstance(doc, Document) else BadRecord(url, line, *doc)), after


def read_json(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    """A JSON document holding a list of records: the document itself, or the list under data.records_field (e.g.
    `objects` of a STIX bundle such as MITRE ATT&CK). The file is read whole, up to data.max_record_bytes; positions
    count records, so a resume skips the ones before it."""
    f = open_binary(url)
    try:
        raw = f.read(opts.max_line_bytes + 1)
    finally:
        f.close()
    if len(raw) > opts.max_line_bytes:
        yield (
            BadRecord(
                url,
                None,
                "oversize record",
                f": a JSON document over {opts.max_line_bytes} bytes "
                "(data.max_record_bytes); split it into jsonl",
            ),
            Position(0, 1, start.record + 1),
        )
        return
    try:
        doc = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        yield (
            BadRecord(url, None, "malformed JSON", f" ({getattr(e, 'msg', None) or type(e).__name__})"),
            Position(0, 1, start.record + 1),
        )
        return
    where = opts.records_field or "the document"
    records = (
        doc.get(opts.records_field)
        if opts.records_field and isinstance(doc, dict)
        else doc
        if not opts.records_field
        else None
    )
    if not isinstance(records, list):
        yield (
            BadRecord(
                url,
                None,
                f"no list of records at {where}",
                " (set data.records_field to the field that holds them)",
            ),
            Position(0, 1, start.record + 1),
        )
        return
    name = opts.records_field or ""
    for i in range(start.record, len(records)):
        doc_id = f"{url}:{name}[{i}]"
        doc = _record(records[i], opts, doc_id)
        yield (doc if isinstance(doc, Document) else BadRecord(doc_id, None, *doc)), Position(0, 1, i + 1)


def _record(obj, opts: FormatOptions, doc_id: str) -> Document | tuple[str, str]:
    """A parsed JSON record as a Document, or (reason, detail) saying what is wrong with it."""
    key, label_key = opts.text_field, opts.label_field
    if not isinstance(obj, dict) or key not in obj:
        return f"missing field {key!r}", ""
    if not isinstance(obj[key], str):
        return f"field {key!r} is not text", f" ({type(obj[key]).__name__})"
    if not obj[key].strip():
        return f"empty field {key!r}", ""
    if label_key and label_key not in obj:
        return f"missing label field {label_key!r}", ""
    if label_key and obj[label_key] is not None and not _label_value(obj[label_key]):
        return (
            f"label field {label_key!r} is not a label",
            f" ({obj[label_key]!r:.60}: a label is a non-empty string or a number)",
        )
    label = obj.get(label_key) if label_key else None
    return Document(obj[key], doc_id, None if label is None else str(label).strip())


def _label_value(value) -> bool:
    """A usable class label: a non-empty string, an int or a bool (not an object, a list or a fraction)."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _delimited(delimiter: str):
    def read(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
        # a field may be as long as a record (data.max_record_bytes); the csv module's own cap is 128 KiB
        csv.field_size_limit(max(csv.field_size_limit(), opts.max_line_bytes))
        names = list(opts.column_names)
        header_line = 0
        if not names:  # the first line is the header
            for lineno, raw, _ in lines_from(url, Position()):
                text = _decode(raw, url, lineno)
                if isinstance(text, BadRecord):
                    yield text, Position(-1, 0, 0)
                    return
                try:
                    names, header_line = next(csv.reader([text], delimiter=delimiter)), lineno
                except csv.Error as e:
                    yield BadRecord(url, lineno, "malformed CSV header", f" ({e})"), Position(-1, 0, 0)
                    return
                break
        missing = [
            c for c in [*opts.columns, *([opts.label_field] if opts.label_field else [])] if c not in names
        ]
        if missing:
            yield (
                BadRecord(
                    url,
                    header_line or 1,
                    f"missing column(s) {', '.join(missing)}",
                    f" (columns: {', '.join(names)})",
                ),
                Position(-1, 0, 0),
            )
            return
        label_at = names.index(opts.label_field) if opts.label_field else None
        keep = (
            [names.index(c) for c in opts.columns]
            if opts.columns
            else [i for i in range(len(names)) if i != label_at]
        )  # the label never leaks into the text
        for item, after in read_lines(
            url, start, opts, strip=False
        ):  # a tab may end a row with an empty field
            line = int(item.id.rsplit(":", 1)[1]) if isinstance(item, Document) else item.line
            if line == header_line or isinstance(item, BadRecord):
                if isinstance(item, BadRecord):
                    yield item, after
                continue
            try:
                row = next(csv.reader([item.text], delimiter=delimiter))
            except csv.Error as e:
                yield BadRecord(url, line, "malformed CSV", f" ({e})"), after
                continue
            used = max([*keep, label_at if label_at is not None else -1]) + 1
            if (
                used <= len(row) < len(names)
            ):  # only unused trailing fields are missing (a dropped trailing comma)
                row += [""] * (len(names) - len(row))
            if len(row) != len(names):
                yield (
                    BadRecord(url, line, "wrong number of fields", f" ({len(row)}, header has {len(names)})"),
                    after,
                )
                continue
            text = record_text(
                [(names[i], row[i]) for i in keep], opts.round_digits, omit_zeros=opts.omit_zeros
            )
            if label_at is not None and not row[label_at].strip():
                yield BadRecord(url, line, f"empty label column {opts.label_field!r}"), after
                continue
            yield Document(text, item.id, row[label_at].strip() if label_at is not None else None), after

    return read


def record_text(
    fields: list[tuple[str, str]], round_digits: int | None = None, *, omit_zeros: bool = False
) -> str:
    """The text a model reads for a record of several columns (csv/tsv), in training and in prediction alike: each
    column as `name:value`, joined by single spaces, in the columns' order (data.columns, else the file's without the
    label); one column alone is its value. With data.round_digits, values with a decimal point are rounded to that
    many digits (%g); with data.omit_zeros, pairs whose value is zero after that are left out. Give the same columns in the same order to a model trained on them, e.g. in transformers'
    pipeline: `pipeline("text-classification", model=FOLDER)(record_text([("duration", "0"), ("service", "http")]))`."""
    if len(fields) == 1:  # one selected column (a domain, a sentence): its value is the text
        return _value(fields[0][1], round_digits)
    pairs = ((name, _value(value, round_digits)) for name, value in fields)
    return " ".join(f"{name}:{value}" for name, value in pairs if not (omit_zeros and _is_zero(value)))


def _is_zero(value: str) -> bool:
    try:
        return float(value) == 0
    except ValueError:
        return False


def _value(value: str, digits: int | None) -> str:
    if digits is None or "." not in value:
        return value.strip()
    try:
        return f"{round(float(value), digits):g}"
    except ValueError:
        return value.strip()


def read_parquet(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    """A text column of a parquet file; positions count rows (record), read from the row group that holds them."""
    import pyarrow.parquet as pq

    with open_binary(url) as f:
        pf = pq.ParquetFile(f)
        groups = (
            (pf.metadata.row_group(g).num_rows, lambda columns, g=g: pf.read_row_group(g, columns=columns))
            for g in range(pf.num_row_groups)
        )
        yield from _table_records(url, start, opts, pf.schema_arrow, groups)


def read_arrow(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
    """A shard of a Hugging Face `datasets` folder written by save_to_disk (Arrow IPC, stream or file format); like
    parquet, positions count rows, and a resume skips whole record batches without decoding them."""
    import pyarrow as pa

    source = pa.memory_map(url) if "://" not in url and not url.endswith(COMPRESSED) else open_binary(url)
    with source as f:
        magic = f.read(6)
        f.seek(0)
        if magic == b"ARROW1":  # the IPC file format (random access); save_to_disk writes the stream format
            reader = pa.ipc.open_file(f)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = pa.ipc.open_stream(f)
            batches = iter(reader)
        chunks = (
            (b.num_rows, lambda columns, b=b: pa.Table.from_batches([b]).select(columns)) for b in batches
        )
        yield from _table_records(url, start, opts, reader.schema, chunks)


def _class_names(schema, field: str) -> list[str] | None:
    """The label names of a `datasets` ClassLabel column (kept in the schema's metadata), so that labels read as
    names ("attack"), not as their integer codes."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][field] if meta else {}
    except (ValueError, KeyError, TypeError):
        return None
    return (
        feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    )


def _table_records(url: str, start: Position, opts: FormatOptions, schema, chunks) -> Iterator[Item]:
    """The records of a columnar file read chunk by chunk: `chunks` yields (rows, read(columns) -> table); chunks
    wholly before `start` are not read."""
    wanted = [opts.text_field] + ([opts.label_field] if opts.label_field else [])
    absent = [c for c in wanted if c not in schema.names]
    if absent:
        yield BadRecord(url, 0, f"missing column {absent[0]!r}"), Position(-1, 0, 0)
        return
    names = _class_names(schema, opts.label_field) if opts.label_field else None
    row = 0
    for size, read in chunks:
        if row + size <= start.record:
            row += size
            continue
        table = read(wanted)
        values = table.column(opts.text_field).to_pylist()
        labels = table.column(opts.label_field).to_pylist() if opts.label_field else [None] * len(values)
        for value, label in zip(values, labels):
            row += 1
            if row <= start.record:
                continue
            after = Position(0, 0, row)
            if names and isinstance(label, int) and -1 <= label < len(names):
                label = names[label] if label >= 0 else None  # -1: datasets' "no label"
            if not isinstance(value, str):
                yield (
                    BadRecord(url, row, f"field {opts.text_field!r} is not text", f" (row {row})"),
                    after,
                )
            elif not value.strip():
                yield BadRecord(url, row, f"empty field {opts.text_field!r}", f" (row {row})"), after
            else:
                yield Document(value, f"{url}:{row}", None if label is None else str(label)), after


@functools.cache
def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged file raises while it is read: I/O and decompression errors, and pyarrow's."""
    import lzma
    import zlib

    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow.lib", "ArrowException")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except ImportError:
            pass
    return tuple(errors)


def _guarded(reader):
    """A reader whose file turns out unreadable part-way (a truncated or fake .gz/.zst, a damaged parquet file)
    ends with one bad record naming the file and the line it reached, instead of an exception from deep inside."""

    def read(url: str, start: Position, opts: FormatOptions) -> Iterator[Item]:
        # Looked up before the try, not in the except clause: that clause is also evaluated for the GeneratorExit
        # of a reader closed at interpreter shutdown, when nothing can be imported any more.
        errors = _read_errors()
        line = start.line
        normalise = normaliser(opts.volatile)
        try:
            for item, after in reader(url, start, opts):
                line = after.line
                if normalise and isinstance(item, Document):
                    item = Document(normalise(item.text), item.id, item.label)
                yield item, after
        except errors as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            yield (
                BadRecord(url, line or None, "unreadable file", f" ({type(e).__name__}: {detail})"),
                Position(-1, 0, 0),
            )

    read.__doc__ = reader.__doc__
    return read


READERS = {
    name: _guarded(reader)
    for name, reader in {
        "lines": read_lines,
        "docs": read_docs,
        "http": read_http,
        "jsonl": read_jsonl,
        "json": read_json,
        "csv": _delimited(","),
        "tsv": _delimited("\t"),
        "parquet": read_parquet,
        "arrow": read_arrow,
    }.items()
}
