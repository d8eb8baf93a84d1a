"""At least 30 hostile input files, each through the real entry point (config, data layer, tokenizer, DeepSpeed
engine, one step): a clear message naming the file (and line, for a bad record) or a counted skip; never a bare
traceback, never a hang."""

from __future__ import annotations

import json
import signal

import pytest
from hostile import GOOD, cases

import dapt.cli.main
from dapt.cli.main import main
from dapt.tasks.mlm import run

CASES = cases()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A well-formed file per format, so training has data besides the hostile file."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("good")
    texts = [f"{GOOD} {i} " + " ".join(str(j * i % 97) for j in range(12)) for i in range(60)]
    (root / "good.txt").write_text("\n".join(texts) + "\n")
    (root / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "good.csv").write_text("a,b\n" + "".join(f"{i},{i * 7 % 13}\n" for i in range(60)))
    (root / "good.http").write_text(
        "".join(
            f"GET /page/{i}?q={i % 17} HTTP/1.1\nHost: example.org\nAccept: text/html\n\n" for i in range(60)
        )
    )
    pq.write_table(pa.table({"text": texts}), root / "good.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "good_saved"))
    return {
        "arrow": root / "good_saved",
        "lines": root / "good.txt",
        "jsonl": root / "good.jsonl",
        "csv": root / "good.csv",
        "http": root / "good.http",
        "parquet": root / "good.parquet",
    }


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(case, good, tmp_path, capsys, lenient: bool, monkeypatch):
    folder = tmp_path / ("skip" if lenient else "raise")
    folder.mkdir()
    source = case.write(folder)
    argv = [
        f"--data.train=[{json.dumps(str(source))}, {json.dumps(str(good[case.fmt]))}]",
        f"--data.format={case.fmt}",
        "--model.config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64}",
        "--model.tokenizer_vocab_size=200",
        "--data.max_seq_length=32",
        "--train.micro_batch_size=4",
        "--train.max_steps=0",
        "--train.epochs=1",
        "--train.eval_every=0",
        "--checkpoint.every=0",
        "--log.progress=false",
        "--log.plots=false",
        "--data.valid_fraction=0",
        "--data.streams=1",
        "--data.log_sample_ids=true",
        f"--output_dir={folder / 'run'}",
        f"--data.on_error={'skip' if lenient else 'raise'}",
        *case.args,
    ]
    # main() closes the process group when it ends; DeepSpeed keeps a handle to it, so in one process keep it open
    monkeypatch.setattr(dapt.cli.main, "_close_process_group", lambda: None)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(90)
    try:
        code = main(run, argv)
    except Hang:
        pytest.fail(f"{case.name}: no answer in 90 s (a hang)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr()
    return code, out.out + out.err, source, folder / "run"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_strict(case, good, tmp_path, capsys, monkeypatch):
    code, text, source, _ = run_case(case, good, tmp_path, capsys, False, monkeypatch)
    assert "Traceback" not in text, text[-3000:]
    if case.lenient == "clean":  # odd but readable, or links and pipes in a folder: left out with a warning
        assert code == 0 and case.warns in text, text[-3000:]
        _check_trained(case, source, tmp_path / "raise" / "run")
        return
    assert code in (2, 3), text[-3000:]
    name = source.name.encode("unicode_escape").decode()
    assert name in text or source.name in text, text[-3000:]
    if case.names_line:
        assert f"{source.name}:".encode("unicode_escape").decode() in text or f"{source.name}:" in text, text[
            -3000:
        ]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_lenient(case, good, tmp_path, capsys, monkeypatch):
    code, text, source, out = run_case(case, good, tmp_path, capsys, True, monkeypatch)
    assert "Traceback" not in text, text[-3000:]
    if case.lenient == "error":  # nothing of the file is readable: a clear error, even when skipping records
        assert code in (2, 3) and source.name in text, text[-3000:]
        return
    assert code == 0 and case.warns in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    if case.lenient == "counted":
        assert sum(summary["skipped_records"].values()) + sum(summary["eval_skipped_records"].values()) > 0, (
            summary
        )
    else:
        _check_trained(case, source, out)


def _check_trained(case, source, out) -> None:
    """A clean case trains exactly the records it names from the hostile file (an epoch trains every row), and
    drops nothing."""
    if case.docs is None:
        return
    ids = (out / "samples.rank0.txt").read_text().splitlines()
    mine = sorted({int(i.rsplit(":", 1)[1]) for i in ids if i.rsplit(":", 1)[0] == str(source)})
    assert mine == list(case.docs), (case.name, mine)
    assert any(i.rsplit(":", 1)[0] != str(source) for i in ids)  # the good file trained too
    assert json.loads((out / "summary.json").read_text())["skipped_records"] == {}


LABEL_CASES = {  # hostile label data for launch/classify.py: (file name, content, format, extra args)
    "missing label field": ("nolabel.jsonl", [{"text": "GET /a"}], "jsonl", []),
    "null label": ("null.jsonl", [{"text": "GET /a", "label": None}], "jsonl", []),
    "empty label": ("empty.jsonl", [{"text": "GET /a", "label": " "}], "jsonl", []),
    "label is an object": ("obj.jsonl", [{"text": "GET /a", "label": {"x": 1}}], "jsonl", []),
    "unknown label in the test set": (
        "test.jsonl",
        [{"text": "GET /a", "label": "novel"}],
        "jsonl",
        ["test"],
    ),
    "CSV without the label column": ("nolabel.csv", "a,b\n1,2\n", "csv", []),
    "CSV with an empty label": ("blank.csv", "a,label\n1, \n", "csv", []),
}


@pytest.mark.parametrize("name", LABEL_CASES)
@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
def test_hostile_labels_in_fine_tuning(name, lenient, tmp_path, capsys, monkeypatch):
    from dapt.tasks.classify import run as classify

    file_name, content, fmt, where = LABEL_CASES[name]
    good = tmp_path / f"good.{fmt}"
    if fmt == "jsonl":
        good.write_text(
            "".join(json.dumps({"text": f"{GOOD} {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40))
        )
        bad_text = "".join(json.dumps(r) + "\n" for r in content)
    else:
        good.write_text("a,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(40)))
        bad_text = content
    bad = tmp_path / file_name
    bad.write_text(bad_text)
    split = (
        ["--data.train", f"[{json.dumps(str(good))}]", "--data.test", f"[{json.dumps(str(bad))}]"]
        if where
        else ["--data.train", f"[{json.dumps(str(bad))}, {json.dumps(str(good))}]"]
    )
    monkeypatch.setattr(dapt.cli.main, "_close_process_group", lambda: None)
    code = main(
        classify,
        [
            *split,
            f"--data.format={fmt}",
            "--model.config={model_type: bert, hidden_size: 32, "
            "num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
            "max_position_embeddings: 64}",
            "--model.tokenizer_vocab_size=200",
            "--train.max_steps=2",
            "--log.progress=false",
            "--log.plots=false",
            f"--output_dir={tmp_path / 'run'}",
            f"--data.on_error={'skip' if lenient else 'raise'}",
            f"--classify.unseen={'skip' if lenient else 'error'}",
        ],
        prog="launch/classify.py",
    )
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text, text[-3000:]
    if lenient:
        assert code == 0, text[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert (
            sum(summary["skipped_records"].values()) + sum(summary["eval_skipped_records"].values()) >= 1
        ), summary
    else:
        assert code in (2, 3) and f"{file_name}:" in text, text[-3000:]
