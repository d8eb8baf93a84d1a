"""The recipes of the five seed systems: every full-scale recipe validated offline by launch/doctor.py and
launch/plan.py for the GPUs the seeds name, from dapt's architecture table; every smoke variant run end to end on CPU
on a slice of ../shared/data, chained as the README says (DAPT -> downstream)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, hub_cache

from dapt.config.schema import BadInput

RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared" / "data"
SEEDS = {  # seed: its recipes, in the order they run
    "000 SecBERT HTTP": ["secbert_http_mlm", "http_anomaly"],
    "001 SEC-cyBERT": ["modernbert_dapt", "modernbert_tapt", "capec_severity", "modernbert_ablation"],
    "002 vulnerabilities": ["vuln_classifier"],
    "003 intrusion detection": ["ids_distilbert"],
    "004 domain CANINE": ["canine_domains_mlm", "dga_classifier"],
}
# Recipes that start from an earlier stage's output: validated from the hub model that stage starts from.
STARTS_FROM = {
    "http_anomaly": "jackaduma/SecBERT",
    "modernbert_tapt": "answerdotai/ModernBERT-large",
    "dga_classifier": "google/canine-c",
}
GPUS = ["RTX-3090", "A100-40GB", "RTX-PRO-6000"]  # seeds 001, 000/004, and the g7e

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared/data is absent (the recipes read it)"
)


def _main(run, argv, monkeypatch) -> int:
    import dapt.cli.main

    monkeypatch.setattr(
        dapt.cli.main, "_close_process_group", lambda: None
    )  # DeepSpeed keeps it for later tests
    return dapt.cli.main.main(run, [str(a) for a in argv])


def test_every_seed_has_its_recipes_and_a_smoke_variant_of_each():
    for names in SEEDS.values():
        for name in names:
            full, smoke = RECIPES / f"{name}.yaml", RECIPES / "smoke" / f"{name}.yaml"
            assert full.is_file() and smoke.is_file(), name
            assert f"recipes/smoke/{name}.yaml" in full.read_text(), (
                f"{name}: the full recipe names its smoke run"
            )
    readme = (ROOT / "docs" / "recipes.md").read_text()  # the recipes page of the docs
    assert all(f"recipes/{name}.yaml" in readme for names in SEEDS.values() for name in names)


@pytest.mark.parametrize(
    "name, millions",
    [
        ("bert-base-uncased", 110),
        ("answerdotai/ModernBERT-base", 149),
        ("answerdotai/ModernBERT-large", 395),
        ("microsoft/codebert-base", 125),
        ("distilbert-base-uncased", 66),
        ("google/canine-c", 132),
    ],
)
def test_architecture_table_gives_the_published_sizes(name, millions):
    """The table's configs build (on the meta device, no download) to the parameter counts their model cards give."""
    import torch
    from transformers import AutoModel

    from dapt.model.archs import model_config

    with torch.device("meta"):
        model = AutoModel.from_config(model_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.02)


def test_secbert_is_bert_base_with_its_own_vocabulary():
    from dapt.model.archs import model_config

    conf = model_config("jackaduma/SecBERT")
    assert (conf.model_type, conf.hidden_size, conf.num_hidden_layers, conf.vocab_size) == (
        "bert",
        768,
        12,
        52000,
    )


FULL = [name for names in SEEDS.values() for name in names if name != "modernbert_ablation"]


def _hub_models(name: str) -> list[str]:
    model = yaml.safe_load((RECIPES / f"{name}.yaml").read_text()).get("model", {})
    found = [STARTS_FROM.get(name), model.get("name_or_path"), model.get("tokenizer")]
    return [m for m in dict.fromkeys(found) if m and not m.startswith(("runs/", "/", "."))]


