"""Hugging Face datasets as sources: data.format=arrow reads `datasets` folders written by save_to_disk (in shard
order, ClassLabel names for labels, exact resume), and hf://datasets/OWNER/NAME/... URLs go through fsspec like
any other URL. No hub is reached: a local filesystem registered for the hf:// protocol stands in for huggingface_hub's
HfFileSystem, so dapt's whole path (expansion, globs, reading, resume positions, ids) runs on hf:// URLs."""

from __future__ import annotations

import importlib
import json
import signal
import sys
from itertools import islice
from pathlib import Path

import datasets
import fsspec
import pyarrow as pa
import pytest
from conftest import MLM, launch, run_inprocess
from fsspec.implementations.local import LocalFileSystem

from dapt.config.schema import BadInput
from dapt.data.corpus import generate
from dapt.data.formats import FormatOptions
from dapt.data.prepare import read_documents
from dapt.data.sources import Position, expand
from dapt.data.stream import StreamSpec, stream_rows
from dapt.model.build import train_wordpiece

LABELS = datasets.ClassLabel(names=["benign", "attack"])


def save_dataset(folder: Path, texts: list[str], labels: list[int] | None = None, shards: int = 1) -> Path:
    """A `datasets` folder as users keep corpora: Dataset.save_to_disk."""
    columns, features = {"text": texts}, {"text": datasets.Value("string")}
    if labels is not None:
        columns["label"], features["label"] = labels, LABELS
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(
        str(folder), num_shards=shards
    )
    return folder


def test_a_save_to_disk_folder_reads_in_shard_order_with_label_names(tmp_path):
    texts = [f"request number {i}" for i in range(11)]
    folder = save_dataset(tmp_path / "ds", texts, [i % 2 for i in range(11)], shards=3)
    shards = expand([str(folder)], "arrow")
    assert [Path(s).name for s in shards] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]  # no .json
    docs = list(read_documents([str(folder)], "arrow", options=FormatOptions(label_field="label")))
    assert [d.text for d in docs] == texts  # every record once, in the dataset's order
    assert [d.label for d in docs] == ["benign", "attack"] * 5 + ["benign"]  # names, not codes
    assert docs[0].id == f"{shards[0]}:1"
    with pytest.raises(BadInput, match=r"matches no \.arrow file"):
        expand([str(tmp_path / "ds" / "*.json")], "arrow")


def test_a_dataset_dict_folder_is_refused_naming_its_splits(tmp_path):
    d = datasets.Dataset.from_dict({"text": ["a b c", "d e f"]})
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        ValueError, match=r"DatasetDict folder with the splits train, test: name one split's folder"
    ):
        expand([str(tmp_path / "dd")], "arrow")
    assert len(expand([str(tmp_path / "dd" / "train")], "arrow")) == 1
    from dapt.cli.load import load_config
    from dapt.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"data.train: '.*dd' is a DatasetDict folder \(several splits\)"):
        load_config(
            [f"--data.train={tmp_path / 'dd'}", "--data.format=arrow", "--model.config.model_type=bert"]
        )


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_arrow_positions_resume_at_every_record_across_record_batches(tmp_path, kind):
    """Several record batches per shard (large datasets have one per 1000 rows): a resume from any record gives
    exactly the rest, skipping earlier batches; the IPC file format reads the same."""
    from dapt.data.formats import READERS

    path = tmp_path / f"shard.{kind}.arrow"
    texts = generate(23, seed=3)
    batches = [pa.record_batch({"text": texts[i : i + 5]}) for i in range(0, 23, 5)]
    new = pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    full = list(READERS["arrow"](str(path), Position(), FormatOptions()))
    assert [d.text for d, _ in full] == texts
    for k in range(len(full)):
        rest = list(READERS["arrow"](str(path), full[k][1], FormatOptions()))
        assert rest == full[k + 1 :]


