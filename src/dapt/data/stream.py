"""Streaming training rows: canonical streams, blocks, exact resume.

The corpus is read by `data.streams` canonical streams (C), independent of the world size W. Global row g comes
from stream g % C, and rank r trains on the rows g = r, r + W, r + 2W, ... So an optimizer step holds the same rows
whatever the split into ranks and micro-batches, and a run resumed on another world size (C divisible by W)
continues the same global order. A rank reads only its own streams (c % W == r), spread over its DataLoader workers.

Each stream reads its splits (files, or record-strided parts of a file when there are fewer files than streams)
in a seeded order that changes every epoch, in blocks of `data.block_docs` documents: a block is shuffled,
tokenized in one batch, packed, and its rows shuffled. A stream's state is a handful of integers (epoch, split,
position of the block start, block number, rows already given), so resuming seeks to the block start and rebuilds
at most one block: resume time does not grow with how far training has got.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dapt.config.schema import BadInput
from dapt.data.formats import READERS, BadRecord, Document, FormatOptions
from dapt.data.packing import Row, pack
from dapt.data.sources import Position

Split = tuple[
    str, Position, int | None
]  # file, where the split starts, record index where it ends (None: EOF)


def file_splits(
    url: str,
    fmt: str,
    options: FormatOptions,
    parts: int,
    keep: int = 4096,
    start: Position | None = None,
    end: int | None = None,
) -> list[Split]:
    """Cut a file (from `start`, up to record index `end`) into `parts` contiguous runs of records. With one part
    nothing is read; otherwise one pass notes record boundaries (every one at first, thinned to at most 2 x `keep`
    marks), so each stream seeks straight to its run."""
    start = start or Position()
    if parts == 1:
        return [(url, start, end)]
    marks, every, total = [start], 1, 0
    for _, after in READERS[fmt](url, start, options):
        if end is not None and after.record > end:
            break
        total = after.record - start.record
        if total % every == 0:
            marks.append(after)
            if len(marks) > 2 * keep:
                marks, every = marks[::2], every * 2
    bounds = [marks[min(len(marks) - 1, round(k * total / parts) // every)] for k in range(parts)]
    ends = [b.record for b in bounds[1:]] + [end]
    last_record = start.record + total  # a run starting there holds no record (one document cut into 8 parts)
    return [
        (url, first, last)
        for first, last in zip(bounds, ends)
        if (last is None or last > first.record) and first.record < last_record
    ]


def records_end(url: str, fmt: str, options: FormatOptions, n: int) -> int | None:
    """The record index right after the file's first `n` records (bad ones included; a CSV header is no record), or
    None when the file has no more than `n`: data.max_records_per_file."""
    for i, (_, after) in enumerate(READERS[fmt](url, Position(), options), start=1):
        if i == n:
            return after.record
    return None


@dataclass
class StreamSpec:
    """Everything a stream needs; pickled into DataLoader workers."""

    files: list[str]
    format: str
    options: FormatOptions
    streams: int
    seed: int
    block_docs: int
    packing: str
    max_len: int
    tokenizer: object
    on_error: str = "raise"
    valid_fraction: float = 0.0  # documents in the validation split are left out of training
    min_chars: int = 1
    max_chars: int = 0
    num_samples: int = 0
    whole_word: bool = False  # rows carry word starts for whole-word masking
    groups: list[list[str]] = field(default_factory=list)  # weighted mixing: the files of each source
    weights: list[float] = field(
        default_factory=list
    )  # share of rows per source (streams are given out by it)
    starts: dict[str, Position] = field(default_factory=dict)  # token budget: where a file's kept part starts
    skip: dict[str, np.ndarray] = field(default_factory=dict)  # deduplication: record indices to leave out
    splits: list[Split] = field(default_factory=list)
    max_records: int = 0  # data.max_records_per_file: only the first N records of each file (0: all)
    # Labelled streams (the classifier): one padded row per document, carrying its label
    labelled: bool = False
    file_labels: dict[str, str] = field(default_factory=dict)  # classify.label_files: the label of each file
    label_map: dict[str, str] = field(default_factory=dict)  # classify.label_map: raw label -> class
    labels: list[str] = field(default_factory=list)  # the labels a training record may have (empty: any)
    unseen: str = "error"  # classify.unseen: a record with another label raises (error) or is counted (skip)

    def __post_init__(self):
        from dapt.data.selection import stream_counts

        if self.labelled and self.packing != "pad":
            raise ValueError(
                f"labelled streams carry one label per row: packing must be pad, not {self.packing}"
            )

        self.groups = self.groups or [self.files]
        counts = stream_counts(self.weights or [1.0] * len(self.groups), self.streams)
        self.stream_group = [g for g, n in enumerate(counts) for _ in range(n)]
        self.group_splits = []
        for g, files in enumerate(self.groups):
            parts = max(1, math.ceil(counts[g] / max(1, len(files))))
            self.group_splits.append(
                [
                    s
                    for f in files
                    for s in file_splits(
                        f, self.format, self.options, parts, start=self.starts.get(f), end=self._end(f)
                    )
                ]
            )
        self.splits = [s for group in self.group_splits for s in group]

    def _end(self, url: str) -> int | None:
        return records_end(url, self.format, self.options, self.max_records) if self.max_records else None

    def epoch_splits(self, epoch: int, stream: int) -> list[Split]:
        """This stream's splits in epoch `epoch`: its source's splits, dealt out in a seeded per-epoch order."""
        g = self.stream_group[stream]
        members = [c for c, grp in enumerate(self.stream_group) if grp == g]
        splits = self.group_splits[g]
        order = np.random.default_rng([self.seed, epoch, g]).permutation(len(splits))
        return [splits[i] for i in order[members.index(stream) :: len(members)]]


def split_hash(text: str) -> float:
    """A text's place in [0, 1) for the validation split: a hash, independent of order, rank, stream and resume."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def in_valid_split(text: str, fraction: float) -> bool:
    """Stable validation membership: the text's hash is below `fraction`."""
    return split_hash(text) < fraction


