"""Classifier fine-tuning: loss arithmetic, parameter groups, stopping rules, metrics, end-to-end runs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, metrics, shared_slice
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from dapt.config.schema import ClassifyConfig
from dapt.runtime.evaluation import classification_metrics
from dapt.tasks.classify import (
    class_weights,
    classifier_groups,
    collapse,
    loss_sum,
    weight_of,
)

SHARED = ROOT.parent / "shared" / "data"
TINY = (
    "{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
    "max_position_embeddings: 64}"
)


def test_weighted_smoothed_loss_matches_the_hand_computed_value_over_any_split():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(12, 3, generator=g), torch.tensor([0, 1, 2, 2, 2, 1, 0, 2, 2, 2, 1, 2])
    w, eps, k = torch.tensor([2.0, 1.5, 0.5]), 0.1, 3
    logp = torch.log_softmax(logits, -1)
    # by hand, PyTorch's definition: (1-eps) w_y (-log p_y) + eps/K sum_k w_k (-log p_k), over the sum of w_y
    per = (1 - eps) * w[y] * -logp[torch.arange(12), y] + eps / k * (w * -logp).sum(-1)
    expected = float(per.sum() / w[y].sum())
    for parts in ([12], [6, 6], [3, 3, 3, 3], [5, 7]):  # micro-batches of one optimizer step
        chunks = torch.split(torch.arange(12), parts)
        total_weight = sum(weight_of(y[c], w) for c in chunks)
        got = sum(float(loss_sum(logits[c], y[c], w, eps)) for c in chunks) / total_weight
        assert got == pytest.approx(expected, rel=1e-6)


def test_inverse_class_weights():
    """Weights from the counting pass's rows per label."""
    w = class_weights("inverse", [90, 10], 2)
    assert float(w[1] / w[0]) == pytest.approx(9.0) and float(w.mean()) == pytest.approx(1.0)
    root = class_weights("sqrt_inverse", [900, 9, 0], 3)  # 100 times rarer: 10 times the weight; no rows: 0
    assert (
        float(root[1] / root[0]) == pytest.approx(10.0)
        and root[2] == 0
        and float(root[:2].mean()) == pytest.approx(1)
    )
    assert class_weights("none", [1, 1], 2) is None
    assert class_weights("1, 3", [1, 1], 2).tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="2 labels"):
        class_weights("1,2,3", [1, 1], 2)


def test_head_learning_rate_and_weight_decay_groups():
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )
    body_decay, body_plain, head = classifier_groups(model, 1e-4, 0.01, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in head["params"]} == {"classifier.weight", "classifier.bias"}
    assert head["lr"] == pytest.approx(1e-3) and head["weight_decay"] == 0.0
    assert body_decay["weight_decay"] == 0.01 and all(p.ndim == 2 for p in body_decay["params"])
    assert body_plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in body_plain["params"])
    assert len(head["params"]) + len(body_decay["params"]) + len(body_plain["params"]) == len(
        list(model.parameters())
    )


