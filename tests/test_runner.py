"""One runner for every task: the settings the MLM loop honours, the classifier honours too (it used to ignore
them), its data streams like MLM's (exact resume, the same order on any world size, bounded memory), and its
checkpoints have the MLM's client-state layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env, launch, metrics
from transformers import AutoModelForSequenceClassification

TINY = (
    "{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
    "max_position_embeddings: 64}"
)
CLASSIFY = ROOT / "launch" / "classify.py"


def _args(labelled: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data.train",
        str(labelled),
        "--data.format=jsonl",
        "--model.config",
        TINY,
        "--model.tokenizer_vocab_size=400",
        "--data.max_seq_length=48",
        "--train.micro_batch_size=8",
        "--output_dir",
        str(out),
        "--log.progress=false",
        *extra,
    ]


def _classify(argv: list[str]) -> dict:
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    return run(load_config(argv, world_size=1, accelerator="cpu"))


def test_the_classifier_builds_its_model_with_gradient_checkpointing_and_flash_attention(
    labelled, tmp_path, flash_stub, caplog
):
    """model.gradient_checkpointing and model.attn_implementation reach the classifier (the one model builder): the
    model says so, and flash attention's kernels run in its training steps (transformers' real integration over the
    pure-PyTorch stand-in kernels)."""
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="dapt"):
        _classify(
            _args(
                labelled,
                out,
                "--train.max_steps=3",
                "--model.gradient_checkpointing=true",
                "--model.attn_implementation=flash_attention_2",
                "--train.precision=bf16",
            )
        )
    assert "gradient checkpointing on" in caplog.text
    assert "attention implementation: flash_attention_2" in caplog.text
    assert flash_stub.CALLS, "flash attention's kernels never ran"
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "http", 1: "report"}


def test_the_classifier_honours_checkpoint_cadence_keep_best_disk_check_and_wandb(
    labelled, tmp_path, monkeypatch, caplog
):
    """checkpoint.every, checkpoint.keep, checkpoint.keep_best=false, checkpoint.disk_check and log.wandb (offline),
    all once ignored by the classifier; its checkpoints carry the MLM's client-state layout."""
    import dapt.runtime.runner
    from dapt.runtime.checkpoint import safe_load

    checked = []
    real = dapt.runtime.runner.check_disk
    monkeypatch.setattr(
        dapt.runtime.runner,
        "check_disk",
        lambda root, n, precision, keep, mode: (
            checked.append((n, keep, mode)) or real(root, n, precision, keep, mode)
        ),
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="dapt"):
        summary = _classify(
            _args(
                labelled,
                out,
                "--train.max_steps=7",
                "--train.eval_every=2",
                "--checkpoint.every=3",
                "--checkpoint.keep=10",
                "--checkpoint.keep_best=false",
                "--checkpoint.export=last",
                "--checkpoint.disk_check=warn",
                "--log.wandb=true",
            )
        )
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved == ["step_00000003", "step_00000006", "step_00000007"]  # the cadence; no save per evaluation
    assert summary["final_checkpoint"] == "step_00000007" and "checkpoint.export=last" in caplog.text
    assert len(checked) == 1 and checked[0][1:] == (10, "warn") and checked[0][0] > 10_000
    assert list((out / "wandb").glob("offline-run-*")), "no W&B run was written"
    client = safe_load(out / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt")
    assert {"layout", "train_state", "data", "numerics", "config", "task"} <= set(client)
    assert client["train_state"]["step"] == 6 and client["train_state"]["rows"] == 48
    assert set(client["task"]) == {"best", "stale", "stopped"}


def test_an_explicit_resume_path_is_verified_before_the_classifier_loads_it(labelled, tmp_path):
    out = tmp_path / "run"
    _classify(_args(labelled, out, "--train.max_steps=4", "--checkpoint.every=2", "--train.eval_every=0"))
    point = out / "checkpoints" / "step_00000002"
    (point / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"resume: checkpoint .*step_00000002 is damaged"):
        _classify(_args(labelled, tmp_path / "again", "--train.max_steps=6", f"--resume={point}"))


def _samples(out: Path, ranks: int) -> list[str]:
    """The global row order: rank r's k-th row is global row r + k * ranks."""
    per_rank = [(out / f"samples.rank{r}.txt").read_text().splitlines() for r in range(ranks)]
    return [rows[k] for k in range(len(per_rank[0])) for rows in per_rank if k < len(rows)]


@pytest.mark.slow
def test_a_classifier_killed_mid_epoch_continues_with_the_uninterrupted_samples(labelled, tmp_path):
    """SIGKILL mid-epoch (after a checkpoint, before the next), then the same command: the documents trained on,
    in order, are those of an uninterrupted run (no replay, nothing skipped), and so are the losses. The same
    command on 2 ranks trains the same global row order."""
    import os
    import signal
    import time

    args = [
        "--train.max_steps=30",
        "--train.eval_every=0",
        "--checkpoint.every=10",
        "--train.log_every=1",
        "--data.log_sample_ids=true",
        "--model.config.hidden_dropout_prob=0.1",
    ]
    straight, broken, two = tmp_path / "straight", tmp_path / "broken", tmp_path / "two"
    launch(_args(labelled, straight, *args), script=CLASSIFY)
    assert len(_samples(straight, 1)) == 30 * 8
    proc = subprocess.Popen(
        [sys.executable, str(CLASSIFY), *_args(labelled, broken, *args)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (broken / "checkpoints" / "step_00000010").is_dir() and len(
            [r for r in metrics(broken) if "train/loss" in r]
        ) >= 14:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    assert len(_samples(broken, 1)) >= 14 * 8  # it had gone past the checkpoint
    again = launch(_args(labelled, broken, *args), script=CLASSIFY)
    assert "resumed from" in again.stdout
    assert _samples(broken, 1) == _samples(straight, 1)
    la, lb = (
        [(r["step"], r["train/loss"]) for r in metrics(out) if "train/loss" in r]
        for out in (straight, broken)
    )
    assert [s for s, _ in lb] == [s for s, _ in la] == list(range(1, 31))
    assert [v for _, v in lb] == pytest.approx([v for _, v in la])
    launch(_args(labelled, two, *args, "--train.micro_batch_size=4"), ranks=2, script=CLASSIFY)
    assert _samples(two, 2) == _samples(straight, 1)


MEASURE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_classifier_memory_stays_flat_on_a_20x_larger_labelled_corpus(tmp_path):
    """The classifier streams: its peak resident memory on a corpus 20 times larger (3,000 -> 60,000 labelled
    documents, counted, trained on and checkpointed the same way) stays within 10% of the small one's. Reading the
    corpus whole, as the classifier once did, grew it by 80%."""
    from dapt.data.corpus import generate

    texts = generate(3000, seed=5)
    peaks = {}
    for n in (3000, 60000):
        path = tmp_path / f"docs{n}.jsonl"
        with path.open("w") as f:
            for i in range(n):
                text = texts[i % len(texts)] + f" #{i}"
                label = "http" if text.split(" ", 1)[0] in ("GET", "POST", "PUT", "DELETE") else "report"
                f.write(json.dumps({"text": text, "label": label}) + "\n")
        out = tmp_path / f"run{n}"
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                MEASURE,
                str(CLASSIFY),
                *_args(
                    path,
                    out,
                    "--train.max_steps=3",
                    "--train.eval_every=0",
                    "--data.valid_fraction=0.05",
                    "--data.valid_max_docs=200",
                    "--data.tokenizer_docs=500",
                ),
            ],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks[n] = int(proc.stdout.split("MAXRSS_KIB")[-1]) / 1024
        assert json.loads((out / "summary.json").read_text())["epoch_rows"] > 0.9 * 0.95 * n
    # measured here: 575 -> 589 MB; the classifier that read its corpus whole went 557 -> 1010 MB
    assert peaks[60000] < 1.1 * peaks[3000], peaks


def test_old_classifier_checkpoints_are_refused_with_a_clear_message(labelled, tmp_path):
    """A checkpoint without the shared client-state layout (dapt 0.1's classifier wrote {step, best, ...}) is not
    continued: the message names it and --resume=never."""
    from dapt.runtime.checkpoint import safe_load, write_manifest

    out = tmp_path / "run"
    _classify(_args(labelled, out, "--train.max_steps=2", "--train.eval_every=0"))
    states = out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    client = safe_load(states)
    old = {k: v for k, v in client.items() if k not in ("layout", "train_state", "data", "task")} | {
        "step": 2
    }
    torch.save(old, states.with_suffix(".new"))  # a new file: the old one is memory-mapped by safe_load
    states.with_suffix(".new").replace(states)
    write_manifest(states.parent)
    with pytest.raises(ValueError, match=r"older dapt .* --resume=never"):
        _classify(_args(labelled, out, "--train.max_steps=4", "--train.rebuild_schedule=true"))


def _two_files(tmp_path: Path, n: int, header: bool = False) -> list[Path]:
    from dapt.data.corpus import generate

    texts = generate(2 * n, seed=3)
    files = []
    for k, name in enumerate(("normal_part.csv", "attack_part.csv")):
        path = tmp_path / name
        rows = [f"{i},{texts[k * n + i].replace(',', ' ')} {name} {i}" for i in range(n)]
        path.write_text(("id,text\n" if header else "") + "\n".join(rows) + "\n")
        files.append(path)
    return files


def test_the_classifiers_validation_split_samples_every_file_and_training_leaves_out_exactly_it(tmp_path):
    """Without data.valid, the validation set is the hash split of the training files, capped at
    data.valid_max_docs by the lowest hashes: both files (labels) are in it whatever their order, and training
    leaves out exactly the documents it holds."""
    normal, attack = _two_files(tmp_path, 300)
    out = tmp_path / "run"
    summary = _classify(
        [
            "--data.train", f"[{normal}, {attack}]", "--data.format=csv", "--data.columns=[text]",
            "--data.column_names=[id, text]", "--classify.label_files={'normal*': normal, 'attack*': attack}",
            "--model.config", TINY, "--model.tokenizer_vocab_size=400", "--data.max_seq_length=48",
            "--output_dir", str(out), "--log.progress=false", "--train.max_steps=2",
            "--data.valid_fraction=0.5", "--data.valid_max_docs=60",
        ]
    )  # fmt: skip
    support = {k: v["support"] for k, v in summary["valid"]["per_class"].items()}
    assert sum(support.values()) == 60 and min(support.values()) >= 15, support
    assert summary["epoch_rows"] == 600 - 60


def test_max_records_per_file_trains_the_first_records_of_each_file(tmp_path):
    """data.max_records_per_file: the first N records of each file (a CSV header is no record), in training as in
    the evaluation sets."""
    normal, attack = _two_files(tmp_path, 40, header=True)
    summary = _classify(
        [
            "--data.train", f"[{normal}, {attack}]", "--data.format=csv", "--data.columns=[text]",
            "--classify.label_files={'normal*': normal, 'attack*': attack}", "--data.max_records_per_file=10",
            "--data.test", f"[{normal}, {attack}]", "--model.config", TINY, "--model.tokenizer_vocab_size=400",
            "--data.max_seq_length=48", "--output_dir", str(tmp_path / "run"), "--log.progress=false",
            "--train.max_steps=2", "--train.micro_batch_size=4", "--data.valid_fraction=0",
        ]
    )  # fmt: skip
    assert summary["epoch_rows"] == 20 and sum(map(sum, summary["test"]["confusion_matrix"])) == 20


def test_a_labelled_corpus_without_usable_records_names_what_was_left_out(labelled, tmp_path):
    bad = tmp_path / "unlabelled.jsonl"
    bad.write_text("".join(json.dumps({"text": f"request {i}"}) + "\n" for i in range(40)))
    with pytest.raises(
        ValueError, match=r"no usable labelled record \(skipped/missing label field 'label' 40\)"
    ):
        _classify(_args(bad, tmp_path / "run", "--train.max_steps=2", "--data.on_error=skip"))


def test_the_classifier_loads_a_pretrained_encoder_partitioned_under_zero3_and_trains(labelled, tmp_path):
    """The one model builder under ZeRO-3: a pretrained folder is loaded into a classifier partitioned (zero.Init,
    the new head included), as MLM runs load theirs, and the run trains and exports a loadable classifier."""
    from transformers import BertConfig, BertForMaskedLM

    from dapt.cli.load import load_config
    from dapt.model.build import build_model, train_wordpiece
    from dapt.runtime import group
    from dapt.runtime.runner import parameter_count

    texts = [json.loads(line)["text"] for line in labelled.read_text().splitlines()]
    tok = train_wordpiece(texts, 400, 48)
    src = tmp_path / "pretrained"
    fields = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    BertForMaskedLM(BertConfig(**fields, vocab_size=len(tok))).save_pretrained(src)
    tok.save_pretrained(src)
    zero3 = str(ROOT / "ds_configs" / "zero3_bf16.json")
    argv = ["--model.name_or_path", str(src), "--data.train", str(labelled), "--data.format=jsonl"]
    argv += ["--ds", zero3, "--data.max_seq_length=48", "--train.micro_batch_size=8", "--log.progress=false"]
    cfg = load_config([*argv, "--output_dir", str(tmp_path / "build")], world_size=1, accelerator="cpu")
    group.init()
    model = build_model(
        cfg, tok, cfg.train.precision, cfg.ds_config, task="classify", labels=["http", "report"]
    )
    assert all(p.numel() == 0 for p in model.parameters())  # really partitioned, the head too
    assert parameter_count(model) > 0 and model.config.id2label == {0: "http", 1: "report"}
    out = tmp_path / "run"
    summary = _classify(
        [*argv, "--output_dir", str(out), "--train.max_steps=3", "--train.eval_every=0", "--train.lr=1e-12"]
    )
    assert summary["steps"] == 3
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").config.num_labels == 2
    # at a learning rate too small to move an fp32 weight, the encoder in final/ is the folder's, exactly as saved
    from safetensors.torch import load_file

    saved, final = load_file(src / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    encoder = [k for k in saved if k.startswith("bert.") and "pooler" not in k]
    assert len(encoder) > 20 and all((final[k] - saved[k]).abs().max() < 1e-9 for k in encoder)


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl_once_each_after_a_resume(recipe, tmp_path):
    """log.tensorboard=true: the event files, read back with TensorBoard's own reader, hold every numeric metric of
    metrics.jsonl at its step. A rerun from the step-3 checkpoint logs steps 4-6 again; the new event file's purge
    step hides the first run's, so each step is there once, as in metrics.jsonl."""
    from conftest import run_inprocess
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [
        "--recipe",
        recipe,
        "--output_dir",
        out,
        "--log.tensorboard=true",
        "--model.config.hidden_dropout_prob=0.1",
    ]
    run_inprocess(args)
    run_inprocess([*args, f"--resume={out / 'checkpoints' / 'step_00000003'}"])
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in metrics(out):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                expected.setdefault(key, []).append((record["step"], float(value)))
    assert {"train/loss", "eval/loss", "eval/accuracy", "train/learning_rate"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key  # once each, in order
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    from dapt.cli.load import load_config
    from dapt.config.schema import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(
        ConfigError,
        match=r'log.tensorboard=true needs the tensorboard package: pip install "dapt\[tensorboard\]"',
    ):
        load_config(["--log.tensorboard=true"], world_size=1)