class EmptyStream(BadInput):
    """A stream whose share of the corpus holds no usable document; `counts`: the records it left out, by reason."""

    def __init__(self, message: str, counts: dict):
        super().__init__(message)
        self.counts = counts


def new_state() -> dict:
    return {
        "epoch": 0,
        "split": 0,
        "offset": 0,
        "line": 1,
        "record": 0,
        "block": 0,
        "rows_done": 0,
        "docs": 0,
        "counts": {},
    }


def _accept(spec: StreamSpec, item, counts: Counter, url: str) -> Document | None:
    """Apply on_error and the filters; count what is dropped. A labelled stream's documents get their file's label
    (classify.label_files) or keep their own; one without a label is a bad record."""
    if spec.labelled and isinstance(item, Document):
        item = _labelled(spec, item, url, counts)
    if isinstance(item, BadRecord):
        if spec.on_error == "raise":
            raise item
        counts[f"skipped/{item.reason}"] += 1
        return None
    n = len(item.text)
    if n < spec.min_chars or (spec.max_chars and n > spec.max_chars):
        counts["filtered/length"] += 1
        return None
    if spec.valid_fraction and in_valid_split(item.text, spec.valid_fraction):
        return None
    return item


def _labelled(spec: StreamSpec, doc: Document, url: str, counts: Counter) -> Document | BadRecord | None:
    label = spec.file_labels.get(url, doc.label)
    if label is None:
        return BadRecord(doc.id, None, "no label")
    label = spec.label_map.get(label, label)
    if spec.labels and label not in spec.labels:
        if spec.unseen == "skip":
            counts[f"skipped/label not in classify.labels: {label}"] += 1
            return None
        raise BadInput(
            f"{doc.id}: label {label!r} is not one of classify.labels ({', '.join(spec.labels)}); set "
            "classify.unseen=skip to leave such records out (counted)"
        )
    return Document(doc.text, doc.id, label)


def _blocks(spec: StreamSpec, split: Split, start: Position, counts: Counter, docs_left: int):
    """Yield (block start, documents of the block, position after it) from `start` until the split ends."""
    url, first, end = split
    if start.record == 0 and start.offset == 0:  # a fresh split starts where the split does
        start = first
    items = READERS[spec.format](url, start, spec.options)
    begin, finished = start, False
    while docs_left > 0 and not finished:
        docs: list[Document] = []
        after = begin
        finished = True
        skip = spec.skip.get(url)
        for item, after_item in items:
            if end is not None and after_item.record > end:
                break  # the next split's first record: this split is done
            after = after_item
            if skip is not None and _contains(skip, after.record - 1):
                counts["filtered/duplicate"] += 1
                continue
            doc = _accept(spec, item, counts, url)
            if doc is not None:
                docs.append(doc)
                if len(docs) >= min(spec.block_docs, docs_left):
                    finished = False
                    break
        if docs:
            yield begin, docs, after
            docs_left -= len(docs)
        begin = after


