"""The bench scripts' helpers that decide what a measurement reads and what its committed results keep."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))


def test_characters_copy_reads_each_character_with_the_base_weights(bench, tmp_path):
    """bench/classify_tune.py's `characters` encoder: the base's weights, its tokenizer splitting every character
    before WordPiece, saved so that a classifier run (and its final/) reads names that way."""
    from common import characters_copy
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from dapt.model.build import train_wordpiece

    base = tmp_path / "base"
    trained = train_wordpiece(["api-global.netflix.com xjkq9wz.ru google.com"] * 50, 300, 64)
    trained.save_pretrained(base)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(BertConfig(vocab_size=len(trained), **small)).save_pretrained(base)
    assert trained.tokenize("netflix.com")[0] == "netflix"  # the base reads words as pieces

    folder = characters_copy(str(base), tmp_path / "chars")
    chars = AutoTokenizer.from_pretrained(folder)
    assert chars.tokenize("netflix.com") == list("netflix.com")
    ids = chars("xjkq9wz.ru")["input_ids"]
    assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id and len(ids) == 12
    assert trained.unk_token_id not in ids
    assert chars.special_tokens_map == trained.special_tokens_map and chars.model_max_length == 64
    assert (tmp_path / "chars" / "model.safetensors").read_bytes() == (
        base / "model.safetensors"
    ).read_bytes()
    assert (
        characters_copy(str(base), tmp_path / "chars") == folder
    )  # made once: a rerun's stages read the same


def test_classify_tune_keeps_the_committed_candidates_it_did_not_rerun(bench, tmp_path, monkeypatch):
    from classify_tune import kept

    committed = {
        "tasks": {"dga": {"1000 steps": {"best_step": 1000}}, "nsl_kdd_categories": {"600 steps": {"a": 1}}},
        "commands": {"dga_1000_steps": "old", "nsl_kdd_categories_600_steps": "old"},
        "minutes": {"dga_1000_steps": 17.8},
    }
    (tmp_path / "classify_tune.json").write_text(json.dumps(committed))
    monkeypatch.setenv("DAPT_BENCH_RESULTS", str(tmp_path))
    this_run = {
        "tasks": {"dga": {"1000 steps, characters": {"best_step": 800}, "1000 steps": {"best_step": 600}}},
        "commands": {"dga_1000_steps_characters": "new", "dga_1000_steps": "rerun"},
        "minutes": {"dga_1000_steps_characters": 20.0},
    }
    merged = kept(this_run)
    assert merged["tasks"]["dga"] == {
        "1000 steps": {"best_step": 600},
        "1000 steps, characters": {"best_step": 800},
    }
    assert merged["tasks"]["nsl_kdd_categories"] == {"600 steps": {"a": 1}}
    assert (
        merged["commands"]["dga_1000_steps"] == "rerun"
        and merged["commands"]["dga_1000_steps_characters"] == "new"
    )
    assert merged["minutes"] == {"dga_1000_steps": 17.8, "dga_1000_steps_characters": 20.0}


def test_classify_tune_tables_the_kept_candidates_beside_the_new(bench, tmp_path, monkeypatch):
    from classify_tune import kept, markdown

    def row(curve):
        return {"why": "w", "validation": curve}

    committed = {
        "tasks": {"dga": {"1000 steps": row({"200": {"accuracy": 0.9, "macro_f1": 0.9}})}},
        "commands": {},
        "minutes": {},
    }
    (tmp_path / "classify_tune.json").write_text(json.dumps(committed))
    monkeypatch.setenv("DAPT_BENCH_RESULTS", str(tmp_path))
    curve = {1000: {"accuracy": 0.97, "macro_f1": 0.97}, 200: {"accuracy": 0.8, "macro_f1": 0.8}}
    new = {"tasks": {"dga": {"+DAPT": row(curve)}}, "commands": {}, "minutes": {}}
    merged = kept(json.loads(json.dumps(new)))  # as classify_tune's main reads its own result back
    lines = markdown({"machine": {"cpu": "test", "cores": 2}, "seed": 42, "valid_documents": 3000, **merged})
    table = [line for line in lines.splitlines() if line.startswith("| ")]
    assert table[0] == "| candidate | why | step 200 | step 1000 |"
    assert table[1:] == [
        "| 1000 steps | w | 0.900 / 0.900 |  |",
        "| +DAPT | w | 0.800 / 0.800 | 0.970 / 0.970 |",
    ]


def test_attack_level_scores_name_each_categorys_recall(bench):
    """NSL-KDD at attack level: besides each attack's recall, the share of a category's rows predicted as any attack
    of that category (a guess_passwd row called warezmaster is an r2l caught)."""
    from classify_value import scores

    labels = ["guess_passwd", "neptune", "normal", "warezmaster"]
    categories = {"guess_passwd": "r2l", "warezmaster": "r2l", "neptune": "dos", "normal": "normal"}
    cm = [[1, 0, 2, 1], [0, 5, 0, 0], [0, 1, 9, 0], [0, 0, 0, 0]]  # rows: true; warezmaster has no test row
    out = scores(labels, cm, categories)
    assert out["recall"] == {"guess_passwd": 0.25, "neptune": 1.0, "normal": 0.9}
    assert out["category_recall"] == {"dos": 1.0, "normal": 0.9, "r2l": 0.5}
    assert out["accuracy"] == 15 / 19 and "category_recall" not in scores(labels, cm)


class RecordedStages:
    """bench/common.Stages' interface, each run recorded instead of started (the stages themselves are dapt commands,
    tested on their own)."""

    def __init__(self, work):
        self.work, self.runs = work, []

    def run(self, name, script, args, done):
        self.runs.append((name, script, args))
        return self.work / name


def test_adapted_chains_each_mlm_stage_from_the_one_before_and_stops_at_the_row_asked(
    bench, tmp_path, monkeypatch
):
    import argparse

    from classify_value import adapted
    from common import minilm_tokenizer

    monkeypatch.setenv(
        "DAPT_BENCH_TOKENIZER", "BASE"
    )  # the base's folder; the test extra lacks the MiniLM package

    p = {
        "mlm": [
            ("+DAPT", ["--recipe=recipes/canine_domains_mlm.yaml"]),
            ("+DAPT+TAPT", ["--recipe=recipes/dga_classifier.yaml"]),
        ],
        "mlm_budget": ["--train.max_steps=100"],
    }
    budget = argparse.Namespace(full=False, mlm_steps=100)
    stages = RecordedStages(tmp_path)
    models = adapted("dga", p, stages, budget)
    assert [r[0] for r in stages.runs] == ["dga_dapt", "dga_dapt_tapt"]
    assert f"--model.name_or_path={minilm_tokenizer()}" in stages.runs[0][2]
    assert f"--model.name_or_path={tmp_path / 'dga_dapt' / 'final'}" in stages.runs[1][2]
    assert models == {
        "base": minilm_tokenizer(),
        "+DAPT": str(tmp_path / "dga_dapt" / "final"),
        "+DAPT+TAPT": str(tmp_path / "dga_dapt_tapt" / "final"),
    }
    stages = RecordedStages(tmp_path)
    assert adapted("dga", p, stages, budget, until="+DAPT")["+DAPT"] == models["+DAPT"]
    assert [r[0] for r in stages.runs] == ["dga_dapt"]  # the TAPT stage is not run for a +DAPT candidate


def test_only_the_mlm_stages_up_to_the_last_row_asked_for_are_run(bench):
    from classify_value import last_stage

    p = {"mlm": [("+DAPT", []), ("+DAPT+TAPT", [])]}
    assert last_stage(p, []) == "+DAPT+TAPT"  # every row
    assert last_stage(p, ["base", "+DAPT"]) == "+DAPT"
    assert last_stage(p, ["+DAPT+TAPT"]) == "+DAPT+TAPT"  # it needs +DAPT's stage, which adapted runs first
    assert last_stage(p, ["base"]) is None and last_stage({"mlm": []}, []) is None


def test_classify_tune_runs_the_candidates_named_on_their_encoders(bench, tmp_path, monkeypatch):
    import argparse

    import classify_tune
    from classify_tune import candidates, encoder, selected

    a = argparse.Namespace(kdd_steps=600, dga_steps=1000)
    rows = candidates(a)["dga"]
    assert [s for s, _, _ in selected("dga", rows, "")] == [
        "dga_1000_steps",
        "dga_1000_steps_characters",
        "dga_1000_steps_dapt",
    ]
    chosen = selected("dga", rows, "dga_1000_steps_characters, nsl_kdd_categories_600_steps")
    assert [(s, n) for s, n, _ in chosen] == [("dga_1000_steps_characters", "1000 steps, characters")]
    monkeypatch.setattr(classify_tune, "minilm_tokenizer", lambda: "BASE")
    monkeypatch.setattr(classify_tune, "characters_copy", lambda base, folder: f"{folder} from {base}")
    assert encoder("base", "dga", None, tmp_path, None) == "BASE"
    assert encoder(chosen[0][2][2], "dga", None, tmp_path, None) == f"{tmp_path / 'minilm_chars'} from BASE"


def test_seed_summaries_and_the_attack_level_table(bench, tmp_path):
    """Mean and population std over the seeds, every recall averaged (the categories' too), from each seed's test
    confusion matrix; the attack-level table names each category's recall and no single attack's."""
    from classify_value import SEEDS, dapt_row, markdown

    labels = ["guess_passwd", "neptune", "normal", "warezmaster"]
    categories = {"guess_passwd": "r2l", "warezmaster": "r2l", "neptune": "dos", "normal": "normal"}
    matrices = {
        42: [[2, 0, 2, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]],
        123: [[0, 0, 4, 0], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]],
        456: [[1, 0, 1, 2], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0]],
    }
    for seed in SEEDS:
        (tmp_path / f"seed_{seed}").mkdir()
        result = {"labels": labels, "confusion_matrix": matrices[seed]}
        (tmp_path / f"seed_{seed}" / "eval_test.json").write_text(json.dumps(result))
    row = dapt_row(tmp_path, categories)
    assert row["accuracy"]["values"] == [10 / 12, 8 / 12, 9 / 12]
    assert (
        abs(row["accuracy"]["mean"] - 0.75) < 1e-12
        and abs(row["accuracy"]["std"] - (2 / 3) ** 0.5 / 12) < 1e-12
    )
    assert (
        row["recall"]["guess_passwd"] == 0.25 and abs(row["category_recall"]["r2l"] - 5 / 12) < 1e-12
    )  # 2, 0 and 3 of 4
    assert "category_recall" not in dapt_row(tmp_path)

    machine = {"cpu": "test", "cores": 2}
    result = {
        "machine": machine,
        "budget": {"kdd_steps": 100},
        "seeds": SEEDS,
        "tasks": {"nsl_kdd_attacks": {"base": row}},
        "goals": {"adaptation_beats_base": {}},
        "commands": {},
        "minutes": {},
    }
    table = [line for line in markdown(result).splitlines() if line.startswith("|")]
    assert table[0] == (
        "| row | macro-F1 | accuracy | recall dos (any dos attack) | recall normal | recall r2l (any r2l attack) |"
    )
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2].endswith("| 1.000 | 1.000 | 0.417 |")


def test_a_run_without_the_base_row_says_so_instead_of_comparing(bench):
    """--rows +DAPT: the goals compare adaptation with the base only where this run has the base row."""
    from classify_value import goals, markdown

    def row(f1):
        return {"macro_f1": {"mean": f1, "std": 0.0}, "accuracy": {"mean": f1, "std": 0.0}, "recall": {}}

    tasks = {"dga": {"baseline": {**row(0.98), "name": "n-grams"}, "+DAPT": row(0.97)}}
    tasks["devign"] = {"baseline": {**row(0.6), "name": "n-grams"}, "base": row(0.5), "+TAPT": row(0.55)}
    met = goals(tasks)
    assert met["adaptation_beats_base"] == {"devign": True} and met["dga"] is False
    result = {"machine": {"cpu": "test", "cores": 2}, "budget": "full recipes", "seeds": [42], "tasks": tasks}
    text = markdown({**result, "goals": met, "commands": {}, "minutes": {}})
    assert "base encoder's macro-F1: devign yes; dga: not compared, the base row was not run (--rows)" in text


def test_classify_tune_refuses_a_candidate_or_task_it_does_not_have(tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    def tune(*args):
        script = [sys.executable, str(ROOT / "bench" / "classify_tune.py"), "--work", str(tmp_path), *args]
        return subprocess.run(script, capture_output=True, text=True, env=child_env(), timeout=120)

    typo = tune("--tasks", "dga", "--candidates", "dga_1000_steps_charakters")
    assert typo.returncode == 1 and "--candidates: dga_1000_steps_charakters unknown" in typo.stderr
    assert "dga_1000_steps_characters" in typo.stderr and not list(tmp_path.iterdir())
    other = tune("--tasks", "devign")
    assert other.returncode == 1 and "--tasks: devign unknown" in other.stderr


def test_classify_value_refuses_a_row_or_task_name_it_does_not_have(tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    script = [sys.executable, str(ROOT / "bench" / "classify_value.py"), "--work", str(tmp_path)]
    typo = subprocess.run(
        [*script, "--rows", "base,+DAPTT", "--base-only", "dgaa"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert typo.returncode == 1 and "--rows: +DAPTT (rows: base, +DAPT" in typo.stderr
    assert "--base-only: dgaa (tasks:" in typo.stderr and not list(tmp_path.iterdir())