def test_an_mlm_run_on_a_save_to_disk_folder_killed_and_rerun_trains_the_uninterrupted_samples(
    recipe, tmp_path
):
    """data.format=arrow end to end: SIGKILL after a checkpoint, the same command again; the documents trained on,
    in order, and the losses equal an uninterrupted run's."""
    import os
    import subprocess
    import time

    from conftest import child_env, metrics

    folder = save_dataset(tmp_path / "corpus", generate(400, seed=21), shards=4)
    args = ["--recipe", recipe, f"--data.train={folder}", "--data.format=arrow", "--train.max_steps=12",
            "--checkpoint.every=4", "--train.eval_every=0", "--data.log_sample_ids=true", "--data.streams=4"]  # fmt: skip
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    launch([*args, f"--output_dir={straight}"])
    proc = subprocess.Popen([sys.executable, str(MLM), *args, f"--output_dir={broken}"], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (broken / "checkpoints" / "step_00000004").is_dir() and len(
            [r for r in metrics(broken) if "train/loss" in r]
        ) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    again = launch([*args, f"--output_dir={broken}"])
    assert "resumed from" in again.stdout + again.stderr
    a, b = ((d / "samples.rank0.txt").read_text().splitlines() for d in (straight, broken))
    assert len(a) > 30 and a == b and all(x.startswith(str(folder / "data-0000")) for x in a)
    la, lb = ([r["train/loss"] for r in metrics(d) if "train/loss" in r] for d in (straight, broken))
    assert lb == pytest.approx(la)


class LocalHub(LocalFileSystem):
    """hf://datasets/OWNER/NAME/... served from a local folder: the stand-in for huggingface_hub's HfFileSystem.
    Paths round-trip as hf:// URLs, so dapt sees exactly what it would see from the hub."""

    protocol = "hf"
    root = "/nonexistent"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path).removeprefix("hf://")
        return path if path.startswith(cls.root) else f"{cls.root}/{path.lstrip('/')}"

    def unstrip_protocol(self, name: str) -> str:
        return "hf://" + name.removeprefix(self.root).lstrip("/")


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """hf://datasets/dapt-tests/... : a parquet dataset as the hub serves it (data/train-*.parquet shards) and a
    save_to_disk folder."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(LocalHub, "root", str(tmp_path / "hub"))
    registry = importlib.import_module(
        "fsspec.registry"
    )  # the module (fsspec.registry is its read-only view)
    monkeypatch.setitem(registry._registry, "hf", LocalHub)
    assert type(fsspec.filesystem("hf")) is LocalHub
    shards = tmp_path / "hub" / "datasets" / "dapt-tests" / "domains" / "data"
    shards.mkdir(parents=True)
    texts = generate(300, seed=31)
    for i in range(3):
        pq.write_table(
            pa.table({"text": texts[i::3]}), shards / f"train-0000{i}-of-00003.parquet", row_group_size=20
        )
    save_dataset(tmp_path / "hub" / "datasets" / "dapt-tests" / "saved", generate(60, seed=32), shards=2)
    return texts


def test_hf_dataset_urls_expand_and_resume_like_local_files(hub_datasets):
    files = expand(["hf://datasets/dapt-tests/domains/data/train-*.parquet"], "parquet")
    assert files == [
        f"hf://datasets/dapt-tests/domains/data/train-0000{i}-of-00003.parquet" for i in range(3)
    ]
    assert expand(["hf://datasets/dapt-tests/saved"], "arrow") == [
        f"hf://datasets/dapt-tests/saved/data-0000{i}-of-00002.arrow" for i in range(2)
    ]
    tok = train_wordpiece(hub_datasets, vocab_size=300, max_len=64)
    spec = StreamSpec(files=files, format="parquet", options=FormatOptions(), streams=2, seed=3, block_docs=8,
                      packing="concat", max_len=32, tokenizer=tok)  # fmt: skip
    full = [(row.doc_ids, st) for row, st in islice(stream_rows(spec, 1), 60)]
    assert all(d.startswith("hf://datasets/dapt-tests/domains/data/train-") for ids, _ in full for d in ids)
    for k in (7, 23, 41):
        rest = [(row.doc_ids, st) for row, st in islice(stream_rows(spec, 1, full[k - 1][1]), 60 - k)]
        assert rest == full[k:]


def test_an_mlm_run_trains_on_hf_dataset_urls_and_names_them_in_the_model_card(
    hub_datasets, recipe, tmp_path
):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    summary = run_inprocess(["--recipe", recipe, "--output_dir", out, "--data.format=parquet",
                             "--data.train=hf://datasets/dapt-tests/domains/data/*.parquet",
                             "--data.log_sample_ids=true", "--train.max_steps=3"])  # fmt: skip
    assert summary["steps"] == 3
    trained = (out / "samples.rank0.txt").read_text().splitlines()
    assert len(trained) >= 3 and all(x.startswith("hf://datasets/dapt-tests/domains/data/") for x in trained)
    assert ModelCard.load(out / "final" / "README.md").data.datasets == ["dapt-tests/domains"]
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "bert"