@needs_shared
@pytest.mark.parametrize("name", FULL)
def test_full_scale_recipe_passes_doctor_offline(name, monkeypatch, capsys, tmp_path):
    """No hub here: the model fetched once before is in the local cache, and is sized from the architecture table;
    the world is 2 nodes x 8 GPUs where the data streams allow it, else one GPU. Nothing is written."""
    import huggingface_hub.constants

    from dapt.tools.doctor import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", _hub_models(name)))
    )
    argv = [
        "--recipe",
        f"recipes/{name}.yaml",
        f"--output_dir={tmp_path / 'run'}",
        "--cluster.gpu=A100-40GB",
        "--cluster.nodes=2",
        "--cluster.gpus_per_node=8",
        "--data.streams=16",
    ]
    if name in STARTS_FROM:
        argv.append(f"--model.name_or_path={STARTS_FROM[name]}")
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK    disk" in out and "parameters" in out, out  # sized offline
    assert not (tmp_path / "run").exists()


@needs_shared
@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize(
    "name", ["secbert_http_mlm", "modernbert_dapt", "modernbert_tapt", "canine_domains_mlm"]
)
def test_full_scale_mlm_recipe_plans_offline(name, gpu, monkeypatch, tmp_path):
    from dapt.cli.load import load_config
    from dapt.tools.plan import run as run_plan

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [
        "--recipe",
        f"recipes/{name}.yaml",
        f"--output_dir={tmp_path}",
        f"--plan.gpu={gpu}",
        "--plan.measure=false",
    ]
    if name in STARTS_FROM:
        argv.append(f"--model.name_or_path={STARTS_FROM[name]}")
    result = run_plan(load_config(argv, world_size=1, accelerator="cpu", prog="launch/plan.py"))  # sizes only
    assert result["recommendation"] is not None, (name, gpu)
    assert (tmp_path / "plan.md").is_file()
    if name == "modernbert_dapt" and gpu == "RTX-3090":  # seed 001: 8192 tokens on 24 GB needs checkpointing
        assert result["model"]["parameters"] == pytest.approx(396e6, rel=0.01)
        assert result["recommendation"]["checkpointing"] or result["recommendation"]["stage"] > 0


# ---- smoke runs: the README's commands, output under tmp_path instead of runs/smoke ----