def _contains(sorted_ids: np.ndarray, value: int) -> bool:
    i = np.searchsorted(sorted_ids, value)
    return bool(i < len(sorted_ids) and sorted_ids[i] == value)


def block_rows(spec: StreamSpec, docs: list[Document], key: list[int]) -> list[Row]:
    """Shuffle, tokenize and pack one block; the row order is shuffled too (seeded by `key`)."""
    rng = np.random.default_rng(key)
    docs = [docs[i] for i in rng.permutation(len(docs))]
    rows = pack(
        spec.packing,
        spec.tokenizer,
        [d.text for d in docs],
        [d.id for d in docs],
        spec.max_len,
        spec.whole_word,
    )
    if spec.labelled:  # "pad" packing: one row per document, in order
        for row, doc in zip(rows, docs):
            row.label = doc.label
    return [rows[i] for i in rng.permutation(len(rows))]


def stream_rows(spec: StreamSpec, stream: int, state: dict | None = None) -> Iterator[tuple[Row, dict]]:
    """Rows of one canonical stream, forever (epoch after epoch), each with the state that resumes right after it."""
    st = dict(state or new_state())
    empty_epochs = 0
    while True:
        splits = spec.epoch_splits(st["epoch"], stream)
        rows_in_epoch = 0
        per_epoch_cap = math.ceil(spec.num_samples / spec.streams) if spec.num_samples else 1 << 62
        while st["split"] < len(splits):
            start = Position(st["offset"], st["line"], st["record"])
            # Bad and filtered records are counted in epoch 0 only: later epochs meet the same ones again.
            counts = Counter(st["counts"]) if st["epoch"] == 0 else Counter()
            for begin, docs, after in _blocks(
                spec, splits[st["split"]], start, counts, per_epoch_cap - st["docs"]
            ):
                rows = block_rows(spec, docs, [spec.seed, st["epoch"], stream, st["split"], st["block"]])
                # `counts` as of the block start (a resume re-reads the block), `seen` as of its end (for reports)
                seen = dict(counts) if st["epoch"] == 0 else st["counts"]
                base = dict(st, offset=begin.offset, line=begin.line, record=begin.record, seen=seen)
                for j in range(st["rows_done"], len(rows)):
                    rows_in_epoch += 1
                    yield rows[j], dict(base, rows_done=j + 1)
                st.update(
                    offset=after.offset,
                    line=after.line,
                    record=after.record,
                    block=st["block"] + 1,
                    rows_done=0,
                    docs=st["docs"] + len(docs),
                    counts=dict(counts) if st["epoch"] == 0 else st["counts"],
                )
            if st["epoch"] == 0:  # records after the split's last block (bad or filtered) count too
                st["counts"] = st["seen"] = dict(counts)
            st.update(split=st["split"] + 1, offset=0, line=1, record=0, block=0, rows_done=0)
        empty_epochs = empty_epochs + 1 if rows_in_epoch == 0 else 0
        if empty_epochs >= 2:
            left_out = ", ".join(f"{k} {v}" for k, v in sorted(st["counts"].items()))
            raise EmptyStream(
                f"data stream {stream} of {spec.streams} gets no documents: its source has too few "
                f"({len(spec.groups[spec.stream_group[stream]])} file(s)"
                + (f"; records left out: {left_out}" if left_out else "")
                + "); lower data.streams or add data",
                st["counts"],
            )
        st.update(epoch=st["epoch"] + 1, split=0, docs=0)


def count_epoch_rows(spec: StreamSpec, streams: list[int]) -> int:
    """Rows the given streams yield in epoch 0 (a full pass: tokenizes their share of the corpus once)."""
    return sum(epoch_pass(spec, streams)[0].values())


