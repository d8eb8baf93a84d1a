"""Labelled data for the classifier, embeddings and anomaly runs.

Training data streams through the same layer as MLM (dapt.data.stream): one padded row per document carrying its
label, exact resume without replay, the same order whatever the world size, bounded memory. One counting pass over
epoch 0 gives the rows per epoch, the class counts (for class weights and the label set) and the skipped records.
Validation and test sets are small and read whole; without data.valid the validation set is the hash split of the
training files (at most data.valid_max_docs documents, as for MLM).
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from dapt.config.schema import BadInput, RunConfig
from dapt.data.formats import READERS, BadRecord, Document
from dapt.data.packing import pack
from dapt.data.prepare import format_options, stream_spec, tokenizer_for
from dapt.data.sources import Position, expand
from dapt.data.stream import EmptyStream, StreamSpec, epoch_pass, split_hash
from dapt.runtime import group

log = logging.getLogger("dapt")


@dataclass
class Labelled:
    """A small labelled set, tokenized: one row of ids per document, label ids, document ids (file:line)."""

    ids: list[np.ndarray]
    y: np.ndarray
    doc_ids: list[str]


def file_labels(cfg: RunConfig, urls: list[str]) -> dict[str, str]:
    """classify.label_files: each file's label by pattern (a file no pattern matches is an error); {} without it."""
    patterns = cfg.classify.label_files
    if not patterns:
        return {}
    out = {}
    for url in urls:
        label = next(
            (
                str(label)
                for pattern, label in patterns.items()
                if fnmatch.fnmatch(url, pattern) or fnmatch.fnmatch(Path(url).name, pattern)
            ),
            None,
        )
        if label is None:
            raise BadInput(
                f"{url}: no entry of classify.label_files matches this file (patterns: {', '.join(patterns)})"
            )
        out[url] = label
    return out


def labelled_options(cfg: RunConfig):
    """The data's reading options with the label taken from classify.label_field (unless the files' names give it:
    classify.label_files)."""
    opts = format_options(cfg.data)
    if cfg.classify.label_files:
        return opts
    return type(opts)(**{**opts.__dict__, "label_field": cfg.classify.label_field})


def label_map(cfg: RunConfig) -> dict[str, str]:
    """classify.label_map with its keys and values as text (YAML reads a label 1 as a number)."""
    return {str(raw): str(name) for raw, name in cfg.classify.label_map.items()}


def read_labelled(
    cfg: RunConfig, sources: list[str], skipped: Counter, on_error: str | None = None
) -> Iterator[Document]:
    """Documents with labels, from a label field/column or from classify.label_files (per file), read in order, each
    label as classify.label_map names it; bad records raise or are counted in `skipped` (data.on_error)."""
    d = cfg.data
    opts = labelled_options(cfg)
    urls = expand(sources, d.format)
    labels = file_labels(cfg, urls)
    mapped = label_map(cfg)
    for url in urls:
        for n, (item, _) in enumerate(READERS[d.format](url, Position(), opts)):
            if d.max_records_per_file and n == d.max_records_per_file:
                break
            if isinstance(item, Document) and url not in labels and item.label is None:
                item = BadRecord(item.id, None, "no label")
            if isinstance(item, BadRecord):
                if (on_error or d.on_error) == "raise":
                    raise item
                skipped[item.reason] += 1
                continue
            label = labels.get(url, item.label)
            yield Document(item.text, item.id, mapped.get(label, label))


def say_what_is_cut(tokenizer, texts: list[str], max_len: int, what: str) -> float:
    """Log how many of `texts` are longer than data.max_seq_length and so cut to their first tokens (a warning when
    more than a tenth are: the model never reads the rest); returns that share."""
    if not texts:
        return 0.0
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]])
    share = float((lengths > max_len).mean())
    if share:
        (log.warning if share > 0.1 else log.info)(
            "data.max_seq_length=%d: %.0f%% of %d %s are longer (median %d tokens, 95th percentile %d) and are cut to "
            "their first %d tokens, the rest never read; raise --data.max_seq_length to keep more",
            max_len,
            100 * share,
            len(texts),
            what,
            int(np.median(lengths)),
            int(np.percentile(lengths, 95)),
            max_len,
        )
    return share


