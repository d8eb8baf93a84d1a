"""Runs in a row, as a new user makes them: adapt (the README's first command), fine-tune a classifier with data
arguments alone, fill masks with the adapted model, predict with the classifier. Each run has its own default
folder; nothing of an earlier run changes; a run pointed at another task's or configuration's folder is refused
before anything starts (exit 2), and so is a resume whose learning rate would jump."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from conftest import DS, ROOT, launch

pytestmark = pytest.mark.slow
CLASSIFY, FILL, PREDICT = (ROOT / "launch" / f"{name}.py" for name in ("classify", "fill_mask", "predict"))


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _csv(path: Path, rows: list[tuple[str, str]], labels: bool = True) -> None:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["text", "source", "label"] if labels else ["text", "source"])
        out.writerows([(text, "generated", label) if labels else (text, "generated") for text, label in rows])


def test_adapt_then_classify_then_fill_then_predict_each_in_its_own_folder(tmp_path):
    from dapt.data.corpus import generate

    rows = [
        (t, "http" if t.split(" ", 1)[0] in ("GET", "POST", "PUT", "DELETE") else "report")
        for t in generate(700, 3)
    ]
    _csv(tmp_path / "train.csv", rows[:500])
    _csv(tmp_path / "test.csv", rows[500:])
    _csv(tmp_path / "new.csv", rows[500:560], labels=False)
    quiet = "--log.progress=false"

    # 1. the README's first command (shorter): runs/mlm
    launch(["--ds", DS / "zero2_bf16.json", "--train.max_steps=40", quiet], cwd=tmp_path)
    mlm = tmp_path / "runs" / "mlm"
    before = _digest(mlm)
    assert (
        json.loads((mlm / "dapt_run.json").read_text())["task"] == "mlm"
        and "final/model.safetensors" in before
    )

    # 2. the classifier with data arguments alone (the format from the files' extension): runs/classify
    done = launch(
        ["--data.train=train.csv", "--data.test=test.csv", "--train.max_steps=30", quiet],
        cwd=tmp_path,
        script=CLASSIFY,
    )
    assert "data.format=csv: from the data files' extension" in done.stdout
    classify = tmp_path / "runs" / "classify"
    tested = json.loads((classify / "eval_test.json").read_text())
    card = (classify / "final" / "README.md").read_text()
    assert "## How to use" in card and "dapt predict --model.name_or_path=runs/classify/final" in card
    assert "each written `name:value`" in card and "concat packing" not in card
    # the card's transformers call: the columns in training's order, cut where training cut (the schema's 128 tokens:
    # a classifier given only data does not take the MLM demo's 64)
    call = 'classify(record_text([("text", row["text"]), ("source", row["source"])]), truncation=True, max_length=128)'
    assert call in card, card

    # 3. fill-mask on the adapted model: no output folder, no resume check
    filled = launch(
        ["--model.name_or_path=runs/mlm/final", '--fill.text=["GET /index.php?id=[MASK] HTTP/1.1"]'],
        cwd=tmp_path,
        script=FILL,
    )
    assert "[1]" in filled.stdout

    # 4. the classifier on new records (no label column) and, evaluation only, on the labelled test set
    launch(
        ["--model.name_or_path=runs/classify/final", "--data.test=new.csv", quiet],
        cwd=tmp_path,
        script=PREDICT,
    )
    predicted = [
        json.loads(x) for x in (tmp_path / "runs" / "predict" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predicted) == 60 and {p["predicted"] for p in predicted} <= {"http", "report"}
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 and "label" not in p for p in predicted)
    other_files = ["--model.name_or_path=runs/classify/final", "--data.test=test.csv", quiet]
    kept = launch(
        other_files, cwd=tmp_path, script=PREDICT, check=False
    )  # runs/predict holds new.csv's predictions
    assert kept.returncode == 2 and "of another configuration (data.test" in kept.stderr, kept.stderr[-2000:]
    args = [
        "--model.name_or_path=runs/classify/final",
        "--data.test=test.csv",
        "--output_dir=runs/evaluated",
        quiet,
    ]
    launch(args, cwd=tmp_path, script=PREDICT)
    again = json.loads((tmp_path / "runs" / "evaluated" / "eval.json").read_text())
    # the same records made the same text as in training: the same predictions, the same metrics
    assert again["confusion_matrix"] == tested["confusion_matrix"] and again["accuracy"] == tested["accuracy"]

    # refused before anything starts, naming the folder and the way on; the adapted model untouched throughout
    other_task = launch(
        ["--data.train=train.csv", "--output_dir=runs/mlm", quiet], cwd=tmp_path, script=CLASSIFY, check=False
    )
    assert other_task.returncode == 2 and "output_dir runs/mlm holds an mlm run" in other_task.stderr
    assert "--output_dir=NEW" in other_task.stderr
    doctor = (
        ROOT / "launch" / "doctor.py"
    )  # the preflight of that classifier run says the same, through the same check
    checked = launch(
        [
            "--submit.entry=launch/classify.py",
            "--data.train=train.csv",
            "--output_dir=runs/mlm",
            "--cluster.gpu=cpu",
        ],
        cwd=tmp_path,
        script=doctor,
        check=False,
    )
    assert checked.returncode == 2 and "output_dir runs/mlm holds an mlm run" in checked.stdout, (
        checked.stdout[-2000:]
    )
    other_config = launch(
        ["--ds", DS / "zero2_bf16.json", "--train.max_steps=40", "--train.lr=0.002", quiet],
        cwd=tmp_path,
        check=False,
    )
    assert (
        other_config.returncode == 2
        and "of another configuration (train.lr 0.001 -> 0.002)" in other_config.stderr
    )
    longer = launch(
        ["--ds", DS / "zero2_bf16.json", "--train.max_steps=80", quiet], cwd=tmp_path, check=False
    )
    assert longer.returncode == 2 and "keep --train.max_steps=40" in longer.stderr, longer.stderr[-2000:]
    assert "rendezvous" not in longer.stdout  # refused by the config check: no process group started
    assert _digest(mlm) == before


def test_a_constant_schedule_is_lengthened_and_says_so(recipe, tmp_path):
    """Continuing a finished run with more steps goes on where its learning rate does not jump (a constant schedule),
    with a line saying so; the learning rates logged are those of one uninterrupted run."""
    args = [
        "--recipe",
        recipe,
        "--train.lr_schedule=constant",
        "--train.warmup_steps=0",
        "--log.progress=false",
    ]
    out = tmp_path / "run"
    launch([*args, "--output_dir", out, "--train.max_steps=6"])
    more = launch([*args, "--output_dir", out, "--train.max_steps=9"])
    assert "the run goes on to 9 optimizer steps (it was planned for 6)" in more.stdout
    rates = [
        json.loads(x)["train/learning_rate"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
        if "train/learning_rate" in x
    ]
    assert len(rates) == 9 and len(set(rates)) == 1


def test_a_mistyped_model_folder_is_named_and_leaves_the_run_folder_free(
    labelled, tmp_path, monkeypatch, capsys
):
    """--model.name_or_path=runs/clasify/final (a typo): exit 3 naming the path as a folder that is not there (not a
    hub id error), before the output folder is claimed, so the corrected command runs in it."""
    import dapt.cli.main
    from dapt.cli.main import main
    from dapt.tasks.classify import run

    monkeypatch.setattr(dapt.cli.main, "_close_process_group", lambda: None)
    out = tmp_path / "cls"
    argv = [f"--data.train={labelled}", f"--output_dir={out}", "--log.progress=false"]
    assert (
        main(run, argv + [f"--model.name_or_path={tmp_path}/runs/clasify/final"], prog="launch/classify.py")
        == 3
    )
    err = capsys.readouterr().err
    assert f"{tmp_path}/runs/clasify/final is not a folder" in err and "Repo id" not in err, err[-2000:]
    assert not (out / "dapt_run.json").exists()


def test_a_folder_whose_run_produced_nothing_is_taken_by_the_corrected_command(tmp_path):
    """A run that stopped after claiming its folder but before producing anything (input it refused at load) leaves
    nothing to lose: the corrected command, of another configuration, takes the folder. Once anything is produced (a
    metric, final/, a classifier's seed run) the folder is kept for its run."""
    from dapt.cli.load import load_config
    from dapt.config.schema import ConfigError
    from dapt.runtime import folder

    out = tmp_path / "run"

    def config(lr):
        return load_config([f"--train.lr={lr}", f"--output_dir={out}"], world_size=1, prog="launch/mlm.py")

    folder.claim(config(0.001))
    taken = config(0.002)  # nothing produced: no problem reported
    folder.claim(taken)
    assert json.loads((out / folder.CLAIM).read_text())["identity"]["train.lr"] == 0.002
    for product in ("metrics.jsonl", "final", "seed_42"):
        (out / product).mkdir()
        with pytest.raises(ConfigError, match=r"of another configuration \(train.lr 0.002 -> 0.001\)"):
            config(0.001)
        folder.claim(config(0.002))  # its own run's claim is kept
        assert json.loads((out / folder.CLAIM).read_text())["identity"]["train.lr"] == 0.002
        (out / product).rmdir()
