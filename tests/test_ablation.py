"""The base -> +DAPT -> +DAPT+TAPT ablation in one command, with the classifier protocol."""

from __future__ import annotations

import json

import yaml
from transformers import BertConfig, BertForMaskedLM

from dapt.model.build import train_wordpiece


def test_ablation_runs_every_stage_and_writes_the_table(tmp_path, corpus_file):
    from dapt.cli.load import load_config
    from dapt.data.corpus import generate
    from dapt.tools.ablation import run

    base = tmp_path / "base"
    tok = train_wordpiece(generate(800, seed=2), 500, 64)
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(base)
    tok.save_pretrained(base)
    task = tmp_path / "task.jsonl"
    task.write_text(
        "\n".join(
            json.dumps(
                {"text": t, "label": "http" if t.startswith(("GET", "POST", "PUT", "DEL")) else "report"}
            )
            for t in generate(600, seed=5)
        )
        + "\n"
    )
    common = {
        "data": {"max_seq_length": 48},
        "log": {"progress": False},
        "checkpoint": {"every": 0},
        "train": {"micro_batch_size": 8, "lr": 2e-3, "eval_every": 0},
    }
    recipes = {
        "dapt": {
            **common,
            "data": {**common["data"], "train": [str(corpus_file)]},
            "train": {**common["train"], "max_steps": 6},
        },
        "tapt": {
            **common,
            "data": {**common["data"], "train": [str(task)], "format": "jsonl"},
            "train": {**common["train"], "max_steps": 4},
        },
        "eval": {
            **common,
            "data": {**common["data"], "train": [str(task)], "test": [str(task)], "format": "jsonl"},
            "train": {**common["train"], "max_steps": 12, "eval_every": 6},
        },
    }
    paths = {}
    for name, doc in recipes.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc))
    argv = [
        "--ablation.base",
        str(base),
        "--ablation.dapt_recipe",
        str(paths["dapt"]),
        "--ablation.tapt_recipe",
        str(paths["tapt"]),
        "--ablation.eval_recipe",
        str(paths["eval"]),
        "--output_dir",
        str(tmp_path / "abl"),
        "--log.progress=false",
    ]
    result = run(load_config(argv, world_size=1, accelerator="cpu"))
    out = tmp_path / "abl"
    assert result["models"] == {
        "base": str(base),
        "+DAPT": str(out / "dapt" / "final"),
        "+DAPT+TAPT": str(out / "tapt" / "final"),
    }
    table = (out / "ablation.md").read_text().splitlines()
    assert table[0].startswith("| model | accuracy | macro_f1") and [r.split(" |")[0] for r in table[2:]] == [
        "| base",
        "| +DAPT",
        "| +DAPT+TAPT",
    ]
    saved = json.loads((out / "ablation.json").read_text())["results"]
    assert all(0 <= saved[k]["accuracy"] <= 1 for k in ("base", "+DAPT", "+DAPT+TAPT"))
    # The TAPT stage really started from the DAPT output, and each evaluation used its own model.
    tapt_cfg = yaml.safe_load((out / "tapt" / "config.resolved.yaml").read_text())
    assert tapt_cfg["model"]["name_or_path"] == str(out / "dapt" / "final")
    evals = {
        d.name: yaml.safe_load((d / "config.resolved.yaml").read_text())["model"]["name_or_path"]
        for d in out.glob("eval_*")
    }
    assert evals == {
        "eval_base": str(base),
        "eval_dapt": str(out / "dapt" / "final"),
        "eval_dapt_tapt": str(out / "tapt" / "final"),
    }
    # Rerunning continues: finished stages are not run again.
    before = (out / "eval_base" / "eval_test.json").stat().st_mtime_ns
    run(load_config(argv, world_size=1, accelerator="cpu"))
    assert (out / "eval_base" / "eval_test.json").stat().st_mtime_ns == before
