"""One-rank runs inside the test process: the real DeepSpeed engine on CPU, tiny models built from configs."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import DS, TINY_MODEL, metrics, run_inprocess, series
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, pipeline

from dapt.cli.load import load_config
from dapt.config.schema import ConfigError
from dapt.data.masking import IGNORE
from dapt.model.build import train_wordpiece
from dapt.runtime.runner import param_groups
from dapt.runtime.schedule import lr_factor

SHIPPED = sorted(p.name for p in DS.glob("*.json"))


def _fp16_on_cpu() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_ds_config_trains_or_refuses_clearly(name, recipe, tmp_path):
    out = tmp_path / "run"
    argv = [
        "--recipe",
        recipe,
        "--ds",
        DS / name,
        "--output_dir",
        out,
        "--train.max_steps=3",
        "--checkpoint.every=0",
        "--train.eval_every=0",
    ]
    if "fp16" in name and not _fp16_on_cpu():
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            load_config([str(a) for a in argv], world_size=1, accelerator="cpu")
        return
    summary = run_inprocess(argv)
    losses = [v for _, v in series(out, "train/loss")]
    assert summary["steps"] == 3 and len(losses) == 3 and all(math.isfinite(v) for v in losses)
    resolved = (out / "config.resolved.yaml").read_text()
    assert "auto" not in resolved.split("deepspeed:", 1)[1]
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("packing", ["pad", "packed"])
def test_other_packings_train_and_report_efficiency(packing, recipe, tmp_path, corpus_file):
    # Short documents of mixed length (3-20 words), where padding wastes slots and best-fit packing does not.
    rng = random.Random(0)
    words = corpus_file.read_text().split()
    short = tmp_path / "short.txt"
    short.write_text("\n".join(" ".join(rng.sample(words, rng.randint(3, 20))) for _ in range(3000)) + "\n")
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            f"--data.packing={packing}",
            "--data.train",
            short,
            "--train.max_steps=12",
            "--checkpoint.every=0",
            "--train.eval_every=6",
            "--data.block_docs=256",
        ]
    )
    losses = [v for _, v in series(out, "train/loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (
        (summary["packing_efficiency"] > 0.9)
        if packing == "packed"
        else (summary["packing_efficiency"] < 0.8)
    )


def test_run_lowers_loss_and_writes_everything(recipe, tmp_path):
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--ds",
            DS / "zero2_bf16.json",
            "--output_dir",
            out,
            "--train.max_steps=40",
            "--train.eval_every=20",
            "--checkpoint.every=20",
            "--train.precision=bf16",
        ]
    )
    losses = [v for _, v in series(out, "train/loss")]
    evals = [v for _, v in series(out, "eval/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert evals[-1] < evals[0]
    assert series(out, "eval/perplexity")[-1][1] == pytest.approx(math.exp(evals[-1]), rel=1e-6)
    record = next(r for r in metrics(out) if "train/loss" in r)
    for key in (
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/samples_per_second",
        "train/epoch",
        "train/perplexity",
        "train/peak_memory_gb",
    ):
        assert key in record and math.isfinite(record[key]), key
    for name in ("loss.png", "learning_rate.png", "perplexity.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert (
        index["latest"]
        and index["best"]["score"] == pytest.approx(min(evals))
        and index["best"]["metric"] == "loss"
    )
    # concat rows are full except the last of each block, so nearly every token position holds a real token
    assert 0.9 * 40 * 8 * 32 < summary["tokens_seen"] <= 40 * 8 * 32
    assert summary["packing_efficiency"] == pytest.approx(summary["tokens_seen"] / (40 * 8 * 32), rel=1e-9)
    assert summary["best_eval_loss"] == pytest.approx(min(evals))
    assert [r for r in metrics(out) if "train/loss" in r][-1]["train/packing_efficiency"] > 0.9
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


def test_final_folder_reloads_and_fills_a_mask(recipe, tmp_path):
    out = tmp_path / "run"
    run_inprocess(
        [
            "--recipe",
            recipe,
            "--ds",
            DS / "zero3_bf16.json",
            "--output_dir",
            out,
            "--train.max_steps=30",
            "--train.precision=bf16",
        ]
    )
    losses = [v for _, v in series(out, "train/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert all(p.numel() > 0 for p in model.state_dict().values())
    preds = pipeline("fill-mask", model=model, tokenizer=tok)(
        f"the attacker used a sql {tok.mask_token} to gain"
    )
    assert len(preds) == 5 and all(0 <= p["score"] <= 1 for p in preds)
    # The trained weights predict the corpus better than a fresh model of the same shape.
    batch = tok(
        ["the attacker exploited the login form to steal session cookies on the payment server ."],
        return_tensors="pt",
    )
    labels = batch["input_ids"].clone()
    fresh = AutoModelForMaskedLM.from_config(model.config)
    with torch.no_grad():
        assert model(**batch, labels=labels).loss < fresh(**batch, labels=labels).loss


def test_pretrained_folder_under_zero3_with_gradient_checkpointing(tmp_path, corpus_file):
    """A local pretrained folder loads partitioned (zero.Init) and trains with HF gradient checkpointing; at a
    learning rate too small to move an fp32 weight, final/ holds the folder's own weights: loaded, not initialised
    afresh, and not rounded to bf16 on the way into the fp32 masters."""
    from safetensors.torch import load_file

    texts = corpus_file.read_text().splitlines()
    tok = train_wordpiece(texts, 400, 32)
    src = tmp_path / "pretrained"
    config = BertConfig(**{k: v for k, v in TINY_MODEL.items() if k != "model_type"}, vocab_size=len(tok))
    BertForMaskedLM(config).save_pretrained(src)
    tok.save_pretrained(src)
    saved = load_file(src / "model.safetensors")
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--model.name_or_path",
            src,
            "--data.train",
            corpus_file,
            "--output_dir",
            out,
            "--ds",
            DS / "zero3_bf16.json",
            "--train.precision=bf16",
            "--model.gradient_checkpointing=true",
            "--data.max_seq_length=32",
            "--train.max_steps=4",
            "--train.micro_batch_size=4",
            "--train.lr=1e-12",
            "--log.progress=false",
        ]
    )
    assert summary["steps"] == 4
    reloaded = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert reloaded.config.vocab_size == len(tok)
    final = load_file(out / "final" / "model.safetensors")
    for name, weight in saved.items():  # 4 Adam steps of 1e-12 move a weight by about 4e-12
        assert (final[name] - weight).abs().max() < 1e-9, name


def test_learning_rate_schedule_counts_optimizer_steps(recipe, tmp_path):
    out = tmp_path / "run"
    run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--train.max_steps=8",
            "--train.grad_accum=3",
            "--train.micro_batch_size=2",
            "--train.warmup_steps=3",
            "--train.lr_schedule=cosine",
            "--train.lr=0.01",
        ]
    )
    logged = dict(series(out, "train/learning_rate"))
    for step in range(1, 9):  # the lr logged after optimizer step s is the one the next step will use
        expected = 0.01 * lr_factor(step, kind="cosine", warmup=3, total=8, decay_ratio=0.2, min_ratio=0.0)
        assert logged[step] == pytest.approx(expected, abs=1e-9), step


@pytest.mark.parametrize("kind", ["linear", "cosine", "wsd", "constant"])
def test_schedule_shapes(kind):
    f = [lr_factor(s, kind=kind, warmup=10, total=100, decay_ratio=0.2, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert max(f) == pytest.approx(1.0)
    if kind == "constant":
        assert f[-1] == 1.0
    elif kind == "wsd":
        assert (
            f[50] == 1.0 and f[79] == 1.0 and f[81] < 1.0 and f[-1] < 0.2
        )  # stable, then the last 20% decays
    else:
        assert f[50] < 1.0 and f[-1] < 0.2 and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_no_weight_decay_on_biases_and_norms():
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    decay, plain = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert all("bias" in names[id(p)] or "LayerNorm" in names[id(p)] for p in plain["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in plain["params"])
    assert all(p.ndim == 2 for p in decay["params"])


def test_wandb_offline_gets_seed_metric_names(recipe, tmp_path, monkeypatch):
    # No WANDB_MODE and no credentials: dapt must choose offline itself rather than prompt for a login.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--log.wandb=true",
            "--train.max_steps=3",
            "--train.eval_every=3",
        ]
    )
    monkeypatch.delenv("WANDB_MODE", raising=False)  # dapt set it for this process; do not leak it
    import time

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    names = (
        b"train/loss",
        b"train/perplexity",
        b"train/tokens_per_second",
        b"train/learning_rate",
        b"eval/loss",
        b"eval/perplexity",
    )
    # wandb's own service process writes the file; under a loaded CI it was seen to hold only its header just after
    # finish() returned, so the names get up to a minute to arrive
    for _ in range(60):
        data = runs[0].read_bytes()
        if all(name in data for name in names):
            break
        time.sleep(1)
    for name in names:
        assert name in data, name


def _run_logged(argv: list, caplog) -> None:
    """One in-process MLM run with dapt's info log captured by caplog."""
    import logging

    from dapt.runtime.group import setup_logging
    from dapt.tasks.mlm import run

    cfg = load_config([str(a) for a in argv], world_size=1, accelerator="cpu")
    setup_logging("info")
    logging.getLogger("dapt").addHandler(caplog.handler)
    try:
        run(cfg)
    finally:
        logging.getLogger("dapt").removeHandler(caplog.handler)