def encode(
    tokenizer,
    docs: list[Document],
    label2id: dict[str, int],
    max_len: int,
    split: str,
    unseen: str = "error",
    skipped: Counter | None = None,
) -> Labelled:
    unknown = [(d.id, d.label) for d in docs if d.label not in label2id]
    if unknown and unseen == "error":
        where, label = unknown[0]
        raise BadInput(
            f"{where}: label {label!r} in the {split} set was never seen in training "
            f"({len(unknown)} such records); known labels: {', '.join(label2id)}. "
            "Set classify.unseen=skip to leave such records out (counted)"
        )
    if unknown:
        docs = [d for d in docs if d.label in label2id]
        for _, label in unknown:
            skipped[f"unseen label in {split}: {label}"] += 1
    rows = pack("pad", tokenizer, [d.text for d in docs], [d.id for d in docs], max_len)
    return Labelled(
        [r.ids for r in rows],
        np.array([label2id[d.label] for d in docs], dtype=np.int64),
        [d.id for d in docs],
    )


def padded(ids: list[np.ndarray], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one right-padded (input_ids, attention_mask) pair, the width rounded up to `multiple`."""
    width = -(-max(len(x) for x in ids) // multiple) * multiple
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)], mask[i, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64)), 1
    return input_ids, mask


def collate(ids: list[np.ndarray], y, pad_id: int) -> dict[str, torch.Tensor]:
    """A padded micro-batch (width rounded up to a multiple of 8) with its label ids."""
    input_ids, mask = padded(ids, pad_id, multiple=8)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.as_tensor(np.asarray(y, dtype=np.int64)),
    }


@dataclass
class LabelledCorpus:
    tokenizer: object
    spec: StreamSpec
    labels: list[str]
    counts: Counter  # training rows per label, epoch 0
    rows: int  # training rows in one epoch, all streams
    valid: Labelled | None
    test: Labelled | None
    skipped: Counter = field(default_factory=Counter)  # records left out of the evaluation sets
    epoch_skipped: Counter = field(default_factory=Counter)  # records left out of training's epoch 0

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def prepare_labelled(cfg: RunConfig, out: Path) -> LabelledCorpus:
    """Tokenizer, the training streams and their counting pass, and the encoded validation and test sets."""
    d, c = cfg.data, cfg.classify
    labels_of_files = file_labels(
        cfg, expand(d.train, d.format)
    )  # on every rank: a wrong pattern stops them all
    skipped: Counter = Counter()
    valid_docs, below = _valid_split(cfg, skipped)

    def tokenizer_texts():  # rank 0 only: bad records are passed over here, training counts or raises them
        docs = read_labelled(cfg, d.train, Counter(), on_error="skip")
        return (doc.text for doc in islice((x for x in docs if not _in(x, below)), d.tokenizer_docs))

    tokenizer = tokenizer_for(cfg, out, tokenizer_texts)
    if group.rank() == 0:  # records longer than the rows: said, not silently cut
        sample = [x.text for x in islice(read_labelled(cfg, d.train, Counter(), on_error="skip"), 200)]
        say_what_is_cut(tokenizer, sample, d.max_seq_length, "training records")
    opts = labelled_options(cfg)
    spec, per_stream, counts, epoch_skipped = _streams(
        cfg,
        lambda streams: stream_spec(
            cfg,
            tokenizer,
            streams=streams,
            packing="pad",
            whole_word=False,
            options=opts,
            labelled=True,
            file_labels=labels_of_files,
            label_map=label_map(cfg),
            labels=list(c.labels),
            unseen=c.unseen,
            max_records=d.max_records_per_file,
            valid_fraction=below,
        ),
    )
    labels = list(c.labels) or sorted(counts)
    label2id = {label: i for i, label in enumerate(labels)}
    test_docs = list(read_labelled(cfg, d.test, skipped)) if d.test else []
    sets = [
        _evaluation_set(cfg, tokenizer, docs, label2id, name, skipped)
        for docs, name in ((valid_docs, "validation"), (test_docs, "test"))
    ]
    rows = sum(per_stream.values())
    log.info(
        "classification data: %d training rows in %d streams / %d valid / %d test documents; labels %s",
        rows,
        spec.streams,
        len(valid_docs),
        len(test_docs),
        ", ".join(f"{k}={counts[k]}" for k in labels),
    )
    return LabelledCorpus(tokenizer, spec, labels, counts, rows, sets[0], sets[1], skipped, epoch_skipped)


def _evaluation_set(
    cfg: RunConfig, tokenizer, docs, label2id, name: str, skipped: Counter
) -> Labelled | None:
    """A validation or test set, encoded; None without documents, or when every one had a label never seen in
    training (said)."""
    if not docs:
        return None
    encoded = encode(tokenizer, docs, label2id, cfg.data.max_seq_length, name, cfg.classify.unseen, skipped)
    if len(encoded.y) == 0:
        log.warning(
            "the %s set has no records left once unseen labels are skipped (%d left out): not evaluated",
            name,
            len(docs),
        )
        return None
    return encoded


def _streams(
    cfg: RunConfig, make: Callable[[int], StreamSpec]
) -> tuple[StreamSpec, dict[int, int], Counter, Counter]:
    """The labelled streams and their counting pass. A small corpus whose bad or unlabelled records leave a stream
    empty gets fewer streams: the most, dividing data.streams, that all hold rows (found from the data alone, so the
    order is the same on any world size)."""
    streams = cfg.data.streams
    while True:
        spec = make(streams)
        per_stream, counts, skipped = count_pass(spec)
        empty = [s for s in range(spec.streams) if not per_stream.get(s)]
        if not empty or spec.streams == 1:
            break
        fewer = max(n for n in range(1, spec.streams) if spec.streams % n == 0)
        log.info(
            "data.streams: %d -> %d: %d stream(s) get no usable labelled record (the count follows the data, "
            "not the world size)",
            spec.streams,
            fewer,
            len(empty),
        )
        streams = fewer
    if not sum(per_stream.values()):
        raise BadInput(
            f"data.train: no usable labelled record ({', '.join(f'{k} {v}' for k, v in skipped.items())})"
        )
    if spec.streams % group.world():
        raise BadInput(
            f"data.train: the labelled corpus fills {spec.streams} data stream(s), which "
            f"{group.world()} ranks cannot share; train it on fewer ranks or add data"
        )
    return spec, per_stream, counts, skipped


def count_pass(spec: StreamSpec) -> tuple[dict[int, int], Counter, Counter]:
    """One pass over epoch 0, each rank its own streams, gathered: rows per stream, rows per label, records left
    out (bad, filtered, or with a label outside classify.labels under classify.unseen=skip)."""
    mine = [s for s in range(spec.streams) if s % group.world() == group.rank()]
    labels: Counter = Counter()
    rows, skipped = {}, Counter()
    for stream in mine:
        try:
            one, left_out = epoch_pass(spec, [stream], labels)
        except EmptyStream as e:  # the caller gives the corpus fewer streams
            one, left_out = {stream: 0}, Counter(e.counts)
        rows |= one
        skipped.update(left_out)
    per_stream: dict[int, int] = {}
    all_labels: Counter = Counter()
    all_skipped: Counter = Counter()
    for part_rows, part_labels, part_skipped in group.gather((rows, dict(labels), dict(skipped))):
        per_stream |= part_rows
        all_labels.update(part_labels)
        all_skipped.update(part_skipped)
    return per_stream, all_labels, all_skipped


def _in(doc: Document, below: float) -> bool:
    return below > 0 and split_hash(doc.text) < below


def _valid_split(cfg: RunConfig, skipped: Counter) -> tuple[list[Document], float]:
    """The validation documents, and the hash below which training leaves documents out (0: none). data.valid
    when given; else the hash split of the training files: the documents whose hash is below
    data.valid_fraction, at most data.valid_max_docs of them, the lowest hashes kept (an even sample of every file,
    whatever their order, in bounded memory), and training leaves out exactly those."""
    d = cfg.data
    if d.valid:
        return list(read_labelled(cfg, d.valid, skipped)), 0.0
    if not d.valid_fraction:
        return [], 0.0
    cap = d.valid_max_docs or None
    kept: list[tuple[float, int, Document]] = []  # a max-heap by hash (negated) of at most `cap` documents
    for n, doc in enumerate(read_labelled(cfg, d.train, Counter())):  # training counts the bad records
        h = split_hash(doc.text)
        if h >= d.valid_fraction:
            continue
        heapq.heappush(kept, (-h, n, doc))
        if cap and len(kept) > cap:
            heapq.heappop(kept)
    if cap and len(kept) == cap:
        below = math.nextafter(-kept[0][0], math.inf)  # just above the highest hash kept
    else:
        below = d.valid_fraction
    return [doc for _, _, doc in sorted(kept, key=lambda x: x[1])], below