def test_metrics_match_hand_counts():
    y = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 1]]  # predictions 0 0 1 1 1 1
    r = classification_metrics(y, probs, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert r["per_class"]["a"] == {
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert r["per_class"]["b"]["precision"] == pytest.approx(0.5) and r["per_class"]["c"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    assert r["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 2 / 3) / 6)
    binary = classification_metrics(
        np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]]), ["neg", "pos"]
    )
    assert binary["roc_auc"] == pytest.approx(1.0) and binary["pr_auc"] == pytest.approx(1.0)


def test_collapse_detection_and_early_stopping():
    from dapt.tasks.classify import _should_stop

    y = np.array([0] * 50 + [1] * 40 + [2] * 10 + [3] * 2)
    collapsed = classification_metrics(y, np.eye(4)[[0] * 62 + [1] * 40], ["a", "b", "c", "d"])
    rare_case = classification_metrics(y, np.eye(4)[[0] * 50 + [1] * 51 + [2]], ["a", "b", "c", "d"])
    # "d" (2 examples) is never predicted either, but too rare to say anything about collapse
    assert collapse(collapsed, 0.2) == ([], ["c"]) and collapse(rare_case, 0.2) == (["c"], [])
    c = ClassifyConfig(patience=2)
    assert "collapse" in _should_stop(c, collapsed, stale=0, done=10, steps_per_epoch=5)
    assert _should_stop(c, collapsed, stale=0, done=3, steps_per_epoch=5) is None  # not before one epoch
    assert _should_stop(c, rare_case, stale=1, done=10, steps_per_epoch=5) is None
    assert "early stopping" in _should_stop(c, rare_case, stale=2, done=10, steps_per_epoch=5)


@pytest.fixture(scope="module")
def labelled_jsonl(tmp_path_factory):
    """Two classes that a tiny model separates: HTTP requests vs threat-report sentences (the default corpus)."""
    from dapt.data.corpus import generate

    path = tmp_path_factory.mktemp("cls") / "docs.jsonl"
    rows = [
        {"text": t, "label": "http" if t.split(" ", 1)[0] in ("GET", "POST", "PUT", "DELETE") else "report"}
        for t in generate(1600, seed=11)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_classify_end_to_end_binary(labelled_jsonl, tmp_path):
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    out = tmp_path / "run"
    cfg = load_config(
        [
            "--data.train",
            str(labelled_jsonl),
            "--data.test",
            str(labelled_jsonl),
            "--data.format=jsonl",
            "--model.config",
            TINY,
            "--model.tokenizer_vocab_size=400",
            "--data.max_seq_length=48",
            "--output_dir",
            str(out),
            "--train.max_steps=40",
            "--train.eval_every=10",
            "--train.lr=2e-3",
            "--classify.head_lr_mult=5",
            "--classify.class_weights=inverse",
            "--classify.label_smoothing=0.05",
            "--log.progress=false",
        ],
        world_size=1,
        accelerator="cpu",
    )
    summary = run(cfg)
    result = json.loads((out / "eval_test.json").read_text())
    assert result["accuracy"] > 0.95 and "roc_auc" in result and "pr_auc" in result
    assert (
        summary["best_checkpoint"].startswith("step_") and (out / "plots" / "confusion_matrix.png").exists()
    )
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "http", 1: "report"}
    assert json.loads((out / "final" / "label_mapping.json").read_text())["label2id"] == {
        "http": 0,
        "report": 1,
    }
    _test_set_used_the_best_weights(out, summary, model)
    # the best is the highest validation score of the run (ties: the earliest), and eval_valid.json is its evaluation
    evals = [r for r in metrics(out) if f"eval/{summary['metric']}" in r]
    best = max(r[f"eval/{summary['metric']}"] for r in evals)
    assert summary["best_metric"] == best
    assert summary["final_step"] == min(r["step"] for r in evals if r[f"eval/{summary['metric']}"] == best)
    assert json.loads((out / "eval_valid.json").read_text())["step"] == summary["final_step"]


def test_patience_stops_early_evaluating_every_epoch_and_the_stop_is_saved(labelled_jsonl, tmp_path):
    """train.eval_every=0: an evaluation every epoch (80 rows, 8 a step: 10 steps). At an lr that changes nothing the
    score never improves on the first, so classify.patience=2 stops the run at the third evaluation; the stop is
    saved as a checkpoint although checkpoint.every=0 and only the last is exported."""
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    small = tmp_path / "small.jsonl"
    small.write_text("".join(labelled_jsonl.read_text().splitlines(keepends=True)[:80]))
    out = tmp_path / "run"
    argv = ["--data.train", small, "--data.valid", small, "--data.format=jsonl", "--model.config", TINY]
    argv += ["--model.tokenizer_vocab_size=400", "--data.max_seq_length=32", "--output_dir", out]
    argv += ["--train.max_steps=60", "--train.micro_batch_size=8", "--train.grad_accum=1", "--train.lr=1e-12"]
    argv += [
        "--train.eval_every=0",
        "--classify.patience=2",
        "--classify.collapse_stop=false",
        "--checkpoint.every=0",
    ]
    argv += ["--checkpoint.export=last", "--log.progress=false"]
    summary = run(load_config([str(a) for a in argv], world_size=1, accelerator="cpu"))
    assert [r["step"] for r in metrics(out) if "eval/macro_f1" in r] == [10, 20, 30]
    assert summary["steps"] == 30 and "early stopping" in summary["stopped"], summary
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert index["steps"][index["latest"]] == 30 and summary["final_step"] == 30


def _test_set_used_the_best_weights(out, summary, model):
    """The test set is evaluated with the best checkpoint's weights, not the last step's: the best (ties keep the
    earliest) is not the latest here, final/ holds the best's weights, and the test predictions written are those of
    final/, recomputed here example by example."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from dapt.data.packing import pack
    from dapt.runtime.checkpoint import safe_load

    best, latest = (
        summary["best_checkpoint"],
        json.loads((out / "checkpoints" / "index.json").read_text())["latest"],
    )
    assert best != latest, (
        "this run's best checkpoint is its latest: the checks below would not tell them apart"
    )
    final = load_file(out / "final" / "model.safetensors")
    weights = {
        tag: safe_load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt")["module"]
        for tag in (best, latest)
    }
    assert all(torch.equal(final[k], weights[best][k]) for k in final)
    assert any(not torch.equal(final[k], weights[latest][k]) for k in final)
    assert summary["test_checkpoint"] == best  # the test set saw final/'s weights, and says whose
    rows = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == sum(map(sum, summary["test"]["confusion_matrix"]))
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    model.eval()
    files: dict[str, list[str]] = {}
    for r in rows[:40]:
        path, line = r["id"].rsplit(":", 1)
        text = json.loads(files.setdefault(path, Path(path).read_text().splitlines())[int(line) - 1])["text"]
        ids = pack("pad", tokenizer, [text], [r["id"]], 48)[0].ids
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=torch.as_tensor(ids)[None]).logits.float(), -1)[0]
        assert probs.tolist() == pytest.approx(
            [r["probabilities"][k] for k in ("http", "report")], abs=1e-5
        ), r


def test_unseen_test_label_is_a_clear_error_or_a_counted_skip(labelled_jsonl, tmp_path):
    test = tmp_path / "test.jsonl"
    test.write_text(
        labelled_jsonl.read_text() + json.dumps({"text": "something new", "label": "novel"}) + "\n"
    )
    args = [
        "--data.train",
        labelled_jsonl,
        "--data.test",
        test,
        "--data.format=jsonl",
        "--model.config",
        TINY,
        "--model.tokenizer_vocab_size=400",
        "--train.max_steps=2",
        "--log.progress=false",
    ]
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    with pytest.raises(ValueError, match=r"test.jsonl:1601: label 'novel' in the test set was never seen"):
        run(
            load_config(
                [str(a) for a in args + ["--output_dir", tmp_path / "a"]], world_size=1, accelerator="cpu"
            )
        )
    summary = run(
        load_config(
            [str(a) for a in args + ["--output_dir", tmp_path / "b", "--classify.unseen=skip"]],
            world_size=1,
            accelerator="cpu",
        )
    )
    assert (
        summary["eval_skipped_records"] == {"unseen label in test: novel": 1}
        and summary["skipped_records"] == {}
    )


def test_seeds_give_mean_and_std(labelled_jsonl, tmp_path):
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    cfg = load_config(
        [
            str(a)
            for a in [
                "--data.train",
                labelled_jsonl,
                "--data.test",
                labelled_jsonl,
                "--data.format=jsonl",
                "--model.config",
                TINY,
                "--model.tokenizer_vocab_size=400",
                "--train.max_steps=6",
                "--classify.seeds=[1, 2]",
                "--output_dir",
                tmp_path / "s",
                "--log.progress=false",
            ]
        ],
        world_size=1,
        accelerator="cpu",
    )
    result = run(cfg)
    table = json.loads((tmp_path / "s" / "seeds_summary.json").read_text())["test"]
    values = table["accuracy"]["values"]
    assert len(values) == 2 and table["accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert table["accuracy"]["std"] == pytest.approx(np.std(values)) and math.isfinite(
        result["test"]["macro_f1"]["mean"]
    )
    assert (tmp_path / "s" / "seed_1" / "eval_test.json").exists() and (
        tmp_path / "s" / "seeds_summary.md"
    ).exists()


def kdd_field_names() -> list[str]:
    """NSL-KDD's 41 feature names, from Field_Names.csv."""
    text = gzip.open(SHARED / "nsl_kdd" / "Field_Names.csv.gz", "rt").read()
    return [line.split(",")[0] for line in text.split()]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_nsl_kdd_multiclass_slice(tmp_path):
    names = kdd_field_names()
    train = shared_slice(SHARED / "nsl_kdd" / "KDDTrain+_20Percent.txt.gz", tmp_path / "train.csv", 3000)
    test = shared_slice(SHARED / "nsl_kdd" / "KDDTest+.txt.gz", tmp_path / "test.csv", 1000)
    out = tmp_path / "kdd"
    summary = run_inprocess_classify(
        [
            "--data.train",
            train,
            "--data.test",
            test,
            "--data.format=csv",
            f"--data.column_names=[{','.join(names)},label,difficulty]",
            "--data.columns=[protocol_type,service,flag,src_bytes,dst_bytes,count,srv_count,serror_rate]",
            "--data.round_digits=2",
            "--classify.unseen=skip",
            "--data.max_seq_length=48",  # the default tiny BERT
            "--train.max_steps=150",
            "--train.micro_batch_size=32",
            "--train.lr=1e-3",
            "--classify.head_lr_mult=10",
            "--train.eval_every=50",
            "--output_dir",
            out,
        ]
    )
    result = json.loads((out / "eval_test.json").read_text())
    assert result["accuracy"] > 0.6 and "normal" in result["per_class"] and "neptune" in result["per_class"]
    assert len(result["confusion_matrix"]) == len(result["labels"]) and summary["test"]["macro_f1"] > 0


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_nsl_kdd_categories_by_label_map_without_zeros_then_predicted(tmp_path):
    """classify.label_map turns attack names into categories in every split (test-only attacks included, so none is
    skipped) and data.omit_zeros leaves the zero features out of the text; launch/predict.py on the final model
    adopts both from final/dapt_text.json and reproduces the run's test figures from the raw file."""
    from dapt.cli.load import load_config
    from dapt.tasks import predict

    names = kdd_field_names()
    pairs = gzip.open(SHARED / "nsl_kdd" / "Attack_Types.csv.gz", "rt", newline="").read().split("\r")
    category = dict(p.strip().split(",") for p in pairs if "," in p) | {"normal": "normal"}
    test_rows = gzip.open(SHARED / "nsl_kdd" / "KDDTest+.txt.gz", "rt").read().splitlines()[:600]
    category |= {row.split(",")[41]: "r2l" for row in test_rows if row.split(",")[41] not in category}
    train = shared_slice(SHARED / "nsl_kdd" / "KDDTrain+_20Percent.txt.gz", tmp_path / "train.csv", 2000)
    test = tmp_path / "test.csv"
    test.write_text("\n".join(test_rows) + "\n")
    mapping = "{" + ", ".join(f"{a}: {c}" for a, c in category.items()) + "}"
    out = tmp_path / "kdd"
    run_inprocess_classify(
        [
            "--data.train",
            train,
            "--data.test",
            test,
            "--data.format=csv",
            f"--data.column_names=[{','.join(names)},label,difficulty]",
            f"--data.columns=[{','.join(names)}]",
            "--data.round_digits=2",
            "--data.omit_zeros=true",
            f"--classify.label_map={mapping}",
            "--classify.labels=[dos, normal, probe, r2l, u2r]",  # u2r is not in these 2,000 training rows
            "--data.max_seq_length=64",
            "--train.max_steps=20",
            "--train.micro_batch_size=32",
            "--train.lr=1e-3",
            "--output_dir",
            out,
        ]
    )
    tested = json.loads((out / "eval_test.json").read_text())
    assert (
        tested["labels"] == ["dos", "normal", "probe", "r2l", "u2r"] and tested["per_class"]["u2r"]["support"]
    )
    assert sum(map(sum, tested["confusion_matrix"])) == 600  # every test row scored: no attack is unseen
    settings = json.loads((out / "final" / "dapt_text.json").read_text())
    assert settings["omit_zeros"] is True and settings["label_map"]["neptune"] == "dos"
    card = (out / "final" / "README.md").read_text()
    assert "pairs whose value is zero left out" in card and ", 2, omit_zeros=True)" in card
    from dapt.data.formats import record_text

    row = test_rows[0].split(",")
    text = record_text(list(zip(names, row[:41])), 2, omit_zeros=True)
    assert ":0 " not in text + " " and "protocol_type:" in text

    cfg = load_config(
        [
            f"--model.name_or_path={out / 'final'}",
            f"--data.test={test}",
            f"--output_dir={tmp_path / 'predicted'}",
            "--log.progress=false",
        ],
        world_size=1,
        accelerator="cpu",
        prog="launch/predict.py",
    )
    predict.run(cfg)
    again = json.loads((tmp_path / "predicted" / "eval.json").read_text())
    assert again["labels"] == tested["labels"] and again["confusion_matrix"] == tested["confusion_matrix"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_csic_labels_per_file(tmp_path):
    normal = shared_slice(SHARED / "csic2010" / "normalTrafficTest.txt.gz", tmp_path / "normalTest.txt", 4000)
    attack = shared_slice(
        SHARED / "csic2010" / "anomalousTrafficTest.txt.gz", tmp_path / "anomalousTest.txt", 4000
    )
    out = tmp_path / "csic"
    run_inprocess_classify(
        [
            "--data.train",
            f"[{normal}, {attack}]",
            "--data.format=http",
            "--classify.label_files={'normal*': normal, 'anomalous*': attack}",
            "--model.config",
            TINY,
            "--data.max_seq_length=64",
            "--train.max_steps=10",
            "--data.valid_fraction=0.2",
            "--data.test",
            f"[{normal}, {attack}]",
            "--output_dir",
            out,
        ]
    )
    result = json.loads((out / "eval_test.json").read_text())
    assert result["labels"] == ["attack", "normal"] and "roc_auc" in result
    assert sum(result["per_class"][k]["support"] for k in result["labels"]) > 500


def run_inprocess_classify(argv: list) -> dict:
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    return run(
        load_config([str(a) for a in argv + ["--log.progress=false"]], world_size=1, accelerator="cpu")
    )


@pytest.mark.slow
def test_classify_on_two_ranks(labelled_jsonl, tmp_path):
    """The same run on 2 gloo ranks: predictions gathered from both ranks cover the whole test set."""
    from conftest import launch

    out = tmp_path / "two"
    proc = launch(
        [
            "--data.train",
            labelled_jsonl,
            "--data.test",
            labelled_jsonl,
            "--data.format=jsonl",
            "--model.config",
            TINY,
            "--model.tokenizer_vocab_size=400",
            "--data.max_seq_length=48",
            "--output_dir",
            out,
            "--train.max_steps=30",
            "--train.eval_every=10",
            "--train.lr=2e-3",
            "--train.micro_batch_size=16",
            "--classify.head_lr_mult=5",
            "--log.progress=false",
        ],
        ranks=2,
        script=ROOT / "launch" / "classify.py",
    )
    assert "global batch = micro x accumulation x world size = 16 x 1 x 2 = 32 rows" in proc.stdout
    result = json.loads((out / "eval_test.json").read_text())
    assert sum(v["support"] for v in result["per_class"].values()) == 1600 and result["accuracy"] > 0.95


@pytest.mark.slow
def test_classify_sigterm_then_rerun_matches_an_uninterrupted_run(labelled_jsonl, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import child_env, launch, series

    script = ROOT / "launch" / "classify.py"
    args = [
        "--data.train",
        str(labelled_jsonl),
        "--data.test",
        str(labelled_jsonl),
        "--data.format=jsonl",
        "--model.config",
        TINY,
        "--model.tokenizer_vocab_size=400",
        "--data.max_seq_length=48",
        "--train.max_steps=150",
        "--train.eval_every=25",
        "--train.log_every=1",
        "--train.lr=2e-3",
        "--model.config.hidden_dropout_prob=0.1",
        "--log.progress=false",
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    launch(args + ["--output_dir", straight], script=script)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--output_dir", str(broken)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (broken / "metrics.jsonl").exists() and len(series(broken, "train/loss")) >= 60:
            os.kill(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "received SIGTERM" in err, err[-1500:]
    again = launch(args + ["--output_dir", broken], script=script)
    assert "resumed from" in again.stdout
    a, b = (json.loads((d / "eval_test.json").read_text()) for d in (straight, broken))
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["macro_f1"] == pytest.approx(b["macro_f1"])
    la, lb = series(straight, "train/loss"), series(broken, "train/loss")
    assert [s for s, _ in la] == [s for s, _ in lb] and [v for _, v in la] == pytest.approx(
        [v for _, v in lb]
    )


def test_a_nan_step_in_fine_tuning_is_skipped_and_counted(labelled_jsonl, tmp_path, monkeypatch):
    from faults import inject

    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    inject(monkeypatch, {2}, "nan", builder="dapt.tasks.classify.build_model")
    out = tmp_path / "run"
    run(
        load_config(
            [
                str(a)
                for a in [
                    "--data.train",
                    labelled_jsonl,
                    "--data.format=jsonl",
                    "--model.config",
                    TINY,
                    "--model.tokenizer_vocab_size=400",
                    "--train.max_steps=4",
                    "--train.log_every=1",
                    "--output_dir",
                    out,
                    "--log.progress=false",
                ]
            ],
            world_size=1,
            accelerator="cpu",
        )
    )
    records = {
        r["step"]: r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    }
    assert [records[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert records[2]["train/learning_rate"] == records[1]["train/learning_rate"]
    assert math.isnan(records[2]["train/loss"]) and math.isfinite(records[4]["train/loss"])


def test_a_compiled_classifier_trains_like_the_eager_one(labelled_jsonl, tmp_path, caplog):
    """train.compile for fine-tuning (DeepSpeed's engine.compile, aot_eager here, through the runner's engine
    builder): the same losses as eager."""
    from dapt.cli.load import load_config
    from dapt.tasks.classify import run

    losses = {}
    for mode in ("off", "aot_eager"):
        out = tmp_path / mode
        caplog.clear()
        with caplog.at_level("INFO", logger="dapt"):
            run(
                load_config(
                    [
                        "--data.train",
                        str(labelled_jsonl),
                        "--data.format=jsonl",
                        "--model.config",
                        TINY,
                        "--model.tokenizer_vocab_size=400",
                        "--data.max_seq_length=48",
                        "--output_dir",
                        str(out),
                        "--train.max_steps=4",
                        "--train.eval_every=4",
                        "--train.log_every=1",
                        f"--train.compile={mode}",
                        "--log.progress=false",
                    ],
                    world_size=1,
                    accelerator="cpu",
                )
            )
        assert ("model compiled with torch.compile, backend aot_eager" in caplog.text) == (
            mode == "aot_eager"
        )
        losses[mode] = [
            json.loads(x)["train/loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in x
        ]
    assert len(losses["off"]) == 4 and losses["aot_eager"] == pytest.approx(losses["off"], rel=1e-4)