def test_log_states_batch_arithmetic_and_choices(recipe, tmp_path, caplog):
    _run_logged(
        [
            "--recipe",
            recipe,
            "--output_dir",
            tmp_path / "r",
            "--train.max_steps=2",
            "--train.grad_accum=2",
            "--train.micro_batch_size=4",
        ],
        caplog,
    )
    text = caplog.text
    assert "global batch = micro x accumulation x world size = 4 x 2 x 1 = 8" in text
    assert "attention implementation: sdpa" in text
    assert "optimizer torch.optim.AdamW (fused)" in text


def test_retention_keeps_last_k_plus_best_and_resume_from_a_path(recipe, tmp_path):
    out = tmp_path / "run"
    args = [
        "--recipe",
        recipe,
        "--output_dir",
        out,
        "--train.max_steps=12",
        "--checkpoint.every=2",
        "--checkpoint.keep=2",
        "--train.eval_every=2",
        "--train.lr=0.05",
    ]  # a high lr: eval loss is not monotone
    run_inprocess(args)
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    evals = dict(series(out, "eval/loss"))
    best_step = min(evals, key=evals.get)
    on_disk = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    expected = sorted({"step_00000010", "step_00000012", f"step_{best_step:08d}"})
    assert on_disk == expected == sorted(index["saved"])
    assert index["best"]["tag"] == f"step_{best_step:08d}" and index["latest"] == "step_00000012"
    first = series(out, "train/loss")
    # Resume from an explicit checkpoint folder: the history after it is cut back and replayed identically.
    run_inprocess(args + ["--resume", out / "checkpoints" / "step_00000010"])
    again = series(out, "train/loss")
    assert [s for s, _ in again] == [s for s, _ in first] == list(range(1, 13))
    assert [v for _, v in again] == pytest.approx([v for _, v in first], rel=1e-6)