def _smoke(name: str, out: Path, *extra: str) -> list[str]:
    return ["--recipe", f"recipes/smoke/{name}.yaml", f"--output_dir={out / name}", *extra]


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@needs_shared
@pytest.mark.slow
def test_seed_000_smoke_dapt_then_anomaly(in_root, tmp_path, monkeypatch):
    from dapt.tasks.anomaly import run as run_anomaly
    from dapt.tasks.mlm import run

    assert _main(run, _smoke("secbert_http_mlm", tmp_path), monkeypatch) == 0
    summary = json.loads((tmp_path / "secbert_http_mlm" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_eval_loss"] < 7
    final = tmp_path / "secbert_http_mlm" / "final"
    assert (
        _main(run_anomaly, _smoke("http_anomaly", tmp_path, f"--model.name_or_path={final}"), monkeypatch)
        == 0
    )
    result = json.loads((tmp_path / "http_anomaly" / "anomaly.json").read_text())
    assert 0 <= result["recall_at_max_fpr"] <= 1 and 0 <= result["auroc"] <= 1


@needs_shared
@pytest.mark.slow
def test_seed_001_smoke_dapt_tapt_and_ablation(in_root, tmp_path, monkeypatch):
    from dapt.tasks.mlm import run
    from dapt.tools.ablation import run as ablation

    assert _main(run, _smoke("modernbert_dapt", tmp_path), monkeypatch) == 0
    dapt_final = tmp_path / "modernbert_dapt" / "final"
    assert json.loads((dapt_final / "config.json").read_text())["model_type"] == "modernbert"
    assert (
        _main(run, _smoke("modernbert_tapt", tmp_path, f"--model.name_or_path={dapt_final}"), monkeypatch)
        == 0
    )
    resolved = yaml.safe_load((tmp_path / "modernbert_tapt" / "config.resolved.yaml").read_text())
    assert resolved["masking"]["whole_word"] and resolved["model"]["name_or_path"] == str(dapt_final)
    assert (
        _main(ablation, _smoke("modernbert_ablation", tmp_path, f"--ablation.base={dapt_final}"), monkeypatch)
        == 0
    )
    table = (tmp_path / "modernbert_ablation" / "ablation.md").read_text()
    assert all(f"| {row} |" in table for row in ("base", "+DAPT", "+DAPT+TAPT")), table


@needs_shared
@pytest.mark.slow
def test_seed_002_smoke_vulnerability_classifier_over_two_seeds(in_root, tmp_path, monkeypatch):
    from dapt.tasks.classify import run

    assert _main(run, _smoke("vuln_classifier", tmp_path), monkeypatch) == 0
    summary = json.loads((tmp_path / "vuln_classifier" / "seeds_summary.json").read_text())
    assert summary["seeds"] == [42, 123] and summary["split"] == "valid"  # Devign's test split is held out
    assert len(summary["valid"]["macro_f1"]["values"]) == 2


@needs_shared
@pytest.mark.slow
def test_seed_003_smoke_intrusion_classifier_reports_per_class(in_root, tmp_path, monkeypatch):
    from dapt.tasks.classify import run

    assert _main(run, _smoke("ids_distilbert", tmp_path), monkeypatch) == 0
    out = tmp_path / "ids_distilbert"
    result = json.loads((out / "eval_test.json").read_text())
    assert "normal" in json.dumps(result) and (out / "plots" / "confusion_matrix.png").is_file()
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "distilbert"


@needs_shared
@pytest.mark.slow
def test_seed_004_smoke_canine_mlm_fill_mask_then_dga_classifier(in_root, tmp_path, monkeypatch, capsys):
    from dapt.tasks.classify import run as classify
    from dapt.tasks.fill_mask import run as run_fill
    from dapt.tasks.mlm import run

    assert _main(run, _smoke("canine_domains_mlm", tmp_path), monkeypatch) == 0
    final = tmp_path / "canine_domains_mlm" / "final"
    capsys.readouterr()
    assert (
        _main(
            run_fill,
            [
                "--recipe",
                "recipes/smoke/canine_domains_mlm.yaml",
                f"--model.name_or_path={final}",
                "--fill.text=['goo[MASK]le.com', '[MASK][MASK].net']",
                "--fill.top_k=3",
            ],
            monkeypatch,
        )
        == 0
    )
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "goo[MASK]le.com" and shown[1].startswith("  [1] ") and shown[1].count("'") == 6
    assert shown[2] == "[MASK][MASK].net" and shown[4].startswith("  [2] ")
    assert (
        _main(classify, _smoke("dga_classifier", tmp_path, f"--model.name_or_path={final}"), monkeypatch) == 0
    )
    assert json.loads((tmp_path / "dga_classifier" / "eval_valid.json").read_text())["accuracy"] > 0.5


def test_a_hub_model_not_in_the_cache_offline_fails_doctor_and_the_run_before_anything_starts(
    monkeypatch, capsys, tmp_path, corpus_file
):
    """bert-base-uncased is in dapt's table of sizes, which says nothing of whether the run can load it: offline and
    not cached, doctor fails it and the run stops with exit 2 before any rank starts, with the same message (one
    function); launch/plan.py, which only sizes it, goes on."""
    import huggingface_hub.constants

    from dapt.cli.load import collect_config
    from dapt.tools.doctor import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    argv = [
        "--model.name_or_path=bert-base-uncased",
        f"--data.train={corpus_file}",
        f"--output_dir={tmp_path / 'run'}",
    ]
    assert main([*argv, "--cluster.gpu=cpu"]) == 2
    out = capsys.readouterr().out
    said = "model.name_or_path 'bert-base-uncased' cannot be loaded: bert-base-uncased is not in the local Hugging Face cache"
    assert "FAIL  recipe and ds config" in out and said in out, out
    assert said in " ".join(collect_config(argv, 1, "cpu", prog="launch/mlm.py")[1])
    assert not [
        p for p in collect_config(argv, 1, "cpu", prog="launch/plan.py")[1] if "cannot be loaded" in p
    ]
    cached = hub_cache(tmp_path / "hub", ["bert-base-uncased"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cached))
    assert not [p for p in collect_config(argv, 1, "cpu", prog="launch/mlm.py")[1] if "cannot be loaded" in p]
    assert not (tmp_path / "run").exists()


def test_an_earlier_stage_output_that_is_missing_is_named_not_fetched(tmp_path, monkeypatch):
    from dapt.model.archs import model_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="runs/secbert_http_mlm/final: no such model folder"):
        model_config("runs/secbert_http_mlm/final")
