"""Data plumbing shared by training and evaluation: options from the config, whole-file reading for small sets
(validation, test, tokenizer training), the validation hash split, and evaluation rows."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from dapt.config.schema import BadInput
from dapt.data.formats import READERS, BadRecord, Document, FormatOptions
from dapt.data.packing import Row, pack
from dapt.data.sources import Position, expand
from dapt.data.stream import RowFeeder, StreamSpec, fitting_streams, in_valid_split
from dapt.runtime import group
from dapt.runtime.card import TEXT_FILE

__all__ = ["BadRecord", "Document", "Row", "in_valid_split"]

log = logging.getLogger("dapt")


def format_options(d) -> FormatOptions:
    return FormatOptions(
        text_field=d.text_field,
        columns=tuple(d.columns),
        column_names=tuple(d.column_names),
        round_digits=d.round_digits,
        omit_zeros=d.omit_zeros,
        max_line_bytes=d.max_record_bytes,
        records_field=d.records_field,
        volatile=tuple(d.volatile),
    )


def text_settings(cfg) -> dict:
    """How training records became the text the model read (the data fields that decide it, and the label field):
    written into final/ as dapt_text.json, where launch/predict.py reads it so that new records become text the same
    way, and described in the model card (text_description)."""
    d = cfg.data
    return {
        "format": d.format,
        "text_field": d.text_field,
        "columns": list(d.columns),
        "column_names": list(d.column_names),
        "round_digits": d.round_digits,
        "omit_zeros": d.omit_zeros,
        "records_field": d.records_field,
        "volatile": list(d.volatile),
        "label_field": cfg.classify.label_field,
        "label_map": dict(cfg.classify.label_map),
        "max_seq_length": d.max_seq_length,
        "columns_in_order": columns_in_order(cfg),
    }


def columns_in_order(cfg) -> list[str]:
    """csv/tsv: the columns that made the text, in order (data.columns, else the first training file's header or
    data.column_names, without the label); [] for other formats."""
    import csv

    from dapt.data.sources import lines_from

    d = cfg.data
    if d.format not in ("csv", "tsv"):
        return []
    if d.columns:
        return list(d.columns)
    names = list(d.column_names)
    files = expand(d.train, d.format) if not names and d.train else []
    for _, raw, _ in lines_from(files[0], Position()) if files else ():
        line = raw.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
        names = next(csv.reader([line], delimiter="," if d.format == "csv" else "\t"))
        break
    return [n for n in names if n != cfg.classify.label_field]


def adopt_text_settings(cfg) -> list[str]:
    """launch/predict.py: the settings of final/dapt_text.json (model.name_or_path's) as the defaults of the data fields
    and the label field, so that new records become text as the training records did; a field given on the command
    line or in the recipe keeps its value. Returns the note to log."""
    path = Path(cfg.model.name_or_path or "") / TEXT_FILE
    if not cfg.model.name_or_path or not path.is_file():
        return []
    settings, taken = json.loads(path.read_text()), []
    for key, value in settings.items():
        dotted = f"classify.{key}" if key in ("label_field", "label_map") else f"data.{key}"
        section, name = dotted.split(".")
        if dotted not in cfg.explicit and hasattr(getattr(cfg, section), name):
            setattr(getattr(cfg, section), name, value)
            taken.append(dotted)
    return [f"records become text as the model's training records did ({path}): {text_description(settings)}"]


def text_description(settings: dict) -> str:
    """In words, for the model card: what of a record the model read, and how."""
    fmt, columns = settings["format"], settings.get("columns_in_order") or settings["columns"]
    if fmt in ("csv", "tsv"):
        which = (
            f"the columns {', '.join(columns)}"
            if columns
            else f"every column but the label ({settings['label_field']!r})"
        )
        rounding = (
            f", values with a decimal point rounded to {settings['round_digits']} digits"
            if settings["round_digits"] is not None
            else ""
        ) + (", pairs whose value is zero left out" if settings.get("omit_zeros") else "")
        text = (
            f"each {fmt} row as one text: {which}, in that order, each written `name:value` and joined by single spaces "
            f"(one column alone: its value){rounding}; dapt.data.formats.record_text builds it"
        )
    elif fmt in ("jsonl", "json", "parquet", "arrow"):
        text = f"the field {settings['text_field']!r} of each record, as it is"
    else:
        text = {
            "lines": "each line",
            "docs": "each blank-line-separated document",
            "http": "each HTTP request",
        }.get(fmt, fmt)
    if settings["volatile"]:
        text += f"; with data.volatile {settings['volatile']} applied first"
    return text + f"; rows cut at {settings['max_seq_length']} tokens"


def read_documents(
    paths: list[str],
    fmt: str,
    text_field: str = "text",
    on_error: str = "raise",
    skipped: Counter | None = None,
    options: FormatOptions | None = None,
    limit: int = 0,
) -> Iterator[Document]:
    """Every document of `paths` (files, globs, folders, URLs) in order; at most `limit` when it is set.

    Bad records raise BadRecord (file, line, field) or, with on_error="skip", are counted in `skipped` by reason.
    """
    opts = options or FormatOptions(text_field=text_field)
    skipped = skipped if skipped is not None else Counter()
    n = 0
    for url in expand(paths, fmt):
        for item, _ in READERS[fmt](url, Position(), opts):
            if isinstance(item, BadRecord):
                if on_error == "raise":
                    raise item
                skipped[item.reason] += 1
                continue
            yield item
            n += 1
            if limit and n >= limit:
                return


def stream_spec(cfg, tokenizer, **task) -> StreamSpec:
    """The streams' recipe: sources (grouped for weighted mixing), filters, selection passes, packing. `task`
    overrides StreamSpec fields (the classifier's labelled, padded streams)."""
    from dapt.data.selection import budget_start, duplicate_records

    d, opts = cfg.data, task.get("options") or format_options(cfg.data)
    groups = [expand([s], d.format) for s in d.train] if d.train_weights else [expand(d.train, d.format)]
    files = [f for source in groups for f in source]
    starts: dict = {}
    if d.max_tokens:
        files, starts = budget_start(files, d.format, opts, tokenizer, d.max_tokens)
        groups = [files]
    skip = duplicate_records(files, d.format, opts) if d.dedupe else {}

    def spec(streams: int) -> StreamSpec:
        fields = dict(
            files=files,
            format=d.format,
            options=opts,
            streams=streams,
            seed=cfg.seed,
            block_docs=d.block_docs,
            packing=d.packing,
            max_len=d.max_seq_length,
            tokenizer=tokenizer,
            on_error=d.on_error,
            valid_fraction=0.0 if d.valid else d.valid_fraction,
            min_chars=d.min_chars,
            max_chars=d.max_chars,
            num_samples=d.num_samples,
            whole_word=cfg.masking.whole_word,
            groups=groups,
            weights=list(d.train_weights),
            starts=starts,
            skip=skip,
        )
        return StreamSpec(**(fields | task))

    wanted = task.pop("streams", d.streams)
    made = spec(wanted)
    fitting = fitting_streams(made)
    if fitting == wanted:
        return made
    log.info(
        "data.streams: %d -> %d: the corpus has %d record run(s) to share out, fewer than %d streams (the "
        "count follows the data, not the world size, so the row order is the same on any number of ranks)",
        wanted,
        fitting,
        len(made.splits),
        wanted,
    )
    if fitting % group.world():
        raise BadInput(
            f"data.train: the corpus has too few records for {group.world()} ranks (it fills "
            f"{fitting} data stream(s), a number that {group.world()} ranks cannot share); train it on "
            "fewer ranks or add data"
        )
    return spec(fitting)  # its count is what the checkpoints record and a resume compares


def rows_of(tokenizer, docs: list[Document], packing: str, max_len: int, words: bool = False) -> list[Row]:
    """Pack a small, fixed document set (validation, test) in order."""
    return pack(packing, tokenizer, [d.text for d in docs], [d.id for d in docs], max_len, words)


def feeder(spec: StreamSpec, cfg, streams: dict[int, dict], rows: int) -> RowFeeder:
    """This rank's row feeder, continuing after `rows` global rows (the streams' positions from a checkpoint)."""
    world = group.world()
    if rows % world:
        raise BadInput(
            f"the checkpoint consumed {rows} rows, which {world} ranks cannot continue evenly; resume on "
            "a world size that divides it"
        )
    return RowFeeder(spec, group.rank(), world, cfg.data.num_workers, streams, consumed=rows // world)


class RowDataset(torch.utils.data.Dataset):
    """Rows addressed by (row index, masking key)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, key = item
        row = self.rows[index]
        return {"input_ids": row.ids, "key": key, "index": index, "lengths": row.lengths, "words": row.words}


def eval_batches(
    n: int, micro: int, world: int, rank: int, max_batches: int = 0
) -> list[list[tuple[int, int]]]:
    """This rank's evaluation batches; every rank gets the same count (ZeRO-3 forwards are collective)."""
    per_rank = -(-n // world)
    count = -(-per_rank // micro)
    if max_batches:
        count = min(count, max_batches)
    mine = list(range(rank, n, world))
    return [[(i, i) for i in mine[b * micro : (b + 1) * micro]] for b in range(count)]


@dataclass
class Corpus:
    tokenizer: object
    spec: StreamSpec
    valid: list[Row] | None
    test: list[Row] | None
    skipped: Counter = field(default_factory=Counter)


def tokenizer_for(cfg, out: Path, texts: Callable[[], Iterable[str]]):
    """The run's tokenizer on every rank. A from-scratch model's is trained by rank 0 on `texts()` (the first
    data.tokenizer_docs training documents) into output_dir/tokenizer first, and read from there by all."""
    from dapt.model.build import load_tokenizer

    folder = out / "tokenizer"
    if group.rank() == 0:
        load_tokenizer(cfg, folder, texts())
    group.barrier()
    return load_tokenizer(cfg, folder)


def prepare_data(cfg, out: Path) -> Corpus:
    """Sources, tokenizer and the small evaluation sets. Rank 0 writes the default corpus and trains a tokenizer
    (from-scratch models) first; the training corpus itself is only streamed, never loaded."""
    from dapt.data.corpus import write_default_corpus

    if not cfg.data.train:  # the embedded default corpus, written into the run's folder
        default = out / "default_corpus.txt"
        if group.rank() == 0 and not default.exists():
            write_default_corpus(default, seed=cfg.seed)
        group.barrier()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=[str(default)]))
    d = cfg.data
    opts = format_options(d)
    tokenizer = tokenizer_for(
        cfg,
        out,
        lambda: (
            doc.text
            for doc in read_documents(
                d.train, d.format, on_error="skip", options=opts, limit=d.tokenizer_docs
            )
        ),
    )
    skipped: Counter = Counter()
    if d.valid:
        valid_docs = list(
            read_documents(
                d.valid, d.format, on_error=d.on_error, skipped=skipped, options=opts, limit=d.valid_max_docs
            )
        )
    elif d.valid_fraction:
        picked = (
            doc
            for doc in read_documents(d.train, d.format, on_error=d.on_error, skipped=skipped, options=opts)
            if in_valid_split(doc.text, d.valid_fraction)
        )
        valid_docs = list(islice(picked, d.valid_max_docs or None))
    else:
        valid_docs = []
    test_docs = (
        list(read_documents(d.test, d.format, on_error=d.on_error, skipped=skipped, options=opts))
        if d.test
        else []
    )
    words = cfg.masking.whole_word
    valid = rows_of(tokenizer, valid_docs, d.packing, d.max_seq_length, words) if valid_docs else None
    test = rows_of(tokenizer, test_docs, d.packing, d.max_seq_length, words) if test_docs else None
    spec = stream_spec(cfg, tokenizer)
    if d.train_weights:
        for source, weight, n in zip(d.train, d.train_weights, Counter(spec.stream_group).values()):
            log.info(
                "mixing: %s (weight %g) gets %d of %d streams = %.1f%% of the rows",
                source,
                weight,
                n,
                spec.streams,
                100 * n / spec.streams,
            )
    log.info(
        "data: %d source file(s) in %d split(s) over %d streams (%s, %s packing, rows of %d tokens); "
        "%d validation rows, %d test rows",
        len(spec.files),
        len(spec.splits),
        spec.streams,
        d.format,
        d.packing,
        d.max_seq_length,
        len(valid or []),
        len(test or []),
    )
    return Corpus(tokenizer, spec, valid, test, skipped)