def test_skipped_records_are_counted_in_metrics_and_summary(recipe, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [
        json.dumps({"text": f"the attacker used a weak password number {i} on the vpn"}) for i in range(400)
    ]
    data.write_text(
        "\n".join(good[:200] + ["{broken json", json.dumps({"body": "no text field"})] + good[200:])
    )
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--data.train",
            data,
            "--data.format=jsonl",
            "--data.on_error=skip",
            "--train.max_steps=2",
            "--train.micro_batch_size=4",
        ]
    )
    assert summary["skipped_records"] == {"skipped/malformed JSON": 1, "skipped/missing field 'text'": 1}
    last = [r for r in metrics(out) if "train/loss" in r][-1]
    assert last["data/skipped/malformed JSON"] == 1 and last["data/skipped/missing field 'text'"] == 1


def test_whole_word_masking_trains(recipe, tmp_path):
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--masking.whole_word=true",
            "--data.packing=pad",
            "--train.max_steps=8",
            "--checkpoint.every=0",
        ]
    )
    losses = [v for _, v in series(out, "train/loss")]
    assert summary["steps"] == 8 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, recipe, tmp_path, capsys):
    from dapt.runtime.checkpoint import verify

    out = tmp_path / "run"
    args = [
        "--recipe",
        recipe,
        "--output_dir",
        out,
        "--train.max_steps=9",
        "--checkpoint.every=3",
        "--checkpoint.keep=3",
        "--train.eval_every=0",
    ]
    run_inprocess(args)
    first = dict(series(out, "train/loss"))
    latest = out / "checkpoints" / "step_00000009"
    victim = max((p for p in latest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    assert verify(latest) is not None and verify(out / "checkpoints" / "step_00000006") is None
    capsys.readouterr()
    run_inprocess(args)  # resume=auto: step 9 is damaged, step 6 is used
    assert "step_00000009 is damaged" in capsys.readouterr().out
    again = dict(series(out, "train/loss"))
    assert sorted(again) == list(range(1, 10))  # steps 7-9 retrained once each, cut back in metrics.jsonl
    assert [again[s] for s in range(7, 10)] == pytest.approx([first[s] for s in range(7, 10)], rel=1e-6)


def test_unreadable_index_is_rebuilt_from_the_folders(recipe, tmp_path):
    from dapt.runtime.checkpoint import Checkpointer

    out = tmp_path / "run"
    run_inprocess(["--recipe", recipe, "--output_dir", out, "--train.max_steps=6", "--checkpoint.every=3"])
    (out / "checkpoints" / "index.json").write_text('{"latest": "step_0000')  # cut mid-write
    assert Checkpointer(out / "checkpoints", keep=2).latest_complete().name == "step_00000006"


def test_disk_check_refuses_or_warns_when_checkpoints_cannot_fit(tmp_path, caplog):
    import shutil

    from dapt.runtime.checkpoint import check_disk, expected_bytes

    free = shutil.disk_usage(tmp_path).free
    too_many = free // expected_bytes(1, "bf16") + 1  # parameters whose one checkpoint exceeds the free disk
    with pytest.raises(ValueError, match="checkpoint.keep"):
        check_disk(tmp_path / "ckpt", too_many, "bf16", keep=2, mode="refuse")
    check_disk(tmp_path / "ckpt", too_many, "bf16", keep=2, mode="off")
    check_disk(tmp_path / "ckpt", 1000, "bf16", keep=2, mode="refuse")  # small: fits
    import logging

    logging.getLogger("dapt").addHandler(caplog.handler)
    try:
        check_disk(tmp_path / "ckpt", too_many, "bf16", keep=2, mode="warn")
    finally:
        logging.getLogger("dapt").removeHandler(caplog.handler)
    assert "GiB" in caplog.text


@pytest.mark.parametrize(
    "ds, precision, low, high", [("zero2_bf16.json", "bf16", 0.98, 1.03), (None, "fp32", 0.72, 0.80)]
)
def test_real_checkpoint_size_against_the_estimate(ds, precision, low, high, corpus_file, tmp_path):
    """The disk check's estimate per checkpoint: fp32 masters and two Adam moments (12 bytes a parameter) plus the
    module's weights. Exact for bf16 (14 bytes); an upper bound at ZeRO-0 fp32, where the module's weights are the
    masters (12 of 16 bytes). A model of ~0.9M parameters, so that metadata does not hide an error of the estimate."""
    from dapt.runtime.checkpoint import expected_bytes

    out = tmp_path / "run"
    model = (
        "{model_type: bert, hidden_size: 128, num_hidden_layers: 4, num_attention_heads: 2, intermediate_size: "
        "512, max_position_embeddings: 64}"
    )
    run_inprocess(
        [
            "--data.train",
            corpus_file,
            "--model.config",
            model,
            "--model.tokenizer_vocab_size=400",
            "--data.max_seq_length=32",
            "--output_dir",
            out,
            "--train.max_steps=2",
            "--checkpoint.every=2",
            "--train.micro_batch_size=4",
            "--log.progress=false",
        ]
        + (["--ds", DS / ds] if ds else [])
    )
    folder = out / "checkpoints" / "step_00000002"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    params = sum(t.numel() for t in AutoModelForMaskedLM.from_pretrained(out / "final").parameters())
    assert params > 800_000
    assert low <= size / expected_bytes(params, precision) <= high, (size, expected_bytes(params, precision))


@pytest.mark.parametrize("packing", ["concat", "packed"])
def test_a_compiled_model_trains_like_the_eager_one(packing, recipe, tmp_path, caplog):
    """train.compile goes through DeepSpeed's engine.compile; aot_eager (no C compiler needed) traces the same math,
    so the losses match the eager run; packed rows add per-document attention masks and varying shapes."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    losses = {}
    torch._dynamo.reset()  # compiled code of an earlier test would be reused, and count nothing
    counters.clear()
    for mode in ("off", "aot_eager"):
        out = tmp_path / mode
        _run_logged(
            [
                "--recipe",
                recipe,
                "--output_dir",
                out,
                "--train.max_steps=4",
                f"--data.packing={packing}",
                f"--train.compile={mode}",
            ],
            caplog,
        )
        losses[mode] = [v for _, v in series(out, "train/loss")]
    assert "model compiled with torch.compile, backend aot_eager" in caplog.text
    # the sparse MLM head (the default) selects the masked positions, a count the data decides: traced, not a break
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(losses["off"]) == 4 and losses["aot_eager"] == pytest.approx(losses["off"], rel=1e-4)


def test_whole_word_masking_reaches_the_training_batches(recipe, tmp_path):
    """masking.whole_word=true: in the micro-batches the run really trains on (recorded through the MLM task's own
    micro_batches, under dapt.runtime.train), no word is partly masked, and multi-token words are masked whole; the
    same run without it masks parts of words (so the check can tell)."""
    from dapt.cli.load import load_config
    from dapt.runtime.train import train
    from dapt.tasks.mlm import MaskedLM

    class Recorded(MaskedLM):
        def micro_batches(self, rows):
            batches = super().micro_batches(rows)
            self.seen += [(part, b) for part, b in zip(rows, batches)]
            return batches

    def partly_and_wholly_masked(whole: bool) -> tuple[int, int]:
        out = tmp_path / f"whole_{whole}"
        argv = [f"--recipe={recipe}", f"--output_dir={out}", f"--masking.whole_word={str(whole).lower()}"]
        task = Recorded()
        task.seen = []
        train(load_config(argv, world_size=1, accelerator="cpu"), task)
        partly = wholly = 0
        for part, batch in task.seen:
            for r, (_, row) in enumerate(part):
                masked = (batch["labels"][r, : len(row.ids)] != IGNORE).numpy()
                # words by the WordPiece markers, whatever the packing recorded: a "##" piece continues a word
                # (a special token is no part of a word: a row may start inside one, [CLS] ##i ##t)
                tokens = task.tokenizer.convert_ids_to_tokens(list(row.ids))
                special = np.array([t in task.tokenizer.all_special_tokens for t in tokens])
                word = np.cumsum([not t.startswith("##") for t in tokens]) - 1
                for w in np.unique(word[masked]):
                    chosen = masked[(word == w) & ~special]
                    partly += not chosen.all()
                    wholly += chosen.all() and len(chosen) > 1
        return partly, wholly

    partly, wholly = partly_and_wholly_masked(True)
    assert partly == 0 and wholly > 20, (partly, wholly)
    partly, _ = partly_and_wholly_masked(False)
    assert partly > 20, "without whole-word masking parts of words are masked: the check above can tell"


def test_a_run_leaves_its_loaded_config_as_it_was(recipe, corpus_file, tmp_path):
    """The loaded config is read-only (a section's field cannot be set) and a run changes nothing in it, the DeepSpeed
    config included: the engine's config, with its "auto" values filled, is the run's own. The run's counters and
    evaluations: micro-steps are accumulation x steps, the last step is evaluated though eval_every (3) does not
    divide it, and the test set gets masks of its own (the same rows as validation, another loss)."""
    import copy

    from dapt.config.dsconfig import AUTO
    from dapt.tasks.mlm import run

    argv = [f"--recipe={recipe}", f"--output_dir={tmp_path}", "--ds", str(DS / "zero2_bf16.json")]
    argv += [
        "--train.max_steps=2",
        "--train.grad_accum=2",
        f"--data.valid={corpus_file}",
        f"--data.test={corpus_file}",
    ]
    cfg = load_config(argv, world_size=1, accelerator="cpu")
    with pytest.raises(AttributeError, match="read-only"):
        cfg.train.lr = 1.0
    with pytest.raises(AttributeError, match="read-only"):
        cfg.seed = 3
    before, ds_before = copy.deepcopy(cfg.to_dict()), copy.deepcopy(cfg.ds_config)
    assert ds_before["zero_optimization"]["reduce_bucket_size"] == AUTO  # filled for the engine, not here
    summary = run(cfg)
    assert cfg.to_dict() == before and cfg.ds_config == ds_before
    assert summary["steps"] == 2 and summary["micro_steps"] == 4
    (last,) = [r for r in metrics(tmp_path) if "eval/loss" in r]
    assert last["step"] == 2 and summary["test_loss"] != last["eval/loss"]


def test_a_checkpoint_between_two_log_lines_counts_every_step(recipe, tmp_path):
    """Tokens and samples seen are counted into a checkpoint at every save, not only at log lines: a run stopped at
    a checkpoint between two of them (a signal) resumes with all it trained counted."""
    from dapt.runtime.checkpoint import safe_load

    summary = run_inprocess(
        [f"--recipe={recipe}", f"--output_dir={tmp_path}", "--train.log_every=5", "--checkpoint.every=3"]
        + ["--checkpoint.keep=3", "--train.eval_every=0"]
    )
    state = safe_load(tmp_path / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")[
        "train_state"
    ]
    assert state["step"] == 3 and state["samples_seen"] == state["rows"] == 24 and state["tokens_seen"] > 0
    assert summary["samples_seen"] == summary["rows_trained"] == 48