def epoch_pass(
    spec: StreamSpec, streams: list[int], labels: Counter | None = None
) -> tuple[dict[int, int], Counter]:
    """Rows each of the given streams yields in epoch 0, and the records they skip or filter in it (all of them:
    training learns of bad records at the end of the last file only after its last row, which a run may never ask
    for). With `labels`, the rows' labels are counted into it (a labelled stream's class counts)."""
    rows, counts = {}, Counter()
    for stream in streams:
        rows[stream] = 0
        for row, st in stream_rows(spec, stream):
            if st["epoch"] > 0:
                counts.update(st["seen"])
                break
            rows[stream] += 1
            if labels is not None:
                labels[row.label] += 1
    return rows, counts


def rows_for_passes(per_stream: dict[int, int], streams: int, epochs: float) -> int:
    """Global rows after which every stream has given `epochs` passes over its rows (rounded up to whole rows).

    Global row g comes from stream g % streams, so streams of unequal length finish a pass at different global rows:
    stopping after sum(rows) would leave the longer streams' last rows untrained, while the shorter ones have
    started their next pass."""
    return max((c + 1 + (math.ceil(epochs * n) - 1) * streams for c, n in per_stream.items() if n), default=0)


def fitting_streams(spec: StreamSpec) -> int:
    """The most streams, dividing data.streams, that each get a part of the corpus: a corpus of fewer records than
    data.streams (a first try on a small file) would leave streams with nothing to read. The count depends on the
    data only, not on the world size, so the row order stays the same on any number of ranks."""
    if len(spec.groups) > 1:
        return spec.streams  # weighted mixing: each source's streams are checked as they read
    usable = len(spec.group_splits[0])
    return max(d for d in range(1, spec.streams + 1) if spec.streams % d == 0 and d <= max(usable, 1))


class StreamDataset(torch.utils.data.IterableDataset):
    """A DataLoader worker runs its share of a rank's streams and yields packets {stream: [(row, state), ...]}."""

    def __init__(self, spec: StreamSpec, streams: list[int], states: dict[int, dict], packet_rows: int):
        self.spec, self.streams, self.states, self.packet_rows = spec, streams, states, packet_rows

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.streams[info.id :: info.num_workers] if info else self.streams
        gens = {c: stream_rows(self.spec, c, self.states.get(c)) for c in mine}
        while True:
            yield {c: [next(g) for _ in range(self.packet_rows)] for c, g in gens.items()}


def _identity(x):
    return x


def usable_workers(streams_per_rank: int, wanted: int) -> int:
    """The most workers <= wanted that split the rank's streams evenly (uneven splits would starve the queues)."""
    return max(
        (w for w in range(min(wanted, streams_per_rank), 0, -1) if streams_per_rank % w == 0), default=0
    )


class RowFeeder:
    """Hands this rank its rows in global order, g = rank + k * world, from the streams' packets."""

    def __init__(
        self,
        spec: StreamSpec,
        rank: int,
        world: int,
        num_workers: int,
        states: dict[int, dict],
        consumed: int,
        packet_rows: int = 8,
    ):
        self.spec, self.rank, self.world, self.k = spec, rank, world, consumed
        self.streams = [c for c in range(spec.streams) if c % world == rank]
        self.states = {c: states[c] for c in self.streams if c in states}
        workers = usable_workers(len(self.streams), num_workers) if num_workers else 0
        self.workers = workers
        dataset = StreamDataset(spec, self.streams, dict(self.states), packet_rows)
        # A private generator: creating the loader must not draw from the global RNG that dropout uses, or a resumed
        # run would diverge right after its restored RNG state.
        self.loader = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_size=None,
                num_workers=workers,
                collate_fn=_identity,
                generator=torch.Generator(),
            )
        )
        self.queues: dict[int, deque] = {c: deque() for c in self.streams}

    def take(self, n: int) -> list[tuple[int, Row]]:
        """The next n rows of this rank, each with its global index (the masking key)."""
        out = []
        for _ in range(n):
            g = self.rank + self.k * self.world
            stream = g % self.spec.streams
            while not self.queues[stream]:
                for c, rows in next(self.loader).items():
                    self.queues[c].extend(rows)
            row, state = self.queues[stream].popleft()
            self.states[stream] = state
            out.append((g, row))
            self.k += 1
        return out

    def counts(self) -> Counter:
        total: Counter = Counter()
        for st in self.states.values():
            total.update(st.get("seen", st["counts"]))
        return total

    def epoch(self) -> float:
        if not self.states:
            return 0.0
        return sum(st["epoch"] for st in self.states.values()) / len(self.states)
